"""fastml.info(): which backends are present here, and why one is not."""

from __future__ import annotations

import torch

from fastml import _backend, _tune


def info(print_report: bool = True) -> dict:
    """Report fastml's backends; returns {backend: {"present": bool, "detail": str}, ...}.

    Also ``python -m fastml info``.
    """
    report = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "backends": {name: {"present": st.present, "detail": st.reason} for name, st in _backend.info().items()},
        "default_cpu_backend": _first_present(("cpp", "numba")),
        "default_cuda_backend": "triton" if _backend.status("triton").present and torch.cuda.is_available() else
        "reference",
        "cpu_level": _cpu_level(),
        "tuning": {"mode": _tune.mode(), "cache": str(_tune.cache_path()), "stored_decisions": _tune.stored_count(),
                   "decisions_this_process": len(_tune.decisions()), "margin": _tune.MARGIN},
        "freed_memory": _freed_memory(),
    }
    if print_report:
        print(format_report(report))
    return report


def _cpu_level() -> dict:
    """The C++ module's CPU level and why (fastml/_cpp.py), or the error of a bad FASTML_CPU_LEVEL."""
    from fastml import _cpp

    try:
        return _cpp.cpu_level()
    except ValueError as exc:
        return {"level": None, "module": None, "reason": str(exc), "built_levels": []}


def _freed_memory() -> str:
    """What becomes of the memory the process frees (fastml/_memory.py)."""
    from fastml import _memory

    if _memory._glibc() is None:
        return "the allocator's own business (not glibc's malloc: fastml.keep_freed_memory cannot change it)"
    if _memory.keeping_freed_memory():
        return "kept for the next tensors (fastml.keep_freed_memory; fastml.empty_cache() gives it back)"
    return "not kept by fastml: glibc's thresholds decide (fastml.keep_freed_memory() keeps it: faster training steps)"


def _first_present(names) -> str:
    return next((n for n in names if _backend.status(n).present), "reference")


def format_report(report: dict) -> str:
    lines = [f"fastml {__import__('fastml').__version__}, torch {report['torch']}, {report['threads']} CPU threads, "
             f"GPU: {report['cuda'] or 'none'}"]
    for name, st in report["backends"].items():
        mark = "yes" if st["present"] else "NO "
        lines.append(f"  {name:<10} {mark}  {st['detail']}")
    lines.append(f"CPU kernels: {report['default_cpu_backend']}; CUDA kernels: {report['default_cuda_backend']}")
    level = report["cpu_level"]
    built = f"; levels built: {', '.join(level['built_levels'])}" if level["built_levels"] else ""
    lines.append(f"C++ level: {level['level'] or 'none'} ({level['module'] or 'no module'}): {level['reason']}{built} "
                 "(FASTML_CPU_LEVEL forces a lower one)")
    tuning = report["tuning"]
    if tuning["mode"] == "on":
        lines.append(f"choice: measured per op and shape class; a kernel runs only where it beats torch by "
                     f"{tuning['margin']:.0%} (FASTML_TUNE=off for the static rule)")
    else:
        lines.append("choice: the static rule, nothing timed (FASTML_TUNE=off or fastml.set_tuning('off'))")
    lines.append(f"decisions: {tuning['stored_decisions']} kept in {tuning['cache']} (FASTML_CACHE_DIR moves it), "
                 f"{tuning['decisions_this_process']} made or used in this process")
    lines.append(f"freed memory: {report['freed_memory']}")
    return "\n".join(lines)
