"""fastml.functional.knn on every backend against the float64 reference (exact distances, a
stable sort: ascending, ties by the lower index, NaN last)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close, rand, upcast

import fastml
from fastml import functional as F
from fastml.ops import knn as knn_ops
from fastml.ops.knn import reference as knn_reference

NORMS = [2.0, 1.0, math.inf]


def expected(query, reference, k, p):
    q, r = upcast(query, reference)
    q, r = q.reshape(-1, *q.shape[-2:]), r.reshape(-1, *r.shape[-2:])
    d, i = knn_reference.exhaustive(q, r, k, p)
    return d.reshape(*query.shape[:-1], k), i.reshape(*query.shape[:-1], k)


def assert_neighbours(distances, indices, query, reference, k, p):
    """Distances close to the float64 reference's; indices equal, except between distances the
    input dtype cannot tell apart: where an index differs, the float64 distance of the point
    chosen equals the reference's to a few units of the input dtype's rounding."""
    d64, i64 = expected(query, reference, k, p)
    assert indices.dtype == torch.int64 and distances.dtype == query.dtype
    assert_close(distances, d64, scale=d64.abs().max() if d64.numel() else 1)
    tol = 4 * torch.finfo(query.dtype).eps
    assert_ties_only(indices, i64, d64, query, reference, p, rtol=tol, atol=tol * float(d64.abs().max()))


def assert_ties_only(indices, i64, d64, query, reference, p, rtol, atol):
    """Where an index differs from the float64 reference's (i64), the float64 distance of the point
    chosen equals the reference's (d64) within rtol / atol: the two are a tie at the input's precision."""
    differ = indices.cpu() != i64
    if differ.any():
        q, r = upcast(query, reference)
        chosen = torch.cdist(q, r, p, compute_mode="donot_use_mm_for_euclid_dist").gather(-1, indices.cpu())
        torch.testing.assert_close(chosen[differ], d64[differ], rtol=rtol, atol=atol)


# On the Triton interpreter the odd shape takes 5 to 7 s a norm: p2's case stays in the default run.
@pytest.mark.interpreter_long("odd-p1", "odd-pinf")
@pytest.mark.parametrize("p", NORMS, ids=["p2", "p1", "pinf"])
@pytest.mark.parametrize("q, r, m, k", [(7, 11, 3, 1), (37, 253, 19, 5), (5, 9, 4, 9), (1, 1, 1, 1), (64, 70, 1, 7)],
                         ids=["small-k1", "odd", "k-equals-R", "one", "one-feature"])
def test_matches_float64_reference(backend, rng, p, q, r, m, k):
    for dtype in (torch.float32, torch.float64):
        query = rand(q, m, dtype=dtype, device=backend.device, generator=rng)
        reference = rand(r, m, dtype=dtype, device=backend.device, generator=rng)
        distances, indices = F.knn(query, reference, k, p)
        assert distances.shape == indices.shape == (q, k)
        assert_neighbours(distances, indices, query, reference, k, p)


def test_batched_and_broadcast(backend, rng):
    query = rand(2, 3, 9, 4, device=backend.device, generator=rng)
    reference = rand(3, 40, 4, device=backend.device, generator=rng)
    distances, indices = F.knn(query, reference, 6)
    assert distances.shape == (2, 3, 9, 6)
    assert_neighbours(distances, indices, query, reference.expand(2, 3, 40, 4), 6, 2.0)


def test_large_k_has_no_cap(backend, rng):
    """k beyond any register-resident path (the Triton kernel's blocked fallback included)."""
    query = rand(3, 5, device=backend.device, generator=rng)
    reference = rand(300, 5, device=backend.device, generator=rng)
    distances, indices = F.knn(query, reference, 300)
    assert_neighbours(distances, indices, query, reference, 300, 2.0)


def test_ties_and_duplicates_break_by_lower_index(backend):
    """Duplicate reference points and equal distances: ascending distance, then index."""
    reference = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [2.0, 2.0]],
                             device=backend.device)
    query = torch.zeros(2, 2, device=backend.device)
    distances, indices = F.knn(query, reference, 5)
    assert indices.tolist() == [[0, 1, 2, 3, 4]] * 2
    assert distances.tolist() == [[1.0] * 5] * 2
    for p in NORMS:
        _, first = F.knn(reference, reference, 1, p)
        assert first[:, 0].tolist() == [0, 1, 2, 0, 4, 5]  # a duplicate finds its first copy


def test_exact_far_from_the_origin(backend):
    base = torch.tensor([[512695.0, 0.0]], device=backend.device)
    reference = torch.tensor([[512804.0, 0.0], [512700.0, 0.0], [512690.0, 0.5]], device=backend.device)
    distances, indices = F.knn(base, reference, 3)
    assert indices.tolist() == [[1, 2, 0]]
    assert distances.tolist() == [[5.0, pytest.approx(5.0249, abs=1e-3), 109.0]]


def test_nan_distances_come_last(backend):
    reference = torch.tensor([[0.0], [float("nan")], [3.0], [1.0]], device=backend.device)
    distances, indices = F.knn(torch.zeros(1, 1, device=backend.device), reference, 4)
    assert indices.tolist() == [[0, 3, 2, 1]]
    assert math.isnan(distances[0, 3].item())


def test_noncontiguous_inputs(backend, rng):
    base = rand(40, 12, device=backend.device, generator=rng)
    query, reference = base[::3, ::2], base.t()[:, :6]
    assert not query.is_contiguous() and not reference.is_contiguous()
    distances, indices = F.knn(query, reference, 4)
    assert_neighbours(distances, indices, query, reference, 4, 2.0)


def test_gradients_through_distances(backend, rng):
    query = rand(5, 3, dtype=torch.float64, device=backend.device, generator=rng, requires_grad=True)
    reference = rand(9, 3, dtype=torch.float64, device=backend.device, generator=rng, requires_grad=True)
    for p in NORMS:
        assert torch.autograd.gradcheck(lambda q, r: F.knn(q, r, 3, p)[0], (query, reference),
                                        fast_mode=backend.interpreted)
    same = query.detach()[:2].clone().requires_grad_()
    (grad,) = torch.autograd.grad(F.knn(same, same.detach(), 1)[0].sum(), same)
    assert torch.equal(grad, torch.zeros_like(grad)), "the gradient at zero distance is 0"


def test_other_p_and_empty(backend, rng):
    query = rand(4, 3, device=backend.device, generator=rng)
    reference = rand(7, 3, device=backend.device, generator=rng)
    distances, indices = F.knn(query, reference, 3, p=3.0)
    assert_neighbours(distances, indices, query, reference, 3, 3.0)
    d, i = F.knn(query[:0], reference, 3)
    assert d.shape == i.shape == (0, 3)
    d, i = F.knn(query, reference, 0)
    assert d.shape == i.shape == (4, 0)


# The C++ backend selects float32 euclidean neighbours through int8 tiles and a proven lower bound
# (csrc/quantized_tiles.h) once m >= 16 and 64·k <= R; these cases reach that path, and the
# others run them as well.
def _selection_case(query, reference, k):
    """Indices as the float64 reference's (but between distances float32 cannot tell apart) and
    distances within float32 rounding of each true distance, however large; a distance under
    1e-18 may read 0 (its square is below float32's normal range)."""
    distances, indices = F.knn(query, reference, k)
    d64, i64 = expected(query, reference, k, 2.0)
    tolerance = dict(rtol=4e-7, atol=1e-18)
    torch.testing.assert_close(distances.cpu().double(), d64, equal_nan=True, **tolerance)
    assert_ties_only(indices, i64, d64, query, reference, 2.0, **tolerance)


# The int8 selection filter is the C++ backend's: on the Triton interpreter these cases only repeat
# the float64 checks above, at minutes of interpretation (they run there with -m slow, and on a GPU).
@pytest.mark.interpreter_slow
@pytest.mark.parametrize("m", [16, 33, 64])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_selection_filter_matches_float64(backend, rng, m, k):
    query = rand(37, m, device=backend.device, generator=rng)
    reference = rand(64 * k + 29, m, device=backend.device, generator=rng)
    _selection_case(query, reference, k)
    _selection_case(query.reshape(1, 37, m).expand(2, 37, m), torch.stack([reference, reference.flip(0)]), k)


def test_selection_filter_far_from_the_origin_and_near_ties(backend, rng):
    """Points clustered 5e5 from the origin (where |q|² + |r|² − 2q·r cancels), and references on a
    sphere around the query whose radii differ by a few float32 steps."""
    center = torch.full((1, 20), 512695.0, dtype=torch.float64)
    query = (center + rand(5, 20, dtype=torch.float64, generator=rng)).float().to(backend.device)
    reference = (center + 3 * rand(700, 20, dtype=torch.float64, generator=rng)).float().to(backend.device)
    _selection_case(query, reference, 5)
    direction = rand(900, 24, dtype=torch.float64, generator=rng)
    direction /= direction.norm(dim=1, keepdim=True)
    radius = 1 + torch.randint(0, 6, (900, 1), generator=rng, dtype=torch.float64) * 2.0**-22
    sphere = (direction * radius).float().to(backend.device)
    _selection_case(torch.zeros(3, 24, device=backend.device), sphere, 12)


@pytest.mark.interpreter_slow
def test_selection_filter_extreme_magnitudes(backend, rng):
    """Rows of wildly different sizes, zero rows, rows below and above what int8 scales can hold
    (1e-35, 1e18): each is either quantized with its own bound or always recomputed."""
    scales = torch.tensor([1e-35, 1e-20, 1e-6, 0.0, 1.0, 1e6, 1e17, 1e18], dtype=torch.float64)
    reference = rand(8 * 100, 17, dtype=torch.float64, generator=rng) * scales.repeat(100)[:, None]
    query = rand(16, 17, dtype=torch.float64, generator=rng) * scales.repeat(2)[:, None]
    _selection_case(query.float().to(backend.device), reference.float().to(backend.device), 7)


@pytest.mark.interpreter_slow
def test_selection_filter_nan_inf_and_duplicates(backend, rng):
    reference = rand(400, 16, device=backend.device, generator=rng)
    reference[[5, 50]] = reference[7].clone()  # duplicates of 7: equal distances, lower index first
    reference[11, 3] = float("nan")
    reference[12, 0] = float("inf")
    query = torch.cat([reference[7:8], reference[11:13], rand(1, 16, device=backend.device, generator=rng)])
    distances, indices = F.knn(query, reference, 6)
    assert indices[0, :3].tolist() == [5, 7, 50] and distances[0, :3].tolist() == [0.0] * 3
    assert indices[1].tolist() == [0, 1, 2, 3, 4, 5] and distances[1].isnan().all()  # NaN everywhere: index order
    assert indices[2].tolist() == [0, 1, 2, 3, 4, 5] and distances[2].isinf().all()  # NaN only to 11 and 12
    assert 11 not in indices[3].tolist() and 12 not in indices[3].tolist()
    _selection_case(query[3:], reference, 6)


# The reference backend screens euclidean float32 / float64 neighbours with a matrix product and
# certifies each query's answer against a bound on the product's rounding; a query it cannot
# certify runs the exhaustive scan. Its answer must be the exhaustive scan's, bit for bit.
def _screen_against_exhaustive(monkeypatch, query, reference, k):
    """The screened answer for (B, Q, M) / (B, R, M) inputs, checked equal to the exhaustive
    scan's; returns how many query rows fell back to the scan."""
    scan = knn_reference.exhaustive
    fallback_rows = []
    monkeypatch.setattr(knn_reference, "exhaustive",
                        lambda q, r, kk, p: (fallback_rows.append(q.shape[0] * q.shape[1]), scan(q, r, kk, p))[1])
    distances, indices = knn_reference.forward(query, reference, k, 2.0)
    expected_distances, expected_indices = scan(query, reference, k, 2.0)
    assert torch.equal(indices, expected_indices)
    # bit for bit: certified rows' distances come from the oracle's own kernel (oracle_distances)
    torch.testing.assert_close(distances, expected_distances, rtol=0, atol=0, equal_nan=True)
    return sum(fallback_rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, float("inf")])
def test_neighbours_are_ordered_on_the_oracles_own_distances(rng, dtype, p):
    """The distances a selection is ordered by round as the oracle's do, bit for bit: on an AVX-512
    Zen 5, square().sum() differed from torch.cdist's sum in the last bit on 55% of such pairs, and
    two neighbours tied in one and not in the other came out in the wrong order."""
    query = rand(2, 50, 64, dtype=dtype, generator=rng) + 3.0
    reference = rand(2, 517, 64, dtype=dtype, generator=rng) + 3.0
    expected_distances, expected_indices = knn_reference.exhaustive(query, reference, 12, p)
    shuffled = expected_indices.flip(-1)  # a selection in no particular order
    assert torch.equal(knn_ops.oracle_distances(query, reference, shuffled, p), expected_distances.flip(-1))
    distances, indices = knn_ops.order_neighbours(query, reference, shuffled, p)
    assert torch.equal(indices, expected_indices) and torch.equal(distances, expected_distances)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b, q, r, m, k", [(1, 333, 1001, 17, 5), (2, 41, 517, 64, 10), (1, 7, 40, 1, 1),
                                           (1, 1200, 3500, 3, 9)])
def test_reference_screen_is_exact_and_certifies_random_data(monkeypatch, rng, dtype, b, q, r, m, k):
    query = rand(b, q, m, dtype=dtype, generator=rng) + 3.0  # off-centre: the screen centres
    reference = rand(b, r, m, dtype=dtype, generator=rng) + 3.0
    fallback = _screen_against_exhaustive(monkeypatch, query, reference, k)
    assert fallback <= q * b // 100, "the screen should certify well-separated random data"


def test_reference_screen_falls_back_where_it_cannot_prove(monkeypatch, rng):
    """Near-ties at the cut (references on a sphere whose radii differ by float32 steps), a tight
    cluster far from the origin, integer grids full of exact ties, NaN and inf, values whose
    squares underflow: each query's answer is the exhaustive scan's, by certificate or by fallback."""
    direction = rand(900, 24, dtype=torch.float64, generator=rng)
    direction /= direction.norm(dim=1, keepdim=True)
    radius = 1 + torch.randint(0, 6, (900, 1), generator=rng, dtype=torch.float64) * 2.0**-22
    sphere = (direction * radius).float()[None]
    assert _screen_against_exhaustive(monkeypatch, torch.zeros(1, 3, 24), sphere, 12) == 3
    centre = torch.full((1, 1, 8), 512695.0)
    assert _screen_against_exhaustive(monkeypatch, centre + rand(1, 20, 8, generator=rng) * 1e-2,
                                      centre + rand(1, 300, 8, generator=rng) * 1e-2, 4) > 0
    grid = torch.randint(0, 3, (1, 500, 4), generator=rng).float()
    assert _screen_against_exhaustive(monkeypatch, grid[:, :60], grid, 7) > 0
    reference = rand(1, 200, 6, generator=rng)
    reference[0, 11, 3], reference[0, 12, 0] = float("nan"), float("inf")
    assert _screen_against_exhaustive(monkeypatch, rand(1, 9, 6, generator=rng), reference, 3) == 9
    tiny = rand(1, 300, 2, generator=rng) * 1e-25
    assert _screen_against_exhaustive(monkeypatch, tiny[:, :20], tiny, 3) == 20


@pytest.mark.parametrize("width", [64 * 40, 64 * 40 + 17, 64 * 9])
def test_reference_screen_selection_leaves_out_nothing_smaller(rng, width):
    """The two-stage selection (block minima, then a top-k over the chosen blocks and the tail):
    every score left out is at least the largest kept, with ties and a tail shorter than a block."""
    scores = torch.randint(0, 50, (33, width), generator=rng).float()  # many ties
    scores[:, -5:] = -1.0  # the tail (when width is not a multiple of the block) holds the smallest
    keep = 18
    values, columns = knn_reference._smallest(scores, keep)
    assert values.shape == columns.shape == (33, keep)
    assert torch.equal(scores.gather(1, columns), values)
    for row in range(33):
        assert len(set(columns[row].tolist())) == keep
        left_out = torch.ones(width, dtype=torch.bool)
        left_out[columns[row]] = False
        assert bool((scores[row, left_out] >= values[row].max()).all())


def test_reference_screen_widens_its_bound_for_reduced_precision_products(monkeypatch, rng):
    """With float32 products allowed in TF32 / bfloat16, the bound is bfloat16's: still exact."""
    query, reference = rand(1, 64, 32, generator=rng), rand(1, 2000, 32, generator=rng)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        assert knn_reference._matmul_roundoff(torch.float32) == torch.finfo(torch.bfloat16).eps
        _screen_against_exhaustive(monkeypatch, query, reference, 5)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert knn_reference._matmul_roundoff(torch.float32) == torch.finfo(torch.float32).eps


@pytest.mark.parametrize("args, error, message", [
    ((torch.zeros(3), torch.zeros(4, 3), 1), ValueError, "query and reference must be"),
    ((torch.zeros(2, 3), torch.zeros(4, 2), 1), ValueError, "query has 3 features but reference has 2"),
    ((torch.zeros(2, 3), torch.zeros(4, 3), 5), ValueError, "k must be between 0 and the number of reference"),
    ((torch.zeros(2, 3), torch.zeros(4, 3), -1), ValueError, "k must be between"),
    ((torch.zeros(2, 3), torch.zeros(4, 3), 1.5), TypeError, "k must be an int"),
    ((torch.zeros(2, 3), torch.zeros(4, 3), torch.tensor(2.5)), TypeError, "k must be an int"),
    ((torch.zeros(2, 3), torch.zeros(4, 3), torch.tensor([1, 2])), TypeError, "k must be an int"),
    ((torch.zeros(2, 3), torch.zeros(4, 3, dtype=torch.float64), 1), TypeError, "reference has dtype"),
    ((torch.zeros(2, 3, dtype=torch.int64), torch.zeros(4, 3, dtype=torch.int64), 1), TypeError, "floating-point"),
    ((torch.zeros(2, 3), torch.zeros(4, 3), 1, -2.0), ValueError, "p must be a non-negative number"),
    (([[0.0]], torch.zeros(4, 1), 1), TypeError, "query must be a Tensor"),
])
def test_bad_input(args, error, message):
    with pytest.raises(error, match=message):
        F.knn(*args)


def test_k_of_any_integer_type():
    """k as numpy's and torch's integers give the same neighbours as a Python int."""
    import numpy as np

    q, r = torch.randn(4, 3), torch.randn(9, 3)
    expected = F.knn(q, r, 2)
    for k in (np.int64(2), torch.tensor(2), torch.tensor([2], dtype=torch.int32)):
        assert all(torch.equal(a, b) for a, b in zip(F.knn(q, r, k), expected))


def test_each_backend_runs_its_kernel(backend, monkeypatch):
    calls = []
    module = fastml._backend.load("fastml.ops.knn", backend.name)
    real = module.forward
    monkeypatch.setattr(module, "forward", lambda *a: (calls.append(1), real(*a))[1])
    F.knn(torch.randn(3, 2, device=backend.device), torch.randn(8, 2, device=backend.device), 2)
    assert calls == [1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the screen's tuned tiles run above "
                    "TUNE_MIN_SCORES scores, too many for the Triton interpreter")
def test_triton_screen_at_scale_is_the_exhaustive_answer(rng):
    """The fused screen with its tuned tiles (tf32x3 products, the certificate, the fallback):
    the exhaustive scan's neighbours, off-centre data with duplicated references (ties)."""
    from fastml.ops.knn import triton_impl

    query = (rand(3000, 128, generator=rng) + 3).cuda()
    reference = (rand(12000, 128, generator=rng) + 3).cuda()
    reference[5000:5040] = reference[100:140]  # duplicates: equal distances, the lower index first
    query[:40] = reference[100:140] + 1e-3
    assert query.shape[0] * reference.shape[0] >= triton_impl.TUNE_MIN_SCORES
    with fastml.use_backend("triton"):
        distances, indices = F.knn(query, reference, 16)
    expected_distances, expected_indices = knn_reference.exhaustive(query[None], reference[None], 16, 2.0)
    assert torch.equal(indices, expected_indices[0])
    torch.testing.assert_close(distances, expected_distances[0], rtol=4e-7, atol=0)
