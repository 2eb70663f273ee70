"""fastml::cross_entropy and fastml::cross_entropy_backward: softmax cross-entropy over rows of
logits as torch.library custom ops, with fakes and autograd, for torch.compile / torch.export
(see fastml/_library.py). As CrossEntropyFunction, "mean" / "sum" return the logits' gradient
from the forward pass (when ``want_grad``) and backward scales it; "none" runs the row kernel
again in backward."""

from typing import Optional

import torch
from torch import Tensor

from fastml.ops import _contract as contract
from fastml.ops import contiguous, graph_backend, or_placeholder, placeholder
from fastml.ops.cross_entropy import IMPLEMENTED, impl, loss_and_gradient, row_gradients, target_gradient


@torch.library.custom_op("fastml::cross_entropy", mutates_args=())
def cross_entropy(logits: Tensor, target: Tensor, class_weight: Optional[Tensor], ignore_index: int,
                  label_smoothing: float, reduction: str, want_grad: bool) -> tuple[Tensor, Tensor]:
    """logits (M, C), target (M,) int64 or (M, C) probabilities, class_weight (C,) or None →
    (loss: 0-dim, or (M,) for "none"; d loss / d logits (M, C) for "mean" / "sum" when
    want_grad, else an empty (0,) tensor). Raises IndexError for a class index out of range."""
    _check("cross_entropy", logits, target, class_weight, label_smoothing)
    contract.reduction("cross_entropy", reduction)

    def run(name):
        return loss_and_gradient(impl(name), logits.contiguous(), target.contiguous(), contiguous(class_weight),
                                 ignore_index, label_smoothing, reduction, want_grad)

    arguments = (logits, target, class_weight, label_smoothing != 0, reduction, want_grad)
    loss, _, grad = run(graph_backend("cross_entropy", "forward", IMPLEMENTED, arguments, run))
    return loss, or_placeholder(grad, logits)


def _check(op: str, logits: Tensor, target: Tensor, class_weight: Optional[Tensor], label_smoothing: float) -> None:
    contract.dims(op, "logits", logits, 2, "(M, C)")
    contract.floating(op, "logits", logits)
    contract.class_target(op, "logits", logits, *logits.shape, target, class_weight, label_smoothing)


@cross_entropy.register_fake
def _(logits, target, class_weight, ignore_index, label_smoothing, reduction, want_grad):
    _check("cross_entropy", logits, target, class_weight, label_smoothing)
    contract.reduction("cross_entropy", reduction)
    return (logits.new_empty(logits.shape[:1] if reduction == "none" else ()),
            logits.new_empty(logits.shape) if want_grad and reduction != "none" else placeholder(logits))


@torch.library.custom_op("fastml::cross_entropy_backward", mutates_args=())
def cross_entropy_backward(logits: Tensor, target: Tensor, class_weight: Optional[Tensor], ignore_index: int,
                           label_smoothing: float, grad_output: Tensor) -> Tensor:
    """The logits' gradient (M, C) of Σ_i grad_output[i] · ℓ_i, grad_output (M,)."""
    _check_backward(logits, target, class_weight, label_smoothing, grad_output)
    if target.dtype == torch.int64:  # the row kernel reads and writes each row's element at its target
        contract.class_targets("cross_entropy_backward", target, logits.shape[1], ignore_index)

    def run(name):
        return row_gradients(impl(name), logits.contiguous(), target.contiguous(), contiguous(class_weight),
                             ignore_index, label_smoothing, grad_output)

    arguments = (logits, target, class_weight, label_smoothing != 0, grad_output)
    return run(graph_backend("cross_entropy", "backward", IMPLEMENTED, arguments, run))


def _check_backward(logits, target, class_weight, label_smoothing, grad_output) -> None:
    _check("cross_entropy_backward", logits, target, class_weight, label_smoothing)
    contract.floating("cross_entropy_backward", "grad_output", grad_output)
    contract.shape("cross_entropy_backward", "grad_output", grad_output, logits.shape[:1], "(M,)")


@cross_entropy_backward.register_fake
def _(logits, target, class_weight, ignore_index, label_smoothing, grad_output):
    _check_backward(logits, target, class_weight, label_smoothing, grad_output)
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, target, class_weight, *ctx.options = inputs
    ctx.save_for_backward(logits, target, class_weight, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_output, _):
    logits, target, class_weight, grad = ctx.saved_tensors
    ignore_index, label_smoothing, reduction, want_grad = ctx.options
    need_logits, need_target = ctx.needs_input_grad[:2]
    grad_logits = grad_target = None
    if need_logits and reduction == "none":
        grad_logits = torch.ops.fastml.cross_entropy_backward(logits, target, class_weight, ignore_index,
                                                              label_smoothing, grad_output)
    elif need_logits:
        if not want_grad:
            raise RuntimeError("fastml::cross_entropy: backward needs the forward call's want_grad=True")
        grad_logits = grad * grad_output
    if need_target:  # probability targets, whose "mean" divides by the row count
        rows = logits.shape[0]
        scale = (1.0 / rows if rows else float("nan")) if reduction == "mean" else 1.0
        per_row = grad_output.unsqueeze(1) if reduction == "none" else grad_output * scale
        grad_target = target_gradient(logits, class_weight, label_smoothing, per_row)
    return grad_logits, grad_target, None, None, None, None, None


cross_entropy.register_autograd(_backward, setup_context=_setup_context)
