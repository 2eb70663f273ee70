"""A patched model fed inputs whose sizes vary from call to call: a two-layer MLP (64 -> 128 ->
64, ReLU) on (8, L, 64) sequences, L drawn from 1 to 200 for each of 300 training steps (SGD),
beside the same model unpatched, in passes over the same lengths. The first pass pays for the
measured choice's decisions (fastml/_tune.py: a family's first few sizes timed, the rest taking
a nearby timed size's choice); later passes run on settled routes.

    FASTML_CACHE_DIR=$(mktemp -d) python bench/varying_sizes.py

Run with an empty decisions cache, or the first pass finds its decisions made.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

import fastml


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))


def train_pass(model: torch.nn.Module, lengths: list[int], train: bool) -> float:
    """Seconds for one pass over ``lengths``: a training step each, or a no_grad forward."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    for length in lengths:
        x = torch.randn(8, length, 64)
        if train:
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
        else:
            with torch.no_grad():
                model(x)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()
    random.seed(0)
    torch.manual_seed(0)
    lengths = [random.randint(1, 200) for _ in range(args.steps)]
    for train in (False, True):
        unpatched = mlp()
        patched = mlp()
        patched.load_state_dict(unpatched.state_dict())
        fastml.patch(patched)
        for index in range(args.passes):
            torch_seconds = train_pass(unpatched, lengths, train)
            fastml_seconds = train_pass(patched, lengths, train)
            print(f"{'training' if train else 'inference'} pass {index + 1}: torch {torch_seconds:.3f} s, "
                  f"patched {fastml_seconds:.3f} s, {torch_seconds / fastml_seconds:.2f}x")


if __name__ == "__main__":
    main()
