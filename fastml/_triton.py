"""Shared helpers for the Triton launchers (fastml/ops/*/triton_impl.py).

Two regimes: on a CUDA GPU the launchers autotune over a handful of configs and size persistent
grids by the number of SMs; under ``TRITON_INTERPRET=1`` (CPU tensors, how CI runs the kernels)
every program runs in Python with numpy, so they take one config with large blocks and launch
few programs.

Importing this module imports triton; fastml imports it only when the triton backend is used.
"""

from __future__ import annotations

import functools
import struct

import torch
import triton
import triton.language as tl

from fastml import _backend

# Persistent kernels launch this many programs per SM (programs beyond what fits queue up).
PROGRAMS_PER_SM = 4
# Programs a persistent kernel launches under the interpreter: more than one, so the
# per-program partials and their reduction are exercised, yet few, since each runs in Python.
INTERPRETER_PROGRAMS = 3
# Whether tl.dot takes float64 operands on the GPU; when False the kernels fall back to a
# broadcast multiply + tl.sum (always exact, slower).
FP64_DOT = True


def interpreted() -> bool:
    """True when kernels run through the Triton interpreter (on CPU tensors)."""
    return _backend.triton_interpreted()


def acc_dtype(dtype: torch.dtype):
    """Triton dtype to accumulate ``dtype`` values in: float64 for float64, else float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def torch_acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_precision(operand: torch.dtype) -> str:
    """``input_precision`` for a tl.dot whose operands are ``operand`` values.

    float32 operands follow torch: tf32 only where torch.backends.cuda.matmul.allow_tf32 is set.
    float32 operands that were upcast from a half type lose nothing in tf32 (its 10-bit mantissa
    holds theirs), so kernels that upcast half inputs ask through ``upcast_dot_precision``.
    """
    if operand == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpreted():
        return "tf32"
    return "ieee"


def upcast_dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for a tl.dot on float32 values upcast from ``dtype`` inputs."""
    if dtype in (torch.float16, torch.bfloat16) and not interpreted():
        return "tf32"
    return dot_precision(torch.float32 if dtype != torch.float64 else dtype)


def use_dot(dtype: torch.dtype) -> bool:
    """Whether kernels may use tl.dot on ``dtype`` operands (else broadcast multiply + sum)."""
    return dtype != torch.float64 or FP64_DOT or interpreted()


# Host-side integer helpers in plain Python: triton.cdiv and triton.next_power_of_2 are
# ConstexprFunction objects in recent Triton, about 3 µs a call through their dispatch, paid
# several times per launch (a sixth of a small cross-entropy call's host time on a 2-core CPU).
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers, b > 0."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def block(n: int, lo: int, hi: int) -> int:
    """A power-of-two block covering ``n`` where possible, clamped to [lo, hi]."""
    return max(lo, min(hi, next_pow2(n)))


def prev_pow2(n: int) -> int:
    """Largest power of two <= n (1 for n < 1)."""
    return 1 << (max(1, int(n)).bit_length() - 1)


def size_bucket(n: int) -> int:
    """Autotune key for a size: its power-of-two ceiling (one tuning per octave, not per size)."""
    return next_pow2(n)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Number of SMs on ``device`` (a CUDA device), 1 for the interpreter."""
    if device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def persistent_programs(work_items: int, device: torch.device, per_sm: int = PROGRAMS_PER_SM) -> int:
    """Programs for a persistent grid over ``work_items`` blocks (at least 1)."""
    cap = INTERPRETER_PROGRAMS if interpreted() or device.type != "cuda" else num_sms(device) * per_sm
    return max(1, min(work_items, cap))


def split_float(value: float) -> tuple[float, float]:
    """(hi, lo) float32 numbers with hi + lo == value to about 48 bits.

    Triton passes Python floats as float32 scalars; kernels working in float64 rebuild a double
    from the pair (``hi.to(tl.float64) + lo.to(tl.float64)``) instead of losing its low bits.
    A value float32 cannot hold (inf, NaN, beyond 3e38) goes whole in hi, with lo 0 (not the
    NaN that inf - inf would give).
    """
    value = float(value)
    if not abs(value) < 3.0e38:
        return value, 0.0
    hi = struct.unpack("f", struct.pack("f", value))[0]
    return hi, value - hi


def cfg(num_warps: int, num_stages: int, **meta) -> triton.Config:
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


_BEST_CONFIGS: dict = {}


def launch_tuned(tuner, kernel, grid, key: tuple, *args, **meta) -> None:
    """Launches ``kernel`` with the config ``tuner`` (its triton.autotune wrapper) picked for
    ``key``: the first call per key benchmarks through the autotuner, later calls launch the
    kernel directly with the remembered config (skipping the autotuner's per-call overhead)."""
    best = _BEST_CONFIGS.get((id(tuner), key))
    if best is None:
        tuner[grid](*args, **meta)
        config = tuner.best_config
        _BEST_CONFIGS[(id(tuner), key)] = dict(config.kwargs, num_warps=config.num_warps,
                                               num_stages=config.num_stages)
    else:
        kernel[grid](*args, **meta, **best)


# --------------------------------------------------------------------------------------------
# Deterministic reduction of per-program partials, shared by the persistent kernels.
# --------------------------------------------------------------------------------------------


@triton.jit
def reduce_partials_kernel(
    part_ptr,     # (P, C) per-program partials (row stride stride_p), accumulation dtype
    grad_a_ptr,   # (SPLIT,) first gradient output, columns [0, SPLIT)
    grad_b_ptr,   # (G - SPLIT,) second gradient output, columns [SPLIT, G)
    loss_ptr,     # () scalar output: factor_loss * the sum of every column in [G, C)
    P, stride_p, C, G, SPLIT, count,
    MEAN: tl.constexpr,        # factors: 2 / count and 1 / count; else 2 and 1
    DO_A: tl.constexpr, DO_B: tl.constexpr, DO_LOSS: tl.constexpr,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Sums partials over programs in a fixed order. Programs 0..k-1 own BLOCK_C gradient
    columns each; the last program sums the loss columns into one scalar."""
    pid = tl.program_id(0)
    if MEAN:
        inv = 1.0 / (tl.zeros([], ACC) + count)
    else:
        inv = tl.full([], 1.0, ACC)
    offs_p = tl.arange(0, BLOCK_P)
    if pid == tl.num_programs(0) - 1:
        if DO_LOSS:
            total = tl.zeros([BLOCK_P, BLOCK_C], ACC)
            for c0 in range(G, C, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                for p0 in range(0, P, BLOCK_P):
                    rows = p0 + offs_p
                    mask = (rows[:, None] < P) & (cols[None, :] < C)
                    total += tl.load(part_ptr + rows.to(tl.int64)[:, None] * stride_p + cols[None, :],
                                     mask=mask, other=0)
            loss = tl.sum(tl.sum(total, axis=1), axis=0) * inv
            tl.store(loss_ptr, loss.to(loss_ptr.dtype.element_ty))
    else:
        cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
        acc = tl.zeros([BLOCK_P, BLOCK_C], ACC)
        for p0 in range(0, P, BLOCK_P):
            rows = p0 + offs_p
            mask = (rows[:, None] < P) & (cols[None, :] < G)
            acc += tl.load(part_ptr + rows.to(tl.int64)[:, None] * stride_p + cols[None, :], mask=mask, other=0)
        grad = tl.sum(acc, axis=0) * (2.0 * inv)
        if DO_A:
            tl.store(grad_a_ptr + cols, grad.to(grad_a_ptr.dtype.element_ty), mask=cols < SPLIT)
        if DO_B:
            tl.store(grad_b_ptr + (cols - SPLIT), grad.to(grad_b_ptr.dtype.element_ty),
                     mask=(cols >= SPLIT) & (cols < G))


def reduce_partials(part: torch.Tensor, grad_columns: int, split: int, count: int, mean: bool,
                    grad_a: torch.Tensor | None, grad_b: torch.Tensor | None, loss: torch.Tensor | None) -> None:
    """Writes grad_a = f·Σ_p part[p, :split], grad_b = f·Σ_p part[p, split:grad_columns] with
    f = 2/count (mean) or 2 (sum), and loss = Σ_p Σ part[p, grad_columns:] / count (or · 1).

    One launch, fixed summation order (deterministic). count must be positive when mean.
    """
    P, C = part.shape
    if interpreted():
        # Under the interpreter each launch costs milliseconds of Python; torch sums the
        # partials here in the same fixed order for a fraction of that.
        _reduce_partials_torch(part, grad_columns, split, count, mean, grad_a, grad_b, loss)
        return
    need_grads = grad_a is not None or grad_b is not None
    first = 0 if grad_a is not None else split
    block_c = 64
    block_p = block(P, 1, 64)
    # Gradient programs cover columns [first, G); index them from 0 by offsetting the buffer.
    n_grad_programs = cdiv(grad_columns - first, block_c) if need_grads else 0
    sub = part[:, first:] if first else part
    reduce_partials_kernel[(n_grad_programs + 1,)](
        sub, grad_a, grad_b, loss, P, C, C - first, grad_columns - first, split - first, count,
        MEAN=mean, DO_A=grad_a is not None, DO_B=grad_b is not None, DO_LOSS=loss is not None,
        ACC=acc_dtype(part.dtype), BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4)


@triton.jit
def mm(a, b, acc, PREC: tl.constexpr, USE_DOT: tl.constexpr):
    """acc + a @ b for blocks a (M, K), b (K, N), acc (M, N) in the accumulation dtype.

    With USE_DOT a tl.dot (a and b of one dtype; every dimension >= 16 on the GPU); otherwise
    a broadcast multiply + tl.sum, exact in any dtype (keep M·K·N small).
    """
    if USE_DOT:
        out = tl.dot(a, b, acc, input_precision=PREC, out_dtype=acc.dtype)
    else:
        out = acc + tl.sum(a.to(acc.dtype)[:, :, None] * b.to(acc.dtype)[None, :, :], axis=1)
    return out


def _reduce_partials_torch(part, grad_columns, split, count, mean, grad_a, grad_b, loss):
    inv = 1.0 / count if mean else 1.0
    if grad_a is not None or grad_b is not None:
        grads = part[:, :grad_columns].sum(0) * (2.0 * inv)
        if grad_a is not None:
            grad_a.copy_(grads[:split])
        if grad_b is not None:
            grad_b.copy_(grads[split:])
    if loss is not None:
        loss.copy_(part[:, grad_columns:].sum() * inv)


# --------------------------------------------------------------------------------------------
# Multi-tensor launches (the optimizer steps): one launch updates a list of tensors.
# --------------------------------------------------------------------------------------------

TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64,
             torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# Elements per block of a multi-tensor launch: on the GPU one program per block (2048 float32
# = 8 KB per array in flight per program); under the interpreter a few programs loop over
# large blocks, since each block costs Python time.
MULTI_TENSOR_BLOCK = 2048
INTERPRETER_MULTI_TENSOR_BLOCK = 1024


def multi_tensor_table(columns, sizes, per_tensor_floats, scalars, device) -> torch.Tensor:
    """Everything a multi-tensor kernel reads besides the tensors themselves, in one int64 tensor
    on ``device`` (one host-to-device copy per launch):

    rows 0..len(columns)-1, T entries each: data pointers (``columns``: lists of T tensors);
    then ``sizes`` (T element counts); then each list of ``per_tensor_floats`` (T floats each)
    and finally ``scalars`` (floats), both as float64 bit patterns (``load_float``).
    """
    ints = torch.tensor([t.data_ptr() for col in columns for t in col] + list(sizes), dtype=torch.int64)
    floats = torch.tensor([x for row in per_tensor_floats for x in row] + list(scalars), dtype=torch.float64)
    return torch.cat([ints, floats.view(torch.int64)]).to(device, non_blocking=True)


@functools.lru_cache(maxsize=64)
def block_map(sizes: tuple[int, ...], block_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tensor of each block (int32), first element of each block within its tensor (int64)) for
    tensors of ``sizes`` cut into blocks of ``block_size``; cached, since a parameter group's
    sizes stay the same from step to step."""
    tensor_of, start_of = [], []
    for t, n in enumerate(sizes):
        blocks = cdiv(n, block_size)
        tensor_of.extend([t] * blocks)
        start_of.extend(range(0, blocks * block_size, block_size))
    return (torch.tensor(tensor_of, dtype=torch.int32, device=device),
            torch.tensor(start_of, dtype=torch.int64, device=device))


def multi_tensor_launch(tensors) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(block → tensor map, block → first element map, programs, block size) of one
    multi-tensor launch over ``tensors``: one program per block on the GPU, a few looping ones
    under the interpreter."""
    block = INTERPRETER_MULTI_TENSOR_BLOCK if interpreted() else MULTI_TENSOR_BLOCK
    block_tensor, block_start = block_map(tuple(t.numel() for t in tensors), block, tensors[0].device)
    n_blocks = block_tensor.numel()
    programs = min(n_blocks, INTERPRETER_PROGRAMS) if interpreted() else n_blocks
    return block_tensor, block_start, max(1, programs), block


@triton.jit
def load_pointer(table_ptr, row, count, t, DTYPE: tl.constexpr):
    """The data pointer of tensor ``t`` in pointer row ``row`` of a multi_tensor_table."""
    return tl.load(table_ptr + row * count + t).to(tl.pointer_type(DTYPE))


@triton.jit
def load_float(table_ptr, index):
    """The float stored (as float64 bits) at ``index`` of a multi_tensor_table."""
    return tl.load(table_ptr + index).to(tl.float64, bitcast=True)


@triton.jit
def multi_tensor_block(table_ptr, block_tensor_ptr, block_start_ptr, sizes_at, blk, BLOCK: tl.constexpr):
    """(tensor, element offsets, mask) of block ``blk`` of a multi-tensor launch: the tensor it
    belongs to (block_map), BLOCK offsets from the block's first element, and which of them lie
    inside the tensor (its size is entry ``sizes_at`` + tensor of the table)."""
    t = tl.load(block_tensor_ptr + blk)
    offs = tl.load(block_start_ptr + blk) + tl.arange(0, BLOCK)
    return t, offs, offs < tl.load(table_ptr + sizes_at + t)
