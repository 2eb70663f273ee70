"""Keeping freed memory mapped: glibc malloc's settings for a training loop's allocations.

torch's CPU allocator is plain ``malloc``/``free`` (no cache, unlike its CUDA allocator), and a
training step frees most of what it made: every activation is dropped in the backward pass. With
glibc's defaults the heap's free top beyond ``M_TRIM_THRESHOLD`` goes back to the kernel at each
such free, so the next step's activations land on fresh pages again, each faulting and zeroed by
the kernel on first touch. In a VM that costs microseconds per 4 KiB page: on a 2-core Zen 5,
torch's zero fill of max-pool's input gradient (12.8 MB, ResNet-18's stem at 112x112, batch 16)
took 8.8 ms (1.5 GB/s), and a whole ResNet-18 training step took 167 ms against 135 ms with the
freed memory kept (channels-last; 171 against 148 ms on (N, C, H, W) tensors).

``keep_freed_memory()`` sets glibc to keep what the process freed (``M_TRIM_THRESHOLD`` at its
largest) and to serve blocks up to 32 MiB from the heap (``M_MMAP_THRESHOLD`` at glibc's largest,
which its own dynamic threshold reaches once a block that large is freed; above it every block is
fresh pages, the case fastml/_recycle.py handles for fastml's own large outputs). The cost is
memory: the process keeps its peak heap mapped, as torch's CUDA caching allocator keeps its peak
on the GPU, and as the jemalloc settings of torch's CPU launcher (``torch.backends.xeon.run_cpu``)
do. ``fastml.empty_cache()`` gives it back (``malloc_trim``).

Process-wide and explicit: importing fastml or patching a model changes nothing of this. Setting
either threshold turns glibc's dynamic thresholds off for good, so ``keep_freed_memory(False)``
cannot restore them exactly: it sets what they reach in a process that has freed a 32 MiB block
(mmap threshold 32 MiB, trim threshold twice that), not the 128 KiB they start at, which would
send every block over 128 KiB to fresh pages.
"""

from __future__ import annotations

import ctypes
import threading

from fastml import _recycle

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h> parameter numbers
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20
"""glibc's largest mmap threshold on 64-bit (HEAP_MAX_SIZE / 2): mallopt refuses more."""
KEEP_TRIM_THRESHOLD = 2**31 - 1  # mallopt's value is an int: the largest, "never trim"
RELEASE_TRIM_THRESHOLD = 2 * MMAP_THRESHOLD_MAX  # glibc's dynamic trim threshold at that mmap threshold

_lock = threading.Lock()
_keeping = False


def _glibc():
    """The process's C library where it is glibc (mallopt and malloc_trim are glibc's), else None."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not all(hasattr(libc, name) for name in ("gnu_get_libc_version", "mallopt", "malloc_trim")):
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.malloc_trim.argtypes = (ctypes.c_size_t,)
    return libc


def keep_freed_memory(keep: bool = True) -> bool:
    """Keep (``keep=True``) or give back (``False``) the memory this process frees, so that the
    next training step's tensors reuse pages already mapped instead of faulting in fresh ones (see
    the module's docstring). Returns whether glibc took the setting: False where the C library is
    not glibc (then nothing changes)."""
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
    """Returns the heap's free memory to the kernel now (glibc's ``malloc_trim``), whatever the
    setting: memory still in use stays."""
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
