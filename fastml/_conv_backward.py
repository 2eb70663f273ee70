"""A convolution whose forward is one of fastml's variants and whose backward is torch's own.

The variants of a layer's measured choice (Winograd, the grouped direct kernel) compute the
forward differently; their gradients are torch's convolution backward (``aten.
convolution_backward``, the op torch's module's autograd runs) for the same upstream gradient,
input and weight, so training with a variant changes only the forward's rounding.
"""

from __future__ import annotations

import torch

from fastml import _layout


def with_torch_backward(conv: torch.nn.Conv2d, forward, input: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """``forward(input, weight, bias)`` (no autograd of its own), differentiable through torch's
    convolution backward with ``conv``'s stride, padding, dilation and groups."""
    return _TorchBackward.apply(input, weight, bias, conv, forward)


class _TorchBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, conv, forward):
        ctx.save_for_backward(input, weight)
        ctx.has_bias, ctx.conv = bias is not None, conv
        return forward(input, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        input, weight = ctx.saved_tensors
        return torch_backward(ctx, grad, input, weight, ctx.conv) + (None,)


def torch_backward(ctx, grad: torch.Tensor, input: torch.Tensor, weight: torch.Tensor,
                   conv: torch.nn.Conv2d, weight_grad: bool = True) -> tuple:
    """(grad_input, grad_weight, grad_bias, None) by torch's convolution backward, for a Function
    whose forward took (input, weight, bias, conv, ...) and set ``ctx.has_bias``: the gradients
    its ``needs_input_grad`` asks for, None for the others (the weight's always None where not
    ``weight_grad``: a variant that computes it itself)."""
    wanted = [ctx.needs_input_grad[0], weight_grad and ctx.needs_input_grad[1],
              ctx.has_bias and ctx.needs_input_grad[2]]
    return (*_layout.convolution_backward(grad, input, weight, conv, wanted), None)
