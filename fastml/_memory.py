"""Keeping freed memory mapped: glibc malloc's settings for a training loop's allocations.

torch's CPU allocator is plain ``malloc``/``free`` (no cache, unlike its CUDA allocator), and a
training step frees most of what it made: every activation is dropped in the backward pass. With
glibc's defaults, once the heap's free top reaches ``M_TRIM_THRESHOLD`` (dynamic: twice the
largest block freed from an mmap, at most 64 MiB) glibc gives all of it back to the kernel but
``M_TOP_PAD``, so the next step's activations land on fresh pages again, each faulting and zeroed
by the kernel on first touch. In a VM that costs microseconds per 4 KiB page: on a 2-core Zen 5,
torch's max-pool backward at ResNet-18's stem (12.8 MB of input gradient, batch 16 at 112x112)
took 0.8 to 20 ms a step inside the training step with glibc's defaults and 0.65 to 1.0 ms with the
freed memory kept, and the whole step took 167 ms against 135 ms (channels-last; 171 against 148 ms
on (N, C, H, W) tensors).

``keep_freed_memory()`` turns trimming off (``M_TRIM_THRESHOLD`` -1, glibc's "never") and serves
blocks up to 32 MiB from the heap (``M_MMAP_THRESHOLD``: the ceiling of glibc's own dynamic
threshold, which it reaches once a block just under that size is freed; glibc before 2.35 refuses
more). Larger blocks are still fresh pages each time, the case fastml/_recycle.py handles for
fastml's own large outputs. The cost is memory: the main heap stays at its peak, as torch's CUDA
caching allocator keeps its peak on the GPU and as the jemalloc settings of torch's CPU launcher
(``torch.backends.xeon.run_cpu``) do. Other threads' arenas (OpenMP workers; torch runs a CPU
backward on the calling thread) keep their tops too, but glibc still unmaps one of their 64 MiB
heaps once it is wholly free. ``fastml.empty_cache()`` gives memory back with ``malloc_trim(0)``:
the main heap's free top, and the free pages inside every arena (not the other arenas' tops).

Process-wide and explicit: importing fastml or patching a model changes nothing of this. Setting
either threshold turns glibc's dynamic thresholds off for good, so ``keep_freed_memory(False)``
cannot restore them exactly: it sets the values they reach in a process that has freed a block
just under 32 MiB (mmap threshold 32 MiB, trim threshold twice that), not the 128 KiB they start
at, which would send every block over 128 KiB to fresh pages.

Only where glibc's malloc is the allocator: on other C libraries and operating systems, and where
another allocator is interposed (jemalloc or tcmalloc through ``LD_PRELOAD``, whose own settings
then apply), nothing changes and ``keep_freed_memory`` returns False.
"""

from __future__ import annotations

import ctypes
import sys
import threading

from fastml import _recycle

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h> parameter numbers
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20
"""glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: its dynamic mmap threshold's ceiling."""
KEEP_TRIM_THRESHOLD = -1  # glibc: "-1U disables trimming completely"
RELEASE_TRIM_THRESHOLD = 2 * MMAP_THRESHOLD_MAX  # glibc's dynamic trim threshold at that mmap threshold

_lock = threading.Lock()
_keeping = False


def _open_library(name: str | None):
    """``ctypes.CDLL(name)``: the one way ``_glibc`` opens a library, which tests replace (never
    ctypes's own CDLL, through which numba's llvmlite loads its library lazily: with that replaced,
    fastml.info's backend check found numba absent for the rest of the process)."""
    return ctypes.CDLL(name)


def _glibc():
    """The process's C library where glibc's malloc is the allocator in use (mallopt and
    malloc_trim are glibc's), else None. Never raises."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        process = _open_library(None)
        if not all(hasattr(process, name) for name in ("gnu_get_libc_version", "mallopt", "malloc_trim")):
            return None
        # an allocator interposed with LD_PRELOAD (jemalloc, tcmalloc) answers for malloc: glibc's
        # mallopt would then tune an allocator nobody uses, and report success
        libc = _open_library("libc.so.6")
        if ctypes.cast(process.malloc, ctypes.c_void_p).value != ctypes.cast(libc.malloc, ctypes.c_void_p).value:
            return None
    except Exception:  # no such library, or a ctypes that cannot open the process itself
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.malloc_trim.argtypes = (ctypes.c_size_t,)
    return libc


def keep_freed_memory(keep: bool = True) -> bool:
    """Keep (``keep=True``) or give back (``False``) the memory this process frees, so that the
    next training step's tensors reuse pages already mapped instead of faulting in fresh ones (see
    the module's docstring). Returns whether glibc took the setting: False where glibc's malloc is
    not the allocator in use (then nothing changes)."""
    global _keeping
    if not isinstance(keep, bool):
        raise TypeError(f"keep_freed_memory() argument 'keep' must be a bool, got {type(keep).__name__}")
    libc = _glibc()
    if libc is None:
        return False
    trim = KEEP_TRIM_THRESHOLD if keep else RELEASE_TRIM_THRESHOLD
    with _lock:
        applied = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX))
        applied = applied and bool(libc.mallopt(M_TRIM_THRESHOLD, trim))
        _keeping = keep and applied
        if not keep:
            libc.malloc_trim(0)
    return applied


def keeping_freed_memory() -> bool:
    """Whether ``keep_freed_memory(True)`` is in force."""
    return _keeping


def trim() -> None:
    """Gives free heap memory back to the kernel now (glibc's ``malloc_trim(0)``: see the module's
    docstring for what it reaches), whatever the setting; memory in use stays."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def empty_cache() -> int:
    """Lets go of the memory fastml keeps: the large blocks it recycles (fastml/_recycle.py) and,
    through ``malloc_trim``, the heap's free memory (``keep_freed_memory`` keeps it). Returns the
    bytes of recycled blocks let go (glibc does not say how much it trimmed)."""
    freed = _recycle.release()
    trim()
    return freed
