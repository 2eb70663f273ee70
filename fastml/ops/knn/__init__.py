"""k nearest neighbours: per-backend dispatch of the fused distance + top-k kernels.

Backend modules provide ``forward(query, reference, k, p)`` (see reference.py). The kernels
select on exact distances and return them; the indices are not differentiable, so where a
gradient is wanted the chosen neighbours' distances are recomputed from the indices in torch ops
(``neighbour_distances``), which autograd differentiates as torch.cdist + gather would.
"""

from __future__ import annotations

import torch

from fastml import _backend
from fastml.ops import in_custom_op_graph, shape_class, tracks_gradients
from fastml.ops.cdist import KERNEL_NORMS
from fastml.ops.cdist import reference as cdist_reference

IMPLEMENTED = ("triton", "cpp", "numba", "reference")


def impl(backend: str):
    return _backend.load(__name__, backend)


def neighbour_distances(query, reference, indices, p):
    """Distances from each query (B, Q, M) to its neighbours reference[b, indices[b, q]] (indices
    (B, Q, k)), in torch ops: (B, Q, k). Memory B·Q·k·M."""
    batch = torch.arange(query.shape[0], device=query.device)[:, None, None]
    diff = query[:, :, None, :] - reference[batch, indices]
    if p == 2.0:  # the gradient at zero distance is 0, as torch.cdist's
        squared = diff.square().sum(-1)
        zero = squared == 0  # (NaN stays NaN)
        return torch.where(zero, torch.zeros_like(squared), torch.where(zero, 1.0, squared).sqrt())
    return torch.linalg.vector_norm(diff, ord=p, dim=-1)


def oracle_distances(query, reference, indices, p):
    """Distances from each query (B, Q, M) to its neighbours reference[b, indices[b, q]] (indices
    (B, Q, k)) by the oracle's own kernel (torch.cdist without its matrix-product shortcut, as
    reference.exhaustive computes them): each pair's sum rounds as the oracle's does, whatever the
    CPU. (A sum in other torch ops rounds by its own vector width: on an AVX-512 CPU ``square().
    sum(-1)`` and cdist differed in the last bit, and two neighbours tied in one and not in the
    other came out in the other order.) Not differentiable: see ``neighbour_distances``."""
    b, q, k = indices.shape
    m = query.shape[-1]
    batch = torch.arange(b, device=query.device)[:, None, None]
    near = reference[batch, indices].reshape(b * q, k, m)
    return cdist_reference.forward(query.reshape(b * q, 1, m), near, p).reshape(b, q, k)


def order_neighbours(query, reference, indices, p):
    """(distances, indices) for a selected set of neighbours (B, Q, k) in no particular order:
    their distances as the oracle computes them (``oracle_distances``), then the neighbour order,
    (distance, index) ascending with NaN last, by two stable sorts."""
    indices, _ = torch.sort(indices, dim=-1)
    distances = oracle_distances(query, reference, indices, p)
    distances, order = torch.sort(distances, dim=-1, stable=True)
    return distances, torch.gather(indices, -1, order)


def select(query, reference, k, p, kernels: bool) -> str:
    """The backend for a call: the selected one where ``kernels`` and p has kernels, else the reference."""
    if not (kernels and p in KERNEL_NORMS):
        return "reference"
    return _backend.select(query, IMPLEMENTED, shape_class("knn", "forward", (query, reference), k, p),
                           lambda name: impl(name).forward(query, reference, k, p))


def knn(query, reference, k, p, backend=None):
    """(distances, indices) of the k nearest references (B, R, M) of each query (B, Q, M), both
    contiguous of one dtype and device, 1 <= k <= R. p outside fastml.ops.cdist.KERNEL_NORMS,
    or ``backend="reference"``, runs the reference (torch ops throughout)."""
    with torch.no_grad():
        if in_custom_op_graph():
            distances, indices = torch.ops.fastml.knn(query.detach(), reference.detach(), k, p, backend is None)
        else:
            distances, indices = impl(select(query.detach(), reference.detach(), k, p, backend is None)).forward(query.detach(), reference.detach(),
                                                                                 k, p)
    if tracks_gradients(query, reference):
        distances = neighbour_distances(query, reference, indices, p)
    return distances, indices
