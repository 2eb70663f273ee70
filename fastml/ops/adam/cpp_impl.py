"""Adam on fastml._C (csrc/adam.cpp): one call for all tensors; signature as in reference.py."""

from __future__ import annotations

from fastml._cpp import addresses, kernel, sizes, threads


def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step_sizes, bias2_sqrts, *, lr, beta1,
              beta2, eps, weight_decay, decoupled, amsgrad, maximize, zero_grad):
    kernel("adam_step", params[0].dtype)(
        addresses(params), addresses(grads), addresses(exp_avgs), addresses(exp_avg_sqs),
        addresses(max_exp_avg_sqs) if amsgrad else [], sizes(params),
        list(step_sizes), list(bias2_sqrts), float(lr), float(beta1), float(beta2), float(eps),
        float(weight_decay), bool(decoupled), bool(amsgrad), bool(maximize), bool(zero_grad), threads())
