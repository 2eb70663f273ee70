"""Row blocks of the fused linear + squared loss (csrc/linear_mse.cpp) against torch, on one machine.

The C++ kernel reads x in blocks of rows: each block is read twice (prediction, then gradient) and
costs one load and store of the (outputs x features) gradient tile. Its rows follow the caches the
CPU reports (an eighth of the L2). This times forward + backward of the course's shapes and
larger ones with the blocks that other L2 sizes would give (FASTML_CACHE_SIZES's setter, called
between calls from this one thread), interleaved in one process beside torch's
F.mse_loss(F.linear(...)), medians of --rounds samples.

    python bench/linear_mse_blocks.py [--rounds 9]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as TF

import fastml
import fastml.functional as F
from fastml import _cpp

SHAPES = [(65536, 256, 1), (65536, 256, 8), (60000, 784, 10), (65536, 64, 8), (16384, 1024, 4), (8192, 4096, 2)]
BLOCK_KIB = [16, 32, 64, 128, 256]  # x's block, in KiB: the kernel sizes it at L2 / 8


def seconds(fn, reps: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    module = _cpp.module()
    reported = module.cache_sizes()
    print(f"# {fastml.info(print_report=False)['backends']['cpp']['detail']}")
    print(f"# blocks of x as the kernel sizes them from an L2 of 8x the block; this CPU's L2: "
          f"{reported['l2'] >> 10} KiB (block {reported['l2'] >> 13} KiB); ratios: torch's time / fastml's")
    torch.manual_seed(0)
    for n, d, o in SHAPES:
        x, y = torch.randn(n, d), torch.randn(n, o)
        w, b = torch.randn(o, d, requires_grad=True), torch.randn(o, requires_grad=True)

        def step(loss):
            def run():
                w.grad = b.grad = None
                loss().backward()
            return run
        torch_step = step(lambda: TF.mse_loss(TF.linear(x, w, b), y))
        fastml_step = step(lambda: F.linear_mse(x, w, b, y))
        reps = max(1, int(2e8 // (n * d * max(o, 4))))
        times = {"torch": [], **{kib: [] for kib in BLOCK_KIB}}
        with fastml.use_backend("cpp"):
            for i in range(args.rounds):
                order = list(times) if i % 2 == 0 else list(times)[::-1]
                for which in order:
                    if which == "torch":
                        times[which].append(seconds(torch_step, reps))
                        continue
                    module._set_cache_sizes(l1d=reported["l1d"], l2=which << 13)
                    times[which].append(seconds(fastml_step, reps))
        module._set_cache_sizes(**reported)
        base = statistics.median(times["torch"])
        cells = "  ".join(f"{kib:>3}K {statistics.median(times[kib]) * 1e3:7.2f} ms {base / statistics.median(times[kib]):5.2f}x"
                          for kib in BLOCK_KIB)
        print(f"{n:>6}x{d:<5}->{o:<3} torch {base * 1e3:7.2f} ms | {cells}")


if __name__ == "__main__":
    main()
