"""Backend registry and selection.

Four backends implement every op, with one forward and one backward each and the same results:

- ``triton``    Triton kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``
- ``cpp``       the compiled extension (pybind11 + OpenMP), CPU tensors: ``fastml._C``, or the
                module of this CPU's level in a dispatch build (fastml/_cpp.py)
- ``numba``     numba-compiled loops, CPU tensors (fallback when the extension is absent)
- ``reference`` pure PyTorch: any device and dtype, torch's own implementation and the oracle
                the others are tested against

Automatic choice (``select``): among the fastml kernel covering the input's device and dtype
(triton on CUDA; cpp on the CPU, else numba) and the reference, the one measured fastest on this
machine for the call's shape class, a kernel only where it beats torch's by a margin
(fastml/_tune.py). A configuration no kernel covers (an exotic dtype, a device it cannot reach)
runs the reference path, so fastml never fails where torch works. ``use_backend(name)`` (a
context manager) or ``FASTML_BACKEND=name`` forces a backend, and nothing is timed; asking for a
backend that is absent raises ``BackendUnavailableError`` saying why.

Probing is lazy and cached: importing fastml imports neither triton nor numba.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib
import json
import os
import warnings
from pathlib import Path

import torch

from fastml import _env, _tune

BACKENDS = ("triton", "cpp", "numba", "reference")
ENV_VAR = "FASTML_BACKEND"

_FLOAT_KERNEL_DTYPES = frozenset({torch.float32, torch.float64})
_TRITON_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


class BackendUnavailableError(RuntimeError):
    """A backend was requested that is not present on this installation."""


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    name: str
    present: bool
    reason: str  # why it is absent, or what it runs on when present


def triton_interpreted() -> bool:
    """True when Triton kernels run through the interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _probe_triton() -> BackendStatus:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # not installed, or broken
        return BackendStatus("triton", False, f"triton is not importable ({exc})")
    if triton_interpreted():
        return BackendStatus("triton", True, f"triton {triton.__version__}, interpreter (TRITON_INTERPRET=1)")
    if torch.cuda.is_available():
        return BackendStatus("triton", True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}")
    return BackendStatus(
        "triton", False,
        f"triton {triton.__version__} is installed but no CUDA GPU is visible "
        "(set TRITON_INTERPRET=1 to run its kernels on CPU tensors through the interpreter)")


def _build_info() -> str:
    path = Path(__file__).with_name("_build_info.json")
    try:
        return json.loads(path.read_text()).get("cpp", "unknown")
    except (OSError, ValueError):
        return "no build record: fastml was not installed with pip, so the C++ extension was never built"


def _probe_cpp() -> BackendStatus:
    from fastml import _cpp

    # A bad FASTML_CPU_LEVEL raises ValueError here, naming the variable (as a bad FASTML_BACKEND
    # does): falling back to numba instead would be the silent slowdown the variable exists to avoid.
    chosen = _cpp.cpu_level()
    build = _build_info()
    try:
        module = _cpp.module()
    except ImportError as exc:
        name = chosen["module"] or "fastml._C"
        return BackendStatus("cpp", False, f"{name} is not importable ({exc}); build: {build}")
    level = f"CPU level {chosen['level']}: {chosen['reason']}"
    failed = "" if build in ("built", "unknown") or build.startswith("no build record") else f"; build: {build}"
    tiles = ""
    if hasattr(module, "cache_sizes"):  # tiles and blocks sized for: the build's vectors, this CPU's caches
        caches = module.cache_sizes()
        tiles = (f", {module.vector_registers} x {module.vector_bytes}-byte vector registers, "
                 f"L1d {caches['l1d'] // 1024} KiB, L2 {caches['l2'] // 1024} KiB")
        if _cpp.cache_sizes_in_force:
            tiles += f" ({_cpp.CACHE_ENV})"
    return BackendStatus("cpp", True, f"{module.__name__} ({getattr(module, 'isa', '') or 'generic'}{tiles}), OpenMP, "
                                      f"up to {module.openmp_max_threads} threads; {level}{failed}")


def _probe_numba() -> BackendStatus:
    try:
        import numba
    except Exception as exc:
        return BackendStatus("numba", False, f"numba is not importable ({exc})")
    return BackendStatus("numba", True, f"numba {numba.__version__}")


_PROBES = {
    "triton": _probe_triton,
    "cpp": _probe_cpp,
    "numba": _probe_numba,
    "reference": lambda: BackendStatus("reference", True, f"pure PyTorch {torch.__version__}"),
}


@functools.cache
def status(name: str) -> BackendStatus:
    """Presence of one backend, probed once."""
    _check_name(name)
    return _PROBES[name]()


def available() -> list[str]:
    """Names of the backends present here, in order of preference."""
    return [name for name in BACKENDS if status(name).present]


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown fastml backend {name!r}; expected one of {', '.join(BACKENDS)}")


def _require(name: str) -> str:
    _check_name(name)
    st = status(name)
    if not st.present:
        raise BackendUnavailableError(f"fastml backend {name!r} is not available: {st.reason}")
    return name


_backend_env = _env.reader(ENV_VAR)
_backend_env_set = _env.raw_reader(ENV_VAR)
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastml_backend", default=None)


@contextlib.contextmanager
def use_backend(name: str):
    """Run the enclosed fastml calls on backend ``name`` (where it covers the configuration).

    >>> with fastml.use_backend("numba"):
    ...     loss = fastml.functional.linear_mse(x, w, b, y)
    """
    token = _override.set(_require(name))
    try:
        yield name
    finally:
        _override.reset(token)


def forced() -> bool:
    """Whether use_backend or FASTML_BACKEND asks for a backend: ``requested() is not None``
    without checking the name (whatever then runs calls ``requested``, which does), for the
    check every drop-in layer's call makes (fastml/_route.py)."""
    if _override.get() is not None:
        return True
    return bool(_backend_env_set()) and not _backend_env().isspace()  # (decoded only where set)


def requested() -> str | None:
    """The backend asked for by use_backend or FASTML_BACKEND, if any."""
    name = _override.get()
    if name is not None:
        return name
    env = _backend_env().strip()
    return _require(env) if env else None


def covers(name: str, tensor: torch.Tensor) -> bool:
    """Whether backend ``name`` has kernels for ``tensor``'s device and dtype."""
    if name == "reference":
        return True
    if name == "triton":
        on_device = tensor.is_cuda or (tensor.device.type == "cpu" and triton_interpreted())
        return on_device and tensor.dtype in _TRITON_DTYPES and status("triton").present
    return tensor.is_cpu and tensor.dtype in _FLOAT_KERNEL_DTYPES and status(name).present


def kernel_candidates(tensor: torch.Tensor, implemented: tuple[str, ...] = BACKENDS) -> tuple[str, ...]:
    """The fastml kernel that competes with torch's implementation for ``tensor`` (the op's main
    input): triton for CUDA tensors; cpp for CPU tensors, else numba. Empty when none covers it."""
    order = ("triton",) if tensor.is_cuda else ("cpp", "numba")
    for name in order:
        if name in implemented and covers(name, tensor):
            return (name,)
        if name in implemented and not status(name).present:
            _warn_missing_once(name)
    return ()


def select(tensor: torch.Tensor, implemented: tuple[str, ...] = BACKENDS, key: tuple | None = None,
           run=None, within=None) -> str:
    """The backend that runs an op on ``tensor`` (the op's main input).

    ``implemented`` lists the backends that have this op; the reference is always among them.
    ``key`` is the call's shape class, its first item the op's name (fastml.ops.shape_class), and
    ``run(name)`` calls the op on backend ``name`` with this call's inputs, free of side effects:
    the measured choice times it the first time the class is seen (fastml/_tune.py). Without a
    key, the static rule decides. ``within``: the layer the call belongs to (``_tune.scope``),
    where the call runs outside it (a backward).
    """
    want = requested()
    if want is not None:
        chosen = want if want in implemented and covers(want, tensor) else "reference"
        return _tune.note(key, chosen, "forced")
    kernels = kernel_candidates(tensor, implemented)
    if not kernels:
        return _tune.note(key, "reference", "no kernel covers it")
    if key is None:
        return _tune.static_choice("", kernels)
    return _tune.choose(key, kernels, tensor, run, within=within)


def settings() -> tuple | None:
    """What ``select``'s choice depends on besides its shape class (key) and the probes' verdicts:
    use_backend's and FASTML_BACKEND's request and _tune.settings() (None while fastml.tune
    records choices: then nothing may be reused). A caller on a hot path (an optimizer's step)
    may remember select's answer for a key beside this value and reuse it while they are equal:
    a cheaper check than select's own, which counts for a small model's step."""
    tuning = _tune.settings()
    return None if tuning is None else (_override.get(), _backend_env_set(), tuning)  # (raw: compared only)


def decided(tensor: torch.Tensor, implemented: tuple[str, ...], key: tuple) -> str | None:
    """What ``select`` would choose for shape class ``key`` without timing anything: None while
    the measured choice has not decided it (fastml/_route.py asks, to know a layer's route)."""
    kernels = kernel_candidates(tensor, implemented)
    return _tune.decided(key, kernels) if kernels else "reference"


@functools.cache
def _warn_missing_once(name: str) -> None:
    """Say once per process that a preferred backend is missing and why (fastml.info() has more)."""
    warnings.warn(f"fastml: backend {name!r} is unavailable ({status(name).reason}); "
                  "falling back to the next backend. See fastml.info().", RuntimeWarning, stacklevel=4)


@functools.cache
def load(op_package: str, name: str):
    """The module implementing one backend of an op, e.g. load("fastml.ops.linear", "cpp");
    imported on first use (so triton and numba load only when their backend runs), then cached."""
    suffix = "reference" if name == "reference" else f"{name}_impl"
    return importlib.import_module(f"{op_package}.{suffix}")


def info() -> dict[str, BackendStatus]:
    """Every backend's status, in order of preference."""
    return {name: status(name) for name in BACKENDS}
