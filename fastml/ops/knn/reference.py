"""Pure-PyTorch k nearest neighbours: the reference backend and the oracle.

Every backend module provides ``forward(query, reference, k, p)``: query (B, Q, M), reference
(B, R, M) contiguous, 1 <= k <= R → (distances (B, Q, k), indices (B, Q, k) int64), exact
distances (coordinate differences), ascending, ties by the lower index, NaN last.

``exhaustive`` is the oracle: exact distances (fastml.ops.cdist's reference) for a block of
queries at a time, a stable sort, the first k kept. It is what torch.cdist without its
matrix-product shortcut gives, and it is slow: a quarter of the flops of the matrix product go
through a loop torch does not block for cache (at Q=1024, R=16384, M=64, 1.2 s on a 2-core
Zen 4 against 60 ms for torch.cdist + topk).

``forward`` gives the oracle's answer at the matrix product's speed, for the euclidean norm in
float32 / float64. A *screen* ranks every reference by |r|² - 2 q·r, one batched matrix product
(torch's BLAS) on coordinates centred on the references' mean, and keeps each query's
k + SCREEN_EXTRA best. Those candidates' distances are then computed exactly and ordered as the
oracle orders them. The product's rounding can misrank, so each query's answer is *certified*:
a rounding-error bound on the screen (below) proves that every reference the screen dropped is
farther than the k-th candidate by more than the inputs' own rounding. A query whose answer
cannot be certified (near-ties at the cut, points far from their mean relative to their spread,
NaN or inf anywhere) is answered by ``exhaustive``. The screen is an optimisation, never an
approximation: its output is the oracle's.
"""

from __future__ import annotations

import torch

from fastml.ops.cdist import reference as cdist_reference
from fastml.ops.knn import order_neighbours

BLOCK_ELEMENTS = 1 << 22  # screen scores held at once: 16 MB of float32, the size of an L2/L3 slice
EXHAUSTIVE_BLOCK_ELEMENTS = 1 << 24  # exact distances held at once by the exhaustive scan: 64 MB of float32
SCREEN_EXTRA = 8  # candidates kept beyond k: room for near-ties at the cut before a query falls back
SELECT_BLOCK = 64  # scores per block in the two-stage selection (_smallest)
_SCREENED_DTYPES = (torch.float32, torch.float64)


def exhaustive(query, reference, k, p):
    b, q, _ = query.shape
    r = reference.shape[1]
    distances = query.new_empty((b, q, k))
    indices = torch.empty((b, q, k), dtype=torch.int64, device=query.device)
    step = max(1, EXHAUSTIVE_BLOCK_ELEMENTS // max(1, r))
    for start in range(0, q, step):
        block = cdist_reference.forward(query[:, start:start + step], reference, p)
        # A stable sort keeps equal distances in index order; torch.sort puts NaN last.
        values, order = torch.sort(block, dim=-1, stable=True)
        distances[:, start:start + step] = values[..., :k]
        indices[:, start:start + step] = order[..., :k]
    return distances, indices


def forward(query, reference, k, p):
    if p != 2.0 or query.dtype not in _SCREENED_DTYPES or k + SCREEN_EXTRA >= reference.shape[1]:
        return exhaustive(query, reference, k, p)  # nothing to screen out, or no product to screen with
    distances = query.new_empty((*query.shape[:2], k))
    indices = torch.empty(distances.shape, dtype=torch.int64, device=query.device)
    for batch in range(query.shape[0]):
        _screened(query[batch], reference[batch], k, distances[batch], indices[batch])
    return distances, indices


def _matmul_roundoff(dtype: torch.dtype) -> float:
    """A bound on the relative rounding of one step of the screen's matrix product: the dtype's
    epsilon (twice its unit roundoff, a margin for blocked and fused summation), or bfloat16's
    where torch may run float32 products in TF32 or bfloat16."""
    eps = torch.finfo(dtype).eps
    if dtype == torch.float32:
        reduced = torch.get_float32_matmul_precision() != "highest"
        mkldnn = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
        reduced = reduced or getattr(mkldnn, "fp32_precision", "ieee") in ("bf16", "tf32")
        if reduced:
            eps = torch.finfo(torch.bfloat16).eps
    return eps


def screen_bound(dtype: torch.dtype, n_features: int, roundoff: float) -> tuple[float, float]:
    """(gamma, floor) of a screen over ``n_features`` coordinates whose product rounds each step by
    at most ``roundoff`` (relative): its scores err by at most gamma·(|r_c|² + 2|q_c||r_c|) + floor.
    gamma covers the (M + 2)-term sums of the product and the norms, doubled; floor, underflow
    (flushed to zero included)."""
    return 2.0 * (n_features + 4) * roundoff, 4.0 * (n_features + 4) * torch.finfo(dtype).tiny


def certify(q, q_c, reference, k, candidates, cut, ref_c_max, bound, distances_out, indices_out):
    """Answers queries q (Q, M) from a screen's ``candidates`` (Q, keep) of reference (R, M):
    their exact distances, ordered, into distances_out / indices_out (Q, k); rows whose answer the
    screen's error ``bound`` (screen_bound) cannot certify are answered by ``exhaustive``.

    q_c: the queries centred as the screen saw them; cut (Q,): a score every dropped reference
    reached; ref_c_max: the largest |r_c| (NaN or inf here fails every certificate)."""
    gamma, floor = bound
    eps_in = torch.finfo(q.dtype).eps
    q_c64 = q_c.double()
    q_c_norm = q_c64.norm(dim=1)
    error = gamma * (ref_c_max * ref_c_max + 2 * q_c_norm * ref_c_max) + floor
    # A dropped r has |q_c - r_c|² >= cut - error + |q_c|²; centring rounded each coordinate
    # by at most eps_in/2 of its size, so |q - r| >= |q_c - r_c| - eps_in (|q_c| + |r_c|).
    dropped = (cut.double() - error + q_c64.square().sum(1)).clamp_min(0).sqrt()
    dropped = (dropped - eps_in * (q_c_norm + ref_c_max)).clamp_min(0).square()
    near, order = order_neighbours(q[None], reference[None], candidates[None], 2.0)
    near, order = near[0, :, :k], order[0, :, :k]
    # The k-th neighbour's squared distance in float64 (float32 differences are exact there).
    kth = (q.double() - reference[order[:, -1]].double()).square().sum(1)
    certified = dropped > kth * (1 + gamma) + floor  # NaN anywhere: False
    distances_out.copy_(near)
    indices_out.copy_(order)
    if not bool(certified.all()):
        rows = (~certified).nonzero()[:, 0]
        d, i = exhaustive(q[rows][None], reference[None], k, 2.0)
        distances_out[rows], indices_out[rows] = d[0], i[0]


def _screened(query, reference, k, distances_out, indices_out):
    """One batch entry: query (Q, M), reference (R, M) → rows of distances_out / indices_out (Q, k)."""
    n_query, n_features = query.shape
    n_ref = reference.shape[0]
    keep = k + SCREEN_EXTRA
    bound = screen_bound(query.dtype, n_features, _matmul_roundoff(query.dtype))
    centre = reference.mean(dim=0, keepdim=True)
    ref_c = reference - centre
    # One product gives |r_c|² - 2 q_c·r_c: [q_c, 1] · [-2 r_c, |r_c|²]ᵀ (an extra pass to add the
    # norms, as addmm's broadcast bias does, costs more than the product's 65th column).
    screen_ref = query.new_empty((n_ref, n_features + 1))
    torch.mul(ref_c, -2, out=screen_ref[:, :n_features])
    torch.sum(ref_c * ref_c, dim=1, out=screen_ref[:, n_features])
    ref_c_max = ref_c.double().norm(dim=1).max()
    step = max(1, BLOCK_ELEMENTS // n_ref)
    screen_query = query.new_ones((min(step, n_query), n_features + 1))
    # One buffer for every block's scores: a fresh 16 MB each block would fault in its pages anew.
    scores_buffer = query.new_empty((min(step, n_query), n_ref))
    for start in range(0, n_query, step):
        q = query[start:start + step]
        q_c = q - centre
        rows = q.shape[0]
        screen_query[:rows, :n_features] = q_c
        scores = torch.mm(screen_query[:rows], screen_ref.T, out=scores_buffer[:rows])  # |q_c - r_c|² - |q_c|²
        kept_scores, candidates = _smallest(scores, keep)
        certify(q, q_c, reference, k, candidates, kept_scores.amax(1), ref_c_max, bound,
                distances_out[start:start + step], indices_out[start:start + step])


def _smallest(scores, keep):
    """(values, columns) of ``keep`` scores per row such that every score left out is at least
    the largest kept (ties may go either way), unordered: what the certificate needs, not an
    exact top-k. torch.topk over a 16384-wide row costs about as much as the product that made
    it, so the rows are cut into blocks of SELECT_BLOCK: the ``keep`` blocks with the smallest
    minima are gathered (with any tail shorter than a block), and the top-k runs over those
    alone. Why it is enough: let T be the largest of the chosen blocks' minima; the gathered
    scores hold ``keep`` scores <= T (the minima), so the largest kept is <= T, and every score
    of a block not chosen is >= its minimum >= T."""
    rows, width = scores.shape
    blocks = width // SELECT_BLOCK
    if blocks <= 2 * keep:  # too few blocks to leave many out: one top-k
        return torch.topk(scores, keep, dim=1, largest=False, sorted=False)
    body = scores[:, :blocks * SELECT_BLOCK].view(rows, blocks, SELECT_BLOCK)
    _, chosen = torch.topk(body.amin(2), keep, dim=1, largest=False, sorted=False)
    gathered = body.gather(1, chosen[:, :, None].expand(rows, keep, SELECT_BLOCK)).reshape(rows, keep * SELECT_BLOCK)
    tail = scores[:, blocks * SELECT_BLOCK:]
    if tail.shape[1]:
        gathered = torch.cat([gathered, tail], dim=1)
    values, positions = torch.topk(gathered, keep, dim=1, largest=False, sorted=False)
    in_body = positions < keep * SELECT_BLOCK
    block = chosen.gather(1, torch.where(in_body, positions // SELECT_BLOCK, 0))
    columns = torch.where(in_body, block * SELECT_BLOCK + positions % SELECT_BLOCK,
                          positions - keep * SELECT_BLOCK + blocks * SELECT_BLOCK)
    return values, columns
