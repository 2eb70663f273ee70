"""Why the SGD step of the course's "10M params" case (momentum 0.9, weight decay 1e-4, 20
tensors of 500,000; fastml/_bench.py's sgd_step) is bounded by how much each way reads: torch's
default step on the CPU (its for-loop), its fused step and fastml's, interleaved in one process
(order shuffled each round), medians of 31 rounds, with each one's time per array it reads.

fastml's step, like torch's fused one, reads param, grad and momentum buffer once and writes two
of them. torch's for-loop reads seven arrays' worth and writes four: grad + wd * p into a new
tensor, buf *= m, buf += that, p -= lr * buf. Where all stream from memory at one rate, the
time per array read is the same for each, and torch's time over fastml's is 7 / 3 = 2.33x.

    python bench/sgd_read_bound.py
"""
import random
import statistics
import time

import torch

from fastml._bench import optimizer_step_factory

ARRAYS_READ = {"torch": 7, "torch-fused": 3, "fastml": 3}

make = optimizer_step_factory("sgd", [500_000] * 20, torch.device("cpu"))
steps = {name: make(name) for name in ("torch", "torch-fused")}
steps["fastml"] = make("auto")
for step in steps.values():
    for _ in range(3):
        step()
times = {name: [] for name in steps}
order = list(steps)
for _ in range(31):
    random.shuffle(order)
    for name in order:
        start = time.perf_counter()
        steps[name]()
        times[name].append(time.perf_counter() - start)
median = {name: statistics.median(t) for name, t in times.items()}
for name, t in times.items():
    print(f"{name:12s} {median[name] * 1e3:6.2f} ms (min {min(t) * 1e3:.2f})  torch / this "
          f"{median['torch'] / median[name]:.2f}x  per array read {median[name] * 1e3 / ARRAYS_READ[name]:.2f} ms")
