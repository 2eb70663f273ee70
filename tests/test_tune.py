"""The measured choice (fastml/_tune.py): the decision rule on a fake clock, the cache file, the
static rule, fastml.tune's table, bad settings, and every op giving the same results whichever
implementation wins."""

from __future__ import annotations

import collections
import copy
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import fastml
from fastml import _backend, _memory, _onednn, _route, _tune, _tune_model, _winograd
from conftest import SHIPPED_TIMING, assert_close, rand

CPP = _backend.status("cpp").present
KERNEL = next((name for name in ("cpp", "numba") if _backend.status(name).present), None)
needs_kernel = pytest.mark.skipif(KERNEL is None, reason="no CPU kernel backend (cpp or numba) is present")


@pytest.fixture(autouse=True)
def fresh_decisions(tmp_path, monkeypatch):
    """Each test starts with no decision, in memory or on disk, in a cache folder of its own, and
    with the timing constants fastml ships (conftest.py shortens them for the rest of the suite)."""
    monkeypatch.setattr(_tune, "ROUNDS", SHIPPED_TIMING[0])
    monkeypatch.setattr(_tune, "SAMPLE_SECONDS", SHIPPED_TIMING[1])
    monkeypatch.setenv(_tune.CACHE_VAR, str(tmp_path / "cache"))
    monkeypatch.delenv(_tune.TUNE_VAR, raising=False)
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    _tune.clear_tuning()
    _tune._warn_once.cache_clear()
    fastml.set_tuning(None)
    yield
    fastml.set_tuning(None)
    _tune.clear_tuning()


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(_tune, "clock", fake)
    return fake


def costed_run(clock: FakeClock, costs: dict[str, float]):
    """A run(name) that takes costs[name] seconds of the fake clock, and counts its calls."""
    calls = collections.Counter()

    def run(name):
        calls[name] += 1
        clock.now += costs[name]

    return run, calls


def key(op="toy", *rest) -> tuple:
    return (op, "forward", torch.get_num_threads(), torch.float32, torch.device("cpu"), *rest)


X = torch.ones(4)


# ------------------------------------------------------------------------- the decision rule

def test_faster_kernel_is_chosen_and_the_class_is_decided_once(clock):
    run, calls = costed_run(clock, {"cpp": 1e-4, "reference": 3e-4})
    assert _tune.choose(key(), ("cpp",), X, run) == "cpp"
    assert calls["cpp"] > 1 and calls["reference"] > 1
    decision = _tune.decisions()[key()]
    assert decision.seconds == pytest.approx({"cpp": 1e-4, "reference": 3e-4})
    calls.clear()
    for _ in range(3):
        assert _tune.choose(key(), ("cpp",), X, run) == "cpp"
    assert not calls, "a decided class must not be timed again"


def test_torch_is_kept_when_it_is_faster(clock):
    run, _ = costed_run(clock, {"cpp": 3e-4, "reference": 1e-4})
    assert _tune.choose(key(), ("cpp",), X, run) == "reference"


@pytest.mark.parametrize("ratio, expected", [(1.0, "reference"), (1.0 + _tune.MARGIN / 2, "reference"),
                                             (1.0 + 2 * _tune.MARGIN, "cpp")])
def test_a_kernel_must_win_beyond_the_margin(clock, ratio, expected):
    run, _ = costed_run(clock, {"cpp": 1e-3, "reference": 1e-3 * ratio})
    assert _tune.choose(key(), ("cpp",), X, run) == expected


def test_a_verdict_near_the_line_is_timed_again(clock):
    """A kernel whose first timing a burst of noise slowed to torch's time gets a second, and keeps
    its faster time: a decision persists. A steady tie is timed twice and goes to torch; a clear
    verdict once. (Costs of whole powers of two keep the fake clock's sums exact, and with them
    the calls per sample.)"""
    def calls_of_one_timing(costs):
        run, calls = costed_run(clock, costs)
        _tune.measure(tuple(costs), run, torch.device("cpu"))
        return calls

    tie, clear = {"cpp": 2.0**-10, "reference": 2.0**-10}, {"cpp": 2.0**-10, "reference": 2.0**-9}
    run, calls = costed_run(clock, tie)
    assert _tune.choose(key("tie"), ("cpp",), X, run) == "reference"
    assert calls == {name: 2 * count for name, count in calls_of_one_timing(tie).items()}
    slow_tie = {"cpp": 0.5, "reference": 0.5}  # one round each (SLOW_CALL_SECONDS), and one more
    assert _tune.SLOW_CALL_SECONDS < 0.5
    run, calls = costed_run(clock, slow_tie)
    assert _tune.choose(key("slow tie"), ("cpp",), X, run) == "reference"
    assert calls == {"cpp": 4, "reference": 4}
    run, calls = costed_run(clock, clear)
    assert _tune.choose(key("clear"), ("cpp",), X, run) == "cpp"
    assert calls == calls_of_one_timing(clear)

    calls = collections.Counter()
    first = calls_of_one_timing({"cpp": 1e-3, "reference": 1e-3})

    def noisy(name):  # cpp's first timing as slow as torch's, then its steady time
        calls[name] += 1
        clock.now += 1e-3 if name == "reference" else (1.02e-3 if calls[name] <= first[name] else 0.6e-3)

    assert _tune.choose(key(), ("cpp",), X, noisy) == "cpp"
    assert _tune.decisions()[key()].seconds == pytest.approx({"cpp": 0.6e-3, "reference": 1e-3})


def test_tuning_costs_a_few_calls_for_a_large_op(clock):
    run, calls = costed_run(clock, {"cpp": 0.05, "reference": 0.1})
    _tune.choose(key(), ("cpp",), X, run)
    assert calls == {"cpp": 1 + _tune.ROUNDS, "reference": 1 + _tune.ROUNDS}
    run, calls = costed_run(clock, {"cpp": 1.0, "reference": 2.0})  # slower than SLOW_CALL_SECONDS
    _tune.choose(key("slow"), ("cpp",), X, run)
    assert calls == {"cpp": 2, "reference": 2}


def family_key(rows: int, weight=(8, 32)) -> tuple:
    """A linear-like shape class: the main input (rows, 32) first, then a fixed weight."""
    return key("family", (torch.Size([rows, 32]), torch.Size(weight)), (True, True))


def test_sizes_past_a_familys_first_few_take_a_nearby_timed_choice(clock):
    """Inputs of varying sizes (sequence lengths): the first TIMED_PER_FAMILY sizes of a family
    are timed; a later size within NEAR_FACTOR of one of them takes its choice untimed, and is
    not written to the file; a size far from all of them, or another weight, is timed."""
    run, calls = costed_run(clock, {"cpp": 1e-4, "reference": 3e-4})
    timed_rows = [100 * 3 ** i for i in range(_tune.TIMED_PER_FAMILY)]  # far apart: each is timed
    for rows in timed_rows:
        calls.clear()
        assert _tune.choose(family_key(rows), ("cpp",), X, run) == "cpp"
        assert calls, f"the family's size {rows} must be timed"
    calls.clear()
    slower, _ = costed_run(clock, {"cpp": 3e-4, "reference": 1e-4})  # would choose torch if it were timed
    near = int(timed_rows[1] * 1.5)
    assert _tune.choose(family_key(near), ("cpp",), X, slower) == "cpp"
    decision = _tune.decisions()[family_key(near)]
    assert decision.rule == "nearest timed size" and not decision.seconds
    assert _tune.stored_count() == _tune.TIMED_PER_FAMILY, "a size not timed is not written to the file"
    far = timed_rows[-1] * 3
    assert _tune.choose(family_key(far), ("cpp",), X, slower) == "reference"  # timed
    assert _tune.choose(family_key(near, weight=(9, 32)), ("cpp",), X, slower) == "reference"  # another family
    assert _tune.decisions()[family_key(near, weight=(9, 32))].rule == "measured"


def test_a_family_whose_first_sizes_are_timed_still_times_a_new_size_below_the_count(clock):
    run, calls = costed_run(clock, {"cpp": 1e-4, "reference": 3e-4})
    for rows in range(10, 10 + _tune.TIMED_PER_FAMILY):  # neighbours, each timed: the count is not reached
        calls.clear()
        _tune.choose(family_key(rows), ("cpp",), X, run)
        assert calls
    assert {d.rule for d in _tune.decisions().values()} == {"measured"}


def pool_key(height: int) -> tuple:
    """A pooling-like shape class: the input's shape alone, no parameter's."""
    return key("scoped", (torch.Size([2, 8, height, height]),), (True,))


def test_a_class_without_a_parameters_shape_has_a_family_only_within_a_layer(clock):
    """A key holding no parameter's shape (a pooling's, a batch norm's backward) forms no family
    across layers (a model's every such layer must be timed), but within one layer (``scope``):
    there its sizes past the first few take a nearby timed size's choice; another layer, or no
    layer, still times its own."""
    run, calls = costed_run(clock, {"cpp": 1e-4, "reference": 3e-4})
    slower, _ = costed_run(clock, {"cpp": 3e-4, "reference": 1e-4})
    layer, other = object(), object()
    heights = [8 * 3 ** i for i in range(_tune.TIMED_PER_FAMILY)]
    with _tune.scope(layer):
        for height in heights:
            calls.clear()
            assert _tune.choose(pool_key(height), ("cpp",), X, run) == "cpp"
            assert calls, f"the layer's size {height} must be timed"
        # known before it is asked (a layer's route settles at a new size's first call, its
        # backward's choice known before autograd runs it), and taken when asked, untimed
        assert _tune.decided(pool_key(heights[1] + 5), ("cpp",)) == "cpp"
        assert _tune.choose(pool_key(heights[1] + 5), ("cpp",), X, slower) == "cpp"
    assert _tune.decisions()[pool_key(heights[1] + 5)].rule == "nearest timed size"
    assert _tune.decided(pool_key(heights[1] + 6), ("cpp",)) is None
    # the same classes outside the layer, in another layer, or handed a layer (a backward): timed
    assert _tune.choose(pool_key(heights[1] + 6), ("cpp",), X, slower) == "reference"
    with _tune.scope(other):
        assert _tune.choose(pool_key(heights[1] + 7), ("cpp",), X, slower) == "reference"
        assert _tune.choose(pool_key(heights[1] + 8), ("cpp",), X, slower, within=layer) == "cpp"
    assert _tune.decisions()[pool_key(heights[1] + 8)].rule == "nearest timed size"


def test_a_warm_up_that_carried_one_time_costs_does_not_set_the_samples(clock):
    """A layer's first call can carry its ops' own decisions (50x a steady call). The samples
    after the first round take their length from the timed calls, not from that warm-up."""
    first = {"cpp": True}
    calls = collections.Counter()

    def run(name):
        calls[name] += 1
        clock.now += 20 * _tune.SAMPLE_SECONDS if first.pop(name, False) else {"cpp": 1e-4, "reference": 2e-4}[name]

    assert _tune.choose(key("one-time"), ("cpp",), X, run) == "cpp"
    per_sample = _tune._calls_per_sample
    assert per_sample(1e-4) > 10
    # the warm-up, one call, then full samples (within one call each: the fake clock's float sums)
    assert calls["cpp"] >= 1 + 1 + (per_sample(1e-4) - 1) * (_tune.ROUNDS - 1)
    assert calls["reference"] >= 1 + (per_sample(2e-4) - 1) * _tune.ROUNDS


def test_a_candidate_far_slower_than_torch_is_not_timed_again(clock):
    slow = (_tune.DROP_RATIO + 1) * 1e-3
    run, calls = costed_run(clock, {"cpp": slow, "numba": 1.5e-3, "reference": 1e-3})
    assert _tune.choose(key(), ("cpp", "numba"), X, run) == "reference"
    # its warm-up call and one timed round; the others every round (ROUNDS > 1 here)
    assert calls["cpp"] == 2 and calls["numba"] > 2 and calls["reference"] > 2
    assert _tune.decisions()[key()].seconds["cpp"] == pytest.approx(slow)  # its timed round, for the table
    # One-time costs in the untimed first call (a variant packing its weight) do not count:
    first = {"cached": True}

    def run(name):
        clock.now += 10e-3 if first.pop(name, False) else {"cached": 0.5e-3, "reference": 1e-3}[name]

    assert _tune.choose(key("packing"), ("cached",), X, run) == "cached"
    run, calls = costed_run(clock, {"cpp": 0.99 * _tune.DROP_RATIO * 1e-3, "reference": 1e-3})  # within: timed
    _tune.choose(key("edge"), ("cpp",), X, run)
    assert calls["cpp"] == calls["reference"] > 1


def test_small_calls_are_timed_in_loops(clock):
    run, calls = costed_run(clock, {"cpp": 5e-7, "reference": 4e-6})
    assert _tune.choose(key(), ("cpp",), X, run) == "cpp"
    assert calls["cpp"] == 1 + _tune.ROUNDS * _tune.MAX_CALLS_PER_SAMPLE  # the cap on a loop
    assert calls["reference"] == 1 + _tune.ROUNDS * int(_tune.SAMPLE_SECONDS / 4e-6)


def test_empty_input_follows_the_static_rule_untimed(clock):
    run, calls = costed_run(clock, {"cpp": 1e-4, "reference": 3e-4})
    assert _tune.choose(key("conv2d"), ("cpp",), torch.ones(0, 3), run) == "reference"
    assert _tune.choose(key("sgd_epoch"), ("cpp",), torch.ones(0, 3), run) == "cpp"
    assert not calls
    assert _tune.decisions()[key("conv2d")].rule == "empty input"


def test_a_failing_candidate_raises_as_the_call_would(clock):
    def run(name):
        raise IndexError("target 7 is out of bounds")

    with pytest.raises(IndexError, match="out of bounds"):
        _tune.choose(key(), ("cpp",), X, run)
    assert key() not in _tune.decisions()


# ------------------------------------------------------------------------------ the cache

def decide(clock, op="toy", costs=None):
    run, calls = costed_run(clock, costs or {"cpp": 1e-4, "reference": 3e-4})
    return _tune.choose(key(op), ("cpp",), X, run), calls


def untimed(name):
    raise AssertionError(f"{name} was timed, but the decision should have come from the cache")


def test_cache_round_trip(clock):
    assert decide(clock)[0] == "cpp"
    path = _tune.cache_path()
    data = json.loads(path.read_text())
    assert data["format"] == _tune.FORMAT and data["machine"] == _tune.fingerprint()
    (entry,) = data["decisions"].values()
    assert entry["choice"] == "cpp" and set(entry["seconds"]) == {"cpp", "reference"}
    assert entry["margin"] == _tune.MARGIN
    assert str(torch.get_num_threads()) in next(iter(data["decisions"]))  # the key carries the threads
    _tune._store.clear(persisted=False)  # a new process: memory empty, file kept
    assert _tune.choose(key(), ("cpp",), X, untimed) == "cpp"
    assert _tune.stored_count() == 1


def test_a_cached_decision_timed_among_other_candidates_is_timed_again(clock):
    """A newer fastml offers a layer more candidates (a variant it did not have): a decision
    cached by the older one, which never timed the new candidate, must not stand."""
    assert decide(clock)[0] == "cpp"  # timed among cpp and torch's
    _tune._store.clear(persisted=False)
    run, calls = costed_run(clock, {"cpp": 1e-4, "matmul": 5e-5, "reference": 3e-4})
    assert _tune.choose(key(), ("cpp", "matmul"), X, run) == "matmul"
    assert set(calls) == {"cpp", "matmul", "reference"}
    _tune._store.clear(persisted=False)
    assert _tune.choose(key(), ("cpp", "matmul"), X, untimed) == "matmul"  # now cached as it was timed


def test_cache_lives_where_the_environment_says(tmp_path, monkeypatch):
    monkeypatch.setenv(_tune.CACHE_VAR, str(tmp_path / "elsewhere"))
    assert _tune.cache_path().parent == tmp_path / "elsewhere"
    monkeypatch.delenv(_tune.CACHE_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _tune.cache_path().parent == tmp_path / "xdg" / "fastml"


@pytest.mark.parametrize("garbage", ["{not json", "[]", '{"format": 99, "decisions": {}}', "\udcff"])
def test_corrupt_cache_warns_and_is_measured_again(clock, garbage):
    path = _tune.cache_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(garbage.encode("utf-8", "surrogateescape"))
    with pytest.warns(RuntimeWarning, match="cannot be used"):
        choice, calls = decide(clock)
    assert choice == "cpp" and calls["cpp"] > 0
    assert json.loads(path.read_text())["format"] == _tune.FORMAT  # replaced by a valid file


def test_unwritable_cache_warns_and_keeps_decisions_in_memory(clock, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(_tune.CACHE_VAR, str(blocker / "cache"))  # under a file: no folder can be made
    with pytest.warns(RuntimeWarning, match="cannot write"):
        assert decide(clock)[0] == "cpp"
    assert _tune.choose(key(), ("cpp",), X, untimed) == "cpp"


def test_read_only_cache_folder(clock, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(_tune.tempfile, "mkstemp", refuse)  # as a read-only folder answers, even to root
    with pytest.warns(RuntimeWarning, match="cannot write"):
        assert decide(clock)[0] == "cpp"


@pytest.mark.parametrize("field, value", [("torch", "0.0.1"), ("fastml", "9.9"), ("cpu", "Another CPU"),
                                          ("isa_flags", "sse2"), ("gpus", ["Another GPU"]),
                                          ("cpp_build", "another build")])
def test_a_version_or_machine_mismatch_is_measured_again(clock, monkeypatch, field, value):
    decide(clock)
    original = _tune.fingerprint()
    monkeypatch.setattr(_tune, "fingerprint", lambda: {**original, field: value})
    _tune._store.clear(persisted=False)
    assert decide(clock)[1]["cpp"] > 0, "a decision from another machine, version or build must not be reused"


def test_a_file_from_another_machine_under_this_name_is_measured_again(clock, monkeypatch):
    decide(clock)
    path = _tune.cache_path()
    data = json.loads(path.read_text())
    data["machine"] = {**data["machine"], "cpu": "Another CPU"}
    path.write_text(json.dumps(data))
    _tune._store.clear(persisted=False)
    with pytest.warns(RuntimeWarning, match="another machine"):
        assert decide(clock)[1]["cpp"] > 0


WRITER = textwrap.dedent("""
    import sys, torch
    from fastml import _tune
    name = sys.argv[1]
    for i in range(40):
        key = ("toy-" + name + str(i), "forward", 1, torch.float32, torch.device("cpu"))
        _tune.choose(key, ("cpp",), torch.ones(3), lambda backend: None)
""")


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    env = {**os.environ, _tune.CACHE_VAR: str(tmp_path / "shared")}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, name], env=env, stderr=subprocess.PIPE, text=True)
             for name in ("a", "b")]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
        assert "cannot" not in proc.stderr.read()
    files = list((tmp_path / "shared").glob("decisions-*.json"))
    assert len(files) == 1 and not list((tmp_path / "shared").glob("*.tmp"))
    decisions = json.loads(files[0].read_text())["decisions"]
    assert len(decisions) == 80  # every decision of both, merged under the lock


def test_decisions_in_quick_succession_share_one_write(clock, monkeypatch):
    """Each write rewrites the whole file (O(decisions held)): the first decision of a process is
    written at once, the next within WRITE_INTERVAL with a later write, or when the count is
    read (a process that exits writes them too: test_two_processes_writing_at_once_lose_nothing)."""
    writes = []
    replace = os.replace
    monkeypatch.setattr(_tune.os, "replace", lambda *paths: (writes.append(paths), replace(*paths))[1])
    for i in range(30):
        decide(clock, f"quick-{i}")
    assert len(writes) == 1 and len(json.loads(_tune.cache_path().read_text())["decisions"]) == 1
    assert _tune.stored_count() == 30 and len(writes) == 2
    monkeypatch.setattr(_tune, "WRITE_INTERVAL", 0.0)
    decide(clock, "slow")
    assert len(writes) == 3


# --------------------------------------------------------------------- settings and control

def fail_if_timed(monkeypatch):
    def measure(*args):
        raise AssertionError("nothing may be timed here")

    monkeypatch.setattr(_tune, "measure", measure)


def linear_forward_backward():
    x = torch.randn(7, 5, requires_grad=True)
    layer = fastml.nn.Linear(5, 3)
    layer(x).sum().backward()
    return x.grad


@needs_kernel
def test_nothing_is_timed_when_a_backend_is_forced(monkeypatch):
    fail_if_timed(monkeypatch)
    for name in (KERNEL, "reference"):
        with fastml.use_backend(name):
            linear_forward_backward()
    monkeypatch.setenv(_backend.ENV_VAR, KERNEL)
    linear_forward_backward()
    assert not _tune.decisions()


@needs_kernel
def test_forced_backend_reaches_backward_outside_the_with(monkeypatch):
    fail_if_timed(monkeypatch)
    x = torch.randn(7, 5, requires_grad=True)
    with fastml.use_backend(KERNEL):
        out = fastml.nn.Linear(5, 3)(x)
    with _tune.recording() as seen:
        out.sum().backward()
    assert not seen  # decided by the forward's forcing, not measured or recorded


@needs_kernel
def test_static_rule_times_nothing_and_is_conservative(monkeypatch):
    fail_if_timed(monkeypatch)
    monkeypatch.setenv(_tune.TUNE_VAR, "off")
    with _tune.recording() as seen:
        linear_forward_backward()
        fastml.functional.conv2d(torch.randn(2, 3, 9, 9), torch.randn(4, 3, 3, 3))
        fastml.functional.knn(torch.randn(5, 3), torch.randn(11, 3), 2)
    choices = {(k[0], k[1]): d.choice for k, d in seen}
    assert choices[("linear", "forward")] == choices[("linear", "backward")] == "reference"
    assert choices[("conv2d", "forward")] == "reference"
    assert choices[("knn", "forward")] == "reference"  # the screened reference: cpp's wins need AVX-512
    assert all(d.rule == "static" for _, d in seen)
    assert not _tune.decisions()


def test_static_rule_table():
    assert _tune.static_choice("conv2d", ("cpp",)) == "reference"
    assert _tune.static_choice("linear", ("triton",)) == "reference"
    assert _tune.static_choice("sgd_epoch", ("cpp",)) == "cpp"
    assert _tune.static_choice("sgd_epoch", ("numba",)) == "numba"
    assert _tune.static_choice("knn", ("numba",)) == _tune.static_choice("knn", ("cpp",)) == "reference"
    assert _tune.static_choice("adam_step", ("triton",)) == "reference"


def test_tuning_api_and_context_manager(monkeypatch):
    assert _tune.mode() == "on"
    with fastml.tuning("off"):
        assert _tune.mode() == "off"
        with fastml.tuning("ON"):
            assert _tune.mode() == "on"
    assert _tune.mode() == "on"
    previous = fastml.set_tuning("off")
    try:
        assert previous is None and _tune.mode() == "off"
        assert fastml.set_tuning("on") == "off" and _tune.mode() == "on"
    finally:
        fastml.set_tuning(previous)
    monkeypatch.setenv(_tune.TUNE_VAR, "off")
    assert _tune.mode() == "off"  # the environment's, once no setting overrides it
    fastml.set_tuning("on")
    assert _tune.mode() == "on"  # a setting overrides the environment


@pytest.mark.parametrize("value", ["maybe", "0", "true"])
def test_bad_tune_settings_are_clear_errors(monkeypatch, value):
    with pytest.raises(ValueError, match="tuning must be one of 'on', 'off'"):
        fastml.set_tuning(value)
    with pytest.raises(ValueError, match="tuning"):
        with fastml.tuning(value):
            pass
    monkeypatch.setenv(_tune.TUNE_VAR, value)
    with pytest.raises(ValueError, match="FASTML_TUNE must be one of"):
        fastml.functional.linear(torch.randn(2, 3), torch.randn(4, 3))


def test_other_bad_settings_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="tuning must be one of 'on', 'off', got 1"):
        fastml.set_tuning(1)
    with pytest.raises(TypeError, match="persisted must be a bool"):
        fastml.clear_tuning(persisted="yes")
    with pytest.raises(ValueError, match="unknown fastml backend 'fast'"):
        fastml.use_backend("fast").__enter__()
    monkeypatch.setenv(_backend.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="unknown fastml backend 'fast'"):
        fastml.functional.linear(torch.randn(2, 3), torch.randn(4, 3))
    with pytest.raises(TypeError, match="'model' must be a torch.nn.Module"):
        fastml.tune("resnet", torch.randn(1))
    with pytest.raises(TypeError, match="needs example inputs"):
        fastml.tune(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="'example_inputs' must be a tuple"):
        fastml.patch(torch.nn.Linear(2, 2), example_inputs=torch.randn(1, 2))


def test_clear_tuning_forgets(clock):
    decide(clock)
    fastml.clear_tuning()
    assert not _tune.decisions() and _tune.stored_count() == 1
    fastml.clear_tuning(persisted=True)
    assert _tune.stored_count() == 0


def test_info_reports_the_cache(clock):
    decide(clock)
    report = fastml.info(print_report=False)["tuning"]
    assert report["mode"] == "on" and report["stored_decisions"] == 1
    assert report["cache"] == str(_tune.cache_path())


# ------------------------------------------------------------------------------- fastml.tune

def small_cnn() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(6, 8, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(32, 5))


@needs_kernel
def test_tune_table_per_layer_forward_and_backward():
    model = small_cnn()
    report = fastml.patch(model)
    x = torch.randn(4, 3, 14, 14)
    running_mean = model[1].running_mean.clone()
    rng = torch.get_rng_state()
    table = fastml.tune(model, x)
    layers = table.by_layer()
    assert set(layers) == {"0", "1", "3", "4", "8"}  # conv, batch norm (with the ReLU), pool, fused conv block, linear
    for name in layers:
        assert set(layers[name]) == {"forward", "backward"}, name
    ops = {row.op for row in table.rows if not row.whole_call and row.op not in ("model", "unpatched")}
    # (the cpp block's backward times its convolution's gradients against torch's too)
    block_convolution = {"conv2d_relu_max_pool2d convolution"} if CPP else set()
    assert ops == {"conv2d", "batch_norm", "max_pool2d", "conv2d_relu_max_pool2d", "linear"} | block_convolution
    (unpatched_row,) = [row for row in table.rows if row.op == "unpatched"]  # the model against itself unpatched
    assert table.rows[-1] is unpatched_row and unpatched_row.layer == ""
    model_rows = [row for row in table.rows if row.op == "model"]
    for row in table.rows:
        if row.rule == "nothing of fastml's left":  # training with every layer on torch's module: untimed
            assert row is unpatched_row and row.choice == "reference" and not row.seconds
            assert not model_rows or model_rows[0].choice == "reference"
            continue
        whole_layer = row.whole_call or row.op in ("model", "unpatched")
        # a layer's other ways: fastml's path, torch's convolution on the channels-last layout
        others = {"fastml", "channels_last"} if row.op.startswith("layer ") else {"fastml"} if whole_layer else {KERNEL}
        assert row.rule == "measured" and "reference" in row.seconds and set(row.seconds) - {"reference"} <= others
        assert len(row.seconds) >= 2
        faster = min(row.seconds, key=row.seconds.get)
        margin = _tune.LAYER_MARGIN if row.whole_call else _tune.MARGIN  # the model row: MARGIN (see _tune)
        if row.choice != "reference":
            assert row.choice == faster and row.seconds[row.choice] * (1 + margin) < row.seconds["reference"]
    assert len(model_rows) == any(row.choice != "reference" for row in table.rows if row.op.startswith("layer "))
    modules = dict(model.named_modules())
    for name in layers:
        rows = [row for row in table.rows if row.layer == name]
        # a fused functional timed as a whole ("function" row) that chose torch's sequence
        function_on_torch = any(row.op.startswith("function ") and row.choice == "reference" for row in rows)
        kernel_somewhere = not function_on_torch and any(row.choice != "reference" for row in rows
                                                         if not row.whole_call)
        layer_rows = [row for row in rows if row.op.startswith("layer ")]
        # the whole layer is timed against torch's module where one of its ops chose a kernel, and
        # for a convolution, whose channels-last variant is timed whatever its ops chose
        assert bool(layer_rows) == (kernel_somewhere or isinstance(modules[name], fastml.nn.Conv2d)), name
        on_torch = (not layer_rows or layer_rows[0].choice == "reference" or function_on_torch
                    or (model_rows and model_rows[0].choice == "reference"))
        if on_torch:
            assert set(layers[name].values()) == {"torch"}, name
        elif layer_rows[0].choice == "channels_last":
            assert set(layers[name].values()) == {"torch (channels-last)"}, name
    assert all(p.grad is None for p in model.parameters())  # tuning left no gradient
    assert torch.equal(model[1].running_mean, running_mean) and torch.equal(torch.get_rng_state(), rng)
    text = str(table)
    assert "conv2d_relu_max_pool2d" in text and "torch µs" in text
    assert report.tuning is None
    # Every decision tune made is the one training then uses: nothing is timed again.
    decided = dict(_tune.decisions())
    out = model(x)
    out.sum().backward()
    assert _tune.decisions() == decided


@needs_kernel
def test_tune_in_inference_decides_forward_only():
    model = small_cnn().eval()
    fastml.patch(model)
    with torch.no_grad():
        table = fastml.tune(model, torch.randn(2, 3, 14, 14))
    assert {row.phase for row in table.rows} == {"forward"}


@needs_kernel
def test_patch_report_names_each_layers_implementation():
    model = small_cnn()
    report = fastml.patch(model, example_inputs=(torch.randn(2, 3, 14, 14),))
    assert report.tuning is not None
    text = str(report)
    for line in text.splitlines()[1:]:
        if line.strip().startswith(("replaced", "fused")):
            assert "forward:" in line and "backward:" in line, line
    assert report.runs("8").startswith("forward: ")


@pytest.mark.parametrize("untimed", ["forced backend", "tuning off"])
def test_tune_times_nothing_without_the_measured_choice(monkeypatch, untimed):
    """With a backend forced or tuning off nothing is timed, the check against the unpatched
    model included, and the model runs as patched."""
    fail_if_timed(monkeypatch)
    model = small_cnn()
    fastml.patch(model)
    with fastml.use_backend("reference") if untimed == "forced backend" else fastml.tuning("off"):
        table = fastml.tune(model, torch.randn(2, 3, 14, 14))
    assert not [row for row in table.rows if row.op == "unpatched"]
    assert not any(_route.runs_as_torch(m) for m in model.modules())
    if untimed == "forced backend":
        assert table.rows and all(row.rule == "forced" and row.choice == "reference" for row in table.rows)


# ------------------------------------------------------ the same results whichever path wins

def as_winner(candidate: str, name: str) -> str:
    """A layer's or fused function's route ("fastml" against "reference") follows its kernels."""
    return name if candidate == "fastml" and name != "reference" else candidate


def winner(monkeypatch, name):
    """Makes ``name`` win every measurement from now on (a fresh decision per class)."""
    def measure(names, run, device, rounds=None):
        with torch.no_grad():
            for candidate in names:
                run(candidate)  # the candidates still run, as in a real measurement
        return {candidate: (1.0 if as_winner(candidate, name) == name else 2.0) for candidate in names}

    _tune.clear_tuning(persisted=True)
    monkeypatch.setattr(_tune, "measure", measure)


def op_cases():
    """(name, function of a generator → list of output tensors, the gradients included)."""
    def with_grads(outputs, *inputs):
        loss = sum((o.float() * torch.linspace(0.5, 1.5, o.numel()).reshape(o.shape)).sum()
                   for o in outputs if o.is_floating_point())
        grads = torch.autograd.grad(loss, [t for t in inputs if t.requires_grad])
        return [o.detach() for o in outputs] + list(grads)

    def linear(g):
        x, w, b = (rand(*s, generator=g, requires_grad=True) for s in ((9, 7), (5, 7), (5,)))
        return with_grads([fastml.functional.linear(x, w, b)], x, w, b)

    def conv(g):
        x, w, b = (rand(*s, generator=g, requires_grad=True) for s in ((2, 3, 11, 9), (4, 3, 3, 3), (4,)))
        return with_grads([fastml.functional.conv2d(x, w, b, stride=2, padding=1)], x, w, b)

    def block(g):
        x, w, b = (rand(*s, generator=g, requires_grad=True) for s in ((2, 3, 12, 10), (4, 3, 3, 3), (4,)))
        return with_grads([fastml.functional.conv2d_relu_max_pool2d(x, w, b, padding=1, pool_kernel_size=2)], x, w, b)

    def pool(g):
        x = rand(2, 3, 11, 9, generator=g, requires_grad=True)
        return with_grads([fastml.functional.max_pool2d(x, 3, 2, padding=1)], x)

    def mse(g):
        x, t = rand(13, 3, generator=g, requires_grad=True), rand(13, 3, generator=g)
        return with_grads([fastml.functional.mse_loss(x, t), fastml.functional.mse_loss(x, t, reduction="none")], x)

    def cross_entropy(g):
        x, t = rand(11, 7, generator=g, requires_grad=True), torch.randint(0, 7, (11,), generator=g)
        return with_grads([fastml.functional.cross_entropy(x, t),
                           fastml.functional.cross_entropy(x, t, reduction="none", label_smoothing=0.1)], x)

    def linear_mse(g):
        x, w, b, t = (rand(*s, generator=g, requires_grad=r) for s, r in
                      (((17, 5), True), ((2, 5), True), ((2,), True), ((17, 2), False)))
        return with_grads([fastml.functional.linear_mse(x, w, b, t),
                           fastml.functional.linear_mse(x, w, b, t, reduction="none")], x, w, b)

    def linear_cross_entropy(g):
        x, w, b = (rand(*s, generator=g, requires_grad=True) for s in ((13, 6), (5, 6), (5,)))
        t = torch.randint(0, 5, (13,), generator=g)
        return with_grads([fastml.functional.linear_cross_entropy(x, w, t, linear_bias=b),
                           fastml.functional.linear_cross_entropy(x, w, t, linear_bias=b, reduction="none")], x, w, b)

    def cdist(g):
        a, b = rand(7, 4, generator=g, requires_grad=True), rand(9, 4, generator=g, requires_grad=True)
        return with_grads([fastml.functional.cdist(a, b)], a, b)

    def knn(g):
        q, r = rand(7, 4, generator=g), rand(19, 4, generator=g)
        return list(fastml.functional.knn(q, r, 3))

    def optimizers(g):
        outputs = []
        for make in (lambda ps: fastml.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
                     lambda ps: fastml.optim.AdamW(ps, lr=1e-2, amsgrad=True)):
            params = [rand(5, 3, generator=g, requires_grad=True), rand(4, generator=g, requires_grad=True)]
            opt = make(params)
            for _ in range(3):
                for p in params:
                    p.grad = rand(*p.shape, generator=g)
                opt.step()
            outputs += [p.detach() for p in params]
        params = [rand(6, generator=g, requires_grad=True)]
        params[0].grad = rand(6, generator=g)
        fastml.optim.sgd_(params, 0.1, 4)
        return outputs + [params[0].detach()]

    def linear_regression(g):
        x, y = rand(40, 3, generator=g), rand(40, 1, generator=g)
        reg = fastml.linear_model.LinearRegression(lr=0.03, batch_size=10, epochs=2, random_state=0).fit(x, y)
        return [torch.as_tensor(reg.coef_), torch.as_tensor(reg.intercept_)]

    return [linear, conv, block, pool, mse, cross_entropy, linear_mse, linear_cross_entropy, cdist, knn, optimizers,
            linear_regression]


@needs_kernel
@pytest.mark.parametrize("case", op_cases(), ids=lambda f: f.__name__)
def test_results_are_the_same_whichever_path_wins(monkeypatch, case):
    results = {}
    for name in (KERNEL, "reference"):
        winner(monkeypatch, name)
        with _tune.recording() as seen:
            results[name] = case(torch.Generator().manual_seed(5))
        measured = [d for _, d in seen if d.rule == "measured"]
        assert measured and all(as_winner(d.choice, name) == name for d in measured), "the forced verdict did not apply"
    for a, b in zip(results[KERNEL], results["reference"]):
        if a.is_floating_point():
            assert_close(a, b.double(), scale=max(1.0, b.abs().max().item()) if b.numel() else 1.0)
        else:
            assert torch.equal(a, b)


def test_a_corrupt_cache_warns_once(clock):
    """The warning is a RuntimeWarning (a user can filter it), given once, not at every new class."""
    path = _tune.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text("{")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decide(clock, "a")
        decide(clock, "b")
    assert [w.category for w in caught] == [RuntimeWarning]


# ---------------------------------------------------- the layers' shortcut to torch's module

def count_fastml_calls(monkeypatch):
    """Counts the calls that reach fastml's linear dispatch (fastml.functional._linear, which the
    layer and the public function both call)."""
    calls = collections.Counter()
    original = fastml.functional._linear

    def counted(*args, **kwargs):
        calls["linear"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(fastml.functional, "_linear", counted)
    return calls


def train_step(layer, x):
    layer.zero_grad(set_to_none=True)
    layer(x).square().sum().backward()
    return [p.grad.clone() for p in layer.parameters()]


@needs_kernel
def test_a_layer_decided_for_torch_calls_torch_directly(monkeypatch):
    winner(monkeypatch, "reference")
    calls = count_fastml_calls(monkeypatch)
    layer, x = fastml.nn.Linear(5, 3), torch.randn(4, 5)
    train_step(layer, x)  # decides the forward, then the backward
    train_step(layer, x)  # the route settles: both ways torch's
    calls.clear()
    reference = torch.nn.Linear(5, 3)
    reference.load_state_dict(layer.state_dict())
    for got, expected in zip(train_step(layer, x), train_step(reference, x)):
        torch.testing.assert_close(got, expected)
    assert calls["linear"] == 0, "a layer settled on torch must not go through fastml's dispatch"
    train_step(layer, torch.randn(6, 5))  # a new signature (batch 6) goes through fastml again
    assert calls["linear"] == 1


@pytest.fixture
def timed(monkeypatch) -> collections.Counter:
    """{candidates: how many times they were timed together}, counted from now on."""
    counts = collections.Counter()
    original = _tune.measure

    def counted(names, run, device, rounds=None):
        counts[names] += 1
        return original(names, run, device, rounds)

    monkeypatch.setattr(_tune, "measure", counted)
    return counts


@needs_kernel
def test_a_layer_fed_varying_sizes_times_a_few_of_them(timed):
    """A patched MLP fed 60 sequence lengths (1 to 200), three times over, decides every length
    but times only a few per family (each op, phase and layer): the rest take a nearby timed
    length's choice. Every length keeps its route (MAX_LAYER_ROUTES): the third pass times and
    settles nothing (a route whose backward was undecided at its length's first call settles at
    the second)."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.ReLU(), torch.nn.Linear(24, 8))
    fastml.patch(model)
    lengths = torch.randint(1, 201, (60,), generator=torch.Generator().manual_seed(0)).tolist()
    for _ in range(2):
        for length in lengths:
            model(torch.randn(2, length, 16)).square().mean().backward()
    families = {f for k, d in _tune.decisions().items() if d.rule == "measured" for f, _ in _tune._families(k)}
    assert sum(timed.values()) <= len(families) * (_tune.TIMED_PER_FAMILY + 5)  # (a few far lengths too)
    assert sum(timed.values()) < len(set(lengths)), "every length was timed"
    routes = [dict(_route.routes(layer)) for layer in (model[0], model[2])]
    assert all(len(r) == len(set(lengths)) for r in routes)
    timed.clear()
    for length in lengths:
        model(torch.randn(2, length, 16)).square().mean().backward()
    assert not timed
    assert routes == [dict(_route.routes(layer)) for layer in (model[0], model[2])]


@needs_kernel
def test_a_cnn_fed_varying_image_sizes_times_a_few_of_them(monkeypatch, timed):
    """A patched CNN (convolution, batch norm, ReLU, max-pool) trained on 40 image sizes decides
    every size but times only a few per layer and op: the keys of a pooling, of a batch norm's
    backward and of a convolution's backward hold no parameter's shape or a second input-sized
    one, so only the layer's own family covers them, and the backward's decisions, made by
    autograd after the layer's call, must still know their layer."""
    monkeypatch.setattr(_tune, "ROUNDS", 1)  # (the count matters here, not the verdicts)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2))
    fastml.patch(model)
    sizes = torch.randint(6, 41, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    for size in sizes:
        model(torch.randn(2, 2, size, size)).square().mean().backward()
    by_rule = collections.Counter(d.rule for d in _tune.decisions().values())
    assert by_rule["nearest timed size"] > by_rule["measured"], by_rule
    ops = {k[0] + " " + k[1] for k in _tune.decisions()}
    for name in ("max_pool2d backward", "batch_norm backward", "conv2d backward"):
        assert name in ops
        untimed = [k for k, d in _tune.decisions().items()
                   if k[0] + " " + k[1] == name and d.rule == "nearest timed size"]
        assert untimed, f"{name}: every size was timed"
    assert sum(timed.values()) < len(set(sizes)) * 2


def test_a_layer_forgets_its_oldest_route_first(monkeypatch):
    monkeypatch.setattr(_route, "MAX_LAYER_ROUTES", 3)
    layer = torch.nn.Linear(2, 2)
    for sig in "abcd":
        _route.remember(layer, (sig,), "reference")
    assert list(_route.routes(layer)) == [("b",), ("c",), ("d",)]


def test_a_routes_signature_tells_layouts_apart():
    """The signature holds the input's strides, or its layout where it has none of its own: a
    sparse COO input answers stride() with (0, 0), as an expanded dense one of its shape does,
    and a route settled for either must not serve the other; contiguous and channels-last
    inputs of one shape differ too."""
    layer = fastml.nn.Linear(3, 2)
    expanded = torch.tensor(0.5).expand(4, 3)
    sparse = torch.randn(4, 3).to_sparse()
    assert expanded.stride() == sparse.stride()  # (what the layout guards against)
    signatures = {_route.settled(layer, t, layer.weight)[1] for t in (expanded, sparse, expanded.contiguous())}
    assert len(signatures) == 3
    conv = fastml.nn.Conv2d(3, 3, 1)
    image = torch.randn(2, 3, 4, 4)
    assert (_route.settled(conv, image, conv.weight)[1]
            != _route.settled(conv, image.to(memory_format=torch.channels_last), conv.weight)[1])


def settled_on_torch_cases():
    """{name: () -> (fastml layer, its torch twin, input, target or None)}: every drop-in whose
    route can settle on torch, with the parameters and buffers it reads there."""
    def pair(layer, twin, *data):
        twin.load_state_dict(layer.state_dict())
        return (layer, twin, *data) if len(data) == 2 else (layer, twin, *data, None)

    def linear_mse():
        layer = fastml.nn.LinearMSELoss(5, 3)
        linear = torch.nn.Linear(5, 3)
        linear.load_state_dict(layer.state_dict())
        return layer, lambda x, t: torch.nn.functional.mse_loss(linear(x), t), torch.randn(4, 5), torch.randn(4, 3)

    def conv_relu_pool():
        layer = fastml.nn.ConvReLUPool2d(3, 4, 3, padding=1)
        conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        conv.load_state_dict(layer.state_dict())
        return layer, lambda x: torch.nn.functional.max_pool2d(conv(x).relu(), 2), torch.randn(2, 3, 6, 6), None

    return {
        "Linear": lambda: pair(fastml.nn.Linear(5, 3), torch.nn.Linear(5, 3), torch.randn(4, 5)),
        "Linear without bias": lambda: pair(fastml.nn.Linear(5, 3, bias=False), torch.nn.Linear(5, 3, bias=False),
                                            torch.randn(4, 5)),
        "Conv2d": lambda: pair(fastml.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(3, 4, 3, padding=1),
                               torch.randn(2, 3, 6, 6)),
        "BatchNorm2d": lambda: pair(fastml.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3), torch.randn(4, 3, 5, 5)),
        "BatchNorm2d cumulative": lambda: pair(fastml.nn.BatchNorm2d(3, momentum=None),
                                               torch.nn.BatchNorm2d(3, momentum=None), torch.randn(4, 3, 5, 5)),
        "MaxPool2d": lambda: pair(fastml.nn.MaxPool2d(2), torch.nn.MaxPool2d(2), torch.randn(2, 3, 6, 6)),
        "MSELoss": lambda: pair(fastml.nn.MSELoss(), torch.nn.MSELoss(), torch.randn(4, 3), torch.randn(4, 3)),
        "CrossEntropyLoss": lambda: pair(fastml.nn.CrossEntropyLoss(weight=torch.rand(5) + 0.5),
                                         torch.nn.CrossEntropyLoss(weight=torch.ones(5)), torch.randn(4, 5),
                                         torch.tensor([0, 3, 4, 1])),
        "LinearMSELoss": linear_mse,
        "ConvReLUPool2d": conv_relu_pool,
    }


@needs_kernel
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", list(settled_on_torch_cases()))
def test_a_layer_settled_on_torch_reads_its_parameters_itself(monkeypatch, case, train):
    """On torch's route a drop-in runs torch's function on its registered parameters and buffers
    (_route.registered), never through nn.Module.__getattr__, whose ~0.35 µs a read torch's own
    forward pays (at the smallest calls that saving is what pays for the route's check); the
    output, gradients and buffers are still torch's module's."""
    winner(monkeypatch, "reference")
    layer, twin, x, target = settled_on_torch_cases()[case]()
    for module in (layer, twin):
        if isinstance(module, torch.nn.Module):
            module.train(train)
    inputs = {module: x.clone().requires_grad_(train) for module in (layer, twin)}

    def step(module):
        data = (inputs[module],) if target is None else (inputs[module], target)
        with torch.set_grad_enabled(train):
            out = module(*data)
        if train:
            out.square().sum().backward()
        return out.detach()

    for _ in range(3):  # decides forward and backward, then settles the route
        step(layer)
        step(twin)
    assert set(_route.routes(layer).values()) <= {_route.TORCH}
    read = collections.Counter()
    original = torch.nn.Module.__getattr__

    def counted(module, name):
        read[name] += 1
        return original(module, name)

    monkeypatch.setattr(torch.nn.Module, "__getattr__", counted)
    got = step(layer)
    monkeypatch.setattr(torch.nn.Module, "__getattr__", original)
    assert not read, f"read through Module.__getattr__: {dict(read)}"
    assert_close(got, step(twin))
    if train:
        assert_close(inputs[layer].grad, inputs[twin].grad)
    if isinstance(twin, torch.nn.Module):
        for mine, theirs in zip(layer.state_dict().values(), twin.state_dict().values()):
            torch.testing.assert_close(mine, theirs)  # (num_batches_tracked is an integer)
        for mine, theirs in zip(layer.parameters(), twin.parameters()):
            assert (mine.grad is None) == (not train) and (theirs.grad is None) == (not train)
            if train:
                assert_close(mine.grad, theirs.grad)


@needs_kernel
def test_a_kernel_that_wins_inside_fastml_still_loses_to_a_faster_torch_module(monkeypatch):
    """The ops chose the kernel, but the whole layer (dispatch included) timed slower than
    torch's module: the layer runs torch's module."""
    def measure(names, run, device, rounds=None):
        with torch.no_grad():
            for candidate in names:
                run(candidate)
        fastest = "reference" if "fastml" in names else KERNEL  # torch's module beats the fastml layer
        return {candidate: (1.0 if candidate == fastest else 2.0) for candidate in names}

    _tune.clear_tuning(persisted=True)
    monkeypatch.setattr(_tune, "measure", measure)
    calls = count_fastml_calls(monkeypatch)
    layer, x = fastml.nn.Linear(5, 3), torch.randn(4, 5, requires_grad=True)
    with _tune.recording() as seen:
        train_step(layer, x)
    layer_decisions = [d for k, d in seen if k[0] == "layer Linear"]
    assert layer_decisions and layer_decisions[0].choice == "reference"
    calls.clear()
    train_step(layer, x)
    assert calls["linear"] == 0


@needs_kernel
def test_a_forced_backend_and_cleared_decisions_bypass_the_shortcut(monkeypatch):
    """use_backend, FASTML_BACKEND (read raw on every call: a blank one forces nothing), another
    FASTML_TUNE setting and clear_tuning each take the call through fastml's dispatch again."""
    winner(monkeypatch, "reference")
    calls = count_fastml_calls(monkeypatch)
    layer, x = fastml.nn.Linear(5, 3), torch.randn(4, 5)
    expected = 0

    def step(through_fastml: bool):
        nonlocal expected
        layer(x)
        expected += through_fastml
        assert calls["linear"] == expected

    with torch.no_grad():
        layer(x)
        calls.clear()
        step(False)
        with fastml.use_backend(KERNEL):
            step(True)
        monkeypatch.setenv("FASTML_BACKEND", "  ")
        step(False)
        monkeypatch.setenv("FASTML_BACKEND", KERNEL)
        step(True)
        monkeypatch.delenv("FASTML_BACKEND")
        step(False)
        monkeypatch.setenv(_tune.TUNE_VAR, "off")
        step(True)  # the static rule's route, settled anew
        step(False)
        fastml.clear_tuning()
        step(True)


# ------------------------------------------- the fused functionals' route to torch's sequence

def count_op_calls(monkeypatch, module, name):
    """Counts the calls that reach an op's fastml dispatch (module.name)."""
    calls = collections.Counter()
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls[name] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def fused_calls():
    """(op module, dispatch name, a call of the routed functional with its gradients): the fused
    functionals, and the losses a training loop calls as functions."""
    def linear_mse(x):
        w, b = torch.ones(2, 5, requires_grad=True), torch.zeros(2, requires_grad=True)
        return fastml.functional.linear_mse(x, w, b, torch.ones(x.shape[0], 2)), (w, b)

    def linear_cross_entropy(x):
        w = torch.ones(3, 5, requires_grad=True)
        return fastml.functional.linear_cross_entropy(x, w, torch.zeros(x.shape[0], dtype=torch.int64)), (w,)

    def block(x):
        w = torch.ones(2, 5, 3, 3, requires_grad=True)
        return fastml.functional.conv2d_relu_max_pool2d(x[:, :, None, None].expand(-1, -1, 6, 6), w,
                                                        padding=1).sum(), (w,)

    def mse_loss(x):  # routed as the fused functionals are
        w = torch.ones(5, requires_grad=True)
        return fastml.functional.mse_loss(x * w, torch.ones(x.shape[0], 5)), (w,)

    def cross_entropy(x):
        w = torch.ones(5, requires_grad=True)
        return fastml.functional.cross_entropy(x * w, torch.zeros(x.shape[0], dtype=torch.int64)), (w,)

    def linear(x):
        w = torch.ones(3, 5, requires_grad=True)
        return fastml.functional.linear(x, w).sum(), (w,)

    def max_pool2d(x):
        w = torch.ones(5, 1, 1, requires_grad=True)
        return fastml.functional.max_pool2d(x[:, :, None, None].expand(-1, -1, 4, 4) * w, 2).sum(), (w,)

    def conv2d(x):
        w = torch.ones(2, 5, 3, 3, requires_grad=True)
        return fastml.functional.conv2d(x[:, :, None, None].expand(-1, -1, 4, 4), w, padding=1).sum(), (w,)

    def batch_norm(x):
        w = torch.ones(5, requires_grad=True)
        planes = x[:, :, None, None] * torch.linspace(0.5, 1.5, 9).reshape(3, 3)
        out = fastml.functional.batch_norm(planes, torch.zeros(5), torch.ones(5), w, None, training=True)
        return out.square().sum(), (w,)  # (not its sum: that of a normalised output is 0, to rounding)

    from fastml.ops import batch_norm as bn
    from fastml.ops import conv2d as conv
    from fastml.ops import conv2d_relu_max_pool2d
    from fastml.ops import cross_entropy as ce
    from fastml.ops import linear as lin
    from fastml.ops import linear_cross_entropy as lce
    from fastml.ops import linear_mse as lmse
    from fastml.ops import max_pool2d as pool
    from fastml.ops import mse_loss as mse
    return [(lmse, "linear_mse", linear_mse), (lce, "linear_cross_entropy", linear_cross_entropy),
            (conv2d_relu_max_pool2d, "conv2d_relu_max_pool2d", block), (mse, "mse_loss", mse_loss),
            (ce, "cross_entropy", cross_entropy), (lin, "linear", linear), (pool, "max_pool2d", max_pool2d),
            (conv, "conv2d", conv2d), (bn, "batch_norm", batch_norm)]


@needs_kernel
@pytest.mark.parametrize("module, name, call", fused_calls(), ids=lambda v: v if isinstance(v, str) else "")
def test_a_fused_function_decided_for_torch_runs_torch_sequence(monkeypatch, module, name, call):
    """Once its ops went to torch both ways, the functional calls torch's ops directly (same
    values and gradients); a new signature goes through fastml's dispatch again."""
    winner(monkeypatch, "reference")
    calls = count_op_calls(monkeypatch, module, name)
    x = torch.randn(4, 5, requires_grad=True)
    for _ in range(2):  # the first decides the forward (and the backward, if it has a decision of its own)
        loss, params = call(x)
        loss.backward()
    settled = calls[name]
    assert 1 <= settled <= 2
    loss, params = call(x)
    loss.backward()
    assert calls[name] == settled, "a function settled on torch must not go through fastml's dispatch"
    with fastml.use_backend("reference"):
        expected, expected_params = call(x.detach().requires_grad_())
        expected.backward()
    torch.testing.assert_close(loss, expected)
    for got, want in zip(params, expected_params):
        torch.testing.assert_close(got.grad, want.grad)
    calls.clear()
    call(torch.randn(7, 5))  # batch 7: a new signature
    assert calls[name] == 1


def kernel_wins_ops_torch_wins_calls(monkeypatch, runs: int = 1) -> list:
    """Makes every op's measurement pick fastml's kernel and every whole call's ("fastml" against
    "reference": a layer's or a functional's) pick torch's, each candidate run ``runs`` times, from
    a fresh decisions cache. Returns the list the whole calls' timings are appended to."""
    whole_calls = []

    def measure(names, run, device, rounds=None):
        if "fastml" in names:
            whole_calls.append(names)
        with torch.no_grad():
            for candidate in names:
                for _ in range(runs):
                    run(candidate)
        fastest = "reference" if "fastml" in names else KERNEL
        return {candidate: (1.0 if candidate == fastest else 2.0) for candidate in names}

    _tune.clear_tuning(persisted=True)
    monkeypatch.setattr(_tune, "measure", measure)
    return whole_calls


def spatial_calls():
    """(the functional's argument parser, op, fastml's call, torch's): conv2d and max_pool2d with
    stride and padding (or kernel and stride) ``spatial``."""
    weight = torch.ones(2, 3, 3, 3)
    return [("_conv_args", "conv2d", lambda x, spatial: fastml.functional.conv2d(x, weight, None, spatial, spatial),
             lambda x, spatial: torch.nn.functional.conv2d(x, weight, None, spatial, spatial)),
            ("_pool_args", "max_pool2d", lambda x, spatial: fastml.functional.max_pool2d(x, spatial, spatial),
             lambda x, spatial: torch.nn.functional.max_pool2d(x, spatial, spatial))]


@needs_kernel
@pytest.mark.parametrize("parser, op, call, torch_call", spatial_calls(), ids=["conv2d", "max_pool2d"])
@pytest.mark.parametrize("as_list", [False, True], ids=["as-given", "lists"])
def test_a_convolution_or_pooling_settled_on_torch_parses_no_arguments(monkeypatch, parser, op, call, torch_call,
                                                                       as_list):
    """conv2d and max_pool2d key their route by the arguments as given: once settled on torch, a
    call goes straight to torch's function, its arguments unparsed. Lists (unhashable) are keyed
    by their parsed values instead: they settle all the same, parsed on every call."""
    import importlib
    winner(monkeypatch, "reference")
    x, spatial = torch.randn(2, 3, 8, 8), [2, 2] if as_list else 2
    for _ in range(2):  # the first decides
        call(x, spatial)
    parsed = count_op_calls(monkeypatch, fastml.functional, parser)
    ops = count_op_calls(monkeypatch, importlib.import_module(f"fastml.ops.{op}"), op)
    torch.testing.assert_close(call(x, spatial), torch_call(x, spatial), rtol=0, atol=0)
    assert ops[op] == 0, "a call settled on torch must not reach fastml's op"
    assert parsed[parser] == (1 if as_list else 0)


@needs_kernel
@pytest.mark.parametrize("parser, op, call, torch_call", spatial_calls(), ids=["conv2d", "max_pool2d"])
def test_spellings_of_one_convolution_or_pooling_share_one_timing(monkeypatch, parser, op, call, torch_call):
    """``2`` and ``(2, 2)`` key two routes (the arguments as given) but one timed choice of the
    whole call (parsed): the second spelling settles from the first's decision, timing nothing."""
    whole_calls = kernel_wins_ops_torch_wins_calls(monkeypatch)
    x = torch.randn(2, 3, 8, 8)
    for spatial in (2, (2, 2), 2, (2, 2)):  # (the first call runs the kernel: equal to rounding)
        torch.testing.assert_close(call(x, spatial), torch_call(x, spatial))
    assert len(whole_calls) == 1


@needs_kernel
def test_timing_a_batch_norm_call_leaves_its_running_statistics_as_one_call(monkeypatch):
    """fastml.functional.batch_norm's route is timed with the call's own tensors: the timed calls
    update the running statistics too, and must leave them as the one real call did."""
    whole_calls = kernel_wins_ops_torch_wins_calls(monkeypatch, runs=3)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    mean, var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    expected_mean, expected_var = mean.clone(), var.clone()
    out = fastml.functional.batch_norm(x, mean, var, training=True, momentum=0.3)
    expected = torch.nn.functional.batch_norm(x, expected_mean, expected_var, training=True, momentum=0.3)
    assert len(whole_calls) == 1, "the whole call was not timed: the test tests nothing"
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(mean, expected_mean)
    torch.testing.assert_close(var, expected_var)


@needs_kernel
def test_a_fused_function_whose_kernel_loses_as_a_whole_runs_torch(monkeypatch):
    """The op chose its kernel, but the whole call (dispatch included) timed slower than torch's
    sequence: the functional runs torch's sequence, and a layer built on it follows."""
    kernel_wins_ops_torch_wins_calls(monkeypatch)
    from fastml.ops import linear_mse as lmse
    calls = count_op_calls(monkeypatch, lmse, "linear_mse")
    layer, x, y = fastml.nn.LinearMSELoss(5, 2), torch.randn(4, 5), torch.randn(4, 2)
    with _tune.recording() as seen:
        layer(x, y).backward()
    routes = {k[0]: d.choice for k, d in seen if k[0].startswith(("function ", "layer "))}
    assert routes == {"function linear_mse": "reference"}  # the layer needs no timing of its own
    calls.clear()
    layer(x, y).backward()
    fastml.functional.linear_mse(x, layer.weight, layer.bias, y)
    assert calls["linear_mse"] == 0


# ------------------------------------------------- the whole model against its unpatched twin

def scripted_routes(monkeypatch, verdicts):
    """Kernels win every op; the whole-layer and whole-model timings ("fastml" against
    "reference") go as ``verdicts`` says, in order."""
    queue = list(verdicts)

    def measure(names, run, device, rounds=None):
        with torch.no_grad():
            for candidate in names:
                run(candidate)
        fastest = (queue.pop(0) if queue else "fastml") if "fastml" in names else KERNEL
        return {candidate: (1.0 if candidate == fastest else 2.0) for candidate in names}

    _tune.clear_tuning(persisted=True)
    monkeypatch.setattr(_tune, "measure", measure)
    return queue


@needs_kernel
def test_tune_keeps_torch_where_the_whole_model_is_faster_so(monkeypatch):
    """The layer chose fastml's path alone, but the model ran faster with it on torch's module:
    the layer runs torch's module for this signature from then on, even after another signature
    displaced its route, and the table says so."""
    queue = scripted_routes(monkeypatch, ["fastml", "reference"])
    model = torch.nn.Sequential(fastml.nn.Linear(5, 4), torch.nn.ReLU())
    x = torch.randn(3, 5)
    table = fastml.tune(model, x)
    assert not queue
    (model_row,) = [row for row in table.rows if row.op == "model"]
    assert model_row.choice == "reference" and model_row.type == "Sequential" and model_row.layer == ""
    assert table.by_layer()["0"] == {"forward": "torch", "backward": "torch"}
    assert "(model)" in str(table)
    calls = count_fastml_calls(monkeypatch)
    model(x).sum().backward()
    model(torch.randn(6, 5)).sum().backward()  # another signature: decided on its own
    calls.clear()
    model(x).sum().backward()
    assert calls["linear"] == 0, "the model's verdict must hold for its signature"


@needs_kernel
def test_tune_keeps_fastml_where_the_whole_model_confirms_it(monkeypatch):
    queue = scripted_routes(monkeypatch, ["fastml", "fastml"])
    model = torch.nn.Sequential(fastml.nn.Linear(5, 4), torch.nn.ReLU())
    x = torch.randn(3, 5)
    table = fastml.tune(model, x)
    assert not queue
    assert [row.choice for row in table.rows if row.op == "model"] == ["fastml"]
    assert table.by_layer()["0"] == {"forward": f"fastml {KERNEL}", "backward": f"fastml {KERNEL}"}
    calls = count_fastml_calls(monkeypatch)
    model(x).sum().backward()
    assert calls["linear"] == 1


@needs_kernel
def test_the_whole_model_is_decided_anew_when_freed_memory_is_kept(monkeypatch):
    """A training step's page faults, which fastml.keep_freed_memory removes, change which layout
    and routes win: the whole-model checks are decided per setting, the layers' once."""
    queue = scripted_routes(monkeypatch, ["fastml"] * 5)
    model = torch.nn.Sequential(fastml.nn.Linear(5, 4), torch.nn.ReLU())
    x = torch.randn(3, 5)
    monkeypatch.setattr(_memory, "_keeping", False)
    fastml.tune(model, x)
    assert len(queue) == 2  # the layer's check, the model's against its routes on torch's and against unpatched
    monkeypatch.setattr(_memory, "_keeping", True)
    table = fastml.tune(model, x)
    assert not queue  # the model's two checks again, the layer's from its decision
    assert [row.choice for row in table.rows if row.op == "model"] == ["fastml"]
    model_keys = [key for key in _tune.decisions() if key[0] == "model Sequential"]
    assert {key[6] for key in model_keys} == {"freed memory returned", "freed memory kept"}


def tuned_anew(model, x) -> tuple:
    """(fastml.tune(model, x)'s table, the whole-model decisions it made anew, not found already)."""
    before = set(_tune.decisions())
    table = fastml.tune(model, x)
    return table, {key for key in set(_tune.decisions()) - before if key[0].startswith("model ")}


def test_models_of_one_class_and_input_shape_get_their_own_whole_model_verdicts(monkeypatch):
    """The whole-model checks (layout, routes, unpatched) are keyed by the model's architecture,
    not only its class and inputs: torchvision's ResNet-18 and ResNet-50 are both ``ResNet``, and
    ResNet-50 took ResNet-18's layout verdict in the zoo benchmark. A fresh instance of a model
    already tuned (its twin in another process) finds its verdicts again."""
    scripted_routes(monkeypatch, [])

    def net(width):
        return torch.nn.Sequential(torch.nn.Conv2d(3, width, 3), torch.nn.ReLU(), torch.nn.Conv2d(width, 4, 1))

    x = torch.randn(2, 3, 8, 8)
    whole_model_keys = []
    for width in (5, 7, 5):
        model = net(width)
        fastml.patch(model, channels_last=True)
        table, keys = tuned_anew(model, x)
        assert [row.op for row in table.rows if row.layer == ""][:1] == ["layout"]
        whole_model_keys.append(keys)
    first, other_width, same_again = whole_model_keys
    assert {key[0] for key in first} >= {"model layout Sequential"}
    assert {key[0] for key in other_width} == {key[0] for key in first}  # decided anew, each check
    assert same_again == set()  # the same architecture: decided already


def test_whole_model_verdicts_tell_settings_and_layouts_apart(monkeypatch):
    """Two models whose parameters' shapes agree but whose settings differ (a stride), and one
    model fed inputs of one shape in two layouts, are decided apart."""
    scripted_routes(monkeypatch, [])

    def net(stride):
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, stride=stride), torch.nn.Conv2d(5, 4, 1))
        fastml.patch(model, channels_last=True)
        return model

    x = torch.randn(2, 3, 9, 9)
    assert tuned_anew(net(1), x)[1]
    assert tuned_anew(net(2), x)[1]
    assert tuned_anew(net(2), x.contiguous(memory_format=torch.channels_last))[1]
    assert not tuned_anew(net(2), x.contiguous(memory_format=torch.channels_last))[1]


def test_the_architecture_digest_is_one_across_processes_and_safe_on_any_module():
    """A model built in another process has the same digest (the decisions file is found again);
    a lazy layer the forward never reached, a repr that names an object's address, or one that
    raises, digest without error."""
    code = textwrap.dedent("""
        import torch
        from fastml import _tune_model
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.BatchNorm2d(5), torch.nn.Flatten(),
                                    torch.nn.LazyLinear(4))
        print(_tune_model._architecture(model))
    """)
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.BatchNorm2d(5), torch.nn.Flatten(),
                                torch.nn.LazyLinear(4))
    assert _tune_model._architecture(model) == other

    class Addressed(torch.nn.Module):
        def __init__(self, broken=False):
            super().__init__()
            self.function, self.broken = object(), broken

        def extra_repr(self):
            if self.broken:
                raise ValueError("a user's repr")
            return f"function={self.function}"

    assert " at 0x" in Addressed().extra_repr()
    assert _tune_model._architecture(Addressed()) == _tune_model._architecture(Addressed())
    assert _tune_model._architecture(Addressed(broken=True))
    conv = torch.nn.Conv2d(8, 8, 3)
    contiguous = _tune_model._architecture(conv)
    assert _tune_model._architecture(conv.to(memory_format=torch.channels_last)) != contiguous  # (the weight's layout)


def unpatched_is_faster(monkeypatch, model, unpatched_wins: bool):
    """Kernels win every op, fastml's routes every layer and model check, channels-last
    activations the layout check; the check of the model against itself unpatched (told by its
    "reference" run: every module as torch's own) goes to the unpatched model where
    ``unpatched_wins``."""
    def measure(names, run, device, rounds=None):
        unpatched_check = False
        with torch.no_grad():
            for candidate in names:
                run(candidate)
                unpatched_check |= candidate == "reference" and _route.runs_as_torch(model)
        fastest = ("reference" if unpatched_check and unpatched_wins else "fastml" if "fastml" in names
                   else "channels_last" if "channels_last" in names else KERNEL)
        return {candidate: (1.0 if candidate == fastest else 2.0) for candidate in names}

    _tune.clear_tuning(persisted=True)
    monkeypatch.setattr(_tune, "measure", measure)


@needs_kernel
@pytest.mark.parametrize("channels_last", [False, True])
def test_tune_runs_the_model_as_unpatched_where_that_measured_faster(monkeypatch, channels_last):
    """Patching costs every layer a dispatch that no layer's timing sees: where the patched model
    is not faster than the same model unpatched, every module runs as torch's own (folds undone,
    the input's layout) until the next tune or unpatch, with exactly the unpatched results."""
    torch.manual_seed(0)
    twin = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 5)).eval()
    twin[1].running_mean.uniform_(-1, 1)
    model = copy.deepcopy(twin)
    fastml.patch(model, channels_last=channels_last)
    assert model[0].__class__ is not torch.nn.Conv2d  # folded with its batch norm
    x = torch.randn(2, 3, 6, 6)
    unpatched_is_faster(monkeypatch, model, True)
    with torch.no_grad():
        table = fastml.tune(model, x)
        (row,) = [row for row in table.rows if row.op == "unpatched"]
        assert row.choice == "reference" and "torch's modules, as unpatched" in str(table)
        assert all(phases == {"forward": "torch"} for phases in table.by_layer().values())
        assert all(_route.runs_as_torch(m) for m in model.modules())
        # the drop-ins and the fold's modules are torch's classes meanwhile: not even fastml's forward runs
        assert [type(m) for m in model] == [type(m) for m in twin]
        if channels_last:
            assert not fastml._layout.of(model).enabled
        calls = count_fastml_calls(monkeypatch)
        assert torch.equal(model(x), twin(x))  # the very ops of the unpatched model: bitwise
        assert calls["linear"] == 0

        unpatched_is_faster(monkeypatch, model, False)  # tuned again: the patched model wins now
        table = fastml.tune(model, x)
        assert [row.choice for row in table.rows if row.op == "unpatched"] == ["fastml"]
        assert not any(_route.runs_as_torch(m) for m in model.modules())
        calls.clear()
        model(x)
        assert calls["linear"] == 1
        if channels_last:
            assert fastml._layout.of(model).enabled

        assert model[0].__class__ is not torch.nn.Conv2d  # fastml's classes again

        unpatched_is_faster(monkeypatch, model, True)
        fastml.tune(model, x)
        state = model.state_dict()
        assert state.keys() == twin.state_dict().keys()
    fastml.unpatch(model)
    assert not any(_route.runs_as_torch(m) for m in model.modules())
    assert [type(m) for m in model] == [type(m) for m in twin]
    fastml.patch(model)  # patched again after the verdict: fastml's modules, as a first patch
    assert model[0].__class__ is not torch.nn.Conv2d and not any(_route.runs_as_torch(m) for m in model.modules())
    unpatched_is_faster(monkeypatch, model, True)
    with torch.no_grad():
        fastml.tune(model, x)
    fastml.patch(model)  # on a model running as unpatched: its classes back first
    assert model[0].__class__ is not torch.nn.Conv2d and not any(_route.runs_as_torch(m) for m in model.modules())
    fastml.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(x), twin(x))


@needs_kernel
def test_training_with_nothing_of_fastml_left_runs_as_unpatched_without_timing_it(monkeypatch):
    """In training, where every layer keeps torch's module and the input's layout, the patched
    model computes what the unpatched one does plus each layer's dispatch: tune runs it as
    unpatched by rule, without the timing that could only favour the patched model by noise."""
    torch.manual_seed(0)
    twin = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 4 * 4, 5))
    model = copy.deepcopy(twin)
    fastml.patch(model, channels_last=True)
    unpatched_timed = []

    def measure(names, run, device, rounds=None):  # torch's implementation wins every check
        for candidate in names:
            run(candidate)
            unpatched_timed.append(candidate == "reference" and _route.runs_as_torch(model))
        return {candidate: (1.0 if candidate == "reference" else 2.0) for candidate in names}

    _tune.clear_tuning(persisted=True)
    monkeypatch.setattr(_tune, "measure", measure)
    x = torch.randn(2, 3, 6, 6)
    table = fastml.tune(model, x)  # parameters requiring grad, grad mode on: a training step
    assert unpatched_timed and not any(unpatched_timed)
    (row,) = [row for row in table.rows if row.op == "unpatched"]
    assert (row.choice, row.rule, row.seconds) == ("reference", "nothing of fastml's left", {})
    assert "torch's modules, as unpatched (nothing of fastml's left)" in str(table)
    assert all(_route.runs_as_torch(m) for m in model.modules()) and not fastml._layout.of(model).enabled
    assert [type(m) for m in model] == [type(m) for m in twin]
    out, expected = model(x), twin(x)
    assert torch.equal(out, expected)
    out.sum().backward()
    expected.sum().backward()
    for mine, theirs in zip(model.parameters(), twin.parameters()):
        assert torch.equal(mine.grad, theirs.grad)
    fastml.unpatch(model)
    assert not any(_route.runs_as_torch(m) for m in model.modules())


# ------------------------------------------------------------- a layer's variants of torch's

def test_a_convolution_may_run_torchs_on_the_channels_last_layout(monkeypatch):
    """Where the channels-last variant measured fastest, the layer runs torch's convolution on
    that layout and hands back the input's layout: same values and gradients as torch's module."""
    def measure(names, run, device, rounds=None):
        with torch.no_grad():
            for candidate in names:
                run(candidate)
        fastest = "channels_last" if "channels_last" in names else "reference"
        return {candidate: (1.0 if candidate == fastest else 2.0) for candidate in names}

    _tune.clear_tuning(persisted=True)
    monkeypatch.setattr(_tune, "measure", measure)
    layer, reference = fastml.nn.Conv2d(3, 5, 3, padding=1), torch.nn.Conv2d(3, 5, 3, padding=1)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(2, 3, 9, 8)
    converted = []
    real, real_function = fastml.nn.relayout, fastml._layout.Relayout

    def relayout(tensor, memory_format):
        converted.append(("output", memory_format))
        return real(tensor, memory_format)

    class Relayout:  # the operands' conversions, which also set their gradients' layouts
        @staticmethod
        def apply(tensor, memory_format, grad_memory_format):
            converted.append(("weight" if tensor is layer.weight else "input", memory_format, grad_memory_format))
            return real_function.apply(tensor, memory_format, grad_memory_format)

    with _tune.recording() as seen:
        train_step(layer, x)  # decides the ops, forward then backward
        train_step(layer, x)  # settles the route
    assert [d.choice for k, d in seen if k[0] == "layer Conv2d"] == ["channels_last"]
    monkeypatch.setattr(fastml.nn, "relayout", relayout)
    monkeypatch.setattr(fastml._layout, "Relayout", Relayout)
    out = layer(x)
    contiguous, channels_last = torch.contiguous_format, torch.channels_last
    # the input to channels-last (its gradient back contiguous), the weight as it is (its gradient
    # contiguous, as torch's for a contiguous input), the output back to the input's layout
    assert converted == [("input", channels_last, contiguous), ("weight", contiguous, contiguous),
                         ("output", contiguous)]
    assert out.is_contiguous() and not out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, reference(x))
    for got, expected in zip(train_step(layer, x), train_step(reference, x)):
        torch.testing.assert_close(got, expected)
    # channels-last input with gradients wanted: not oneDNN's packed one (no backward); Winograd's,
    # whose backward is torch's, where the C++ kernels are built (fastml/_winograd.py); and the
    # weight gradient as a matrix product (fastml/_gemm_weight_grad.py), torch's ops only
    parameters = lambda: (layer.weight, layer.bias)  # noqa: E731
    variants = fastml.nn.torch_conv_variants(layer, x.contiguous(memory_format=torch.channels_last), parameters)
    winograd = {"winograd"} if _winograd._kernels_built() and _onednn.ops() else set()
    assert set(variants) == {"gemm_weight_grad"} | winograd
    assert fastml.nn.torch_conv_variants(layer, x[0], parameters) == {}  # unbatched


# ------------------------------------------------- weights a variant derives, in training

@pytest.mark.parametrize("train", [False, True])
def test_timed_training_calls_derive_a_variants_cached_weight_anew(monkeypatch, train):
    """A variant that derives something from the weight once per weight version (Winograd's
    transform, oneDNN's packing) pays for it on every training step, where an optimizer changes
    the weight: so each timed training call must derive it anew, and an inference one need not."""
    attr = "_fastml_test_derived_weight"
    monkeypatch.setattr(_route, "DERIVED_WEIGHT_ATTRS", _route.DERIVED_WEIGHT_ATTRS | {attr})
    layer = torch.nn.Linear(5, 3)
    calls = collections.Counter()

    def cached_variant(x):
        calls["run"] += 1
        if attr not in layer.__dict__:
            calls["derived"] += 1
            layer.__dict__[attr] = True
        return torch.nn.functional.linear(x, layer.weight, layer.bias)

    fastml.clear_tuning(persisted=True)
    x = torch.randn(4, 5, requires_grad=train)
    with torch.set_grad_enabled(train):
        _route.layer_choice(layer, (x,), layer.forward, {"cached": cached_variant})
    assert calls["run"] > 2
    assert calls["derived"] == (calls["run"] if train else 1)
    _route.forget_derived_weights(layer)
    assert attr not in layer.__dict__


def test_the_decisions_file_names_the_build_of_the_kernels():
    """A rebuilt C++ module (changed sources or flags, same version) gets a file of its own: its
    fingerprint carries a digest of the module's bytes."""
    module = _tune._cpp_module()
    if module is None:
        pytest.skip("no C++ module in this install")
    origin = importlib.util.find_spec(module).origin
    assert _tune.fingerprint()["cpp_build"] == hashlib.sha256(Path(origin).read_bytes()).hexdigest()[:16]


@needs_kernel
def test_an_optimizer_step_follows_every_setting_it_runs_under(monkeypatch):
    """An optimizer step remembers its choice per shape class (fastml/_multi_tensor.py's
    _settled, to keep a small model's step cheap); the memory must never outlive what the choice
    depended on: a forced backend (use_backend, FASTML_BACKEND), the tuning mode, forgotten
    decisions, or fastml.tune's recording, which must see every choice."""
    from fastml.ops import sgd as sgd_op
    ran = []
    real_impl = sgd_op.impl
    monkeypatch.setattr(sgd_op, "impl", lambda backend: ran.append(backend) or real_impl(backend))
    favoured = {"name": "reference"}
    monkeypatch.setattr(_tune, "measure", lambda names, run, device, rounds=None: {
        name: 1.0 if name == favoured["name"] else 2.0 for name in names})
    param = torch.ones(5, 3, requires_grad=True)
    opt = fastml.optim.SGD([param], lr=0.1)

    def step() -> str:
        param.grad = torch.ones(5, 3)
        ran.clear()
        opt.step()
        return ran[-1]

    assert step() == "reference"  # measured: torch's wins
    favoured["name"] = KERNEL  # remembered: not measured again...
    assert step() == "reference"
    with fastml.use_backend(KERNEL):  # ...but a forced backend runs
        assert step() == KERNEL
    assert step() == "reference"
    monkeypatch.setenv(_backend.ENV_VAR, KERNEL)
    assert step() == KERNEL
    monkeypatch.delenv(_backend.ENV_VAR)
    with fastml.tuning("off"):  # the static rule runs the optimizer steps' kernels
        assert step() == KERNEL
    monkeypatch.setenv(_tune.TUNE_VAR, "off")
    assert step() == KERNEL
    monkeypatch.delenv(_tune.TUNE_VAR)
    assert step() == "reference"
    _tune.clear_tuning(persisted=True)  # forgotten: measured again, and now the kernel wins
    assert step() == KERNEL
    with _tune.recording() as seen:
        step()
        step()
    assert [decision.choice for key, decision in seen if key[0] == "sgd_step"] == [KERNEL, KERNEL]


@needs_kernel
def test_a_fused_functional_settled_on_its_kernel_goes_straight_to_it(monkeypatch):
    """Once linear_cross_entropy's route settled on fastml's path and its op chose a kernel, later
    calls of the same signature run that kernel's Function without the op's selection (nor the
    route's other lookups), with the same results; a call of another signature, under other
    settings, or with a layer listening for where its ops go selects again."""
    monkeypatch.setattr(_tune, "measure", lambda names, run, device, rounds=None:
                        {name: 2.0 if name == "reference" else 1.0 for name in names})  # every kernel wins
    x, w, b = torch.randn(6, 5), torch.randn(3, 5), torch.randn(3)
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    expected = torch.nn.functional.cross_entropy(torch.nn.functional.linear(*leaves), target)
    expected.backward()

    def call(*tensors):
        return fastml.functional.linear_cross_entropy(tensors[0], tensors[1], target, linear_bias=tensors[2])

    fresh = [t.clone().requires_grad_() for t in (x, w, b)]
    call(*fresh).backward()  # settles the route (fastml's) and the op's choice (the kernel)
    selected = []
    select = _backend.select
    monkeypatch.setattr(_backend, "select",
                        lambda *args, **kwargs: selected.append(args[2][0]) or select(*args, **kwargs))
    for _ in range(2):
        ours = [t.clone().requires_grad_() for t in (x, w, b)]
        loss = call(*ours)
        loss.backward()
        assert_close(loss, expected)
        for got, want in zip(ours, leaves):
            assert_close(got.grad, want.grad)
    assert selected == []
    with torch.no_grad():  # another signature (grad mode, no gradient formed)
        assert_close(call(x, w, b), expected)
    assert selected == ["linear_cross_entropy"]
    with fastml.tuning("off"):  # other settings (and signature): the static rule's choice
        assert_close(call(*ours), expected)
    assert len(selected) == 2
    with _route.watching():
        assert_close(call(*ours), expected)
    assert len(selected) == 3
