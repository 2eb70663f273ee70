"""fastml::adam_step: the Adam / AdamW update as a torch.library custom op that mutates its tensor
lists in place, for torch.compile / torch.export (see fastml/_library.py). The step counts are
counted and read back inside the op, where the graph need not see them. It returns nothing, so
its fake does nothing."""

from typing import Sequence

import torch
from torch import Tensor

from fastml.ops import _contract as contract
from fastml.ops.adam import launch_adam_step


@torch.library.custom_op("fastml::adam_step",
                         mutates_args=("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"))
def adam_step(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
              exp_avg_sqs: Sequence[Tensor], max_exp_avg_sqs: Sequence[Tensor], state_steps: Sequence[Tensor],
              lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, decoupled: bool, amsgrad: bool,
              maximize: bool, zero_grad: bool) -> None:
    """One torch.optim.Adam(W) step (arguments as fastml.ops.adam.adam_step's; max_exp_avg_sqs
    empty unless amsgrad). ``grads`` are written only when zero_grad."""
    _check(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad)
    launch_adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr=lr, beta1=beta1,
                     beta2=beta2, eps=eps, weight_decay=weight_decay, decoupled=decoupled, amsgrad=amsgrad,
                     maximize=maximize, zero_grad=zero_grad)


def _check(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad) -> None:
    """One gradient, state tensor (of its shape; max_exp_avg_sqs only with amsgrad) and step
    count per parameter. They may differ in dtype (state kept from before ``model.double()``):
    those rows run torch's ops."""
    state = {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    if amsgrad:
        state["max_exp_avg_sqs"] = max_exp_avg_sqs
    contract.same_lengths("adam_step", "params", params, state_steps=state_steps, **state)
    contract.same_shapes("adam_step", "params", params, **state)


@adam_step.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, eps, weight_decay,
      decoupled, amsgrad, maximize, zero_grad):
    _check(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad)
    return None
