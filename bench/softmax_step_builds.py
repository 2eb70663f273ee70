"""The softmax-regression step on several builds of fastml's C++ module, in one process.

This VM's speed moves by up to 1.9x between phases, more than most kernel changes gain, so
fresh processes per build compare phases as much as builds. Here each build's module is loaded
side by side (``NAME=PATH`` of a built ``_C*.so``: another checkout's, or an ``-march`` variant)
and the step runs on each in turn, round after round, with torch's step in every round:

    python bench/softmax_step_builds.py old=/tmp/old/fastml/_C.cpython-311-x86_64-linux-gnu.so \\
        new=fastml/_C.cpython-311-x86_64-linux-gnu.so

The step is ``python -m fastml bench``'s linear_cross_entropy case N=256 D=784 C=10 (x, weight
and bias requiring grad, the gradients set to None first; fastml._bench's own step). Only the fused kernel's module is
swapped; the Python around it is this checkout's.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch

from fastml import _bench, _cpp
from fastml.ops.linear_cross_entropy import cpp_impl


def load(name: str, path: str):
    """The extension module at ``path``, loaded as ``fastml_build_<name>._C``. A name of its own
    for each build: loaded as plain ``_C``, the second build's import returned the first's module
    (CPython keeps single-phase extension modules by name), and two builds timed as one."""
    spec = importlib.util.spec_from_file_location(f"fastml_build_{name}._C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def use(module) -> None:
    """The fused kernel's lookups go to ``module`` from here on."""
    cpp_impl.kernel = lambda name, dtype: getattr(module, f"{name}_{_cpp._SUFFIX[dtype]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("builds", nargs="+", metavar="NAME=PATH")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=200, help="steps per build per round")
    args = parser.parse_args()
    builds = {name: load(name, path) for name, path in (b.split("=", 1) for b in args.builds)}

    steps = _bench._linear_cross_entropy_prepare(torch.device("cpu"), 256, 784, 10)
    torch_step, fastml_step = steps("torch"), steps("auto")

    def timed(step) -> float:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        return (time.perf_counter() - start) / args.steps * 1e6

    for module in builds.values():  # warm: the route settles, the caches fill
        use(module)
        timed(fastml_step)
    timed(torch_step)
    times = {name: [] for name in ("torch", *builds)}
    for _ in range(args.rounds):
        times["torch"].append(timed(torch_step))
        for name, module in builds.items():
            use(module)
            times[name].append(timed(fastml_step))
    if len({id(module) for module in builds.values()}) != len(builds):
        raise SystemExit("two builds loaded as one module")
    for stat in (statistics.median, min):
        torch_us = stat(times["torch"])
        cells = [f"torch {torch_us:.1f} us"] + [f"{name} {stat(t):.1f} us ({torch_us / stat(t):.2f}x)"
                                                  for name, t in times.items() if name != "torch"]
        print(f"{stat.__name__:>6}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
