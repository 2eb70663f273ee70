"""``fastml.keep_freed_memory`` (fastml/_memory.py): with it, tensors made after others were
freed reuse pages already mapped (no page faults); without it, or after ``fastml.empty_cache()``,
glibc gives freed memory back and new tensors fault their pages in again. Each case runs in a
process of its own: the setting is process-wide and glibc's dynamic thresholds, once set, cannot be
restored, so the test process keeps glibc's defaults."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import fastml
from fastml import _memory

glibc_only = pytest.mark.skipif(_memory._glibc() is None, reason="mallopt and malloc_trim are glibc's")

# Makes and frees 128 MiB of 16 MiB tensors (each under glibc's 32 MiB mmap ceiling: from the heap),
# makes the same again and writes every page: the minor page faults that took are what a training
# step's next activations pay.
_FAULTS_SCRIPT = """
import ctypes, json, resource, sys, torch, fastml
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: a fault per 4 KiB page, whatever the kernel's THP setting
setting = sys.argv[1]
if setting != "default":
    assert fastml.keep_freed_memory(setting != "release")
def cycle():
    blocks = [torch.empty(4 << 20) for _ in range(8)]
    for b in blocks:
        b.fill_(1.0)
    return blocks
blocks = cycle()
del blocks
if setting == "keep-then-empty":
    fastml.empty_cache()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
blocks = cycle()
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _faults(setting: str) -> int:
    done = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, setting], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["faults"]


@glibc_only
def test_kept_memory_is_reused_without_faults_and_released_memory_faults_again():
    pages = (128 << 20) // 4096
    # glibc's defaults: the second 128 MiB lands on fresh pages (the control: faults are seen)
    assert _faults("default") > pages // 2
    # kept: the freed blocks come back mapped (at most two of the eight on new pages, where another
    # allocation took their place in the heap meanwhile)
    assert _faults("keep") <= pages // 4
    assert _faults("keep-then-empty") > pages // 2  # empty_cache gave them back: faulted in again


@glibc_only
def test_the_setting_is_reported_and_switches_back(monkeypatch):
    calls = []
    monkeypatch.setattr(_memory, "_glibc", lambda: _RecordingLibc(calls))
    assert fastml.keep_freed_memory() is True and _memory.keeping_freed_memory()
    assert calls[-2:] == [("mallopt", _memory.M_MMAP_THRESHOLD, 32 << 20),
                          ("mallopt", _memory.M_TRIM_THRESHOLD, 2**31 - 1)]
    assert fastml.keep_freed_memory(False) is True and not _memory.keeping_freed_memory()
    assert calls[-3:] == [("mallopt", _memory.M_MMAP_THRESHOLD, 32 << 20),
                          ("mallopt", _memory.M_TRIM_THRESHOLD, 64 << 20), ("malloc_trim", 0)]


def test_without_glibc_nothing_changes(monkeypatch):
    monkeypatch.setattr(_memory, "_glibc", lambda: None)
    assert fastml.keep_freed_memory() is False
    assert not _memory.keeping_freed_memory()
    assert fastml.empty_cache() >= 0  # the recycled blocks still go; nothing to trim


@pytest.mark.parametrize("keep", [1, "yes", None])
def test_keep_must_be_a_bool(keep):
    with pytest.raises(TypeError, match="'keep' must be a bool"):
        fastml.keep_freed_memory(keep)


class _RecordingLibc:
    def __init__(self, calls):
        self.calls = calls

    def mallopt(self, parameter, value):
        self.calls.append(("mallopt", parameter, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


def test_info_says_what_becomes_of_freed_memory(monkeypatch):
    monkeypatch.setattr(_memory, "_glibc", lambda: _RecordingLibc([]))
    assert fastml.info(print_report=False)["freed_memory"].startswith("given back")
    fastml.keep_freed_memory()
    assert fastml.info(print_report=False)["freed_memory"].startswith("kept")
    fastml.keep_freed_memory(False)
    monkeypatch.setattr(_memory, "_glibc", lambda: None)
    assert "not glibc" in fastml.info(print_report=False)["freed_memory"]
