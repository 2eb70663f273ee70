"""Adam / AdamW over lists of tensors: step counting, bias corrections and per-bucket dispatch.

Backend modules provide ``adam_step`` (see reference.py) for lists of walkable tensors of one
device and dtype. ``adam_step`` here takes lists of any mix, as fastml.ops.sgd does: it counts
the step on every tensor's ``step`` tensor, works out each tensor's bias corrections (tensors
whose gradients appeared later have taken fewer steps), then launches once per (device, dtype)
bucket.
"""

from __future__ import annotations

import torch

from fastml import _backend
from fastml._multi_tensor import pick, run_launches
from fastml.ops import in_custom_op_graph

IMPLEMENTED = ("triton", "cpp", "numba", "reference")


def impl(backend: str):
    return _backend.load(__name__, backend)


def count_steps(state_steps) -> list[float]:
    """Adds one to every step tensor (as torch's ``step_t += 1``) and returns the new counts."""
    first = state_steps[0]
    if all(s.dtype == first.dtype and s.device == first.device for s in state_steps):
        torch._foreach_add_(state_steps, 1)
        return torch.stack(state_steps).tolist()
    counts = []  # steps of several dtypes or devices (a state loaded from elsewhere)
    for step in state_steps:
        step += 1
        counts.append(step.item())
    return counts


def bias_corrections(counts, lr, beta1, beta2) -> tuple[list[float], list[float]]:
    """Per tensor: step_size = lr / (1 - beta1^step), bias2_sqrt = (1 - beta2^step) ** 0.5, in
    Python floats as torch's for-loop implementation computes them; one evaluation per distinct
    step count."""
    seen: dict[float, tuple[float, float]] = {}
    step_sizes, bias2_sqrts = [], []
    for step in counts:
        pair = seen.get(step)
        if pair is None:
            # float(): a tensor lr divides in its own dtype, as torch's (lr / bias_correction1)
            pair = seen[step] = (float(lr / (1 - beta1 ** step)), (1 - beta2 ** step) ** 0.5)
        step_sizes.append(pair[0])
        bias2_sqrts.append(pair[1])
    return step_sizes, bias2_sqrts


def decay_arguments(lr, weight_decay: float, decoupled: bool) -> tuple[float, float]:
    """(lr, weight_decay) as the kernels take them, Python floats. A tensor lr (0-dim) rounds the
    products it takes part in to its own dtype, as torch's implementation does: AdamW's factor
    1 - lr·wd is formed in that dtype, then passed as lr' = 1 - factor with wd' = 1, for which
    every kernel's 1 - lr'·wd' gives the factor back exactly (|1 - factor| is tiny and exact)."""
    if not isinstance(lr, torch.Tensor):
        return lr, weight_decay
    if decoupled and weight_decay != 0:
        return 1.0 - float(1 - lr * weight_decay), 1.0
    return float(lr), weight_decay


def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps,
              weight_decay, decoupled, amsgrad, maximize, zero_grad=False):
    """One torch.optim.Adam step over lists of any devices and dtypes, in place: state_steps are
    the per-tensor step-count tensors (incremented here); the rest as reference.adam_step."""
    if in_custom_op_graph():
        lr = float(lr)
        torch.ops.fastml.adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2,
                                   eps, weight_decay, decoupled, amsgrad, maximize, zero_grad)
    else:
        launch_adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr=lr, beta1=beta1,
                         beta2=beta2, eps=eps, weight_decay=weight_decay, decoupled=decoupled, amsgrad=amsgrad,
                         maximize=maximize, zero_grad=zero_grad)


def launch_adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps,
                     weight_decay, decoupled, amsgrad, maximize, zero_grad):
    """adam_step's step counting and kernel launches (also fastml::adam_step's implementation:
    the counts are read back from the step tensors, which a traced graph cannot do)."""
    step_sizes, bias2_sqrts = bias_corrections(count_steps(state_steps), lr, beta1, beta2)
    lr, weight_decay = decay_arguments(lr, weight_decay, decoupled)
    lists = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])

    def launch(backend, rows, cols, timing):
        impl(backend).adam_step(*cols[:4], cols[4] if amsgrad else [], pick(step_sizes, rows),
                                pick(bias2_sqrts, rows), lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                weight_decay=weight_decay, decoupled=decoupled, amsgrad=amsgrad, maximize=maximize,
                                zero_grad=zero_grad and not timing)

    options = ("adam_step", weight_decay != 0, decoupled, amsgrad, maximize)
    run_launches(lists, (True, zero_grad, True, True, True), IMPLEMENTED, options, launch)
