"""fastml under torch's tracers and with inputs torch accepts beyond the kernels' own: the
drop-ins must give torch's results wherever torch's layers work."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastml


@pytest.mark.parametrize("requires_grad", [True, False])
def test_jit_trace_records_the_computation(requires_grad):
    layer = fastml.nn.Linear(4, 3).requires_grad_(requires_grad)
    traced = torch.jit.trace(layer, torch.randn(5, 4))
    x = torch.randn(5, 4)
    torch.testing.assert_close(traced(x), F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("make_layer, shape", [
    (lambda: fastml.nn.Linear(4, 3), (5, 4)),
    (lambda: fastml.nn.Conv2d(3, 4, 3, padding=1), (2, 3, 9, 7)),  # 4-D: the route reads its layout
    (lambda: fastml.nn.MaxPool2d(3, 2, 1), (2, 3, 9, 7)),
], ids=["Linear", "Conv2d", "MaxPool2d"])
def test_fx_symbolic_trace_and_export(make_layer, shape):
    """A traced layer's input is a proxy: the route must not ask it questions (its layout)."""
    layer = make_layer()
    x = torch.randn(*shape)
    graph_module = torch.fx.symbolic_trace(layer)
    torch.testing.assert_close(graph_module(x), layer(x))
    exported = torch.export.export(layer, (x,))
    torch.testing.assert_close(exported.module()(x), layer(x))


def test_linear_broadcasts_bias_like_torch():
    x, w = torch.randn(5, 4), torch.randn(3, 4)
    for shape in [(1,), (1, 3), (5, 1), (5, 3)]:
        b = torch.randn(shape)
        torch.testing.assert_close(fastml.functional.linear(x, w, b), F.linear(x, w, b))
    with pytest.raises(RuntimeError):
        fastml.functional.linear(x, w, torch.randn(4))  # not broadcastable: torch's error


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_linear_is_bitwise_torch_on_cpu(dtype):
    """The reference path (half types on the CPU) rounds once, as torch's addmm does."""
    x, w, b = (torch.randn(*s).to(dtype) for s in ((7, 13), (5, 13), (5,)))
    assert torch.equal(fastml.functional.linear(x, w, b), F.linear(x, w, b))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bias_changed_in_place_after_forward(backend, reduction):
    """As with torch's layers, the bias may change between forward and backward."""
    x, y = torch.randn(6, 3, device=backend.device), torch.randn(6, 2, device=backend.device)
    w = torch.randn(2, 3, device=backend.device, requires_grad=True)
    b0 = torch.randn(2, device=backend.device, requires_grad=True)
    b = b0 * 1
    loss = fastml.functional.linear_mse(x, w, b, y, reduction=reduction).sum()
    expected = torch.autograd.grad(F.mse_loss(F.linear(x, w, b0 * 1), y, reduction=reduction).sum(), (w, b0))
    with torch.no_grad():
        b.add_(1.0)
    got = torch.autograd.grad(loss, (w, b0))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_float32_overflow_gives_inf(backend):
    """A float32 loss beyond float32's range is inf (it once raised in the numba launcher)."""
    big = torch.full((10,), 1e19, device=backend.device)
    assert torch.isinf(fastml.functional.mse_loss(big, torch.zeros_like(big), reduction="sum"))
    # The mean 1e38 is representable, but the sum before dividing is not: backends that sum in
    # float32 (torch, reference, triton) give inf, those that sum in double (cpp, numba) the
    # exact mean. Neither raises.
    mean = fastml.functional.mse_loss(big, torch.zeros_like(big), reduction="mean").item()
    assert mean == float("inf") or mean == pytest.approx(1e38, rel=1e-6)
