"""fastml.functional.conv2d and fastml.nn.Conv2d on every backend: forward and the input, weight
and bias gradients against the float64 reference (torch's convolution in float64), gradcheck,
layouts, torch's errors, and the module as a drop-in for torch.nn.Conv2d."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from conftest import assert_close, rand, upcast

import fastml
from fastml import functional as F

# (input shape, weight shape, bias, stride, padding, dilation, groups)
CONFIGS = [
    ((2, 3, 9, 8), (5, 3, 3, 3), True, 1, 1, 1, 1),            # odd sizes, "same"-sized by padding
    ((2, 1, 12, 12), (6, 1, 5, 5), True, 1, 2, 1, 1),          # LeNet's first layer (one input channel)
    ((3, 6, 7, 7), (16, 6, 5, 5), False, 1, 0, 1, 1),          # LeNet's second, no bias
    ((1, 4, 11, 13), (6, 2, 3, 2), True, (2, 1), (1, 0), 1, 2),  # groups, rectangular kernel, strides
    ((2, 4, 10, 9), (4, 1, 3, 3), True, 1, 1, 1, 4),           # depthwise
    ((1, 3, 13, 11), (2, 3, 3, 3), True, 2, 2, (2, 1), 1),     # dilation, stride 2
    ((2, 2, 6, 7), (3, 2, 4, 2), True, 1, "same", 1, 1),       # even kernel under "same"
    ((2, 2, 6, 7), (3, 2, 3, 3), True, 1, "valid", 2, 1),      # "valid" with dilation
    ((1, 17, 5, 6), (9, 17, 1, 1), True, 1, 0, 1, 1),          # many channels, 1 × 1
    ((1, 2, 3, 40), (3, 2, 3, 3), True, 1, (2, 1), 1, 1),      # wide rows (two SIMD vectors and a tail)
    # A batch of small images takes the C++ batch-innermost layout: 31 images are a full block of
    # 16 (float) or 8 (double) lanes and a partial one.
    ((31, 3, 9, 11), (10, 3, 3, 2), True, 1, 1, 1, 1),         # batch layout, a partial channel block
    ((31, 4, 10, 8), (12, 2, 3, 3), True, 2, 1, 1, 2),         # batch layout, strides, groups
    ((31, 2, 12, 9), (9, 2, 3, 3), False, 1, 2, 2, 1),         # batch layout, dilation, no bias
    # Strides past the image (one window along it) and a 1-tap kernel's dilation, as large as
    # torch takes them (a product of such a stride once sized a C++ scratch buffer by overflow).
    ((2, 3, 9, 9), (4, 3, 3, 3), True, 2 ** 59, 0, 1, 1),
    ((2, 2, 7, 6), (3, 2, 1, 3), True, (1, 2 ** 40), 1, (2 ** 40, 1), 1),
]


def _ids(config):
    x, w, bias, stride, padding, dilation, groups = config
    return f"x{'x'.join(map(str, x))}-w{'x'.join(map(str, w))}-s{stride}-p{padding}-d{dilation}-g{groups}" + (
        "" if bias else "-nobias")


def _check_against_float64(backend, rng, config, dtype):
    x_shape, w_shape, has_bias, stride, padding, dilation, groups = config
    x = rand(*x_shape, dtype=dtype, device=backend.device, generator=rng, requires_grad=True)
    w = rand(*w_shape, dtype=dtype, device=backend.device, generator=rng, requires_grad=True)
    b = rand(w_shape[0], dtype=dtype, device=backend.device, generator=rng, requires_grad=True) if has_bias else None
    out = F.conv2d(x, w, b, stride, padding, dilation, groups)
    x64, w64, b64 = upcast(x, w, b)
    expected = TF.conv2d(x64, w64, b64, stride, padding, dilation, groups)
    reach = w_shape[1] * w_shape[2] * w_shape[3]  # terms per output: the error scale
    assert_close(out, expected, scale=reach ** 0.5)
    grad = rand(*out.shape, dtype=dtype, device=backend.device, generator=rng)
    inputs = [t for t in (x, w, b) if t is not None]
    ours = torch.autograd.grad(out, inputs, grad)
    theirs = torch.autograd.grad(expected, [t for t in (x64, w64, b64) if t is not None], grad.cpu().double())
    for name, a, e in zip(("input", "weight", "bias"), ours, theirs):
        assert a.shape == e.shape, name
        assert_close(a, e, scale=max(1.0, float(e.abs().max())))


# The batches of 31 (the C++ batch layout's sizes) take 3 to 4 s each on the Triton interpreter:
# long there (CI runs them); the kernel's strides, groups and dilations have smaller cases above.
@pytest.mark.interpreter_long("x31x3x9x11-w10x3x3x2-s1-p1-d1-g1", "x31x4x10x8-w12x2x3x3-s2-p1-d1-g2",
                              "x31x2x12x9-w9x2x3x3-s1-p2-d2-g1-nobias")
@pytest.mark.parametrize("config", CONFIGS, ids=[_ids(c) for c in CONFIGS])
def test_matches_float64_reference(backend, rng, config):
    for dtype in (torch.float32, torch.float64):
        _check_against_float64(backend, rng, config, dtype)


# Past the batch layout's blocking on any CPU's caches: 40 input channels under a 3 x 3 kernel take
# several L1-sized passes (16 to 25 a pass on 32 to 48 KiB L1s), and 20 x 20 planes of them pass half
# of a 2 MiB L2 while the weights stay inside it (each output row's channel blocks then run one after
# another). test_cache_sizes.py runs the CONFIGS on caches small enough to cross both.
MANY_CHANNELS = ((16, 40, 20, 20), (16, 40, 3, 3), True, 1, 1, 1, 1)


def test_the_batch_layout_sums_many_channels_in_passes_on_this_cpus_caches(cpp_backend, rng):
    for dtype in (torch.float32, torch.float64):
        _check_against_float64(cpp_backend, rng, MANY_CHANNELS, dtype)


def test_gradcheck(backend, rng):
    x = rand(1, 4, 5, 5, dtype=torch.float64, device=backend.device, generator=rng, requires_grad=True)
    w = rand(4, 2, 3, 2, dtype=torch.float64, device=backend.device, generator=rng, requires_grad=True)
    b = rand(4, dtype=torch.float64, device=backend.device, generator=rng, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: F.conv2d(*t, (2, 1), 1, (1, 2), 2), (x, w, b),
                                    fast_mode=backend.interpreted)
    if backend.name != "triton" or torch.cuda.is_available():
        # Double backward runs the reference's torch ops on every backend; through the Triton
        # interpreter its ~1,600 forward calls take minutes and test no other kernel.
        assert torch.autograd.gradgradcheck(lambda *t: F.conv2d(*t, 1, 1, 1, 2), (x, w[:, :, :2], b))


def test_unbatched_empty_noncontiguous_and_channels_last(backend, rng):
    w = rand(5, 3, 3, 3, device=backend.device, generator=rng)
    x = rand(3, 8, 9, device=backend.device, generator=rng)
    out = F.conv2d(x, w, None, 1, 1)
    assert out.shape == (5, 8, 9)
    torch.testing.assert_close(out.cpu(), TF.conv2d(x.cpu(), w.cpu(), None, 1, 1), rtol=1e-5, atol=1e-5)
    assert F.conv2d(x.new_empty(0, 3, 8, 9), w).shape == (0, 5, 6, 7)
    wide = rand(2, 6, 10, 12, device=backend.device, generator=rng)
    strided = wide[:, ::2, 1:, ::2]
    assert not strided.is_contiguous()
    torch.testing.assert_close(F.conv2d(strided, w).cpu(), TF.conv2d(strided.cpu(), w.cpu()), rtol=1e-5, atol=1e-5)
    last = wide[:, :3].contiguous(memory_format=torch.channels_last)
    out = F.conv2d(last, w, padding="same")
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.cpu(), TF.conv2d(last.cpu(), w.cpu(), padding="same"), rtol=1e-5, atol=1e-5)


def test_other_dtypes_run_torch():
    x, w = torch.randn(1, 2, 5, 5).to(torch.bfloat16), torch.randn(3, 2, 3, 3).to(torch.bfloat16)
    torch.testing.assert_close(F.conv2d(x, w), TF.conv2d(x, w), rtol=0, atol=0)


@pytest.mark.parametrize("x_shape, w_shape, kwargs, message", [
    ((1, 3, 5, 5), (4, 2, 3, 3), dict(groups=2), "expected input"),               # 3 channels, groups 2
    ((1, 2, 2, 2), (4, 2, 3, 3), dict(), "Kernel size can't be greater"),         # kernel larger than input
    ((3, 5, 5), (4, 2, 3, 3), dict(), "expected input"),                          # wrong channels, unbatched
    ((5, 5), (4, 1, 3, 3), dict(), "Expected 3D"),                                # wrong rank
    ((1, 2, 5, 5), (4, 2, 3, 3), dict(stride=2, padding="same"), "padding='same' is not supported for strided"),
    ((1, 2, 5, 5), (4, 2, 3, 3), dict(padding="full"), "Invalid padding string"),
])
def test_bad_arguments_raise_torchs_errors(x_shape, w_shape, kwargs, message):
    x, w = torch.randn(x_shape), torch.randn(w_shape)
    with pytest.raises(Exception, match=message) as theirs:
        TF.conv2d(x, w, **kwargs)
    with pytest.raises(theirs.type, match=message):
        F.conv2d(x, w, **kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(in_channels=3, out_channels=4, kernel_size=3),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), groups=2, bias=False),
    dict(in_channels=2, out_channels=3, kernel_size=4, padding="same", dilation=2),
    dict(in_channels=2, out_channels=2, kernel_size=3, padding=1, padding_mode="reflect"),
    dict(in_channels=2, out_channels=4, kernel_size=3, padding=2, padding_mode="circular", groups=2),
    dict(in_channels=2, out_channels=3, kernel_size=3, padding=(1, 2), padding_mode="replicate"),
])
def test_module_is_a_drop_in(backend, rng, kwargs):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    ours = fastml.nn.Conv2d(**kwargs).to(backend.device)
    theirs = torch.nn.Conv2d(**kwargs)
    assert isinstance(ours, torch.nn.Conv2d) and repr(ours) == repr(theirs)
    theirs.load_state_dict({k: v.cpu() for k, v in ours.state_dict().items()})
    x = rand(2, kwargs["in_channels"], 9, 8, device=backend.device, generator=rng)
    out = ours(x)
    torch.testing.assert_close(out.cpu(), theirs(x.cpu()), rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    theirs(x.cpu()).square().sum().backward()
    torch.testing.assert_close(ours.weight.grad.cpu(), theirs.weight.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel, dilation", [((4, 2), 1), ((3, 2), (1, 1)), ((2, 3), (3, 1))])
def test_an_uneven_same_padding_is_torchs_with_its_warning(backend, kernel, dilation, rng):
    """An even kernel length at an odd dilation pads "same" unevenly: torch warns (once per
    process) that it pads a copy of the input. fastml's kernels leave such a call to torch's
    convolution, which warns as it does; an even one (a 3x3 kernel, or a 4-tap one at dilation 2)
    stays theirs."""
    x = rand(2, 2, 7, 6, device=backend.device, generator=rng)
    w = rand(3, 2, *kernel, device=backend.device, generator=rng)
    assert F._conv_args(x, w, None, 1, "same", dilation, 1) is None
    torch.testing.assert_close(F.conv2d(x, w, padding="same", dilation=dilation),
                               TF.conv2d(x, w, padding="same", dilation=dilation), rtol=0, atol=0)
    assert F._conv_args(x, rand(3, 2, 3, 3, generator=rng), None, 1, "same", 1, 1) is not None
    assert F._conv_args(x, rand(3, 2, 4, 4, generator=rng), None, 1, "same", 2, 1) is not None
