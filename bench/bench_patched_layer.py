"""What patching costs a small layer whose measured choice is torch's: ``fastml.patch`` on an
``nn.Linear`` at the course's regression size (2 features, batch 10, one output) beside the torch
module, per call, in the three ways training code calls a layer:

- ``no_grad``: forward under ``torch.no_grad()`` (evaluation);
- ``grad, no backward``: forward with gradients tracked and no backward (an evaluation loop
  written without ``torch.no_grad()``): the route settles at the signature's second call;
- ``forward+backward``: a training call.

The patched layer runs torch's own module here (its route settles on torch): what it adds is the
route's check. ``fastml.tune(model, x)`` removes even that, running the module as torch's class.

    python -m pytest bench/bench_patched_layer.py --benchmark-only -p no:cacheprovider
"""

from __future__ import annotations

import pytest
import torch

import fastml

CALLS = ("no_grad", "grad, no backward", "forward+backward")


@pytest.mark.parametrize("model", ["torch", "patched"])
@pytest.mark.parametrize("call", CALLS)
def test_patched_layer_call(benchmark, call, model):
    benchmark.group = f"nn.Linear(2, 1) batch 10 cpu: {call}"
    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Linear(2, 1))
    if model == "patched":
        fastml.patch(layers)
    layer = layers[0]
    x = torch.randn(10, 2)

    def step():
        if call == "no_grad":
            with torch.no_grad():
                return layer(x)
        out = layer(x)
        if call == "forward+backward":
            layer.weight.grad = layer.bias.grad = None
            out.sum().backward()
        return out

    for _ in range(3):  # the route settles (a new signature times both ways once)
        step()
    benchmark.pedantic(step, rounds=200, iterations=50, warmup_rounds=5)
