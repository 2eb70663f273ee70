"""Max-pooling: ``torch.nn.functional.max_pool2d`` beside every fastml backend's
``fastml.functional.max_pool2d``, forward and forward + backward, one group per size.

Sizes are the pooling layers of the course's CNNs: LeNet's first (after 6 channels of 28 × 28),
and a VGG-style one (64 channels of 56 × 56), kernel 2; an overlapping 3 × 3, stride 2 window; and
ResNet's stem pool (3 × 3, stride 2, padding 1, on 64 channels of 112 × 112).
Extra info gives GB/s under the byte model "read the input (and grad_output), write the output
and its int64 indices (and grad_input)".

    python -m pytest bench/bench_max_pool2d.py --benchmark-only -p no:cacheprovider
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import fastml

# name: (batch, channels, size, kernel, stride, padding)
SIZES = {"LeNet pool1": (256, 6, 28, 2, 2, 0), "VGG pool": (64, 64, 56, 2, 2, 0),
         "overlapping 3x3/2": (64, 64, 56, 3, 2, 0), "ResNet stem 3x3/2 pad 1": (16, 64, 112, 3, 2, 1)}

pytestmark = pytest.mark.ops("max_pool2d")


def _bytes(size, backward):
    n, c, hw, k, s, p = size
    inputs, outputs = n * c * hw * hw, n * c * ((hw + 2 * p - k) // s + 1) ** 2
    forward = 4 * inputs + 4 * outputs + 8 * outputs
    return forward + (4 * outputs + 4 * inputs if backward else 0)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("name", list(SIZES))
def test_max_pool2d(benchmark, backend, device, sync, name, backward):
    size = SIZES[name]
    n, c, hw, k, s, p = size
    benchmark.group = f"max_pool2d {'fwd+bwd' if backward else 'fwd'} {device} {name} {size}"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, hw, hw, generator=gen).to(device).requires_grad_(backward)
    pool = TF.max_pool2d if backend == "torch" else fastml.functional.max_pool2d

    def step():
        if backward:
            x.grad = None
            out = pool(x, k, s, p)
            out.backward(torch.ones_like(out))
        else:
            out = pool(x, k, s, p)
        sync()
        return out

    step()
    benchmark.pedantic(step, rounds=10, warmup_rounds=1)
    benchmark.extra_info["GB/s"] = round(_bytes(size, backward) / benchmark.stats.stats.median / 1e9, 2)
