"""fastml::knn: the fused distance + top-k kernels as a torch.library custom op, with fake, for
torch.compile / torch.export (see fastml/_library.py). No autograd: as in eager, gradients flow
through the neighbours' distances recomputed in torch ops (fastml.ops.knn.neighbour_distances)."""

import torch
from torch import Tensor

from fastml.ops import _contract as contract
from fastml.ops.cdist.library import check_points
from fastml.ops.knn import impl, select


@torch.library.custom_op("fastml::knn", mutates_args=())
def knn(query: Tensor, reference: Tensor, k: int, p: float, kernels: bool) -> tuple[Tensor, Tensor]:
    """query (B, Q, M), reference (B, R, M), 1 <= k <= R → (distances (B, Q, k), indices (B, Q, k)
    int64); on the kernels where ``kernels`` and p has them, else on the reference."""
    _check(query, reference, k, p)
    return impl(select(query, reference, k, p, kernels)).forward(query.contiguous(), reference.contiguous(), k, p)


def _check(query: Tensor, reference: Tensor, k: int, p: float) -> None:
    check_points("knn", "query", query, "reference", reference)
    if not 1 <= k <= reference.shape[1]:
        contract.fail("knn", ValueError, f"k must be between 1 and the number of reference points "
                                         f"({reference.shape[1]}), got k={k}")
    if not p >= 0:  # (NaN too)
        contract.fail("knn", ValueError, f"p must be a non-negative number, got {p}")


@knn.register_fake
def _(query, reference, k, p, kernels):
    _check(query, reference, k, p)
    shape = (query.shape[0], query.shape[1], k)
    return query.new_empty(shape), query.new_empty(shape, dtype=torch.int64)
