"""Preparing lists of tensors for the multi-tensor kernels (the optimizer steps).

A multi-tensor kernel updates many tensors of one device and dtype in one launch, walking each
as a flat run of ``numel`` elements from its data pointer. That is right for a contiguous tensor,
and for any set of tensors that are dense, non-overlapping and share their strides (a transposed
parameter with a gradient and state laid out like it): elementwise, the same memory offset is
the same element in each. A row whose tensors do not share such a layout (a transposed
parameter with a contiguous gradient) is staged: the kernel works on contiguous copies, and the
copies of the tensors it wrote are copied back afterwards.

Complex tensors are walked through their real views: every update rule here is elementwise on
real and imaginary parts alike, as torch.optim's own implementations treat them.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Sequence

import torch

from fastml import _backend

try:  # is_non_overlapping_and_dense: a Python helper in torch._prims_common, stable since 2.0
    from torch._prims_common import is_non_overlapping_and_dense as _dense
except ImportError:  # pragma: no cover - older torch: only contiguous rows go direct
    def _dense(t: torch.Tensor) -> bool:
        return t.is_contiguous()


_numel = torch.Tensor.numel
_shape = operator.attrgetter("shape")


def bucket_by_device_and_dtype(tensors: Sequence[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of ``tensors`` per (device, dtype), in first-seen order: one launch per bucket.
    A complex tensor goes with the real tensors of its parts' dtype (kernels take its real view)."""
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.device, t.dtype.to_real()), []).append(i)
    return buckets


def walkable(row: Sequence[torch.Tensor]) -> bool:
    """Whether a kernel may walk every tensor of ``row`` as one flat run from its data pointer,
    element i of one being element i of the others."""
    if all(t.is_contiguous() for t in row):
        return True
    first = row[0]
    return _dense(first) and all(t.stride() == first.stride() and _dense(t) for t in row[1:])


def _overlaps(t: torch.Tensor) -> bool:
    """Whether elements of ``t`` share memory (an expanded gradient, as ``grad.expand``
    leaves it): a staged copy could not be written back into it (``copy_`` refuses), while
    torch's in-place ops read it, and zero it, as the course's loop does."""
    return not t.is_contiguous() and torch._debug_has_internal_overlap(t) == 1  # (1: MemOverlap::Yes)


def real_view(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


@contextlib.contextmanager
def staged(columns: Sequence[list[torch.Tensor]], written: Sequence[bool]):
    """Yields ``columns`` (lists of equally many tensors, row i = the i-th of each) with every
    row made walkable: a row that is not gets contiguous copies, and on leaving, the copies in
    the columns flagged ``written`` are copied back into the originals."""
    rows = len(columns[0])
    out = [list(col) for col in columns]
    copies: list[int] = []
    for i in range(rows):
        if not walkable([col[i] for col in columns]):
            copies.append(i)
            for col in out:
                col[i] = col[i].contiguous()
    yield out
    for i in copies:
        for col, original, was_written in zip(out, columns, written):
            if was_written and col[i] is not original[i]:
                original[i].copy_(col[i])


def mark_written(tensors: Sequence[torch.Tensor]) -> None:
    """Bumps the version counters of tensors a kernel wrote through their data pointers, as an
    in-place torch op would: autograd then refuses a backward through a graph that saved one of
    them before the write, instead of silently using the new values."""
    if not tensors:
        return
    try:
        torch.autograd.graph.increment_version(tensors)
    except TypeError:  # torch < 2.4 takes one tensor at a time
        for t in tensors:
            torch.autograd.graph.increment_version(t)


def uniform(*lists: Sequence[torch.Tensor]) -> bool:
    """Whether one launch can take the lists as they are: every tensor contiguous, strided and
    real, of one dtype and on one device, and of its parameter's shape (the common case, checked
    in one cheap pass so that a small model's step is not dominated by its preparation). A
    kernel walks each row's tensors as its parameter's element count: a state tensor of another
    size (a parameter's ``.data`` replaced after its first step) must not reach it."""
    params = lists[0]
    first = params[0]
    dtype, device = first.dtype, first.get_device()
    if dtype.is_complex:
        return False
    shapes = None
    for tensors in lists:
        for t in tensors:
            if t.dtype is not dtype or t.get_device() != device or t.layout is not torch.strided or not t.is_contiguous():
                return False
        if shapes is None:
            shapes = list(map(_shape, tensors))  # (map: the per-tensor step stays in C)
        elif list(map(_shape, tensors)) != shapes:
            return False
    return True


def launches(lists: Sequence[Sequence[torch.Tensor]], written: Sequence[bool], implemented: tuple[str, ...],
             options: tuple, launch):
    """Yields (backend, row indices) per launch of an optimizer step: one per (device, dtype)
    bucket of the rows a kernel can take (a strided parameter whose gradient and state are of
    its dtype and device), then the remaining rows on the reference (which does what torch's ops
    do), with the rows where a tensor's elements overlap in memory (``_overlaps``). A gradient or
    state tensor can differ from its parameter where the parameter's ``.data`` was replaced after
    its first step: ``model.double()`` keeps the optimizer's float32 state (which torch's in-place
    ops then update), a resized parameter keeps its old-sized state (which torch's ops refuse). A
    kernel would walk it as its parameter's dtype and size."""
    params = lists[0]
    kernel_rows, reference_rows = [], []
    for i, p in enumerate(params):
        dtype, device, shape = p.dtype, p.device, p.shape
        same = p.layout == torch.strided and all(
            t.dtype == dtype and t.device == device and t.layout == torch.strided and t.shape == shape
            for t in (column[i] for column in lists[1:]))
        if same and not any(_overlaps(column[i]) for column in lists):
            kernel_rows.append(i)
        else:
            reference_rows.append(i)
    for bucket in bucket_by_device_and_dtype([params[i] for i in kernel_rows]).values():
        rows = [kernel_rows[j] for j in bucket]
        yield choose_backend([[real_view(tensors[i]) for i in rows] for tensors in lists], implemented, options,
                             launch, rows, written), rows
    if reference_rows:
        yield "reference", reference_rows


def scratch_copies(columns: Sequence[Sequence[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """Contiguous copies of an optimizer's lists to time its candidates on, never touching the
    originals: parameters and gradients copied, state lists zeros (a fresh buffer's contents
    are undefined, and denormal garbage would slow one candidate down)."""
    copies = [[t.clone(memory_format=torch.contiguous_format) for t in columns[0]],
              [t.clone(memory_format=torch.contiguous_format) for t in columns[1]]]
    return copies + [[torch.zeros_like(t, memory_format=torch.contiguous_format) for t in col] for col in columns[2:]]


def choose_backend(columns: Sequence[Sequence[torch.Tensor]], implemented: tuple[str, ...], options: tuple, launch,
                   rows: list[int] | None, written: Sequence[bool], key: tuple | None = None) -> str:
    """The backend of one launch over ``columns`` (walkable tensors of one device and dtype): the
    measured choice for the shape class ``key`` (``step_class``, worked out here where not
    given). ``launch(backend, rows, columns, timing)`` runs the step; for timing it runs on
    scratch copies, made once, in its steady state (``timing=True``: no first-step buffer
    initialisation and no gradient reset, which would leave later calls nothing to do). A
    kernel's candidate is timed with what its route adds to every step, the layout check before
    the launch and the version bumps after it (``written``: the columns the step writes), so
    that a step of a few small tensors, where those cost more than the arithmetic, goes to the
    reference's single foreach call."""
    if key is None:
        key = step_class(columns[0], options, sum(map(_numel, columns[0])))
    settings = _backend.settings()
    backend = remembered(key, settings)
    if backend is not None:
        return backend
    scratch = []

    def run(name):
        if not scratch:
            scratch.append(scratch_copies(columns))
        copies = scratch[0]
        if name == "reference":
            launch(name, rows, copies, True)
            return
        uniform(*copies)
        launch(name, rows, copies, True)
        mark_rows_written(copies, written)

    backend = _backend.select(columns[0][0], implemented, key, run)
    if settings is not None:
        _settled[key] = (settings, backend)
    return backend


def step_class(params: Sequence[torch.Tensor], options: tuple, elements: int) -> tuple:
    """The shape class of an optimizer step over ``params`` (the measured choice's key): the op and
    ``options``, the thread count, the first tensor's dtype and device, the tensor count and
    ``elements``, their element count."""
    first = params[0]
    return (options[0], "step", torch.get_num_threads(), first.dtype, first.device, len(params), elements,
            *options[1:])


def remembered(key: tuple, settings: tuple | None) -> str | None:
    """choose_backend's answer for shape class ``key``, if it was given under ``settings``
    (``_backend.settings()``), else None."""
    settled = _settled.get(key)
    return settled[1] if settled is not None and settled[0] == settings else None


_settled: dict[tuple, tuple[tuple, str]] = {}
"""choose_backend's answers, by shape class, beside the settings they were given under
(_backend.settings). A step's fixed cost decides a small model's: select's own lookup costs
~1.7 us (4.6 us inside a softmax regression's training loop, on Zen 5), against ~0.4 us for this
check, and torch's whole for-loop step over that model's 2 tensors takes ~6 us."""


def mark_rows_written(lists: Sequence[Sequence[torch.Tensor]], written: Sequence[bool], rows=None) -> None:
    """mark_written for the tensors of the lists flagged ``written`` (all, or those in ``rows``)."""
    tensors = []
    for column, was_written in zip(lists, written):
        if was_written:
            tensors.extend(column if rows is None else [column[i] for i in rows])
    mark_written(tensors)


@contextlib.contextmanager
def columns_for(backend: str, lists: Sequence[Sequence[torch.Tensor]], rows: list[int], written: Sequence[bool]):
    """Yields the ``rows`` of each of ``lists`` as ``backend`` takes them. The reference gets the
    tensors as they are (its torch ops handle any layout and dtype). A kernel gets real views,
    staged where a row is not walkable; afterwards the tensors of the lists flagged ``written``
    have their version counters bumped (mark_written)."""
    if backend == "reference":
        yield [[tensors[i] for i in rows] for tensors in lists]
        return
    with staged([[real_view(tensors[i]) for i in rows] for tensors in lists], written) as columns:
        yield columns
    mark_rows_written(lists, written, rows)


def settled(params: Sequence[torch.Tensor], options: tuple) -> tuple[tuple, str | None]:
    """The shape class of an optimizer step over ``params`` with ``options`` (see
    choose_backend), and the backend the measured choice settled it on under the present
    settings (None: not yet). A caller that finds "reference" may run the reference's step on
    its lists as they are, without run_launches (a small model's step is mostly fixed costs);
    otherwise it hands the pair to run_launches, which then need not look it up again."""
    key = step_class(params, options, sum(map(_numel, params)))
    return key, remembered(key, _backend.settings())


def run_launches(lists: Sequence[Sequence[torch.Tensor]], written: Sequence[bool], implemented: tuple[str, ...],
                 options: tuple, launch, choice: tuple[tuple, str | None] | None = None) -> None:
    """The launches of one optimizer step over ``lists`` (params, grads, then state lists, one
    entry per tensor): ``launch(backend, rows, columns, timing=False)`` runs each, ``columns``
    being the rows' tensors of each list as the backend takes them, and ``rows`` their indices
    (None: all of them, passed through without any per-row work). Each launch's backend is the
    measured choice for ``options`` (the op's name, then what changes its cost; see
    choose_backend); ``choice``: what ``settled`` said of the lists, if the caller asked it. The
    tensors of the lists flagged ``written`` have their version counters bumped after a kernel's
    launch.

    A step whose shape class has settled on the reference runs it on the lists as they are, with
    no layout check: torch's ops take any mix of layouts, dtypes and devices."""
    key, backend = settled(lists[0], options) if choice is None else choice
    if backend == "reference":
        launch(backend, None, lists, False)
        return
    if uniform(*lists):
        if backend is None:
            backend = choose_backend(lists, implemented, options, launch, None, written, key)
        launch(backend, None, lists, False)
        if backend != "reference":
            mark_rows_written(lists, written)
        return
    for backend, rows in launches(lists, written, implemented, options, launch):
        with columns_for(backend, lists, rows, written) as columns:
            launch(backend, rows, columns, False)


def pick(values: Sequence, rows: list[int] | None) -> list:
    """The entries of a per-tensor list for the rows of a launch (all of them for None)."""
    return list(values) if rows is None else [values[i] for i in rows]
