"""``python -m fastml bench``: how fast fastml is on this machine, beside PyTorch.

First the machine's ceilings are measured per device: memory bandwidth (a large tensor copy,
counting the bytes read and written) and matrix-product throughput (a large float32 ``torch.mm``
with torch's default settings). Then every registered hot path is timed for PyTorch and each
fastml backend present for it (cpp and numba on the CPU; triton on CUDA only; the Triton
interpreter is never timed) on the same inputs, in one run, interleaved, warm: each
implementation is called before timing (numba's JIT compile and Triton's autotuning stay out of
the numbers), every sample is a loop of calls lasting at least a few milliseconds, and a row
reports the median sample. CUDA samples are timed with CUDA events after a synchronize.

A row gives the time per call, the speed-up over torch (torch's median / this median), the
achieved throughput for the op's bound (GB/s for memory-bound ops, GFLOP/s for compute-bound
ones, steps/s for latency-bound ones) and its share of the measured ceiling.

Byte model (documented per hot path in ``HotPath.byte_model``): the bytes an ideal kernel must
move — one read of every input and one write of every output — not what an implementation
happens to move. "Achieved GB/s" is that minimum divided by the time: an implementation that
reads its input twice shows half the GB/s of one that reads it once.

To add a hot path, write a function that returns its cases and add one ``HotPath`` entry to
``HOT_PATHS``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import random
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

import fastml
from fastml import _backend, _tune

CPU_BACKENDS = ("cpp", "numba")
CUDA_BACKENDS = ("triton",)
FLOAT_BYTES = 4  # every case runs in float32

# Size sets: "tiny" for tests (seconds), "quick" the default, "full" adds the large cases.
SIZE_SETS = ("tiny", "quick", "full")


# --------------------------------------------------------------------------------------------
# The course's linear regression, as the course writes it (the baseline fastml's fit replaces)
# --------------------------------------------------------------------------------------------

COURSE_TRUE_W = (2.0, -3.4)
COURSE_TRUE_B = 4.2
COURSE_EXPERIMENT = {"num_examples": 1000, "batch_size": 10, "lr": 0.03, "num_epochs": 3}


def synthetic_data(w: torch.Tensor, b: float, num_examples: int, generator=None):
    """y = Xw + b + noise, as the course generates its data: X (N, len(w)), y (N, 1)."""
    X = torch.normal(0, 1, (num_examples, len(w)), generator=generator)
    y = torch.matmul(X, w) + b
    y += torch.normal(0, 0.01, y.shape, generator=generator)
    return X, y.reshape((-1, 1))


def course_data(num_examples: int = 1000, device="cpu", seed: int = 0):
    """The course's experiment: features (N, 2), labels (N, 1) from w = [2, -3.4], b = 4.2."""
    gen = torch.Generator().manual_seed(seed)
    features, labels = synthetic_data(torch.tensor(COURSE_TRUE_W), COURSE_TRUE_B, num_examples, gen)
    return features.to(device), labels.to(device)


def data_iter(batch_size, features, labels):
    num_examples = len(features)
    indices = list(range(num_examples))
    random.shuffle(indices)
    for i in range(0, num_examples, batch_size):
        batch_indices = torch.tensor(indices[i: min(i + batch_size, num_examples)])
        yield features[batch_indices], labels[batch_indices]


def linreg(X, w, b):
    return torch.matmul(X, w) + b


def squared_loss(y_hat, y):
    return (y_hat - y.reshape(y_hat.shape)) ** 2 / 2


def sgd(params, lr, batch_size):
    with torch.no_grad():
        for param in params:
            param -= lr * param.grad / batch_size
            param.grad.zero_()


def course_linear_regression(features, labels, batch_size=10, lr=0.03, num_epochs=3):
    """The course's training loop, verbatim in spirit: → (w (D, 1), b (1,))."""
    w = torch.normal(0, 0.01, size=(features.shape[1], 1), device=features.device, requires_grad=True)
    b = torch.zeros(1, device=features.device, requires_grad=True)
    for _ in range(num_epochs):
        for X, y in data_iter(batch_size, features, labels):
            loss = squared_loss(linreg(X, w, b), y)
            loss.sum().backward()
            sgd([w, b], lr, batch_size)
    return w, b


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Case:
    """One size of one hot path.

    ``prepare(device)`` allocates the inputs and returns ``make(impl)``, which returns the
    zero-argument function timed for implementation ``impl`` ("torch" or a fastml backend; the
    runner enters ``fastml.use_backend(impl)`` around fastml's calls).
    """

    label: str
    params: dict
    bound: str  # "memory" | "compute" | "latency"
    bytes: int  # byte model: one read of the inputs + one write of the outputs
    flops: int
    steps: int  # training steps per call (latency-bound cases report steps/s)
    prepare: Callable[[torch.device], Callable[[str], Callable[[], object]]]


@dataclasses.dataclass(frozen=True)
class HotPath:
    name: str
    ops: tuple[str, ...]  # fastml.ops packages it runs on: a backend counts when each has its kernels
    cases: Callable[[torch.device, str], list[Case]]  # (device, size set) → cases
    description: str
    byte_model: str
    requires: Callable[[], str | None] = lambda: None  # why it cannot run here, or None
    torch_impls: tuple[str, ...] = ()  # variants of torch's implementation timed beside its default
    default: bool = True  # in a run that names no ops (the zoo is asked for by name: minutes)
    backends: tuple[str, ...] | None = None  # the forced fastml backends worth timing (None: every one)


def _params_to_device(module: torch.nn.Module, state: dict, device) -> torch.nn.Module:
    module.load_state_dict(state)
    return module.to(device)


# linear_mse ---------------------------------------------------------------------------------

def _linear_mse_cases(device: torch.device, sizes: str) -> list[Case]:
    shapes = {"tiny": [(4096, 64, 1), (4096, 64, 8)],
              "quick": [(65536, 256, 1), (65536, 256, 8)]}.get(sizes, [(65536, 256, 1), (65536, 256, 8)])
    if sizes == "full" or (device.type == "cuda" and sizes != "tiny"):
        shapes = shapes + [(1_048_576, 256, 1)]
    cases = []
    for n, d, o in shapes:
        read = n * d + n * o + o * d + o  # x, target, weight, bias
        write = 1 + o * d + o  # loss, grad_weight, grad_bias
        cases.append(Case(f"N={n} D={d} O={o}", {"N": n, "D": d, "O": o}, "memory",
                          FLOAT_BYTES * (read + write), 4 * n * d * o, 1,
                          lambda dev, n=n, d=d, o=o: _linear_mse_prepare(dev, n, d, o)))
    return cases


def _linear_mse_prepare(device, n, d, o):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).to(device)
    y = torch.randn(n, o, generator=gen).to(device)
    state = torch.nn.Linear(d, o).state_dict()

    def make(impl):
        if impl == "torch":
            lin = _params_to_device(torch.nn.Linear(d, o), state, device)
            loss_fn = torch.nn.MSELoss()

            def step():
                lin.weight.grad = lin.bias.grad = None
                loss_fn(lin(x), y).backward()
            return step
        w = state["weight"].clone().to(device).requires_grad_()
        b = state["bias"].clone().to(device).requires_grad_()

        def step():
            w.grad = b.grad = None
            fastml.functional.linear_mse(x, w, b, y).backward()
        return step
    return make


# linear -------------------------------------------------------------------------------------

def _linear_cases(device: torch.device, sizes: str) -> list[Case]:
    shapes = [(64, 32, 16)] if sizes == "tiny" else [(256, 784, 256)]
    if sizes == "full" or (device.type == "cuda" and sizes != "tiny"):
        shapes = shapes + [(4096, 1024, 1024)]
    if sizes == "full":  # VGG's classifier at batch 16: weight gradients of 411 MB and 67 MB
        shapes = shapes + [(16, 25088, 4096), (16, 4096, 4096)]
    cases = []
    for n, d, o in shapes:
        read = n * d + o * d + o + n * o  # x, weight, bias, grad_output
        write = n * o + n * d + o * d + o  # output, grad_input, grad_weight, grad_bias
        cases.append(Case(f"N={n} D={d} O={o}", {"N": n, "D": d, "O": o}, "compute",
                          FLOAT_BYTES * (read + write), 6 * n * d * o, 1,
                          lambda dev, n=n, d=d, o=o: _linear_prepare(dev, n, d, o)))
    return cases


def _linear_prepare(device, n, d, o):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).to(device).requires_grad_()
    grad_out = torch.randn(n, o, generator=gen).to(device)
    state = torch.nn.Linear(d, o).state_dict()

    def make(impl):
        cls = torch.nn.Linear if impl == "torch" else fastml.nn.Linear
        lin = _params_to_device(cls(d, o), state, device)

        def step():
            x.grad = lin.weight.grad = lin.bias.grad = None
            lin(x).backward(grad_out)
        return step
    return make


# toy_step -----------------------------------------------------------------------------------

def _toy_step_cases(device: torch.device, sizes: str) -> list[Case]:
    n, d = 10, 2
    read, write = n * d + n + d + 1, d + 1 + 1  # x, y, w, b; new w, b and the loss
    return [Case("batch=10 features=2", {"batch": n, "features": d}, "latency",
                 FLOAT_BYTES * (read + write), 4 * n * d, 1, lambda dev: _toy_step_prepare(dev, n, d))]


def _toy_step_prepare(device, n, d):
    features, labels = course_data(n, device)
    state = torch.nn.Linear(d, 1).state_dict()

    def make(impl):
        if impl == "torch":
            model = _params_to_device(torch.nn.Linear(d, 1), state, device)
            loss_fn = torch.nn.MSELoss()
            opt = torch.optim.SGD(model.parameters(), lr=0.03)

            def step():
                opt.zero_grad()
                loss_fn(model(features), labels).backward()
                opt.step()
            return step
        model = _params_to_device(fastml.nn.LinearMSELoss(d, 1), state, device)
        opt = torch.optim.SGD(model.parameters(), lr=0.03)

        def step():
            opt.zero_grad()
            model(features, labels).backward()
            opt.step()
        return step
    return make


# linear_regression_fit ----------------------------------------------------------------------

def _linear_regression_requires() -> str | None:
    if getattr(getattr(fastml, "linear_model", None), "LinearRegression", None) is None:
        return "fastml.linear_model.LinearRegression is not present in this installation"
    return None


def _linear_regression_cases(device: torch.device, sizes: str) -> list[Case]:
    exp = dict(COURSE_EXPERIMENT)
    if sizes == "tiny":
        exp.update(num_examples=200, num_epochs=1)
    n, batch, epochs = exp["num_examples"], exp["batch_size"], exp["num_epochs"]
    steps = epochs * math.ceil(n / batch)
    read, write = epochs * (n * 2 + n), 2 + 1  # each epoch reads features and labels; writes w, b
    label = f"N={n} batch={batch} epochs={epochs}"
    return [Case(label, {"N": n, "D": 2, "batch": batch, "lr": exp["lr"], "epochs": epochs}, "latency",
                 FLOAT_BYTES * (read + write), epochs * n * 2 * 2 * 2, steps,
                 lambda dev: _linear_regression_prepare(dev, exp))]


def _linear_regression_prepare(device, exp):
    features, labels = course_data(exp["num_examples"], device)
    batch, lr, epochs = exp["batch_size"], exp["lr"], exp["num_epochs"]

    def make(impl):
        if impl == "torch":
            return lambda: course_linear_regression(features, labels, batch, lr, epochs)
        from fastml.linear_model import LinearRegression

        return lambda: LinearRegression(solver="sgd", lr=lr, batch_size=batch, epochs=epochs).fit(features, labels)
    return make


# optimizer steps ----------------------------------------------------------------------------

# The course's LeNet: conv 1→6 5×5, conv 6→16 5×5, linear 400→120→84→10 (weights and biases).
LENET_PARAMETER_SIZES = (150, 6, 2400, 16, 48000, 120, 10080, 84, 840, 10)  # 61,706 in 10 tensors
OPTIMIZER_SETTINGS = {
    "sgd": ("SGD", {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4}),
    "sgd_plain": ("SGD", {"lr": 0.03}),  # the course's torch.optim.SGD(net.parameters(), lr=0.03)
    "adam": ("Adam", {"lr": 1e-3}),
}
# Arrays an optimizer step must move per parameter: SGD with momentum reads p, grad, buffer and
# writes p, buffer; plain SGD reads p, grad and writes p; Adam reads p, grad, exp_avg,
# exp_avg_sq and writes p, exp_avg, exp_avg_sq.
OPTIMIZER_ARRAY_PASSES = {"sgd": 5, "sgd_plain": 3, "adam": 7}
# The course's models' parameters, tensor by tensor: softmax regression (784 -> 10) and the MLP
# (784 -> 256 -> 10); LeNet's are LENET_PARAMETER_SIZES.
COURSE_PARAMETER_SIZES = {"softmax regression": (7840, 10), "MLP": (200704, 256, 2560, 10),
                          "LeNet": LENET_PARAMETER_SIZES}
# torch's own implementations of a step: its default (the for-loop on the CPU, foreach on CUDA),
# foreach and fused; each is timed beside fastml's.
TORCH_OPTIMIZER_IMPLS = {"torch": {}, "torch-foreach": {"foreach": True}, "torch-fused": {"fused": True}}


def optimizer_step_factory(kind: str, sizes, device, seed: int = 0):
    """make(impl) → one ``kind`` ("sgd" or "adam") optimizer step over tensors of ``sizes``
    elements with fixed gradients. impl: a key of TORCH_OPTIMIZER_IMPLS (torch.optim) or a
    fastml backend (fastml.optim; the caller enters fastml.use_backend).

    Every implementation updates the same tensors, its optimizer state pre-filled with the same
    buffers: on a VM, how fast a fresh allocation streams depends on where the host placed its
    pages (seen here: 1.6 ms or 3 ms for the same step on different 200 MB), so separate
    allocations would time page placement, not code."""
    name, settings = OPTIMIZER_SETTINGS[kind]
    gen = torch.Generator().manual_seed(seed)

    def randn(n, positive=False):
        t = torch.randn(n, generator=gen)
        return (t.abs() if positive else t).to(device)

    params = [randn(n).requires_grad_() for n in sizes]
    for p in params:
        p.grad = randn(p.numel())
    if kind == "sgd":
        states = [{"momentum_buffer": randn(p.numel())} for p in params]
    elif kind == "sgd_plain":
        states = [{} for p in params]
    else:
        states = [{"step": torch.tensor(0.0), "exp_avg": randn(p.numel()), "exp_avg_sq": randn(p.numel(), True)}
                  for p in params]

    def make(impl):
        if impl in TORCH_OPTIMIZER_IMPLS:
            opt = getattr(torch.optim, name)(params, **settings, **TORCH_OPTIMIZER_IMPLS[impl])
        else:
            opt = getattr(fastml.optim, name)(params, **settings)
        for p, state in zip(params, states):
            opt.state[p].update(state)
            if impl == "torch-fused" and "step" in state:  # torch's fused Adam keeps its step count on the device
                opt.state[p]["step"] = state["step"].to(p.device)
        return opt.step
    return make


def _optimizer_cases(kind: str):
    def cases(device: torch.device, sizes: str) -> list[Case]:
        shapes = {"tiny": [("1M params in 10 tensors", [100_000] * 10), ("LeNet", list(LENET_PARAMETER_SIZES))]}.get(
            sizes, [("10M params in 20 tensors", [500_000] * 20), ("LeNet", list(LENET_PARAMETER_SIZES))])
        if kind == "sgd_plain":  # the course's models, whose step is mostly fixed costs
            shapes = [(label, list(sizes)) for label, sizes in COURSE_PARAMETER_SIZES.items()]
        elif device.type == "cuda" and sizes != "tiny":
            shapes = [("100M params in 100 tensors", [1_000_000] * 100), ("1000 tensors of 1024", [1024] * 1000)]
        out = []
        for label, tensor_sizes in shapes:
            n = sum(tensor_sizes)
            bound = "memory" if n >= 1_000_000 else "latency"
            out.append(Case(f"{label} ({n:,} params)", {"params": n, "tensors": len(tensor_sizes)}, bound,
                            FLOAT_BYTES * OPTIMIZER_ARRAY_PASSES[kind] * n, 0, 1,
                            lambda dev, s=tensor_sizes: optimizer_step_factory(kind, s, dev)))
        return out
    return cases


# linear_cross_entropy -----------------------------------------------------------------------

def _linear_cross_entropy_cases(device: torch.device, sizes: str) -> list[Case]:
    shapes = {"tiny": [(64, 32, 10), (128, 64, 512)]}.get(sizes, [(256, 784, 10), (1024, 512, 4096)])
    if sizes == "full":
        shapes = shapes + [(4096, 512, 8192)]
    if device.type == "cuda" and sizes != "tiny":
        shapes = [(256, 784, 10), (8192, 2048, 32768)]
    cases = []
    for n, d, c in shapes:
        read, write = n * d + c * d + c + n, 1 + n * d + c * d + c  # x, weight, bias, target; loss, grads
        cases.append(Case(f"N={n} D={d} C={c}", {"N": n, "D": d, "C": c}, "compute", FLOAT_BYTES * (read + write),
                          6 * n * d * c, 1, lambda dev, n=n, d=d, c=c: _linear_cross_entropy_prepare(dev, n, d, c)))
    return cases


def _linear_cross_entropy_prepare(device, n, d, c):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).to(device).requires_grad_()
    target = torch.randint(0, c, (n,), generator=gen).to(device)
    state = torch.nn.Linear(d, c).state_dict()

    def make(impl):
        lin = _params_to_device(torch.nn.Linear(d, c), state, device)
        loss_fn = torch.nn.CrossEntropyLoss()

        def step():
            x.grad = lin.weight.grad = lin.bias.grad = None
            if impl == "torch":
                loss_fn(lin(x), target).backward()
            else:
                fastml.functional.linear_cross_entropy(x, lin.weight, target, linear_bias=lin.bias).backward()
        return step
    return make


# knn ----------------------------------------------------------------------------------------

def _knn_cases(device: torch.device, sizes: str) -> list[Case]:
    shapes = {"tiny": [(256, 2048, 16, 5)]}.get(sizes, [(1024, 16384, 64, 10)])
    if sizes == "full":
        shapes = shapes + [(4096, 65536, 64, 10)]
    if device.type == "cuda" and sizes != "tiny":
        shapes = [(16384, 65536, 128, 16)]
    return [Case(f"Q={q} R={r} D={d} k={k}", {"Q": q, "R": r, "D": d, "k": k}, "compute",
                 FLOAT_BYTES * (q * d + r * d + 2 * q * k), 3 * q * r * d, 1,
                 lambda dev, q=q, r=r, d=d, k=k: _knn_prepare(dev, q, r, d, k)) for q, r, d, k in shapes]


def _knn_prepare(device, q, r, d, k):
    gen = torch.Generator().manual_seed(0)
    query, reference = torch.randn(q, d, generator=gen).to(device), torch.randn(r, d, generator=gen).to(device)

    def make(impl):
        if impl == "torch":
            return lambda: torch.cdist(query, reference).topk(k, largest=False)
        return lambda: fastml.functional.knn(query, reference, k)
    return make


# conv2d, max_pool2d, the fused block and the LeNet step ---------------------------------------

# (batch, in channels, out channels, image size, kernel, padding): LeNet's two layers, a VGG layer
_CONV_SIZES = {"LeNet conv1": (256, 1, 6, 28, 5, 2), "LeNet conv2": (256, 6, 16, 14, 5, 0),
               "VGG": (64, 64, 128, 56, 3, 1)}


def _conv_shapes(device: torch.device, sizes: str) -> list[tuple[str, tuple]]:
    if sizes == "tiny":
        return [("small", (16, 3, 8, 12, 3, 1))]
    names = ["LeNet conv1", "LeNet conv2"] + (["VGG"] if sizes == "full" or device.type == "cuda" else [])
    return [(name, _CONV_SIZES[name]) for name in names]


def _conv_flops(n, c, k, size, r, pad):
    out = size + 2 * pad - r + 1
    return 2 * n * k * out * out * c * r * r


def _conv_cases(device: torch.device, sizes: str) -> list[Case]:
    cases = []
    for name, (n, c, k, size, r, pad) in _conv_shapes(device, sizes):
        out = size + 2 * pad - r + 1
        cases.append(Case(f"{name} {n}x{c}x{size}x{size} -> {k} {r}x{r}", {"N": n, "C": c, "K": k, "size": size},
                          "compute", FLOAT_BYTES * (n * c * size * size + k * c * r * r + k + n * k * out * out),
                          _conv_flops(n, c, k, size, r, pad), 1,
                          lambda dev, shape=(n, c, k, size, r, pad): _conv_prepare(dev, *shape, fused=False)))
    return cases


def _conv_block_cases(device: torch.device, sizes: str) -> list[Case]:
    cases = []
    for name, (n, c, k, size, r, pad) in _conv_shapes(device, sizes):
        out = size + 2 * pad - r + 1
        read = n * c * size * size + k * c * r * r + k + n * k * (out // 2) ** 2  # x, w, b, grad_output
        write = n * k * (out // 2) ** 2 + n * c * size * size + k * c * r * r + k  # output and the gradients
        cases.append(Case(f"{name} {n}x{c}x{size}x{size} -> {k} {r}x{r}", {"N": n, "C": c, "K": k, "size": size},
                          "compute", FLOAT_BYTES * (read + write), 3 * _conv_flops(n, c, k, size, r, pad), 1,
                          lambda dev, shape=(n, c, k, size, r, pad): _conv_prepare(dev, *shape, fused=True)))
    return cases


def _conv_prepare(device, n, c, k, size, r, pad, fused):
    """Conv2d forward, or the conv + bias + ReLU + max-pool 2 block forward + backward."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, size, size, generator=gen).to(device).requires_grad_(fused)
    weight = (torch.randn(k, c, r, r, generator=gen) / (c * r * r) ** 0.5).to(device).requires_grad_(fused)
    bias = torch.randn(k, generator=gen).to(device).requires_grad_(fused)
    F = torch.nn.functional

    def make(impl):
        if not fused:
            conv = F.conv2d if impl == "torch" else fastml.functional.conv2d
            return lambda: conv(x, weight, bias, 1, pad)

        def step():
            x.grad = weight.grad = bias.grad = None
            if impl == "torch":
                out = F.max_pool2d(F.relu(F.conv2d(x, weight, bias, 1, pad)), 2)
            else:
                out = fastml.functional.conv2d_relu_max_pool2d(x, weight, bias, 1, pad)
            out.sum().backward()
        return step
    return make


def _max_pool_cases(device: torch.device, sizes: str) -> list[Case]:
    """LeNet's pool (kernel 2 on 6 channels of 28x28) and ResNet's stem pool (3x3, stride 2,
    padding 1, on 64 channels of 112x112 at batch 16 on the CPU)."""
    n, c, size = (16, 4, 12) if sizes == "tiny" else (256, 6, 28) if device.type == "cpu" else (256, 64, 56)
    stem = (2, 8, 16) if sizes == "tiny" else (16, 64, 112) if device.type == "cpu" else (64, 64, 112)
    cases = []
    for (n, c, size), (kernel, stride, padding), name in (((n, c, size), (2, 2, 0), "kernel 2"),
                                                         (stem, (3, 2, 1), "3x3 stride 2 padding 1 (ResNet stem)")):
        elements = n * c * size * size
        out = ((size + 2 * padding - kernel) // stride + 1) ** 2 * n * c
        # read x, write out and its int64 indices; backward: read grad_output and indices, write grad_input
        moved = FLOAT_BYTES * (elements + out) + 8 * out + FLOAT_BYTES * (out + elements) + 8 * out
        cases.append(Case(f"{n}x{c}x{size}x{size} {name}", {"N": n, "C": c, "size": size, "kernel": kernel,
                                                              "stride": stride, "padding": padding},
                          "memory", moved, 0, 1,
                          lambda dev, shape=(n, c, size), window=(kernel, stride, padding):
                          _max_pool_prepare(dev, *shape, *window)))
    return cases


def _max_pool_prepare(device, n, c, size, kernel, stride, padding):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, size, size, generator=gen).to(device).requires_grad_()

    def make(impl):
        pool = torch.nn.functional.max_pool2d if impl == "torch" else fastml.functional.max_pool2d

        def step():
            x.grad = None
            pool(x, kernel, stride, padding).sum().backward()
        return step
    return make


def lenet(fast: bool) -> torch.nn.Sequential:
    """The course's LeNet (28 × 28 inputs): torch's layers, or fastml's (two fused conv blocks,
    fastml.nn.Linear)."""
    linear = fastml.nn.Linear if fast else torch.nn.Linear
    if fast:
        features = [fastml.nn.ConvReLUPool2d(1, 6, 5, padding=2), fastml.nn.ConvReLUPool2d(6, 16, 5)]
    else:
        features = [torch.nn.Conv2d(1, 6, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                    torch.nn.Conv2d(6, 16, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(2)]
    return torch.nn.Sequential(*features, torch.nn.Flatten(), linear(400, 120), torch.nn.ReLU(), linear(120, 84),
                               torch.nn.ReLU(), linear(84, 10))


def _lenet_step_cases(device: torch.device, sizes: str) -> list[Case]:
    batch = 16 if sizes == "tiny" else 256
    flops = 3 * (_conv_flops(batch, 1, 6, 28, 5, 2) + _conv_flops(batch, 6, 16, 14, 5, 0)
                 + 2 * batch * (400 * 120 + 120 * 84 + 84 * 10))
    return [Case(f"batch {batch}", {"batch": batch}, "compute", FLOAT_BYTES * batch * (28 * 28 + 1), flops, 1,
                 lambda dev: _lenet_step_prepare(dev, batch))]


def _lenet_step_prepare(device, batch):
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 1, 28, 28, generator=gen).to(device)
    labels = torch.randint(0, 10, (batch,), generator=gen).to(device)
    torch.manual_seed(0)
    state = lenet(False).state_dict()

    def make(impl):
        fast = impl != "torch"
        model = lenet(fast).to(device)
        model.load_state_dict(dict(zip(model.state_dict(), state.values())))
        optimizer = (fastml.optim.SGD if fast else torch.optim.SGD)(model.parameters(), lr=0.05)
        loss_fn = fastml.nn.CrossEntropyLoss() if fast else torch.nn.CrossEntropyLoss()

        def step():
            loss = loss_fn(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return step
    return make


# zoo: standard image classifiers, unpatched against patched -------------------------------

ZOO_BATCH, ZOO_SIZE = 16, 112


def _zoo_cases(mode: str):
    def cases(device: torch.device, sizes: str) -> list[Case]:
        from fastml import zoo

        names = ["resnet18", "mobilenet_v2"] if sizes == "tiny" else list(zoo.MODELS)
        batch, size = (2, 32) if sizes == "tiny" else (ZOO_BATCH, ZOO_SIZE)
        return [Case(f"{name} batch {batch} {size}x{size}", {"model": name, "batch": batch, "size": size}, "latency",
                     0, 0, 1, lambda dev, name=name, batch=batch, size=size: _zoo_prepare(dev, name, mode, batch, size))
                for name in names]
    return cases


def _zoo_prepare(device, name, mode, batch, size):
    """make(impl): one step of the model as torch.nn built it ("torch"), or patched by
    fastml.patch ("auto": then tuned, every decision made before timing; a forced backend: the
    runner's use_backend applies). train: forward, cross-entropy, backward, torch.optim.SGD;
    infer: eval mode, no_grad forward. All of them share one set of Parameters, buffers and
    optimizer: what differs between the rows is the code that runs, not where the model lives."""
    from fastml import zoo

    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=gen).to(device)
    labels = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    shared = {}  # the first model built, whose tensors every other one uses, and the one optimizer

    def make(impl):
        torch.manual_seed(0)
        model = zoo.build(name).to(device).train(mode == "train")
        # Every implementation runs on the very same Parameters, buffers and optimizer state: two
        # copies of a 60M-parameter model sit in different memory, and on a small VM that alone
        # moved one model's step by 30% between copies (an all-torch "auto" row at 0.73x).
        owner = shared.setdefault("model", model)
        if owner is not model:
            for source, target in zip(owner.modules(), model.modules()):
                target._parameters.update(source._parameters)
                target._buffers.update(source._buffers)
        if impl != "torch":
            # fx: fold the batch norms forward() calls too (ResNet); channels_last: activations on
            # the layout oneDNN is fastest on, where tune measures the model faster so
            fastml.patch(model, fx=True, channels_last=True)
        if impl == AUTO:
            with torch.set_grad_enabled(mode == "train"):
                fastml.tune(model, images)
        if mode == "infer":
            def infer():
                with torch.no_grad():
                    return model(images)
            return infer
        optimizer = shared.setdefault("optimizer", torch.optim.SGD(owner.parameters(), lr=1e-3, momentum=0.9))
        loss_fn = torch.nn.CrossEntropyLoss()

        def train():
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(images), labels).backward()
            optimizer.step()
        return train
    return make


# zoo_conv2d: every distinct convolution of the zoo, alone ----------------------------------------

def zoo_conv_shapes(batch: int = ZOO_BATCH, size: int = ZOO_SIZE) -> list[tuple[str, dict]]:
    """The zoo's distinct convolutions at ``batch`` images of ``size``: [(where it first appears,
    "model:layer", {the Conv2d's arguments and its input's shape})], found by running each model
    once on the meta device (no memory, no arithmetic)."""
    from fastml import zoo

    found: dict[tuple, str] = {}
    for name in zoo.MODELS:
        with torch.device("meta"):
            model = zoo.build(name).eval()
        seen = []
        hooks = [m.register_forward_pre_hook(lambda m, args, layer=layer: seen.append((layer, m, args[0].shape)))
                 for layer, m in model.named_modules() if type(m) is torch.nn.Conv2d]
        with torch.no_grad():
            model(torch.empty(batch, 3, size, size, device="meta"))
        for hook in hooks:
            hook.remove()
        for layer, m, shape in seen:
            key = (tuple(shape), m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                   m.bias is not None)
            found.setdefault(key, f"{name}:{layer}")
    return [(where, {"input": key[0], "out_channels": key[1], "kernel_size": key[2], "stride": key[3],
                     "padding": key[4], "dilation": key[5], "groups": key[6], "bias": key[7]})
            for key, where in found.items()]


def _zoo_conv_cases(device: torch.device, sizes: str) -> list[Case]:
    shapes = zoo_conv_shapes(*((2, 64) if sizes == "tiny" else (ZOO_BATCH, ZOO_SIZE)))
    if sizes == "tiny":
        shapes = shapes[:3]
    cases = []
    for where, conv in shapes:
        (n, c, h, w), k, (r, s) = conv["input"], conv["out_channels"], conv["kernel_size"]
        label = (f"{n}x{c}x{h}x{w} -> {k} {r}x{s} s{conv['stride'][0]} p{conv['padding'][0]} g{conv['groups']} "
                 f"({where})")
        out_h = (h + 2 * conv["padding"][0] - r) // conv["stride"][0] + 1
        out_w = (w + 2 * conv["padding"][1] - s) // conv["stride"][1] + 1
        flops = 2 * n * k * out_h * out_w * (c // conv["groups"]) * r * s
        moved = FLOAT_BYTES * (n * c * h * w + k * (c // conv["groups"]) * r * s + n * k * out_h * out_w)
        cases.append(Case(label, {**conv, "first_seen": where}, "compute", moved, flops, 1,
                          lambda dev, conv=conv: _zoo_conv_prepare(dev, conv)))
    return cases


def _zoo_conv_prepare(device, conv):
    """make(impl): one inference call of the convolution on a channels-last input (the layout
    patch(channels_last=True) gives the zoo's activations), torch.nn.Conv2d against
    fastml.nn.Conv2d tuned (auto)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(conv["input"], generator=gen).to(device).contiguous(memory_format=torch.channels_last)
    arguments = {k: conv[k] for k in ("kernel_size", "stride", "padding", "dilation", "groups", "bias")}
    torch.manual_seed(0)
    reference = torch.nn.Conv2d(x.shape[1], conv["out_channels"], **arguments).to(device).eval()

    def make(impl):
        if impl == "torch":
            layer = reference
        else:
            layer = fastml.nn.Conv2d(x.shape[1], conv["out_channels"], **arguments).to(device).eval()
            layer.load_state_dict(reference.state_dict())
            if impl == AUTO:
                with torch.no_grad():
                    fastml.tune(layer, x)

        def infer():
            with torch.no_grad():
                return layer(x)
        return infer
    return make


HOT_PATHS: dict[str, HotPath] = {hp.name: hp for hp in (
    HotPath("linear_mse", ("linear_mse",), _linear_mse_cases,
            "fused linear + squared loss, forward + backward (torch: nn.Linear + nn.MSELoss + backward; "
            "fastml: functional.linear_mse + backward); weight and bias require grad, x does not",
            "read x (N, D), target (N, O), weight (O, D), bias (O); write loss, grad_weight, grad_bias; "
            "FLOPs 4·N·D·O (prediction and weight gradient)"),
    HotPath("linear", ("linear",), _linear_cases,
            "fastml.nn.Linear forward + backward at an MLP layer's size, all of x, weight, bias requiring grad",
            "read x, weight, bias, grad_output; write output, grad_input, grad_weight, grad_bias; "
            "FLOPs 6·N·D·O (three matrix products)"),
    HotPath("toy_step", ("linear_mse",), _toy_step_cases,
            "the course's training step, batch 10, 2 features: zero_grad, linear + MSE loss, backward, "
            "torch.optim.SGD step (torch: nn.Linear + nn.MSELoss; fastml: nn.LinearMSELoss)",
            "latency-bound (a step moves ~150 bytes; its time is dispatch overhead): reported as steps/s, "
            "no ceiling applies"),
    HotPath("linear_regression_fit", ("linear_mse",), _linear_regression_cases,
            "the course's experiment (1000 examples, w = [2, -3.4], b = 4.2, batch 10, lr 0.03, 3 epochs): "
            "fastml.linear_model.LinearRegression(solver='sgd').fit vs the course's Python loop "
            "(data_iter with random.shuffle, linreg, squared_loss, sgd)",
            "latency-bound (300 steps of 10 examples): reported as steps/s, no ceiling applies",
            _linear_regression_requires),
    HotPath("sgd_step", ("sgd",), _optimizer_cases("sgd"),
            "one optimizer step, SGD with momentum 0.9 and weight decay 1e-4, gradients given "
            "(torch: torch.optim.SGD, default implementation; fastml: fastml.optim.SGD)",
            "read params, grads, momentum buffers; write params, buffers (5 arrays of N floats)",
            torch_impls=("torch-foreach", "torch-fused")),
    HotPath("sgd_plain_step", ("sgd",), _optimizer_cases("sgd_plain"),
            "one optimizer step, SGD without momentum (the course's torch.optim.SGD(params, lr=0.03)) over the "
            "course's models' parameters, gradients given (torch: torch.optim.SGD, default implementation; "
            "fastml: fastml.optim.SGD)",
            "read params, grads; write params (3 arrays of N floats)",
            torch_impls=("torch-foreach", "torch-fused")),
    HotPath("adam_step", ("adam",), _optimizer_cases("adam"),
            "one optimizer step, Adam lr 1e-3, gradients given "
            "(torch: torch.optim.Adam, default implementation; fastml: fastml.optim.Adam)",
            "read params, grads, exp_avg, exp_avg_sq; write params, exp_avg, exp_avg_sq (7 arrays of N floats)",
            torch_impls=("torch-foreach", "torch-fused")),
    HotPath("linear_cross_entropy", ("linear_cross_entropy", "cross_entropy"), _linear_cross_entropy_cases,
            "linear + softmax cross-entropy, forward + backward, x, weight and bias requiring grad "
            "(torch: nn.Linear + nn.CrossEntropyLoss; fastml: functional.linear_cross_entropy)",
            "read x, weight, bias, target; write the loss and the three gradients; FLOPs 6·N·D·C"),
    HotPath("knn", ("knn",), _knn_cases,
            "k nearest neighbours, euclidean (torch: cdist + topk; fastml: functional.knn)",
            "read queries and references, write k distances and indices per query; FLOPs 3·Q·R·D"),
    HotPath("conv2d", ("conv2d",), _conv_cases,
            "conv2d forward, stride 1 (torch: F.conv2d, oneDNN / cuDNN; fastml: functional.conv2d)",
            "read x, weight, bias; write the output; FLOPs 2·N·K·OH·OW·C·R·S"),
    HotPath("max_pool2d", ("max_pool2d",), _max_pool_cases,
            "max_pool2d forward + backward, kernel 2 and ResNet's 3x3 stride 2 padding 1 (torch: F.max_pool2d; "
            "fastml: functional.max_pool2d)",
            "read x, write the output and its int64 indices; read grad_output and the indices, write grad_input"),
    HotPath("conv_block", ("conv2d_relu_max_pool2d",), _conv_block_cases,
            "conv + bias + ReLU + max-pool 2, forward + backward (torch: the three ops eager; "
            "fastml: functional.conv2d_relu_max_pool2d, one kernel each way)",
            "read x, weight, bias, grad_output; write the output and the three gradients; FLOPs 3 convolutions"),
    HotPath("lenet_step", ("conv2d_relu_max_pool2d", "linear", "cross_entropy", "sgd"), _lenet_step_cases,
            "one LeNet training step: forward, cross-entropy, backward, SGD (torch's layers and optimizer "
            "against fastml's: fused conv blocks, nn.Linear, nn.CrossEntropyLoss, optim.SGD)",
            "compute-bound: FLOPs of the two convolutions and three linear layers, forward and backward"),
    HotPath("zoo_conv2d", ("conv2d",), _zoo_conv_cases,
            "every distinct convolution of fastml.zoo's twelve models (batch 16, 112x112, each listed with the "
            "first model and layer it appears in), alone, inference on a channels-last input: torch.nn.Conv2d "
            "against fastml.nn.Conv2d tuned",
            "read x, weight; write the output; FLOPs 2·N·K·OH·OW·(C/groups)·R·S", default=False, backends=()),
    *(HotPath(f"zoo_{mode}", ("conv2d", "linear", "max_pool2d", "conv2d_relu_max_pool2d"), _zoo_cases(mode),
              f"one {'training step' if mode == 'train' else 'inference pass'} of each standard classifier of "
              "fastml.zoo (torchvision's architectures, random weights), batch 16, 112x112: as torch.nn built "
              "it, against the model after fastml.patch (auto: tuned; cpp: its kernels forced everywhere)",
              "latency: steps per second", default=False, backends=("cpp", "triton"))
      for mode in ("train", "infer")),
)}
DEFAULT_HOT_PATHS = [name for name, hp in HOT_PATHS.items() if hp.default]


# --------------------------------------------------------------------------------------------
# Backends, machine, ceilings
# --------------------------------------------------------------------------------------------

def fastml_backends(ops: tuple[str, ...], device: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(fastml backends to time on ``device`` for a hot path running on the fastml.ops packages
    ``ops``, [(backend, why not), ...])."""
    present, missing = [], []
    for name in (CUDA_BACKENDS if device == "cuda" else CPU_BACKENDS):
        st = _backend.status(name)
        if not st.present:
            missing.append((name, st.reason))
            continue
        if name == "triton" and _backend.triton_interpreted():
            missing.append((name, "TRITON_INTERPRET=1 is set: the Triton interpreter is never timed"))
            continue
        why = None
        for op in ops:
            try:
                _backend.load(f"fastml.ops.{op}", name)
            except Exception as exc:  # absent, or a module still being written
                why = f"fastml.ops.{op} has no {name} kernels ({type(exc).__name__}: {exc})"
                break
        if why:
            missing.append((name, why))
        else:
            present.append(name)
    return present, missing


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine() -> dict:
    def version(mod):
        try:
            return __import__(mod).__version__
        except Exception:
            return None

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fastml": fastml.__version__,
        "numba": version("numba"),
        "triton": version("triton") if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        # Other processes' CPU load at the start: OpenMP pools (torch's, fastml's) slow down
        # sharply when another process takes a core, so a busy machine gives noisy numbers.
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def short_name(desc: dict) -> str:
    """A file-name-friendly machine name: 'amd-epyc-2c'."""
    words = [w for w in desc["cpu_model"].lower().replace("(r)", "").replace("(tm)", "").split()
             if w not in ("processor", "cpu", "@")][:3]
    name = "-".join("".join(c for c in w if c.isalnum()) for w in words).strip("-") or "cpu"
    return f"{name}-{desc['cpu_cores']}c"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sample_seconds(fn, number: int, device: torch.device) -> float:
    """Seconds for ``number`` calls of ``fn``, the device's queue drained before and after."""
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return time.perf_counter() - t0


def _best_seconds(fn, device: torch.device, reps: int, min_sample_s: float) -> float:
    """Fastest time per call over ``reps`` samples of at least ``min_sample_s`` each (after a warm call)."""
    fn()
    once = _sample_seconds(fn, 1, device)
    number = max(1, math.ceil(min_sample_s / max(once, 1e-7)))
    return min(_sample_seconds(fn, number, device) / number for _ in range(reps))


def measure_ceilings(device: torch.device, sizes: str) -> dict:
    """The machine's ceilings, best of a few samples: copy bandwidth (bytes read + written by
    ``dst.copy_(src)``, a tensor far larger than the caches) and float32 ``torch.mm`` throughput."""
    tiny = sizes == "tiny"
    if device.type == "cuda":
        copy_elems, mm_n = (1 << 22 if tiny else 1 << 28), (512 if tiny else 8192)
    else:
        copy_elems, mm_n = (1 << 22 if tiny else 1 << 26), (256 if tiny else 2048)
    reps, min_sample_s = (3, 0.002) if tiny else (5, 0.05)
    src = torch.empty(copy_elems, device=device).uniform_()
    dst = torch.empty_like(src)
    copy_s = _best_seconds(lambda: dst.copy_(src), device, reps, min_sample_s)
    del src, dst
    a = torch.randn(mm_n, mm_n, device=device)
    b = torch.randn(mm_n, mm_n, device=device)
    mm_s = _best_seconds(lambda: torch.mm(a, b), device, reps, min_sample_s)
    del a, b
    copy_bytes = 2 * copy_elems * FLOAT_BYTES
    return {"copy_GBps": copy_bytes / copy_s / 1e9, "copy_bytes": copy_bytes,
            "matmul_GFLOPps": 2 * mm_n ** 3 / mm_s / 1e9, "matmul_n": mm_n, "matmul_dtype": "float32",
            "method": f"best of {reps} samples: dst.copy_(src) of {copy_bytes // 2 >> 20} MiB counting read + "
                      f"write bytes; torch.mm of two {mm_n}x{mm_n} float32 matrices (torch's default settings)"}


# --------------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------------

AUTO = "auto"  # fastml as a user gets it: the measured choice between its kernels and torch's


def _context(impl: str):
    return contextlib.nullcontext() if impl.startswith("torch") or impl == AUTO else fastml.use_backend(impl)


def _auto_runs(decisions) -> str:
    """What the auto row ran, from the decisions its first call made: "torch", a backend, or
    "op phase: choice" for each (op, phase) where they differ."""
    runs = {}
    for key, decision in decisions:
        runs[(key[0], key[1])] = _tune.label(key[0], decision.choice)
    kinds = set(runs.values())
    if len(kinds) <= 1:
        return next(iter(kinds), "torch")
    return ", ".join(f"{op} {phase}: {how}" for (op, phase), how in runs.items())


def _time_case(fns: dict, device: torch.device, repeat: int, min_sample_s: float) -> dict:
    """Interleaved timing: {impl: [seconds per call, one per repeat]}."""
    numbers = {}
    for impl, fn in fns.items():
        with _context(impl):
            fn()
            fn()  # warm: JIT compiles, autotuning, allocator caches
            once = _sample_seconds(fn, 1, device)
        numbers[impl] = max(1, min(100_000, math.ceil(min_sample_s / max(once, 1e-7))))
    samples = {impl: [] for impl in fns}
    order = list(fns)
    for r in range(repeat):
        for impl in order[r % len(order):] + order[:r % len(order)]:  # rotate: no impl always first
            with _context(impl):
                samples[impl].append(_sample_seconds(fns[impl], numbers[impl], device) / numbers[impl])
    return samples


def run(ops=None, devices=("cpu",), repeat: int = 15, sizes: str = "quick", progress=sys.stderr,
        forced: bool = True) -> dict:
    """Measure ceilings and every hot path in ``ops`` (default: all) on ``devices``. ``forced``:
    also time each fastml backend forced (else torch and the measured choice only: on a CPU whose
    kernels are slow for the zoo's shapes, the forced rows take most of the run).

    Returns the report (what the JSON file holds).
    """
    ops = list(ops or DEFAULT_HOT_PATHS)
    min_sample_s = 0.0005 if sizes == "tiny" else 0.005
    report = {
        "format": "fastml-bench/1",
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "backends": {k: {"present": v.present, "detail": v.reason} for k, v in _backend.info().items()},
        "settings": {"ops": ops, "devices": list(devices), "repeat": repeat, "sizes": sizes,
                     "min_sample_ms": min_sample_s * 1e3, "statistic": "median", "dtype": "float32"},
        "hot_paths": {name: {"description": HOT_PATHS[name].description, "byte_model": HOT_PATHS[name].byte_model}
                      for name in ops},
        "ceilings": {},
        "rows": [],
        "skipped": [],
    }

    def say(msg):
        if progress is not None:
            print(msg, file=progress, flush=True)

    plan = []
    for dev_name in devices:
        device = torch.device(dev_name)
        for name in ops:
            hp = HOT_PATHS[name]
            why = hp.requires()
            if why:
                report["skipped"].append({"device": dev_name, "op": name, "backend": None, "reason": why})
                continue
            backends, missing = fastml_backends(hp.ops, dev_name)
            if hp.backends is not None:
                missing += [(b, f"not timed for {name}: minutes per case") for b in backends if b not in hp.backends]
                backends = [b for b in backends if b in hp.backends]
            if not forced:
                missing += [(b, "not timed: --auto-only") for b in backends]
                backends = []
            for backend, reason in missing:
                report["skipped"].append({"device": dev_name, "op": name, "backend": backend, "reason": reason})
            plan += [(device, hp, case, backends) for case in hp.cases(device, sizes)]

    started = time.perf_counter()
    for dev_name in devices:
        say(f"[fastml bench] measuring the {dev_name} ceilings (copy bandwidth, matmul) ...")
        report["ceilings"][dev_name] = measure_ceilings(torch.device(dev_name), sizes)

    for i, (device, hp, case, backends) in enumerate(plan, 1):
        done = 20 * (i - 1) // len(plan)  # a bar of 20 cells: the share of cases already timed
        say(f"[{'#' * done}{'.' * (20 - done)}] {i}/{len(plan)} {device.type} {hp.name} {case.label}: "
            f"torch{''.join(' ' + b for b in backends)}  ({time.perf_counter() - started:.0f}s)")
        gc.collect()
        make = case.prepare(device)
        fns, auto_runs = {}, None
        for impl in ["torch", *hp.torch_impls, AUTO, *backends]:
            try:
                with _context(impl), _tune.recording() as decisions:
                    fns[impl] = make(impl)
                    fns[impl]()  # a first call: an implementation that fails is reported, not timed
                if impl == AUTO:  # the first call made the measured choices: say what they were
                    auto_runs = _auto_runs(decisions)
            except Exception as exc:
                if impl.startswith("torch"):
                    raise
                report["skipped"].append({"device": device.type, "op": hp.name, "backend": impl,
                                          "case": case.label, "reason": f"failed: {type(exc).__name__}: {exc}"})
                fns.pop(impl, None)
        samples = _time_case(fns, device, repeat, min_sample_s)
        torch_median = statistics.median(samples["torch"])
        ceil = report["ceilings"][device.type]
        for impl, times in samples.items():
            median = statistics.median(times)
            gbps = case.bytes / median / 1e9
            gflops = case.flops / median / 1e9
            if case.bound == "memory":
                unit, throughput, share = "GB/s", gbps, gbps / ceil["copy_GBps"]
            elif case.bound == "compute":
                unit, throughput, share = "GFLOP/s", gflops, gflops / ceil["matmul_GFLOPps"]
            else:
                unit, throughput, share = "steps/s", case.steps / median, None
            report["rows"].append({
                "device": device.type, "op": hp.name, "case": case.label, "params": case.params,
                "impl": impl, "kind": "torch" if impl.startswith("torch") else "fastml",
                "time_ms": median * 1e3, "time_ms_min": min(times) * 1e3, "repeats": len(times),
                "speedup": torch_median / median, "unit": unit, "throughput": throughput,
                "ceiling_share": share, "bound": case.bound, "bytes": case.bytes, "flops": case.flops,
                "steps": case.steps, "GBps": gbps, "GFLOPps": gflops,
                **({"runs": auto_runs} if impl == AUTO else {}),
            })
        del make, fns
    report["elapsed_s"] = time.perf_counter() - started
    return report


# --------------------------------------------------------------------------------------------
# Output: table, JSON, chart
# --------------------------------------------------------------------------------------------

def _fmt_time(ms: float) -> str:
    if ms < 1:
        return f"{ms * 1e3:.1f} us"
    if ms < 1000:
        return f"{ms:.2f} ms"
    return f"{ms / 1e3:.2f} s"


def _fmt_throughput(value: float, unit: str) -> str:
    if unit == "steps/s" and value >= 1000:
        return f"{value / 1e3:.1f} k{unit}"
    return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"


def format_report(report: dict) -> str:
    m = report["machine"]
    lines = [f"fastml {m['fastml']} bench: {m['cpu_model']} ({m['cpu_cores']} cores, "
             f"{m['torch_threads']} torch threads), GPU: {m['gpu'] or 'none'}, torch {m['torch']}"]
    load, cores = m.get("load_average_1min"), m.get("cpu_cores_usable") or m["cpu_cores"]
    if load is not None and load >= max(1.0, 0.5 * cores):
        lines.append(f"warning: the machine was busy (load average {load:.1f} on {cores} cores at the start): "
                     "CPU timings are noisy; run again when it is idle")
    for dev, c in report["ceilings"].items():
        lines.append(f"ceiling {dev}: copy {c['copy_GBps']:.1f} GB/s, float32 matmul {c['matmul_GFLOPps']:.0f} GFLOP/s")
    header = ("device", "op", "case", "impl", "time", "vs torch", "achieved", "of ceiling")
    table = [header]
    for r in report["rows"]:
        share = "-" if r["ceiling_share"] is None else f"{100 * r['ceiling_share']:.0f}%"
        runs = r.get("runs")
        impl = f"{r['impl']} ({'mixed' if runs and ':' in runs else runs})" if runs else r["impl"]
        table.append((r["device"], r["op"], r["case"], impl, _fmt_time(r["time_ms"]),
                      f"{r['speedup']:.2f}x", _fmt_throughput(r["throughput"], r["unit"]), share))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    right = {4, 5, 6, 7}
    prev = None
    for row in table:
        key = row[:3]
        if prev is not None and key != prev and row is not header:
            lines.append("")
        prev = key if row is not header else None
        lines.append("  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
    for r in report["rows"]:
        if r.get("runs") and ":" in r["runs"]:
            lines.append(f"auto (mixed), {r['device']} {r['op']} {r['case']}: {r['runs']}")
    for s in report["skipped"]:
        where = f"{s['device']} {s['op']}" + (f" [{s['backend']}]" if s.get("backend") else "")
        lines.append(f"skipped {where}: {s['reason']}")
    return "\n".join(lines)


def write_json(report: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "fastml-bench.json"
    path.write_text(json.dumps(report, indent=2))
    return path


def draw_chart(report: dict, out_dir: Path) -> tuple[Path | None, str | None]:
    """Speed-up over torch per case and backend, one panel per device: (path, None) or (None, why not)."""
    from fastml.training import MissingDependencyError, figure, save_figure

    devices = [d for d in report["settings"]["devices"] if any(r["device"] == d for r in report["rows"])]
    if not devices:
        return None, "no rows to draw"
    # Horizontal bars, a row per case: the labels (op and size) stay readable however many cases.
    most = max(len({(r["op"], r["case"]) for r in report["rows"] if r["device"] == d}) for d in devices)
    try:
        fig = figure(figsize=(7.5 * len(devices), 1.5 + 0.42 * most))
    except MissingDependencyError as exc:
        return None, str(exc)
    axes = fig.subplots(1, len(devices), squeeze=False)[0]
    speedups = [r["speedup"] for r in report["rows"]]
    colors = {AUTO: "tab:red", "cpp": "tab:blue", "numba": "tab:orange", "triton": "tab:green",
              "torch-foreach": "0.75", "torch-fused": "0.5"}
    for ax, dev in zip(axes, devices):
        rows = [r for r in report["rows"] if r["device"] == dev]
        cases = list(dict.fromkeys((r["op"], r["case"]) for r in rows))
        impls = list(dict.fromkeys(r["impl"] for r in rows if r["impl"] != "torch"))
        height = 0.8 / max(1, len(impls))
        for j, impl in enumerate(impls):
            ys, xs = [], []
            for i, key in enumerate(cases):
                hit = [r for r in rows if (r["op"], r["case"]) == key and r["impl"] == impl]
                if hit:
                    ys.append(i + (j - (len(impls) - 1) / 2) * height)
                    xs.append(hit[0]["speedup"])
            bars = ax.barh(ys, xs, height, label=impl, color=colors.get(impl))
            ax.bar_label(bars, labels=[f"{x:.2f}x" if x < 10 else f"{x:.0f}x" for x in xs], fontsize=6, padding=2)
        ax.axvline(1.0, color="black", linewidth=1, linestyle="--", label="torch")
        ax.set_xscale("log")
        ax.set_xlim(min(0.5, min(speedups) / 1.5), max(2.0, max(speedups) * 2.5))
        ax.set_yticks(range(len(cases)))
        ax.set_yticklabels([f"{op}  {case}" for op, case in cases], fontsize=7)
        ax.invert_yaxis()  # the first case at the top, as in the table
        name = report["machine"]["gpu"] if dev == "cuda" else report["machine"]["cpu_model"]
        ax.set_title(f"{dev}: {name}", fontsize=9)
        ax.set_xlabel("speed-up over PyTorch (median, higher is better)")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"fastml {report['machine']['fastml']} vs torch {report['machine']['torch']}", fontsize=10)
    return save_figure(fig, out_dir / "fastml-bench.png"), None


# --------------------------------------------------------------------------------------------
# Comparing two saved profiles
# --------------------------------------------------------------------------------------------

class ReportError(ValueError):
    """A file given to --compare is not a fastml bench JSON."""


def load_report(path: Path) -> dict:
    """A profile written by write_json, checked enough to compare."""
    try:
        report = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ReportError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ReportError(f"{path} is not JSON: {exc}") from None
    if not isinstance(report, dict) or not str(report.get("format", "")).startswith("fastml-bench/") or not isinstance(
            report.get("rows"), list):
        raise ReportError(f"{path} is not a fastml bench profile (no 'format': 'fastml-bench/...' and 'rows')")
    return report


def compare_reports(a: dict, b: dict, a_name: str = "A", b_name: str = "B") -> str:
    """A table of the rows two profiles share (same device, op, case and implementation): each
    one's time, and B's speed relative to A (A's time / B's time: above 1, B is faster). Rows
    only one profile has are counted at the end."""
    def key(row):
        return row["device"], row["op"], row["case"], row["impl"]

    rows_a, rows_b = {key(r): r for r in a["rows"]}, {key(r): r for r in b["rows"]}
    shared = [k for k in rows_a if k in rows_b]
    header = (f"{a_name}: {short_name(a.get('machine', {}))}, fastml {a.get('machine', {}).get('fastml')}, "
              f"{a.get('created', '?')}\n"
              f"{b_name}: {short_name(b.get('machine', {}))}, fastml {b.get('machine', {}).get('fastml')}, "
              f"{b.get('created', '?')}")
    cols = ("device", "op", "case", "impl", f"time {a_name}", f"time {b_name}", f"{b_name} vs {a_name}")
    table = [cols]
    for k in shared:
        ta, tb = rows_a[k]["time_ms"], rows_b[k]["time_ms"]
        table.append((*k, _fmt_time(ta), _fmt_time(tb), f"{ta / tb:.2f}x" if tb > 0 else "-"))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(cols))]
    lines = [header, ""] + ["  ".join(str(v).ljust(w) if i < 4 else str(v).rjust(w)
                                      for i, (v, w) in enumerate(zip(row, widths))) for row in table if shared]
    only_a, only_b = len(rows_a) - len(shared), len(rows_b) - len(shared)
    if only_a or only_b:
        lines.append(f"\nnot compared: {only_a} row(s) only in {a_name}, {only_b} only in {b_name}")
    if not shared:
        lines.append("no rows in common: the profiles timed different ops, cases or implementations")
    return "\n".join(lines)

