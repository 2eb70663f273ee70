"""The cross-entropy row kernel alone (csrc/cross_entropy.cpp): one thread, 256 rows of 10, 100
and 1000 classes, float32 and float64, the median microseconds per call over 15 samples. It
takes the path of a built module, so that two builds (another commit, another -march) compare on
one machine in one sitting:

    python bench/cross_entropy_rows_kernel.py fastml/_C.cpython-311-x86_64-linux-gnu.so
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import statistics
import sys
import time

import torch

ROWS = 256
CLASSES = (10, 100, 1000)


def load(path: str):
    """The compiled module at ``path`` (its init function is named for _C)."""
    loader = importlib.machinery.ExtensionFileLoader("_C", path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("_C", path, loader=loader))
    loader.exec_module(module)
    return module


def median_microseconds(call, calls: int, samples: int = 15) -> float:
    for _ in range(calls // 10):
        call()
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def main(path: str) -> None:
    module = load(path)
    print(f"{path}: {module.isa}")
    for dtype, suffix in ((torch.float32, "f32"), (torch.float64, "f64")):
        kernel = getattr(module, f"cross_entropy_rows_{suffix}")
        for classes in CLASSES:
            logits = torch.randn(ROWS, classes, dtype=dtype)
            target = torch.randint(0, classes, (ROWS,))
            row_loss, grad = torch.empty(ROWS, dtype=dtype), torch.empty(ROWS, classes, dtype=dtype)
            args = (logits.data_ptr(), target.data_ptr(), 0, 0, ROWS, classes, -100, 0.0, 1.0 / ROWS, 0,
                    row_loss.data_ptr(), grad.data_ptr(), 1)
            us = median_microseconds(lambda: kernel(*args), 500 if classes >= 1000 else 2000)
            print(f"{suffix} {ROWS}x{classes:<5d} {us:8.2f} us")


if __name__ == "__main__":
    main(sys.argv[1])
