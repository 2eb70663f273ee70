"""SGD on fastml._C (csrc/sgd.cpp): one call for all tensors; signatures as in reference.py."""

from __future__ import annotations

from fastml._cpp import addresses, kernel, sizes, threads


def sgd_step(params, grads, buffers, fresh, *, lr, momentum, dampening, weight_decay, nesterov,
             maximize, zero_grad):
    with_momentum = momentum != 0
    kernel("sgd_step", params[0].dtype)(
        addresses(params), addresses(grads), addresses(buffers) if with_momentum else [],
        sizes(params), [int(f) for f in fresh] if with_momentum else [],
        float(lr), float(momentum), float(dampening), float(weight_decay), bool(nesterov),
        bool(maximize), bool(zero_grad), threads())


def sgd_course_step(params, grads, *, lr, batch_size):
    kernel("sgd_course_step", params[0].dtype)(
        addresses(params), addresses(grads), sizes(params),
        float(lr), float(batch_size), threads())
