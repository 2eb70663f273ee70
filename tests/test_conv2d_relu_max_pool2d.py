"""The fused conv + bias + ReLU + max-pool block (fastml.functional.conv2d_relu_max_pool2d,
fastml.nn.ConvReLUPool2d) on every backend against torch's three ops, and the course's LeNet built
from fastml layers against the same network built from torch layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from conftest import assert_close, rand, upcast

import fastml
from fastml import _backend, _tune
from fastml import functional as F

# (input shape, weight shape, bias, stride, padding, dilation, groups, pool kernel, pool stride)
CONFIGS = [
    ((2, 1, 12, 12), (6, 1, 5, 5), True, 1, 2, 1, 1, 2, None),          # LeNet's first block
    ((2, 6, 9, 9), (16, 6, 5, 5), True, 1, 0, 1, 1, 2, None),           # its second (odd: a row left over)
    ((1, 4, 11, 10), (6, 2, 3, 3), False, 1, 1, 1, 2, 3, 2),            # groups, overlapping pool windows
    ((2, 3, 9, 13), (5, 3, 3, 2), True, (2, 1), (1, 0), (1, 2), 1, (2, 3), (1, 2)),  # everything rectangular
    ((1, 3, 10, 36), (9, 3, 3, 3), True, 1, 1, 1, 1, 2, 2),             # rows wider than two SIMD vectors
    ((2, 3, 6, 70), (4, 3, 3, 3), True, 1, 1, 1, 1, 2, None),           # 2x2 pools: 35 columns, vectors and a tail
    ((31, 6, 9, 9), (16, 6, 5, 5), True, 1, 0, 1, 1, 2, None),          # C++ batch layout, a partial block
    ((31, 4, 11, 10), (6, 2, 3, 3), False, 1, 1, 1, 2, 3, 2),           # batch layout, overlapping windows
    ((16, 7, 8, 8), (5, 7, 3, 3), True, 1, 1, 1, 1, 2, None),           # batch layout: blocks of 5 and (backward) 7
    # the C++ weight gradient from the nonzero entries, which sums a few channels' kernel rows at once:
    ((3, 7, 12, 12), (4, 7, 3, 3), True, 1, 1, 1, 1, 2, None),          # 7 channels: groups of 3, one left
    ((2, 3, 24, 22), (4, 3, 11, 9), True, 1, 0, (2, 1), 1, 2, None),    # 11 rows (8 + 3) of 9 taps (2 vectors)
    ((2, 3, 27, 27), (4, 3, 11, 11), True, 4, 2, 1, 1, 3, 2),           # AlexNet's first block: stride 4, pool 3 / 2
]


def _ids(config):
    x, w, bias, stride, padding, dilation, groups, pk, ps = config
    return f"x{'x'.join(map(str, x))}-w{'x'.join(map(str, w))}-s{stride}-p{padding}-d{dilation}-g{groups}-pool{pk},{ps}"


def _composite(x, w, b, config):
    _, _, _, stride, padding, dilation, groups, pk, ps = config
    return TF.max_pool2d(torch.relu(TF.conv2d(x, w, b, stride, padding, dilation, groups)), pk, ps)


def _fused(x, w, b, config):
    _, _, _, stride, padding, dilation, groups, pk, ps = config
    return F.conv2d_relu_max_pool2d(x, w, b, stride, padding, dilation, groups, pk, ps)


def _window_gap(x, w, b, config):
    """The smallest gap, over the pool windows whose maximum is positive, between a window's
    largest and second-largest activation (float64). Below float32's rounding of the sums, the
    window's maximum is a near-tie: a float32 computation, torch's own composite included, may
    take the other element, and its gradient goes there (seed 2420237732 did so on the
    reference backend). Ties proper are test_ties_nan_and_relu_zero_route_as_torch's."""
    _, _, _, stride, padding, dilation, groups, pk, ps = config
    z = torch.relu(TF.conv2d(x, w, b, stride, padding, dilation, groups))
    windows = TF.unfold(z.reshape(-1, 1, *z.shape[2:]), pk, stride=pk if ps is None else ps)
    top = windows.topk(2, dim=1).values
    positive = top[:, 0] > 0
    return float((top[:, 0] - top[:, 1])[positive].min()) if positive.any() else float("inf")


def _separated_inputs(backend, rng, config, dtype):
    """x, w, b drawn until no pool window's maximum is a near-tie at float32 precision."""
    for _ in range(20):
        x = rand(*config[0], dtype=dtype, device=backend.device, generator=rng, requires_grad=True)
        w = rand(*config[1], dtype=dtype, device=backend.device, generator=rng, requires_grad=True)
        b = rand(config[1][0], dtype=dtype, device=backend.device, generator=rng, requires_grad=True) if config[2] \
            else None
        # float32 sums of C·R·S products err by ~1e-7 of them each (2e-5 at 6 x 5 x 5): a gap of 1e-5
        # per product is ~75x that
        if _window_gap(*upcast(x, w, b), config) > 1e-5 * config[1][1] * config[1][2] * config[1][3]:
            return x, w, b
    raise AssertionError("no inputs without near-tied pool windows in 20 draws")


# The batches of 31 repeat the shapes of 2 and 1 above them; on the Triton interpreter they take
# 5 to 9 s each, so there they are long (CI runs them).
@pytest.mark.interpreter_long("x31x6x9x9-w16x6x5x5-s1-p0-d1-g1-pool2,None", "x31x4x11x10-w6x2x3x3-s1-p1-d1-g2-pool3,2")
@pytest.mark.parametrize("config", CONFIGS, ids=[_ids(c) for c in CONFIGS])
def test_matches_float64_composite(backend, rng, config):
    for dtype in (torch.float32, torch.float64):
        x, w, b = _separated_inputs(backend, rng, config, dtype)
        out = _fused(x, w, b, config)
        x64, w64, b64 = upcast(x, w, b)
        expected = _composite(x64, w64, b64, config)
        assert_close(out, expected, scale=config[1][1] * config[1][2] * config[1][3])
        grad = rand(*out.shape, dtype=dtype, device=backend.device, generator=rng)
        ours = torch.autograd.grad(out, [t for t in (x, w, b) if t is not None], grad)
        theirs = torch.autograd.grad(expected, [t for t in (x64, w64, b64) if t is not None], grad.cpu().double())
        for a, e in zip(ours, theirs):
            assert_close(a, e, scale=max(1.0, float(e.abs().max())))


def test_the_batch_layout_sums_many_channels_in_passes_on_this_cpus_caches(cpp_backend, rng):
    """The fused block past the batch layout's blocking on any CPU's caches, as
    test_conv2d.py's MANY_CHANNELS (several L1-sized passes of input channels, rows outermost)."""
    config = ((16, 40, 20, 20), (16, 40, 3, 3), True, 1, 1, 1, 1, 2, None)
    for dtype in (torch.float32, torch.float64):
        # (the output alone: a window's maximum is the same value whichever of near-tied
        # elements attains it, so no draw need avoid them, as the gradients' checks do)
        x, w, b = (rand(*shape, dtype=dtype, device=cpp_backend.device, generator=rng)
                   for shape in (config[0], config[1], config[1][:1]))
        out = _fused(x, w, b, config)
        assert_close(out, _composite(*upcast(x, w, b), config), scale=40 * 9)


def _pair(value):
    return (value, value) if isinstance(value, int) else tuple(value)


@pytest.mark.skipif(not _backend.status("cpp").present, reason="the C++ extension is absent")
@pytest.mark.parametrize("config", CONFIGS, ids=_ids)
def test_the_cpp_block_either_way_gives_torchs_values(rng, monkeypatch, config):
    """The cpp backend's forward and backward are each a measured choice between its fused kernel
    and a split (torch's convolution or convolution backward, with the ReLU and pool, or the
    activation gradient, in one C++ pass): either way, the output, argmax and every gradient are
    torch's three ops' (float64; small integers, so that windows tie exactly and a NaN, which wins
    its window, routes as torch's)."""
    from fastml.ops.conv2d_relu_max_pool2d import cpp_impl, reference

    shape_x, shape_w, bias, stride, padding, dilation, groups, pk, ps = config
    x = torch.randint(-2, 3, shape_x, generator=rng).double()
    w = torch.randint(-1, 2, shape_w, generator=rng).double()
    b = torch.randint(-1, 2, shape_w[:1], generator=rng).double() if bias else None
    args = (_pair(stride), _pair(padding), _pair(dilation), groups, _pair(pk), _pair(pk if ps is None else ps))
    poisoned = x.clone()
    poisoned[0, 0, 1, 1] = float("nan")
    want = reference.forward(poisoned, w, b, *args)
    grad = rand(*want[0].shape, dtype=torch.float64, generator=rng)
    leaves = [t.clone().requires_grad_() for t in (x, w, b) if t is not None]
    expected = torch.autograd.grad(_composite(*leaves[:2], leaves[2] if bias else None, config), leaves, grad)
    for way in ("cpp", "reference"):
        monkeypatch.setattr(_tune, "choose", lambda *arguments, way=way: way)
        out, argmax = cpp_impl.forward(poisoned, w, b, *args)
        assert torch.equal(out.isnan(), want[0].isnan()) and torch.equal(out.nan_to_num(), want[0].nan_to_num()), way
        assert torch.equal(argmax, want[1]), way
        argmax = cpp_impl.forward(x, w, b, *args)[1]
        got = cpp_impl.backward(grad, argmax, x, w, *args, (True, True, bias))
        for a, e in zip([g for g in got if g is not None], expected):
            assert_close(a, e, scale=max(1.0, float(e.abs().max())))
        if not bias:
            assert got[2] is None


@pytest.mark.parametrize("batch", [2, 15], ids=["rows", "batch-layout"])
def test_ties_nan_and_relu_zero_route_as_torch(backend, rng, batch):
    """Small integers make every sum exact, so windows tie exactly: the first maximum takes the
    gradient, as max_pool2d's; a window whose maximum is 0 (after ReLU) passes none back; NaN wins.
    A batch of 15 float64 images runs the C++ batch-innermost layout (a block of 8 and 7 more)."""
    config = ((batch, 2, 8, 9), (3, 2, 3, 3), True, 1, 1, 1, 1, 2, None)
    x = torch.randint(-2, 3, config[0], generator=rng).double()
    x[0, 0, 2, 2] = x[batch - 1, 1, 4, 5] = float("nan")
    w = torch.randint(-1, 2, config[1], generator=rng).double()
    b = torch.randint(-1, 2, (3,), generator=rng).double()
    leaves = [t.to(backend.device).requires_grad_() for t in (x, w, b)]
    out = _fused(*leaves, config)
    cpu = [t.clone().requires_grad_() for t in (x, w, b)]
    expected = _composite(*cpu, config)
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=0, equal_nan=True)
    grad = torch.randn(out.shape, generator=rng, dtype=torch.float64)
    # A NaN output passes its gradient (torch's ReLU lets it through), which NaN's input then
    # turns into NaN in the weight gradient alike on both sides: the input's is compared.
    for a, e in zip(torch.autograd.grad(out, leaves[:1], grad.to(backend.device)),
                    torch.autograd.grad(expected, cpu[:1], grad)):
        torch.testing.assert_close(a.cpu(), e, rtol=0, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("change", ["relu_", "mul_", "masked_fill_"])
def test_the_output_may_be_changed_in_place_before_backward(backend, rng, change):
    """The block keeps its window offsets for backward (-1 where the ReLU passes nothing), not its
    output: an in-place op after it (a ReLU(inplace=True), a scaling, an in-place dropout) leaves
    its gradients those of torch's three ops, whose backward does not read the pooled output."""
    config = ((3, 2, 9, 8), (4, 2, 3, 3), True, 1, 1, 1, 1, 2, None)
    inputs = [torch.randn(shape, generator=rng, dtype=torch.float64) for shape in (config[0], config[1], (4,))]
    keep = torch.rand((3, 4, 4, 4), generator=rng) < 0.5
    arguments = {"relu_": (), "mul_": (-2.0,), "masked_fill_": (keep.to(backend.device), 0.0)}[change]
    leaves = [t.clone().to(backend.device).requires_grad_() for t in inputs]
    out = _fused(*leaves, config)
    getattr(out, change)(*arguments)
    cpu = [t.clone().requires_grad_() for t in inputs]
    expected = _composite(*cpu, config)
    getattr(expected, change)(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in arguments))
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn(out.shape, generator=rng, dtype=torch.float64)
    expected_grads = torch.autograd.grad(expected, cpu, grad)
    for a, e in zip(torch.autograd.grad(out, leaves, grad.to(backend.device)), expected_grads):
        torch.testing.assert_close(a.cpu(), e, rtol=1e-10, atol=1e-10)


def test_a_nan_activation_passes_its_gradient_as_torchs_relu(backend):
    """torch's ReLU backward zeroes the gradient where its output is <= 0, so a NaN's passes: to
    the input under it, the bias, and (times the NaN) the weight."""
    config = ((1, 1, 2, 2), (1, 1, 1, 1), True, 1, 0, 1, 1, 2, None)
    x = torch.tensor([[[[float("nan"), 1.0], [2.0, 3.0]]]], dtype=torch.float64)
    w, b = torch.tensor([[[[-0.5]]]], dtype=torch.float64), torch.tensor([0.25], dtype=torch.float64)
    leaves = [t.clone().to(backend.device).requires_grad_() for t in (x, w, b)]
    _fused(*leaves, config).sum().backward()
    cpu = [t.clone().requires_grad_() for t in (x, w, b)]
    _composite(*cpu, config).sum().backward()
    assert cpu[2].grad.item() == 1.0  # torch's
    for ours, theirs in zip(leaves, cpu):
        torch.testing.assert_close(ours.grad.cpu(), theirs.grad, rtol=0, atol=0, equal_nan=True)


# About 3 s a case on the Triton interpreter: there each poison runs with one pool in the default
# run, and the other three cases are long (CI runs them).
@pytest.mark.interpreter_long("none-pool2", "input inf-pool3", "grad inf-pool2")
@pytest.mark.parametrize("pool", [2, 3], ids=["pool2", "pool3"])
@pytest.mark.parametrize("poison", ["none", "input inf", "grad inf"])
def test_gradients_from_sparse_activation_gradients_as_torch(backend, rng, poison, pool):
    """After ReLU and a 2 x 2 pool, at most a quarter of the activation gradient is nonzero (a ninth
    after 3 x 3); the C++ backward sums the weight gradient over those entries only. That equals the
    dense sum while every input is finite (0 · finite = 0); an infinite or NaN input (0 · inf = NaN
    in torch's dense sums) must give torch's NaNs, and an infinite gradient entry torch's
    infinities. (A NaN input or an infinite weight reaches the input gradient through every zero of
    the activation gradient, in a pattern that depends on the algorithm, oneDNN's as well as
    fastml's: not compared here.)"""
    # (3 x 3 pools: the C++ sum over nonzero entries applies with AVX-512's 16 lanes too)
    config = ((9, 6, 14, 14), (16, 6, 5, 5), True, 1, 1, 1, 1, pool, None)
    x = rand(*config[0], dtype=torch.float64, generator=rng)
    w = rand(*config[1], dtype=torch.float64, generator=rng)
    b = rand(16, dtype=torch.float64, generator=rng)
    if poison == "input inf":
        x[3, 2, 5, 7] = float("inf")
    leaves = [t.to(backend.device).requires_grad_() for t in (x, w, b)]
    out = _fused(*leaves, config)
    cpu = [t.clone().requires_grad_() for t in (x, w, b)]
    expected = _composite(*cpu, config)
    grad = rand(*out.shape, dtype=torch.float64, generator=rng)
    if poison == "grad inf":
        positive = (expected > 0).nonzero()[0].tolist()
        grad[tuple(positive)] = float("inf")
    ours = torch.autograd.grad(out, leaves, grad.to(backend.device))
    theirs = torch.autograd.grad(expected, cpu, grad)
    for a, e in zip(ours, theirs):
        assert torch.equal(a.cpu().isnan(), e.isnan()) and torch.equal(a.cpu().isinf(), e.isinf())
        finite = e.isfinite()
        assert_close(a.cpu()[finite], e[finite], scale=max(1.0, float(e[finite].abs().max())))


def test_gradcheck(backend, rng):
    x = rand(1, 2, 7, 8, dtype=torch.float64, device=backend.device, generator=rng, requires_grad=True)
    w = rand(3, 2, 3, 3, dtype=torch.float64, device=backend.device, generator=rng, requires_grad=True)
    b = rand(3, dtype=torch.float64, device=backend.device, generator=rng, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: F.conv2d_relu_max_pool2d(*t, 1, 1, 1, 1, 2), (x, w, b),
                                    fast_mode=backend.interpreted)


def test_backward_keeps_no_activation(backend, rng):
    x = rand(2, 3, 12, 12, device=backend.device, generator=rng, requires_grad=True)
    w = rand(8, 3, 3, 3, device=backend.device, generator=rng, requires_grad=True)
    out = F.conv2d_relu_max_pool2d(x, w, None, padding=1)
    activation = 2 * 8 * 12 * 12
    saved = out.grad_fn.saved_tensors
    assert saved and all(t.numel() < activation for t in saved), [t.shape for t in saved]
    assert any(t.dtype == torch.int8 for t in saved), "window offsets are kept as int8"


def test_unbatched_empty_and_fallbacks(backend, rng):
    w = rand(4, 3, 3, 3, device=backend.device, generator=rng)
    x = rand(3, 10, 11, device=backend.device, generator=rng)
    out = F.conv2d_relu_max_pool2d(x, w, padding=1)
    torch.testing.assert_close(out.cpu(), TF.max_pool2d(torch.relu(TF.conv2d(x.cpu(), w.cpu(), padding=1)), 2),
                               rtol=1e-5, atol=1e-5)
    assert F.conv2d_relu_max_pool2d(x.new_empty(0, 3, 10, 11), w).shape == (0, 4, 4, 4)
    tall = rand(3, 14, 12, device=backend.device, generator=rng)
    big_window = F.conv2d_relu_max_pool2d(tall, w, padding=1, pool_kernel_size=(14, 12))
    assert big_window.shape == (4, 1, 1)  # 168 elements per window: past int8 offsets, torch's ops run
    expected = torch.relu(TF.conv2d(tall.cpu(), w.cpu(), padding=1)).amax((1, 2))[:, None, None]
    torch.testing.assert_close(big_window.cpu(), expected, rtol=1e-5, atol=1e-5)
    # a channels-last weight makes the convolution's output channels-last, but torch's pool gives an
    # unbatched input a contiguous output
    last = w.contiguous(memory_format=torch.channels_last)
    ours = F.conv2d_relu_max_pool2d(x, last, padding=1)
    expected = TF.max_pool2d(torch.relu(TF.conv2d(x, last, padding=1)), 2)
    assert ours.stride() == expected.stride()
    with pytest.raises(RuntimeError, match="stride must either be omitted"):  # torch's error, not a default
        F.conv2d_relu_max_pool2d(x, w, pool_stride=[2, 2, 2])
    with pytest.raises(RuntimeError, match="Output size is too small"):
        F.conv2d_relu_max_pool2d(x, w, pool_kernel_size=20)
    for step in (2 ** 31, 2 ** 40):  # torch's pooling takes C ints; a kernel would take one window
        with pytest.raises(RuntimeError, match="without overflow"):
            F.conv2d_relu_max_pool2d(x, w, pool_stride=step)


def test_module_state_dict_is_a_conv2ds(backend, rng):
    ours = fastml.nn.ConvReLUPool2d(3, 6, 5, padding=2, pool_kernel_size=2).to(backend.device)
    conv = torch.nn.Conv2d(3, 6, 5, padding=2)
    conv.load_state_dict({k: v.cpu() for k, v in ours.state_dict().items()})
    ours.load_state_dict(conv.state_dict())
    assert "pool_kernel_size=2, pool_stride=2" in repr(ours)
    x = rand(2, 3, 12, 12, device=backend.device, generator=rng)
    torch.testing.assert_close(ours(x).cpu(), TF.max_pool2d(torch.relu(conv(x.cpu())), 2), rtol=1e-5, atol=1e-5)


def _lenet(conv, pool, fused):
    """The course's LeNet on 28 × 28 images, from the given layer classes (or fused blocks)."""
    torch.manual_seed(0)
    if fused:
        features = [fastml.nn.ConvReLUPool2d(1, 6, 5, padding=2), fastml.nn.ConvReLUPool2d(6, 16, 5)]
    else:
        features = [conv(1, 6, 5, padding=2), torch.nn.ReLU(), pool(2), conv(6, 16, 5), torch.nn.ReLU(), pool(2)]
    return torch.nn.Sequential(*features, torch.nn.Flatten(), torch.nn.Linear(400, 120), torch.nn.ReLU(),
                               torch.nn.Linear(120, 84), torch.nn.ReLU(), torch.nn.Linear(84, 10))


@pytest.mark.parametrize("fused", [False, True], ids=["layers", "fused-blocks"])
def test_lenet_trains_like_torch(rng, fused):
    images = torch.rand(64, 1, 28, 28, generator=rng)
    labels = torch.randint(0, 10, (64,), generator=rng)
    curves = []
    for model in (_lenet(torch.nn.Conv2d, torch.nn.MaxPool2d, False), _lenet(fastml.nn.Conv2d, fastml.nn.MaxPool2d,
                                                                             fused)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for step in range(8):
            batch = slice(step % 4 * 16, step % 4 * 16 + 16)
            loss = TF.cross_entropy(model(images[batch]), labels[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(losses)
    torch.testing.assert_close(torch.tensor(curves[1]), torch.tensor(curves[0]), rtol=1e-4, atol=1e-5)
