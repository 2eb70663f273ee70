"""A patched model run the ways real training code runs a torch model: under activation
checkpointing, with pruning's and weight norm's forward pre-hooks forming the weight, forward
passes with gradients tracked and no backward (an evaluation loop without torch.no_grad), and
compiled by TorchScript. Each against the same model unpatched, in float64: outputs and the
gradients of the input and of every parameter."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

import fastml
from fastml import _route, _tune


def course_cnn() -> nn.Sequential:
    """A LeNet-like net with every layer patch replaces or fuses: conv → ReLU → pool (fused),
    conv → batch norm → ReLU (folded in eval), linear → ReLU (epilogue), linear."""
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 5 * 5, 16), nn.ReLU(), nn.Linear(16, 10)).double()


def twins(prepare=lambda model: None) -> tuple[nn.Module, nn.Module]:
    """(unpatched, patched) models with the same parameters, each prepared by ``prepare`` (which
    may draw random numbers: the same ones for both)."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = course_cnn()
        prepare(model)
        models.append(model)
    fastml.patch(models[1])
    return models[0], models[1]


def outputs_and_gradients(model: nn.Module, run, x: torch.Tensor) -> list[torch.Tensor]:
    """``run(model, x)``'s output, then the gradients of its sum (by ``.backward()``, as training
    code takes them) for x and for every parameter."""
    x = x.clone().requires_grad_()
    wrt = [x, *(p for p in model.parameters() if p.requires_grad)]
    for t in wrt:
        t.grad = None
    out = run(model, x)
    out.sum().backward()
    return [out.detach(), *(t.grad for t in wrt)]


def assert_same(unpatched, patched, run=lambda model, x: model(x), steps: int = 3):
    """The two models agree, call after call (the first calls settle the routes, the later
    follow them)."""
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(4, 3, 14, 14, dtype=torch.float64, generator=generator)
        expected = outputs_and_gradients(unpatched, run, x)
        actual = outputs_and_gradients(patched, run, x)
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing(use_reentrant):
    """Non-reentrant checkpointing runs the forward again in backward and checks that it saves
    the same tensors: a route settled (and timed) during the first pass would change them."""
    unpatched, patched = twins()
    assert_same(unpatched, patched, lambda model, x: checkpoint(model, x, use_reentrant=use_reentrant))


def test_checkpointing_follows_routes_settled_before():
    unpatched, patched = twins()
    assert_same(unpatched, patched, steps=1)  # routes settled outside checkpointing
    assert any(_route.routes(m) for m in patched.modules())
    assert_same(unpatched, patched, lambda model, x: checkpoint(model, x, use_reentrant=False))


def members_one_by_one(model, x):
    """A loop over the model's members, each called on its own, each output kept (style transfer
    taps a VGG so): a member of a fused or folded run computes itself, as the torch module."""
    taps = []
    for module in model:
        x = module(x)
        taps.append(x.flatten())
    return torch.cat(taps)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("run", [
    *(pytest.param(lambda model, x, stop=stop: model[:stop](x), id=f"slice[:{stop}]") for stop in range(1, 11)),
    pytest.param(lambda model, x: model[4:](model[1:4](model[0](x))), id="slices"),
    pytest.param(members_one_by_one, id="members-one-by-one"),
    pytest.param(lambda model, x: checkpoint_sequential(model, 4, x, use_reentrant=False), id="checkpoint_sequential"),
])
def test_parts_of_a_patched_sequential(mode, run):
    """Perceptual losses slice VGG's features (``features[:k]``) and checkpoint_sequential cuts
    the model into segments: a part that ends inside a fused Conv2d → ReLU → MaxPool2d run, a
    folded Conv2d → BatchNorm2d → ReLU or a Linear → ReLU computes its own modules, not the run
    (fastml/_runs.py); the whole model still runs each run as one."""
    unpatched, patched = twins(lambda model: getattr(model, mode)())
    assert_same(unpatched, patched, run)
    assert_same(unpatched, patched)


class Tapped(nn.Sequential):
    """An nn.Sequential (its forward kept, so patch fuses its runs) with a method of its own
    that keeps every member's output, as feature extractors do."""

    def taps(self, x):
        return members_one_by_one(self, x)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_another_method_of_the_sequential_computes_each_module(mode):
    """Only the Sequential's forward calls a run as one: its own tap method, looping over the
    same members, gets each module's output, as torch's."""
    torch.manual_seed(0)
    unpatched = Tapped(*course_cnn())
    getattr(unpatched, mode)()
    patched = copy.deepcopy(unpatched)
    assert len(fastml.patch(patched).fused) == 3
    assert_same(unpatched, patched, lambda model, x: model.taps(x))
    assert_same(unpatched, patched)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_whole_patched_sequential_runs_each_run_as_one(mode, monkeypatch):
    """The other side of the test above: called as a whole, the model runs no ReLU or pool of
    its own (each is in a run: the fused block, the folded batch norm's pass, the linear's
    epilogue), and in eval mode no batch norm (folded into its convolution)."""
    unpatched, patched = twins(lambda model: getattr(model, mode)())
    assert_same(unpatched, patched)
    called = []
    for cls, name in ((nn.ReLU, "forward"), (nn.MaxPool2d, "forward"), (nn.BatchNorm2d, "_check_input_dim")):
        monkeypatch.setattr(cls, name, lambda self, *args, original=getattr(cls, name): called.append(self)
                            or original(self, *args))
    with torch.no_grad():
        patched(torch.randn(4, 3, 14, 14, dtype=torch.float64))
    # (in training the batch norm computes, the ReLU in its pass; its first calls are timed)
    assert [m for m in called if mode == "eval" or not isinstance(m, nn.BatchNorm2d)] == []
    called.clear()
    with torch.no_grad():
        patched[:2](torch.randn(4, 3, 14, 14, dtype=torch.float64))  # the slice computes its ReLU itself
    assert [type(m).__name__ for m in called] == ["ReLU"]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("where", [0, 1, 2, 3, 4, 5, 8, "every module"])
def test_a_hook_registered_after_patching_sees_its_own_module(mode, where):
    """A forward hook on a member of a run, registered after patching (patch fuses no run with
    hooks), or on every module: the run computes module by module, so the hook sees its own
    module's output, as on the torch model."""
    unpatched, patched = twins(lambda model: getattr(model, mode)())
    seen = {"torch": [], "fastml": []}
    handles = []
    for name, model in (("torch", unpatched), ("fastml", patched)):
        def hook(module, args, out, owner=model, seen=seen[name]):
            if any(module is m for m in owner.modules()):  # (a global hook sees both models)
                seen.append(out.detach().clone())
        if where == "every module":
            handles.append(torch.nn.modules.module.register_module_forward_hook(hook))
        else:
            handles.append(model[where].register_forward_hook(hook))
    try:
        assert_same(unpatched, patched)
    finally:
        for handle in handles:
            handle.remove()
    assert len(seen["fastml"]) == len(seen["torch"]) > 0
    for got, expected in zip(seen["fastml"], seen["torch"]):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
    with torch.no_grad():  # the hooks removed, the runs compute as one again
        patched(torch.randn(4, 3, 14, 14, dtype=torch.float64))


def prune_layers(model):
    prune.l1_unstructured(model[0], "weight", amount=0.3)
    prune.random_unstructured(model[7], "weight", amount=0.5)


def old_weight_norm(model):
    nn.utils.weight_norm(model[3])
    nn.utils.weight_norm(model[9])


def old_spectral_norm(model):
    nn.utils.spectral_norm(model[7])


def parametrized_norms(model):
    nn.utils.parametrizations.weight_norm(model[0])
    nn.utils.parametrizations.spectral_norm(model[3])


@pytest.mark.parametrize("prepare", [prune_layers, old_weight_norm, old_spectral_norm, parametrized_norms])
def test_weights_formed_by_the_users_graph(prepare):
    """The weight a pre-hook or parametrization forms from the Parameters is part of the user's
    graph: the measured choice's timed calls must not free it before the user's backward."""
    unpatched, patched = twins(prepare)
    assert_same(unpatched, patched)


def test_forward_with_gradients_and_no_backward_settles(tmp_path, monkeypatch):
    """An evaluation loop without torch.no_grad, its forward decided for torch's: the ops'
    backward stays undecided, and the second call of a signature settles the layer's route by
    timing it both ways. (Where the forward chose a kernel, the first call times the layer both
    ways at once.) So the decisions start empty, in memory and on disk (an earlier test may have
    decided this class's forward either way, by the VM's noise), and torch's wins every timing."""
    monkeypatch.setenv(_tune.CACHE_VAR, str(tmp_path / "cache"))
    _tune.clear_tuning()
    monkeypatch.setattr(_tune, "measure", lambda names, run, device, rounds=None:
                        {name: 1.0 if name == "reference" else 2.0 for name in names})
    layer = fastml.nn.Linear(5, 3).double()
    x = torch.randn(11, 5, dtype=torch.float64)
    layer(x)
    assert not _route.routes(layer)  # (the backward is still to come, maybe)
    expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=0)
    assert list(_route.routes(layer)) and set(_route.routes(layer).values()) <= {"reference", "fastml"}
    out = layer(x)
    out.sum().backward()  # a settled route still trains
    torch.testing.assert_close(layer.weight.grad, x.sum(0).expand(3, 5))


def test_functional_with_gradients_and_no_backward_settles():
    w = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    x = torch.randn(9, 7, dtype=torch.float64)
    sig = _route.function_signature("linear", (x, w, None), ())
    for _ in range(2):
        out = fastml.functional.linear(x, w)
    assert sig is not None and sig in _route._function_routes
    torch.testing.assert_close(out, x @ w.T)


def scripted(model: nn.Module) -> torch.jit.ScriptModule:
    """``torch.jit.script(model)``, saved and loaded again (what deployment does with it)."""
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_torchscript_of_a_patched_model(mode):
    """TorchScript compiles a patched model, folds and fusions included, to what the torch model
    computes (running statistics too); the patched model itself stays patched."""
    unpatched, patched = twins()
    for model in (unpatched, patched):
        model.train(mode == "train")
    patched_types = [type(m) for m in patched]
    assert_same(scripted(unpatched), scripted(patched))
    assert [type(m) for m in patched] == patched_types
    for a, e in zip(patched.buffers(), unpatched.buffers()):
        torch.testing.assert_close(a, e, rtol=0, atol=0)  # (the scripted copies ran, not the models)


def test_torchscript_of_a_patched_model_that_has_run():
    """What fastml keeps on a layer that has run (its routes, fold caches) must not stop
    TorchScript, which types every attribute of the modules it compiles."""
    unpatched, patched = twins()
    assert_same(unpatched, patched)  # routes settled, some per signature
    for model in (unpatched, patched):
        model.eval()
    with torch.no_grad():
        x = torch.randn(4, 3, 14, 14, dtype=torch.float64)
        torch.testing.assert_close(patched(x), unpatched(x), rtol=1e-9, atol=1e-10)  # the fold cached
    assert any(_route.routes(m) for m in patched.modules())
    assert_same(scripted(unpatched), scripted(patched))


DROP_INS = [
    (lambda: nn.MaxPool2d(3, 2, 1, ceil_mode=True), 1),
    (lambda: nn.MaxPool2d(2, return_indices=True), 1),
    (lambda: nn.BatchNorm2d(3, momentum=None), 1),
    (lambda: nn.BatchNorm2d(3, track_running_stats=False), 1),
    (lambda: nn.Conv2d(3, 4, 3, padding=2, padding_mode="reflect", groups=1), 1),
    (lambda: nn.MSELoss(reduction="sum"), 2),
    (lambda: nn.CrossEntropyLoss(weight=torch.rand(3, dtype=torch.float64), label_smoothing=0.1), 2),
]


@pytest.mark.parametrize("make, inputs", DROP_INS)
def test_torchscript_of_each_drop_in(make, inputs):
    torch.manual_seed(0)
    module = make().double()
    drop_in = copy.deepcopy(module)
    fastml.patch(drop_in)
    assert type(drop_in) is not type(module)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    args = (x,) if inputs == 1 else (x, torch.randn_like(x).softmax(1))
    expected = module(*args)
    got = scripted(drop_in)(*args)
    assert len(_tensors(got)) == len(_tensors(expected))
    for a, e in zip(_tensors(got), _tensors(expected)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_torchscript_of_linear_mse_loss():
    torch.manual_seed(0)
    model = fastml.nn.LinearMSELoss(3, 2).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    expected = nn.functional.mse_loss(nn.functional.linear(x, model.weight, model.bias), y)
    torch.testing.assert_close(scripted(model)(x, y), expected, rtol=1e-12, atol=0)


def _tensors(value):
    return value if isinstance(value, tuple) else (value,)


@pytest.mark.parametrize("traced_in", ["train", "eval"])
def test_torch_fx_trace_of_a_patched_model(traced_in):
    """torch.fx records each fastml layer as one call of itself, as it records torch.nn's modules:
    the graph runs the layers, which decide at run time (a fold applies in eval mode only), so a
    graph traced in one mode computes the model in the other too."""
    unpatched, patched = twins()
    patched.train(traced_in == "train")
    graph = torch.fx.symbolic_trace(patched)
    assert [n.op for n in graph.graph.nodes] == ["placeholder"] + ["call_module"] * len(patched) + ["output"]
    for mode in (traced_in, "eval" if traced_in == "train" else "train"):
        unpatched.train(mode == "train")
        graph.train(mode == "train")
        assert_same(unpatched, graph)


def test_torch_fx_trace_of_a_lone_layer():
    """A fastml layer traced as the root is traced through torch's computation, as a torch
    layer would be (there is no module above to record a call of)."""
    layer = fastml.nn.Linear(4, 3).double()
    graph = torch.fx.symbolic_trace(layer)
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(graph(x), nn.functional.linear(x, layer.weight, layer.bias), rtol=1e-12, atol=0)


class ResidualBlock(nn.Module):
    """ResNet's basic block, its one ReLU module called twice: patch(fx=True) folds each conv →
    batch norm (→ ReLU) run, the ReLU shared (it passes through only what a run marked)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.conv2, self.bn2 = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


@pytest.mark.parametrize("traced_in", ["train", "eval"])
def test_torch_fx_trace_of_a_model_patched_through_fx(traced_in):
    torch.manual_seed(0)
    unpatched = ResidualBlock().double()
    patched = copy.deepcopy(unpatched)
    report = fastml.patch(patched, fx=True)
    assert "folded" in str(report)
    patched.train(traced_in == "train")
    graph = torch.fx.symbolic_trace(patched)
    for mode in ("train", "eval"):
        unpatched.train(mode == "train")
        graph.train(mode == "train")
        assert_same(unpatched, graph, lambda model, x: model(x[:, :, :8, :8]))


def settled_twins():
    """``twins()`` after a few training calls, so that the patched model's routes are settled
    (and some run fastml's kernels) before a mode is entered."""
    unpatched, patched = twins()
    assert_same(unpatched, patched)
    return unpatched, patched


def test_fake_tensor_mode():
    """Fake tensors have no data: a kernel given their pointers would crash. Under
    FakeTensorMode (torch.compile's and torch.export's shape propagation, memory estimators)
    torch's ops run, as unpatched."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    _, patched = settled_twins()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:  # (the Parameters stay real)
        x = mode.from_tensor(torch.randn(4, 3, 14, 14, dtype=torch.float64))
        out = patched(x)
        out.sum().backward()
        loss = fastml.functional.linear_cross_entropy(x.flatten(1), torch.randn(10, 588, dtype=torch.float64),
                                                      torch.zeros(4, dtype=torch.int64))
    assert out.shape == (4, 10) and loss.shape == ()


def test_flop_counter_mode():
    from torch.utils.flop_counter import FlopCounterMode

    counts = []
    for model in settled_twins():
        with FlopCounterMode(display=False) as counter:
            model(torch.randn(4, 3, 14, 14, dtype=torch.float64)).sum().backward()
        counts.append(counter.get_total_flops())
    assert counts[0] > 0 and counts[1] == counts[0]


def test_torch_function_mode_sees_what_it_sees_unpatched():
    from torch.overrides import TorchFunctionMode

    class Calls(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.names.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    seen = []
    for model in settled_twins():
        with Calls() as calls:
            model(torch.randn(4, 3, 14, 14, dtype=torch.float64))
        # (a fused run applies its ReLU in place: relu_ where the torch model calls relu)
        seen.append([name.rstrip("_") for name in calls.names])
    assert seen[1] == seen[0]


def test_export_for_onnx_traces_torchs_ops(monkeypatch):
    """torch.onnx.export's exporter traces with torch.export, where fastml's ops would be custom
    ops that no ONNX operator implements: while it exports, a patched model traces torch's ops
    (the flag it sets is stood in for here, so the check runs without onnx installed)."""
    unpatched, patched = twins()
    for model in (unpatched, patched):
        model.eval()
    x = torch.randn(2, 3, 14, 14, dtype=torch.float64)
    with torch.no_grad():
        patched(x)  # routes settled, as in a model that served before it is exported
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    program = torch.export.export(patched, (x,))
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert targets and not any("fastml" in t for t in targets)
    torch.testing.assert_close(program.module()(x), unpatched(x), rtol=1e-9, atol=1e-10)


def test_onnx_export_of_a_patched_model():
    pytest.importorskip("onnxscript", reason="torch.onnx.export's default exporter needs onnxscript")
    unpatched, patched = twins()
    operators = []
    for model in (unpatched, patched):
        model.eval()
        onnx_program = torch.onnx.export(model, (torch.randn(2, 3, 14, 14, dtype=torch.float64),), dynamo=True)
        operators.append(sorted(node.op_type for node in onnx_program.model_proto.graph.node))
    assert operators[1] == operators[0]


def gradient_penalty(model, x):
    """WGAN-GP's penalty: the input gradient's norm, itself differentiated (double backward)."""
    grad, = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).square().mean().reshape(1)


def saved_on_cpu(model, x):
    with torch.autograd.graph.save_on_cpu():  # (saved-tensor hooks, as checkpointing's)
        return model(x)


def per_sample_gradients(model, x):
    """Opacus-style per-sample gradients: torch.func.grad under vmap, through functional_call."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    model.eval()

    def loss(p, sample):
        return torch.func.functional_call(model, (p, buffers), (sample.unsqueeze(0),)).sum()
    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x.detach())
    model.train()
    return torch.cat([g.flatten() for g in grads.values()]) + model(x).sum()


@pytest.mark.parametrize("run", [gradient_penalty, saved_on_cpu, per_sample_gradients])
def test_training_code_patterns(run):
    unpatched, patched = twins()
    assert_same(unpatched, patched, run)


def test_state_dict_assigned_while_folded():
    """load_state_dict(assign=True) replaces the Parameter objects: the fold forms its weight from
    the new ones."""
    unpatched, patched = twins()
    for model in (unpatched, patched):
        model.eval()
        with torch.no_grad():
            model(torch.randn(2, 3, 14, 14, dtype=torch.float64))  # the fold cached
    torch.manual_seed(7)
    other = course_cnn()
    other.train()
    other(torch.randn(4, 3, 14, 14, dtype=torch.float64))  # running statistics of its own
    for model in (unpatched, patched):
        model.load_state_dict(other.state_dict(), assign=True)
    x = torch.randn(2, 3, 14, 14, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(patched(x), unpatched(x), rtol=1e-9, atol=1e-10)


def test_autocast_bfloat16():
    unpatched, patched = twins()
    outputs = []
    for model in (unpatched, patched):
        model.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(torch.randn(4, 3, 14, 14, generator=torch.Generator().manual_seed(3)))
        out.float().sum().backward()
        outputs.append((out, model[0].weight.grad))
    assert outputs[1][0].dtype == outputs[0][0].dtype
    torch.testing.assert_close(outputs[1][0], outputs[0][0])
    torch.testing.assert_close(outputs[1][1], outputs[0][1], rtol=2e-2, atol=2e-2)
