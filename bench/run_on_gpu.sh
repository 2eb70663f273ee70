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
python -m pytest bench/bench_linear_mse.py --benchmark-only -p no:cacheprovider -k cuda \
    --benchmark-columns=median,min,mean,stddev,rounds --benchmark-json "$out/bench-linear_mse-cuda.json" \
    2>&1 | tee "$out/bench-linear_mse-cuda.txt" | tail -40
python -m pytest bench/bench_optim.py --benchmark-only -p no:cacheprovider -k cuda \
    --benchmark-columns=median,min,mean,stddev,rounds --benchmark-json "$out/bench-optim-cuda.json" \
    2>&1 | tee "$out/bench-optim-cuda.txt" | tail -40
python -m pytest bench/bench_knn.py --benchmark-only -p no:cacheprovider -k cuda \
    --benchmark-columns=median,min,max,rounds --benchmark-json "$out/bench-knn-cuda.json" \
    2>&1 | tee "$out/bench-knn-cuda.txt" | tail -20
python -m pytest bench/bench_conv.py --benchmark-only -p no:cacheprovider -k cuda \
    --benchmark-columns=median,min,max,rounds --benchmark-json "$out/bench-conv-cuda.json" \
    2>&1 | tee "$out/bench-conv-cuda.txt" | tail -40
python -m pytest bench/bench_cross_entropy.py --benchmark-only -p no:cacheprovider -k cuda \
    --benchmark-columns=median,min,max,rounds --benchmark-json "$out/bench-cross_entropy-cuda.json" \
    2>&1 | tee "$out/bench-cross_entropy-cuda.txt" | tail -40
python -m pytest bench/bench_max_pool2d.py --benchmark-only -p no:cacheprovider -k cuda \
    --benchmark-columns=median,min,max,rounds --benchmark-json "$out/bench-max_pool2d-cuda.json" \
    2>&1 | tee "$out/bench-max_pool2d-cuda.txt" | tail -30
python -m fastml bench --device cuda --full --out "$out/profile" 2>&1 | tail -30
