"""A Linear layer on torch's BLAS whose weight gradient lands contiguous in recycled memory: a
variant of torch's own linear that a layer's measured choice may run in training.

torch's linear backward computes the weight gradient ``g^T x`` into a fresh (out, in) block each
step (which AccumulateGrad then keeps as ``.grad``). At VGG's 25088 -> 4096 layer (batch 16,
float32) that is a fresh 411 MB block, every page of which faults on first touch
(fastml/_recycle.py): on a 2-core Zen 3, the product took 204 ms into fresh memory against 57 ms
into kept memory.

Here the forward is ``F.linear`` itself (the same addmm, bit for bit), and the backward makes
the same products with ``torch.mm``: ``g W`` for the input and ``g^T x`` written straight into a
contiguous block from ``_recycle.empty``, which AccumulateGrad keeps as ``.grad`` without a copy.
A backward that builds a graph (double backward) or runs batched (gradcheck's batched check) uses
plain ops instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastml import _recycle
from fastml.functional import _variant_can_run
from fastml.ops import backward_in_torch_ops, is_compiling


def applies(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the variant can run this call and has something to save: a floating CPU input of
    the weight's dtype, a weight gradient wanted and large enough to be recycled. Never under a
    torch.func transform, autocast (which would cast the forward's F.linear but not its
    backward's products) or a graph being traced: torch's own linear runs there."""
    if not _variant_can_run(input, weight, bias) or input.device.type != "cpu":
        return False
    if not input.is_floating_point() or input.dtype != weight.dtype or input.dim() == 0:
        return False
    if bias is not None and bias.dtype != weight.dtype:
        return False
    return (torch.is_grad_enabled() and weight.requires_grad and weight.dim() == 2
            and weight.numel() * weight.element_size() >= _recycle.MIN_BYTES)


def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(input, weight, bias)``, differentiable, the weight gradient on recycled memory."""
    return _RecycledLinear.apply(input, weight, bias)


class _RecycledLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias):
        ctx.save_for_backward(input, weight)
        ctx.save_for_forward(input, weight)
        ctx.has_bias = bias is not None
        return F.linear(input, weight, bias)

    @staticmethod
    def jvp(ctx, input_t, weight_t, bias_t):
        input, weight = ctx.saved_tensors
        out = input.new_zeros((*input.shape[:-1], weight.shape[0]))
        if input_t is not None:
            out = out + F.linear(input_t, weight)
        if weight_t is not None:
            out = out + F.linear(input, weight_t)
        if bias_t is not None:
            out = out + bias_t
        return out

    @staticmethod
    def backward(ctx, grad):
        input, weight = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad
        rows = grad.reshape(-1, weight.shape[0])
        grad_input = grad_weight = grad_bias = None
        if need_input:
            grad_input = (rows @ weight).reshape(input.shape)
        if need_weight:
            flat = input.reshape(-1, weight.shape[1])
            if backward_in_torch_ops(grad) or is_compiling():  # double backward, batched, traced: plain ops
                grad_weight = rows.t() @ flat
            else:
                grad_weight = torch.mm(rows.t(), flat, out=_recycle.empty(weight.shape, weight.dtype, weight.device))
        if need_bias and ctx.has_bias:
            grad_bias = rows.sum(0)
        return grad_input, grad_weight, grad_bias
