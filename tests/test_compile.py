"""torch.compile and torch.library: every fastml op is a ``fastml::<op>`` custom op (fastml/_library.py).

- torch.library.opcheck on each forward and backward op (schema, autograd registration, the fake
  against the real implementation, AOT dispatch with dynamic shapes): fresh random inputs of odd
  sizes, non-contiguous inputs, empty batches, float32 and float64; the fakes against every backend.
- torch.compile(fullgraph=True) on each fastml.nn module, functional op and optimizer: the graphs
  call fastml's ops, forward and backward, and outputs, gradients and updates match eager
  fastml's, at two batch sizes (the second compiles with dynamic shapes). backend="aot_eager"
  (AOT autograd, no code generation) for the matrix; inductor for LeNet.
- Eager calls keep their autograd.Functions; the backend is chosen when the graph runs; errors
  under compile are eager's where dynamo lets them through.
- On a torch without torch.library.custom_op nothing is registered and compiled calls run torch's ops.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from conftest import assert_close, rand

import fastml
from fastml import functional as F
from fastml import nn
from fastml.ops import LIBRARY

pytestmark = pytest.mark.skipif(not LIBRARY, reason="torch < 2.4 has no torch.library.custom_op")

DTYPES = [torch.float32, torch.float64]


class Recorder:
    """A torch.compile backend: aot_eager (AOT autograd, graphs run as they are) that keeps the
    dynamo graph and AOT's forward and backward graphs, to tell which fastml ops they call."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        self.graphs.append(gm)

        def keep(graph, _):
            self.graphs.append(graph)
            return make_boxed_func(graph.forward)

        return aot_autograd(fw_compiler=keep, bw_compiler=keep)(gm, example_inputs)

    def fastml_ops(self) -> set[str]:
        """Names of the fastml ops called (functionalized mutating ops name theirs as an argument)."""
        found = set()
        for graph in self.graphs:
            for node in graph.graph.nodes:
                for target in (node.target, *node.args, *node.kwargs.values()):
                    name = str(target)
                    if name.startswith("fastml."):
                        found.add(name.split(".")[1])
        return found


def compiled(fn, backend=None):
    torch._dynamo.reset()  # a fresh cache: each case compiles from scratch, within the recompile limit
    return torch.compile(fn, fullgraph=True, backend=backend or Recorder())


# ---------------------------------------------------------------------------------------------
# opcheck: every custom op, forward and backward

def _ints(*shape, high, g):
    return torch.randint(0, high, shape, generator=g)


def _probs(*shape, dtype, g):
    return rand(*shape, dtype=torch.float64, generator=g).softmax(-1).to(dtype)


def _sgd_args(dtype, g):
    params, grads, bufs = ([rand(*s, dtype=dtype, generator=g) for s in ((3, 5), (7,), ())] for _ in range(3))
    return params, grads, bufs, [True, False, False], 0.1, 0.9, 0.0, 0.01, True, False, True


def _adam_args(dtype, g):
    params, grads, avgs = ([rand(*s, dtype=dtype, generator=g) for s in ((3, 5), (7,))] for _ in range(3))
    sqs, maxes = ([rand(*s, dtype=dtype, generator=g).abs() for s in ((3, 5), (7,))] for _ in range(2))
    steps = [torch.tensor(3.0), torch.tensor(1.0)]
    return params, grads, avgs, sqs, maxes, steps, 1e-3, 0.9, 0.999, 1e-8, 0.01, True, True, False, False


def _opcheck_cases():
    """id → (op, args builder (dtype, generator, requires_grad) → args). Floating inputs require
    grad where the op has autograd, so opcheck also runs its backward; a "mean" over an empty batch
    is NaN, which opcheck's comparison counts as a difference, so empty batches use "sum"."""
    ops = torch.ops.fastml

    def r(*shape, dtype, g, grad=False):
        return rand(*shape, dtype=dtype, generator=g, requires_grad=grad)

    return {
        "linear": (ops.linear, lambda d, g: (r(7, 13, dtype=d, g=g, grad=True), r(5, 13, dtype=d, g=g, grad=True),
                                             r(5, dtype=d, g=g, grad=True))),
        "linear-noncontiguous-nobias": (ops.linear, lambda d, g: (r(13, 7, dtype=d, g=g, grad=True).T,
                                                                  r(13, 5, dtype=d, g=g, grad=True).T, None)),
        "linear-empty": (ops.linear, lambda d, g: (r(0, 13, dtype=d, g=g, grad=True),
                                                   r(5, 13, dtype=d, g=g, grad=True), r(5, dtype=d, g=g, grad=True))),
        "linear_backward": (ops.linear_backward, lambda d, g: (r(7, 5, dtype=d, g=g), r(7, 13, dtype=d, g=g),
                                                               r(5, 13, dtype=d, g=g), True, True, True)),
        "linear_backward-some": (ops.linear_backward, lambda d, g: (r(7, 5, dtype=d, g=g), r(7, 13, dtype=d, g=g),
                                                                    r(5, 13, dtype=d, g=g), False, True, False)),
        "linear_mse-mean": (ops.linear_mse, lambda d, g: (
            r(7, 13, dtype=d, g=g, grad=True), r(3, 13, dtype=d, g=g, grad=True), r(3, dtype=d, g=g, grad=True),
            r(7, 3, dtype=d, g=g, grad=True), "mean", True, True, True)),
        "linear_mse-none-noncontiguous": (ops.linear_mse, lambda d, g: (
            r(13, 7, dtype=d, g=g, grad=True).T, r(3, 13, dtype=d, g=g, grad=True), None,
            r(3, 7, dtype=d, g=g, grad=True).T, "none", True, False, True)),
        "linear_mse-sum-weights-only": (ops.linear_mse, lambda d, g: (
            r(7, 13, dtype=d, g=g), r(3, 13, dtype=d, g=g, grad=True), r(3, dtype=d, g=g, grad=True),
            r(7, 3, dtype=d, g=g), "sum", True, True, False)),
        "linear_mse-sum-empty": (ops.linear_mse, lambda d, g: (
            r(0, 13, dtype=d, g=g, grad=True), r(3, 13, dtype=d, g=g, grad=True), r(3, dtype=d, g=g, grad=True),
            r(0, 3, dtype=d, g=g, grad=True), "sum", True, True, True)),
        "mse_loss-mean": (ops.mse_loss, lambda d, g: (r(7, 3, 5, dtype=d, g=g, grad=True),
                                                      r(7, 3, 5, dtype=d, g=g, grad=True), "mean", True)),
        "mse_loss-none-noncontiguous": (ops.mse_loss, lambda d, g: (r(5, 7, dtype=d, g=g, grad=True).T,
                                                                    r(7, 5, dtype=d, g=g, grad=True), "none", True)),
        "mse_loss-sum-empty": (ops.mse_loss, lambda d, g: (r(0, 5, dtype=d, g=g, grad=True),
                                                           r(0, 5, dtype=d, g=g), "sum", True)),
        "mse_loss_backward": (ops.mse_loss_backward, lambda d, g: (r(7, 5, dtype=d, g=g), r(7, 5, dtype=d, g=g),
                                                                   "none")),
        "cdist-2": (ops.cdist, lambda d, g: (r(2, 7, 5, dtype=d, g=g, grad=True), r(2, 11, 5, dtype=d, g=g, grad=True),
                                             2.0)),
        "cdist-1-noncontiguous": (ops.cdist, lambda d, g: (r(2, 5, 7, dtype=d, g=g, grad=True).transpose(1, 2),
                                                           r(2, 11, 5, dtype=d, g=g, grad=True), 1.0)),
        "cdist-inf": (ops.cdist, lambda d, g: (r(1, 7, 3, dtype=d, g=g, grad=True), r(1, 5, 3, dtype=d, g=g, grad=True),
                                               float("inf"))),
        "knn": (ops.knn, lambda d, g: (r(2, 7, 5, dtype=d, g=g), r(2, 13, 5, dtype=d, g=g), 3, 2.0, True)),
        "knn-reference-p3": (ops.knn, lambda d, g: (r(1, 7, 5, dtype=d, g=g), r(1, 13, 5, dtype=d, g=g), 13, 3.0,
                                                    False)),
        "max_pool2d": (ops.max_pool2d, lambda d, g: (r(2, 3, 11, 9, dtype=d, g=g, grad=True), [3, 3], [2, 2], [1, 1],
                                                     [1, 1], True)),
        "max_pool2d-dilated-channels_last": (ops.max_pool2d, lambda d, g: (
            r(2, 3, 9, 10, dtype=d, g=g).contiguous(memory_format=torch.channels_last).requires_grad_(), [2, 3],
            [1, 2], [0, 1], [2, 1], False)),
        "max_pool2d_backward": (ops.max_pool2d_backward, lambda d, g: (r(2, 3, 5, 4, dtype=d, g=g),
                                                                       _ints(2, 3, 5, 4, high=99, g=g), 11, 9)),
        "batch_norm-relu": (ops.batch_norm, lambda d, g: (
            r(3, 5, 7, 6, dtype=d, g=g, grad=True), r(5, dtype=d, g=g, grad=True), r(5, dtype=d, g=g, grad=True),
            1e-5, True)),
        "batch_norm-channels_last-no-affine": (ops.batch_norm, lambda d, g: (
            r(2, 7, 5, 3, dtype=d, g=g).contiguous(memory_format=torch.channels_last).requires_grad_(), None, None,
            1e-3, False)),
        "batch_norm_backward": (ops.batch_norm_backward, lambda d, g: (
            r(3, 5, 4, 6, dtype=d, g=g), r(3, 5, 4, 6, dtype=d, g=g), r(5, dtype=d, g=g), None,
            torch.stack((r(5, dtype=d, g=g), r(5, dtype=d, g=g).abs(), r(5, dtype=d, g=g).abs() + 0.5)), True)),
        "conv2d": (ops.conv2d, lambda d, g: (r(2, 3, 11, 9, dtype=d, g=g, grad=True),
                                             r(4, 3, 3, 3, dtype=d, g=g, grad=True), r(4, dtype=d, g=g, grad=True),
                                             [2, 1], [1, 1], [1, 1], 1)),
        "conv2d-groups-dilated-channels_last": (ops.conv2d, lambda d, g: (
            r(2, 4, 10, 9, dtype=d, g=g).contiguous(memory_format=torch.channels_last).requires_grad_(),
            r(6, 2, 2, 3, dtype=d, g=g, grad=True), None, [1, 1], [0, 2], [2, 1], 2)),
        "conv2d_backward": (ops.conv2d_backward, lambda d, g: (
            r(2, 4, 6, 9, dtype=d, g=g), r(2, 3, 11, 9, dtype=d, g=g), r(4, 3, 3, 3, dtype=d, g=g), [2, 1], [1, 1],
            [1, 1], 1, [True, False, True])),
        "conv2d_relu_max_pool2d": (ops.conv2d_relu_max_pool2d, lambda d, g: (
            r(2, 3, 12, 11, dtype=d, g=g, grad=True), r(5, 3, 3, 3, dtype=d, g=g, grad=True),
            r(5, dtype=d, g=g, grad=True), [1, 1], [1, 1], [1, 1], 1, [2, 2], [2, 2])),
        "conv2d_relu_max_pool2d-overlapping": (ops.conv2d_relu_max_pool2d, lambda d, g: (
            r(3, 4, 11, 13, dtype=d, g=g, grad=True), r(6, 2, 3, 2, dtype=d, g=g, grad=True), None, [1, 2], [0, 1],
            [1, 1], 2, [3, 2], [2, 1])),
        "conv2d_relu_max_pool2d_backward": (ops.conv2d_relu_max_pool2d_backward, lambda d, g: (
            r(2, 5, 6, 5, dtype=d, g=g), (_ints(2, 5, 6, 5, high=5, g=g) - 1).to(torch.int8),
            r(2, 3, 12, 11, dtype=d, g=g), r(5, 3, 3, 3, dtype=d, g=g),
            [1, 1], [1, 1], [1, 1], 1, [2, 2], [2, 2], [True, True, True])),
        "cross_entropy-mean": (ops.cross_entropy, lambda d, g: (
            r(11, 7, dtype=d, g=g, grad=True), _ints(11, high=7, g=g), None, -100, 0.0, "mean", True)),
        "cross_entropy-weighted-ignored-smoothed-none": (ops.cross_entropy, lambda d, g: (
            r(11, 7, dtype=d, g=g, grad=True), _ints(11, high=7, g=g), r(7, dtype=d, g=g).abs(), 2, 0.1, "none",
            False)),
        "cross_entropy-probs-noncontiguous": (ops.cross_entropy, lambda d, g: (
            r(7, 11, dtype=d, g=g, grad=True).T, _probs(11, 7, dtype=d, g=g).requires_grad_(), None, -100, 0.2, "mean",
            True)),
        "cross_entropy-sum-empty": (ops.cross_entropy, lambda d, g: (
            r(0, 7, dtype=d, g=g, grad=True), _ints(0, high=7, g=g), None, -100, 0.0, "sum", True)),
        "cross_entropy_backward": (ops.cross_entropy_backward, lambda d, g: (
            r(11, 7, dtype=d, g=g), _ints(11, high=7, g=g), r(7, dtype=d, g=g).abs(), -100, 0.1, r(11, dtype=d, g=g))),
        "linear_cross_entropy-mean": (ops.linear_cross_entropy, lambda d, g: (
            r(11, 13, dtype=d, g=g, grad=True), r(7, 13, dtype=d, g=g, grad=True), r(7, dtype=d, g=g, grad=True),
            _ints(11, high=7, g=g), None, -100, 0.0, "mean", True, True, True)),
        "linear_cross_entropy-probs-none": (ops.linear_cross_entropy, lambda d, g: (
            r(11, 13, dtype=d, g=g, grad=True), r(7, 13, dtype=d, g=g, grad=True), None, _probs(11, 7, dtype=d, g=g),
            r(7, dtype=d, g=g).abs(), -100, 0.1, "none", True, True, False)),
        "linear_cross_entropy_backward": (ops.linear_cross_entropy_backward, lambda d, g: (
            r(11, 13, dtype=d, g=g), r(7, 13, dtype=d, g=g), r(7, dtype=d, g=g), _ints(11, high=7, g=g), None, 3, 0.0,
            r(11, dtype=d, g=g), True, False, True)),
        "sgd_step": (ops.sgd_step, _sgd_args),
        "sgd_course_step": (ops.sgd_course_step, lambda d, g: ([rand(3, 5, dtype=d, generator=g)],
                                                               [rand(3, 5, dtype=d, generator=g)], 0.1, 7.0)),
        "adam_step": (ops.adam_step, _adam_args),
    }


OPCHECK_CASES = _opcheck_cases() if LIBRARY else {}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_opcheck(case, dtype, rng):
    op, make_args = OPCHECK_CASES[case]
    torch.library.opcheck(op, make_args(dtype, rng))


def test_every_op_has_an_opcheck_case():
    ops = {name for name in dir(torch.ops.fastml) if isinstance(getattr(torch.ops.fastml, name),
                                                                   torch._ops.OpOverloadPacket)}
    checked = {str(op).split(".")[1] for op, _ in OPCHECK_CASES.values()}
    assert ops == checked


def _to(device, value):
    """An argument on ``device``, layout and requires_grad kept (lists of tensors too)."""
    if isinstance(value, list):
        return [_to(device, v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.detach().to(device).requires_grad_(value.requires_grad)
    return value


# Its Triton cases (seconds each on the interpreter) repeat what the kernels' own tests run: long there.
@pytest.mark.interpreter_long()
@pytest.mark.parametrize("case", [c for c in OPCHECK_CASES if not c.startswith(("sgd", "adam"))])
def test_fakes_match_every_backend(case, backend, rng):
    """The implementation picks the backend when it runs: each backend's outputs have the fake's
    shapes, dtypes and strides."""
    op, make_args = OPCHECK_CASES[case]
    args = [_to(backend.device, a) for a in make_args(torch.float32, rng)]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): every module and functional op against eager fastml

def _run(fn, inputs, params, upstream=None):
    """fn's outputs and the gradients of the inputs and params that require one, after
    backpropagating ``upstream`` (fresh random values, made here when None) through the floating
    outputs; the inputs are cloned, so eager and compiled runs do not share gradients."""
    inputs = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
              for t in inputs]
    for p in params:
        p.grad = None
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    differentiable = [o for o in outs if o.requires_grad]
    if upstream is None:
        upstream = [torch.randn_like(o) for o in differentiable]
    if differentiable:
        torch.autograd.backward(differentiable, upstream)
    leaves = [t for t in (*inputs, *params) if isinstance(t, torch.Tensor) and t.requires_grad]
    return outs, [t.grad for t in leaves], upstream


def check_compiled(fn, make_inputs, expected_ops, params=(), batches=(7, 5)):
    """Compiles fn with fullgraph=True, runs it at each batch size against eager fastml, and
    checks that its graphs call ``expected_ops`` (forward and backward)."""
    recorder = Recorder()
    fast = compiled(fn, recorder)
    for n in batches:
        inputs = make_inputs(n)
        expected, expected_grads, upstream = _run(fn, inputs, params)
        got, got_grads, _ = _run(fast, inputs, params, upstream)
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            assert a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride()
            if a.is_floating_point():
                assert_close(a, b)
            else:
                assert torch.equal(a, b)
        assert len(got_grads) == len(expected_grads)
        for a, b in zip(got_grads, expected_grads):
            assert a is not None and b is not None
            assert_close(a, b)
    assert set(expected_ops) <= recorder.fastml_ops()


def _module_cases():
    """id → (module factory, inputs(n, dtype, generator), fastml ops the graphs must call)."""
    def r(*shape, dtype, g, grad=True):
        return rand(*shape, dtype=dtype, generator=g, requires_grad=grad)

    def classes(n, g, c=7):
        return torch.randint(0, c, (n,), generator=g)

    return {
        "Linear": (lambda: nn.Linear(13, 5), lambda n, d, g: [r(n, 13, dtype=d, g=g)], {"linear", "linear_backward"}),
        "Linear-3d-nobias": (lambda: nn.Linear(13, 5, bias=False), lambda n, d, g: [r(2, n, 13, dtype=d, g=g)],
                             {"linear", "linear_backward"}),
        "Linear-noncontiguous": (lambda: nn.Linear(13, 5), lambda n, d, g: [r(13, n, dtype=d, g=g).T],
                                 {"linear", "linear_backward"}),
        **{f"LinearMSELoss-{red}": (lambda red=red: nn.LinearMSELoss(13, 3, reduction=red),
                                    lambda n, d, g: [r(n, 13, dtype=d, g=g), r(n, 3, dtype=d, g=g)],
                                    {"linear_mse", "linear_backward"}) for red in ("mean", "sum", "none")},
        "LinearMSELoss-parameters-only": (lambda: nn.LinearMSELoss(13, 3),
                                          lambda n, d, g: [r(n, 13, dtype=d, g=g, grad=False),
                                                           r(n, 3, dtype=d, g=g, grad=False)], {"linear_mse"}),
        **{f"MSELoss-{red}": (lambda red=red: nn.MSELoss(reduction=red),
                              lambda n, d, g: [r(n, 3, 5, dtype=d, g=g), r(n, 3, 5, dtype=d, g=g)],
                              {"mse_loss", "mse_loss_backward"}) for red in ("mean", "none")},
        "BatchNorm2d": (lambda: nn.BatchNorm2d(5), lambda n, d, g: [r(n, 5, 6, 7, dtype=d, g=g)],
                        {"batch_norm", "batch_norm_backward"}),
        "BatchNorm2d-channels_last-cumulative": (lambda: nn.BatchNorm2d(4, momentum=None, affine=False),
                                                 lambda n, d, g: [r(n, 4, 5, 3, dtype=d, g=g, grad=False).contiguous(
                                                     memory_format=torch.channels_last).requires_grad_()],
                                                 {"batch_norm", "batch_norm_backward"}),
        "Conv2d": (lambda: nn.Conv2d(3, 4, 3, stride=(2, 1), padding=1),
                   lambda n, d, g: [r(n, 3, 11, 9, dtype=d, g=g)], {"conv2d", "conv2d_backward"}),
        # (an even kernel length at an even dilation: "same" pads both sides alike, the kernels' case)
        "Conv2d-groups-same-dilated": (lambda: nn.Conv2d(4, 6, (3, 2), padding="same", dilation=(1, 2), groups=2,
                                                         bias=False),
                                       lambda n, d, g: [r(n, 4, 10, 9, dtype=d, g=g)], {"conv2d", "conv2d_backward"}),
        # (uneven: torch's convolution, which pads a copy of the input)
        "Conv2d-uneven-same": (lambda: nn.Conv2d(4, 6, (2, 3), padding="same", dilation=(1, 2), groups=2, bias=False),
                               lambda n, d, g: [r(n, 4, 10, 9, dtype=d, g=g)], set()),
        "Conv2d-channels_last": (lambda: nn.Conv2d(3, 4, 3),
                                 lambda n, d, g: [r(n, 3, 9, 8, dtype=d, g=g, grad=False).contiguous(
                                     memory_format=torch.channels_last).requires_grad_()],
                                 {"conv2d", "conv2d_backward"}),
        "Conv2d-reflect": (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
                           lambda n, d, g: [r(n, 3, 9, 8, dtype=d, g=g)], {"conv2d", "conv2d_backward"}),
        "ConvReLUPool2d": (lambda: nn.ConvReLUPool2d(3, 5, 3, padding=1),
                           lambda n, d, g: [r(n, 3, 12, 10, dtype=d, g=g)],
                           {"conv2d_relu_max_pool2d", "conv2d_relu_max_pool2d_backward"}),
        "MaxPool2d-ceil-indices": (lambda: nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True, return_indices=True),
                                   lambda n, d, g: [r(n, 3, 11, 9, dtype=d, g=g)],
                                   {"max_pool2d", "max_pool2d_backward"}),
        "MaxPool2d-dilated-unbatched": (lambda: nn.MaxPool2d(2, dilation=2), lambda n, d, g: [r(n, 9, 8, dtype=d, g=g)],
                                        {"max_pool2d", "max_pool2d_backward"}),
        "CrossEntropyLoss": (lambda: nn.CrossEntropyLoss(), lambda n, d, g: [r(n, 7, dtype=d, g=g), classes(n, g)],
                             {"cross_entropy"}),
        "CrossEntropyLoss-weighted-ignored-smoothed-none": (
            lambda: nn.CrossEntropyLoss(weight=torch.rand(7) + 0.1, ignore_index=2, label_smoothing=0.1,
                                        reduction="none"),
            lambda n, d, g: [r(n, 7, dtype=d, g=g), classes(n, g)], {"cross_entropy", "cross_entropy_backward"}),
        "CrossEntropyLoss-probs": (lambda: nn.CrossEntropyLoss(label_smoothing=0.2),
                                   lambda n, d, g: [r(n, 7, dtype=d, g=g), _probs(n, 7, dtype=d, g=g).requires_grad_()],
                                   {"cross_entropy"}),
        "CrossEntropyLoss-2d": (lambda: nn.CrossEntropyLoss(),
                                lambda n, d, g: [r(n, 7, 3, 2, dtype=d, g=g),
                                                 torch.randint(0, 7, (n, 3, 2), generator=g)],
                                {"cross_entropy"}),
        **{f"LinearCrossEntropyLoss-{red}": (lambda red=red: nn.LinearCrossEntropyLoss(13, 7, bias=True, reduction=red),
                                             lambda n, d, g: [r(n, 13, dtype=d, g=g), classes(n, g)],
                                             {"linear_cross_entropy"} | ({"linear_cross_entropy_backward"}
                                                                         if red == "none" else set()))
           for red in ("mean", "none")},
    }


MODULE_CASES = _module_cases() if LIBRARY else {}


@pytest.mark.parametrize("dtype,case", [pytest.param(torch.float32, case, id=case) for case in MODULE_CASES]
                         + [pytest.param(torch.float64, case, id=f"{case}-float64")
                            for case in ("Linear", "LinearMSELoss-mean", "ConvReLUPool2d", "CrossEntropyLoss-probs")])
def test_compiled_module_matches_eager(case, dtype, rng):
    make_module, make_inputs, ops = MODULE_CASES[case]
    module = make_module().to(dtype)
    check_compiled(module, lambda n: make_inputs(n, dtype, rng), ops, params=list(module.parameters()))


@pytest.mark.parametrize("p", [2.0, 1.0, float("inf")])
def test_compiled_cdist(p, rng):
    check_compiled(lambda a, b: F.cdist(a, b, p),
                   lambda n: [rand(2, n, 5, generator=rng, requires_grad=True),
                              rand(2, 6, 5, generator=rng, requires_grad=True)], {"cdist"})


def test_compiled_knn(rng):
    """The kernels select the neighbours; gradients reach query and reference through their
    distances, recomputed in torch ops, as in eager."""
    check_compiled(lambda q, ref: F.knn(q, ref, 3),
                   lambda n: [rand(n, 5, generator=rng, requires_grad=True),
                              rand(11, 5, generator=rng, requires_grad=True)], {"knn"})


def test_compiled_empty_batch(rng):
    check_compiled(lambda x, w, y: (F.linear(x, w), F.linear_mse(x, w, None, y, "sum")),
                   lambda n: [rand(n, 13, generator=rng, requires_grad=True), rand(3, 13, generator=rng,
                                                                                requires_grad=True),
                              rand(n, 3, generator=rng)],
                   {"linear", "linear_mse"}, batches=(0,))


FALLBACKS = {
    # torch's op, which warns inside the graph (fastml's own warnings.warn would break it)
    "mse_loss-broadcast": (lambda a, b: F.mse_loss(a, b), lambda n, g: [rand(n, 5, generator=g, requires_grad=True),
                                                                        rand(5, generator=g)], set()),
    "linear-broadcast-bias": (lambda x, w, b: F.linear(x, w, b),
                              lambda n, g: [rand(n, 13, generator=g, requires_grad=True),
                                            rand(5, 13, generator=g, requires_grad=True),
                                            rand(1, 5, generator=g, requires_grad=True)], set()),
    # no CPU kernel for half types: torch's own op, as in eager (fastml's reference backend rounds
    # half types otherwise than torch's op does)
    "linear-bfloat16": (lambda x, w: F.linear(x, w),
                        lambda n, g: [rand(n, 13, dtype=torch.bfloat16, generator=g, requires_grad=True),
                                      rand(5, 13, dtype=torch.bfloat16, generator=g, requires_grad=True)], set()),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_configurations_without_kernels_compile_too(case, rng):
    fn, make_inputs, ops = FALLBACKS[case]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_compiled(fn, lambda n: make_inputs(n, rng), ops)
    if case == "mse_loss-broadcast":  # torch's warning, from the graph as in eager
        assert any("different to the input size" in str(w.message) for w in caught)


OPTIMIZERS = {
    "SGD": (lambda ps: fastml.optim.SGD(ps, lr=0.1), "sgd_step"),
    "SGD-momentum-nesterov-decay": (lambda ps: fastml.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True,
                                                                weight_decay=0.01), "sgd_step"),
    "Adam-amsgrad": (lambda ps: fastml.optim.Adam(ps, lr=0.01, amsgrad=True), "adam_step"),
    "AdamW-maximize": (lambda ps: fastml.optim.AdamW(ps, lr=0.01, maximize=True), "adam_step"),
}


@pytest.mark.parametrize("case", list(OPTIMIZERS))
def test_compiled_optimizer_step(case, rng):
    """opt.step compiled whole: one fastml::sgd_step / adam_step call, with the parameters and
    state as after eager steps (momentum buffers created inside the first compiled step)."""
    make, op = OPTIMIZERS[case]
    values = [rand(*s, generator=rng) for s in ((5, 13), (5,), (3, 5))]
    eager = [v.clone().requires_grad_() for v in values]
    traced = [v.clone().requires_grad_() for v in values]
    eager_opt, traced_opt = make(eager), make(traced)
    recorder = Recorder()
    step = compiled(traced_opt.step, recorder)
    for _ in range(3):
        for a, b in zip(eager, traced):
            a.grad = rand(*a.shape, generator=rng)
            b.grad = a.grad.clone()
        eager_opt.step()
        step()
    for a, b in zip(eager, traced):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        for key, value in eager_opt.state[a].items():
            torch.testing.assert_close(traced_opt.state[b][key], value, rtol=0, atol=0)
    assert op in recorder.fastml_ops()


def test_compiled_course_sgd_step(rng):
    values = [rand(5, 13, generator=rng), rand(5, generator=rng)]
    eager, traced = ([v.clone().requires_grad_() for v in values] for _ in range(2))
    for a, b in zip(eager, traced):
        a.grad = rand(*a.shape, generator=rng)
        b.grad = a.grad.clone()
    recorder = Recorder()
    compiled(lambda ps: fastml.optim.sgd_(ps, 0.1, 7), recorder)(traced)
    fastml.optim.sgd_(eager, 0.1, 7)
    for a, b in zip(eager, traced):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0)
    assert "sgd_course_step" in recorder.fastml_ops()


def lenet() -> torch.nn.Module:
    """The course's LeNet on 28 × 28 images, from fastml.nn's layers."""
    return torch.nn.Sequential(
        nn.ConvReLUPool2d(1, 6, 5, padding=2), nn.Conv2d(6, 16, 5), torch.nn.ReLU(), nn.MaxPool2d(2),
        torch.nn.Flatten(), nn.Linear(16 * 5 * 5, 120), torch.nn.ReLU(), nn.Linear(120, 84), torch.nn.ReLU(),
        nn.Linear(84, 10))


@pytest.mark.long  # inductor compiles the model: 4 s with its cache warm, 15 s on a fresh machine
def test_lenet_under_inductor(rng):
    """A real inductor compile (C++ code generation around fastml's ops): loss and gradients as
    eager's. ~20 s on 2 cores with a cold inductor cache."""
    model, loss_fn = lenet(), nn.CrossEntropyLoss()
    x, y = rand(13, 1, 28, 28, generator=rng), torch.randint(0, 10, (13,), generator=rng)
    params = list(model.parameters())
    (loss,), grads, _ = _run(lambda x, y: loss_fn(model(x), y), [x, y], params, [torch.tensor(1.0)])
    torch._dynamo.reset()
    fast = torch.compile(lambda x, y: loss_fn(model(x), y), fullgraph=True)
    (got,), got_grads, _ = _run(fast, [x, y], params, [torch.tensor(1.0)])
    assert_close(got, loss)
    for a, b in zip(got_grads, grads):
        assert_close(a, b)


def test_patched_torch_model_compiles_with_fullgraph(rng):
    """The issue's path: a model written with torch.nn only, then fastml.patch: one graph, with
    fastml's ops in it (fused block, linear, cross-entropy), loss and gradients as the unpatched
    torch model's."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 6, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Conv2d(6, 16, 5),
        torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(16 * 5 * 5, 84),
        torch.nn.Dropout(0.0), torch.nn.ReLU(), torch.nn.Linear(84, 10))
    loss_fn = torch.nn.CrossEntropyLoss()
    original = copy.deepcopy(model)
    assert fastml.patch(model).fused and fastml.patch(loss_fn).replaced
    params, original_params = list(model.parameters()), list(original.parameters())
    x, y = rand(11, 1, 28, 28, generator=rng), torch.randint(0, 10, (11,), generator=rng)
    (expected,), expected_grads, _ = _run(lambda x, y: torch.nn.functional.cross_entropy(original(x), y), [x, y],
                                          original_params, [torch.tensor(1.0)])
    recorder = Recorder()
    fast = compiled(lambda x, y: loss_fn(model(x), y), recorder)
    (got,), got_grads, _ = _run(fast, [x, y], params, [torch.tensor(1.0)])
    assert_close(got, expected)
    assert len(got_grads) == len(expected_grads) == 8
    for a, b in zip(got_grads, expected_grads):
        assert_close(a, b)
    assert {"conv2d_relu_max_pool2d", "linear", "cross_entropy"} <= recorder.fastml_ops()


@pytest.mark.slow
def test_lenet_training_under_inductor_with_dynamic_batches(rng):
    """Training steps of a compiled LeNet and a compiled fastml SGD step, batch sizes varying,
    against the same steps in eager."""
    eager_model = lenet()
    traced_model = copy.deepcopy(eager_model)
    loss_fn = nn.CrossEntropyLoss()
    eager_opt = fastml.optim.SGD(eager_model.parameters(), lr=0.05, momentum=0.9)
    traced_opt = fastml.optim.SGD(traced_model.parameters(), lr=0.05, momentum=0.9)
    torch._dynamo.reset()
    forward = torch.compile(lambda x, y: loss_fn(traced_model(x), y), fullgraph=True)
    step = torch.compile(traced_opt.step, fullgraph=True)
    for n in (16, 16, 9, 13):
        x, y = rand(n, 1, 28, 28, generator=rng), torch.randint(0, 10, (n,), generator=rng)
        expected = loss_fn(eager_model(x), y)
        got = forward(x, y)
        assert_close(got, expected)
        expected.backward()
        got.backward()
        eager_opt.step()
        step()
        eager_opt.zero_grad()
        traced_opt.zero_grad()
    for a, b in zip(traced_model.parameters(), eager_model.parameters()):
        assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# What stays as it was

def test_eager_calls_keep_their_autograd_functions(rng):
    """Eager dispatch stays on the autograd.Functions, ~30 µs per forward + backward cheaper than
    a custom op's (fastml.ops.in_custom_op_graph)."""
    x, w = rand(7, 13, generator=rng, requires_grad=True), rand(5, 13, generator=rng, requires_grad=True)
    nodes = _graph_nodes(F.linear_mse(F.linear(x, w), rand(3, 5, generator=rng), None, rand(7, 3, generator=rng)))
    assert {"LinearFunctionBackward", "LinearMSEFunctionBackward"} <= nodes
    assert not any("fastml" in name for name in nodes), nodes


def _graph_nodes(out: torch.Tensor) -> set[str]:
    """The names of the autograd nodes behind ``out``."""
    seen, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and type(node).__name__ not in seen:
            seen.add(type(node).__name__)
            todo.extend(next_node for next_node, _ in node.next_functions)
    return seen


def test_backend_is_chosen_when_the_graph_runs(rng, monkeypatch):
    """One compiled graph runs on whichever backend fastml.use_backend asks for at run time."""
    from fastml.ops.linear import reference

    kernel = next((name for name in ("cpp", "numba") if fastml._backend.status(name).present), None)
    if kernel is None:
        pytest.skip("no CPU kernel backend (cpp or numba) is present")
    calls = []
    forward = reference.forward
    monkeypatch.setattr(reference, "forward", lambda *args: calls.append(1) or forward(*args))
    layer = nn.Linear(13, 5)
    fast = compiled(layer)
    x = rand(7, 13, generator=rng)
    with fastml.use_backend(kernel):
        expected = fast(x)
    assert not calls
    with fastml.use_backend("reference"):
        assert_close(fast(x), expected)
    assert calls


def test_export_records_fastml_ops(rng):
    model = torch.nn.Sequential(nn.Linear(13, 7), torch.nn.ReLU(), nn.Linear(7, 3))
    x = rand(5, 13, generator=rng)
    exported = torch.export.export(model, (x,))
    targets = {str(node.target) for node in exported.graph.nodes}
    assert "fastml.linear.default" in targets
    assert_close(exported.module()(x), model(x))


def test_bad_input_raises_as_in_eager(rng):
    """Checks in functional.py run while dynamo traces: without fullgraph, dynamo gives the
    call back to eager Python, which raises fastml's own error; with fullgraph, dynamo's error
    carries it. Errors from the kernels (a class index out of range) are raised by the op when
    the graph runs, as in eager."""
    x, w, y = rand(5, 7, generator=rng), rand(3, 7, generator=rng), rand(5, 2, generator=rng)
    message = "target must have the prediction's shape"
    with pytest.raises(F.ShapeError, match=message):
        F.linear_mse(x, w, None, y)
    torch._dynamo.reset()
    with pytest.raises(F.ShapeError, match=message):
        torch.compile(lambda *a: F.linear_mse(*a, None, y), backend="aot_eager")(x, w)
    with pytest.raises(Exception, match=message):
        compiled(lambda *a: F.linear_mse(*a, None, y), "aot_eager")(x, w)
    logits, target = rand(5, 7, generator=rng, requires_grad=True), torch.tensor([0, 1, 9, 2, 3])
    for fn in (F.cross_entropy, compiled(F.cross_entropy, "aot_eager")):
        with pytest.raises(IndexError, match="Target 9 is out of bounds"):
            fn(logits, target)


@pytest.mark.long  # a child process that imports torch and compiles: ~5 s
def test_without_custom_ops_nothing_is_registered_and_compile_runs_torch():
    """torch < 2.4 (simulated: torch.library without custom_op): fastml imports, registers
    nothing, runs eager on its kernels and leaves compiled calls to torch's ops."""
    script = textwrap.dedent("""
        import torch
        custom_op = torch.library.custom_op
        del torch.library.custom_op
        import fastml
        torch.library.custom_op = custom_op  # torch's own modules may want it later
        assert not fastml.ops.LIBRARY
        assert not hasattr(torch.ops.fastml, "linear")
        layer = fastml.nn.Linear(4, 3)
        x = torch.randn(5, 4, requires_grad=True)
        assert type(fastml.ops.linear.linear(x, layer.weight, None).grad_fn).__name__ == "LinearFunctionBackward"
        seen = []
        def backend(gm, inputs):
            seen.extend(str(n.target) for n in gm.graph.nodes)
            return gm.forward
        out = torch.compile(layer, fullgraph=True, backend=backend)(x)
        torch.testing.assert_close(out, torch.nn.functional.linear(x, layer.weight, layer.bias))
        assert seen and not any("fastml" in s for s in seen), seen
        print("ok")
    """)
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
