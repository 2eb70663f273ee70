"""A patched model fed inputs whose sizes vary from call to call, beside the same model
unpatched, in passes over the same sizes, training steps (SGD) and inference:

- ``--model mlp``: a two-layer MLP (64 -> 128 -> 64, ReLU) on (8, L, 64) sequences, L drawn
  from 1 to 200 for each of 300 steps;
- ``--model cnn``: two convolution + batch norm + ReLU + max-pool stages (3 -> 16 -> 32
  channels), global average pooling and a Linear head, on (8, 3, S, S) images, S drawn from 16
  to 96: the ops whose keys hold no parameter's shape (poolings, a batch norm's backward) or a
  second input-sized shape (a convolution's backward), which only a layer's own family covers.

The first pass pays for the measured choice's decisions (fastml/_tune.py: a family's first few
sizes timed, the rest taking a nearby timed size's choice); later passes run on settled routes.

    FASTML_CACHE_DIR=$(mktemp -d) python bench/varying_sizes.py [--model cnn]

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


def cnn() -> torch.nn.Module:
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


MODELS = {
    "mlp": (mlp, (1, 200), lambda size: torch.randn(8, size, 64)),
    "cnn": (cnn, (16, 96), lambda size: torch.randn(8, 3, size, size)),
}


def train_pass(model: torch.nn.Module, sizes: list[int], train: bool, make_input) -> float:
    """Seconds for one pass over ``sizes``: a training step each, or a no_grad forward (eval)."""
    model.train(train)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    for size in sizes:
        x = make_input(size)
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
    parser.add_argument("--model", choices=sorted(MODELS), default="mlp")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()
    build, (low, high), make_input = MODELS[args.model]
    random.seed(0)
    torch.manual_seed(0)
    sizes = [random.randint(low, high) for _ in range(args.steps)]
    for train in (False, True):
        unpatched = build()
        patched = build()
        patched.load_state_dict(unpatched.state_dict())
        fastml.patch(patched)
        for index in range(args.passes):
            torch_seconds = train_pass(unpatched, sizes, train, make_input)
            fastml_seconds = train_pass(patched, sizes, train, make_input)
            print(f"{'training' if train else 'inference'} pass {index + 1}: torch {torch_seconds:.3f} s, "
                  f"patched {fastml_seconds:.3f} s, {torch_seconds / fastml_seconds:.2f}x")


if __name__ == "__main__":
    main()
