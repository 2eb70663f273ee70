"""Linear layer in Triton; signatures and semantics as in reference.py.

All three functions are one tiled matmul kernel C = A @ B (+ bias) on strided views:
forward x @ Wᵀ + b, backward_input grad @ W, backward_weight gradᵀ @ x with the column sums of
grad (the bias gradient) taken from the same tiles of gradᵀ. When the output has few tiles and
the reduction dimension is long (backward_weight over a large batch) the K range is split across
programs, whose partials are summed afterwards in a fixed order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastml import _triton as tt

_AUTOTUNE_MIN_FLOPS = 1 << 24


@triton.jit
def _matmul_kernel(
    a_ptr,       # (M, K) strided by (s_am, s_ak)
    b_ptr,       # (K, N) strided by (s_bk, s_bn)
    c_ptr,       # (SPLIT, M, N) contiguous output (SPLIT = 1: the result itself)
    bias_ptr,    # (N,) added to every row (when HAS_BIAS)
    rowsum_ptr,  # (SPLIT, M) sums of A's rows over K (when ROW_SUM)
    M, N, K, K_PER_SPLIT,
    s_am, s_ak, s_bk, s_bn,
    M_BUCKET, N_BUCKET, K_BUCKET,  # autotune key only
    HAS_BIAS: tl.constexpr, ROW_SUM: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr, USE_DOT: tl.constexpr,
    UPCAST: tl.constexpr,  # operands to ACC before the product (bfloat16 under the interpreter)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    tiles_n = tl.maximum(tl.cdiv(N, BLOCK_N), 1)  # N = 0 still runs one column of tiles (row sums)
    pid_m = pid // tiles_n
    pid_n = pid % tiles_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    nmask = offs_n < N
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * s_am
    b_cols = b_ptr + offs_n.to(tl.int64)[None, :] * s_bn
    k_lo = split * K_PER_SPLIT
    k_hi = tl.minimum(K, k_lo + K_PER_SPLIT)
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    rs = tl.zeros([BLOCK_M], ACC)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < k_hi
        k64 = offs_k.to(tl.int64)
        a = tl.load(a_rows + k64[None, :] * s_ak, mask=mmask[:, None] & kmask[None, :], other=0)
        b = tl.load(b_cols + k64[:, None] * s_bk, mask=kmask[:, None] & nmask[None, :], other=0)
        if UPCAST:
            acc = tt.mm(a.to(ACC), b.to(ACC), acc, PREC, USE_DOT)
        else:
            acc = tt.mm(a, b, acc, PREC, USE_DOT)
        if ROW_SUM:
            rs += tl.sum(a.to(ACC), axis=1)
    if HAS_BIAS:
        if split == 0:  # once, not once per K split
            acc += tl.load(bias_ptr + offs_n, mask=nmask, other=0).to(ACC)[None, :]
    c = c_ptr + split.to(tl.int64) * M * N
    tl.store(c + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])
    if ROW_SUM:
        if pid_n == 0:
            tl.store(rowsum_ptr + split.to(tl.int64) * M + offs_m, rs.to(rowsum_ptr.dtype.element_ty), mask=mmask)


_CONFIGS = [
    tt.cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32),
    tt.cfg(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32),
    tt.cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32),
    tt.cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64),
    tt.cfg(4, 3, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64),
    tt.cfg(4, 3, BLOCK_M=64, BLOCK_N=32, BLOCK_K=64),
]
_CONFIGS_FP64 = [
    tt.cfg(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=16),
    tt.cfg(4, 3, BLOCK_M=32, BLOCK_N=64, BLOCK_K=32),
    tt.cfg(4, 3, BLOCK_M=64, BLOCK_N=32, BLOCK_K=32),
    tt.cfg(4, 2, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32),
]
_KEY = ["M_BUCKET", "N_BUCKET", "K_BUCKET", "HAS_BIAS", "ROW_SUM"]
_tuned = triton.autotune(configs=_CONFIGS, key=_KEY)(_matmul_kernel)
_tuned_fp64 = triton.autotune(configs=_CONFIGS_FP64, key=_KEY)(_matmul_kernel)


def _matmul(a, a_strides, b, b_strides, M, N, K, bias=None, row_sum=False):
    """(A @ B [+ bias], row sums of A or None) with A (M, K), B (K, N) given by base + strides."""
    dtype, device = a.dtype, a.device
    out = torch.empty((M, N), dtype=dtype, device=device)
    rowsum = torch.empty((M,), dtype=dtype, device=device) if row_sum else None
    if M == 0 or (N == 0 and not row_sum):
        return out, rowsum
    interp = tt.interpreted()
    use_dot = tt.use_dot(dtype)
    # Split K when the output has few tiles but K is long, so every SM has work.
    base = 64 if use_dot else 16
    tiles = tt.cdiv(M, base) * max(1, tt.cdiv(N, base))
    if interp:
        split = max(1, min(2, tt.cdiv(K, 64)))
    else:
        split = max(1, min(tt.cdiv(K, 512), tt.cdiv(2 * tt.num_sms(device), tiles)))
    k_per_split = tt.cdiv(tt.cdiv(max(K, 1), split), 64) * 64
    split = max(1, tt.cdiv(K, k_per_split))
    acc_torch = tt.torch_acc_dtype(dtype)
    c = out if split == 1 else torch.empty((split, M, N), dtype=acc_torch, device=device)
    rs = rowsum if split == 1 else (torch.empty((split, M), dtype=acc_torch, device=device) if row_sum else None)
    args = (a, b, c, bias, rs, M, N, K, k_per_split, *a_strides, *b_strides,
            tt.size_bucket(M), tt.size_bucket(N), tt.size_bucket(K))
    meta = dict(HAS_BIAS=bias is not None, ROW_SUM=row_sum, ACC=tt.acc_dtype(dtype),
                PREC=tt.dot_precision(dtype), USE_DOT=use_dot,
                UPCAST=interp and dtype == torch.bfloat16)
    if interp:
        bm, bn, bk = tt.block(M, 16, 64), tt.block(N, 16, 64), tt.block(k_per_split, 16, 64)
        grid = (tt.cdiv(M, bm) * max(1, tt.cdiv(N, bn)), split)
        _matmul_kernel[grid](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4)
    elif not use_dot:
        grid = (tt.cdiv(M, 16) * max(1, tt.cdiv(N, 16)), split)
        _matmul_kernel[grid](*args, **meta, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=2)
    elif 2 * M * N * K < _AUTOTUNE_MIN_FLOPS:
        grid = (tt.cdiv(M, 64) * max(1, tt.cdiv(N, 64)), split)
        _matmul_kernel[grid](*args, **meta, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)
    else:
        tuned = _tuned_fp64 if dtype == torch.float64 else _tuned

        def grid(meta_):
            return (tt.cdiv(M, meta_["BLOCK_M"]) * max(1, tt.cdiv(N, meta_["BLOCK_N"])), split)

        key = (tt.size_bucket(M), tt.size_bucket(N), tt.size_bucket(K), dtype, bias is not None, row_sum)
        tt.launch_tuned(tuned, _matmul_kernel, grid, key, *args, **meta)
    if split > 1:
        if N:
            out.copy_(c.sum(0))
        if row_sum:
            rowsum.copy_(rs.sum(0))
    return out, rowsum


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    n, d = x.shape
    o = weight.shape[0]
    # A = x (N, D); B = Wᵀ (D, O): element (k, j) at weight + j·D + k
    return _matmul(x, (d, 1), weight, (1, d), n, o, d, bias=bias)[0]


def backward_input(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    n, o = grad.shape
    d = weight.shape[1]
    # A = grad (N, O); B = W (O, D)
    return _matmul(grad, (o, 1), weight, (d, 1), n, d, o)[0]


def backward_weight(grad: torch.Tensor, x: torch.Tensor, need_bias: bool):
    n, o = grad.shape
    d = x.shape[1]
    # A = gradᵀ (O, N): element (i, k) at grad + k·O + i; B = x (N, D)
    grad_w, grad_b = _matmul(grad, (1, o), x, (d, 1), o, d, n, row_sum=bool(need_bias))
    return grad_w, grad_b
