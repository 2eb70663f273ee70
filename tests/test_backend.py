"""Backend registry: selection, overrides, absent backends, info()."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import fastml
from fastml import _backend


def test_kernel_candidate_on_cpu():
    """The kernel that competes with torch's implementation for CPU tensors (the measured choice,
    tests/test_tune.py, decides between them): cpp, else numba."""
    x = torch.randn(3, 2)
    expected = next(((n,) for n in ("cpp", "numba") if _backend.status(n).present), ())
    assert _backend.kernel_candidates(x) == expected
    assert _backend.kernel_candidates(x.half()) == ()


def test_uncovered_dtype_takes_reference_path():
    with fastml.use_backend("reference"):
        pass
    for name in _backend.available():
        with fastml.use_backend(name):
            assert _backend.select(torch.ones(2, dtype=torch.int32)) == "reference"
            if name in ("cpp", "numba"):
                assert _backend.select(torch.ones(2, dtype=torch.float16)) == "reference"


def test_use_backend_is_scoped_and_nests():
    assert _backend.requested() is None
    with fastml.use_backend("reference"):
        assert _backend.select(torch.randn(2)) == "reference"
        if _backend.status("cpp").present:
            with fastml.use_backend("cpp"):
                assert _backend.select(torch.randn(2)) == "cpp"
        assert _backend.requested() == "reference"
    assert _backend.requested() is None


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown fastml backend 'cuda'"):
        with fastml.use_backend("cuda"):
            pass


def test_absent_backend_says_why(monkeypatch):
    absent = _backend.BackendStatus("numba", False, "numba is not importable (simulated)")
    monkeypatch.setitem(_backend._PROBES, "numba", lambda: absent)
    _backend.status.cache_clear()
    try:
        with pytest.raises(fastml.BackendUnavailableError, match=r"'numba' is not available: .*simulated"):
            with fastml.use_backend("numba"):
                pass
    finally:
        _backend.status.cache_clear()


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("FASTML_BACKEND", "reference")
    assert _backend.select(torch.randn(2)) == "reference"
    monkeypatch.setenv("FASTML_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown fastml backend 'nonsense'"):
        _backend.select(torch.randn(2))


def test_override_runs_the_requested_kernels(monkeypatch):
    """use_backend really routes the call: a spy on the reference module sees it."""
    from fastml.ops.linear_mse import reference

    calls = []
    original = reference.forward
    monkeypatch.setattr(reference, "forward", lambda *a: calls.append(1) or original(*a))
    x, w, y = torch.randn(4, 3), torch.randn(1, 3), torch.randn(4, 1)
    with fastml.use_backend("reference"):
        fastml.functional.linear_mse(x, w, None, y)
    assert calls == [1]


def test_info_reports_every_backend():
    report = fastml.info(print_report=False)
    assert set(report["backends"]) == set(_backend.BACKENDS)
    for st in report["backends"].values():
        assert isinstance(st["present"], bool) and st["detail"]
    assert report["backends"]["reference"]["present"]


def test_import_has_no_global_effects():
    """Importing fastml neither imports triton / numba nor changes torch's behaviour (the optimizer
    step hook that follows fused steps waits for a cached weight: fastml/_route.py)."""
    code = ("import sys, torch; from torch.optim import optimizer; before = torch.get_num_threads(); "
            "import fastml; print(json.dumps({'triton': 'triton' in sys.modules, 'numba': 'numba' in sys.modules, "
            "'threads': torch.get_num_threads() == before, "
            "'step hooks': len(optimizer._global_optimizer_post_hooks)}))")
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == {"triton": False, "numba": False, "threads": True, "step hooks": 0}
