"""A patched MLP's training step and forward against torch's, with and without its Linear → ReLU
fold, on the small inputs where every layer settles on torch's linear: what the fold's run costs
where its ReLU in place spares little (fastml/_fold.py, FoldedLinear).

Three copies of a 64 -> 128 -> 64 MLP (ReLU between) with the same weights: torch's,
``fastml.patch(model)`` (the Linear → ReLU pair folded) and ``fastml.patch(model, ops=["linear"])``
(the layers swapped, no fold); each timed on 3-D (8, L, 64) and 2-D (8·L, 64) inputs, the three
interleaved in a shuffled order each round, medians of the rounds.

    FASTML_CACHE_DIR=$(mktemp -d) python bench/linear_relu_fold.py [--lengths 3 24] [--rounds 41]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

import fastml
from fastml._bench import cpu_model


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[3, 24])
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--calls", type=int, default=50, help="calls per timed sample")
    args = parser.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    torch_model = mlp()
    models = {"torch": torch_model}
    for name, ops in (("fold", None), ("no fold", ["linear"])):
        model = mlp()
        model.load_state_dict(torch_model.state_dict())
        fastml.patch(model, ops=ops)
        models[name] = model
    optimizers = {name: torch.optim.SGD(model.parameters(), lr=1e-3) for name, model in models.items()}

    def step(name, x):
        optimizers[name].zero_grad()
        models[name](x).square().mean().backward()
        optimizers[name].step()

    print(f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for length in args.lengths:
        for label, x in (("3-D", torch.randn(8, length, 64)), ("2-D", torch.randn(8 * length, 64))):
            calls = {}
            for name in models:
                calls[f"{name} step"] = lambda name=name, x=x: step(name, x)
                calls[f"{name} forward"] = lambda name=name, x=x: models[name](x)
            for call in calls.values():  # first calls settle the routes
                for _ in range(args.calls):
                    call()
            samples = {key: [] for key in calls}
            keys = list(calls)
            for _ in range(args.rounds):
                random.shuffle(keys)
                for key in keys:
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        calls[key]()
                    samples[key].append((time.perf_counter() - start) / args.calls)
            median = {key: statistics.median(values) for key, values in samples.items()}
            for phase in ("step", "forward"):
                base = median[f"torch {phase}"]
                print(f"{label} {tuple(x.shape)} {phase:7s} " + "  ".join(
                    f"{name} {median[f'{name} {phase}'] * 1e6:7.1f} us ({base / median[f'{name} {phase}']:.3f}x)"
                    for name in models))


if __name__ == "__main__":
    main()
