"""Standard image classifiers, unpatched against patched by ``fastml.patch``: does a user who
patches a real model get something at least as fast?

Twelve architectures (fastml/zoo.py: torchvision's definitions, random weights, nothing
downloaded) at batch 16, 112 × 112, float32. Per model and mode, one group:

- ``torch``: the model as torch.nn built it;
- ``auto``: the same model after ``fastml.patch`` and ``fastml.tune`` (the measured choice: each
  layer runs fastml's kernel only where that measured faster than torch's, forward and backward
  decided separately);
- ``cpp``: patched with fastml's C++ kernels forced on every covered layer (what patching did
  before the measured choice; numba, slower still, is left out).

Modes: ``train`` is one step (forward, cross-entropy, backward, torch.optim.SGD step);
``infer`` is one forward pass in eval mode under ``torch.no_grad()``.

    python -m pytest bench/bench_zoo.py --benchmark-only -p no:cacheprovider --benchmark-json zoo.json
    python bench/bench_zoo.py zoo.json      # the ratio table (torch's median / each median)

pytest-benchmark runs a group's implementations one after the other, so a drift of the machine
between them shows as a ratio: on the shared 2-core VM this suite's torch medians moved by up to
50% between runs, which swamps the few percent the measured choice is judged on. The recorded
figures (bench/results/cpu-*-zoo.txt) come from the same cases in ``python -m fastml bench --ops
zoo_train zoo_infer``, which interleaves torch, auto and cpp sample by sample.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys

import pytest
import torch

import fastml
from fastml import _bench, zoo

BATCH, SIZE = _bench.ZOO_BATCH, _bench.ZOO_SIZE
IMPLS = ("torch", "auto", "cpp")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["train", "infer"])
@pytest.mark.parametrize("name", list(zoo.MODELS))
def test_zoo(benchmark, name, mode, impl):
    if impl == "cpp" and not fastml.info(print_report=False)["backends"]["cpp"]["present"]:
        pytest.skip("the cpp backend is absent")
    forced = fastml.use_backend("cpp") if impl == "cpp" else contextlib.nullcontext()
    benchmark.group = f"zoo {mode} {name}"
    benchmark.extra_info.update(model=name, mode=mode, impl=impl, batch=BATCH, size=SIZE)
    with forced:  # the same step as the profile's zoo cases
        step = _bench._zoo_prepare(torch.device("cpu"), name, mode, BATCH, SIZE)(impl)
        benchmark.pedantic(step, rounds=3, warmup_rounds=1)


def summary(report: dict) -> str:
    """The ratio table of a --benchmark-json report: per model and mode, torch's median over each
    implementation's median, and the geometric mean per mode and implementation."""
    medians: dict = {}
    for bench in report["benchmarks"]:
        info = bench["extra_info"]
        medians.setdefault((info["mode"], info["model"]), {})[info["impl"]] = bench["stats"]["median"]
    lines = [f"{'mode':<6} {'model':<20} {'torch':>9}  " + "  ".join(f"{impl:>12}" for impl in IMPLS[1:])]
    logs: dict = {}
    for (mode, model), row in sorted(medians.items()):
        cells = []
        for impl in IMPLS[1:]:
            if impl in row and "torch" in row:
                ratio = row["torch"] / row[impl]
                logs.setdefault((mode, impl), []).append(math.log(ratio))
                cells.append(f"{ratio:>11.2f}x")
            else:
                cells.append(f"{'-':>12}")
        lines.append(f"{mode:<6} {model:<20} {row.get('torch', float('nan')) * 1e3:>7.1f}ms  " + "  ".join(cells))
    for mode in ("train", "infer"):
        cells = []
        for impl in IMPLS[1:]:
            values = logs.get((mode, impl), [])
            worst = f", min {math.exp(min(values)):.2f}x" if values else ""
            cells.append(f"{impl} {math.exp(sum(values) / len(values)):.2f}x{worst}" if values else f"{impl} -")
        lines.append(f"geometric mean, {mode}: " + "; ".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(summary(json.load(f)))
