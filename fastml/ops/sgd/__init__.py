"""Minibatch SGD over lists of tensors: per-bucket dispatch to the backends.

Backend modules provide ``sgd_step`` and ``sgd_course_step`` (see reference.py) for lists of
walkable tensors of one device and dtype. The functions here take lists of any mix: they bucket
the tensors by (device, dtype), one launch per bucket, and stage the rows a kernel cannot walk
(fastml/_multi_tensor.py). Complex tensors go through their real views. Tensors a kernel does
not cover (a dtype or device without kernels, a gradient of another dtype) take the reference.
"""

from __future__ import annotations

from fastml import _backend
from fastml._multi_tensor import each_launch, pick

IMPLEMENTED = ("triton", "cpp", "numba", "reference")


def impl(backend: str):
    return _backend.load(__name__, backend)


def sgd_step(params, grads, buffers, fresh, *, lr, momentum, dampening, weight_decay, nesterov,
             maximize, zero_grad=False):
    """One torch.optim.SGD step over lists of any devices and dtypes, in place (arguments as in
    reference.sgd_step; ``buffers`` and ``fresh`` are ignored when momentum == 0)."""
    with_momentum = momentum != 0
    lists = (params, grads, buffers) if with_momentum else (params, grads)
    for backend, rows, cols in each_launch(lists, (True, zero_grad, True), IMPLEMENTED):
        impl(backend).sgd_step(cols[0], cols[1], cols[2] if with_momentum else [],
                               pick(fresh, rows) if with_momentum else [], lr=lr, momentum=momentum,
                               dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                               zero_grad=zero_grad)


def sgd_course_step(params, grads, *, lr, batch_size):
    """The course's ``sgd(params, lr, batch_size)`` over lists of any devices and dtypes."""
    for backend, _, cols in each_launch((params, grads), (True, True), IMPLEMENTED):
        impl(backend).sgd_course_step(cols[0], cols[1], lr=lr, batch_size=batch_size)
