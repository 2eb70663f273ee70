"""Batch normalisation in training, then a ReLU: torch's ``batch_norm`` and ``relu_`` beside
every fastml backend's ``fastml.functional.batch_norm(..., relu=True)``, forward and forward +
backward, one group per size and layout.

Sizes are ResNet-18's batch norms at batch 16 (the stem's 64 × 112², then each stage's), in the
channels-last layout ``fastml.patch(channels_last=True)`` runs and in torch's default one.
Extra info gives GB/s under fastml's byte model: forward reads the input twice (statistics, then
the normalising pass) and writes the output once; backward reads the gradient and the input
twice each and writes the input's gradient. torch moves more (its statistics take two passes,
the ReLU two more each way), so its GB/s here is the bandwidth fastml would need to match it.

    python -m pytest bench/bench_batch_norm.py --benchmark-only -p no:cacheprovider
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import fastml

# name: (batch, channels, size)
SIZES = {"ResNet stem": (16, 64, 112), "ResNet stage 1": (16, 64, 56), "ResNet stage 2": (16, 128, 28),
         "ResNet stage 3": (16, 256, 14), "ResNet stage 4": (16, 512, 7)}

pytestmark = pytest.mark.ops("batch_norm")


def _bytes(size, backward):
    n, c, hw = size
    tensor = 4 * n * c * hw * hw
    return 3 * tensor + (5 * tensor if backward else 0)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("name", list(SIZES))
def test_batch_norm_relu(benchmark, backend, device, sync, name, layout, backward):
    size = SIZES[name]
    n, c, hw = size
    benchmark.group = f"batch_norm+relu {'fwd+bwd' if backward else 'fwd'} {device} {name} {layout} {size}"
    gen = torch.Generator().manual_seed(0)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(n, c, hw, hw, generator=gen).to(device).contiguous(memory_format=memory_format)
    x.requires_grad_(backward)
    weight = torch.rand(c, generator=gen).add_(0.5).to(device).requires_grad_(backward)
    bias = torch.randn(c, generator=gen).to(device).requires_grad_(backward)
    running_mean, running_var = torch.zeros(c, device=device), torch.ones(c, device=device)
    upstream = torch.ones_like(x)
    wrt = (x, weight, bias)

    if backend == "torch":
        def forward():
            return TF.batch_norm(x, running_mean, running_var, weight, bias, True, 0.1, 1e-5).relu_()
    else:
        def forward():
            return fastml.functional.batch_norm(x, running_mean, running_var, weight, bias, True, 0.1, 1e-5,
                                                relu=True)

    def step():
        if backward:
            out = forward()
            torch.autograd.grad(out, wrt, upstream)
        else:
            with torch.no_grad():
                out = forward()
        sync()
        return out

    step()
    benchmark.pedantic(step, rounds=10, warmup_rounds=1)
    benchmark.extra_info["GB/s"] = round(_bytes(size, backward) / benchmark.stats.stats.median / 1e9, 2)
