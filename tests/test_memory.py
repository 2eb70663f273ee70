"""``fastml.keep_freed_memory`` (fastml/_memory.py): with it, tensors made after others were
freed reuse pages already mapped (no page faults); without it, or after ``fastml.empty_cache()``,
glibc gives freed memory back and new tensors fault their pages in again. Each case runs in a
process of its own: the setting is process-wide and glibc's dynamic thresholds, once set, cannot be
restored, so the test process keeps glibc's defaults."""

from __future__ import annotations

import ctypes
import json
import os
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
if ctypes.CDLL(None).prctl(41, 1, 0, 0, 0) != 0:  # PR_SET_THP_DISABLE: a fault per 4 KiB page, whatever THP's setting
    sys.exit(77)
setting = sys.argv[1]
if setting != "default" and not fastml.keep_freed_memory(True):
    raise SystemExit("keep_freed_memory() did not apply")
def cycle():
    blocks = [torch.empty(4 << 20) for _ in range(8)]
    for b in blocks:
        b.fill_(1.0)
    return blocks
blocks = cycle()
del blocks
if setting == "keep-then-empty":
    fastml.empty_cache()
if setting == "keep-then-release":
    fastml.keep_freed_memory(False)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
blocks = cycle()
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""
# what would change the child's allocator or its settings behind the test's back
_ALLOCATOR_VARIABLES = ("LD_PRELOAD", "GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                        "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_", "MALLOC_ARENA_MAX")


def _faults(setting: str) -> int:
    env = {key: value for key, value in os.environ.items() if key not in _ALLOCATOR_VARIABLES}
    done = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, setting], capture_output=True, text=True, env=env)
    if done.returncode == 77:
        pytest.skip("prctl(PR_SET_THP_DISABLE) refused: page faults cannot be counted per 4 KiB page")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])["faults"]


@pytest.mark.long  # four children each faulting 256 MiB in: 8 s on 2 cores
@glibc_only
def test_kept_memory_is_reused_without_faults_and_released_memory_faults_again():
    pages = (128 << 20) // 4096
    # glibc's defaults: the second 128 MiB lands on fresh pages (the control: faults are seen)
    assert _faults("default") > pages // 2
    # kept: the freed blocks come back mapped (at most two of the eight on new pages, where another
    # allocation took their place in the heap meanwhile)
    assert _faults("keep") <= pages // 4
    assert _faults("keep-then-empty") > pages // 2  # empty_cache gave them back: faulted in again
    assert _faults("keep-then-release") > pages // 2  # keep_freed_memory(False) too


def test_the_setting_is_reported_and_switches_back(monkeypatch):
    calls = []
    monkeypatch.setattr(_memory, "_glibc", lambda: _RecordingLibc(calls))
    monkeypatch.setattr(_memory, "_keeping", False)
    assert fastml.keep_freed_memory() is True and _memory.keeping_freed_memory()
    assert calls[-2:] == [("mallopt", _memory.M_MMAP_THRESHOLD, 32 << 20),
                          ("mallopt", _memory.M_TRIM_THRESHOLD, -1)]  # -1: glibc never trims
    assert fastml.keep_freed_memory(False) is True and not _memory.keeping_freed_memory()
    assert calls[-3:] == [("mallopt", _memory.M_MMAP_THRESHOLD, 32 << 20),
                          ("mallopt", _memory.M_TRIM_THRESHOLD, 64 << 20), ("malloc_trim", 0)]


class _NotGlibc:
    """A C library without glibc's functions (musl, macOS's libSystem)."""


def _process_library(kind):
    def open_library(name):
        if kind == "not glibc":
            return _NotGlibc()
        if kind == "no ctypes name":  # Windows' ctypes given None
            raise TypeError("argument of type 'NoneType' is not iterable")
        raise OSError(f"{name}: cannot open shared object file")
    return open_library


@pytest.mark.parametrize("kind", ["not glibc", "no ctypes name", "no library"])
def test_without_glibc_nothing_changes_and_nothing_raises(monkeypatch, kind):
    monkeypatch.setattr(_memory, "_open_library", _process_library(kind))
    monkeypatch.setattr(_memory, "_keeping", False)
    assert _memory._glibc() is None
    assert fastml.keep_freed_memory() is False and not _memory.keeping_freed_memory()
    assert fastml.empty_cache() >= 0  # the recycled blocks still go; nothing to trim
    assert "not glibc's malloc" in fastml.info(print_report=False)["freed_memory"]


def test_an_interposed_allocator_is_not_glibc(monkeypatch):
    """With jemalloc or tcmalloc preloaded, the process's malloc is not libc.so.6's: glibc's mallopt
    would report success and change nothing."""
    real = ctypes.CDLL

    def open_library(name):
        library = real(name)
        if name is None:
            return _Interposed(library)
        return library
    monkeypatch.setattr(_memory, "_open_library", open_library)
    assert _memory._glibc() is None


class _Interposed:
    """The process's symbols, with another allocator's malloc."""

    def __init__(self, library):
        self._library = library
        self.malloc = ctypes.CDLL(None).free  # any other function's address

    def __getattr__(self, name):
        return getattr(self._library, name)


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
    monkeypatch.setattr(_memory, "_keeping", False)
    assert fastml.info(print_report=False)["freed_memory"].startswith("not kept by fastml")
    fastml.keep_freed_memory()
    assert fastml.info(print_report=False)["freed_memory"].startswith("kept")
    fastml.keep_freed_memory(False)
    assert fastml.info(print_report=False)["freed_memory"].startswith("not kept by fastml")
