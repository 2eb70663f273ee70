"""fastml::linear_mse: the fused linear + squared loss as a torch.library custom op, with fake and
autograd, for torch.compile / torch.export (see fastml/_library.py).

As LinearMSEFunction, the forward op is told which gradients backward will want (flags the
caller works out while tracing, fastml.ops.linear_mse.forward_flags) and returns them from the
same pass as the loss; backward scales them, and forms the rest from the residual with
fastml::linear_backward.
"""

from typing import Optional

import torch
from torch import Tensor

from fastml.ops import _contract as contract
from fastml.ops import contiguous, graph_backend, or_placeholder, placeholder
from fastml.ops.linear.library import check_linear
from fastml.ops.linear.library import gradients as linear_gradients
from fastml.ops.linear_mse import IMPLEMENTED, impl
from fastml.ops.mse_loss import error_scale


@torch.library.custom_op("fastml::linear_mse", mutates_args=())
def linear_mse(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, reduction: str,
               need_weight_grad: bool, need_bias_grad: bool,
               keep_residual: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x (N, D), weight (O, D), bias (O,) or None, target (N, O) → (loss, residual, grad_weight,
    grad_bias) as the backends' forward (see reference.py), an empty (0,) tensor for each one
    not computed."""
    _check(x, weight, bias, target, reduction)

    def run(name):
        return impl(name).forward(x.contiguous(), weight.contiguous(), contiguous(bias), target.contiguous(),
                                  reduction, need_weight_grad, need_bias_grad, keep_residual)

    arguments = (x, weight, bias, target, reduction, need_weight_grad, need_bias_grad, keep_residual)
    outputs = run(graph_backend("linear_mse", "forward", IMPLEMENTED, arguments, run))
    return outputs[0], *(or_placeholder(t, x) for t in outputs[1:])


def _check(x, weight, bias, target, reduction) -> None:
    check_linear("linear_mse", x, weight, bias)
    contract.same("linear_mse", "x", x, target=target)
    contract.shape("linear_mse", "target", target, (x.shape[0], weight.shape[0]), "(N, O)")
    contract.reduction("linear_mse", reduction)


@linear_mse.register_fake
def _(x, weight, bias, target, reduction, need_weight_grad, need_bias_grad, keep_residual):
    _check(x, weight, bias, target, reduction)
    n, o = x.shape[0], weight.shape[0]
    fused = reduction != "none"  # "none" forms the weight and bias gradients in backward
    return (x.new_empty((n, o) if reduction == "none" else ()),
            x.new_empty((n, o)) if keep_residual else placeholder(x),
            x.new_empty(weight.shape) if fused and need_weight_grad else placeholder(x),
            x.new_empty(o) if fused and need_bias_grad and bias is not None else placeholder(x))


def _setup_context(ctx, inputs, output):
    x, weight, bias, target, reduction, need_w, need_b, keep_residual = inputs
    _, residual, grad_w, grad_b = output
    ctx.save_for_backward(x, weight, target, residual, grad_w, grad_b)
    ctx.reduction, ctx.has_bias = reduction, bias is not None
    ctx.prepared = (keep_residual, need_w, need_b and bias is not None)
    ctx.scale = error_scale(reduction, x.shape[0] * weight.shape[0])
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad, *_):
    x, weight, target, residual, grad_w, grad_b = ctx.saved_tensors
    need_x, need_w, need_b, need_t = ctx.needs_input_grad[:4]
    need_b = need_b and ctx.has_bias
    fused = ctx.reduction != "none"
    _check_prepared(ctx.prepared, need_x or need_t or (not fused and (need_w or need_b)),
                    fused and need_w, fused and need_b)
    if fused:
        grad_w = grad_w * grad if need_w else None
        grad_b = grad_b * grad if need_b else None
        coef = residual * (ctx.scale * grad) if need_x or need_t else None
        grad_x = linear_gradients(coef, x, weight, True, False, False)[0] if need_x else None
    else:
        coef = (2.0 * grad) * residual
        grad_x, grad_w, grad_b = linear_gradients(coef, x, weight, need_x, need_w, need_b)
    return grad_x, grad_w, grad_b, (-coef if need_t else None), None, None, None, None


def _check_prepared(prepared, *wanted) -> None:
    for name, have, want in zip(("keep_residual", "need_weight_grad", "need_bias_grad"), prepared, wanted):
        if want and not have:
            raise RuntimeError(f"fastml::linear_mse: backward needs the forward call's {name}=True "
                               "(see fastml.ops.linear_mse.forward_flags)")


linear_mse.register_autograd(_backward, setup_context=_setup_context)
