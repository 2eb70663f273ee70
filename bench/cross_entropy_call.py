"""One small cross-entropy call on fastml's C++ path against torch's, in one process: the
course's batch of 256 rows of 10 classes (``--rows``, ``--classes`` for others), forward +
backward and forward alone under ``torch.no_grad()``, ``fastml.functional.cross_entropy`` under
``use_backend("cpp")`` beside ``torch.nn.functional.cross_entropy``, interleaved rounds, the
median microseconds per call. At this size a call is mostly fixed costs (checks, allocations,
torch ops around the kernel), which is what it measures; run it against another checkout with
``PYTHONPATH=<checkout>`` to compare two versions on one machine:

    python bench/cross_entropy_call.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

import fastml
from fastml import functional as fastml_functional


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    logits = torch.randn(args.rows, args.classes, requires_grad=True)
    target = torch.randint(0, args.classes, (args.rows,))

    def step(loss_function):
        def call():
            loss_function(logits, target).backward()
        return call

    def forward_only(loss_function):
        def call():
            with torch.no_grad():
                loss_function(logits, target)
        return call

    cases = {"torch fwd+bwd": step(F.cross_entropy), "cpp fwd+bwd": step(fastml_functional.cross_entropy),
             "torch no_grad": forward_only(F.cross_entropy), "cpp no_grad": forward_only(fastml_functional.cross_entropy)}
    times = {name: [] for name in cases}
    with fastml.use_backend("cpp"):
        for call in cases.values():
            for _ in range(args.calls):
                call()
        for _ in range(args.rounds):
            for name, call in cases.items():
                start = time.perf_counter()
                for _ in range(args.calls):
                    call()
                times[name].append((time.perf_counter() - start) / args.calls * 1e6)
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"fastml at {os.path.dirname(fastml.__file__)}, {args.rows}x{args.classes}, medians of {args.rounds} rounds:")
    for phase in ("fwd+bwd", "no_grad"):
        torch_us, cpp_us = median[f"torch {phase}"], median[f"cpp {phase}"]
        print(f"  {phase:8s} torch {torch_us:7.1f} us  cpp {cpp_us:7.1f} us  torch / cpp {torch_us / cpp_us:.3f}x")


if __name__ == "__main__":
    main()
