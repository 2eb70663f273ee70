"""fastml.patch / fastml.unpatch on whole models: what is replaced, fused and left, outputs and
gradients against an unpatched float64 copy, parameter identity, state_dict round trips, errors."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import assert_close, magnitude, rand, upcast
from torch import nn

import fastml
from fastml._fold import FoldedLinear
from fastml._patch import _LINEAR_RELU_DESCRIPTION, Fused, FusedSlot, Left, Replaced


class Temperature(nn.Module):
    """A custom leaf module with a parameter: fastml has nothing for it."""

    def __init__(self):
        super().__init__()
        self.log_t = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x * self.log_t.exp()


class LeNet(nn.Module):
    """28 × 28 inputs: two Conv2d → ReLU → MaxPool2d runs (a BatchNorm2d between), then an MLP."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.BatchNorm2d(6),
                                      nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(nn.Linear(400, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10))
        self.temperature = Temperature()

    def forward(self, x):
        return self.temperature(self.classifier(self.flatten(self.features(x))))


LENET_LINEARS = ["classifier.0", "classifier.3"]
LENET_REPLACED = ["features.3", "classifier.3"]  # classifier.0 gets its ReLU (op "linear_relu")
LENET_FUSED = [("features.0", "features.1", "features.2"), ("features.4", "features.5", "features.6"),
               ("classifier.0", "classifier.1")]


def randomize(model: nn.Module, rng: torch.Generator) -> nn.Module:
    """Fresh parameters (scaled by fan-in) and BatchNorm statistics from rng, so nothing is zero."""
    with torch.no_grad():
        for p in model.parameters():
            scale = p[0].numel() ** -0.5 if p.dim() > 1 else 0.3
            p.copy_(rand(*p.shape, dtype=p.dtype, generator=rng, scale=scale))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(rand(*m.running_mean.shape, generator=rng, scale=0.3))
                m.running_var.copy_(rand(*m.running_var.shape, generator=rng).abs() + 0.5)
    return model


def lenet(rng, dtype=torch.float32) -> LeNet:
    return randomize(LeNet().to(dtype), rng).eval()  # eval: BatchNorm's statistics, no Dropout


def types(model: nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in model.named_modules()}


def compare_forward_backward(model, reference, x, rng, loss_fn=None):
    """model(x) against the float64 reference (an unpatched copy), then the gradients of the
    input and of every parameter, matched by name."""
    x = x.requires_grad_()
    (xr,) = upcast(x)
    out, ref = model(x), reference(xr)
    assert out.dtype == x.dtype
    assert_close(out, ref, scale=magnitude(ref))
    if loss_fn is None:
        upstream = rand(*out.shape, dtype=out.dtype, generator=rng)
        out.backward(upstream)
        ref.backward(upstream.double())
    else:
        target = torch.randint(out.shape[1], (out.shape[0],), generator=rng)
        loss, ref_loss = loss_fn(out, target), nn.CrossEntropyLoss()(ref, target)
        assert_close(loss, ref_loss, scale=magnitude(ref_loss))
        loss.backward()
        ref_loss.backward()
    assert_close(x.grad, xr.grad, scale=magnitude(xr.grad))
    params, ref_params = dict(model.named_parameters()), dict(reference.named_parameters())
    assert params.keys() == ref_params.keys()
    for name, p in params.items():
        assert p.grad is not None, f"no gradient for {name}"
        assert_close(p.grad, ref_params[name].grad, scale=magnitude(ref_params[name].grad))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_patched_lenet_matches_torch(rng, dtype):
    model = lenet(rng, dtype)
    reference = copy.deepcopy(model).double()
    report = fastml.patch(model)

    assert [r.name for r in report.replaced] == LENET_REPLACED
    # the batch norm after a pool has no conv to fold into: fastml's own BatchNorm2d
    assert {r.name: r.new for r in report.replaced} == {"features.3": "fastml.nn.BatchNorm2d",
                                                        "classifier.3": "fastml.nn.Linear"}
    assert [f.names for f in report.fused] == LENET_FUSED
    assert {f.new for f in report.fused} == {"fastml.nn.ConvReLUPool2d", _LINEAR_RELU_DESCRIPTION}
    assert {x.name: x.type for x in report.left} == {
        "flatten": "torch.nn.Flatten", "classifier.2": "torch.nn.Dropout", "temperature": f"{__name__}.Temperature"}
    assert all(x.reason == "no fastml module for this type" for x in report.left)
    after = types(model)
    assert after["features.0"] is after["features.4"] is fastml.nn.ConvReLUPool2d
    assert after["features.1"] is after["features.2"] is FusedSlot  # indices kept
    assert issubclass(FusedSlot, nn.Identity)
    assert after["classifier.0"] is FoldedLinear and after["classifier.3"] is fastml.nn.Linear

    loss_fn = nn.CrossEntropyLoss()
    assert fastml.patch(loss_fn).replaced == [Replaced("", "torch.nn.CrossEntropyLoss",
                                                       "fastml.nn.CrossEntropyLoss")]
    compare_forward_backward(model, reference, rand(5, 1, 28, 28, dtype=dtype, generator=rng), rng, loss_fn)


def test_report_reads(rng):
    text = str(fastml.patch(lenet(rng)))
    lines = text.splitlines()
    assert lines[0] == "fastml.patch: 2 replaced, 3 fused, 3 left"
    assert any(line.split() == ["replaced", "classifier.3", "torch.nn.Linear", "→", "fastml.nn.Linear"]
               for line in lines)
    assert any("features.4, features.5, features.6" in line and line.endswith("→ fastml.nn.ConvReLUPool2d")
               for line in lines)
    (batch_norm,) = [line for line in lines if "features.3" in line]  # after a pool: nothing to fold into
    assert batch_norm.split()[:5] == ["replaced", "features.3", "torch.nn.BatchNorm2d", "→", "fastml.nn.BatchNorm2d"]
    assert "not folded: no Conv2d right before it" in batch_norm and "fx=True" in batch_norm
    assert str(fastml.patch(nn.Linear(2, 2))).splitlines()[1].split()[1] == "(model)"
    assert str(fastml.unpatch(nn.ReLU())) == "fastml.unpatch: 0 restored, 0 unfused, 0 left"


def test_parameters_stay_the_same_objects_and_the_optimizer_steps_on(rng):
    model = lenet(rng)
    model.features[0].bias.requires_grad_(False)  # a frozen parameter stays frozen
    twin = copy.deepcopy(model)
    x = rand(4, 1, 28, 28, generator=rng)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)

    def step(m, o):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()

    step(model, opt), step(twin, twin_opt)  # momentum buffers exist before patching
    before = list(model.named_parameters())
    flags = [(p.requires_grad, p.dtype, p.device) for _, p in before]
    rng_state = torch.random.get_rng_state()
    fastml.patch(model)
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # the fused module is built without init
    after = list(model.named_parameters())
    assert [(n, id(p)) for n, p in after] == [(n, id(p)) for n, p in before]
    assert [(p.requires_grad, p.dtype, p.device) for _, p in after] == flags
    assert model.features[0].weight is before[0][1]

    for _ in range(2):
        step(model, opt), step(twin, twin_opt)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert_close(p, q.double(), torch.float32, scale=magnitude(q))
    assert not model.features[0].bias.requires_grad and model.features[0].bias.grad is None
    assert all(opt.state[p]["momentum_buffer"] is not None for p in model.parameters() if p.requires_grad)

    fastml.unpatch(model)
    assert [(n, id(p)) for n, p in model.named_parameters()] == [(n, id(p)) for n, p in before]
    old = model.classifier[3].weight.detach().clone()
    step(model, opt)
    assert not torch.equal(model.classifier[3].weight, old)


def test_patching_twice_changes_nothing_more(rng):
    model = lenet(rng, torch.float64)
    reference = copy.deepcopy(model)
    first = fastml.patch(model)
    structure, modules = types(model), dict(model.named_modules())
    second = fastml.patch(model)

    assert first.changed and not second.changed
    assert second.replaced == [] and second.fused == []
    assert types(model) == structure
    assert all(m is modules[name] for name, m in model.named_modules())
    already = {x.name: x.reason for x in second.left if x.reason.startswith("already fastml")}
    assert already == {"features.0": "already fastml (fused by an earlier patch)",
                       "features.4": "already fastml (fused by an earlier patch)",
                       "classifier.0": "already fastml (folded by an earlier patch)",
                       "features.3": "already fastml (replaced by an earlier patch)",
                       "classifier.3": "already fastml (replaced by an earlier patch)"}
    assert not any(x.name in ("features.1", "features.2") for x in second.left)  # the Identity slots
    compare_forward_backward(model, reference, rand(3, 1, 28, 28, dtype=torch.float64, generator=rng), rng)


def test_state_dict_round_trips_both_ways(rng):
    model = lenet(rng)
    original = model.state_dict()
    fastml.patch(model)
    patched = model.state_dict()
    assert list(patched) == list(original)
    assert all(torch.equal(patched[k], original[k]) for k in original)

    x = rand(3, 1, 28, 28, generator=rng)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = randomize(LeNet(), rng).eval()
    fresh.load_state_dict(torch.load(buffer))  # patched → unpatched
    assert_close(model(x), fresh(x).double(), scale=magnitude(fresh(x)))

    other = randomize(LeNet(), rng).eval()
    weight = model.features[0].weight
    model.load_state_dict(other.state_dict())  # unpatched → patched: copied into the same tensors
    assert model.features[0].weight is weight and torch.equal(weight, other.features[0].weight)
    assert_close(model(x), other(x).double(), scale=magnitude(other(x)))


def test_unpatch_restores_every_object_and_type(rng):
    model = lenet(rng, torch.float64)
    reference = copy.deepcopy(model)
    before = dict(model.named_modules())
    param_ids = [id(p) for p in model.parameters()]
    patched = fastml.patch(model)
    copied = copy.deepcopy(model)  # a copy of a patched model unpatches too
    report = fastml.unpatch(model)

    assert report.action == "unpatch"
    assert [r.name for r in report.replaced] == [r.name for r in patched.replaced]
    assert {r.new for r in report.replaced} == {"torch.nn.Linear", "torch.nn.BatchNorm2d"}
    assert [f.names for f in report.fused] == [f.names for f in patched.fused]
    assert report.fused[0] == Fused(LENET_FUSED[0], "fastml.nn.ConvReLUPool2d",
                                    "torch.nn.Conv2d + torch.nn.ReLU + torch.nn.MaxPool2d")
    after = dict(model.named_modules())
    assert after.keys() == before.keys()
    assert all(after[name] is m and type(after[name]) is type(m) for name, m in before.items())
    assert [id(p) for p in model.parameters()] == param_ids
    assert not any(name.startswith("_fastml") for m in model.modules() for name in vars(m))
    assert not fastml.unpatch(model).changed

    fastml.unpatch(copied)
    assert types(copied) == types(reference)
    compare_forward_backward(copied, reference, rand(2, 1, 28, 28, dtype=torch.float64, generator=rng), rng)


def test_unpatch_gives_the_conv_the_fused_modules_current_parameters(rng):
    model = lenet(rng)
    conv = model.features[0]
    fastml.patch(model)
    new_weight = nn.Parameter(rand(*conv.weight.shape, generator=rng))
    model.features[0].weight = new_weight
    model.features[0].train()
    fastml.unpatch(model)
    assert model.features[0] is conv and conv.weight is new_weight and conv.training


def test_ops_subset_then_the_rest(rng):
    model = lenet(rng, torch.float64)
    reference = copy.deepcopy(model)

    assert not fastml.patch(model, ops=[]).changed
    assert types(model) == types(reference)

    only_linear = fastml.patch(model, ops="linear")  # one name as a string
    assert [r.name for r in only_linear.replaced] == LENET_LINEARS and only_linear.fused == []
    assert Left("features.0", "torch.nn.Conv2d", "op 'conv2d' not in ops") in only_linear.left
    assert Left("features.2", "torch.nn.MaxPool2d", "op 'max_pool2d' not in ops") in only_linear.left
    fastml.unpatch(model)

    separate = fastml.patch(model, ops=("conv2d", "max_pool2d"))
    assert [r.name for r in separate.replaced] == ["features.0", "features.2", "features.4", "features.6"]
    assert separate.fused == []
    assert Left("classifier.0", "torch.nn.Linear", "op 'linear' not in ops") in separate.left

    rest = fastml.patch(model)  # fastml's own Conv2d and MaxPool2d fuse too
    assert [f.names for f in rest.fused] == LENET_FUSED
    assert rest.fused[0].old == "fastml.nn.Conv2d + torch.nn.ReLU + fastml.nn.MaxPool2d"
    assert [r.name for r in rest.replaced] == LENET_REPLACED
    compare_forward_backward(model, reference, rand(2, 1, 28, 28, dtype=torch.float64, generator=rng), rng)

    undone = fastml.unpatch(model)  # splits the runs, then gives the conv and pool back torch's class
    assert len(undone.fused) == 3 and len(undone.replaced) == 6
    assert types(model) == types(reference)


class DoubledLinear(nn.Linear):
    """A subclass with its own forward: patch must leave it."""

    def forward(self, x):
        return 2 * super().forward(x)


class Branches(nn.Sequential):
    """A Sequential whose children each see the input (summed): adjacent children do not chain."""

    def forward(self, x):
        return sum(m(x) for m in self)


class Mixed(nn.Module):
    """Input (N, 2, 16, 16). Runs fastml must not fuse, a pool returning indices, a subclass, and
    covered modules in configurations the kernels hand to torch."""

    def __init__(self):
        super().__init__()
        self.reflect = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                                     nn.MaxPool2d(2))
        self.padded = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                                    nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True))
        self.hooked = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(), nn.MaxPool2d(2))
        self.branches = Branches(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, stride=1, padding=1))
        self.indices = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(), nn.MaxPool2d(2, return_indices=True))
        self.unpool = nn.MaxUnpool2d(2)
        self.doubled = DoubledLinear(16, 3)
        self.norm = nn.LayerNorm(3)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        x = self.branches(self.hooked(self.padded(self.reflect(x))))
        x = self.unpool(*self.indices(x)).flatten(1)
        return self.head(self.norm(self.doubled(x)))


def test_mixed_model_leaves_what_fastml_cannot_take(rng):
    model = randomize(Mixed().double(), rng)
    calls = []
    model.hooked[1].register_forward_hook(lambda *_: calls.append("relu"))
    model.head.register_forward_pre_hook(lambda *_: calls.append("head"))
    reference = copy.deepcopy(model)  # the hooks come along (and append to the same list)
    report = fastml.patch(model)

    # the runs that cannot become one module give their conv the ReLU (not the hooked ReLU)
    assert [f.names for f in report.fused] == [("reflect.0", "reflect.1"), ("padded.0", "padded.1"),
                                               ("indices.0", "indices.1")]
    assert "hooks on the ReLU" in {x.name: x.reason for x in report.left}["hooked.0, hooked.1"]
    runs = {x.name: x.reason for x in report.left if "+" in x.type}
    assert runs.keys() == {"reflect.0, reflect.1, reflect.2", "padded.0, padded.1, padded.2",
                           "hooked.0, hooked.1, hooked.2", "indices.0, indices.1, indices.2", "hooked.0, hooked.1"}
    assert "padding_mode='reflect'" in runs["reflect.0, reflect.1, reflect.2"]
    assert "padding=1" in runs["padded.0, padded.1, padded.2"]
    assert "ceil_mode=True" in runs["padded.0, padded.1, padded.2"]
    assert "hooks on the ReLU" in runs["hooked.0, hooked.1, hooked.2"]
    assert "return_indices=True" in runs["indices.0, indices.1, indices.2"]
    assert Left("doubled", f"{__name__}.DoubledLinear",
                "a subclass of torch.nn.Linear: only exact torch classes are replaced "
                "(a subclass may change forward)") in report.left
    assert type(model.doubled) is DoubledLinear
    # covered modules in every configuration are replaced: their forward hands torch what no
    # kernel takes (reflect padding, padded or ceil-mode pools, indices)
    replaced = {r.name for r in report.replaced}
    assert replaced == {f"{block}.{i}" for block in ("reflect", "padded", "hooked", "branches", "indices")
                        for i in (0, 2)} - {"reflect.0", "padded.0", "indices.0"} | {"head"}
    assert type(model.branches[0]) is fastml.nn.Conv2d and type(model.branches[1]) is nn.ReLU

    x = rand(3, 2, 16, 16, dtype=torch.float64, generator=rng)
    reference(x)
    calls.clear()
    compare_forward_backward(model, reference, x, rng)
    # hooks kept by the replaced modules, called once per forward (patched model, then reference)
    assert calls == ["relu", "head", "relu", "head"]


@pytest.mark.parametrize("follower", [nn.ReLU(inplace=True), nn.Dropout(0.0, inplace=True)], ids=["relu", "dropout"])
def test_a_run_followed_by_an_in_place_module_fuses(follower, rng):
    """A module after the pool that writes its input in place changes the fused block's output;
    the block's backward reads only its window offsets (-1 where the ReLU passes nothing), as
    torch's pool reads its own input, not its output: the run fuses, and trains as torch's."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), follower).double()
    reference = copy.deepcopy(model)
    report = fastml.patch(model)
    assert ("0", "1", "2") in [f.names for f in report.fused]
    compare_forward_backward(model, reference, rand(2, 2, 8, 8, dtype=torch.float64, generator=rng), rng)


def test_shared_modules_are_patched_once_and_restored(rng):
    relu, pool, tied = nn.ReLU(), nn.MaxPool2d(2), nn.Linear(8, 8)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), relu, pool, nn.Conv2d(8, 8, 3, padding=1), relu, pool,
                          nn.Flatten(), nn.Linear(32, 8), tied, nn.Tanh(), tied)
    model = randomize(model.double(), rng)
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    report = fastml.patch(model)

    assert [f.names for f in report.fused] == [("0", "1", "2"), ("3", "4", "5")]
    assert [r.name for r in report.replaced] == ["7", "8"]  # tied once, under its first name
    assert model[8] is model[10] and type(tied) is fastml.nn.Linear
    assert list(model.state_dict()) == keys
    compare_forward_backward(model, reference, rand(2, 3, 8, 8, dtype=torch.float64, generator=rng), rng)

    fastml.unpatch(model)
    assert model[1] is model[4] is relu and model[2] is model[5] is pool
    assert type(tied) is nn.Linear and types(model) == types(reference)


def test_covered_modules_as_the_model_itself(rng):
    linear = randomize(nn.Linear(5, 3).double(), rng)
    reference = copy.deepcopy(linear)
    assert fastml.patch(linear).replaced == [Replaced("", "torch.nn.Linear", "fastml.nn.Linear")]
    assert type(linear) is fastml.nn.Linear
    compare_forward_backward(linear, reference, rand(4, 5, dtype=torch.float64, generator=rng), rng)

    weight = rand(6, generator=rng).abs() + 0.1
    for loss, make_target in [
        (nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1), lambda: torch.randint(6, (7,), generator=rng)),
        (nn.MSELoss(reduction="sum"), lambda: rand(7, 6, generator=rng)),
    ]:
        reference = copy.deepcopy(loss).double()
        report = fastml.patch(loss)
        assert len(report.replaced) == 1 and type(loss).__module__ == "fastml.nn"
        assert getattr(loss, "weight", None) is (weight if isinstance(loss, nn.CrossEntropyLoss) else None)
        x, target = rand(7, 6, generator=rng, requires_grad=True), make_target()
        out = loss(x, target)
        (xr,) = upcast(x)
        ref = reference(xr, target.double() if target.is_floating_point() else target)
        assert_close(out, ref, scale=magnitude(ref))
        out.backward()
        ref.backward()
        assert_close(x.grad, xr.grad)
        assert fastml.unpatch(loss).replaced[0].new == f"torch.nn.{type(reference).__name__}"


def test_unpatch_leaves_fastml_modules_the_user_built():
    model = nn.Sequential(fastml.nn.Linear(3, 3), nn.Linear(3, 3))
    patched = fastml.patch(model)
    assert patched.left == [Left("0", "fastml.nn.Linear", "already fastml (built so)")]
    report = fastml.unpatch(model)
    assert [r.name for r in report.replaced] == ["1"]
    assert report.left == [Left("0", "fastml.nn.Linear", "built as a fastml module, not by fastml.patch")]
    assert type(model[0]) is fastml.nn.Linear and type(model[1]) is nn.Linear


VALID = ("'linear', 'conv2d', 'max_pool2d', 'batch_norm', 'mse_loss', 'cross_entropy', 'conv_relu_pool', 'conv_bn', "
         "'conv_relu', 'linear_relu', 'bn_relu'")


@pytest.mark.parametrize("call,error,match", [
    (lambda m: fastml.patch(None), TypeError, r"patch\(\) argument 'model' must be a torch.nn.Module, got NoneType"),
    (lambda m: fastml.patch(nn.Linear), TypeError, r"argument 'model' must be a torch.nn.Module, got type"),
    (lambda m: fastml.unpatch([m]), TypeError, r"unpatch\(\) argument 'model' must be a torch.nn.Module, got list"),
    (lambda m: fastml.patch(m, ops=["linear", "relu", "Conv2d"]), ValueError,
     rf"unknown op name\(s\) in patch\(\) argument 'ops': 'Conv2d', 'relu'; valid names: {VALID}$"),
    (lambda m: fastml.patch(m, ops="lineer"), ValueError, r"unknown op name\(s\) .*: 'lineer'; valid names"),
    (lambda m: fastml.patch(m, ops=3), TypeError,
     r"argument 'ops' must be None, an op name or an iterable of op names, got int"),
    (lambda m: fastml.patch(m, ops=[nn.Linear]), TypeError, r"argument 'ops' must hold op names \(str\), got <class"),
])
def test_bad_inputs_are_clear_errors_and_change_nothing(rng, call, error, match):
    model = lenet(rng)
    before = types(model)
    with pytest.raises(error, match=match):
        call(model)
    assert types(model) == before


class CountingNoise(nn.Module):
    """A parametrization that counts its evaluations and adds noise from torch's generator:
    what spectral_norm's power iteration (state advanced at each read) and a random weight
    (DropConnect) do to a layer that reads its weight more than once per call."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, weight):
        self.calls += 1
        return weight + 0.01 * torch.randn_like(weight)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_a_parametrization_added_after_patching_is_evaluated_as_often_as_unpatched(rng, train):
    """torch's modules read a parametrized tensor once per call; fastml's must too (and time
    nothing with it), for the layers patch replaced, a fused Conv2d → ReLU → MaxPool2d, a folded
    Conv2d → BatchNorm2d → ReLU and a Linear → ReLU run."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    reference = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                              nn.Flatten(), nn.Linear(8 * 4 * 4, 12), nn.ReLU(), nn.Linear(12, 5)).double()
    model = copy.deepcopy(reference)
    fastml.patch(model)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=rng)
    for net in (reference, model):
        net.train(train)
        with torch.no_grad():
            net(x)  # the routes settle before the parametrizations come
        for index in (0, 3, 4, 7, 9):
            torch.nn.utils.parametrize.register_parametrization(net[index], "weight", CountingNoise())
            net[index].parametrizations.weight[0].calls = 0  # (registering evaluates it once)
    for _ in range(3):
        torch.manual_seed(1)
        expected = reference(x)
        torch.manual_seed(1)
        actual = model(x)
        assert_close(actual, expected, scale=magnitude(expected))
    for index in (0, 3, 4, 7, 9):
        assert model[index].parametrizations.weight[0].calls == reference[index].parametrizations.weight[0].calls == 3
