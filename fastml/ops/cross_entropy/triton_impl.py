"""Softmax cross-entropy rows in Triton; signatures and semantics as in reference.py.

One kernel cuts the logits into tiles of BLOCK_M rows, one program per tile on a 1-D grid, and
walks the classes in blocks of BLOCK_C (so any C fits, 128256 included). BLOCK_C covers a row
where it can and BLOCK_M fills the rest of the tile with rows, so a small C (10 classes) still
gives full tiles. Each row takes two sweeps:

1. an online log-sum-exp: each row keeps a running maximum and its Σ exp(z - max), rescaled
   when a block raises the maximum. With the gradient wanted, the same sweep sums the row's
   coefficients A = Σ_c a_c.
2. one sweep that writes grad = s · (A · softmax(z) - a) and sums the loss terms. Every lane
   loads its logits before it stores their gradient, with the same layout in both sweeps, so grad
   may be the logits themselves (in place).

An index target without label smoothing needs only its own logit for the loss: without the
gradient, the second sweep is one load per row.

Arithmetic runs in float32 for float16 / bfloat16 / float32 logits and in float64 for float64
ones (ACC), rounded once on each store. An ignored row (index target equal to ignore_index) gets
loss 0 and a gradient of exact zeros, whatever its scale (torch's gradient, also for a "mean"
whose rows are all ignored), except NaN where its log-sum-exp is not finite, as torch's: so
with the gradient wanted its logits are read in the first sweep, and otherwise never.

No autotuning: the tile follows from the shape, and an autotuner's timing runs would overwrite
the logits of an in-place call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastml import _triton as tt
from fastml.ops.cross_entropy import reference

__all__ = ["rows", "target_total"]

# Elements per tile (BLOCK_M · BLOCK_C), also the widest class block. On the GPU 1024: 4 per
# thread of 8 warps. Each thread also holds a dozen per-row values for each of its rows, so more
# elements per thread cost registers fast in many-row tiles: at 4, float32 / half variants compile
# (sm_90) to at most ~80 registers, float64 ones to ~80 (one row per tile) to ~160 (many rows).
# Under the interpreter small tiles, so that the tests' rows span several class blocks and their
# batches several programs, exercising every mask.
TILE = 1024
ELEMENTS_PER_THREAD = 4
INTERPRETER_TILE = 256
INTERPRETER_MAX_BLOCK_C = 128
MIN_BLOCK_C = 16


@triton.jit
def _coefficients(target_ptr, w_ptr, offs, cols, mask, t, w_t, keep, eps_c, C,
                  PROBS: tl.constexpr, WEIGHTED: tl.constexpr, ACC: tl.constexpr):
    """(a, w): the coefficients a (BLOCK_M, BLOCK_C) of a tile, 0 outside ``mask``, and the class
    weights w (BLOCK_C,) of its columns, 0 past C."""
    col_ok = cols < C
    if WEIGHTED:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0).to(ACC)
    else:
        w = tl.where(col_ok, 1.0, 0.0).to(ACC)
    if PROBS:
        p = tl.load(target_ptr + offs, mask=mask, other=0).to(ACC)
        a = w[None, :] * (keep * p + eps_c)
    else:
        a = eps_c * w[None, :] + tl.where(cols[None, :] == t[:, None], (keep * w_t)[:, None], 0.0)
    return tl.where(mask, a, 0.0), w


@triton.jit
def _cross_entropy_rows_kernel(
    z_ptr,       # (M, C) logits, contiguous
    target_ptr,  # (M,) int64 class indices, or (M, C) class probabilities in z's dtype (PROBS)
    w_ptr,       # (C,) class weights in z's dtype (WEIGHTED)
    scale_ptr,   # (M,) per-row gradient scales (ROW_SCALE), or () one scale for every row (SCALE_TENSOR)
    loss_ptr,    # (M,) row losses ℓ (DO_LOSS): z's dtype, float32 for float16 / bfloat16
    grad_ptr,    # (M, C) s · dℓ/dz (DO_GRAD), z's dtype; may be z_ptr itself
    M, C, ignore_index,
    eps_hi, eps_lo,      # label smoothing ε as a float32 pair (fastml._triton.split_float)
    scale_hi, scale_lo,  # the gradient scale of every row when not ROW_SCALE, likewise
    PROBS: tl.constexpr, WEIGHTED: tl.constexpr, ROW_SCALE: tl.constexpr, SCALE_TENSOR: tl.constexpr,
    SMOOTH_LOSS: tl.constexpr,  # ε > 0 and DO_LOSS: an index target's loss has the smoothing sum
    DO_LOSS: tl.constexpr, DO_GRAD: tl.constexpr,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    starts = rows.to(tl.int64) * C  # M·C may pass 2**31
    eps = (tl.zeros([], ACC) + eps_hi) + eps_lo
    keep = 1.0 - eps
    eps_c = eps / C
    if PROBS:
        t = rows  # unused
        w_t = eps  # unused
        kept = row_ok
    else:
        t = tl.load(target_ptr + rows, mask=row_ok, other=0)
        kept = row_ok & (t != ignore_index)
        # The target's column as int32 (cheaper to compare per element), -1 on an ignored row.
        t = tl.where(kept, t, -1).to(tl.int32)
        if WEIGHTED:
            w_t = tl.load(w_ptr + t, mask=kept, other=0).to(ACC)
        else:
            w_t = tl.full([BLOCK_M], 1.0, ACC)

    # Sweep 1: each row's running maximum and Σ exp(z - maximum), rescaled as the maximum grows.
    # Ignored rows load nothing, unless their gradient is written: it is NaN where their
    # log-sum-exp is not finite, as torch's.
    row_max = tl.full([BLOCK_M], float("-inf"), ACC)
    row_sum = tl.zeros([BLOCK_M], ACC)
    a_total = tl.zeros([BLOCK_M], ACC)
    read = row_ok if DO_GRAD else kept
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = read[:, None] & (cols < C)[None, :]
        offs = starts[:, None] + cols[None, :]
        x = tl.load(z_ptr + offs, mask=mask, other=float("-inf")).to(ACC)
        new_max = tl.maximum(row_max, tl.max(x, axis=1))
        # A row that has seen only -inf keeps a sum of 0 (exp(-inf - -inf) would be NaN).
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp(row_max - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
        row_max = new_max
        if DO_GRAD:
            a, w = _coefficients(target_ptr, w_ptr, offs, cols, kept[:, None] & (cols < C)[None, :], t, w_t, keep,
                                 eps_c, C, PROBS, WEIGHTED, ACC)
            a_total += tl.sum(a, axis=1)
    # An ignored row's gradient: 0, or NaN where its log-sum-exp is not finite (a NaN or +inf
    # logit makes the sum NaN or the maximum +inf; a row of -inf keeps a maximum of -inf).
    ignored_grad = tl.where((row_sum == row_sum) & (row_max > float("-inf")) & (row_max < float("inf")), 0.0,
                            float("nan"))
    # A row of -inf only gets log Σ = -inf and NaN log-probabilities (as a NaN or +inf logit
    # gives a NaN sum), as in torch; an ignored row gets harmless zeros (its results are replaced).
    row_max = tl.where(kept, row_max, 0.0)
    log_sum = tl.log(tl.where(kept, row_sum, 1.0))
    if ROW_SCALE:
        s = tl.load(scale_ptr + rows, mask=row_ok, other=0).to(ACC)
    elif SCALE_TENSOR:
        s = tl.zeros([BLOCK_M], ACC) + tl.load(scale_ptr).to(ACC)
    else:
        s = tl.zeros([BLOCK_M], ACC) + ((tl.zeros([], ACC) + scale_hi) + scale_lo)

    # Sweep 2: the gradient and the loss terms.
    nll = tl.zeros([BLOCK_M], ACC)     # Σ -a·log p (PROBS), else -log p_t
    smooth = tl.zeros([BLOCK_M], ACC)  # Σ -w·log p (index targets, SMOOTH_LOSS)
    if DO_GRAD or PROBS or SMOOTH_LOSS:
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            mask = kept[:, None] & (cols < C)[None, :]
            offs = starts[:, None] + cols[None, :]
            x = tl.load(z_ptr + offs, mask=mask, other=0).to(ACC)
            # 0 off the mask: no exp overflow on a padding lane of a row with a very negative
            # maximum, and no term from it in the sums below.
            log_p = tl.where(mask, (x - row_max[:, None]) - log_sum[:, None], 0.0)
            a, w = _coefficients(target_ptr, w_ptr, offs, cols, mask, t, w_t, keep, eps_c, C, PROBS, WEIGHTED, ACC)
            if DO_GRAD:
                g = s[:, None] * (a_total[:, None] * tl.exp(log_p) - a)
                g = tl.where(kept[:, None], g, ignored_grad[:, None])
                tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < C)[None, :])
            if PROBS:  # every class, so 0 · -inf gives NaN as in torch
                nll -= tl.sum(a * log_p, axis=1)
            else:  # only the target's class (and the smoothing sum): torch looks at no other
                nll -= tl.sum(tl.where(cols[None, :] == t[:, None], log_p, 0.0), axis=1)
                if SMOOTH_LOSS:
                    smooth -= tl.sum(w[None, :] * log_p, axis=1)
    else:
        z_t = tl.load(z_ptr + starts + t, mask=kept, other=0).to(ACC)
        nll = -((z_t - row_max) - log_sum)

    if DO_LOSS:
        if PROBS:
            loss = nll
        else:
            loss = keep * (nll * w_t)
            if SMOOTH_LOSS:
                loss += eps_c * smooth
        tl.store(loss_ptr + rows, tl.where(kept, loss, 0.0).to(loss_ptr.dtype.element_ty), mask=row_ok)


def _tiling(m: int, c: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_C, num_warps) for m rows of c classes."""
    tile, max_block_c = (INTERPRETER_TILE, INTERPRETER_MAX_BLOCK_C) if tt.interpreted() else (TILE, TILE)
    block_c = tt.block(c, MIN_BLOCK_C, max_block_c)
    block_m = tt.block(m, 1, max(1, tile // block_c))
    return block_m, block_c, max(1, min(8, block_m * block_c // (32 * ELEMENTS_PER_THREAD)))


def target_total(target, class_weight, ignore_index, num_classes):
    """reference.target_total for CPU tensors (the interpreter); for CUDA ones ``device_target_total``."""
    if target.device.type == "cuda":
        return device_target_total(target, class_weight, ignore_index, num_classes)
    return reference.target_total(target, class_weight, ignore_index, num_classes)


def device_target_total(target, class_weight, ignore_index, num_classes):
    """reference.target_total kept on the device: a 0-dim float64 tensor, and a target out of
    range fails a device-side assertion, as torch's own CUDA loss kernels do. The host never
    waits for the device: the reference's float and its IndexError each cost a synchronisation,
    which stalls the host's queue of launches and left the GPU idle between them."""
    kept = target != ignore_index
    torch._assert_async((((target >= 0) & (target < num_classes)) | ~kept).all())
    if class_weight is None:
        return kept.sum(dtype=torch.float64)
    weights = class_weight.to(torch.float64)[target.clamp(0, max(num_classes - 1, 0))]
    return torch.where(kept, weights, 0.0).sum()


def rows(logits, target, class_weight, ignore_index, label_smoothing, grad_scale, row_loss, grad):
    m, c = logits.shape
    if m == 0 or (row_loss is None and grad is None):
        return
    probs = target.dtype != torch.int64
    # A tensor scale: (M,) per row, or () one for every row (a "mean" divisor kept on the device).
    row_scale = isinstance(grad_scale, torch.Tensor) and grad_scale.dim() == 1
    scale_tensor = isinstance(grad_scale, torch.Tensor) and grad_scale.dim() == 0
    eps = float(label_smoothing)
    block_m, block_c, num_warps = _tiling(m, c)
    eps_hi, eps_lo = tt.split_float(eps)
    scale = 0.0 if row_scale or scale_tensor else float(grad_scale)
    scale_hi, scale_lo = tt.split_float(scale)
    _cross_entropy_rows_kernel[(tt.cdiv(m, block_m),)](
        logits, target.contiguous(), None if class_weight is None else class_weight.to(logits.dtype).contiguous(),
        grad_scale.contiguous() if row_scale or scale_tensor else None, row_loss, grad,
        m, c, int(ignore_index), eps_hi, eps_lo, scale_hi, scale_lo,
        PROBS=probs, WEIGHTED=class_weight is not None, ROW_SCALE=row_scale, SCALE_TENSOR=scale_tensor,
        SMOOTH_LOSS=eps > 0 and row_loss is not None and not probs,
        DO_LOSS=row_loss is not None, DO_GRAD=grad is not None,
        ACC=tt.acc_dtype(logits.dtype), BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps)
