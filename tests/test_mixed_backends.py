"""An op's forward and backward are chosen apart (each for its own shape class, fastml/_tune.py),
so a backward runs on what another backend's forward saved: torch's (the reference) and the CPU
kernel's, in every combination, must give the same outputs and gradients in float64.

Found by a flaky DDP test: with a channels-last weight, torch's forward of the fused
conv-ReLU-pool returned a channels-last output and window offsets, which the C++ backward read
through raw pointers as if they were contiguous (gradients off by up to 0.14).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import rand

import fastml
from fastml import _backend, _tune
from fastml import functional as F

CL = torch.channels_last


def _problems(gen):
    """{op: (function of the inputs → a tensor, inputs)}, float64, some inputs in the layouts
    under which torch's forward returns non-contiguous results."""
    def r(*shape, memory_format=torch.contiguous_format, grad=True):
        # .to restrides where .contiguous keeps a tensor that is both layouts (one channel)
        t = rand(*shape, dtype=torch.float64, generator=gen).to(memory_format=memory_format)
        return t.requires_grad_(grad)

    classes = torch.randint(0, 5, (6,), generator=gen)
    return {
        "linear": (F.linear, (r(6, 7), r(5, 7), r(5))),
        "mse_loss": (F.mse_loss, (r(6, 5), r(6, 5))),
        "linear_mse": (F.linear_mse, (r(6, 7), r(3, 7), r(3), r(6, 3))),
        "cross_entropy": (lambda x, t: F.cross_entropy(x, t, label_smoothing=0.1), (r(6, 5), classes)),
        "linear_cross_entropy": (lambda x, w, b, t: F.linear_cross_entropy(x, w, t, linear_bias=b),
                                 (r(6, 7), r(5, 7), r(5), classes)),
        "cdist": (F.cdist, (r(4, 3), r(6, 3))),
        "knn": (lambda q, ref: F.knn(q, ref, 3)[0], (r(4, 3), r(9, 3))),
        "conv2d": (lambda x, w, b: F.conv2d(x, w, b, padding=1), (r(3, 4, 7, 6), r(5, 4, 3, 3, memory_format=CL), r(5))),
        "conv2d channels-last input": (lambda x, w, b: F.conv2d(x, w, b, stride=2),
                                       (r(3, 4, 7, 6, memory_format=CL), r(5, 4, 3, 3), r(5))),
        "max_pool2d": (lambda x: F.max_pool2d(x, 2), (r(3, 4, 8, 7, memory_format=CL),)),
        "conv2d_relu_max_pool2d": (lambda x, w, b: F.conv2d_relu_max_pool2d(x, w, b, padding=1, pool_kernel_size=2),
                                   (r(3, 1, 10, 9), r(4, 1, 3, 3, memory_format=CL), r(4))),
        "conv2d_relu_max_pool2d channels-last": (
            lambda x, w, b: F.conv2d_relu_max_pool2d(x, w, b, pool_kernel_size=2),
            (r(3, 4, 10, 9, memory_format=CL), r(6, 4, 3, 3, memory_format=CL), r(6))),
    }


def _run(monkeypatch, forward: str, backward: str, function, inputs):
    """function(*inputs) and the gradients of every input that wants one, with each op's forward
    on ``forward`` and its backward on ``backward``."""
    def choose(key, kernels, tensor, run, rounds=None, within=None):
        if key[0].startswith(("function ", "layer ")):
            return "fastml"  # a fused functional's route: fastml's op, not torch's sequence
        return forward if key[1] == "forward" else backward

    monkeypatch.setattr(_tune, "choose", choose)
    fastml.clear_tuning()
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = function(*leaves)
    wanted = [t for t in leaves if t.requires_grad]
    upstream = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(0))
    return out.detach(), torch.autograd.grad(out, wanted, upstream)


CPU_KERNEL = next((name for name in ("cpp", "numba") if _backend.status(name).present), None)


@pytest.mark.skipif(CPU_KERNEL is None, reason="neither the C++ extension nor numba is present")
@pytest.mark.parametrize("op", list(_problems(torch.Generator())))
def test_forward_and_backward_on_different_backends_agree(monkeypatch, rng, op):
    function, inputs = _problems(rng)[op]
    expected_out, expected_grads = _run(monkeypatch, "reference", "reference", function, inputs)
    for forward, backward in itertools.product(("reference", CPU_KERNEL), repeat=2):
        out, grads = _run(monkeypatch, forward, backward, function, inputs)
        message = f"{op}: forward on {forward}, backward on {backward}"
        torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12, msg=lambda m: f"{message}: {m}")
        for got, want in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=lambda m: f"{message}: {m}")
