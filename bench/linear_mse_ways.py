"""The C++ linear_mse kernel's ways of reading x (csrc/linear_mse.cpp), forward + gradients,
interleaved in one process (order shuffled each round) beside a plain ``x.sum()``, the read of x
alone: medians and minima of 31 rounds, on shapes whose x is larger than the L2, where
fastml/ops/linear_mse/cpp_impl.py times the ways for each shape class, and on shapes within the
L2 (--in-cache), where it runs one way untimed. "vs blocks" is the block way's median time over
each one's; a lone output also has the two streaming ways.

    python bench/linear_mse_ways.py [--in-cache]
"""
import random
import statistics
import sys
import time

import torch

from fastml.ops.linear_mse import cpp_impl

SHAPES = [(65536, 256, 1), (262144, 64, 1), (65536, 13, 1), (16384, 784, 1), (16384, 1024, 1), (65536, 256, 8),
          (60000, 784, 10)]
IN_CACHE_SHAPES = [(4096, 64, 1), (1024, 256, 1), (8192, 13, 1), (2048, 100, 1), (256, 2, 1), (1000, 13, 1),
                   (1024, 256, 8)]

torch.manual_seed(0)
for n, d, o in IN_CACHE_SHAPES if "--in-cache" in sys.argv[1:] else SHAPES:
    x, y, w, b = torch.randn(n, d), torch.randn(n, o), torch.randn(o, d) * 0.01, torch.zeros(o)
    ways = ("reference", "prefetch") + (("stream", "stream prefetch") if o == 1 else ())
    calls = {way: (lambda way=way: cpp_impl._forward(x, w, b, y, "mean", True, True, False, way)) for way in ways}
    calls["x.sum()"] = x.sum
    repeat = max(1, min(100, int(2e7 / (n * d * max(o, 2)))))
    times = {name: [] for name in calls}
    for call in calls.values():
        for _ in range(repeat):
            call()
    order = list(calls)
    for _ in range(31):
        random.shuffle(order)
        for name in order:
            start = time.perf_counter()
            for _ in range(repeat):
                calls[name]()
            times[name].append((time.perf_counter() - start) / repeat)
    blocks = statistics.median(times["reference"])
    print((n, d, o), "  ".join(
        f"{'blocks' if name == 'reference' else name} {statistics.median(t) * 1e6:.1f} us (min {min(t) * 1e6:.1f}, "
        f"vs blocks {blocks / statistics.median(t):.2f}x)" for name, t in times.items()), flush=True)
