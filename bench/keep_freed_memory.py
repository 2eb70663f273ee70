"""What ``fastml.keep_freed_memory()`` gains on the zoo's training steps, CPU.

The setting is process-wide (glibc's malloc), so torch beside fastml in one process, as the
pytest-benchmark suite times them, would run both on it. Here each configuration runs in its own
process instead, and the processes take turns, round after round:

- ``torch``: the model as torch.nn built it, glibc's defaults;
- ``torch+keep``: the same after ``fastml.keep_freed_memory()`` (the allocator's effect alone);
- ``auto``: ``fastml.patch(model, fx=True, channels_last=True)`` then ``fastml.tune``, defaults;
- ``auto+keep``: the same after ``keep_freed_memory()``.

Each process builds the zoo benchmark's training step (fastml._bench._zoo_prepare: batch 16,
112x112, torchvision's definitions from fastml.zoo, cross-entropy, SGD with momentum; for auto,
patched and tuned), runs 3 warm-up steps, then times ``--steps`` steps and prints their median.
The auto configurations tune in a decisions cache of their own each (``FASTML_CACHE_DIR``), so neither
reuses a verdict the other measured under different malloc settings. A row's ratio is torch's
median over that configuration's, each the median over the rounds.

    python bench/keep_freed_memory.py [--models resnet18 resnet50 ...] [--rounds 2] [--steps 9]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CONFIGS = ("torch", "torch+keep", "auto", "auto+keep")


def worker(name: str, config: str, steps: int) -> None:
    import time

    import torch

    import fastml
    from fastml import _bench

    if config.endswith("+keep") and not fastml.keep_freed_memory():
        raise RuntimeError("keep_freed_memory() did not apply: glibc's malloc is not the allocator here")
    make = _bench._zoo_prepare(torch.device("cpu"), name, "train", _bench.ZOO_BATCH, _bench.ZOO_SIZE)
    step = make(_bench.AUTO if config.startswith("auto") else "torch")  # the zoo benchmark's own step
    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print(json.dumps({"median_s": statistics.median(times)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--json", help="also write the medians here")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, args.steps)
        return
    from fastml import zoo

    models = args.models or list(zoo.MODELS)
    caches = {config: tempfile.mkdtemp(prefix=f"fastml-{config.replace('+', '-')}-") for config in CONFIGS}
    medians: dict[str, dict[str, list[float]]] = {name: {config: [] for config in CONFIGS} for name in models}
    for name in models:
        for round_ in range(args.rounds):
            order = CONFIGS[round_ % len(CONFIGS):] + CONFIGS[:round_ % len(CONFIGS)]
            for config in order:
                env = dict(os.environ, FASTML_CACHE_DIR=caches[config])
                done = subprocess.run([sys.executable, __file__, "--worker", name, config, "--steps", str(args.steps)],
                                      env=env, check=True, capture_output=True, text=True)
                medians[name][config].append(json.loads(done.stdout.strip().splitlines()[-1])["median_s"])
        row = {config: statistics.median(values) for config, values in medians[name].items()}
        print(f"{name:20s} " + "  ".join(f"{config} {row[config] * 1e3:8.1f} ms ({row['torch'] / row[config]:.2f}x)"
                                         for config in CONFIGS), flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(medians, out, indent=1)


if __name__ == "__main__":
    main()
