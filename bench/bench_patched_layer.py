"""What patching costs a small layer whose measured choice is torch's: ``fastml.patch`` on small
torch modules (the course's regression layer, nn.Linear(2, 1) at batch 10, and small calls of the
other drop-ins) beside the torch module, per call, in the three ways training code calls a layer:

- ``no_grad``: forward under ``torch.no_grad()`` (evaluation);
- ``grad, no backward``: forward with gradients tracked and no backward (an evaluation loop
  written without ``torch.no_grad()``): the route settles at the signature's second call;
- ``forward+backward``: a training call.

Where the patched layer's route settles on torch's module, what patching adds is the route's
check, and what it saves is torch's forward reading each parameter and buffer through
nn.Module.__getattr__ (a settled layer reads them itself). ``fastml.tune(model, x)`` removes
the check too, running the module as torch's class.

    python -m pytest bench/bench_patched_layer.py --benchmark-only -p no:cacheprovider
"""

from __future__ import annotations

import pytest
import torch

import fastml

CALLS = ("no_grad", "grad, no backward", "forward+backward")


def layers() -> dict:
    """{name: () -> (torch module, its inputs)}: small calls, where a call's fixed costs show."""
    def loss_inputs(*shape, classes=None):
        logits = torch.randn(*shape)
        target = torch.randint(0, classes, shape[:1]) if classes else torch.randn(*shape)
        return logits, target

    return {
        "nn.Linear(2, 1) batch 10": lambda: (torch.nn.Linear(2, 1), (torch.randn(10, 2),)),
        "nn.Conv2d(3, 8, 3) 2x3x8x8": lambda: (torch.nn.Conv2d(3, 8, 3), (torch.randn(2, 3, 8, 8),)),
        "nn.BatchNorm2d(16) 4x16x8x8": lambda: (torch.nn.BatchNorm2d(16), (torch.randn(4, 16, 8, 8),)),
        "nn.MaxPool2d(2) 2x8x8x8": lambda: (torch.nn.MaxPool2d(2), (torch.randn(2, 8, 8, 8),)),
        "nn.MSELoss() 10x1": lambda: (torch.nn.MSELoss(), loss_inputs(10, 1)),
        "nn.CrossEntropyLoss() 256x10": lambda: (torch.nn.CrossEntropyLoss(), loss_inputs(256, 10, classes=10)),
    }


@pytest.mark.parametrize("model", ["torch", "patched"])
@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("layer_name", list(layers()))
def test_patched_layer_call(benchmark, layer_name, call, model):
    benchmark.group = f"{layer_name} cpu: {call}"
    torch.manual_seed(0)
    module, inputs = layers()[layer_name]()
    wrapped = torch.nn.Sequential(module)
    if model == "patched":
        fastml.patch(wrapped)
    layer = wrapped[0]
    if call != "no_grad" and not any(True for _ in layer.parameters()):
        inputs = (inputs[0].requires_grad_(), *inputs[1:])  # (a layer without parameters: the input's gradient)

    def step():
        if call == "no_grad":
            with torch.no_grad():
                return layer(*inputs)
        out = layer(*inputs)
        if call == "forward+backward":
            layer.zero_grad(set_to_none=True)
            inputs[0].grad = None
            out.sum().backward()
        return out

    for _ in range(3):  # the route settles (a new signature times both ways once)
        step()
    benchmark.pedantic(step, rounds=200, iterations=50, warmup_rounds=5)
