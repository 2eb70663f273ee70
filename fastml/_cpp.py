"""Helpers for calling the C++ kernels: tensors cross as data pointers, chosen by dtype.

Which compiled module holds the kernels (setup.py's docstring has the two layouts):

- a build for one machine (the default, ``-march=native``, or one FASTML_CPU_ARCH value):
  ``fastml._C``;
- a dispatch build (``FASTML_CPU_ARCH=dispatch``): one module per x86-64 level,
  ``fastml._C_x86_64_v2`` / ``_v3`` / ``_v4``. The highest level built whose instructions the CPU
  reports is loaded; ``FASTML_CPU_LEVEL=x86-64-v3`` asks for a lower one (a level the CPU cannot
  run is refused: it would die on an illegal instruction).

The choice is made once per process (the first kernel call, or ``cpu_level()``) and
``cpu_level()`` says what was chosen and why.

The kernels size their cache blocks from the caches the CPU reports (csrc/common.h: today every
block follows the L2; the L1d is reported too). ``FASTML_CACHE_SIZES="l1d=48K,l2=2M"`` gives other
sizes in their place (``cache_sizes_given``): another CPU's, to run its blocking on this one, or
tiny ones, which make small shapes cross the blocks' boundaries (tests/test_cache_sizes.py).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import platform
import re
from pathlib import Path

import torch

_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}

LEVEL_ENV = "FASTML_CPU_LEVEL"

# The x86-64 micro-architecture levels (x86-64 psABI) a dispatch build compiles, lowest first,
# with the CPU flags each needs, as Linux's /proc/cpuinfo spells them (pni is SSE3, abm is LZCNT,
# lahf_lm is LAHF/SAHF in 64-bit mode). Linux leaves out the AVX / AVX-512 flags when the kernel
# does not save those registers, so a listed flag is one a program may use.
_V2 = ("cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2")
_V3 = _V2 + ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave")
_V4 = _V3 + ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")
LEVEL_FLAGS = {"x86-64-v2": _V2, "x86-64-v3": _V3, "x86-64-v4": _V4}
LEVELS = tuple(LEVEL_FLAGS)

# The same features in LLVM's names (llvmlite, numba's compiler: the probe where there is no
# /proc/cpuinfo, on macOS or Windows).
_LLVM_NAMES = {"lahf_lm": "sahf", "pni": "sse3", "sse4_1": "sse4.1", "sse4_2": "sse4.2", "bmi1": "bmi",
               "abm": "lzcnt"}


def level_module(level: str) -> str:
    """The dispatch build's module for ``level``: _C_x86_64_v3 for x86-64-v3 (as setup.py names it)."""
    return "_C_" + level.replace("-", "_")


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def cpu_flags() -> tuple[frozenset[str] | None, str]:
    """(the CPU's feature flags in /proc/cpuinfo's names, where they came from); None when they
    cannot be read, or on a CPU that is not x86-64 (the levels then mean nothing)."""
    if not _is_x86():
        return None, f"not an x86-64 CPU ({platform.machine()})"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split()), "/proc/cpuinfo"
    except OSError:
        pass
    try:  # no /proc: ask LLVM, which numba (a dependency) brings
        from llvmlite import binding

        features = {name.lstrip("+") for name, on in binding.get_host_cpu_features().items() if on}
    except Exception as exc:
        return None, f"no /proc/cpuinfo, and llvmlite could not say ({exc})"
    return frozenset(f for f in _V4 if _LLVM_NAMES.get(f, f) in features), "llvmlite's host CPU features"


def runnable_levels(flags: frozenset[str] | None) -> list[str]:
    """The levels whose flags are all in ``flags``, lowest first."""
    if flags is None:
        return []
    return [level for level in LEVELS if all(f in flags for f in LEVEL_FLAGS[level])]


def _missing(level: str, flags: frozenset[str]) -> str:
    return ", ".join(f for f in LEVEL_FLAGS[level] if f not in flags)


def _build_record() -> dict:
    try:
        return json.loads(Path(__file__).with_name("_build_info.json").read_text())
    except (OSError, ValueError):
        return {}


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(f"fastml.{name}") is not None
    except (ImportError, ValueError):
        return False


def choose_level(flags: frozenset[str] | None, source: str, built_levels: list[str], single: bool,
                 single_arch: str | None, requested: str) -> dict:
    """The choice, from what the CPU reports and what was built (no side effects; cpu_level()
    gathers the arguments). Raises ValueError for a bad or refused ``requested`` level."""
    runs = runnable_levels(flags)
    best = runs[-1] if runs else None
    cpu = (f"this CPU runs up to {best} (flags from {source})" if best else
           f"this CPU's level is unknown ({source})" if flags is None else
           f"this CPU lacks {_missing(LEVELS[0], flags)} for {LEVELS[0]} (flags from {source})")
    out = {"level": None, "module": None, "reason": "", "cpu_level": best, "built_levels": list(built_levels),
           "forced": bool(requested), "layout": "dispatch" if built_levels and (requested or not single) else
           "single" if single else "none"}

    if requested:
        if requested not in LEVEL_FLAGS:
            raise ValueError(f"{LEVEL_ENV}={requested!r} is not a CPU level fastml knows; "
                             f"expected one of {', '.join(LEVELS)} (or leave it unset)")
        if requested not in built_levels:
            have = ", ".join(built_levels) or "none"
            raise ValueError(f"{LEVEL_ENV}={requested} asks for fastml.{level_module(requested)}, which this "
                             f"installation does not have (levels built: {have}); a dispatch build "
                             "(FASTML_CPU_ARCH=dispatch pip install .) makes one module per level")
        if flags is not None and requested not in runs:
            raise ValueError(f"{LEVEL_ENV}={requested} is refused: {cpu}, and {requested} needs "
                             f"{_missing(requested, flags)} besides; its kernels would stop on an illegal "
                             "instruction")
        out.update(level=requested, module=f"fastml.{level_module(requested)}",
                   reason=f"forced by {LEVEL_ENV}={requested}; {cpu}")
        return out

    if out["layout"] == "single":
        arch = single_arch if single_arch is not None else "unknown"
        out.update(level=arch, module="fastml._C")
        if arch in LEVEL_FLAGS and flags is not None and arch not in runs:
            out.update(level=None, module=None,
                       reason=f"fastml._C was built for {arch} (FASTML_CPU_ARCH) but {cpu}: it lacks "
                              f"{_missing(arch, flags)}; rebuild it here, or install a dispatch build")
        else:
            what = f"-march={arch}" if arch not in ("", "unknown") else (
                "the compiler's default target" if arch == "" else "flags not recorded")
            out["reason"] = f"a build for one machine: fastml._C compiled with {what} (FASTML_CPU_ARCH); {cpu}"
        return out

    if out["layout"] == "none":
        out["reason"] = "no C++ module was built"
        return out

    # Dispatch: the highest level built that the CPU runs; without flags, the lowest (the
    # baseline every x86-64 CPU of the last fifteen years has).
    usable = [level for level in built_levels if flags is None or level in runs]
    if not usable:
        out["reason"] = f"none of the levels built ({', '.join(built_levels)}) runs here: {cpu}"
        return out
    level = usable[-1] if flags is not None else usable[0]
    if flags is None:
        why = f"the lowest level built, as {cpu}"
    else:
        why = f"the highest level built that this CPU runs: it reports all of {level}'s flags (from {source})"
        above = [lv for lv in built_levels if LEVELS.index(lv) > LEVELS.index(level)]
        if above:
            why += f"; {above[0]} would need {_missing(above[0], flags)}"
        elif best and LEVELS.index(best) > LEVELS.index(level):
            why += f" ({best} would run here, but was not built)"
    out.update(level=level, module=f"fastml.{level_module(level)}", reason=why)
    return out


@functools.cache
def cpu_level() -> dict:
    """Which compiled kernels this process uses, and why: a dict with
    ``level`` (an x86-64 level such as "x86-64-v3", a build's -march value such as "native", or
    None when no module can run), ``module`` (the module's name, or None), ``reason`` (why, in
    words), ``cpu_level`` (the highest level this CPU runs, None when unknown or not x86),
    ``built_levels`` (a dispatch build's levels), ``forced`` (FASTML_CPU_LEVEL set), and
    ``layout`` ("dispatch", "single" or "none").

    Decided once per process. Raises ValueError when FASTML_CPU_LEVEL names no level, a level
    not built, or one this CPU cannot run.
    """
    record = _build_record()
    flags, source = cpu_flags()
    built = [level for level in LEVELS if _module_exists(level_module(level))]
    single = _module_exists("_C")
    if single and built and record.get("layout") == "dispatch":
        single = False  # a stale fastml._C beside the dispatch build the record describes
    # The -march fastml._C was compiled with (None: a record from before modules were recorded).
    single_arch = record.get("modules", {}).get("_C", {}).get("march")
    return choose_level(flags, source, built, single, single_arch, os.environ.get(LEVEL_ENV, "").strip())


CACHE_ENV = "FASTML_CACHE_SIZES"
_CACHE_SIZE = re.compile(r"(\d+)\s*(k|kib|m|mib|g|gib)?", re.ASCII | re.IGNORECASE)
_CACHE_UNITS = {"": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30}
_CACHE_RANGE = (1 << 10, 1 << 30)

cache_sizes_in_force: dict[str, int] = {}
"""The sizes FASTML_CACHE_SIZES gave the loaded module (empty: the CPU's own), as ``module()`` set them."""


def cache_sizes_given(text: str) -> dict[str, int]:
    """The sizes, in bytes, that ``text`` (FASTML_CACHE_SIZES's value) gives: {"l1d": ..., "l2":
    ...}, either or both. ValueError naming the variable for anything else: a size the kernels
    were not blocked for is the silent slowdown, or the untested blocking, the variable is for."""
    def bad(why: str) -> ValueError:
        return ValueError(f"{CACHE_ENV}={text!r}: {why}; expected l1d=SIZE and/or l2=SIZE, comma-separated, "
                          f"each SIZE in bytes or with K, M or G (KiB, MiB, GiB) from 1K to 1G, e.g. 'l1d=48K,l2=2M'")
    given: dict[str, int] = {}
    for item in text.split(","):
        name, sep, size = (part.strip() for part in item.partition("="))
        if not sep or name.lower() not in ("l1d", "l2"):
            raise bad(f"{item.strip()!r} names no cache")
        name = name.lower()
        if name in given:
            raise bad(f"{name} is given twice")
        match = _CACHE_SIZE.fullmatch(size)
        if match is None:
            raise bad(f"{size!r} is not a size")
        given[name] = int(match[1]) * _CACHE_UNITS[(match[2] or "").lower()]
        if not _CACHE_RANGE[0] <= given[name] <= _CACHE_RANGE[1]:
            raise bad(f"{name}={size} is out of range")
    return given


@functools.cache
def module():
    """The compiled module chosen by cpu_level(), imported once, with FASTML_CACHE_SIZES's sizes
    (if set) in place of the caches the CPU reports; ImportError saying why when none can run
    here, ValueError for a bad FASTML_CACHE_SIZES."""
    chosen = cpu_level()
    if chosen["module"] is None:
        raise ImportError(f"no fastml C++ module to load: {chosen['reason']}")
    text = os.environ.get(CACHE_ENV, "").strip()
    given = cache_sizes_given(text) if text else {}  # (checked before the import: nothing half set)
    loaded = importlib.import_module(chosen["module"])
    if given:
        if not hasattr(loaded, "_set_cache_sizes"):
            raise ValueError(f"{CACHE_ENV} is set, but {chosen['module']} was built before fastml read it: "
                             f"rebuild fastml (pip install -e .) or unset {CACHE_ENV}")
        loaded._set_cache_sizes(**{**loaded.cache_sizes(), **given})  # before any kernel: they read it unlocked
        cache_sizes_in_force.update(given)
    return loaded


@functools.cache
def l2_bytes() -> int:
    """The per-core L2 the kernels block for: this CPU's, as fastml._C reads it, or
    FASTML_CACHE_SIZES's; 1 MiB where no compiled module loads (a build without a compiler)."""
    try:
        return module().cache_sizes()["l2"]
    except (ImportError, AttributeError):
        return 1 << 20


@functools.cache
def kernel(name: str, dtype: torch.dtype):
    """The compiled kernel ``name`` for ``dtype`` (float32 or float64), looked up once."""
    return getattr(module(), f"{name}_{_SUFFIX[dtype]}")


REDUCTION_CODE = {"none": 0, "mean": 1, "sum": 2}
"""A loss's reduction as the kernels take it (csrc/kernels.h: 0 none, 1 mean, 2 sum)."""


def ptr(tensor: torch.Tensor | None) -> int:
    """Data pointer of a contiguous tensor, 0 for an absent one."""
    return 0 if tensor is None else tensor.data_ptr()


threads = torch.get_num_threads


def addresses(tensors) -> list[int]:
    """The tensors' data pointers, as a list (pybind11 takes it as a std::vector). map() over the
    method descriptor walks the list in C, without a comprehension's Python frame."""
    return list(map(_data_ptr, tensors))


def sizes(tensors) -> list[int]:
    """The tensors' element counts, as a list (as ``addresses``)."""
    return list(map(_numel, tensors))


_data_ptr, _numel = torch.Tensor.data_ptr, torch.Tensor.numel
