"""Pure-PyTorch k nearest neighbours: the oracle. Exact distances (fastml.ops.cdist's
reference) for a block of queries at a time, ordered by (distance, index) with NaN last, the
first k kept. Memory: one block of queries × all references, never the whole matrix.

Every backend module provides ``forward(query, reference, k, p)``: query (B, Q, M), reference
(B, R, M) contiguous, 1 <= k <= R → (distances (B, Q, k), indices (B, Q, k) int64), ascending,
ties by the lower index.
"""

from __future__ import annotations

import torch

from fastml.ops.cdist import reference as cdist_reference

BLOCK_ELEMENTS = 1 << 24  # distances held at once: 64 MB of float32


def forward(query, reference, k, p):
    b, q, _ = query.shape
    r = reference.shape[1]
    distances = query.new_empty((b, q, k))
    indices = torch.empty((b, q, k), dtype=torch.int64, device=query.device)
    step = max(1, BLOCK_ELEMENTS // max(1, r))
    for start in range(0, q, step):
        block = cdist_reference.forward(query[:, start:start + step], reference, p)
        # A stable sort keeps equal distances in index order; torch.sort puts NaN last.
        values, order = torch.sort(block, dim=-1, stable=True)
        distances[:, start:start + step] = values[..., :k]
        indices[:, start:start + step] = order[..., :k]
    return distances, indices
