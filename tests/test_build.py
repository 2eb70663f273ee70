"""Installation without a working C++ compiler still succeeds, and fastml says why cpp is absent."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def install_without_compiler(tmp_path_factory):
    pytest.importorskip("pybind11", reason="the non-isolated test build needs pybind11 (in the test extra)")
    target = tmp_path_factory.mktemp("no-compiler-install")
    # Build from a copy of the sources alone: an editable install leaves _C*.so in the tree.
    source = tmp_path_factory.mktemp("source") / "fastml-src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        "*.so", "build", "*.egg-info", "__pycache__", "_build_info.json", ".git", ".benchmarks", "bench"))
    env = dict(os.environ, CC="false", CXX="false")  # every compiler call fails
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-v", "--no-deps", "--no-build-isolation", "--no-cache-dir",
         "--target", str(target), str(source)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return target, proc


# An editable install of fastml (as the README's test command makes) adds an import hook that
# maps fastml._C to the source tree whatever sys.path says; the installed copy must not see it.
_WITHOUT_EDITABLE_HOOK = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
                          "if not getattr(f, '__module__', '').startswith('__editable__')]\n")


def run_installed(target, code):
    code = _WITHOUT_EDITABLE_HOOK + code
    env = dict(os.environ, PYTHONPATH=str(target))
    env.pop("FASTML_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=target,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_install_succeeds_and_says_so(install_without_compiler):
    target, proc = install_without_compiler
    assert "fastml will run on its numba / reference backends" in proc.stderr + proc.stdout
    assert not list((target / "fastml").glob("_C*.so"))
    out = run_installed(target, "import fastml, json; print(json.dumps(fastml.info(print_report=False)))")
    report = json.loads(out)
    cpp = report["backends"]["cpp"]
    assert not cpp["present"]
    assert "build failed at install time" in cpp["detail"]
    assert report["default_cpu_backend"] in ("numba", "reference")


def test_ops_still_work_without_the_extension(install_without_compiler):
    target, _ = install_without_compiler
    code = ("import torch, fastml, torch.nn.functional as F\n"
            "x, w, b, y = torch.randn(9, 3), torch.randn(2, 3, requires_grad=True), torch.randn(2), torch.randn(9, 2)\n"
            "loss = fastml.functional.linear_mse(x, w, b, y)\n"
            "ref = F.mse_loss(F.linear(x, w, b), y)\n"
            "torch.testing.assert_close(loss, ref)\n"
            "loss.backward(); print('ok')\n")
    env_code = "import warnings; warnings.simplefilter('always')\n" + code
    proc_out = run_installed(target, env_code)
    assert proc_out.strip().endswith("ok")


def test_fallback_is_announced_once(install_without_compiler):
    target, _ = install_without_compiler
    code = ("import warnings, torch, fastml\n"
            "with warnings.catch_warnings(record=True) as seen:\n"
            "    warnings.simplefilter('always')\n"
            "    for _ in range(3): fastml.functional.linear(torch.randn(4, 3), torch.randn(2, 3))\n"
            "print(sum(\"backend 'cpp' is unavailable\" in str(w.message) for w in seen))\n")
    assert run_installed(target, code).strip() == "1"
