"""k nearest neighbours in Triton; signature as in reference.py.

One program per (batch entry, tile of BQ queries) streams the references in tiles of BR: each
tile's exact distances (fastml.ops.cdist.triton_impl.distance_tile) are merged into the queries'
k best, kept in registers as [BQ, KP] distances and indices (KP = k rounded up to a power of
two; the extra slots hold -inf and are never replaced). A tile whose every distance is beyond
every query's current worst is skipped after one comparison. The kernel selects the set;
ordering it by (distance, index) and recomputing its distances exactly is left to torch ops
(fastml.ops.knn.order_neighbours), O(Q·k). NaN distances rank as +inf here (ties by index).

k above MAX_REGISTER_K takes the reference's blocked path (a block of queries × all references
at a time), slower but with no cap on k.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastml import _triton as tt
from fastml.ops.cdist import norm_code
from fastml.ops.cdist.triton_impl import distance_tile
from fastml.ops.knn import order_neighbours
from fastml.ops.knn import reference as knn_reference

MAX_REGISTER_K = 64


@triton.jit
def _knn_kernel(
    x1_ptr,      # (B, Q, M) queries
    x2_ptr,      # (B, R, M) references
    out_j_ptr,   # (B, Q, k) int64: the chosen references, in no particular order
    Q, R, M, K,
    NORM: tl.constexpr, ACC: tl.constexpr, BQ: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr,
    KP: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BQ + tl.arange(0, BQ)
    slots = tl.arange(0, KP)
    inf = float("inf")
    # Empty slots: +inf with distinct indices past every reference, so a real candidate
    # precedes them; slots past k: -inf, never the worst, never replaced.
    best_d = tl.where(slots[None, :] < K, inf, -inf) + tl.zeros([BQ, KP], ACC)
    best_j = (R + slots)[None, :] + tl.zeros([BQ, KP], tl.int64)
    x1 = x1_ptr + b * Q * M
    x2 = x2_ptr + b * R * M
    for c0 in range(0, R, BR):
        cols = c0 + tl.arange(0, BR)
        tile = distance_tile(x1, x2, rows, cols, Q, R, M, M, M, NORM=NORM, ACC=ACC, BQ=BQ, BR=BR, BD=BD)
        tile = tl.where(tile == tile, tile, inf)  # NaN ranks as +inf
        tile = tl.where(cols[None, :] < R, tile, float("nan"))  # padding: never a candidate
        worst = tl.max(best_d, axis=1)
        if tl.max(tl.where(tile <= worst[:, None], 1, 0)) > 0:
            for c in range(BR):
                cand = tl.sum(tl.where(tl.arange(0, BR)[None, :] == c, tile, 0.0), axis=1)
                j = c0 + c
                worst = tl.max(best_d, axis=1)
                worst_j = tl.max(tl.where(best_d == worst[:, None], best_j, -1), axis=1)
                better = (cand < worst) | ((cand == worst) & (j < worst_j))
                slot = (best_d == worst[:, None]) & (best_j == worst_j[:, None]) & better[:, None]
                best_d = tl.where(slot, cand[:, None], best_d)
                best_j = tl.where(slot, j, best_j)
    out = out_j_ptr + b * Q * K + rows.to(tl.int64)[:, None] * K + slots[None, :]
    tl.store(out, best_j, mask=(rows[:, None] < Q) & (slots[None, :] < K))


def forward(query, reference, k, p):
    if k > MAX_REGISTER_K:
        return knn_reference.forward(query, reference, k, p)
    b, q, m = query.shape
    r = reference.shape[1]
    indices = torch.empty((b, q, k), dtype=torch.int64, device=query.device)
    bq, br, bd = (16, 32, 8) if tt.interpreted() else (32, 32, 8)
    _knn_kernel[(triton.cdiv(q, bq), b)](query, reference, indices, q, r, m, k, NORM=norm_code(p),
                                         ACC=tt.acc_dtype(query.dtype), BQ=bq, BR=br, BD=bd,
                                         KP=tt.next_pow2(k))
    return order_neighbours(query, reference, indices, p)
