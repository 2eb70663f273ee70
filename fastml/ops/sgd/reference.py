"""Pure-PyTorch SGD: the oracle, tensor by tensor in the ops (and so the rounding) of
torch.optim.SGD's for-loop implementation (plain SGD's ``add_`` for all tensors in one
``torch._foreach_add_``, which rounds as ``add_``). Runs any device and dtype, and any mix of
them in one call (the measured choice may settle a step on it: fastml/_multi_tensor.py).

Every backend module provides the same two functions. Lists hold one entry per tensor, all of
one device and dtype (and, for the kernel backends, walkable: see fastml/_multi_tensor.py).
"""

from __future__ import annotations

import torch


def sgd_step(params, grads, buffers, fresh, *, lr, momentum, dampening, weight_decay, nesterov,
             maximize, zero_grad):
    """One torch.optim.SGD step, in place.

    params, grads: the tensors and their gradients. buffers: momentum buffers, one per tensor
    (ignored when momentum == 0); buffer i is set to the gradient when fresh[i] (a parameter's
    first step, as torch does), else updated. lr, momentum, dampening, weight_decay: floats.
    zero_grad: also set every gradient to zero.
    """
    if momentum == 0 and weight_decay == 0 and not maximize:
        # torch's param.add_(grad, alpha=-lr) for every tensor, in one call: a few small tensors'
        # step costs less so than one Python-level op per tensor (or a kernel's layout checks).
        torch._foreach_add_(params, grads, alpha=-lr)
        if zero_grad:
            torch._foreach_zero_(grads)
        return
    for i, param in enumerate(params):
        grad = -grads[i] if maximize else grads[i]
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        if momentum != 0:
            buf = buffers[i]
            if fresh[i]:
                buf.copy_(grad)
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - dampening)
            grad = grad.add(buf, alpha=momentum) if nesterov else buf
        param.add_(grad, alpha=-lr)
        if zero_grad:
            grads[i].zero_()


def sgd_course_step(params, grads, *, lr, batch_size):
    """The course's hand-written step: ``param -= lr * param.grad / batch_size``, then the
    gradient set to zero, for every tensor."""
    for param, grad in zip(params, grads):
        param -= lr * grad / batch_size
        grad.zero_()
