"""fastml.patch's Conv2d → BatchNorm2d (→ ReLU) fold (fastml/_fold.py): in eval mode one
convolution with the batch norm folded in, in training mode the modules as torch runs them.
Patched against unpatched in float64, outputs and every gradient, on every backend."""

from __future__ import annotations

import copy
import functools
import pickle
import re

import pytest
import torch
from conftest import assert_close, magnitude, prefer, raised
from torch import nn

import fastml
from fastml import _fold, _onednn, _route, _runs, _winograd
from fastml._patch import _FOLDED_DESCRIPTION, _RELU_DESCRIPTION


def randomise_batch_norms(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Running statistics and affine parameters far from their initial 0 / 1, so a fold that
    ignored any of them would show."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.running_mean.copy_(torch.rand(module.num_features, generator=generator) * 2 - 1)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                if module.affine:
                    module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                    module.bias.copy_(torch.rand(module.num_features, generator=generator) * 2 - 1)
    return model


def conv_bn_relu(bias: bool = False, groups: int = 1, affine: bool = True, padding_mode: str = "zeros") -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, bias=bias, groups=groups, padding_mode=padding_mode),
                         nn.BatchNorm2d(6, affine=affine), nn.ReLU(inplace=True),
                         nn.Conv2d(6, 5, 1, stride=2), nn.BatchNorm2d(5), nn.Flatten())


def patched_pair(build, generator, fx=False):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    reference = randomise_batch_norms(build().double(), generator)
    model = copy.deepcopy(reference)
    report = fastml.patch(model, fx=fx)
    return reference, model, report


def outputs_and_gradients(model, x):
    x = x.detach().requires_grad_()
    out = model(x)
    weights = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out * weights).sum(), [x, *params])
    return [out.detach(), *grads]


def assert_same_model(reference, model, x):
    for got, expected in zip(outputs_and_gradients(model, x), outputs_and_gradients(reference, x)):
        assert_close(got, expected, scale=max(1.0, float(expected.abs().max())))


# Its Triton cases (seconds each on the interpreter) repeat what the kernels' own tests run: long there.
@pytest.mark.interpreter_long()
@pytest.mark.parametrize("options", [{}, {"bias": True}, {"groups": 2}, {"affine": False},
                                     {"padding_mode": "reflect"}], ids=["plain", "bias", "groups", "no-affine",
                                                                       "reflect"])
def test_folded_equals_unfolded_in_eval_and_training(backend, rng, options):
    reference, model, report = patched_pair(lambda: conv_bn_relu(**options), rng)
    assert [f.names for f in report.fused] == [("0", "1", "2"), ("3", "4")]
    assert all(f.new == _FOLDED_DESCRIPTION for f in report.fused)
    x = torch.randn(3, 4, 9, 7, dtype=torch.float64, generator=rng)
    for mode in ("eval", "train", "eval", "train"):  # back and forth
        getattr(reference, mode)()
        getattr(model, mode)()
        assert_same_model(reference, model, x)
        for got, expected in zip(model.buffers(), reference.buffers()):  # training updates the statistics alike
            assert_close(got, expected) if got.is_floating_point() else torch.testing.assert_close(got, expected)
    assert _fold.fold_of(model[0]).active() is False  # left in training mode


def batch_norms_computing(model, x, monkeypatch) -> list:
    """The batch norms that compute in a call of ``model`` on ``x`` without gradients (every
    batch-norm forward, torch's or fastml's, checks its input's rank first): in eval mode, those
    not folded."""
    called = []
    check = torch.nn.BatchNorm2d._check_input_dim
    monkeypatch.setattr(torch.nn.BatchNorm2d, "_check_input_dim", lambda self, x: called.append(self) or check(self, x))
    with torch.no_grad():
        model(x)
    return called


def test_eval_runs_one_convolution_per_run(rng, monkeypatch):
    """While the fold applies, the batch norm does no work: it passes the convolution's output on.
    (Every batch-norm forward, torch's or fastml's, checks its input's rank first.)"""
    _, model, _ = patched_pair(conv_bn_relu, rng)
    model.eval()
    called = []
    check = torch.nn.BatchNorm2d._check_input_dim
    monkeypatch.setattr(torch.nn.BatchNorm2d, "_check_input_dim", lambda self, x: called.append(self) or check(self, x))
    with torch.no_grad():
        model(torch.randn(2, 4, 8, 8, dtype=torch.float64))
    assert called == []
    model.train()
    model(torch.randn(2, 4, 8, 8, dtype=torch.float64))
    assert {id(m) for m in called} == {id(m) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert len({id(m) for m in called}) == 2


def test_the_fold_follows_parameter_and_statistic_changes(rng):
    """Cached folded parameters are refreshed after an in-place update (an optimizer step, a
    training step's running statistics, load_state_dict)."""
    reference, model, _ = patched_pair(conv_bn_relu, rng)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=rng)
    for m in (reference, model):
        m.eval()
    with torch.no_grad():
        model(x)  # caches the folded parameters
        for m in (reference, model):
            m[0].weight.mul_(1.5)
            m[1].running_var.add_(0.25)
            m[4].bias.sub_(0.5)
        assert_close(model(x), reference(x))
        state = randomise_batch_norms(copy.deepcopy(reference), rng).state_dict()
        reference.load_state_dict(state)
        model.load_state_dict(state)
        assert_close(model(x), reference(x))


@pytest.mark.parametrize("tuning", ["on", "off"])
def test_the_fold_follows_statistics_torch_updates_without_a_version(tuning, rng):
    """torch's batch_norm updates the running statistics in place without moving their version
    counters: a training forward between two evaluations, the convolution's weight unchanged (a
    frozen backbone, torch.optim.swa_utils.update_bn), must still give the new fold."""
    fastml.set_tuning(tuning)
    try:
        reference, model, _ = patched_pair(conv_bn_relu, rng)
        x = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=rng)
        for scale in (2.0, 5.0):
            batch = torch.randn(6, 4, 8, 8, dtype=torch.float64, generator=rng) * scale
            for m in (reference, model):
                m.eval()
                with torch.no_grad():
                    m(x)  # (the fold cached)
                m.train()
                with torch.no_grad():
                    m(batch)  # new running statistics, the same weights
                m.eval()
            with torch.no_grad():
                assert_close(model(x), reference(x))
    finally:
        fastml.set_tuning("on")


def folded_in_eval(rng):
    """(reference, patched model, input): both in eval mode, the model's fold formed and cached by
    a first call."""
    reference, model, _ = patched_pair(conv_bn_relu, rng)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=rng)
    for m in (reference, model):
        m.eval()
    with torch.no_grad():
        model(x)
    return reference, model, x


def test_a_write_through_data_is_taken_up_when_the_mode_switches(rng):
    """A write through ``.data`` moves no version counter (autograd does not see it either):
    ``model.eval()`` drops the cached fold, so the next call folds the new values."""
    reference, model, x = folded_in_eval(rng)
    with torch.no_grad():
        for m in (reference, model):
            m[0].weight.data.mul_(2)
            m[1].running_var.data.fill_(4.0)
            m.eval()
        assert_close(model(x), reference(x))


@pytest.mark.parametrize("built_in_inference_mode", [False, True])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_the_fold_runs_in_inference_mode(built_in_inference_mode, memory_format, rng):
    """Under torch.inference_mode the fold, and the variants' weights derived from it, are
    inference tensors, which have no version counter; so are a model's own parameters where it
    was built in inference mode, which inference mode may also change in place."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    x = torch.randn(2, 4, 8, 8, generator=rng).contiguous(memory_format=memory_format)
    with torch.inference_mode(built_in_inference_mode):
        reference = randomise_batch_norms(conv_bn_relu(), rng).eval()
        model = copy.deepcopy(reference)
    fastml.patch(model)
    with torch.inference_mode():
        for _ in range(3):  # the route decided, then followed
            assert_close(model(x), reference(x), torch.float32)
        if built_in_inference_mode:
            for m in (reference, model):
                m[0].weight.mul_(-1)
                m[1].running_mean.add_(1.0)
            assert_close(model(x), reference(x), torch.float32)


FUSED_OPTIMIZERS = {"SGD": lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9, fused=True),
                    "Adam": lambda ps: torch.optim.Adam(ps, lr=0.01, fused=True)}


def fused_steps_between_no_grad_calls(reference, model, x, optimizer, steps=3):
    """``steps`` steps of a fused ``optimizer`` on each model in eval mode (frozen batch norms,
    whose affine parameters still get gradients), each model called without gradients between
    its backward and its step, so that what it caches there is of the weights the step changes;
    each step's outputs compared by ``assert_close`` without gradients."""
    optimizers = [FUSED_OPTIMIZERS[optimizer](m.eval().parameters()) for m in (reference, model)]
    for _ in range(steps):
        for m, opt in zip((reference, model), optimizers):
            m(x).sum().backward()
            with torch.no_grad():
                m(x)
            opt.step()  # no version counter moves
            opt.zero_grad()
        with torch.no_grad():
            expected = reference(x)
            assert_close(model(x), expected, x.dtype, scale=magnitude(expected))


@pytest.mark.parametrize("optimizer", list(FUSED_OPTIMIZERS))
def test_the_fold_follows_fused_optimizer_steps(optimizer, rng):
    """torch's fused optimizers write the parameters without moving their version counters: a
    fold cached between the backward and the step is formed anew after it."""
    reference, model, _ = patched_pair(conv_bn_relu, rng)
    fused_steps_between_no_grad_calls(reference, model, torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=rng),
                                      optimizer)


@pytest.mark.parametrize("variant", ["onednn_packed", "winograd"])
@pytest.mark.parametrize("build", [conv_bn_relu, lambda: nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())],
                         ids=["folded", "conv-relu"])
def test_packed_weights_follow_fused_optimizer_steps(variant, build, monkeypatch, rng):
    """The variants' packed copies (of the folded weight; of a conv's own Parameter in a
    Conv2d → ReLU run) follow a fused step too. float32 channels-last: where they run."""
    if _onednn.ops() is None or variant == "winograd" and not _winograd._kernels_built():
        pytest.skip(f"{variant} is not available in this build")
    prefer(monkeypatch, variant)
    reference, model, _ = patched_pair(build, rng)
    reference, model = reference.float(), model.float()
    x = torch.randn(2, 4, 8, 8, generator=rng).contiguous(memory_format=torch.channels_last)
    fused_steps_between_no_grad_calls(reference, model, x, "SGD")
    assert variant in _route.routes(model[0]).values()


@pytest.mark.parametrize("build", [conv_bn_relu, lambda: nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())],
                         ids=["conv-bn-relu", "conv-relu"])
def test_packed_weights_follow_the_courses_data_steps_in_training(build, monkeypatch, rng):
    """The course's hand-written step, ``param.data.sub_(lr * param.grad / batch_size)``, moves no
    version counter: a training call (gradients wanted) forms Winograd's transformed weight (the
    variant that keeps one in training) anew, so each step's forward sees the last step's weights."""
    variant = "winograd"
    if _onednn.ops() is None or not _winograd._kernels_built():
        pytest.skip(f"{variant} is not available in this build")
    prefer(monkeypatch, variant)
    reference, model, _ = patched_pair(build, rng)
    reference, model = reference.float().train(), model.float().train()
    x = torch.randn(2, 4, 8, 8, generator=rng).contiguous(memory_format=torch.channels_last)
    for _ in range(3):
        outputs = []
        for m in (reference, model):
            out = m(x)
            outputs.append(out.detach())
            out.sum().backward()
            for param in m.parameters():
                param.data.sub_(0.01 * param.grad / 2)
                param.grad = None
        assert_close(outputs[1], outputs[0], x.dtype, scale=magnitude(outputs[0]))
    assert variant in _route.routes(model[0]).values()


def test_a_new_parameter_in_place_of_a_freed_one_is_folded(rng):
    """A Parameter put in place of one that is freed may take its storage, at the same version:
    the cache holds what it was formed from, so it cannot."""
    for _ in range(5):
        reference, model, x = folded_in_eval(rng)
        with torch.no_grad():
            weight = torch.randn(reference[0].weight.shape, dtype=torch.float64, generator=rng)
            for m in (reference, model):
                del m[0].weight
                m[0].weight = nn.Parameter(weight.clone())
            assert_close(model(x), reference(x))


def test_a_run_called_from_forward_is_one_run_only_there(rng, monkeypatch):
    """A run folds only where the forward that the trace showed calls it: the block's modules
    called on their own (a feature tap) or by a GraphModule that torch.fx made of the patched
    block compute themselves, as torch's, and the block itself still runs one convolution per
    run in eval mode (fastml/_runs.py)."""
    reference, model, _ = patched_pair(Block, rng, fx=True)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, generator=rng)
    graph = torch.fx.symbolic_trace(model)
    for mode in ("eval", "train"):
        for m in (reference, model, graph):
            getattr(m, mode)()
        for name in ("conv1", "bn1", "relu", "conv2", "bn2"):
            with torch.no_grad():
                assert_close(getattr(model, name)(x.clone()), getattr(reference, name)(x.clone()))
        assert_same_model(reference, graph, x)
        assert_same_model(reference, model, x)
    model.eval()
    assert batch_norms_computing(model, x, monkeypatch) == []


def test_a_shared_relu_called_twice_on_a_runs_output_gives_a_new_tensor(rng):
    """The first call of a shared ReLU on a run's output passes it through (the run applied the
    ReLU); a second call on it gives a new tensor, as torch's relu, which the caller may change in
    place without changing the first."""
    class TwoCalls(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.relu = nn.Linear(4, 4), nn.ReLU()

        def forward(self, x):
            a = self.relu(self.fc(x))
            b = self.relu(a)
            b.mul_(2)
            return a + b

    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    reference = TwoCalls().double()
    model = copy.deepcopy(reference)
    fastml.patch(model, fx=True)
    x = torch.randn(3, 4, dtype=torch.float64, generator=rng)
    with torch.no_grad():
        assert_close(model(x), reference(x))


def test_state_dict_parameters_and_classes_stay_the_users(rng):
    reference, model, _ = patched_pair(conv_bn_relu, rng)
    assert list(model.state_dict()) == list(reference.state_dict())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in reference.named_parameters()]
    assert [n for n, _ in model.named_modules()] == [n for n, _ in reference.named_modules()]
    assert isinstance(model[0], nn.Conv2d) and isinstance(model[1], nn.BatchNorm2d) and isinstance(model[2], nn.ReLU)
    reference.load_state_dict(model.state_dict())


def test_unpatch_restores_the_classes_and_patching_twice_folds_once(rng):
    reference, model, _ = patched_pair(conv_bn_relu, rng)
    conv, bn, relu = model[0], model[1], model[2]
    second = fastml.patch(model)
    assert second.fused == []
    assert [(left.name, left.reason) for left in second.left if "folded" in left.reason] == [
        ("0", "already fastml (folded by an earlier patch)"), ("3", "already fastml (folded by an earlier patch)")]
    undone = fastml.unpatch(model)
    assert sorted(f.names for f in undone.fused) == [("0", "1", "2"), ("3", "4")]
    assert (type(model[0]), type(model[1]), type(model[2])) == (nn.Conv2d, nn.BatchNorm2d, nn.ReLU)
    assert model[0] is conv and model[1] is bn and model[2] is relu  # the same objects throughout
    assert all(_fold.fold_of(m) is None for m in model.modules())
    model.eval()
    reference.eval()
    assert_same_model(reference, model, torch.randn(2, 4, 6, 6, dtype=torch.float64, generator=rng))


def test_copies_and_pickles_stay_folded_and_exact(rng):
    reference, model, _ = patched_pair(conv_bn_relu, rng)
    reference.eval()
    model.eval()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, generator=rng)
    with torch.no_grad():
        model(x)
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert type(clone[0]) is _fold.FoldedConv2d and _fold.fold_of(clone[1]).bn is clone[1]
            assert_close(clone(x), reference(x))


@pytest.mark.parametrize("tensor, replacement", [
    ("bn.running_mean", "short"), ("bn.running_var", "short"), ("bn.weight", "short"), ("bn.bias", "short"),
    ("conv.bias", "short"), ("bn.running_mean", "float32"), ("bn.weight", "float32"), ("conv.bias", "float32")])
def test_tensors_replaced_after_patching_unfold_as_torch(rng, tensor, replacement):
    """A batch norm's statistic or parameter, or the conv's bias, replaced after patching by one
    of another size or dtype: torch's modules refuse it, where the fold would broadcast or cast it
    into a folded weight. The run computes unfolded, and raises what torch raises."""
    reference, model, _ = patched_pair(lambda: conv_bn_relu(bias=True), rng)
    reference.eval()
    model.eval()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, generator=rng)
    with torch.no_grad():
        model(x)  # folded once first: a cached fold must not outlive its tensors
        for net in (reference, model):
            owner = net[0] if tensor.startswith("conv") else net[1]
            name = tensor.split(".")[1]
            old = getattr(owner, name)
            new = old[:1].clone() if replacement == "short" else old.float()
            if isinstance(old, nn.Parameter):
                setattr(owner, name, nn.Parameter(new))
            else:
                setattr(owner, name, new)
        error = raised(lambda: reference(x))
        assert error is not None
        with pytest.raises(type(error), match=re.escape(str(error).splitlines()[0])):
            model(x)


def test_torch_func_transforms_over_a_folded_runs_parameters(rng):
    """torch.func over the parameters (functional_call under jvp, and vmap over stacked copies
    of them, as model ensembling does) of an eval-mode folded run: their wrapped tensors have no
    storage to cache a fold by; the fold is formed from them at each call, as torch computes."""
    reference, model, _ = patched_pair(conv_bn_relu, rng)
    reference.eval()
    model.eval()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, generator=rng)
    with torch.no_grad():
        model(x)  # a cached fold first

    def jvp_of(net):
        params = dict(net.named_parameters())
        tangents = {name: torch.ones_like(p) for name, p in params.items()}
        return torch.func.jvp(lambda p: torch.func.functional_call(net, p, (x,)), (params,), (tangents,))

    def ensemble_of(net):
        copies = [net, copy.deepcopy(net)]
        params, buffers = torch.func.stack_module_state(copies)
        return torch.func.vmap(lambda p, b: torch.func.functional_call(net, (p, b), (x,)))(params, buffers)

    for transform in (jvp_of, ensemble_of):
        expected, actual = transform(reference), transform(model)
        for a, e in zip(actual if isinstance(actual, tuple) else (actual,),
                        expected if isinstance(expected, tuple) else (expected,)):
            assert_close(a, e)


def test_what_does_not_fold_and_why(rng):
    hooked = conv_bn_relu()
    hooked[1].register_forward_hook(lambda *args: None)
    report = fastml.patch(hooked)
    assert [f.names for f in report.fused] == [("3", "4")]
    (reason,) = [left.reason for left in report.left if left.name == "0, 1, 2"]
    assert reason == "not folded: hooks on the batch norm (a folded run would not call them as before)"
    # A batch norm without running statistics normalises with the batch's even in eval mode.
    reference = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).double()
    model = copy.deepcopy(reference)
    fastml.patch(model)
    reference.eval()
    model.eval()
    assert not _fold.fold_of(model[0]).active()
    assert_same_model(reference, model, torch.randn(2, 3, 7, 7, dtype=torch.float64, generator=rng))
    only_linear = fastml.patch(conv_bn_relu(), ops="linear")
    assert only_linear.fused == []


class Block(nn.Module):
    """ResNet's basic block: layers called from forward, one ReLU module used twice."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


class BlockThroughHelpers(Block):
    """The block's runs called from its forward through a nested function over local names and a
    static method (as model code often does): the frames between the forward and the conv."""

    @staticmethod
    def unit(conv, bn, t):
        return bn(conv(t))

    def forward(self, x):
        conv1, bn1, relu = self.conv1, self.bn1, self.relu

        def stem(t):
            return relu(bn1(conv1(t)))

        return self.relu(self.unit(self.conv2, self.bn2, stem(x)) + x)


class BlockThroughReduce(Block):
    def forward(self, x):
        out = functools.reduce(lambda t, module: module(t), (self.conv1, self.bn1, self.relu, self.conv2, self.bn2), x)
        return self.relu(out + x)


class BlockNamingItselfOtherwise(Block):
    """The forward's first argument not named ``self``: the block is found by position."""

    def forward(block, x):  # noqa: N805
        out = block.relu(block.bn1(block.conv1(x)))
        return block.relu(block.bn2(block.conv2(out)) + x)


@pytest.mark.parametrize("build", [BlockThroughHelpers, BlockThroughReduce, BlockNamingItselfOtherwise])
def test_a_run_called_through_helpers_of_the_forward_folds(build, rng, monkeypatch):
    """The forward that the trace showed calling the run is found a few frames up: the runs fold
    (no batch norm computes in eval) and compute as the unpatched block."""
    reference, model, report = patched_pair(build, rng, fx=True)
    assert sorted(f.names for f in report.fused) == [("conv1", "bn1", "relu"), ("conv2", "bn2")]
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, generator=rng)
    for mode in ("train", "eval"):
        getattr(reference, mode)()
        getattr(model, mode)()
        assert_same_model(reference, model, x)
    assert batch_norms_computing(model, x, monkeypatch) == []


def test_fx_folds_runs_called_from_forward(backend, rng):
    reference, model, report = patched_pair(Block, rng, fx=True)
    # The ReLU is called twice: it folds into the first run, which marks its output, and still
    # applies itself to the sum, which no run marked.
    assert sorted(f.names for f in report.fused) == [("conv1", "bn1", "relu"), ("conv2", "bn2")]
    assert type(model.relu) is _fold.FoldedReLU and not _fold.fold_of(model.relu).relu_exclusive
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, generator=rng)
    for mode in ("eval", "train", "eval"):
        getattr(reference, mode)()
        getattr(model, mode)()
        assert_same_model(reference, model, x)
        with torch.inference_mode():  # no version counters to mark with: the ReLU runs
            assert_close(model(x), reference(x))
    assert len(fastml.unpatch(model).fused) == 2 and type(model.relu) is nn.ReLU
    without_fx = fastml.patch(randomise_batch_norms(Block(), rng))
    assert without_fx.fused == []  # not a Sequential: nothing folds unless asked, and the report says how
    # the batch norms are fastml's, unfolded, and the report says how they would fold
    assert {r.name for r in without_fx.replaced if "fx=True" in r.note} == {"bn1", "bn2"}


class Branching(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: torch.fx cannot trace it
            return self.bn(self.conv(x))
        return x


def test_fx_leaves_a_model_it_cannot_trace_and_says_why():
    report = fastml.patch(Branching(), fx=True)
    assert report.fused == []
    (left,) = [left for left in report.left if left.name == ""]
    assert left.reason.startswith("not traced by torch.fx (TraceError") and "only runs inside nn.Sequential" in left.reason


class ReadTwiceInTraining(nn.Module):
    """A batch norm's output that the forward reads twice in training and once in eval: a trace in
    either mode alone shows one of the two."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()

    def forward(self, x):
        z = self.bn(self.conv(x))
        return self.relu(z) + z if self.training else self.relu(z)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fx_folds_only_what_both_modes_trace_alike(mode, rng):
    torch.manual_seed(0)
    reference = randomise_batch_norms(getattr(ReadTwiceInTraining().double(), mode)(), rng)
    model = copy.deepcopy(reference)
    report = fastml.patch(model, fx=True)  # traced in both modes, whichever the model is in
    # the batch norm's output goes to the ReLU alone in eval only: the conv and the batch norm fold
    assert [f.names for f in report.fused] == [("conv", "bn")] and model.training == reference.training
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, generator=rng)
    for step in ("eval", "train", "eval"):
        getattr(reference, step)()
        getattr(model, step)()
        assert_same_model(reference, model, x)
    block_in_eval = fastml.patch(Block().eval(), fx=True)
    assert [f.names for f in block_in_eval.fused] == [("conv1", "bn1", "relu"), ("conv2", "bn2")]


def test_fx_a_conv_that_cannot_fold_leaves_its_batch_norm_to_its_relu():
    model = LazyOffset()
    model.conv.register_forward_hook(lambda module, args, out: None)  # a fold would not call it
    report = fastml.patch(model, fx=True)
    assert [f.names for f in report.fused] == [("bn", "relu")]
    assert [left.reason for left in report.left if left.name == "conv, bn, relu"] == [
        "not folded: hooks on the conv (a folded run would not call them as before)"]


class LazyOffset(nn.Module):
    """A block that builds a tensor at its first call and keeps it (as models keep a mask or a
    positional table), and counts its calls: torch.fx's trace runs this forward on proxies."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.offset, self.calls, self.cache, self.hooked = None, 0, {}, False

    def forward(self, x):
        self.calls += 1
        if self.offset is None:
            self.offset = torch.ones_like(x[0])
            self.register_buffer("scale", torch.full_like(x[0, :1], 2.0))
            self.cache["shift"] = torch.full_like(x[0, :1, :1], 0.5)
        if not self.hooked:  # a hook registered once, at the first call
            self.relu.register_forward_hook(lambda module, args, out: out * 2)
            self.hooked = True
        return self.relu(self.bn(self.conv(x * self.scale + self.offset))) + self.cache["shift"]


class LazyThenBranching(nn.Module):
    """LazyOffset, then a layer built at the first call and a branch on the data: the trace runs
    the block, then fails."""

    def __init__(self):
        super().__init__()
        self.block = LazyOffset()

    def forward(self, x):
        out = self.block(x)
        if "tail" not in self._modules:
            self.tail = nn.Tanh()
        out = self.tail(out)
        return out if out.sum() > 0 else -out


@pytest.mark.parametrize("build", [LazyOffset, LazyThenBranching])
def test_fx_tracing_leaves_the_model_as_it_was(build, rng):
    reference, model, report = patched_pair(build, rng, fx=True)
    block = model if build is LazyOffset else model.block
    folded = [("conv", "bn", "relu")] if build is LazyOffset else []
    assert [f.names for f in report.fused] == folded
    # what the forward kept during the trace (the tracer's proxies) is gone again
    assert block.offset is None and block.calls == 0 and "scale" not in block._buffers and "tail" not in model._modules
    assert block.cache == {} and not block.hooked and not block.relu._forward_hooks
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, generator=rng)
    for mode in ("eval", "train", "eval"):
        getattr(reference, mode)()
        getattr(model, mode)()
        assert_same_model(reference, model, x)
    assert type(block.offset) is torch.Tensor and model.state_dict().keys() == reference.state_dict().keys()


def test_fx_conv_output_read_twice_does_not_fold(rng):
    class TwoReaders(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    assert fastml.patch(TwoReaders(), fx=True).fused == []


def test_bad_fx_argument():
    with pytest.raises(TypeError, match="patch\\(\\) argument 'fx' must be a bool"):
        fastml.patch(conv_bn_relu(), fx="yes")


def test_zoo_models_fold_exactly(rng):
    """Every model of the zoo, patched with fx: eval outputs equal the unpatched model's (float64)."""
    from fastml import zoo

    for name in ("resnet18", "mobilenet_v2", "googlenet", "regnet_y_400mf"):
        reference, model, report = patched_pair(lambda name=name: zoo.build(name, num_classes=7), rng, fx=True)
        assert any(f.new == _FOLDED_DESCRIPTION for f in report.fused), name
        reference.eval()
        model.eval()
        x = torch.randn(1, 3, 48, 48, dtype=torch.float64, generator=rng)
        with torch.no_grad():
            assert_close(model(x), reference(x), scale=float(reference(x).abs().max()))


def test_a_folded_model_compiles(rng):
    """torch.compile traces the fold (no cached tensors, whose versions a trace cannot read)."""
    reference, model, _ = patched_pair(conv_bn_relu, rng)
    reference.eval()
    model.eval()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=rng)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert_close(compiled(x), reference(x))


# ------------------------------------------------------------------ Conv2d → ReLU (op "conv_relu")

def conv_relu_model(shared_relu: bool = False) -> nn.Sequential:
    relu = nn.ReLU()
    return nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), relu, nn.Conv2d(6, 5, 1, stride=2),
                         relu if shared_relu else nn.ReLU(), nn.Flatten())


def test_conv_relu_gets_the_relu_on_its_output_in_both_modes(backend, rng):
    reference, model, report = patched_pair(conv_relu_model, rng)
    assert [f.names for f in report.fused] == [("0", "1"), ("2", "3")]
    assert all(f.new == _RELU_DESCRIPTION for f in report.fused)
    assert type(model[1]) is _fold.FoldedReLU and _fold.fold_of(model[0]).bn is None
    x = torch.randn(3, 4, 9, 7, dtype=torch.float64, generator=rng)
    for mode in ("train", "eval", "train"):
        getattr(reference, mode)()
        getattr(model, mode)()
        assert _fold.fold_of(model[0]).active()
        assert_same_model(reference, model, x)
    undone = fastml.unpatch(model)
    assert len(undone.fused) == 2 and type(model[0]) is nn.Conv2d and type(model[1]) is nn.ReLU
    assert_same_model(reference, model, x)


def test_a_relu_sitting_in_two_places_folds_into_each_run(rng):
    """Each run marks its output; the shared ReLU passes a marked tensor through, and applies
    itself to anything else (here: the first conv's output, the conv called on its own)."""
    reference, model, report = patched_pair(lambda: conv_relu_model(shared_relu=True), rng)
    assert [f.names for f in report.fused] == [("0", "1"), ("2", "3")]
    assert type(model[1]) is _fold.FoldedReLU and not _fold.fold_of(model[2]).relu_exclusive
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, generator=rng)
    assert_same_model(reference, model, x)
    with torch.no_grad():
        out = model[0](x)  # on its own: the convolution alone, as torch's
        assert_close(out, reference[0](x))
        assert_close(model[1](out), out.relu())
        assert model[1](out) is not out
    undone = fastml.unpatch(model)
    assert len(undone.fused) == 2 and type(model[1]) is nn.ReLU and type(model[2]) is nn.Conv2d
    assert_same_model(reference, model, x)


class ConvReLUFromForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.relu = nn.Conv2d(3, 4, 3), nn.ReLU()
        self.pool_conv, self.pool_relu, self.pool = nn.Conv2d(4, 4, 1), nn.ReLU(), nn.MaxPool2d(2)

    def forward(self, x):
        return self.pool(self.pool_relu(self.pool_conv(self.relu(self.conv(x)))))


def test_fx_gives_a_conv_its_relu_but_leaves_conv_relu_pool_to_the_fusion(rng):
    reference, model, report = patched_pair(ConvReLUFromForward, rng, fx=True)
    assert [f.names for f in report.fused] == [("conv", "relu")]
    assert type(model.pool_conv) is fastml.nn.Conv2d
    assert_same_model(reference, model, torch.randn(2, 3, 8, 9, dtype=torch.float64, generator=rng))


# ---------------------------------------------------------------- Linear → ReLU (op "linear_relu")

def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 9), nn.ReLU(), nn.Dropout(0.0), nn.Linear(9, 7), nn.ReLU(),
                         nn.Linear(7, 3))


def test_linear_relu_gets_the_relu_on_its_output(backend, rng):
    reference, model, report = patched_pair(mlp, rng)
    assert [f.names for f in report.fused] == [("1", "2"), ("4", "5")]
    assert type(model[1]) is _fold.FoldedLinear and type(model[2]) is _fold.FoldedReLU
    assert type(model[6]) is fastml.nn.Linear
    x = torch.randn(5, 3, 4, dtype=torch.float64, generator=rng)
    for mode in ("train", "eval"):
        getattr(reference, mode)()
        getattr(model, mode)()
        assert_same_model(reference, model, x)
        with torch.no_grad():
            assert_close(model(x), reference(x))
    fastml.unpatch(model)
    assert [type(m) for m in model] == [type(m) for m in reference]
    assert_same_model(reference, model, x)


@pytest.mark.parametrize("path", ["_torch_relu", "_fastml_relu"])
def test_linear_relu_on_sequences_leaves_the_products_view_alone(rng, path):
    """On (B, L, D) sequences a Linear's output is a view of its product's. A ReLU in place on it
    made autograd's backward copy through the product (CopySlices: a zero fill and a copy per
    layer, a patched MLP's step at 0.89x torch's): both of the run's paths apply it out of place
    there, as torch's nn.ReLU does, and in place elsewhere."""
    reference, model, _ = patched_pair(lambda: nn.Sequential(nn.Linear(6, 5), nn.ReLU()), rng)
    x = torch.randn(3, 4, 6, dtype=torch.float64, generator=rng)
    out = getattr(model[0], path)(x)
    assert type(out.grad_fn).__name__ == "ReluBackward0"
    assert_same_model(reference, model, x)


@pytest.mark.parametrize("grad", [True, False], ids=["train", "no_grad"])
@pytest.mark.parametrize("large", [True, False], ids=["at_half_l2", "under_half_l2"])
def test_linear_relu_on_torchs_linear_takes_the_run_only_where_the_relu_in_place_pays(rng, monkeypatch, large,
                                                                                     grad):
    """Settled on torch's linear, the run applies the ReLU itself, in place, with its checks and
    mark, only where the output is at least half the L2; under, the linear returns torch's
    product and the ReLU module applies itself, as torch's."""
    reference, model, _ = patched_pair(lambda: nn.Sequential(nn.Linear(6, 5), nn.ReLU()), rng)
    x = torch.randn(4, 6, dtype=torch.float64, generator=rng)
    out_bytes = 4 * 5 * 8
    monkeypatch.setattr(_route, "settled", lambda *args: (_route.TORCH, None))
    monkeypatch.setattr(_fold, "l2_bytes", lambda: 2 * out_bytes + (0 if large else 2))
    passed = []
    passes = _runs.passes
    monkeypatch.setattr(_runs, "passes", lambda module, input: passed.append(passes(module, input)) or passed[-1])
    with torch.set_grad_enabled(grad):
        assert_close(model(x), reference(x))
    assert passed == [large]
    assert_same_model(reference, model, x)


def test_relu_in_place_spares_an_allocation_but_never_rewrites_a_tracked_view():
    from fastml.ops import relu_in_place
    fresh = torch.randn(4, 3)
    assert relu_in_place(fresh) is fresh and (fresh >= 0).all()
    base = torch.randn(2, 6)
    view = base.view(3, 4)
    assert relu_in_place(view) is view  # no gradient tracked: in place is free
    weight = torch.randn(5, 3, requires_grad=True)
    tracked = torch.nn.functional.linear(torch.randn(2, 4, 3), weight, torch.randn(5))
    assert tracked._base is not None
    before = tracked.detach().clone()
    out = relu_in_place(tracked)
    assert out is not tracked and torch.equal(tracked.detach(), before) and torch.equal(out, before.relu())


class MLPFromForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden, self.act, self.out = nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)

    def forward(self, x):
        return self.out(self.act(self.hidden(x)))


def test_fx_gives_a_linear_its_relu(rng):
    reference, model, report = patched_pair(MLPFromForward, rng, fx=True)
    assert [f.names for f in report.fused] == [("hidden", "act")]
    assert_same_model(reference, model, torch.randn(4, 6, dtype=torch.float64, generator=rng))
    only_conv = copy.deepcopy(reference)
    assert fastml.patch(only_conv, ops=["conv_relu", "linear"], fx=True).fused == []  # op not selected
