#!/usr/bin/env bash
# What a session with a lent CUDA machine runs (no package registry there): build fastml in place,
# run the whole test suite with real Triton on the GPU, then the CUDA benchmarks and the profile.
# Results land in $OUT (or ./gpu-results); copy them to bench/results/ and commit.
set -uo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
python -m pip install --no-build-isolation --no-deps -e . -q 2>&1 | tail -3
python -m fastml info | tee -a "$out/gpu.txt"
python -m pytest tests -q -x -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.txt" | tail -25
for op in linear_mse optim knn conv cross_entropy max_pool2d; do
    python -m pytest "bench/bench_$op.py" --benchmark-only -p no:cacheprovider -k cuda \
        --benchmark-columns=median,min,max,rounds --benchmark-json "$out/bench-$op-cuda.json" \
        2>&1 | tee "$out/bench-$op-cuda.txt" | tail -40
done
python -m fastml bench --device cuda --full --out "$out/profile" 2>&1 | tail -30
