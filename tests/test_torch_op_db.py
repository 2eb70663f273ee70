"""fastml.functional on PyTorch's own operator test inputs.

``torch.testing._internal.common_methods_invocations.op_db`` is the table PyTorch's test_ops.py
runs every operator over: for each one (and each of its variants) the dtypes it supports on each
device, sample inputs that reach its corners (unbatched inputs, empty batches, channels-last and
non-contiguous tensors, every reduction, class weights, ignore_index, probability targets, "same"
padding with an even kernel, dilated and ceil-mode pooling, legacy arguments, ...) and the
inputs it must reject. Each public fastml function that replaces a torch function runs here on
its twin's entries, and must behave as the twin does:

- outputs: values, dtype, shape, requires_grad and strides (memory layout) equal torch's; where
  fastml has kernels (float32, float64) to a tight tolerance, elsewhere (half types without a
  Triton kernel, integers, complex) exactly, since fastml must then run torch's own function;
- the gradient of every differentiable tensor argument under the same random upstream gradient,
  with torch's strides too; the arguments after the call (batch norm's running statistics);
  the warnings torch gives;
- the same on op_db's non-contiguous versions of the samples, and with every argument passed by
  its keyword (fastml's parameter names and defaults are torch's);
- gradcheck in float64 of a few samples through fastml's function;
- each of op_db's bad inputs raises torch's exception type with torch's message (what torch
  raises now, which may have moved on from the table's regex).

Each check runs on fastml's automatic choice (the user's path: measured per shape, so it may
pick torch's implementation for small shapes) and with each CPU kernel backend forced, so that
the kernels themselves meet every sample; Triton through its interpreter is ``slow``.

The harness is checked on itself: with torch's own function in fastml's place every check passes,
so a failure says that fastml differs, not that the harness is wrong. Where op_db itself skips
or expects to fail the torch test a check corresponds to (its ``skips`` and ``decorators`` for
the CPU), the check is skipped with op_db's reason, never counted as a pass.

One documented difference is part of the expectation: ``fastml.functional.cdist`` computes p=2
distances from coordinate differences, exact to rounding, where torch.cdist may take its
matrix-product shortcut (``compute_mode="use_mm_for_euclid_dist"``, or more than 25 rows with
the default mode), which cancels; there the expected values are torch.cdist's own exact path
(``"donot_use_mm_for_euclid_dist"``), see tests/test_cdist.py.
"""

from __future__ import annotations

import contextlib
import inspect
import random
import unittest
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import raised
from torch.testing._internal.common_methods_invocations import op_db
from torch.testing._internal.opinfo.core import DecorateInfo
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

import fastml
import fastml.functional as FF
from fastml import _backend

TWINS = {
    "nn.functional.linear": FF.linear,
    "nn.functional.conv2d": FF.conv2d,
    "nn.functional.max_pool2d": FF.max_pool2d,
    "nn.functional.mse_loss": FF.mse_loss,
    "nn.functional.cross_entropy": FF.cross_entropy,
    "nn.functional.batch_norm": FF.batch_norm,
    "cdist": FF.cdist,
}
if getattr(F, "linear_cross_entropy", None) is not None:  # torch >= 2.13
    TWINS["nn.functional.linear_cross_entropy"] = FF.linear_cross_entropy
NO_TWIN = {"knn", "linear_mse", "conv2d_relu_max_pool2d"}  # fastml's own: no torch function to match

ENTRIES = [op for op in op_db if op.name in TWINS]
KERNEL_DTYPES = (torch.float32, torch.float64)  # what fastml's CPU kernels take
# (rtol, atol) where fastml's kernels may run; atol is scaled by the expected tensor's magnitude
TOLERANCES = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-10, 1e-10)}
ROUTES = ["auto", "cpp", "numba", "triton"]  # "auto": the measured choice; the others forced
GRADCHECK_SAMPLES = 4


def entry_id(op) -> str:
    return op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")


def cpu_dtypes(op) -> list:
    return sorted(op.supported_dtypes("cpu"), key=str)


def _cases(routes, dtypes=None):
    """pytest params (route, op, dtype): every CPU dtype of the entry on the automatic choice,
    float32 and float64 on the forced backends (elsewhere they all run torch's function); an
    entry op_db runs only on CUDA gives one case, which skips saying so."""
    cases = []
    for op in ENTRIES:
        wanted = [d for d in cpu_dtypes(op) if dtypes is None or d in dtypes]
        if not cpu_dtypes(op):
            cases.append(pytest.param(routes[0], op, None, id=f"{routes[0]}-{entry_id(op)}-no_cpu_dtype"))
            continue
        for route in routes:
            for dtype in wanted:
                if route != "auto" and dtype not in KERNEL_DTYPES:
                    continue
                marks = [pytest.mark.slow] if route == "triton" else []
                cases.append(pytest.param(route, op, dtype, marks=marks,
                                          id=f"{route}-{entry_id(op)}-{str(dtype).replace('torch.', '')}"))
    return cases


@contextlib.contextmanager
def on_route(route):
    if route == "auto":
        yield
        return
    status = _backend.status(route)
    if not status.present:
        pytest.skip(f"backend {route} absent: {status.reason}")
    with fastml.use_backend(route):
        yield


def skip_without_cpu(op, dtype):
    if dtype is None:
        pytest.skip(f"op_db runs {entry_id(op)} on CUDA only (no CPU dtypes)")


def skip_where_torch_skips(op, torch_class, torch_test, dtype):
    """op_db's ``skips`` and ``decorators`` (OpInfo keeps both in ``decorators``) that turn off,
    on the CPU, the torch test a check here corresponds to: skipped too, with op_db's reason."""
    for entry in op.decorators:
        if not hasattr(entry, "is_active") or not entry.is_active(torch_class, torch_test, "cpu", dtype, {}):
            continue
        for decorator in entry.decorators:
            probe = decorator(lambda: None)
            if getattr(probe, "__unittest_skip__", False):
                pytest.skip(f"op_db skips {torch_class}.{torch_test} for {entry_id(op)}: "
                            f"{probe.__unittest_skip_why__}")
            if getattr(probe, "__unittest_expecting_failure__", False):
                pytest.skip(f"op_db expects {torch_class}.{torch_test} to fail for torch's {entry_id(op)}")


_SAMPLES: dict = {}


def samples(op, dtype):
    """op_db's samples (and reference inputs, where the entry has its own), the same every run;
    made once per entry and dtype (op_db reseeds before each sample: 0.5 ms apiece), and never
    touched by the checks, which run on fresh copies."""
    key = (entry_id(op), dtype)
    if key not in _SAMPLES:
        torch.manual_seed(0)  # op_db draws random inputs, as torch's TestCase seeds before each test
        random.seed(0)  # (cross_entropy's ignore_index sample draws a class with random.sample)
        grad = dtype.is_floating_point or dtype.is_complex
        found = list(op.sample_inputs("cpu", dtype, requires_grad=grad))
        if op.reference_inputs_func is not None:
            found += list(op.reference_inputs("cpu", dtype, requires_grad=grad))
        assert found, f"op_db gives {entry_id(op)} no samples in {dtype}"
        _SAMPLES[key] = found
    return _SAMPLES[key]


def describe(index, sample) -> str:
    return f"sample {index}: {sample.summary()}"


def leaf(t):
    """A new leaf with t's values and strides (channels-last and non-contiguous samples keep their
    layout) and t's requires_grad."""
    if not isinstance(t, torch.Tensor):
        return t
    copy = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    with torch.no_grad():
        copy.copy_(t)
    return copy.requires_grad_(t.requires_grad)


def fresh(sample):
    return tree_map(leaf, (sample.input, tuple(sample.args), dict(sample.kwargs)))


def differentiable(obj) -> list:
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor) and t.requires_grad]


def tensors(obj) -> list:
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


def layout(t: torch.Tensor) -> tuple:
    """The strides of the dimensions of more than one element: the memory layout (a dimension of
    one element may have any stride)."""
    return tuple(stride for stride, size in zip(t.stride(), t.shape) if size > 1)


def assert_same(actual, expected, what, exact):
    """Tensors (or nests of them and plain values): dtype, shape, layout, then values, exactly
    or to the dtype's tolerance, the absolute one scaled by the expected magnitude."""
    a_flat, a_spec = tree_flatten(actual)
    e_flat, e_spec = tree_flatten(expected)
    assert a_spec == e_spec, f"{what}: structure {a_spec} against torch's {e_spec}"
    for a, e in zip(a_flat, e_flat):
        if not isinstance(e, torch.Tensor):
            assert a == e, f"{what}: {a!r} against torch's {e!r}"
            continue
        assert isinstance(a, torch.Tensor), f"{what}: {type(a).__name__} where torch gives a tensor"
        assert (a.dtype, a.shape) == (e.dtype, e.shape), \
            f"{what}: {a.dtype} {tuple(a.shape)} against torch's {e.dtype} {tuple(e.shape)}"
        if e.numel():
            assert layout(a) == layout(e), \
                f"{what}: strides {a.stride()} against torch's {e.stride()} (shape {tuple(e.shape)})"
        if torch.equal(a, e):  # the common case, without assert_close's ~50 µs
            continue
        inexact = not exact and e.dtype.to_real() in TOLERANCES  # (integer results: exactly)
        rtol, atol = TOLERANCES[e.dtype.to_real()] if inexact else (0.0, 0.0)
        if inexact and e.numel():
            finite = e.detach()[torch.isfinite(e.detach())] if not e.is_complex() else e.detach().abs()
            atol *= max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
        torch.testing.assert_close(a.detach(), e.detach(), rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m: f"{what}: {m}")


def python_warnings(record) -> list:
    """(category, message) of each warning. torch's C++ warnings ("Triggered internally") are
    left out: most are TORCH_WARN_ONCE, given once per process, to whichever side runs first."""
    return [(w.category, str(w.message)) for w in record if "Triggered internally" not in str(w.message)]


def call(fn, args, kwargs):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, python_warnings(record)


def _cdist_without_shortcut(x1, x2, p=2.0, compute_mode="use_mm_for_euclid_dist_if_necessary"):
    """torch.cdist where it computes from coordinate differences; its exact path where it would
    take the matrix-product shortcut (fastml's documented behaviour, see the module docstring)."""
    if p == 2 and (compute_mode == "use_mm_for_euclid_dist" or (
            compute_mode == "use_mm_for_euclid_dist_if_necessary" and max(x1.shape[-2], x2.shape[-2]) > 25)):
        compute_mode = "donot_use_mm_for_euclid_dist"
    return torch.cdist(x1, x2, p, compute_mode)


EXPECTED = {"cdist": _cdist_without_shortcut}


def twin_of(op, ours):
    """What ``ours`` must match: torch's function (for fastml, as its documented behaviour says)."""
    return op.op if ours is op.op else EXPECTED.get(op.name, op.op)


def check_sample(op, sample, ours, what, exact, index, as_keywords=False):
    """One sample through ``ours`` and through its twin, each on fresh leaves."""
    twin = twin_of(op, ours)
    t_input, t_args, t_kwargs = fresh(sample)
    f_input, f_args, f_kwargs = fresh(sample)
    if as_keywords:
        names = torch_parameters(op)
        f_kwargs = {**dict(zip(names, (f_input, *f_args))), **f_kwargs}
        t_kwargs = {**dict(zip(names, (t_input, *t_args))), **t_kwargs}
        f_call, t_call = ((), f_kwargs), ((), t_kwargs)
    else:
        f_call, t_call = ((f_input, *f_args), f_kwargs), ((t_input, *t_args), t_kwargs)
    expected, expected_warnings = call(twin, *t_call)
    actual, actual_warnings = call(ours, *f_call)
    assert type(actual) is type(expected), f"{what}: returns {type(actual).__name__}, torch {type(expected).__name__}"
    assert_same(actual, expected, f"{what}: output", exact)
    assert [t.requires_grad for t in tensors(actual)] == [t.requires_grad for t in tensors(expected)], \
        f"{what}: requires_grad of the outputs"
    assert actual_warnings == expected_warnings, f"{what}: warnings {actual_warnings}, torch's {expected_warnings}"
    # the arguments after the call: what torch updates in place (batch norm's running statistics)
    assert_same(tensors((f_input, f_args, f_kwargs)), tensors((t_input, t_args, t_kwargs)),
                f"{what}: arguments after the call", exact)

    outs_e = differentiable(sample.output_process_fn_grad(expected))
    outs_a = differentiable(sample.output_process_fn_grad(actual))
    wrt_e = differentiable((t_input, t_args, t_kwargs))
    wrt_a = differentiable((f_input, f_args, f_kwargs))
    if not outs_e or not wrt_e:
        return
    generator = torch.Generator().manual_seed(index)
    upstream = [torch.randn(t.shape, generator=generator, dtype=t.dtype) for t in outs_e]
    grads_e = torch.autograd.grad(outs_e, wrt_e, upstream, allow_unused=True)
    grads_a = torch.autograd.grad(outs_a, wrt_a, [u.clone() for u in upstream], allow_unused=True)
    for k, (a, e) in enumerate(zip(grads_a, grads_e)):
        assert (a is None) == (e is None), f"{what}: gradient {k} is {a!r}, torch's {e!r}"
        if e is not None:
            assert_same(a, e, f"{what}: gradient of differentiable argument {k}", exact)


def check_matches(op, dtype, ours, noncontiguous=False, as_keywords=False):
    exact = dtype not in KERNEL_DTYPES
    for index, sample in enumerate(samples(op, dtype)):
        if noncontiguous:
            sample = sample.noncontiguous()
        check_sample(op, sample, ours, describe(index, sample), exact, index, as_keywords)


def test_skips_follow_op_db():
    """The reading of op_db's decorators, on an entry made up for it: a skip or an expected
    failure of the corresponding torch test on the CPU (for the dtype) skips the check, one for
    another device, dtype or test does not."""
    class Entry:
        name, variant_test_name = "made_up", ""
        decorators = (DecorateInfo(unittest.skip("a reason"), "TestCommon", "test_errors", device_type="cpu"),
                      DecorateInfo(unittest.expectedFailure, "TestBwdGradients", "test_fn_grad",
                                   dtypes=(torch.float64,)),
                      DecorateInfo(unittest.skip("CUDA only"), "TestCommon", "test_noncontiguous_samples",
                                   device_type="cuda"))

    with pytest.raises(pytest.skip.Exception, match="op_db skips TestCommon.test_errors for made_up: a reason"):
        skip_where_torch_skips(Entry, "TestCommon", "test_errors", torch.float32)
    with pytest.raises(pytest.skip.Exception, match="op_db expects TestBwdGradients.test_fn_grad to fail"):
        skip_where_torch_skips(Entry, "TestBwdGradients", "test_fn_grad", torch.float64)
    skip_where_torch_skips(Entry, "TestBwdGradients", "test_fn_grad", torch.float32)
    skip_where_torch_skips(Entry, "TestCommon", "test_noncontiguous_samples", torch.float32)
    skip_where_torch_skips(Entry, "TestCommon", "test_variant_consistency_eager", torch.float32)


def test_op_db_has_every_twin():
    """The table names each replaced function, and every public fastml function is either a
    twin checked here or one of fastml's own: a torch that dropped an entry, or a new public
    function, would otherwise leave it silently unchecked."""
    assert {op.name for op in ENTRIES} == set(TWINS)
    assert set(FF.__all__) == {fn.__name__ for fn in TWINS.values()} | NO_TWIN


def torch_parameters(op) -> list[str]:
    """The names of the twin's parameters, in order (from the first docstring line of a builtin,
    the with-indices function behind max_pool2d's boolean dispatch)."""
    return list(torch_signature(op).parameters)


def torch_signature(op) -> inspect.Signature:
    fn = F.max_pool2d_with_indices if op.name == "nn.functional.max_pool2d" else op.op
    try:
        return inspect.signature(fn)
    except ValueError:  # a builtin: "linear(input, weight, bias=None) -> Tensor"
        head = fn.__doc__.strip().splitlines()[0]
        params = head[head.index("(") + 1:head.rindex(")")]
        return inspect.signature(eval(f"lambda {params}: None"))  # noqa: S307  (torch's own docstring)


@pytest.mark.parametrize("op", ENTRIES, ids=entry_id)
def test_signature_as_torch(op):
    """fastml's function takes torch's parameters under torch's names, in torch's order, of
    torch's kind and with torch's defaults (then possibly options of its own, with defaults)."""
    theirs = list(torch_signature(op).parameters.values())
    ours = list(inspect.signature(TWINS[op.name]).parameters.values())
    described = [(p.name, p.kind, p.default) for p in ours[:len(theirs)]]
    assert described == [(p.name, p.kind, p.default) for p in theirs]
    assert all(p.default is not inspect.Parameter.empty for p in ours[len(theirs):])


@pytest.fixture
def selections(monkeypatch):
    """The backends fastml's dispatch selects during a test (fastml/_backend.py's select)."""
    chosen = []
    select = _backend.select

    def recording(*args, **kwargs):
        chosen.append(select(*args, **kwargs))
        return chosen[-1]

    monkeypatch.setattr(_backend, "select", recording)
    return chosen


@pytest.mark.parametrize("route, op, dtype", _cases(ROUTES))
def test_matches_torch(route, op, dtype, selections):
    """On a forced backend, its kernels must also have met some of the samples (a check passed
    only by falling back to torch everywhere would say nothing about them)."""
    skip_without_cpu(op, dtype)
    skip_where_torch_skips(op, "TestCommon", "test_variant_consistency_eager", dtype)
    with on_route(route):
        check_matches(op, dtype, TWINS[op.name])
    if route != "auto":
        assert route in selections, f"no sample of {entry_id(op)} ran on the {route} kernels"


@pytest.mark.parametrize("route, op, dtype", _cases(["auto", "cpp"], dtypes=KERNEL_DTYPES))
def test_noncontiguous_matches_torch(route, op, dtype):
    skip_without_cpu(op, dtype)
    skip_where_torch_skips(op, "TestCommon", "test_noncontiguous_samples", dtype)
    with on_route(route):
        check_matches(op, dtype, TWINS[op.name], noncontiguous=True)


@pytest.mark.parametrize("route, op, dtype", _cases(["auto"], dtypes=[torch.float32]))
def test_keywords_as_torch(route, op, dtype):
    """Every argument passed by its name, as torch's documentation names it."""
    skip_without_cpu(op, dtype)
    skip_where_torch_skips(op, "TestCommon", "test_variant_consistency_eager", dtype)
    check_matches(op, dtype, TWINS[op.name], as_keywords=True)


def gradcheck_samples(op):
    """Up to GRADCHECK_SAMPLES float64 samples, evenly spread over the entry's, with a
    differentiable tensor argument."""
    found = [(i, s) for i, s in enumerate(samples(op, torch.float64)) if differentiable((s.input, s.args, s.kwargs))]
    step = max(1, len(found) // GRADCHECK_SAMPLES)
    return found[::step][:GRADCHECK_SAMPLES]


def check_gradients(op, ours):
    for index, sample in gradcheck_samples(op):
        arguments = fresh(sample)
        flat, spec = tree_flatten(arguments)
        where = [k for k, t in enumerate(flat) if isinstance(t, torch.Tensor) and t.requires_grad]

        def function(*leaves, flat=flat, spec=spec, where=where, sample=sample):
            values = list(flat)
            for k, t in zip(where, leaves):
                values[k] = t
            input, args, kwargs = tree_unflatten(values, spec)
            out = sample.output_process_fn_grad(ours(input, *args, **kwargs))
            return tuple(t for t in tensors(out) if t.is_floating_point() or t.is_complex())

        with warnings.catch_warnings():  # (torch's own, compared in test_matches_torch)
            warnings.simplefilter("ignore")
            assert torch.autograd.gradcheck(function, tuple(flat[k] for k in where)), describe(index, sample)


@pytest.mark.parametrize("route, op, dtype", _cases(["auto", "cpp", "numba", "triton"], dtypes=[torch.float64]))
def test_gradcheck(route, op, dtype):
    skip_without_cpu(op, dtype)
    if not op.supports_autograd:
        pytest.skip(f"op_db: {entry_id(op)} has no autograd")
    skip_where_torch_skips(op, "TestBwdGradients", "test_fn_grad", dtype)
    with on_route(route):
        check_gradients(op, TWINS[op.name])



def check_errors(op, ours):
    torch.manual_seed(0)
    cases = list(op.error_inputs("cpu"))
    assert cases, f"op_db gives {entry_id(op)} no error inputs"
    rejected = 0
    for index, case in enumerate(cases):
        sample = case.sample_input
        t_input, t_args, t_kwargs = fresh(sample)
        expected = raised(lambda: op.op(t_input, *t_args, **t_kwargs))
        rejected += isinstance(expected, case.error_type)
        f_input, f_args, f_kwargs = fresh(sample)
        actual = raised(lambda: ours(f_input, *f_args, **f_kwargs))
        assert type(actual) is type(expected) and str(actual) == str(expected), \
            f"{describe(index, sample)}: raised {actual!r}, torch {expected!r}"
    assert rejected, f"torch's {entry_id(op)} rejected none of the table's bad inputs as the table says"


@pytest.mark.parametrize("op", [op for op in ENTRIES if op.error_inputs_func is not None], ids=entry_id)
def test_rejects_what_torch_rejects(op):
    skip_where_torch_skips(op, "TestCommon", "test_errors", torch.float32)
    check_errors(op, TWINS[op.name])


@pytest.mark.parametrize("route, op, dtype", _cases(["auto"]))
def test_harness_passes_on_torch_itself(route, op, dtype):
    """Every check above, with torch's own function in fastml's place."""
    skip_without_cpu(op, dtype)
    check_matches(op, dtype, op.op)
    if dtype in KERNEL_DTYPES:
        check_matches(op, dtype, op.op, noncontiguous=True)
    if dtype == torch.float32:
        check_matches(op, dtype, op.op, as_keywords=True)
    if dtype == torch.float64 and op.supports_autograd:
        check_gradients(op, op.op)
    if dtype == torch.float32 and op.error_inputs_func is not None:
        check_errors(op, op.op)
