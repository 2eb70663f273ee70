"""Pure-PyTorch linear layer: the oracle for every backend, and the path for configurations no
kernel covers. Shapes: x (N, D), weight (O, D), bias (O,) or None, grad (N, O)."""

from __future__ import annotations

import torch


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # addmm, as torch's linear: the bias is added before the single rounding (half types differ
    # by an ulp otherwise).
    return x @ weight.T if bias is None else torch.addmm(bias, x, weight.T)


def backward_input(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return grad @ weight


def backward_weight(grad: torch.Tensor, x: torch.Tensor, need_bias: bool):
    # grad^T x, contiguous (O, D), as torch's linear backward hands it back (its mm backward
    # forms (grad^T x) for the transposed weight it multiplied by). The transposed view
    # (x^T grad)^T that stood here gave torch.autograd.grad other strides than torch's
    # (tests/test_torch_op_db.py), and gained nothing end to end: AccumulateGrad copied it into
    # the weight's layout for .grad.
    return grad.T @ x, (grad.sum(0) if need_bias else None)
