"""The zoo at other batch sizes than the benchmark's 16: torch's model against fastml's, one mode.

``python -m fastml bench --ops zoo_train zoo_infer`` times fastml.zoo's twelve models at batch 16;
the issue asks for batches of 1 to 64. This times one batch size and mode per run, with the zoo
benchmark's own setup (fastml._bench._zoo_prepare: one shared set of Parameters, buffers and
optimizer; auto = fastml.patch(model, fx=True, channels_last=True) + fastml.tune), in interleaved
pairs whose order alternates, and prints each model's medians and torch's over fastml's.

    python bench/zoo_batches.py --batch 1 --mode infer [--pairs 15] [--models resnet18 ...]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from fastml import _bench, zoo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--mode", choices=("train", "infer"), required=True)
    parser.add_argument("--pairs", type=int, default=15)
    parser.add_argument("--models", nargs="+", default=list(zoo.MODELS))
    args = parser.parse_args()
    ratios = []
    for name in args.models:
        make = _bench._zoo_prepare(torch.device("cpu"), name, args.mode, args.batch, _bench.ZOO_SIZE)
        runs = {"torch": make("torch"), "auto": make(_bench.AUTO)}
        for run in runs.values():  # warm: first-touch allocations, oneDNN's primitive caches
            run()
            run()
        times = {impl: [] for impl in runs}
        for pair in range(args.pairs):
            for impl in (("torch", "auto") if pair % 2 else ("auto", "torch")):
                start = time.perf_counter()
                runs[impl]()
                times[impl].append(time.perf_counter() - start)
        torch_s, auto_s = statistics.median(times["torch"]), statistics.median(times["auto"])
        ratios.append(torch_s / auto_s)
        print(f"{args.mode} batch {args.batch:3d} {name:20s} torch {torch_s * 1e3:9.2f} ms  auto {auto_s * 1e3:9.2f} ms  "
              f"{torch_s / auto_s:5.2f}x", flush=True)
    geomean = math.exp(sum(map(math.log, ratios)) / len(ratios))
    print(f"{args.mode} batch {args.batch} geomean {geomean:.3f}x min {min(ratios):.2f}x")


if __name__ == "__main__":
    main()
