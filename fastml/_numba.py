"""Shared pieces of the numba backend (fastml/ops/*/numba_impl.py): compile options, tensor views,
thread counts and the register-blocked loops the linear kernels share (csrc/linear_tiles.h's twins).

Imported only when the numba backend is first used; ``import fastml`` never imports numba.

Tensors cross into numba as numpy views of contiguous CPU tensors (no copy). The launchers
allocate every output with torch, and pass an empty array plus a flag for an absent tensor (a
bias of None), so each kernel is compiled once per dtype, never per shape or per option.

Floating-point rules: kernels compile with ``fastmath=False``, so NaN / Inf propagate as in torch
and each sum runs in program order. The one exception is the dot product (``dot_row``,
``dot_rows4``): it carries only LLVM's ``reassoc`` flag, which lets the compiler split the sum
into SIMD lanes, the licence ``#pragma omp simd reduction`` gives the C++ kernels. Without it
numba (whose SLP vectorizer is off) runs the dot one element at a time, ~6x slower. ``reassoc``
alone leaves NaN / Inf / signed-zero semantics alone (those are the nnan / ninf / nsz flags).

Work is split into a fixed number of contiguous chunks, one per thread (``threads_for``); each
chunk writes its own partial sums, which are combined in a fixed order: results are
deterministic for a given thread count.

Compiled code is cached on disk (``cache=True``) next to each module. numba invalidates a cached
kernel when its own file changes, not when a helper here does: after editing this file, delete
the ``*.nbi`` / ``*.nbc`` files under fastml/ops/*/__pycache__/.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

BLOCK_ROWS = 64  # rows of x per block: the block's x and predictions stay in L1 / L2
MAX_PARTIAL_BYTES = 32 << 20  # per-thread gradient copies up to this in all; beyond, split outputs
TWO_LEVEL_ELEMENTS = 8192  # gradients this small are summed per block, then per thread
WORK_PER_THREAD = 32 * 1024  # multiply-adds worth waking a thread for
ELEMENTS_PER_THREAD = 16 * 1024  # optimizer-updated elements worth waking a thread for (csrc/multi_tensor.h)
SPAN_ALIGN = 16  # multi-tensor chunk boundaries: a multiple of this many elements into a tensor

# Every kernel: strict IEEE arithmetic, no bounds checks, numpy's rules for division by zero.
jit = functools.partial(numba.njit, cache=True, fastmath=False, nogil=True, error_model="numpy")

# Kernels with a numba.prange loop over chunks. Only the prange becomes a parallel loop: array
# expressions (np.zeros, acc[:] = 0) stay ordinary loops, which also keeps compile time down.
pjit = functools.partial(jit, parallel={"prange": True, "comprehension": False, "reduction": False,
                                        "inplace_binop": False, "setitem": False, "numpy": False,
                                        "stencil": False, "fusion": False})

# Dot products only: reassociation for SIMD lanes, nothing else (see the module docstring).
# inline="never" keeps the flag: numba-level inlining would recompile the body with the caller's
# strict flags; LLVM still inlines the compiled function.
_dot_jit = functools.partial(numba.njit, cache=True, fastmath={"reassoc"}, nogil=True,
                             error_model="numpy", inline="never")


# ---------------------------------------------------------------- Python side: views, threads


def view(t: torch.Tensor) -> np.ndarray:
    """numpy view (no copy) of a contiguous CPU tensor; writes through it land in ``t``.
    (A strided one would still give right results, through a slower, separately compiled kernel.)"""
    return (t.detach() if t.requires_grad else t).numpy()


def flat(t: torch.Tensor) -> np.ndarray:
    """1-D numpy view of a contiguous tensor of any rank (a 0-dim one becomes 1 element)."""
    return t.detach().view(-1).numpy()


@functools.cache
def absent(dtype: torch.dtype, ndim: int) -> np.ndarray:
    """Placeholder for an absent tensor: empty, of the kernel's dtype and rank."""
    return np.empty((0,) * ndim, dtype=torch.empty((), dtype=dtype).numpy().dtype)


def view_or_absent(t: torch.Tensor | None, dtype: torch.dtype, ndim: int) -> np.ndarray:
    return absent(dtype, ndim) if t is None else view(t)


def addresses(tensors) -> np.ndarray:
    """The tensors' data pointers, a multi-tensor kernel's table (array_at reads them)."""
    return np.array([t.data_ptr() for t in tensors], dtype=np.int64)


def sizes(tensors) -> np.ndarray:
    """The tensors' element counts, as int64."""
    return np.array([t.numel() for t in tensors], dtype=np.int64)


def threads_for(work: int, per_thread: int = WORK_PER_THREAD) -> int:
    """Chunks (= threads) for ``work`` multiply-adds (or other units, ``per_thread`` of them
    worth a thread): torch's thread count, fewer for small work (waking a team costs
    microseconds, which dominates the course's batch of 10 rows). Also sets numba's thread
    count for the calling thread, so each chunk gets one thread."""
    requested = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    chunks = max(1, min(requested, work // per_thread))
    numba.set_num_threads(chunks)
    return chunks


def split_outputs(threads: int, o: int, d: int, itemsize: int) -> bool:
    """Whether per-thread (o × d) gradient copies would be too large, so that threads split the
    outputs between them instead of the rows."""
    return threads > 1 and threads * o * d * itemsize > MAX_PARTIAL_BYTES


# ---------------------------------------------------------------- jitted building blocks


@intrinsic
def fma(typingctx, a, b, c):
    """a · b + c rounded once (LLVM's llvm.fma), for three floats of one type: what torch's CPU
    kernels form with a fused multiply-add (addcmul, add with alpha), where rounding the product
    first can differ in the last bit, and by much more after a cancelling sum."""
    if not (isinstance(a, types.Float) and a == b == c):
        return None

    def codegen(context, builder, signature, args):
        t = args[0].type
        fused = builder.module.declare_intrinsic("llvm.fma", [t], ir.FunctionType(t, [t, t, t]))
        return builder.call(fused, args)

    return a(a, b, c), codegen


@intrinsic
def _address_as_pointer(typingctx, address, like):
    """A typed pointer to ``like``'s dtype at the integer ``address`` (a tensor's data_ptr)."""
    pointer = types.CPointer(like.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer))

    return pointer(address, like), codegen


@jit
def array_at(address, count, like):
    """1-D array of ``count`` elements of ``like``'s dtype at ``address``: how the multi-tensor
    kernels reach each tensor of a list given as a table of data pointers (one compilation for
    any number of tensors, where a tuple of arrays would compile once per length)."""
    return numba.carray(_address_as_pointer(address, like), (count,))


@jit
def tensor_starts(sizes):
    """starts[t] = first element of tensor t in the concatenation of all; starts[-1] = total."""
    starts = np.zeros(sizes.shape[0] + 1, np.int64)
    for t in range(sizes.shape[0]):
        starts[t + 1] = starts[t] + sizes[t]
    return starts


@jit
def tensor_holding(starts, i):
    """The tensor holding element ``i`` of the concatenation (the last with start <= i)."""
    return np.searchsorted(starts, i, side="right") - 1


@jit
def chunk_pieces(starts, chunks, c):
    """The pieces of chunk ``c`` (of ``chunks``) of the concatenation of tensors starting at
    ``starts`` (tensor_starts): rows (tensor, begin, end), [begin, end) nonempty and counted
    from the tensor's first element. The multi-tensor kernels' walk, shared."""
    lo, hi = span_boundary(starts, chunks, c), span_boundary(starts, chunks, c + 1)
    count = starts.shape[0] - 1
    first = tensor_holding(starts, lo)
    pieces = np.empty((max(0, count - first), 3), np.int64)
    n = 0
    t = first
    while t < count and starts[t] < hi:
        begin, end = max(lo, starts[t]) - starts[t], min(hi, starts[t + 1]) - starts[t]
        if begin < end:
            pieces[n, 0], pieces[n, 1], pieces[n, 2] = t, begin, end
            n += 1
        t += 1
    return pieces[:n]


@jit
def span_boundary(starts, chunks, c):
    """Start of chunk ``c`` of the concatenation split into ``chunks`` (csrc/multi_tensor.h's
    twin): an even split, moved down to a multiple of SPAN_ALIGN from its tensor's start so that
    two threads never write the same cache line."""
    total = starts[-1]
    if c >= chunks:
        return total
    c, chunks = np.int64(c), np.int64(chunks)
    b = total // chunks * c + min(c, total % chunks)
    t = tensor_holding(starts, b)
    return starts[t] + (b - starts[t]) // SPAN_ALIGN * SPAN_ALIGN


@jit
def split_range(n, parts, p):
    """Part ``p`` of [0, n) split into ``parts`` contiguous ranges differing in length by at most 1."""
    n, parts, p = np.int64(n), np.int64(parts), np.int64(p)  # a prange index may be unsigned
    base, extra = n // parts, n % parts
    begin = p * base + min(p, extra)
    return begin, begin + base + (1 if p < extra else 0)


@_dot_jit
def dot_row(x, i, w, j):
    """dot(x[i], w[j]) in x's dtype."""
    acc = x.dtype.type(0)
    for k in range(x.shape[1]):
        acc += x[i, k] * w[j, k]
    return acc


@_dot_jit
def dot_rows4(x, i, w, j):
    """dot(x[i + r], w[j]) for r < 4: four rows share each loaded weight element."""
    a0 = a1 = a2 = a3 = x.dtype.type(0)
    for k in range(x.shape[1]):
        wk = w[j, k]
        a0 += x[i, k] * wk
        a1 += x[i + 1, k] * wk
        a2 += x[i + 2, k] * wk
        a3 += x[i + 3, k] * wk
    return a0, a1, a2, a3


@jit
def dot_block(x, r0, rows, w, col0, cols, bias, has_bias, out, out_r0):
    """out[out_r0 + r, c] = x[r0 + r] · w[col0 + c] + bias[col0 + c] for r < rows, c < cols.

    x (n, d), w (o, d), bias (o,) (ignored unless has_bias), out (≥ out_r0 + rows, cols)."""
    zero = x.dtype.type(0)
    r = 0
    while r + 4 <= rows:
        for c in range(cols):
            b = bias[col0 + c] if has_bias else zero
            a0, a1, a2, a3 = dot_rows4(x, r0 + r, w, col0 + c)
            out[out_r0 + r, c] = a0 + b
            out[out_r0 + r + 1, c] = a1 + b
            out[out_r0 + r + 2, c] = a2 + b
            out[out_r0 + r + 3, c] = a3 + b
        r += 4
    while r < rows:
        for c in range(cols):
            b = bias[col0 + c] if has_bias else zero
            out[out_r0 + r, c] = dot_row(x, r0 + r, w, col0 + c) + b
        r += 1


@jit
def accumulate_outer(coef, c_r0, c_col0, x, x_r0, rows, acc):
    """acc[c] += Σ_r coef[c_r0 + r, c_col0 + c] · x[x_r0 + r] for every c < acc.shape[0]: the
    weight gradient of a row block. acc (cols, d), coef (·, ·), x (n, d)."""
    cols, d = acc.shape
    r = 0
    while r + 4 <= rows:
        x0, x1, x2, x3 = x[x_r0 + r], x[x_r0 + r + 1], x[x_r0 + r + 2], x[x_r0 + r + 3]
        for c in range(cols):
            c0 = coef[c_r0 + r, c_col0 + c]
            c1 = coef[c_r0 + r + 1, c_col0 + c]
            c2 = coef[c_r0 + r + 2, c_col0 + c]
            c3 = coef[c_r0 + r + 3, c_col0 + c]
            ac = acc[c]
            for k in range(d):
                ac[k] += c0 * x0[k] + c1 * x1[k] + c2 * x2[k] + c3 * x3[k]
        r += 4
    while r < rows:
        xr = x[x_r0 + r]
        for c in range(cols):
            cr = coef[c_r0 + r, c_col0 + c]
            ac = acc[c]
            for k in range(d):
                ac[k] += cr * xr[k]
        r += 1


@jit
def reduce_partials(parts, scale, out):
    """out[i] = scale · Σ_t parts[t, i], the parts summed in a fixed order. parts (P, count),
    out (count,), scale in out's dtype. Serial: at most MAX_PARTIAL_BYTES to read, small beside
    the work that made the parts, and one parallel loop less to compile."""
    nparts, count = parts.shape
    out[:] = 0
    for t in range(nparts):
        for i in range(count):
            out[i] += parts[t, i]
    for i in range(count):
        out[i] *= scale
