"""Minibatch SGD over lists of tensors: per-bucket dispatch to the backends.

Backend modules provide ``sgd_step`` and ``sgd_course_step`` (see reference.py) for lists of
walkable tensors of one device and dtype. The functions here take lists of any mix: they bucket
the tensors by (device, dtype), one launch per bucket, and stage the rows a kernel cannot walk
(fastml/_multi_tensor.py). Complex tensors go through their real views. Tensors a kernel does
not cover (a dtype or device without kernels, a gradient of another dtype) take the reference.
"""

from __future__ import annotations

import torch

from fastml import _backend
from fastml._multi_tensor import pick, run_launches, settled
from fastml.ops import in_custom_op_graph

IMPLEMENTED = ("triton", "cpp", "numba", "reference")


def impl(backend: str):
    return _backend.load(__name__, backend)


def sgd_step(params, grads, buffers, fresh, *, lr, momentum, dampening, weight_decay, nesterov,
             maximize, zero_grad=False):
    """One torch.optim.SGD step over lists of any devices and dtypes, in place (arguments as in
    reference.sgd_step; ``buffers`` and ``fresh`` are ignored when momentum == 0)."""
    if in_custom_op_graph():
        if momentum == 0:
            buffers, fresh = [], []  # torch's buffer list then holds Nones, which a Tensor[] cannot
        torch.ops.fastml.sgd_step(params, grads, buffers, fresh, lr, momentum, dampening, weight_decay, nesterov,
                                  maximize, zero_grad)
        return
    options = _options(momentum, dampening, weight_decay, nesterov, maximize)
    choice = settled(params, options)
    if choice[1] == "reference":
        # Straight to torch's ops, as run_launches would go, without its layers of calls: a
        # course model's step settles here, and is mostly such fixed costs (~1 us of ~9).
        impl("reference").sgd_step(params, grads, buffers, fresh, lr=lr, momentum=momentum, dampening=dampening,
                                   weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                                   zero_grad=zero_grad)
        return
    launch_sgd_step(params, grads, buffers, fresh, lr=lr, momentum=momentum, dampening=dampening,
                    weight_decay=weight_decay, nesterov=nesterov, maximize=maximize, zero_grad=zero_grad,
                    choice=choice)


def _options(momentum, dampening, weight_decay, nesterov, maximize) -> tuple:
    """An SGD step's options for the measured choice: the op, then what changes its cost."""
    return "sgd_step", momentum != 0, nesterov, weight_decay != 0, dampening != 0, maximize


def launch_sgd_step(params, grads, buffers, fresh, *, lr, momentum, dampening, weight_decay, nesterov, maximize,
                    zero_grad, choice=None):
    """sgd_step's kernel launches, one per bucket (also fastml::sgd_step's implementation);
    ``choice``: what _multi_tensor.settled said of the step, if the caller asked it."""
    with_momentum = momentum != 0
    lists = (params, grads, buffers) if with_momentum else (params, grads)

    def launch(backend, rows, cols, timing):
        if not with_momentum:  # no buffers: ``fresh`` may be empty, whatever the rows
            first_step = []
        else:
            first_step = [False] * len(cols[0]) if timing else pick(fresh, rows)
        impl(backend).sgd_step(cols[0], cols[1], cols[2] if with_momentum else [],
                               first_step, lr=lr, momentum=momentum,
                               dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                               zero_grad=zero_grad and not timing)

    run_launches(lists, (True, zero_grad, True), IMPLEMENTED,
                 _options(momentum, dampening, weight_decay, nesterov, maximize), launch, choice)


def sgd_course_step(params, grads, *, lr, batch_size):
    """The course's ``sgd(params, lr, batch_size)`` over lists of any devices and dtypes."""
    if in_custom_op_graph():
        torch.ops.fastml.sgd_course_step(params, grads, lr, batch_size)
    else:
        launch_sgd_course_step(params, grads, lr=lr, batch_size=batch_size)


def launch_sgd_course_step(params, grads, *, lr, batch_size):
    """sgd_course_step's kernel launches (also fastml::sgd_course_step's implementation)."""
    def launch(backend, rows, cols, timing):
        impl(backend).sgd_course_step(cols[0], cols[1], lr=lr, batch_size=batch_size)

    run_launches((params, grads), (True, True), IMPLEMENTED, ("sgd_course_step",), launch)
