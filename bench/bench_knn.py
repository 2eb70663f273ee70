"""k nearest neighbours: torch.cdist + topk, scikit-learn's brute-force KNeighborsClassifier and
FAISS's exact index beside every fastml backend, one group per size.

- torch: ``torch.cdist(q, r).topk(k, largest=False)`` (forms the Q×R matrix);
- sklearn: ``KNeighborsClassifier(k, algorithm="brute").kneighbors(q)``, fitted beforehand;
- faiss: ``faiss.IndexFlatL2`` (exact search: BLAS products and a heap per query, on the CPU;
  squared distances), the reference added beforehand. A peer, not a dependency: its rows skip
  where ``faiss-cpu`` is not installed;
- fastml: ``fastml.functional.knn(q, r, k)`` on each backend.

Extra info: the peak extra memory of one call, measured in a child process (the growth of its
resident-set high-water mark over the inputs'), beside the size of the Q×R float32 matrix.

    python -m pytest bench/bench_knn.py --benchmark-only -p no:cacheprovider
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import fastml

CPU_SIZES = [(4096, 65536, 64, 10), (256, 1_000_000, 32, 10)]
CUDA_SIZES = [(100_000, 100_000, 128, 16)]

pytestmark = [pytest.mark.ops("knn"), pytest.mark.baselines("sklearn", "faiss")]


def _data(q, r, d, device):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(q, d, generator=gen).to(device), torch.randn(r, d, generator=gen).to(device)


def _knn(benchmark, backend, device, q, r, d, k, sync):
    benchmark.group = f"knn {device} Q={q} R={r} D={d} k={k}"
    query, reference = _data(q, r, d, device)
    if backend == "sklearn":
        if device != "cpu":
            pytest.skip("scikit-learn runs on the CPU")
        neighbors = pytest.importorskip("sklearn.neighbors")
        model = neighbors.KNeighborsClassifier(k, algorithm="brute").fit(reference.numpy(), torch.zeros(r).numpy())
        query_np = query.numpy()

        def step():
            return model.kneighbors(query_np)
    elif backend == "faiss":
        if device != "cpu":
            pytest.skip("faiss-cpu runs on the CPU")
        faiss = pytest.importorskip("faiss")
        index = faiss.IndexFlatL2(d)
        index.add(reference.numpy())
        query_np = query.numpy()

        def step():
            return index.search(query_np, k)
    elif backend == "torch":
        def step():
            out = torch.cdist(query, reference).topk(k, largest=False)
            sync()
            return out
    else:
        def step():
            out = fastml.functional.knn(query, reference, k)
            sync()
            return out
    step()
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    benchmark.extra_info["QxR matrix MB"] = round(q * r * 4 / 2**20, 1)
    if device == "cpu":
        benchmark.extra_info["peak extra MB"] = _peak_extra_mb(backend, q, r, d, k)


_PEAK_SCRIPT = """
import contextlib, resource, sys, torch, fastml
impl, q, r, d, k = sys.argv[1], *map(int, sys.argv[2:])
gen = torch.Generator().manual_seed(0)
query, reference = torch.randn(q, d, generator=gen), torch.randn(r, d, generator=gen)
if impl == "sklearn":
    from sklearn.neighbors import KNeighborsClassifier
    model = KNeighborsClassifier(k, algorithm="brute").fit(reference.numpy(), torch.zeros(r).numpy())
    query_np = query.numpy()
    run = lambda: model.kneighbors(query_np)
elif impl == "faiss":
    import faiss
    index = faiss.IndexFlatL2(d)
    index.add(reference.numpy())
    query_np = query.numpy()
    run = lambda: index.search(query_np, k)
elif impl == "torch":
    run = lambda: torch.cdist(query, reference).topk(k, largest=False)
else:
    forced = contextlib.nullcontext if impl == "auto" else lambda: fastml.use_backend(impl)
    with forced():
        fastml.functional.knn(query[:8], reference[:64], k)  # compile / load outside the measurement
        fastml.functional.knn(query, reference, k)  # and "auto"'s measured choice for this size
    def run():
        with forced():
            return fastml.functional.knn(query, reference, k)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
run()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def _peak_extra_mb(impl, q, r, d, k) -> float:
    """Peak extra resident memory (MB) of one call, in a fresh process."""
    done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, impl, str(q), str(r), str(d), str(k)],
                          capture_output=True, text=True, timeout=600)
    return round(float(done.stdout.strip().splitlines()[-1]), 1) if done.returncode == 0 else float("nan")


@pytest.mark.devices("cpu")
@pytest.mark.parametrize("q, r, d, k", CPU_SIZES, ids=[f"{q}x{r}x{d}-k{k}" for q, r, d, k in CPU_SIZES])
def test_knn_cpu(benchmark, backend, device, q, r, d, k, sync):
    _knn(benchmark, backend, device, q, r, d, k, sync)


@pytest.mark.devices("cuda")
@pytest.mark.parametrize("q, r, d, k", CUDA_SIZES, ids=[f"{q}x{r}x{d}-k{k}" for q, r, d, k in CUDA_SIZES])
def test_knn_cuda(benchmark, backend, device, q, r, d, k, sync):
    _knn(benchmark, backend, device, q, r, d, k, sync)
