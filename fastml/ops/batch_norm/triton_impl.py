"""Batch normalisation (training statistics, optional ReLU) in Triton; signatures and semantics
as in reference.py.

x (N, C, H, W) is addressed as (n, c, l) with strides (sn, sc, sl): (C·L, L, 1) contiguous,
(L·C, 1, C) channels-last, so one set of kernels serves both layouts.

statistics: a grid of (channel blocks) × (row slices); each program sums, for its BLOCK_C
    channels, x − shift and its square over its slice of the N·L rows (a [BLOCK_R, BLOCK_C]
    tile at a time, the tile's sums added to float64 accumulators), and writes one partial per
    channel; the partials are summed in a fixed order with torch. The shift is each channel's
    first value where finite, so a large mean does not cancel the variance away.
normalise: persistent programs stream the flat memory of x; out = x · scale + shift (+ ReLU), one
    fused multiply-add, scale and shift per channel in the accumulation dtype (``_affine``).
backward: the same two shapes: Σg and Σg·(x − mean) per channel (g the gradient masked where
    forward's pre-ReLU value ≤ 0, recomputed from x), then grad_input elementwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastml import _triton as tt
from fastml.ops.batch_norm import reference


@triton.jit
def _channel_sums_kernel(
    x_ptr,        # (N, C, H, W) input, strides (sn, sc, sl) in the (n, c, l) view
    g_ptr,        # same shape and strides: the gradient (GRADIENT), else unused
    a_ptr,        # (C,) forward's scale, ACC's dtype (GRADIENT and RELU)
    b_ptr,        # (C,) forward's shift, ACC's dtype (GRADIENT and RELU)
    center_ptr,   # (C,) what x is taken from: the shift (statistics) or the mean (GRADIENT)
    part_ptr,     # (P, 2, C) float64 partial sums of program row-slice p
    c, l, rows, sn, sc, sl, rows_per_program,
    GRADIENT: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """statistics: Σ(x − center), Σ(x − center)²; GRADIENT: Σg, Σg·(x − center)."""
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1).to(tl.int64)
    ch = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    ch_ok = ch < c
    center = tl.load(center_ptr + ch, mask=ch_ok, other=0).to(ACC)
    if GRADIENT and RELU:
        a = tl.load(a_ptr + ch, mask=ch_ok, other=0).to(ACC)
        b = tl.load(b_ptr + ch, mask=ch_ok, other=0).to(ACC)
    first = tl.zeros([BLOCK_C], tl.float64)
    second = tl.zeros([BLOCK_C], tl.float64)
    start = pid_r * rows_per_program
    stop = tl.minimum(start + rows_per_program, rows)
    for r0 in range(start, stop, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        n, p = r // l, r % l
        offs = (n * sn + p * sl)[:, None] + ch[None, :].to(tl.int64) * sc
        mask = (r < stop)[:, None] & ch_ok[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0).to(ACC)
        d = tl.where(mask, x - center[None, :], 0)
        if GRADIENT:
            g = tl.load(g_ptr + offs, mask=mask, other=0).to(ACC)
            if RELU:  # (as _elementwise_kernel's mask: the output's sign after its rounding)
                pre = tl.fma(x, a[None, :], b[None, :]).to(x_ptr.dtype.element_ty).to(ACC)
                g = tl.where(pre <= 0, 0, g)
            first += tl.sum(g, axis=0).to(tl.float64)
            second += tl.sum(g * d, axis=0).to(tl.float64)
        else:
            first += tl.sum(d, axis=0).to(tl.float64)
            second += tl.sum(d * d, axis=0).to(tl.float64)
    base = part_ptr + pid_r * 2 * c
    tl.store(base + ch, first, mask=ch_ok)
    tl.store(base + c + ch, second, mask=ch_ok)


@triton.jit
def _elementwise_kernel(
    x_ptr,        # (numel,) x's memory, in its layout
    g_ptr,        # (numel,) the gradient, same layout (GRADIENT)
    a_ptr,        # (C,) forward's scale, ACC's dtype
    b_ptr,        # (C,) forward's shift, ACC's dtype
    mean_ptr,     # (C,) batch mean (GRADIENT)
    k_ptr,        # (C,) invstd² · mean(g · (x − mean)) (GRADIENT)
    mg_ptr,       # (C,) mean(g) (GRADIENT)
    out_ptr,      # (numel,) out (forward) or grad_input (GRADIENT), x's layout
    numel, c, sc,
    GRADIENT: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """forward: x · scale + shift, then the ReLU; GRADIENT: (g − mean(g) − (x − mean) · k) · scale."""
    pid = tl.program_id(0).to(tl.int64)
    for blk in range(pid, tl.cdiv(numel, BLOCK), tl.num_programs(0)):
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        ch = (offs // sc) % c
        x = tl.load(x_ptr + offs, mask=mask, other=0).to(ACC)
        a = tl.load(a_ptr + ch, mask=mask, other=0).to(ACC)
        b = tl.load(b_ptr + ch, mask=mask, other=0).to(ACC)
        # Forward's output and backward's mask: one expression, fused as torch's addcmul (one
        # rounding, whatever the compiler would contract), so the two find the same signs.
        pre = tl.fma(x, a, b)
        if GRADIENT:
            g = tl.load(g_ptr + offs, mask=mask, other=0).to(ACC)
            if RELU:
                # The mask is the stored output's sign, as torch's ReLU after a half-precision
                # batch norm sees it: a pre-activation too small for x's dtype is stored as 0.
                g = tl.where(pre.to(x_ptr.dtype.element_ty).to(ACC) <= 0, 0, g)
            centred = x - tl.load(mean_ptr + ch, mask=mask, other=0).to(ACC)
            k = tl.load(k_ptr + ch, mask=mask, other=0).to(ACC)
            mg = tl.load(mg_ptr + ch, mask=mask, other=0).to(ACC)
            y = (g - mg - centred * k) * a
        else:
            y = pre
            if RELU:
                y = tl.where(y < 0, 0, y)  # (NaN < 0 is false: NaN kept)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _affine(weight, bias, stats):
    """(scale, shift) per channel, contiguous: reference.affine in the accumulation dtype. For
    float16 / bfloat16 statistics this keeps shift = bias − mean · scale from a half rounding of
    mean · scale, which where the mean is many standard deviations from 0 is large beside the
    output. Forward and backward both take it from the (3, C) stats, so they agree on it."""
    acc = tt.torch_acc_dtype(stats.dtype)
    weight, bias = (None if t is None else t.to(acc) for t in (weight, bias))
    return tuple(t.contiguous() for t in reference.affine(weight, bias, stats.to(acc)))


def _view(x: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """(c, l, rows, sn, sc, sl) of x seen as (n, c, l)."""
    n, c, h, w = x.shape
    l = h * w
    if reference.layout_of(x) == torch.channels_last:
        return c, l, n * l, l * c, 1, c
    return c, l, n * l, c * l, l, 1


def _channel_sums(x, grad, a, b, center, relu, gradient):
    """(2, C) float64: the sums _channel_sums_kernel documents, over every row."""
    c, l, rows, sn, sc, sl = _view(x)
    block_c = tt.block(c, 1, 16 if tt.interpreted() else 64)
    block_r = 64 if tt.interpreted() else 128
    slices = tt.persistent_programs(tt.cdiv(rows, block_r), x.device)
    rows_per_program = tt.cdiv(tt.cdiv(rows, slices), block_r) * block_r
    slices = tt.cdiv(rows, rows_per_program)
    part = torch.empty((slices, 2, c), dtype=torch.float64, device=x.device)
    _channel_sums_kernel[(tt.cdiv(c, block_c), slices)](
        x, grad, a, b, center, part, c, l, rows, sn, sc, sl, rows_per_program,
        GRADIENT=gradient, RELU=bool(relu), ACC=tt.acc_dtype(x.dtype), BLOCK_R=block_r, BLOCK_C=block_c,
        num_warps=4)
    return part.sum(0)


def _elementwise(x, grad, a, b, mean, k, mean_g, relu, gradient):
    out = reference.like(x)
    numel = x.numel()
    c, _, _, _, sc, _ = _view(x)
    block = 4096 if tt.interpreted() else 1024
    programs = tt.persistent_programs(tt.cdiv(numel, block), x.device)
    _elementwise_kernel[(programs,)](
        x, grad, a, b, mean, k, mean_g, out, numel, c, sc,
        GRADIENT=gradient, RELU=bool(relu), ACC=tt.acc_dtype(x.dtype), BLOCK=block, num_warps=4)
    return out


def forward(x, weight, bias, eps, relu):
    if x.numel() == 0:
        return reference.forward(x, weight, bias, eps, relu)
    n, c, h, w = x.shape
    shift = reference.channel_shift(x).to(x.dtype)  # the kernel subtracts it in x's dtype
    total = _channel_sums(x, x, x, x, shift.contiguous(), False, False)
    stats = reference.stats_from_sums(shift.double(), total, n * h * w, eps, x.dtype)
    scale, offset = _affine(weight, bias, stats)
    return _elementwise(x, x, scale, offset, x, x, x, relu, False), stats


def backward(grad, x, weight, bias, stats, relu):
    if x.numel() == 0:
        return reference.backward(grad, x, weight, bias, stats, relu)
    n, c, h, w = x.shape
    count = n * h * w
    scale, offset = _affine(weight, bias, stats)
    mean = stats[0].contiguous()
    total = _channel_sums(x, grad, scale, offset, mean, relu, True)
    grad_weight, grad_bias, k, mean_g = reference.gradient_terms(total, stats, count, weight, bias, x.dtype,
                                                                 tt.torch_acc_dtype(x.dtype))
    return _elementwise(x, grad, scale, offset, mean, k, mean_g, relu, True), grad_weight, grad_bias
