"""Convolution, the fused conv + bias + ReLU + max-pool block, and a LeNet training step: torch
beside every fastml backend, one group per op and size.

- block: torch = ``max_pool2d(relu(conv2d(x, w, b)))`` eager; fastml =
  ``fastml.functional.conv2d_relu_max_pool2d``; forward alone, and forward + backward (input,
  weight and bias gradients);
- conv2d: ``torch.nn.functional.conv2d`` (oneDNN on the CPU, cuDNN on the GPU) against
  ``fastml.functional.conv2d``, forward;
- LeNet step (batch 256): forward, cross-entropy, backward and an SGD step, with torch layers
  against fastml's (fused blocks, Linear, and fastml.optim.SGD).

Extra info gives GFLOP/s of the convolution (2 · N · K · C / groups · R · S · OH · OW per forward).

    python -m pytest bench/bench_conv.py --benchmark-only -p no:cacheprovider
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import fastml
from fastml._bench import lenet

# name: (batch, in channels, out channels, size, kernel, padding)
BLOCKS = {"LeNet conv1": (256, 1, 6, 28, 5, 2), "LeNet conv2": (256, 6, 16, 14, 5, 0), "VGG": (64, 64, 128, 56, 3, 1)}
CUDA_BLOCKS = {name: (256, *size[1:]) for name, size in BLOCKS.items()}
LENET_BATCH = 256

pytestmark = pytest.mark.ops("conv2d", "conv2d_relu_max_pool2d")


def _tensors(size, device, requires_grad=False):
    n, c, k, hw, r, _ = size
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(n, c, hw, hw, generator=gen), torch.randn(k, c, r, r, generator=gen) * (c * r * r) ** -0.5,
               torch.randn(k, generator=gen)]
    return [t.to(device).requires_grad_(requires_grad) for t in tensors]


def _flops(size):
    n, c, k, hw, r, p = size
    out = hw + 2 * p - r + 1
    return 2 * n * k * c * r * r * out * out


def _time(benchmark, fn, sync, size=None):
    def timed():
        out = fn()
        sync()
        return out

    timed()
    benchmark.pedantic(timed, rounds=5, warmup_rounds=1)
    if size is not None:
        benchmark.extra_info["GFLOP/s"] = round(_flops(size) / benchmark.stats.stats.median / 1e9, 1)


def _block(backend, size, device, backward):
    x, w, b = _tensors(size, device, requires_grad=backward)
    padding = size[-1]
    if backend == "torch":
        def forward():
            return TF.max_pool2d(torch.relu(TF.conv2d(x, w, b, 1, padding)), 2)
    else:
        def forward():
            return fastml.functional.conv2d_relu_max_pool2d(x, w, b, 1, padding)
    if not backward:
        return forward

    def forward_backward():
        out = forward()
        return torch.autograd.grad(out, (x, w, b), torch.ones_like(out))
    return forward_backward


def _run_block(benchmark, backend, device, sync, label, size, backward):
    benchmark.group = f"conv+relu+pool {'fwd+bwd' if backward else 'fwd'} {device} {label} {size}"
    with torch.set_grad_enabled(backward):
        _time(benchmark, _block(backend, size, device, backward), sync, size)


@pytest.mark.devices("cpu")
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("label", list(BLOCKS))
def test_block_cpu(benchmark, backend, device, sync, label, backward):
    _run_block(benchmark, backend, device, sync, label, BLOCKS[label], backward)


@pytest.mark.devices("cuda")
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("label", list(CUDA_BLOCKS))
def test_block_cuda(benchmark, backend, device, sync, label, backward):
    _run_block(benchmark, backend, device, sync, label, CUDA_BLOCKS[label], backward)


def _run_conv(benchmark, backend, device, sync, label, size):
    benchmark.group = f"conv2d fwd {device} {label} {size}"
    x, w, b = _tensors(size, device)
    conv = TF.conv2d if backend == "torch" else fastml.functional.conv2d
    with torch.no_grad():
        _time(benchmark, lambda: conv(x, w, b, 1, size[-1]), sync, size)


@pytest.mark.devices("cpu")
@pytest.mark.parametrize("label", list(BLOCKS))
def test_conv2d_cpu(benchmark, backend, device, sync, label):
    _run_conv(benchmark, backend, device, sync, label, BLOCKS[label])


@pytest.mark.devices("cuda")
@pytest.mark.parametrize("label", list(CUDA_BLOCKS))
def test_conv2d_cuda(benchmark, backend, device, sync, label):
    _run_conv(benchmark, backend, device, sync, label, CUDA_BLOCKS[label])


def _lenet(fast: bool) -> torch.nn.Sequential:
    """The course's LeNet on torch's layers or fastml's (fastml._bench.lenet), seeded."""
    torch.manual_seed(0)
    return lenet(fast)


@pytest.mark.ops("conv2d_relu_max_pool2d", "linear", "sgd")
def test_lenet_step(benchmark, backend, device, sync):
    benchmark.group = f"LeNet training step {device} batch {LENET_BATCH}"
    fast = backend != "torch"
    model = _lenet(fast).to(device)
    optimizer = (fastml.optim.SGD if fast else torch.optim.SGD)(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(LENET_BATCH, 1, 28, 28, generator=gen).to(device)
    labels = torch.randint(0, 10, (LENET_BATCH,), generator=gen).to(device)

    def step():
        loss = TF.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss

    _time(benchmark, step, sync)
