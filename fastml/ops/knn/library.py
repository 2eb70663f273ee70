"""fastml::knn: the fused distance + top-k kernels as a torch.library custom op, with fake, for
torch.compile / torch.export (see fastml/_library.py). No autograd: as in eager, gradients flow
through the neighbours' distances recomputed in torch ops (fastml.ops.knn.neighbour_distances)."""

import torch
from torch import Tensor

from fastml.ops.knn import impl, select


@torch.library.custom_op("fastml::knn", mutates_args=())
def knn(query: Tensor, reference: Tensor, k: int, p: float, kernels: bool) -> tuple[Tensor, Tensor]:
    """query (B, Q, M), reference (B, R, M), 1 <= k <= R → (distances (B, Q, k), indices (B, Q, k)
    int64); on the kernels where ``kernels`` and p has them, else on the reference."""
    return impl(select(query, reference, k, p, kernels)).forward(query.contiguous(), reference.contiguous(), k, p)


@knn.register_fake
def _(query, reference, k, p, kernels):
    shape = (query.shape[0], query.shape[1], k)
    return query.new_empty(shape), query.new_empty(shape, dtype=torch.int64)
