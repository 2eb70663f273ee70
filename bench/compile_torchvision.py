"""torch.compile on a torchvision model, patched and unpatched: the peer a user compiling their
model meets. Inductor (default mode) compiles each; a patched model's fastml layers are
``fastml::`` custom ops in its graph, whose backend the measured choice picks when the graph runs.
Batch 8 of 112x112, 100 classes; the best of three rounds of five calls, after two warm-up calls
(a training call is forward, sum, backward; an inference call runs under no_grad in eval mode).

    python bench/compile_torchvision.py [model] [train|infer]
"""

from __future__ import annotations

import copy
import sys
import time
import warnings

import torch

import fastml
from torchvision_models import import_models


def runner(model, x, train: bool):
    if train:
        return lambda: model(x).sum().backward()

    def infer():
        with torch.no_grad():
            model(x)
    return infer


def best_time(call) -> float:
    for _ in range(2):
        call()
    rounds = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(5):
            call()
        rounds.append((time.perf_counter() - start) / 5)
    return min(rounds)


def main(name: str = "resnet18", mode: str = "infer") -> None:
    warnings.filterwarnings("ignore")
    train = mode == "train"
    torch.manual_seed(0)
    unpatched = import_models().get_model(name, num_classes=100)
    patched = copy.deepcopy(unpatched)
    fastml.patch(patched)
    x = torch.randn(8, 3, 112, 112)
    times = {}
    for label, model in (("compiled unpatched", unpatched), ("compiled patched", patched)):
        model.train(train)
        compiled = torch.compile(model)
        start = time.time()
        runner(compiled, x, train)()
        compile_seconds = time.time() - start
        times[label] = best_time(runner(compiled, x, train))
        print(f"{label:20s} {times[label] * 1e3:8.2f} ms  (first call, compiling: {compile_seconds:.0f} s)", flush=True)
    unpatched.train(train)
    times["eager unpatched"] = best_time(runner(unpatched, x, train))
    print(f"{'eager unpatched':20s} {times['eager unpatched'] * 1e3:8.2f} ms")
    print(f"{name} {mode}: compiled unpatched / compiled patched "
          f"{times['compiled unpatched'] / times['compiled patched']:.3f}x, "
          f"eager unpatched / compiled patched {times['eager unpatched'] / times['compiled patched']:.3f}x")


if __name__ == "__main__":
    main(*sys.argv[1:3])
