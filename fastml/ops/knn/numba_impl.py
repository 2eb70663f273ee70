"""k nearest neighbours on numba, the twin of csrc/knn.cpp (without its register tiling): one
query per task, its k best kept in a bounded max-heap as the references stream past; signature
as in reference.py."""

from __future__ import annotations

import numba
import torch

from fastml import _numba as nb
from fastml._numba import jit, pjit
from fastml.ops.cdist import norm_code
from fastml.ops.cdist.numba_impl import finish, ordering_distance


@jit
def _precedes(d1, j1, d2, j2):
    """Whether (d1, j1) comes first in the neighbour order (NaN after every number)."""
    if d1 != d1:
        return d2 != d2 and j1 < j2
    if d2 != d2:
        return True
    return d1 < d2 or (d1 == d2 and j1 < j2)


@jit
def _offer(hd, hj, count, d, j):
    """Offers (d, j) to the max-heap hd / hj holding ``count`` entries (capacity len(hd)); returns
    the new count."""
    cap = hd.shape[0]
    if count < cap:
        c = count
        while c > 0:
            parent = (c - 1) // 2
            if not _precedes(hd[parent], hj[parent], d, j):
                break
            hd[c], hj[c] = hd[parent], hj[parent]
            c = parent
        hd[c], hj[c] = d, j
        return count + 1
    if _precedes(d, j, hd[0], hj[0]):
        c = 0
        while True:
            child = 2 * c + 1
            if child >= count:
                break
            if child + 1 < count and _precedes(hd[child], hj[child], hd[child + 1], hj[child + 1]):
                child += 1
            if not _precedes(d, j, hd[child], hj[child]):
                break
            hd[c], hj[c] = hd[child], hj[child]
            c = child
        hd[c], hj[c] = d, j
    return count


@jit
def _sort_neighbours(hd, hj, norm):
    """Heap entries into neighbour order (insertion sort: k is small beside the scan), finished."""
    k = hd.shape[0]
    for a in range(1, k):
        d, j = hd[a], hj[a]
        b = a - 1
        while b >= 0 and _precedes(d, j, hd[b], hj[b]):
            hd[b + 1], hj[b + 1] = hd[b], hj[b]
            b -= 1
        hd[b + 1], hj[b + 1] = d, j
    for a in range(k):
        hd[a] = finish(hd[a], norm)


@pjit
def _knn_kernel(query, reference, norm, out_d, out_j):
    """query (B, Q, M), reference (B, R, M); out_d, out_j (B, Q, k) hold the heaps."""
    batch, nq = query.shape[0], query.shape[1]
    for row in numba.prange(batch * nq):
        b, i = row // nq, row % nq
        hd, hj = out_d[b, i], out_j[b, i]
        count = 0
        for j in range(reference.shape[1]):
            count = _offer(hd, hj, count, ordering_distance(query[b], i, reference[b], j, norm), j)
        _sort_neighbours(hd, hj, norm)


def forward(query, reference, k, p):
    b, q, m = query.shape
    distances = query.new_empty((b, q, k))
    indices = torch.empty((b, q, k), dtype=torch.int64)
    nb.threads_for(b * q * reference.shape[1] * max(1, m))
    _knn_kernel(nb.view(query), nb.view(reference), norm_code(p), distances.numpy(), indices.numpy())
    return distances, indices
