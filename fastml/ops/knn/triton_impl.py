"""k nearest neighbours in Triton; signature as in reference.py.

Euclidean float32 neighbours take the *screen* of reference.py (centred coordinates, scores
|r_c|² - 2 q_c·r_c, a certificate per query, the exhaustive scan where it cannot certify), with
the screen fused into one kernel, ``_screen_kernel``: each program takes BQ queries, computes
their scores against BR references at a time on the tensor cores (``tl.dot``, tf32x3: three TF32
products, about float32's accuracy; TF32 alone where torch allows it for float32 products), and
keeps each query's KP smallest in registers, so no Q×R block of scores exists in memory. A
score and its column are packed into one int64 key (order-preserving float bits above, the
column below): one integer minimum picks the smallest score and, among equal scores, the lower
column. A tile's candidates are inserted by replacing each row's worst kept key, one per row per
step, only while some row still has a candidate better than its worst (after the first tiles,
one or two steps). The kernel returns the KP kept columns and the largest kept score; the
certificate and the exact ordering are reference.py's (``certify``).

Other norms, float64 and half inputs, and k too large for the screen's registers take the exact
kernel below.

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
# The screen keeps next_pow2(k + SCREEN_EXTRA) candidates per query in registers: at most this many.
MAX_SCREEN_SLOTS = 64
# A screen launch below this many scores (Q·R) runs one fixed tile; above it, the tile is tuned
# once per shape bucket on the GPU (every config compiles, so small test shapes skip the tuning).
TUNE_MIN_SCORES = 1 << 24
# Rounding of one step of the screen's product, relative (reference.screen_bound): tf32x3 drops
# the product of the operands' low parts and rounds each low part to TF32 (about 2**-22 each),
# and the tensor cores' float32 accumulation may truncate: 8 float32 epsilons (2**-20) bounds it.
# TF32 alone (where torch allows it) rounds each operand to 11 bits: bfloat16's epsilon bounds it.
TF32X3_ROUNDOFF = 8 * torch.finfo(torch.float32).eps
TF32_ROUNDOFF = torch.finfo(torch.bfloat16).eps
# Queries certified at once: order_neighbours gathers a (rows, KP, M) block of references.
CERTIFY_ROWS = 1 << 14
_MAX_KEY = tl.constexpr(0x7FFFFFFFFFFFFFFF)  # above every key, real or empty


@triton.jit
def _screen_kernel(
    q_ptr,     # (B, Q, M) float32 queries, centred on their batch entry's reference mean
    r_ptr,     # (B, R, M) float32 references, centred likewise
    rn_ptr,    # (B, R) float32 |r_c|²
    cand_ptr,  # (B, Q, KP) int64: each query's KP kept references, in no particular order
    cut_ptr,   # (B, Q) float32: each query's largest kept score (every dropped one scored at least it)
    Q, R, M,
    Q_BUCKET, R_BUCKET, M_BUCKET,  # autotune key only
    PREC: tl.constexpr, BQ: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, KP: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BQ + tl.arange(0, BQ)
    row_ok = rows < Q
    q_rows = q_ptr + b * Q * M + rows.to(tl.int64)[:, None] * M
    r_base = r_ptr + b * R * M
    slots = tl.arange(0, KP)
    # Empty slots: keys above every real one (a real score's bits are at most +inf's, 0x7f800000),
    # distinct, so the row's worst slot is always one slot.
    best = (tl.full([BQ, KP], 0x7FFFFFFF, tl.int64) << 32) + (R + slots)[None, :].to(tl.int64)
    worst = tl.max(best, axis=1)
    for c0 in range(0, R, BR):
        cols = c0 + tl.arange(0, BR)
        col_ok = cols < R
        acc = tl.zeros([BQ, BR], tl.float32)
        for d0 in range(0, M, BK):
            dims = d0 + tl.arange(0, BK)
            dim_ok = dims < M
            a = tl.load(q_rows + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
            bt = tl.load(r_base + cols.to(tl.int64)[None, :] * M + dims[:, None],
                         mask=dim_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(a, bt, acc, input_precision=PREC)
        rn = tl.load(rn_ptr + b * R + cols, mask=col_ok, other=0.0)
        score = rn[None, :] - 2.0 * acc
        score = tl.where(score == score, score, float("inf"))  # NaN (fails its certificate) ranks last
        bits = score.to(tl.int32, bitcast=True)
        bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # float order as signed integers
        key = (bits.to(tl.int64) << 32) + cols.to(tl.int64)[None, :]
        # Only candidates better than their row's worst kept key stay; the padding never does.
        key = tl.where(col_ok[None, :] & (key < worst[:, None]), key, _MAX_KEY)
        low = tl.min(key, axis=1)
        while tl.min(low, axis=0) < _MAX_KEY:
            # Each row with a candidate left puts its best into its worst slot.
            best = tl.where((best == worst[:, None]) & (low < _MAX_KEY)[:, None], low[:, None], best)
            worst = tl.max(best, axis=1)
            key = tl.where((key == low[:, None]) | (key >= worst[:, None]), _MAX_KEY, key)
            low = tl.min(key, axis=1)
    out_at = b * Q * KP + rows.to(tl.int64)[:, None] * KP + slots[None, :]
    tl.store(cand_ptr + out_at, best - ((best >> 32) << 32), mask=row_ok[:, None])
    cut_bits = (worst >> 32).to(tl.int32)
    cut_bits = tl.where(cut_bits < 0, cut_bits ^ 0x7FFFFFFF, cut_bits)
    tl.store(cut_ptr + b * Q + rows, cut_bits.to(tl.float32, bitcast=True), mask=row_ok)


# Tiles whose sm_90 build keeps everything in registers (no stack; 188 to 252 registers a thread).
_SCREEN_CONFIGS = [tt.cfg(8, 2, BQ=64, BR=64, BK=32), tt.cfg(8, 2, BQ=64, BR=64, BK=16),
                   tt.cfg(8, 3, BQ=64, BR=64, BK=16), tt.cfg(8, 2, BQ=64, BR=128, BK=32),
                   tt.cfg(4, 2, BQ=32, BR=64, BK=32)]
_screen_tuned = triton.autotune(configs=_SCREEN_CONFIGS, key=["Q_BUCKET", "R_BUCKET", "M_BUCKET", "KP"])(
    _screen_kernel)


def _screen_roundoff() -> tuple[str, float]:
    """(input_precision, its rounding bound) of the screen's float32 product."""
    if tt.dot_precision(torch.float32) == "tf32":
        return "tf32", TF32_ROUNDOFF
    return ("ieee" if tt.interpreted() else "tf32x3"), TF32X3_ROUNDOFF


def _screen(query_c, reference_c, ref_norms, slots, precision):
    """(candidates (B, Q, slots) int64, cut (B, Q) float32) of the fused screen."""
    b, q, m = query_c.shape
    r = reference_c.shape[1]
    candidates = torch.empty((b, q, slots), dtype=torch.int64, device=query_c.device)
    cut = torch.empty((b, q), dtype=torch.float32, device=query_c.device)
    args = (query_c, reference_c, ref_norms, candidates, cut, q, r, m,
            tt.size_bucket(q), tt.size_bucket(r), tt.size_bucket(m))
    if tt.interpreted():
        _screen_kernel[(tt.cdiv(q, 32), b)](*args, PREC=precision, BQ=32, BR=32, BK=16, KP=slots)
    elif q * r < TUNE_MIN_SCORES:
        _screen_kernel[(tt.cdiv(q, 64), b)](*args, PREC=precision, BQ=64, BR=64, BK=32, KP=slots,
                                            num_warps=8, num_stages=2)
    else:
        def grid(meta):
            return (tt.cdiv(q, meta["BQ"]), b)

        key = (tt.size_bucket(q), tt.size_bucket(r), tt.size_bucket(m), slots, precision)
        tt.launch_tuned(_screen_tuned, _screen_kernel, grid, key, *args, PREC=precision, KP=slots)
    return candidates, cut


def _screen_slots(k: int) -> int:
    """Candidates the screen keeps per query: k and the reference's margin, to a power of two."""
    return tt.next_pow2(k + knn_reference.SCREEN_EXTRA)


def _screened_forward(query, reference, k):
    """reference.forward's screened answer for float32 euclidean neighbours, the screen fused."""
    b, n_query, n_features = query.shape
    slots = _screen_slots(k)
    precision, roundoff = _screen_roundoff()
    bound = knn_reference.screen_bound(query.dtype, n_features, roundoff)
    centre = reference.mean(dim=1, keepdim=True)
    reference_c = (reference - centre).contiguous()
    query_c = (query - centre).contiguous()
    candidates, cut = _screen(query_c, reference_c, reference_c.square().sum(2), slots, precision)
    distances = query.new_empty((b, n_query, k))
    indices = torch.empty((b, n_query, k), dtype=torch.int64, device=query.device)
    for batch in range(b):
        ref_c_max = reference_c[batch].double().norm(dim=1).max()
        for start in range(0, n_query, CERTIFY_ROWS):
            rows = slice(start, start + CERTIFY_ROWS)
            knn_reference.certify(query[batch, rows], query_c[batch, rows], reference[batch], k,
                                  candidates[batch, rows], cut[batch, rows], ref_c_max, bound,
                                  distances[batch, rows], indices[batch, rows])
    return distances, indices


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


def _screens(query, reference, k, p) -> bool:
    """Whether the fused screen answers this call: euclidean float32, k small enough for its
    registers, and references to drop (at least twice as many as its slots)."""
    slots = _screen_slots(k)
    return (p == 2.0 and query.dtype == torch.float32 and query.shape[2] > 0 and slots <= MAX_SCREEN_SLOTS
            and reference.shape[1] >= 2 * slots)


def forward(query, reference, k, p):
    if _screens(query, reference, k, p):
        return _screened_forward(query, reference, k)
    if k > MAX_REGISTER_K:
        return knn_reference.forward(query, reference, k, p)
    b, q, m = query.shape
    r = reference.shape[1]
    indices = torch.empty((b, q, k), dtype=torch.int64, device=query.device)
    bq, br, bd = (16, 32, 8) if tt.interpreted() else (32, 32, 8)
    _knn_kernel[(tt.cdiv(q, bq), b)](query, reference, indices, q, r, m, k, NORM=norm_code(p),
                                     ACC=tt.acc_dtype(query.dtype), BQ=bq, BR=br, BD=bd, KP=tt.next_pow2(k))
    return order_neighbours(query, reference, indices, p)
