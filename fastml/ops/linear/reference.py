"""Pure-PyTorch linear layer: the oracle for every backend, and the path for configurations no
kernel covers. Shapes: x (N, D), weight (O, D), bias (O,) or None, grad (N, O)."""

from __future__ import annotations

import torch


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = x @ weight.T
    return out if bias is None else out + bias


def backward_input(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return grad @ weight


def backward_weight(grad: torch.Tensor, x: torch.Tensor, need_bias: bool):
    return grad.T @ x, (grad.sum(0) if need_bias else None)
