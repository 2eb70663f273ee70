"""fastml.info(): which backends are present here, and why one is not."""

from __future__ import annotations

import torch

from fastml import _backend


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
    }
    if print_report:
        print(format_report(report))
    return report


def _first_present(names) -> str:
    return next((n for n in names if _backend.status(n).present), "reference")


def format_report(report: dict) -> str:
    lines = [f"fastml {__import__('fastml').__version__}, torch {report['torch']}, {report['threads']} CPU threads, "
             f"GPU: {report['cuda'] or 'none'}"]
    for name, st in report["backends"].items():
        mark = "yes" if st["present"] else "NO "
        lines.append(f"  {name:<10} {mark}  {st['detail']}")
    lines.append(f"CPU tensors run on: {report['default_cpu_backend']}; "
                 f"CUDA tensors run on: {report['default_cuda_backend']}")
    return "\n".join(lines)
