"""Large CPU outputs on memory recycled from the previous call, instead of fresh pages.

glibc's malloc hands out every block over its largest mmap threshold (32 MiB on 64-bit:
DEFAULT_MMAP_THRESHOLD_MAX) as fresh pages from the kernel and returns them on free. Each page
then faults and is zeroed on first touch: on a 2-core Zen 3 VM, filling a fresh 64 MiB tensor
took 29 ms where refilling a kept one took 4.5 ms (6.6x); below 32 MiB, in a loop that frees and
makes one block, the two cost the same (where a step frees more at once, glibc trims the heap's
top back to the kernel too: fastml/_memory.py's ``keep_freed_memory`` stops that). A
training step that makes a 411 MB weight gradient (VGG's 25088 -> 4096 layer) and drops it at
``zero_grad(set_to_none=True)`` pays that every step.

``empty`` keeps, per shape and dtype, the storage it handed out last. When that storage is free
again, the next request gets it back; otherwise a fresh one is made and kept instead. Free means:
no tensor, view or saved tensor holds it (its use count is ours alone), nobody holds its Python
storage object (``t.untyped_storage()`` returns the very object kept here, which adds nothing to
the use count), and it was never moved to shared memory (``share_memory_``, torch.multiprocessing:
another process's tensor counts nowhere here). So a gradient held in ``.grad`` is
never written, and memory held here is at most one tensor per shape: what the caller's loop
held a moment ago. ``release`` drops it all (public as ``fastml.empty_cache``; ``unpatch`` calls
it).

A tensor made here is an ordinary tensor with its own TensorImpl: autograd's AccumulateGrad,
which checks the tensor's use count, not the storage's, keeps it as ``.grad`` without a copy.
"""

from __future__ import annotations

import math
import sys
import threading

import torch

MIN_BYTES = 32 << 20
"""Smaller blocks come from malloc's heap, reused without faults: nothing to gain below this."""
MAX_KEPT = 32  # shapes kept at once (oldest dropped first): a model's large layers, not every shape it saw

_kept: dict[tuple, torch.UntypedStorage] = {}
_lock = threading.Lock()
_use_count = getattr(torch._C, "_storage_Use_Count", None)  # private in torch: without it, nothing is kept


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
          strides: tuple[int, ...] | None = None) -> torch.Tensor:
    """An uninitialised tensor, contiguous or of the given dense ``strides`` (a permutation of a
    contiguous layout: channels-last), on recycled memory where it is large and on the CPU. Never
    a view: autograd lets a custom Function's output be changed in place only if it is not one."""
    nbytes = math.prod(shape) * dtype.itemsize
    if torch.device(device).type != "cpu" or nbytes < MIN_BYTES or _use_count is None:
        if strides is None:
            return torch.empty(shape, dtype=dtype, device=device)
        return torch.empty_strided(shape, strides, dtype=dtype, device=device)
    key = (tuple(shape), dtype)
    with _lock:
        storage, control = _kept.pop(key, None), object()  # both locals: see _free
        if storage is None or not _free(storage, control):
            storage = torch.empty(shape, dtype=dtype).untyped_storage()
        _kept[key] = storage  # (re)inserted last: the most recently used
        while len(_kept) > MAX_KEPT:
            del _kept[next(iter(_kept))]
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape, strides if strides is not None else ())


def _free(storage: torch.UntypedStorage, control: object) -> bool:
    """Whether nothing but the caller's one reference (popped from ``_kept``) reaches ``storage``:
    ``control``, a fresh object the caller passes the same way, has exactly the references a free
    storage has (the caller's, this frame's, getrefcount's, and any a frame-evaluation hook such as
    torch.compile's keeps of the frames' locals)."""
    return (_use_count(storage._cdata) == 1 and sys.getrefcount(storage) == sys.getrefcount(control)
            and not storage.is_shared())


def release() -> int:
    """Drops every kept storage (memory still used by a tensor stays with that tensor); returns
    the bytes no longer kept."""
    with _lock:
        freed = sum(storage.nbytes() for storage in _kept.values())
        _kept.clear()
    return freed


def kept_bytes() -> int:
    with _lock:
        return sum(storage.nbytes() for storage in _kept.values())
