"""The command line: ``python -m fastml info`` and ``python -m fastml bench`` (through a subprocess
with this interpreter; the bench at its hidden ``--tiny`` sizes, which take seconds)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from fastml import _backend, _bench
from fastml.__main__ import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
UNITS = {"memory": "GB/s", "compute": "GFLOP/s", "latency": "steps/s"}


def fastml_cli(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "fastml", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def test_info_runs():
    done = fastml_cli("info")
    assert done.returncode == 0, done.stderr
    for name in ("triton", "cpp", "numba", "reference"):
        assert name in done.stdout
    assert "CPU kernels" in done.stdout and "decisions:" in done.stdout


# The tests of `python -m fastml bench` share one run of it in a child: 10 s on 2 cores, 50 s where
# numba compiles its kernels anew (a fresh checkout), so they are long: CI runs them.
@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    done = fastml_cli("bench", "--tiny", "--device", "cpu", "--repeat", "2", "--out", str(out), cwd=out)
    assert done.returncode == 0, done.stdout + done.stderr
    return out, done, json.loads((out / "fastml-bench.json").read_text())


@pytest.mark.long
def test_bench_json_has_every_op_backend_and_unit(tiny_bench):
    _, done, report = tiny_bench
    assert report["machine"]["cpu_model"] and report["machine"]["cpu_cores"] >= 1
    assert report["machine"]["torch"] == torch.__version__
    ceiling = report["ceilings"]["cpu"]
    assert ceiling["copy_GBps"] > 0 and ceiling["matmul_GFLOPps"] > 0
    for name in _bench.DEFAULT_HOT_PATHS:
        hot_path = _bench.HOT_PATHS[name]
        rows = [r for r in report["rows"] if r["op"] == name]
        skipped = [s for s in report["skipped"] if s["op"] == name and s["backend"] is None]
        if hot_path.requires():
            assert skipped and not rows, f"{name}: absent here, so it is reported as skipped"
            continue
        assert rows, f"no rows for {name}"
        expected, missing = _bench.fastml_backends(hot_path.ops, "cpu")
        absent = {s["backend"] for s in report["skipped"] if s["op"] == name and s["backend"]}
        assert {b for b, _ in missing} <= absent, "every backend not timed says why"
        for case in {r["case"] for r in rows}:
            impls = {r["impl"] for r in rows if r["case"] == case}
            failed = {s["backend"] for s in report["skipped"] if s["op"] == name and s.get("case") == case}
            assert impls | failed == {"torch", *hot_path.torch_impls, "auto", *expected}, (name, case, impls)
            (auto,) = [r for r in rows if r["case"] == case and r["impl"] == "auto"]
            assert auto["runs"], "the auto row names what the measured choice ran"
    for r in report["rows"]:
        assert r["unit"] == UNITS[r["bound"]]
        assert r["time_ms"] > 0 and r["throughput"] > 0 and r["speedup"] > 0
        assert (r["ceiling_share"] is None) == (r["bound"] == "latency")
        if r["impl"] == "torch":
            assert r["speedup"] == pytest.approx(1.0)
    assert "vs torch" in done.stdout and "of ceiling" in done.stdout


@pytest.mark.long
def test_bench_chart_is_a_png(tiny_bench):
    out, done, _ = tiny_bench
    if importlib.util.find_spec("matplotlib") is None:
        assert "no chart" in done.stdout and "matplotlib" in done.stdout
        pytest.skip("matplotlib is not importable: the bench skips its chart")
    assert (out / "fastml-bench.png").read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.long
def test_compare_two_profiles(tiny_bench, tmp_path):
    """--compare prints every shared row with B's speed relative to A (A's time / B's time)."""
    out, _, report = tiny_bench
    slower = dict(report, rows=[dict(row, time_ms=2 * row["time_ms"]) for row in report["rows"][1:]])
    (tmp_path / "slower.json").write_text(json.dumps(slower))
    done = fastml_cli("bench", "--compare", str(out / "fastml-bench.json"), str(tmp_path / "slower.json"))
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("cpu ")]
    assert len(lines) == len(report["rows"]) - 1 and all(line.endswith("0.50x") for line in lines)
    assert "not compared: 1 row(s) only in fastml-bench.json, 0 only in slower.json" in done.stdout


@pytest.mark.long
def test_compare_rejects_what_is_not_a_profile(tiny_bench, tmp_path, capsys):
    out, _, _ = tiny_bench
    (tmp_path / "other.json").write_text('{"rows": []}')
    (tmp_path / "broken.json").write_text("{")
    cases = ((tmp_path / "missing.json", "cannot read"), (tmp_path / "other.json", "is not a fastml bench"),
             (tmp_path / "broken.json", "is not JSON"))
    for other, message in cases:
        assert main(["bench", "--compare", str(out / "fastml-bench.json"), str(other)]) == 2
        assert message in capsys.readouterr().err


BAD_OPTIONS = [
    (["bench", "--ops", "no_such_op"], "unknown op 'no_such_op'"),
    (["bench", "--ops", "linear_mse,nope"], "unknown op 'nope'"),
    (["bench", "--repeat", "0"], "must be at least 1"),
    (["bench", "--repeat", "many"], "expected a whole number"),
    (["bench", "--device", "tpu"], "invalid choice: 'tpu'"),
    ([], "required"),
]


@pytest.mark.parametrize("args, message", BAD_OPTIONS)
def test_bad_options_return_2(args, message, capsys):
    """In process (each subprocess costs a torch import): main() returns argparse's code."""
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_bad_option_exits_2_from_the_command_line():
    done = fastml_cli("bench", "--ops", "no_such_op", "--repeat", "0")
    assert done.returncode == 2
    assert "usage: fastml bench" in done.stderr and "error:" in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here")
def test_cuda_without_gpu_exits_2():
    done = fastml_cli("bench", "--device", "cuda")
    assert done.returncode == 2
    assert "no CUDA GPU is visible" in done.stderr


def test_main_runs_info(capsys):
    assert main(["info"]) == 0
    assert "reference" in capsys.readouterr().out


def test_auto_only_times_torch_and_the_measured_choice():
    report = _bench.run(["linear_mse"], repeat=1, sizes="tiny", progress=None, forced=False)
    assert {row["impl"] for row in report["rows"]} == {"torch", _bench.AUTO}
    present = [name for name in _bench.CPU_BACKENDS if _backend.status(name).present]
    said = {entry["backend"] for entry in report["skipped"] if entry["reason"] == "not timed: --auto-only"}
    assert said == set(present)
