"""Optimizers whose step is one kernel launch per (device, dtype) for all of a group's tensors.

``SGD``, ``Adam`` and ``AdamW`` subclass their torch.optim twins: construction, argument
checks, param groups, ``add_param_group``, ``zero_grad``, hooks, LR schedulers and
``state_dict`` / ``load_state_dict`` are torch's own, so a state dict moves between fastml's and
torch's optimizer in either direction, mid-training. Only ``step`` changes: it gathers each
group's parameters, gradients and state as torch does, then updates them all in one launch
(fastml.ops.sgd, fastml.ops.adam) instead of one or more torch ops per tensor, with the same
arithmetic as torch's for-loop implementation. ``step(zero_grad=True)`` also sets every gradient
to zero in the same pass.

``foreach`` and ``fused`` are accepted and recorded as torch does (torch validates them): fastml
runs its own single-launch kernels either way. What the kernels do not cover runs torch's own
implementation for that group, so a step is never wrong where torch's is right: sparse
gradients, a parameter listed twice, ``differentiable=True``, ``capturable=True``, gradient
scaling by torch.amp (an optimizer given ``grad_scale`` / ``found_inf``), hyperparameters that
require grad, and
torch.compile tracing on torch < 2.4 (later, a traced step calls fastml::sgd_step /
fastml::adam_step, the same kernels as a custom op).

``sgd_(params, lr, batch_size)`` is the course's hand-written ``sgd`` step, fused.
"""

from __future__ import annotations

import functools
import inspect
import numbers

import torch
from torch.optim import adam as torch_adam
from torch.optim import adamw as torch_adamw
from torch.optim import optimizer as torch_optimizer
from torch.optim import sgd as torch_sgd

from fastml.ops import LIBRARY, dispatch_mode_active, is_compiling
from fastml.ops import adam as adam_op
from fastml.ops import sgd as sgd_op

__all__ = ["SGD", "Adam", "AdamW", "sgd_"]


def _evaluate(closure):
    """torch.optim's closure protocol: re-evaluate the model with gradients enabled."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


_value = float
"""A hyperparameter as a Python float, as torch's for-loop implementations use it: float() takes
a 1-element tensor's item() (and raises for others as item() does), and costs a step no Python
call of its own (a small model's step is mostly such fixed costs)."""


def _tensor_or_value(x):
    """A hyperparameter that takes part in products torch rounds to its dtype: a tensor stays a
    (0-dim, detached) tensor, anything else becomes a Python float."""
    return x.detach().reshape(()) if isinstance(x, torch.Tensor) else float(x)


def _repeats(params) -> bool:
    """Whether a parameter appears twice in a group (torch warns, and its for-loop step updates it
    once for each time; one launch would update it once)."""
    return len(set(map(id, params))) != len(params)


def _zero(grads) -> None:
    for g in grads:
        g.zero_()


_enter_range = torch._C._autograd._record_function_with_args_enter
_exit_range = torch._C._autograd._record_function_with_args_exit
_cupti_monitor = getattr(torch.autograd.profiler, "_maybe_cupti_monitor", lambda: None)


def _run_hooks(step, args, kwargs):
    """The body of torch.optim's step wrapper: the step pre-hooks (global, then the
    optimizer's), which may replace the arguments, the step, then the post-hooks."""
    self = args[0]
    for pre_hook in (*torch_optimizer._global_optimizer_pre_hooks.values(),
                     *self._optimizer_step_pre_hooks.values()):
        result = pre_hook(self, args, kwargs)
        if result is not None:
            if isinstance(result, tuple) and len(result) == 2:
                args, kwargs = result
            else:
                raise RuntimeError(f"{step} must return None or a tuple of (new_args, new_kwargs), but got {result}.")
    out = step(*args, **kwargs)
    self._optimizer_step_code()
    for post_hook in (*self._optimizer_step_post_hooks.values(),
                      *torch_optimizer._global_optimizer_post_hooks.values()):
        post_hook(self, args, kwargs)
    return out


def _hooked_step(step):
    """``step`` wrapped as torch.optim wraps every optimizer's step (Optimizer.profile_hook_step:
    its hooks, inside a profiler range named "Optimizer.step#<class>.step"), and marked so that
    torch does not wrap it again. The range is entered as torch's record_function enters it
    (the same range for a profiler, the same CUPTI-monitor annotation where torch has one), but
    through the range's direct binding rather than two dispatcher ops: 1.9 against 8.3 us a
    step (Ice Lake), where torch's whole step over a small model takes ~27 us. While dynamo
    traces, torch's record_function itself, the context manager dynamo knows.

    The hooks run once a step: where a subclass's own step calls this one (``super().step()``),
    that step's wrapper (torch's, or this one) ran them. (torch's runs them twice there, but only
    once the parent class has been instantiated in the process.)"""
    @functools.wraps(step)
    def wrapper(*args, **kwargs):
        if type(args[0]).step is not wrapper:
            return step(*args, **kwargs)
        name = f"Optimizer.step#{type(args[0]).__name__}.step"
        if is_compiling():
            with torch.autograd.profiler.record_function(name):
                return _run_hooks(step, args, kwargs)
        handle = _enter_range(name)
        monitor = _cupti_monitor()
        annotated = monitor is not None and monitor.push_user_annotation(name) is not None
        try:
            return _run_hooks(step, args, kwargs)
        finally:
            if annotated:
                monitor.pop_user_annotation()
            _exit_range(handle)

    wrapper.hooked = True  # (what Optimizer._patch_step_function checks)
    return wrapper


class _KernelStep:
    """``step`` of the fastml optimizers: torch.optim's protocol around each group's
    ``_group_step`` (which the optimizer defines)."""

    @_hooked_step
    def step(self, closure=None, *, zero_grad: bool = False):
        """One optimizer step for every group; returns the closure's loss (None without one).

        zero_grad: also set every updated gradient to zero, in the same pass (the gradients stay
        allocated, unlike ``optimizer.zero_grad()``'s default of setting them to None).
        """
        loss = _evaluate(closure)
        # Grad mode as torch.optim's steps set it, and in their form: set_grad_enabled as a call
        # costs ~0.4 us less than as a context manager, which counts in a small model's step.
        previous = torch.is_grad_enabled()
        torch.set_grad_enabled(self.defaults["differentiable"])
        try:
            for group in self.param_groups:
                self._group_step(group, zero_grad)
        finally:
            torch.set_grad_enabled(previous)
        return loss

    def _runs_in_torch(self, group, params, *hyperparameters) -> bool:
        """Whether a group's step must run torch's own implementation (see the module docstring).
        Checked at every step, so written for the common case's cost (a small model's whole step
        by torch's for-loop takes ~7 us)."""
        if (group.get("differentiable") or getattr(self, "grad_scale", None) is not None
                or getattr(self, "found_inf", None) is not None):
            return True
        for value in hyperparameters:
            # (a float, the common case, is told apart first: isinstance with torch.Tensor costs more)
            if type(value) is not float and isinstance(value, torch.Tensor) and value.requires_grad:
                return True
        if is_compiling():
            # Traced into a graph, the step is fastml's custom op where torch has them. Dynamo
            # shows every group with capturable=True while it traces an optimizer, so that flag
            # says nothing then; the op counts steps on any device. (Dynamo need not trace ids.)
            return not LIBRARY
        return bool(group.get("capturable") or dispatch_mode_active()  # (fake tensors: no data for a kernel)
                    or _repeats(params))


class SGD(_KernelStep, torch.optim.SGD):
    """Drop-in for ``torch.optim.SGD`` (same arguments, param groups, errors and state_dict) whose
    step updates every parameter of a group in one launch per (device, dtype).

    >>> opt = fastml.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    >>> loss_fn(model(x), y).backward()
    >>> opt.step(zero_grad=True)   # the update and the gradients' reset in one pass
    """

    def _group_step(self, group, zero_grad):
        params, grads, buffers = [], [], []
        has_sparse_grad = self._init_group(group, params, grads, buffers)
        if not params:
            return
        momentum = group["momentum"]
        if has_sparse_grad or self._runs_in_torch(group, params, group["lr"], group["weight_decay"]):
            self._torch_group_step(group, params, grads, buffers, has_sparse_grad)
            if zero_grad:
                _zero(grads)
            return
        fresh = [b is None for b in buffers] if momentum != 0 else ()  # (without momentum, unused)
        if any(fresh):
            # A parameter's first step: its buffer will hold the gradient (torch clones it, so
            # the buffer takes the gradient's layout).
            for i, p in enumerate(params):
                if fresh[i]:
                    buffers[i] = self.state[p]["momentum_buffer"] = torch.empty_like(grads[i])
        sgd_op.sgd_step(params, grads, buffers, fresh, lr=_value(group["lr"]), momentum=_value(momentum),
                        dampening=_value(group["dampening"]), weight_decay=_value(group["weight_decay"]),
                        nesterov=group["nesterov"], maximize=group["maximize"], zero_grad=zero_grad)

    def _torch_group_step(self, group, params, grads, buffers, has_sparse_grad):
        """torch.optim.SGD.step's body for one group (its functional implementation)."""
        torch_sgd.sgd(params, grads, buffers, weight_decay=group["weight_decay"], momentum=group["momentum"],
                      lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"],
                      maximize=group["maximize"], has_sparse_grad=has_sparse_grad, foreach=group["foreach"],
                      fused=group["fused"], grad_scale=getattr(self, "grad_scale", None),
                      found_inf=getattr(self, "found_inf", None))
        if group["momentum"] != 0:
            for p, buf in zip(params, buffers):
                self.state[p]["momentum_buffer"] = buf


# Whether torch's Adam takes decoupled_weight_decay (newer torch, where AdamW is an Adam with
# it set); older torch has AdamW as its own class with its own functional implementation.
_ADAM_DECOUPLES = "decoupled_weight_decay" in inspect.signature(torch_adam.adam).parameters


class _AdamStep(_KernelStep):
    """The group step of Adam and AdamW, which differ only in how weight decay is applied."""

    _decoupled = False
    _init_group_takes_amsgrad = False  # torch's AdamW before it became an Adam: set per class below

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # A class attribute rather than a cached function: dynamo reads it as a constant while it
        # traces a step, where it would trace through the cache and warn.
        cls._init_group_takes_amsgrad = "amsgrad" in inspect.signature(cls._init_group).parameters

    def _group_step(self, group, zero_grad):
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
        if self._init_group_takes_amsgrad:
            has_complex = self._init_group(group, params, grads, group["amsgrad"], exp_avgs, exp_avg_sqs,
                                           max_exp_avg_sqs, steps)
        else:
            has_complex = self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
        if not params:
            return
        beta1, beta2 = group["betas"]
        if self._runs_in_torch(group, params, group["lr"], beta1, beta2, group["weight_decay"]):
            self._torch_group_step(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                                   has_complex)
            if zero_grad:
                _zero(grads)
            return
        adam_op.adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                          lr=_tensor_or_value(group["lr"]), beta1=_value(beta1), beta2=_value(beta2), eps=_value(group["eps"]),
                          weight_decay=_value(group["weight_decay"]),
                          decoupled=group.get("decoupled_weight_decay", self._decoupled),
                          amsgrad=group["amsgrad"], maximize=group["maximize"], zero_grad=zero_grad)

    def _torch_group_step(self, group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                          has_complex):
        """torch.optim.Adam(W).step's body for one group (its functional implementation)."""
        beta1, beta2 = group["betas"]
        kwargs = dict(amsgrad=group["amsgrad"], has_complex=has_complex, beta1=beta1, beta2=beta2,
                      lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                      maximize=group["maximize"], foreach=group["foreach"], capturable=group["capturable"],
                      differentiable=group["differentiable"], fused=group["fused"],
                      grad_scale=getattr(self, "grad_scale", None), found_inf=getattr(self, "found_inf", None))
        decoupled = group.get("decoupled_weight_decay", self._decoupled)
        if _ADAM_DECOUPLES:
            functional = functools.partial(torch_adam.adam, decoupled_weight_decay=decoupled)
        else:
            functional = torch_adamw.adamw if decoupled else torch_adam.adam
        functional(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, **kwargs)


class Adam(_AdamStep, torch.optim.Adam):
    """Drop-in for ``torch.optim.Adam`` (same arguments, param groups, errors and state_dict)
    whose step updates every parameter of a group in one launch per (device, dtype).

    >>> opt = fastml.optim.Adam(model.parameters(), lr=1e-3, amsgrad=True)
    """


class AdamW(_AdamStep, torch.optim.AdamW):
    """Drop-in for ``torch.optim.AdamW``: Adam with decoupled weight decay (p *= 1 - lr·wd),
    one launch per (device, dtype) per step."""

    _decoupled = True


def sgd_(params, lr, batch_size) -> None:
    """The course's minibatch SGD step, fused: for every tensor in ``params``,
    ``param -= lr * param.grad / batch_size`` and then ``param.grad.zero_()``, with the same
    rounding, in one launch per (device, dtype).

    params: an iterable of tensors, each with a gradient. lr: the learning rate. batch_size: the
    number of examples the gradients were summed over (a positive number).
    """
    params = list(params)
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"sgd_: params[{i}] is a {type(p).__name__}, expected a tensor")
        if p.grad is None:
            raise ValueError(f"sgd_: params[{i}] has no gradient (its .grad is None): run backward() "
                             "first, or leave out parameters that take no part in the loss")
    if isinstance(lr, bool) or not isinstance(lr, (numbers.Real, torch.Tensor)):
        raise TypeError(f"sgd_: lr must be a real number, got {type(lr).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (numbers.Real, torch.Tensor)):
        raise TypeError(f"sgd_: batch_size must be a positive number, got {type(batch_size).__name__}")
    if not _value(batch_size) > 0:
        raise ValueError(f"sgd_: batch_size must be positive, got {_value(batch_size)}")
    if not params:
        return  # (the course's loop over no parameters does nothing)
    with torch.no_grad():
        sgd_op.sgd_course_step(params, [p.grad for p in params], lr=_value(lr), batch_size=_value(batch_size))
