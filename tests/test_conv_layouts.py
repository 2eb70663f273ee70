"""Every way fastml.nn.Conv2d can compute a layer (fastml's kernels and each of torch's variants the
measured choice may pick, fastml/nn.py's torch_conv_variants) hands back the output and the
gradients of input, weight and bias in the layouts torch's own convolution does: channels-last
when the input or the weight suggests it (``suggest_memory_format``, which counts a tensor that is
both layouts by its strides), else contiguous. A drop-in must not change what ``.stride()`` or
``torch.autograd.grad`` show, whichever path measured fastest on the machine at hand."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch

import fastml.nn
from fastml import _layout
from fastml.nn import torch_conv_variants

CL = torch.channels_last

# (in, out, kernel, stride, groups): a 1x1 at both strides, 3x3 at both strides, depthwise, grouped;
# one channel in
CONVS = [(16, 32, 1, 1, 1), (16, 32, 1, 2, 1), (16, 32, 3, 1, 1), (16, 32, 3, 2, 1), (32, 32, 3, 1, 32), (32, 64, 3, 1, 4),
         (1, 8, 3, 1, 1)]


def layout(t: torch.Tensor) -> str:
    if t.dim() != 4:
        return "contiguous" if t.is_contiguous() else "strided"
    plain, last = t.is_contiguous(), t.is_contiguous(memory_format=CL)
    return "either" if plain and last else "contiguous" if plain else "channels_last" if last else "strided"


def same_layout(a: str, b: str) -> bool:
    return a == b or "either" in (a, b)


def run(forward, x, parameters, train):
    x = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(train)
    with torch.set_grad_enabled(train):
        out = forward(x)
    if not train:
        return out, [layout(out)]
    upstream = torch.empty_like(out).copy_(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    grads = torch.autograd.grad(out, [x, *parameters], upstream)
    return out, [layout(out)] + [layout(g) for g in grads]


@pytest.mark.parametrize("train", [False, True], ids=["infer", "train"])
@pytest.mark.parametrize("weight_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize("input_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", CONVS, ids=lambda c: "{}to{}-k{}s{}g{}".format(*c))
def test_every_path_keeps_torchs_layouts(shape, input_format, weight_format, train):
    c_in, c_out, k, stride, groups = shape
    torch.manual_seed(0)
    ours = fastml.nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, groups=groups)
    twin = torch.nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, groups=groups)
    twin.load_state_dict(ours.state_dict())
    if weight_format == "channels_last":
        ours.to(memory_format=CL)
        twin.to(memory_format=CL)
    x = torch.randn(4, c_in, 14, 14)
    if input_format == "channels_last":
        x = x.to(memory_format=CL)
    expected, expected_layouts = run(twin, x, list(twin.parameters()), train)
    with torch.set_grad_enabled(train):
        paths = torch_conv_variants(ours, x.requires_grad_(train), lambda: (ours.weight, ours.bias))
    paths["fastml"] = ours._fastml_forward
    for name, forward in paths.items():
        out, layouts = run(forward, x, list(ours.parameters()), train)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
        assert all(map(same_layout, layouts, expected_layouts)), \
            f"{name}: output, grads {layouts}, torch's {expected_layouts}"


@pytest.mark.parametrize("shape,fmt", itertools.product([(2, 4, 3, 4), (4, 1, 5, 5), (4, 3, 1, 1), (0, 3, 2, 2),
                                                         (3, 2, 1, 5), (1, 1, 1, 1)],
                                                        [torch.contiguous_format, CL]))
def test_suggests_channels_last_is_torchs_rule(shape, fmt):
    t = torch.randn(shape).to(memory_format=fmt)
    # torch's CPU convolution shows its rule (suggest_memory_format is not exposed to Python): a
    # 1x1 weight and padding make an output of 2 channels and 3x3 or more, never both layouts
    weight = torch.ones(2, shape[1], 1, 1)
    expected = layout(torch.nn.functional.conv2d(t, weight, padding=1)) == "channels_last"
    assert _layout.suggests_channels_last(t) == expected
    strided = torch.empty(4, 6, 5, 5)[:, ::2]  # neither layout
    assert not _layout.suggests_channels_last(strided)


# torch 2.13's oneDNN faults (a segmentation fault, a corrupted heap) computing the weight or bias
# gradient of a strided 1x1 convolution of fewer than 16 channels on channels-last memory
# (fastml/_layout.py's faulting_shape; RepVGG-A0's stem). Every path of fastml's that runs torch's
# convolution must keep it off that layout; checked in a child process, which the fault would kill.
FAULTING_CONVOLUTIONS = r"""
import sys
import torch
import fastml
from fastml import _layout, _route
from fastml.nn import torch_conv_variants

CL = torch.channels_last
torch.manual_seed(0)
x32 = torch.randn(8, 3, 96, 96)  # (torch 2.13 faulted on a Zen 4 from 4x3x64x64 up, reliably from about here)


def check(name, forward, parameters, x, reference, expected_layouts):
    x = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    for _ in range(2):
        out = forward(x)
        grads = torch.autograd.grad(out, [x, *parameters], torch.ones_like(out))
    ref_x = x.detach().double().contiguous().requires_grad_()
    ref_params = [p.detach().double().contiguous().requires_grad_() for p in parameters]
    ref_out = reference(ref_x, *ref_params)
    ref_grads = torch.autograd.grad(ref_out, [ref_x, *ref_params], torch.ones_like(ref_out))
    for got, want in zip((out, *grads), (ref_out, *ref_grads)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-3, msg=lambda m: f"{name}: {m}")
    layouts = [out.is_contiguous(memory_format=CL), grads[0].is_contiguous(memory_format=CL)]
    assert layouts == expected_layouts, (name, layouts)
    print("ok", name, flush=True)


def conv_ref(x, w, b):
    return torch.nn.functional.conv2d(x, w, b, 2)


for weight_format in ("contiguous", "channels_last"):
    conv = fastml.nn.Conv2d(3, 48, 1, stride=2)
    if weight_format == "channels_last":
        conv.to(memory_format=CL)
    for input_format in ("contiguous", "channels_last"):
        x = x32 if input_format == "contiguous" else x32.contiguous(memory_format=CL)
        cl = input_format == "channels_last" or weight_format == "channels_last"
        params = [conv.weight, conv.bias]
        with torch.enable_grad():
            paths = torch_conv_variants(conv, x.requires_grad_(), lambda: (conv.weight, conv.bias))
        x = x.detach()
        assert "channels_last" not in paths, "the variant would fault"
        paths.update(fastml=conv._fastml_forward, torch=conv._torch_forward, layer=conv,
                     functional=lambda t: fastml.functional.conv2d(t, conv.weight, conv.bias, 2),
                     guarded=lambda t: _layout.conv2d(t, conv.weight, conv.bias, 2))
        for name, forward in paths.items():
            check(f"{name} {input_format} input, {weight_format} weight", forward, params, x, conv_ref, [cl, cl])
        fused = fastml.nn.ConvReLUPool2d(3, 48, 1, stride=2)
        fused.load_state_dict(conv.state_dict())
        if weight_format == "channels_last":
            fused.to(memory_format=CL)
        def fused_ref(x, w, b):
            return torch.nn.functional.max_pool2d(torch.relu(conv_ref(x, w, b)), 2)
        check(f"ConvReLUPool2d {input_format} input", fused, [fused.weight, fused.bias], x, fused_ref, [cl, cl])
        check(f"conv2d_relu_max_pool2d {input_format} input",
              lambda t: fastml.functional.conv2d_relu_max_pool2d(t, fused.weight, fused.bias, 2, 0, 1, 1, 2),
              [fused.weight, fused.bias], x, fused_ref, [cl, cl])

# torch.func transforms, forward-mode AD and torch.jit.trace see through the guard as through
# torch's convolution (plain ops, no autograd.Function of fastml's).
conv = fastml.nn.Conv2d(3, 48, 1, stride=2).to(memory_format=CL)
x = x32.contiguous(memory_format=CL)
ref_params = {k: v.detach().double() for k, v in conv.named_parameters()}
twin = torch.nn.Conv2d(3, 48, 1, stride=2).double()


def loss(module, params, t):
    return torch.func.functional_call(module, params, (t,)).square().mean()


grads = torch.func.grad(lambda p: loss(conv, p, x))(dict(conv.named_parameters()))
want = torch.func.grad(lambda p: loss(twin, p, x.double().contiguous()))(ref_params)
for k in want:
    torch.testing.assert_close(grads[k].double(), want[k], rtol=1e-4, atol=1e-6)
print("ok torch.func.grad", flush=True)
tangent = torch.randn_like(x)
import torch.autograd.forward_ad as fwAD
with fwAD.dual_level():
    got = fwAD.unpack_dual(conv(fwAD.make_dual(x, tangent))).tangent
_, want = torch.func.jvp(lambda t: twin(t), (x.double().contiguous(),), (tangent.double().contiguous(),))
torch.func.functional_call(twin, ref_params, (x.double(),))
twin.load_state_dict(ref_params)
_, want = torch.func.jvp(twin, (x.double().contiguous(),), (tangent.double().contiguous(),))
torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
print("ok forward AD", flush=True)
for _ in range(3):
    conv(x.requires_grad_()).sum().backward()  # (routes settled, as in a model traced after it ran)
traced = torch.jit.trace(conv, x)
check("torch.jit.trace", traced, [conv.weight, conv.bias], x, conv_ref, [True, True])
unbatched = x32[0].clone().requires_grad_()  # (C, H, W) beside a channels-last weight
out = conv(unbatched)
out.sum().backward()
torch.testing.assert_close(out.double(), conv_ref(unbatched.double()[None], conv.weight.double(), conv.bias.double())[0],
                           rtol=1e-4, atol=1e-4)
print("ok unbatched", flush=True)
# fastml's own "reference" backend hands its operands to torch too: a frozen channels-last weight
# (1x1: contiguous both ways, its strides read channels-last) with a trainable bias.
frozen = fastml.nn.Conv2d(3, 48, 1, stride=2).to(memory_format=CL)
frozen.weight.requires_grad_(False)
with fastml.use_backend("reference"):
    check("reference backend, frozen weight", frozen, [frozen.bias], x,
          lambda t, b: conv_ref(t, frozen.weight.double(), b), [True, True])
print("ok reference backend", flush=True)

# A model whose activations fastml.patch(channels_last=True) converts, tuned (torch's module on the
# converted layout among the timed ways) and trained.
model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 1, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(16, 4, 3))
fastml.patch(model, channels_last=True)
fastml.tune(model, x32)
for _ in range(2):
    model(x32).sum().backward()
print("ok model", flush=True)

# A model trained on channels-last input, tuned, then run as unpatched (fastml.tune's verdict where
# the patched model is no faster; set here whatever tune measured): the faulting convolution keeps
# fastml's class and its guard meanwhile, where torch's class would fault.
# Folded with its ReLU (a FoldedConv2d, unfolded meanwhile) and alone (a Conv2d), each also traced
# by torch.fx while it runs so: the trace calls the layer, not the unguarded computation.
x = x32.contiguous(memory_format=CL)
for activation, first_class in ((torch.nn.ReLU, fastml._fold.FoldedConv2d), (torch.nn.GELU, fastml.nn.Conv2d)):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 1, stride=2), activation(), torch.nn.Conv2d(16, 4, 3))
    fastml.patch(model)
    fastml.tune(model, x)
    _route.run_as_torch(model, True)
    assert type(model[0]) is first_class and _route.runs_as_torch(model[0])  # fastml's class, as torch
    assert type(model[2]) is torch.nn.Conv2d  # (another convolution is torch's class meanwhile)
    act = torch.relu if activation is torch.nn.ReLU else torch.nn.functional.gelu

    def model_ref(t, w1, b1, w2, b2):
        return torch.nn.functional.conv2d(act(conv_ref(t, w1, b1)), w2, b2)

    name = f"run as unpatched, {first_class.__name__}"
    check(name, model, list(model.parameters()), x, model_ref, [True, True])
    traced = torch.fx.symbolic_trace(model)
    assert [node.target for node in traced.graph.nodes if node.op == "call_module"][0] == "0", traced.graph
    check(name + ", fx-traced", traced, list(model.parameters()), x, model_ref, [True, True])
print("ok unpatched")
"""


@pytest.mark.long  # a child timing every way anew: 6 s on 2 cores
def test_strided_1x1_convolutions_of_few_channels_train_on_channels_last_memory(tmp_path):
    env = {**os.environ, "FASTML_CACHE_DIR": str(tmp_path)}  # every way timed anew
    done = subprocess.run([sys.executable, "-c", FAULTING_CONVOLUTIONS], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.endswith("ok unpatched\n"), done.stdout


@pytest.mark.parametrize("c_in,kernel,stride,faulting", [(3, 1, 2, True), (15, 1, (1, 2), True), (16, 1, 2, False),
                                                         (3, 1, 1, False), (3, 3, 2, False)])
def test_faulting_shape(c_in, kernel, stride, faulting):
    weight = torch.empty(8, c_in, kernel, kernel)
    assert _layout.faulting_shape(weight, stride) == faulting


def test_the_channels_last_variant_is_offered_where_it_cannot_fault():
    conv = fastml.nn.Conv2d(3, 48, 1, stride=2)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():  # no weight gradient: oneDNN's forward is sound
        assert "channels_last" in torch_conv_variants(conv, x, lambda: (conv.weight, conv.bias))
    assert "channels_last" not in torch_conv_variants(conv, x, lambda: (conv.weight, conv.bias))
    conv.requires_grad_(False)  # the input's gradient alone is sound too
    assert "channels_last" in torch_conv_variants(conv, x.requires_grad_(), lambda: (conv.weight, conv.bias))


def test_the_guard_keeps_torchs_values_where_they_are_infinite():
    """The guarded convolution adds a bridge of zero value for the parameters' gradient: an
    infinite output must stay infinite, not become inf - inf = NaN. (8x8 images: below the
    fault's sizes, so torch's own convolution on the same layout is safe to compare with.)"""
    conv = fastml.nn.Conv2d(3, 8, 1, stride=2)
    x = torch.randn(2, 3, 8, 8)
    x[0, 0, 0, 0] = float("inf")
    x = x.contiguous(memory_format=CL).requires_grad_()
    got = _layout.torch_convolution(conv, x, conv.weight, conv.bias)
    want = torch.nn.functional.conv2d(x.detach(), conv.weight.detach(), conv.bias.detach(), 2)
    assert want.isinf().any()
    torch.testing.assert_close(got, want, equal_nan=True)
    assert got.is_contiguous(memory_format=CL)
