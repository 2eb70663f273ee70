"""fastml::sgd_step and fastml::sgd_course_step: the SGD updates as torch.library custom ops that
mutate their tensor lists in place, for torch.compile / torch.export (see fastml/_library.py).
They return nothing, so their fakes do nothing."""

from typing import Sequence

import torch
from torch import Tensor

from fastml.ops import _contract as contract
from fastml.ops.sgd import launch_sgd_course_step, launch_sgd_step


@torch.library.custom_op("fastml::sgd_step", mutates_args=("params", "grads", "buffers"))
def sgd_step(params: Sequence[Tensor], grads: Sequence[Tensor], buffers: Sequence[Tensor], fresh: Sequence[bool],
             lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool, maximize: bool,
             zero_grad: bool) -> None:
    """One torch.optim.SGD step (arguments as reference.sgd_step's; ``buffers`` and ``fresh``
    empty when momentum == 0). ``grads`` are written only when zero_grad."""
    _check_sgd_step(params, grads, buffers, fresh, momentum)
    launch_sgd_step(params, grads, buffers, fresh, lr=lr, momentum=momentum, dampening=dampening,
                    weight_decay=weight_decay, nesterov=nesterov, maximize=maximize, zero_grad=zero_grad)


def _check_sgd_step(params, grads, buffers, fresh, momentum) -> None:
    """One gradient per parameter, of its shape, and with momentum one buffer (of its shape) and
    one ``fresh`` flag each. Gradients and buffers may differ in dtype (state kept from before
    ``model.double()``): those rows run torch's ops."""
    if momentum != 0:
        contract.same_lengths("sgd_step", "params", params, grads=grads, buffers=buffers, fresh=fresh)
        contract.same_shapes("sgd_step", "params", params, grads=grads, buffers=buffers)
    else:
        contract.same_lengths("sgd_step", "params", params, grads=grads)
        contract.same_shapes("sgd_step", "params", params, grads=grads)


@sgd_step.register_fake
def _(params, grads, buffers, fresh, lr, momentum, dampening, weight_decay, nesterov, maximize, zero_grad):
    _check_sgd_step(params, grads, buffers, fresh, momentum)
    return None


@torch.library.custom_op("fastml::sgd_course_step", mutates_args=("params", "grads"))
def sgd_course_step(params: Sequence[Tensor], grads: Sequence[Tensor], lr: float, batch_size: float) -> None:
    """The course's step: param -= lr * grad / batch_size, then grad = 0, for every tensor."""
    _check_sgd_course_step(params, grads)
    launch_sgd_course_step(params, grads, lr=lr, batch_size=batch_size)


def _check_sgd_course_step(params, grads) -> None:
    contract.same_lengths("sgd_course_step", "params", params, grads=grads)
    contract.same_shapes("sgd_course_step", "params", params, grads=grads)


@sgd_course_step.register_fake
def _(params, grads, lr, batch_size):
    _check_sgd_course_step(params, grads)
    return None
