"""fastml's drop-in modules on PyTorch's own module test inputs.

``torch.testing._internal.common_modules.module_db`` is the table PyTorch's test_modules.py runs
every ``torch.nn`` module over: constructor arguments and forward inputs for each module (odd
shapes, unbatched inputs, every reduction, class weights, label smoothing, probability targets,
padding modes, ...) and the inputs each module must reject. A drop-in must behave like its twin on
all of them, so every fastml module that replaces a ``torch.nn`` class runs here on its twin's
entries, checked the way PyTorch checks its own modules, and against the twin itself:

- outputs, every gradient and the buffers equal torch's module built from the same seed;
- gradcheck and gradgradcheck in float64, of the whole and of each parameter alone;
- non-contiguous inputs and upstream gradients give the contiguous results;
- memory formats: outputs and input gradients keep channels-last exactly where torch's do;
- factory kwargs, construction under ``torch.device("meta")``, ``.float()``/``.double()``;
- torch.save/torch.load of the whole module, repr;
- a module whose twin ignores ``training`` runs without the attribute;
- the inputs torch rejects are rejected with the same exception type and message.
"""

from __future__ import annotations

import inspect
import io
import itertools

import pytest
import torch
from conftest import raised
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db
from torch.utils._pytree import tree_flatten, tree_map

import fastml.nn

TWINS = {
    torch.nn.Linear: fastml.nn.Linear,
    torch.nn.Conv2d: fastml.nn.Conv2d,
    torch.nn.MaxPool2d: fastml.nn.MaxPool2d,
    torch.nn.BatchNorm2d: fastml.nn.BatchNorm2d,
    torch.nn.MSELoss: fastml.nn.MSELoss,
    torch.nn.CrossEntropyLoss: fastml.nn.CrossEntropyLoss,
}
if getattr(torch.nn, "LinearCrossEntropyLoss", None) is not None:
    TWINS[torch.nn.LinearCrossEntropyLoss] = fastml.nn.LinearCrossEntropyLoss

ENTRIES = [info for info in module_db if info.module_cls in TWINS]
ENTRY_IDS = [info.name for info in ENTRIES]
DTYPES = [torch.float32, torch.float64]


def in_modes(entries, long=frozenset()):
    """(entry, training) cases, as test_modules.py makes them: both modes where the entry says its
    module's modes differ (``train_and_eval_differ``: batch norm), train mode alone elsewhere. Those
    twins never read ``training`` (test_runs_without_training_attribute), so an eval-mode case
    would repeat the train-mode computation; it cost half this file's time (gradgradcheck of the
    cross-entropy's 105 samples: 17 s a mode). The entries named in ``long`` are marked long."""
    return [pytest.param(info, training, id=f"{info.name}-{'train' if training else 'eval'}",
                         marks=[pytest.mark.long] if info.name in long else [])
            for info in entries for training in ((True, False) if info.train_and_eval_differ else (True,))]


def test_module_db_has_every_twin():
    """The table names each replaced class: a torch that dropped an entry would otherwise leave the
    checks below silently empty for it."""
    assert {info.module_cls for info in ENTRIES} == set(TWINS)


def fresh_copy(obj):
    """Inputs as new leaves (module_db's may be results of ops, which deepcopy refuses)."""
    def leaf(t):
        return t.detach().clone().requires_grad_(t.requires_grad)
    return tree_map(lambda o: leaf(o) if isinstance(o, torch.Tensor) else o, obj)


def skip_where_torch_skips(info, torch_test, dtype, training):
    """module_db marks the checks PyTorch does not run for a module (its ``skips``: channels-last
    for losses, gradcheck of the chunked cross-entropy, ...). Those are skipped for the twin too,
    with torch's reason, named after its test in test_modules.py; never counted as passes."""
    for entry in info.decorators:
        if not entry.is_active("TestModule", torch_test, "cpu", dtype, {"training": training}):
            continue
        for decorator in entry.decorators:
            probe = decorator(lambda: None)
            if getattr(probe, "__unittest_skip__", False):
                pytest.skip(f"module_db skips {torch_test} for {info.name}: {probe.__unittest_skip_why__}")
            if getattr(probe, "__unittest_expecting_failure__", False):
                pytest.skip(f"module_db expects {torch_test} to fail for torch's {info.name}")


def samples(info, dtype, training, requires_grad=True):
    torch.manual_seed(0)  # module_db draws random inputs: the same ones every run, as torch's TestCase seeds
    found = list(info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=requires_grad,
                                         training=training))
    assert found, f"module_db gives {info.name} no inputs"
    return [s for s in found if s.forward_input is not None]


def build(cls, sample, dtype, training, seed=0):
    torch.manual_seed(seed)
    module = cls(*sample.constructor_input.args, **sample.constructor_input.kwargs).to(dtype)
    return module.train(training)


def run(module, sample, fresh=True):
    args, kwargs = sample.forward_input.args, sample.forward_input.kwargs
    if fresh:
        args, kwargs = fresh_copy((args, kwargs))
    return module(*args, **kwargs), (args, kwargs)


def differentiable(obj):
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor) and t.requires_grad]


def gradients(outputs, inputs, upstream):
    outs = differentiable(outputs)
    if not outs or not inputs:
        return []
    return torch.autograd.grad(outs, inputs, upstream, allow_unused=True)


def assert_same(actual, expected, what, rtol=None, atol=None):
    kw = {} if rtol is None else {"rtol": rtol, "atol": atol}
    torch.testing.assert_close(actual, expected, equal_nan=True, msg=lambda m: f"{what}: {m}", **kw)


# (LinearCrossEntropyLoss's samples take ~5 s a dtype here and in test_non_contiguous: long; its
# kernels' own tests, test_linear_cross_entropy.py, stay in the default run)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("info, training", in_modes(ENTRIES, long={"nn.LinearCrossEntropyLoss"}))
def test_matches_twin(info, dtype, training):
    for sample in samples(info, dtype, training):
        torch_module = build(info.module_cls, sample, dtype, training)
        ours = build(TWINS[info.module_cls], sample, dtype, training)
        assert_same(dict(ours.state_dict()), dict(torch_module.state_dict()), f"{sample.desc}: initial state")
        expected, (t_args, t_kwargs) = run(torch_module, sample)
        actual, (f_args, f_kwargs) = run(ours, sample)
        assert type(actual) is type(expected)
        assert_same(actual, expected, f"{sample.desc}: output")
        for a, e in zip(tree_flatten(actual)[0], tree_flatten(expected)[0]):
            if isinstance(e, torch.Tensor):
                assert (a.dtype, a.shape, a.requires_grad) == (e.dtype, e.shape, e.requires_grad), sample.desc
        if sample.reference_fn is not None:
            assert_same(actual, sample.reference_fn(ours, *f_args, **f_kwargs), f"{sample.desc}: reference_fn")
        upstream = [torch.randn_like(t) for t in differentiable(expected)]
        wrt_torch = differentiable((t_args, t_kwargs)) + list(torch_module.parameters())
        wrt_ours = differentiable((f_args, f_kwargs)) + list(ours.parameters())
        assert_same(gradients(actual, wrt_ours, upstream), gradients(expected, wrt_torch, upstream),
                    f"{sample.desc}: gradients")
        assert_same(dict(ours.state_dict()), dict(torch_module.state_dict()), f"{sample.desc}: state after forward")


def _gradcheck_sample(info, sample, training, check):
    """check (gradcheck or gradgradcheck) of the module's outputs as a function of its tensor
    inputs and parameters: all together, then each parameter alone. False where the output is
    not finite at the sample's point (nothing to differentiate)."""
    module = build(TWINS[info.module_cls], sample, torch.float64, training)
    args, kwargs = fresh_copy((sample.forward_input.args, sample.forward_input.kwargs))
    tensor_kwargs = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    other_kwargs = {k: v for k, v in kwargs.items() if k not in tensor_kwargs}
    with torch.no_grad():
        at_point = module(*args, **kwargs)
    if not all(torch.isfinite(t).all() for t in tree_flatten(at_point)[0] if isinstance(t, torch.Tensor)):
        return False  # e.g. a mean over targets that are all ignore_index: 0/0, no derivative to check
    params = tuple(module.parameters())
    flat, spec = tree_flatten((tuple(args), params, tuple(tensor_kwargs.values())))

    def function(*leaves):
        new_args, _, new_kwarg_values = torch.utils._pytree.tree_unflatten(list(leaves), spec)
        out = module(*new_args, **dict(zip(tensor_kwargs, new_kwarg_values)), **other_kwargs)
        return tuple(tree_flatten(out)[0])

    assert check(function, flat), sample.desc
    for p in params:  # each parameter alone, the others constants
        for q in params:
            q.requires_grad_(q is p)
        assert check(function, flat), f"{sample.desc}: one parameter"
    for q in params:
        q.requires_grad_(True)
    return True


# The cross-entropy's 105 samples: gradcheck 8 s and gradgradcheck 36 s on 2 cores (torch's own
# module 23 s), so CI runs them after the default run.
@pytest.mark.parametrize("info, training", in_modes(ENTRIES, long={"nn.CrossEntropyLoss"}))
def test_gradcheck(info, training):
    skip_where_torch_skips(info, "test_grad", torch.float64, training)
    checked = [_gradcheck_sample(info, sample, training, torch.autograd.gradcheck)
               for sample in samples(info, torch.float64, training)]
    assert any(checked)


@pytest.mark.parametrize("info, training", in_modes([i for i in ENTRIES if i.supports_gradgrad],
                                                    long={"nn.CrossEntropyLoss"}))
def test_gradgradcheck(info, training):
    skip_where_torch_skips(info, "test_gradgrad", torch.float64, training)
    checked = [_gradcheck_sample(info, sample, training, torch.autograd.gradgradcheck)
               for sample in samples(info, torch.float64, training)]
    assert any(checked)


def _non_contiguous(obj):
    """Each tensor of one or more dimensions as a strided view with the same values."""
    def view(t):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        out = torch.repeat_interleave(t.detach(), 2, dim=-1)[..., ::2]
        return out.requires_grad_(t.requires_grad)
    return tree_map(view, obj)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("info, training", in_modes(ENTRIES, long={"nn.LinearCrossEntropyLoss"}))
def test_non_contiguous(info, dtype, training):
    skip_where_torch_skips(info, "test_non_contiguous_tensors", dtype, training)
    for sample in samples(info, dtype, training):
        module = build(TWINS[info.module_cls], sample, dtype, training)
        inputs = fresh_copy((sample.forward_input.args, sample.forward_input.kwargs))
        if not any(isinstance(t, torch.Tensor) and t.dim() > 0 for t in tree_flatten(inputs)[0]):
            continue
        state = {k: v.clone() for k, v in module.state_dict().items()}
        out = module(*inputs[0], **inputs[1])
        upstream = [torch.randn_like(t) for t in differentiable(out)]
        wrt = differentiable(inputs) + list(module.parameters())
        expected = gradients(out, wrt, upstream)
        for strided_inputs, strided_upstream in itertools.product([inputs, _non_contiguous(inputs)],
                                                                  [upstream, _non_contiguous(upstream)]):
            module.load_state_dict(state)  # batch norm's running statistics as before the first call
            strided_inputs = fresh_copy(strided_inputs) if strided_inputs is inputs else strided_inputs
            again = module(*strided_inputs[0], **strided_inputs[1])
            assert_same(again, out, f"{sample.desc}: non-contiguous output")
            wrt = differentiable(strided_inputs) + list(module.parameters())
            assert_same(gradients(again, wrt, strided_upstream), expected, f"{sample.desc}: non-contiguous grads",
                        rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("info, training", in_modes(ENTRIES))
def test_memory_format(info, dtype, training):
    """torch's rule: a 4-D result is channels-last when the input is, or when the module's weights
    are and its format decides the output's (module_memformat_affects_out); otherwise contiguous.
    Gradients follow the same rule."""
    skip_where_torch_skips(info, "test_memory_format", dtype, training)
    for sample in samples(info, dtype, training):
        four_d = any(isinstance(t, torch.Tensor) and t.dim() == 4 for t in tree_flatten(sample.forward_input.args)[0])
        formats = [torch.contiguous_format, torch.channels_last] if four_d else [torch.contiguous_format]
        module_formats = formats if four_d else [torch.contiguous_format]
        module = build(TWINS[info.module_cls], sample, dtype, training)
        state = {k: v.clone() for k, v in module.state_dict().items()}
        base_inputs = fresh_copy((sample.forward_input.args, sample.forward_input.kwargs))
        expected = module(*base_inputs[0], **base_inputs[1])
        upstream = [torch.rand_like(t) for t in differentiable(expected)]
        expected_grads = gradients(expected, differentiable(base_inputs) + list(module.parameters()), upstream)
        for input_format, module_format in itertools.product(formats, module_formats):
            def to_format(t):
                if not isinstance(t, torch.Tensor):
                    return t
                fmt = input_format if t.dim() == 4 else torch.contiguous_format
                return t.detach().clone().to(memory_format=fmt).requires_grad_(t.requires_grad)
            inputs = tree_map(to_format, base_inputs)
            module.load_state_dict(state)
            module.to(memory_format=module_format)
            out = module(*inputs[0], **inputs[1])
            channels_last = input_format == torch.channels_last or (
                module_format == torch.channels_last and info.module_memformat_affects_out)
            where = f"{sample.desc}, input {input_format}, module {module_format}"
            assert_same(out, expected, f"{where}: output")
            # the upstream gradient in each output's own format, as autograd would pass it on
            upstream_here = [torch.empty_like(o).copy_(g) for o, g in zip(differentiable(out), upstream)]
            grads = gradients(out, differentiable(inputs) + list(module.parameters()), upstream_here)
            assert_same(grads, expected_grads, f"{where}: gradients")
            for t in list(tree_flatten(out)[0]) + list(grads if training else []):
                if isinstance(t, torch.Tensor) and t.dim() == 4:
                    wanted = torch.channels_last if channels_last else torch.contiguous_format
                    assert t.is_contiguous(memory_format=wanted), \
                        f"{where}: a result {tuple(t.shape)} {t.stride()} is not {wanted}"
                elif isinstance(t, torch.Tensor):
                    assert t.is_contiguous(), f"{where}: a result is not contiguous"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("info", ENTRIES, ids=ENTRY_IDS)
def test_construction(info, dtype):
    """Factory kwargs reach every parameter and buffer; construction under the meta device makes
    the same metadata; .float()/.double() convert and the module still runs."""
    for sample in samples(info, dtype, True, requires_grad=False):
        cls = TWINS[info.module_cls]
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        factory = {"device": "cpu", "dtype": dtype} if "dtype" in inspect.signature(info.module_cls).parameters else {}
        factory = {k: v for k, v in factory.items() if k not in kwargs}
        made = cls(*args, **kwargs, **factory)
        twin = info.module_cls(*args, **kwargs, **factory)
        assert [(n, t.dtype, t.shape) for n, t in made.state_dict().items()] == \
               [(n, t.dtype, t.shape) for n, t in twin.state_dict().items()], sample.desc
        with torch.device("meta"):
            meta = cls(*args, **kwargs)
        given = {id(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for m, c in zip(itertools.chain(meta.parameters(), meta.buffers()), itertools.chain(made.parameters(), made.buffers())):
            assert m.shape == c.shape and m.requires_grad == c.requires_grad, sample.desc
            assert m.is_meta or id(m) in given or "device" in kwargs, f"{sample.desc}: a tensor the module made is not on the meta device"
        convert = {torch.float32: made.float, torch.float64: made.double}[dtype]
        convert()
        run(made, sample)
        for t in itertools.chain(made.parameters(), made.buffers()):
            assert not t.dtype.is_floating_point or t.dtype == dtype, sample.desc


@pytest.mark.parametrize("info, training", in_modes(ENTRIES))
def test_save_load_and_repr(info, training):
    for sample in samples(info, torch.float32, training, requires_grad=False):
        module = build(TWINS[info.module_cls], sample, torch.float32, training)
        twin = build(info.module_cls, sample, torch.float32, training)
        assert repr(module) == repr(twin) and str(module) == str(twin), sample.desc
        state = {k: v.clone() for k, v in module.state_dict().items()}
        out, _ = run(module, sample)
        buffer = io.BytesIO()
        module.load_state_dict(state)
        torch.save(module, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert type(loaded) is type(module)
        assert_same(run(loaded, sample)[0], out, f"{sample.desc}: after torch.load")


@pytest.mark.parametrize("info", [i for i in ENTRIES if not i.train_and_eval_differ], ids=lambda i: i.name)
def test_runs_without_training_attribute(info):
    """A module whose twin never reads ``training`` must not either (module_db's flag)."""
    for sample in samples(info, torch.float32, True, requires_grad=False):
        module = build(TWINS[info.module_cls], sample, torch.float32, True)
        del module.training
        run(module, sample)



@pytest.mark.parametrize("info, training", in_modes([i for i in ENTRIES if i.module_error_inputs_func is not None]))
def test_rejects_what_twin_rejects(info, training):
    """Each of module_db's bad inputs: the twin's error (its type and message, which may have moved
    on from the table's regex; none where the twin accepts the input, as batch norm in eval mode
    does a negative eps) is the one fastml must raise."""
    cases = list(info.module_error_inputs_func(info, device="cpu", dtype=torch.float32, requires_grad=False,
                                               training=training))
    assert cases
    rejected = 0
    for case in cases:
        sample = case.module_error_input
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs

        def attempt(cls):
            module = cls(*args, **kwargs)
            if case.error_on == ModuleErrorEnum.FORWARD_ERROR:
                module.train(training)
                module(*sample.forward_input.args, **sample.forward_input.kwargs)

        expected = raised(lambda: attempt(info.module_cls))
        rejected += isinstance(expected, case.error_type)
        actual = raised(lambda: attempt(TWINS[info.module_cls]))
        assert type(actual) is type(expected) and str(actual) == str(expected), \
            f"{sample.desc}: fastml raised {actual!r}, torch {expected!r}"
    assert rejected, "torch's module rejected none of the table's bad inputs"
