"""2-D convolution in Triton, as implicit GEMMs; signatures and semantics as in reference.py.

Every kernel is a tiled matmul whose operand tiles are gathered straight from the NCHW tensors
(never an im2col buffer): the reduction index r = c·KH·KW + kr·KW + ks runs over one group's input
channels and the filter taps in the weight's own order, and each gathered element's (row, column)
is recomputed from its indices, masked where it falls in the zero padding. One program per
[BLOCK_M, BLOCK_N] output tile of one group, on a 1-D grid ordered (group, row tile, column tile),
column tiles fastest (neighbouring programs share their gathered rows in cache); products in
float32 for float16 / bfloat16 inputs (one cast at the store), in float64 for float64.

forward      rows: output positions m = (n, oh, ow) (M = N·OH·OW), columns: the group's output
             channels, reduction: C/groups·KH·KW. A gathers x, B reads the filters.
grad_input   rows: input positions (n, ih, iw) (N·H·W), columns: the group's input channels,
             reduction: K/groups·KH·KW. A gathers grad at oh = (ih + PH − kr·DH) / SH (ow alike),
             masked where that division is not exact or falls outside the output (the transposed
             convolution); B reads the filters.
grad_weight  rows: the group's output channels, columns: r, reduction: output positions m. A reads
             grad, B gathers x as the forward does. A long reduction over a short output (the
             usual case: few filters, a large batch) is split into SPLIT ranges of m on the second
             grid axis, whose partial sums (accumulation dtype) _sum_partials_kernel adds in a fixed
             order. grad_bias: the row sums of the same grad tiles, kept by the programs of the
             first column tile (or by a weight-less launch when grad_weight is not wanted).

tl.dot runs on tiles of at least 16 on every side; float64 takes the broadcast multiply + sum of
``tt.mm`` where tl.dot has no float64 path (``tt.use_dot``), on 16 × 16 × 16 tiles. On the GPU the
large problems autotune their tiles, once per power-of-two bucket of the GEMM's sizes; under the
interpreter one config of tiles sized to the problem (16 to 128 rows, 16 to 64 columns and
reduction steps): each program costs Python time per operation, so few programs are launched.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastml import _triton as tt
from fastml.ops.conv2d.reference import output_size

# GEMMs below this many flops launch a fixed config: autotuning them costs more than it saves.
_AUTOTUNE_MIN_FLOPS = 1 << 24
NUM_WARPS = 4
# Elements per program of _sum_partials_kernel.
SUM_BLOCK = 1024


@triton.jit
def conv_tile(
    x_ptr,    # (N, C, H, W) input, contiguous
    w_ptr,    # (K, C / groups, KH, KW) filters, contiguous
    x_rows,   # [BLOCK_M] int64: offset of channel 0 of the group in each row's sample
    ih0,      # [BLOCK_M] top input row of each row's window (oh·SH − PH)
    iw0,      # [BLOCK_M] left input column of each row's window (ow·SW − PW)
    m_ok,     # [BLOCK_M] which rows are real
    w_cols,   # [BLOCK_N] int64: offset of each column's filter
    n_ok,     # [BLOCK_N] which columns are real
    CG, H, W, KH, KW, DH, DW,
    ACC: tl.constexpr, PREC: tl.constexpr, USE_DOT: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """[BLOCK_M, BLOCK_N] convolution sums (no bias) of the windows at (ih0, iw0) with the filters
    at w_cols, reduced over the group's CG·KH·KW (channel, tap) pairs in steps of BLOCK_K."""
    taps = KH * KW
    red = CG * taps
    plane = H * W
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for r0 in range(0, red, BLOCK_K):
        r = r0 + tl.arange(0, BLOCK_K)
        r_ok = r < red
        c = r // taps
        tap = r % taps
        ih = ih0[:, None] + ((tap // KW) * DH)[None, :]
        iw = iw0[:, None] + ((tap % KW) * DW)[None, :]
        inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(x_ptr + x_rows[:, None] + (c.to(tl.int64) * plane)[None, :] + (ih * W + iw),
                    mask=m_ok[:, None] & r_ok[None, :] & inside, other=0)
        b = tl.load(w_ptr + w_cols[None, :] + r[:, None], mask=r_ok[:, None] & n_ok[None, :], other=0)
        if UPCAST:
            acc = tt.mm(a.to(ACC), b.to(ACC), acc, PREC, USE_DOT)
        else:
            acc = tt.mm(a, b, acc, PREC, USE_DOT)
    return acc


@triton.jit
def group_tile(pid, M, cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The tile program ``pid`` owns on a 1-D grid ordered (group, row tile, column tile): its
    group; its rows [BLOCK_M] (int64: N·OH·OW may pass 2**31) and their mask (< M); its columns
    [BLOCK_N] and their mask (< cols, the group's width)."""
    tiles_n = tl.cdiv(cols, BLOCK_N)
    tiles = tl.cdiv(M, BLOCK_M) * tiles_n
    pid_m = (pid % tiles) // tiles_n
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid // tiles, offs_m, offs_m < M, offs_n, offs_n < cols


@triton.jit
def _conv2d_forward_kernel(
    x_ptr,     # (N, C, H, W) input, contiguous
    w_ptr,     # (K, C / groups, KH, KW) filters, contiguous, x's dtype
    bias_ptr,  # (K,) bias, x's dtype (read when HAS_BIAS)
    out_ptr,   # (N, K, OH, OW) output, x's dtype
    M, C, H, W, K, OH, OW,  # M = N·OH·OW output positions
    KH, KW, SH, SW, PH, PW, DH, DW,  # filter size, stride, padding, dilation (rows, columns)
    groups,
    HAS_BIAS: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, USE_DOT: tl.constexpr,
    UPCAST: tl.constexpr,  # operands to ACC before the product (half types under the interpreter)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    CG = C // groups
    KG = K // groups
    g, offs_m, m_ok, offs_n, n_ok = group_tile(tl.program_id(0), M, KG, BLOCK_M, BLOCK_N)
    ohw = OH * OW
    n = offs_m // ohw
    p = (offs_m - n * ohw).to(tl.int32)
    oh = p // OW
    ow = p % OW
    k = g * KG + offs_n
    acc = conv_tile(x_ptr, w_ptr, (n * C + g * CG) * H * W, oh * SH - PH, ow * SW - PW, m_ok,
                    k.to(tl.int64) * (CG * KH * KW), n_ok, CG, H, W, KH, KW, DH, DW,
                    ACC=ACC, PREC=PREC, USE_DOT=USE_DOT, UPCAST=UPCAST,
                    BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + k, mask=n_ok, other=0).to(ACC)[None, :]
    out = out_ptr + (n * K * ohw + p)[:, None] + (k.to(tl.int64) * ohw)[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _conv2d_backward_input_kernel(
    grad_ptr,        # (N, K, OH, OW) gradient of the output, contiguous
    w_ptr,           # (K, C / groups, KH, KW) filters, contiguous, grad's dtype
    grad_input_ptr,  # (N, C, H, W) gradient of x, every element written
    M, C, H, W, K, OH, OW,  # M = N·H·W input positions
    KH, KW, SH, SW, PH, PW, DH, DW,
    groups,
    ACC: tl.constexpr, PREC: tl.constexpr, USE_DOT: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    CG = C // groups
    KG = K // groups
    g, offs_m, m_ok, offs_n, n_ok = group_tile(tl.program_id(0), M, CG, BLOCK_M, BLOCK_N)
    hw = H * W
    ohw = OH * OW
    n = offs_m // hw
    q = (offs_m - n * hw).to(tl.int32)
    th0 = q // W + PH  # ih + PH = oh·SH + kr·DH
    tw0 = q % W + PW
    taps = KH * KW
    red = KG * taps
    grad_rows = (n * K + g * KG) * ohw  # [BLOCK_M] int64: the group's channel 0 of each row's sample
    w_group = g.to(tl.int64) * KG * CG * taps
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for r0 in range(0, red, BLOCK_K):
        r = r0 + tl.arange(0, BLOCK_K)  # (k, kr, ks) within the group
        r_ok = r < red
        kk = r // taps
        tap = r % taps
        th = th0[:, None] - ((tap // KW) * DH)[None, :]
        tw = tw0[:, None] - ((tap % KW) * DW)[None, :]
        oh = th // SH
        ow = tw // SW
        hit = (th >= 0) & (tw >= 0) & (oh * SH == th) & (ow * SW == tw) & (oh < OH) & (ow < OW)
        a = tl.load(grad_ptr + grad_rows[:, None] + (kk.to(tl.int64) * ohw)[None, :] + (oh * OW + ow),
                    mask=m_ok[:, None] & r_ok[None, :] & hit, other=0)
        b = tl.load(w_ptr + w_group + (kk.to(tl.int64) * (CG * taps) + tap)[:, None] + (offs_n * taps)[None, :],
                    mask=r_ok[:, None] & n_ok[None, :], other=0)
        if UPCAST:
            acc = tt.mm(a.to(ACC), b.to(ACC), acc, PREC, USE_DOT)
        else:
            acc = tt.mm(a, b, acc, PREC, USE_DOT)
    c = g * CG + offs_n
    out = grad_input_ptr + (n * C * hw + q)[:, None] + (c.to(tl.int64) * hw)[None, :]
    tl.store(out, acc.to(grad_input_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _conv2d_backward_weight_kernel(
    grad_ptr,         # (N, K, OH, OW) gradient of the output, contiguous
    x_ptr,            # (N, C, H, W) input, contiguous, grad's dtype
    grad_weight_ptr,  # (SPLIT, K, C / groups·KH·KW) partial sums over each split's range of m
                      # (SPLIT = 1: grad_weight itself, weight's dtype; else accumulation dtype)
    grad_bias_ptr,    # (SPLIT, K) partial sums of grad (written when BIAS), as grad_weight_ptr
    M, C, H, W, K, OH, OW,  # M = N·OH·OW output positions: the reduction
    KH, KW, SH, SW, PH, PW, DH, DW,
    groups,
    m_per_split,  # positions per split (a multiple of BLOCK_K); the split is program_id(1)
    WEIGHT: tl.constexpr,  # compute grad_weight (else only the bias sums, one column tile)
    BIAS: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr, USE_DOT: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    CG = C // groups
    KG = K // groups
    taps = KH * KW
    red = CG * taps
    if WEIGHT:
        tiles_n = tl.cdiv(red, BLOCK_N)
    else:
        tiles_n = 1
    tiles = tl.cdiv(KG, BLOCK_M) * tiles_n
    g = pid // tiles
    pid_m = (pid % tiles) // tiles_n
    pid_n = pid % tiles_n
    offs_k = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output channels within the group
    k_ok = offs_k < KG
    k = g * KG + offs_k
    offs_r = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (c, kr, ks) within the group
    r_ok = offs_r < red
    c = offs_r // taps
    tap = offs_r % taps
    dh = (tap // KW) * DH
    dw = (tap % KW) * DW
    x_cols = c.to(tl.int64) * (H * W)
    ohw = OH * OW
    k_rows = k.to(tl.int64) * ohw
    m_lo = split.to(tl.int64) * m_per_split
    m_count = tl.minimum(M - m_lo, m_per_split)
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    bias_sum = tl.zeros([BLOCK_M], ACC)
    for i in range(tl.cdiv(m_count, BLOCK_K)):
        m = m_lo + i * BLOCK_K + tl.arange(0, BLOCK_K)
        m_ok = m < m_lo + m_count
        n = m // ohw
        p = (m - n * ohw).to(tl.int32)
        a = tl.load(grad_ptr + k_rows[:, None] + (n * K * ohw + p)[None, :],
                    mask=k_ok[:, None] & m_ok[None, :], other=0)
        if BIAS:
            bias_sum += tl.sum(a.to(ACC), axis=1)
        if WEIGHT:
            ih = (p // OW * SH - PH)[:, None] + dh[None, :]
            iw = (p % OW * SW - PW)[:, None] + dw[None, :]
            inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            b = tl.load(x_ptr + ((n * C + g * CG) * H * W)[:, None] + x_cols[None, :] + (ih * W + iw),
                        mask=m_ok[:, None] & r_ok[None, :] & inside, other=0)
            if UPCAST:
                acc = tt.mm(a.to(ACC), b.to(ACC), acc, PREC, USE_DOT)
            else:
                acc = tt.mm(a, b, acc, PREC, USE_DOT)
    if WEIGHT:
        out = grad_weight_ptr + split.to(tl.int64) * K * red + (k.to(tl.int64) * red)[:, None] + offs_r[None, :]
        tl.store(out, acc.to(grad_weight_ptr.dtype.element_ty), mask=k_ok[:, None] & r_ok[None, :])
    if BIAS:  # noqa: SIM102 (a constexpr test, then a runtime one: the first column tile writes)
        if pid_n == 0:
            tl.store(grad_bias_ptr + split.to(tl.int64) * K + k, bias_sum.to(grad_bias_ptr.dtype.element_ty),
                     mask=k_ok)


@triton.jit
def _sum_partials_kernel(
    part_ptr,  # (splits, length) partial sums, accumulation dtype, contiguous
    out_ptr,   # (length,) their sums over the splits, the gradient's dtype
    splits, length,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < length
    acc = tl.zeros([BLOCK], ACC)
    part = part_ptr + cols
    for _ in range(splits):  # a fixed order: deterministic
        acc += tl.load(part, mask=mask, other=0).to(ACC)
        part += length
    tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launch configurations
# --------------------------------------------------------------------------------------------

_CONFIGS = [  # (warps, stages, BLOCK_M, BLOCK_N, BLOCK_K); the first fits every GEMM
    (4, 2, 16, 16, 16), (4, 3, 64, 16, 16), (4, 3, 128, 16, 16), (4, 3, 32, 64, 32), (4, 3, 16, 64, 64),
    (4, 3, 64, 16, 32), (4, 3, 128, 16, 32), (4, 3, 64, 32, 32), (4, 3, 128, 32, 32),
    (4, 3, 64, 64, 32), (8, 3, 128, 64, 32), (4, 3, 64, 64, 64), (8, 3, 128, 128, 32),
]
_CONFIGS_FP64 = [(4, 2, 16, 16, 16), (4, 2, 32, 16, 16), (4, 2, 64, 16, 16), (4, 2, 16, 32, 16),
                 (4, 2, 32, 32, 16), (4, 2, 64, 32, 16), (4, 2, 64, 64, 16)]


@functools.cache
def _tuner(kernel, fp64: bool, max_m: int, max_n: int, max_k: int):
    """An autotuner of ``kernel`` over the configs whose tiles do not pass max_m, max_n and max_k
    (tiles larger than the GEMM only add masked work)."""
    configs = [tt.cfg(w, s, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
               for w, s, bm, bn, bk in (_CONFIGS_FP64 if fp64 else _CONFIGS)
               if bm <= max_m and bn <= max_n and bk <= max_k]
    return triton.autotune(configs=configs, key=["M", "K"])(kernel)


def _meta(dtype: torch.dtype) -> dict:
    interp = tt.interpreted()
    upcast = interp and dtype in (torch.float16, torch.bfloat16)
    return {"ACC": tt.acc_dtype(dtype),
            "PREC": tt.upcast_dot_precision(dtype) if upcast else tt.dot_precision(dtype),
            "USE_DOT": tt.use_dot(dtype), "UPCAST": upcast}


def launch(kernel, tiles, rows: int, cols: int, red: int, args: tuple, meta: dict, dtype: torch.dtype,
           splits: int = 1) -> None:
    """Launches an implicit-GEMM ``kernel`` of ``rows`` × ``cols`` outputs reduced over ``red``
    terms, whose 1-D grid has ``tiles(BLOCK_M, BLOCK_N)`` programs (× ``splits`` on axis 1)."""
    if tt.interpreted():
        bm, bn, bk = tt.block(rows, 16, 128), tt.block(cols, 16, 64), tt.block(red, 16, 64)
        kernel[(tiles(bm, bn), splits)](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=NUM_WARPS)
    elif not meta["USE_DOT"]:  # broadcast products: BLOCK_M·BLOCK_N·BLOCK_K values in registers
        kernel[(tiles(16, 16), splits)](*args, **meta, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=NUM_WARPS,
                                        num_stages=2)
    elif 2 * rows * cols * red < _AUTOTUNE_MIN_FLOPS:
        fp64 = dtype == torch.float64
        bm = 64
        bn = tt.block(cols, 16, 32 if fp64 else 64)
        bk = 16 if fp64 or red <= 16 else 32
        kernel[(tiles(bm, bn), splits)](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=NUM_WARPS,
                                        num_stages=2 if fp64 else 3)
    else:
        tuner = _tuner(kernel, dtype == torch.float64, tt.block(rows, 16, 128), tt.block(cols, 16, 128),
                       tt.block(red, 16, 64))
        key = (tt.size_bucket(rows), tt.size_bucket(cols), tt.size_bucket(red), splits, dtype,
               tuple(sorted((k, v) for k, v in meta.items() if isinstance(v, bool))))
        tt.launch_tuned(tuner, kernel, lambda m: (tiles(m["BLOCK_M"], m["BLOCK_N"]), splits), key, *args, **meta)


def sum_partials(part: torch.Tensor, out: torch.Tensor) -> None:
    """out (L,) = part (SPLIT, L) summed over its first axis, in a fixed order."""
    splits, length = part.shape
    block = 256 if tt.interpreted() else SUM_BLOCK
    _sum_partials_kernel[(tt.cdiv(length, block),)](part, out, splits, length, ACC=tt.acc_dtype(part.dtype),
                                                    BLOCK=block, num_warps=NUM_WARPS)


def _geometry(x, weight, stride, padding, dilation):
    n, c, h, w = x.shape
    k, cg, kh, kw = weight.shape
    oh = output_size(h, kh, stride[0], padding[0], dilation[0])
    ow = output_size(w, kw, stride[1], padding[1], dilation[1])
    return n, c, h, w, k, cg, kh, kw, oh, ow


def _conv_args(c, h, w, k, oh, ow, kh, kw, stride, padding, dilation, groups) -> tuple:
    return (c, h, w, k, oh, ow, kh, kw, *stride, *padding, *dilation, groups)


# --------------------------------------------------------------------------------------------
# The backend's interface
# --------------------------------------------------------------------------------------------


def forward(x, weight, bias, stride, padding, dilation, groups):
    n, c, h, w, k, cg, kh, kw, oh, ow = _geometry(x, weight, stride, padding, dilation)
    out = x.new_empty((n, k, oh, ow))
    if out.numel() == 0:
        return out
    rows, kg = n * oh * ow, k // groups

    def tiles(bm, bn):
        return groups * tt.cdiv(rows, bm) * tt.cdiv(kg, bn)

    args = (x, weight, bias, out, rows, *_conv_args(c, h, w, k, oh, ow, kh, kw, stride, padding, dilation, groups))
    launch(_conv2d_forward_kernel, tiles, rows, kg, cg * kh * kw, args,
           dict(_meta(x.dtype), HAS_BIAS=bias is not None), x.dtype)
    return out


def backward(grad, x, weight, stride, padding, dilation, groups, needs):
    need_x, need_w, need_b = needs
    n, c, h, w, k, cg, kh, kw, oh, ow = _geometry(x, weight, stride, padding, dilation)
    geometry = _conv_args(c, h, w, k, oh, ow, kh, kw, stride, padding, dilation, groups)
    kg = k // groups
    meta = _meta(x.dtype)
    # An empty batch (or output) gives no terms: the gradients are zeros, no kernel runs.
    empty = grad.numel() == 0
    grad_x = grad_w = grad_b = None
    if need_x:
        grad_x = x.new_empty(x.shape)
        if empty or weight.numel() == 0:
            grad_x.zero_()
        elif grad_x.numel():
            rows = n * h * w

            def tiles_x(bm, bn):
                return groups * tt.cdiv(rows, bm) * tt.cdiv(cg, bn)

            launch(_conv2d_backward_input_kernel, tiles_x, rows, cg, kg * kh * kw,
                   (grad, weight, grad_x, rows, *geometry), meta, x.dtype)
    if need_w:
        grad_w = weight.new_zeros(weight.shape) if empty else weight.new_empty(weight.shape)
    if need_b:
        grad_b = grad.new_zeros((k,)) if empty else grad.new_empty((k,))
    do_w = need_w and not empty and grad_w.numel() > 0
    do_b = need_b and not empty and k > 0
    if do_w or do_b:
        _weight_and_bias(grad, x, grad_w if do_w else None, grad_b if do_b else None, geometry, meta)
    return grad_x, grad_w, grad_b


def _weight_and_bias(grad, x, grad_w, grad_b, geometry, meta) -> None:
    """Fills grad_w (K, C / groups, KH, KW) and / or grad_b (K,) (either may be None)."""
    n, k, oh, ow = grad.shape
    c, kh, kw, groups = geometry[0], geometry[6], geometry[7], geometry[-1]
    kg, red, rows = k // groups, c // groups * kh * kw, n * oh * ow
    cols = red if grad_w is not None else 1
    # Split the reduction over output positions when the output has too few tiles for the GPU
    # (under the interpreter, in two when it is long enough, so the partials path is exercised).
    if tt.interpreted():
        splits = max(1, min(2, tt.cdiv(rows, 64)))
    else:
        tiles = groups * tt.cdiv(kg, 64) * tt.cdiv(cols, 64)
        splits = max(1, min(tt.cdiv(rows, 512), tt.cdiv(2 * tt.num_sms(grad.device), tiles)))
    m_per_split = tt.cdiv(tt.cdiv(rows, splits), 64) * 64
    splits = tt.cdiv(rows, m_per_split)
    acc = tt.torch_acc_dtype(grad.dtype)
    part_w, part_b = grad_w, grad_b
    if splits > 1:
        part_w = None if grad_w is None else torch.empty((splits, k * red), dtype=acc, device=grad.device)
        part_b = None if grad_b is None else torch.empty((splits, k), dtype=acc, device=grad.device)
    with_weight = grad_w is not None

    def tiles(bm, bn):
        return groups * tt.cdiv(kg, bm) * (tt.cdiv(cols, bn) if with_weight else 1)

    launch(_conv2d_backward_weight_kernel, tiles, kg, cols, rows,
           (grad, x, part_w, part_b, rows, *geometry, m_per_split),
           dict(meta, WEIGHT=with_weight, BIAS=grad_b is not None), grad.dtype, splits)
    if splits > 1:
        if grad_w is not None:
            sum_partials(part_w, grad_w.view(-1))
        if grad_b is not None:
            sum_partials(part_b, grad_b)
