"""The register tiles of csrc/linear_tiles.h on softmax regression's shape (256 x 784 -> 10):
the fused C++ kernel (csrc/linear_cross_entropy.cpp) called directly, its passes one at a time
(forward alone; with the input gradient, combine_rows; with the weight gradient,
accumulate_outer; all three), and the whole training step through fastml.functional beside torch's
nn.Linear + nn.CrossEntropyLoss. Interleaved in one process; minima and medians in µs.

The tiles are compile-time constants, so two tilings are compared by building each, keeping a
copy of fastml/_C*.so, and running this script on each copy in turn, several times alternately
(this VM's speed drifts within minutes):

    python bench/linear_tiles.py
"""
import statistics
import time

import torch

from fastml import _bench
from fastml._cpp import REDUCTION_CODE, kernel, ptr

N, D, C = 256, 784, 10
ROUNDS, CALLS = 15, 200


def main():
    torch.manual_seed(0)
    x = torch.randn(N, D)
    target = torch.randint(0, C, (N,))
    w, b = torch.randn(C, D) * 0.03, torch.randn(C)
    loss, grad_x, grad_w, grad_b = torch.empty(()), torch.empty_like(x), torch.empty_like(w), torch.empty(C)
    fused = kernel("linear_cross_entropy_forward", torch.float32)

    def passes(with_grad_x, with_grad_w, threads):
        return lambda: fused(ptr(x), ptr(w), ptr(b), ptr(target), 0, 0, N, D, C, -100, 0.0, REDUCTION_CODE["mean"],
                             0, ptr(loss), ptr(grad_x if with_grad_x else None),
                             ptr(grad_w if with_grad_w else None), ptr(grad_b), threads)

    steps = _bench._linear_cross_entropy_prepare(torch.device("cpu"), N, D, C)  # the profile's step
    torch_step, fastml_step = steps("torch"), steps("auto")
    cases = {"kernel forward": passes(False, False, 2), "kernel + input grad": passes(True, False, 2),
             "kernel + weight grad": passes(False, True, 2), "kernel, all (2 threads)": passes(True, True, 2),
             "kernel, all (1 thread)": passes(True, True, 1), "step torch": torch_step, "step fastml": fastml_step}
    for fn in cases.values():
        for _ in range(CALLS):
            fn()
    times = {name: [] for name in cases}
    for _ in range(ROUNDS):
        for name, fn in cases.items():
            start = time.perf_counter()
            for _ in range(CALLS):
                fn()
            times[name].append((time.perf_counter() - start) / CALLS * 1e6)
    for name, ts in times.items():
        print(f"{name:26s} min {min(ts):7.1f} us  median {statistics.median(ts):7.1f} us")
    print(f"step speed-up over torch: {min(times['step torch']) / min(times['step fastml']):.2f}x (minima), "
          f"{statistics.median(times['step torch']) / statistics.median(times['step fastml']):.2f}x (medians)")


if __name__ == "__main__":
    main()
