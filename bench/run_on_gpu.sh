#!/usr/bin/env bash
# What a session with a lent CUDA machine runs (no package registry there): build fastml in place,
# then any of these phases, in the order given (default: all three):
#   tests     the whole test suite, Triton kernels compiled for the GPU (pytest-xdist when present)
#   bench     every bench/bench_*.py, CUDA cases only, torch beside fastml
#   profile   python -m fastml bench --device cuda --full
#   (BENCH_FILES narrows the bench phase and BENCH_K=EXPR its cases to -k "cuda and (EXPR)";
#    TESTS_K=EXPR narrows the tests to pytest -k EXPR; TESTS_TIMEOUT bounds them, default 540 s;
#    FASTML_NO_CPP=1 skips building the C++ extension, which no CUDA case uses)
# A lease of 15 device minutes (a machine's start included) fits, as one call (about 8 minutes):
#   FASTML_NO_CPP=1 TESTS_K='triton' TESTS_TIMEOUT=200 BENCH_K='torch or triton' \
#     BENCH_FILES='bench/bench_knn.py bench/bench_cross_entropy.py bench/bench_max_pool2d.py bench/bench_optim.py' \
#     timeout 480 bash bench/run_on_gpu.sh tests bench
# A test that fails a CUDA device-side assertion poisons its process's context: every later test
# on that xdist worker fails with "device-side assert triggered" (check such tests in a child
# process: tests/conftest.py's assert_device_side_assert).
# Everything is written to a work folder and packed after each step into $OUT/gpu-results.tar.gz
# (the device returns at most 8 files; a step killed at the time limit keeps what came before).
# Unpack it into bench/results/ and commit.
set -uo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
work=$(mktemp -d)
pack() { tar -czf "$out/gpu-results.tar.gz" -C "$work" .; }
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$work/gpu.txt"
python -m pip install --no-build-isolation --no-deps -e . -q 2>&1 | tail -3
python -m fastml info | tee -a "$work/gpu.txt"
pack

parallel=()
python -c "import xdist" 2>/dev/null && parallel=(-n 8)

for phase in "${@:-tests bench profile}"; do
  for step in $phase; do
    case $step in
      tests)
        select=()
        [[ -n ${TESTS_K:-} ]] && select=(-k "$TESTS_K")
        # bounded, so the log is packed even when the suite runs long; it also streams to $out
        timeout "${TESTS_TIMEOUT:-540}" python -m pytest tests -q -p no:cacheprovider "${parallel[@]}" \
            "${select[@]}" -rfE --maxfail=40 2>&1 | tee "$work/gpu-tests.txt" "$out/gpu-tests.txt" | tail -60
        pack ;;
      bench)
        for file in ${BENCH_FILES:-bench/bench_*.py}; do
          name=$(basename "$file" .py)
          python -m pytest "$file" --benchmark-only -p no:cacheprovider -k "cuda${BENCH_K:+ and ($BENCH_K)}" \
              --benchmark-columns=median,min,max,rounds --benchmark-json "$work/$name-cuda.json" \
              2>&1 | tee "$work/$name-cuda.txt" | tail -30
          pack
        done ;;
      profile)
        python -m fastml bench --device cuda --full --out "$work/profile" 2>&1 | tail -30
        pack ;;
      *) echo "unknown phase: $step" >&2; exit 2 ;;
    esac
  done
done
