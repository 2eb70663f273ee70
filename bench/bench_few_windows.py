"""Convolutions whose large kernel fits the input only a few times, the layers fully convolutional
networks hold where a classifier holds Linear: ``fastml.patch`` on an ``nn.Conv2d`` beside the
torch module, a training call (forward, sum, backward) and an inference call (no_grad), once the
patched layer's route has settled (its measured choice may pick the "few_windows" variant,
fastml/_few_windows.py).

- timm's VGG ConvMlp: 512x7x7 -> 4096 with a 7x7 kernel, on the 7x7 map (one window, 224-pixel
  input) and on the 8x8 one (four windows, 256 pixels), batch 8;
- LeNet-5's C5: 16x5x5 -> 120 with a 5x5 kernel (one window), batch 256.

    python -m pytest bench/bench_few_windows.py --benchmark-only -p no:cacheprovider
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastml

# name: (batch, in channels, map size, out channels, kernel)
CASES = {"VGG ConvMlp 7x7 map": (8, 512, 7, 4096, 7), "VGG ConvMlp 8x8 map": (8, 512, 8, 4096, 7),
         "LeNet-5 C5": (256, 16, 5, 120, 5)}


@pytest.mark.parametrize("model", ["torch", "patched"])
@pytest.mark.parametrize("call", ["train", "infer"])
@pytest.mark.parametrize("case", list(CASES))
def test_few_windows_layer(benchmark, case, call, model):
    n, c, size, k, kernel = CASES[case]
    benchmark.group = f"{case} cpu: {call}"
    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Conv2d(c, k, kernel))
    if model == "patched":
        layers = copy.deepcopy(layers)
        fastml.patch(layers)
    layer = layers[0]
    x = torch.randn(n, c, size, size, requires_grad=call == "train")

    def step():
        if call == "infer":
            with torch.no_grad():
                return layer(x)
        layer.weight.grad = layer.bias.grad = x.grad = None
        layer(x).sum().backward()

    for _ in range(3):  # the route settles (a new signature times its candidates once)
        step()
    large = n * c * size * size * k > 1e8
    benchmark.pedantic(step, rounds=5 if large else 50, iterations=1, warmup_rounds=1)
