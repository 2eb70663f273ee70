"""Pairwise distances in Triton, exact (coordinate differences); signature as in reference.py.

One program per (batch entry, tile of BQ queries, tile of BR references) accumulates the tile
over the coordinates in steps of BD: a [BQ, BR, BD] block of differences per step. Float16 /
bfloat16 inputs accumulate in float32. ``distance_tile`` is shared with the knn kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastml import _triton as tt
from fastml.ops.cdist import norm_code


@triton.jit
def distance_tile(x_ptr, y_ptr, rows, cols, n_rows, n_cols, m, stride_x, stride_y,
                  NORM: tl.constexpr, ACC: tl.constexpr, BQ: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """[BQ, BR] accumulated distances (the square for NORM 2) between rows ``rows`` of x and rows
    ``cols`` of y (row strides stride_x, stride_y; m coordinates). NaN propagates through the
    sums (NORM 2, 1) and is passed over by the maximum (NORM 0), as in torch.cdist."""
    acc = tl.zeros([BQ, BR], ACC)
    for d0 in range(0, m, BD):
        dims = d0 + tl.arange(0, BD)
        a = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_x + dims[None, :],
                    mask=(rows[:, None] < n_rows) & (dims[None, :] < m), other=0).to(ACC)
        b = tl.load(y_ptr + cols.to(tl.int64)[:, None] * stride_y + dims[None, :],
                    mask=(cols[:, None] < n_cols) & (dims[None, :] < m), other=0).to(ACC)
        diff = a[:, None, :] - b[None, :, :]
        if NORM == 2:
            acc += tl.sum(diff * diff, axis=2)
        elif NORM == 1:
            acc += tl.sum(tl.abs(diff), axis=2)
        else:  # as torch.cdist, a NaN coordinate takes no part in the maximum
            size = tl.abs(diff)
            acc = tl.maximum(acc, tl.max(tl.where(size == size, size, 0), axis=2))
    return acc


@triton.jit
def _cdist_kernel(
    x1_ptr,   # (B, P, M) queries
    x2_ptr,   # (B, R, M) references
    out_ptr,  # (B, P, R) distances
    P, R, M,
    NORM: tl.constexpr, ACC: tl.constexpr, BQ: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr,
):
    b = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BQ + tl.arange(0, BQ)
    cols = tl.program_id(1) * BR + tl.arange(0, BR)
    acc = distance_tile(x1_ptr + b * P * M, x2_ptr + b * R * M, rows, cols, P, R, M, M, M,
                        NORM=NORM, ACC=ACC, BQ=BQ, BR=BR, BD=BD)
    if NORM == 2:
        acc = tl.sqrt_rn(acc) if ACC == tl.float32 else tl.sqrt(acc)
    tl.store(out_ptr + b * P * R + rows.to(tl.int64)[:, None] * R + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < P) & (cols[None, :] < R))


def forward(x1, x2, p):
    b, n1, m = x1.shape
    n2 = x2.shape[1]
    out = x1.new_empty((b, n1, n2))
    bq = br = 32 if not tt.interpreted() else 64
    bd = 8
    grid = (tt.cdiv(n1, bq), tt.cdiv(n2, br), b)
    _cdist_kernel[grid](x1, x2, out, n1, n2, m, NORM=norm_code(p), ACC=tt.acc_dtype(x1.dtype), BQ=bq, BR=br, BD=bd)
    return out
