"""Pure-PyTorch Adam / AdamW: the oracle, tensor by tensor in the ops (and so the rounding) of
torch.optim.Adam's for-loop implementation. Runs any device and dtype.

Every backend module provides ``adam_step`` with this signature. Lists hold one entry per
tensor, all of one device and dtype (and, for the kernel backends, walkable real tensors: see
fastml/_multi_tensor.py). Step counting and the bias corrections happen before, in
fastml.ops.adam, the same for every backend.
"""

from __future__ import annotations

import torch


def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step_sizes, bias2_sqrts, *, lr, beta1,
              beta2, eps, weight_decay, decoupled, amsgrad, maximize, zero_grad):
    """One torch.optim.Adam step, in place.

    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs (used when amsgrad): the tensors, their
    gradients and their state. step_sizes[i] = lr / (1 - beta1^step_i), bias2_sqrts[i] =
    sqrt(1 - beta2^step_i) for tensor i's step count. decoupled: weight decay as AdamW's
    (p *= 1 - lr·wd) rather than Adam's (grad += wd·p). zero_grad: also zero every gradient.
    """
    for i, param in enumerate(params):
        grad = -grads[i] if maximize else grads[i]
        exp_avg, exp_avg_sq = exp_avgs[i], exp_avg_sqs[i]
        if weight_decay != 0:
            if decoupled:
                param.mul_(1 - lr * weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)
        if torch.is_complex(param):  # as torch: the moments of real and imaginary parts
            param, grad = torch.view_as_real(param), torch.view_as_real(grad)
            exp_avg, exp_avg_sq = torch.view_as_real(exp_avg), torch.view_as_real(exp_avg_sq)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        second = exp_avg_sq
        if amsgrad:
            second = torch.view_as_real(max_exp_avg_sqs[i]) if torch.is_complex(max_exp_avg_sqs[i]) \
                else max_exp_avg_sqs[i]
            torch.maximum(second, exp_avg_sq, out=second)
        denom = (second.sqrt() / bias2_sqrts[i]).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_sizes[i])
        if zero_grad:
            grads[i].zero_()
