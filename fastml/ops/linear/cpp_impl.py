"""Linear layer on fastml._C (csrc/linear.cpp). Inputs are contiguous; shapes as in reference."""

from __future__ import annotations

import torch

from fastml._cpp import kernel, ptr, threads


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    n, d = x.shape
    o = weight.shape[0]
    out = torch.empty(n, o, dtype=x.dtype, device=x.device)
    kernel("linear_forward", x.dtype)(ptr(x), ptr(weight), ptr(bias), n, d, o, ptr(out), threads())
    return out


def backward_input(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    n, o = grad.shape
    d = weight.shape[1]
    out = torch.empty(n, d, dtype=grad.dtype, device=grad.device)
    kernel("linear_backward_input", grad.dtype)(ptr(grad), ptr(weight), n, d, o, ptr(out), threads())
    return out


def backward_weight(grad: torch.Tensor, x: torch.Tensor, need_bias: bool):
    n, o = grad.shape
    d = x.shape[1]
    grad_w = torch.empty(o, d, dtype=grad.dtype, device=grad.device)
    grad_b = torch.empty(o, dtype=grad.dtype, device=grad.device) if need_bias else None
    kernel("linear_backward_weight", grad.dtype)(ptr(grad), ptr(x), n, d, o, ptr(grad_w), ptr(grad_b),
                                                 threads())
    return grad_w, grad_b
