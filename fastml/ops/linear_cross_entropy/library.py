"""fastml::linear_cross_entropy and its backward: the fused, chunked linear + softmax
cross-entropy as torch.library custom ops, with fakes and autograd, for torch.compile /
torch.export (see fastml/_library.py). As LinearCrossEntropyFunction, "mean" / "sum" return
the gradients asked for (flags the caller works out while tracing) from the forward pass and
backward scales them; "none" runs the chunks again in backward."""

from typing import Optional

import torch
from torch import Tensor

from fastml.ops import _contract as contract
from fastml.ops import asked, contiguous, gradient_fakes, graph_backend, or_placeholder
from fastml.ops.linear.library import check_linear
from fastml.ops.linear_cross_entropy import IMPLEMENTED, impl


def _gradient_outputs(grads, x):
    return tuple(or_placeholder(g, x) for g in grads)


@torch.library.custom_op("fastml::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                         class_weight: Optional[Tensor], ignore_index: int, label_smoothing: float, reduction: str,
                         need_input_grad: bool, need_weight_grad: bool,
                         need_bias_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x (N, D), weight (C, D), bias (C,) or None, target (N,) int64 or (N, C) → (loss, grad_x,
    grad_weight, grad_bias) as the backends' forward (see reference.py), an empty (0,) tensor for
    each gradient not computed (all of them for "none")."""
    _check("linear_cross_entropy", x, weight, bias, target, class_weight, label_smoothing)
    contract.reduction("linear_cross_entropy", reduction)

    def run(name):
        return impl(name).forward(x.contiguous(), weight.contiguous(), contiguous(bias), target.contiguous(),
                                  contiguous(class_weight), ignore_index, label_smoothing, reduction, need_input_grad,
                                  need_weight_grad, need_bias_grad)

    arguments = (x, weight, bias, target, class_weight, label_smoothing != 0, reduction, need_input_grad,
                 need_weight_grad, need_bias_grad)
    outputs = run(graph_backend("linear_cross_entropy", "forward", IMPLEMENTED, arguments, run))
    return outputs[0], *_gradient_outputs(outputs[1:], x)


def _check(op, x, weight, bias, target, class_weight, label_smoothing) -> None:
    """x (N, D), weight (C, D), bias (C,) or None, and the cross-entropy's target and options for
    N rows of C classes."""
    check_linear(op, x, weight, bias)
    contract.class_target(op, "x", x, x.shape[0], weight.shape[0], target, class_weight, label_smoothing)


@linear_cross_entropy.register_fake
def _(x, weight, bias, target, class_weight, ignore_index, label_smoothing, reduction, need_input_grad,
      need_weight_grad, need_bias_grad):
    _check("linear_cross_entropy", x, weight, bias, target, class_weight, label_smoothing)
    contract.reduction("linear_cross_entropy", reduction)
    fused = reduction != "none"
    needs = (fused and need_input_grad, fused and need_weight_grad, fused and need_bias_grad and bias is not None)
    return x.new_empty(x.shape[:1] if reduction == "none" else ()), *gradient_fakes(x, x, weight, needs)


@torch.library.custom_op("fastml::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                                  class_weight: Optional[Tensor], ignore_index: int, label_smoothing: float,
                                  grad_output: Tensor, need_input_grad: bool, need_weight_grad: bool,
                                  need_bias_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients (grad_x, grad_weight, grad_bias) of Σ_i grad_output[i] · ℓ_i, grad_output
    (N,); an empty (0,) tensor for each one not asked for."""
    _check_backward(x, weight, bias, target, class_weight, label_smoothing, grad_output)
    if target.dtype == torch.int64:  # the row kernel reads and writes each row's element at its target
        contract.class_targets("linear_cross_entropy_backward", target, weight.shape[0], ignore_index)

    def run(name):
        return impl(name).backward(x.contiguous(), weight.contiguous(), contiguous(bias), target.contiguous(),
                                   contiguous(class_weight), ignore_index, label_smoothing, grad_output.contiguous(),
                                   need_input_grad, need_weight_grad, need_bias_grad)

    arguments = (x, weight, bias, target, class_weight, label_smoothing != 0, grad_output, need_input_grad,
                 need_weight_grad, need_bias_grad)
    grads = run(graph_backend("linear_cross_entropy", "backward", IMPLEMENTED, arguments, run))
    return _gradient_outputs(grads, x)


def _check_backward(x, weight, bias, target, class_weight, label_smoothing, grad_output) -> None:
    op = "linear_cross_entropy_backward"
    _check(op, x, weight, bias, target, class_weight, label_smoothing)
    contract.floating(op, "grad_output", grad_output)
    contract.shape(op, "grad_output", grad_output, x.shape[:1], "(N,)")


@linear_cross_entropy_backward.register_fake
def _(x, weight, bias, target, class_weight, ignore_index, label_smoothing, grad_output, need_input_grad,
      need_weight_grad, need_bias_grad):
    _check_backward(x, weight, bias, target, class_weight, label_smoothing, grad_output)
    return gradient_fakes(x, x, weight, (need_input_grad, need_weight_grad, need_bias_grad))


def _setup_context(ctx, inputs, output):
    x, weight, bias, target, class_weight, ignore_index, label_smoothing, reduction, *prepared = inputs
    ctx.save_for_backward(x, weight, bias, target, class_weight, *output[1:])
    ctx.options = (ignore_index, label_smoothing, reduction)
    ctx.prepared = prepared
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_output, *_):
    x, weight, bias, target, class_weight, *grads = ctx.saved_tensors
    ignore_index, label_smoothing, reduction = ctx.options
    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and bias is not None)
    if reduction == "none":
        grads = torch.ops.fastml.linear_cross_entropy_backward(x, weight, bias, target, class_weight, ignore_index,
                                                               label_smoothing, grad_output, *needs)
    else:
        if any(need and not have for need, have in zip(needs, ctx.prepared)):
            raise RuntimeError("fastml::linear_cross_entropy: backward needs the forward call's need_*_grad=True "
                               "for each input that requires a gradient")
        grads = [g * grad_output if need else None for g, need in zip(grads, needs)]
    return (*asked(grads, needs), *([None] * 8))


linear_cross_entropy.register_autograd(_backward, setup_context=_setup_context)
