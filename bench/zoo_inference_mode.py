"""Patched zoo models under torch.inference_mode against torch's, interleaved, on one machine.

Under inference mode the batch-norm folds, and the weights the convolution variants derive from
them, are inference tensors, which have no version counter. Until commit b20a61b the variants'
caches asked for one, and a patched model with channels-last input raised there. This checks that
the models run, that they equal torch's to rounding, and what they gain: fastml.patch(model,
fx=True, channels_last=True) then fastml.tune, batch 16 at 112x112, medians of --samples
interleaved samples.

    python bench/zoo_inference_mode.py [--models resnet18 mobilenet_v2] [--samples 9]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import fastml
from fastml import zoo

MODELS = ["resnet18", "mobilenet_v2", "regnet_y_400mf"]


def seconds(model: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    model(x)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=list(zoo.MODELS))
    parser.add_argument("--samples", type=int, default=9)
    args = parser.parse_args()
    torch.manual_seed(0)
    for name in args.models:
        reference = zoo.build(name).eval()
        model = copy.deepcopy(reference)
        fastml.patch(model, fx=True, channels_last=True)
        x = torch.randn(16, 3, 112, 112)
        with torch.inference_mode():
            fastml.tune(model, x)
            for _ in range(3):  # routes settled, weights derived
                model(x), reference(x)
            error = (model(x) - reference(x)).abs().max().item()
            times = {"torch": [], "fastml": []}
            for i in range(args.samples):
                pairs = [("torch", reference), ("fastml", model)]
                for which, m in (pairs if i % 2 == 0 else pairs[::-1]):
                    times[which].append(seconds(m, x))
        ours, theirs = statistics.median(times["fastml"]), statistics.median(times["torch"])
        print(f"{name}: inference_mode torch {theirs * 1e3:.1f} ms fastml {ours * 1e3:.1f} ms {theirs / ours:.2f}x  "
              f"max|diff| {error:.2e}", flush=True)


if __name__ == "__main__":
    main()
