"""Block size × warps of the Triton multi-tensor optimizer launches, against torch's fused steps.

A tuning experiment for a CUDA machine, not a benchmark of record: for each (BLOCK, num_warps)
it times fastml's SGD (momentum) and Adam steps on the bench suite's tensors (bench_optim.py's
CUDA sizes) with triton.testing.do_bench (CUDA events, median), beside torch's fused optimizers
on the same tensors, and prints the achieved bandwidth (bytes every step must move over its
time) and the ratio to torch's fused step.

    python bench/gpu_optimizer_sweep.py [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json

import torch
import triton.testing

import fastml
from fastml import _bench
from fastml import _triton as tt
from fastml.ops.adam import triton_impl as adam_impl
from fastml.ops.sgd import triton_impl as sgd_impl

SIZES = {"100M params in 100 tensors": [1_000_000] * 100, "1000 tensors of 1024": [1024] * 1000}
BLOCKS = (2048, 4096, 8192)
WARPS = (4, 8)


def _time(step) -> float:
    step()
    torch.cuda.synchronize()
    return triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median") * 1e-3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for kind in ("sgd", "adam"):
        for label, sizes in SIZES.items():
            make = _bench.optimizer_step_factory(kind, sizes, "cuda")
            moved = _bench.FLOAT_BYTES * _bench.OPTIMIZER_ARRAY_PASSES[kind] * sum(sizes)
            fused = _time(make("torch-fused"))
            print(f"{kind:4} {label:28} torch-fused          {fused * 1e3:8.3f} ms {moved / fused / 1e9:7.0f} GB/s")
            rows.append(dict(kind=kind, case=label, impl="torch-fused", seconds=fused))
            for block in BLOCKS:
                for warps in WARPS:
                    tt.MULTI_TENSOR_BLOCK, sgd_impl.NUM_WARPS, adam_impl.NUM_WARPS = block, warps, warps
                    with fastml.use_backend("triton"):
                        seconds = _time(make("triton"))
                    print(f"{kind:4} {label:28} triton {block:5} × {warps:2}w  {seconds * 1e3:8.3f} ms "
                          f"{moved / seconds / 1e9:7.0f} GB/s  {fused / seconds:5.2f}x fused")
                    rows.append(dict(kind=kind, case=label, impl="triton", block=block, warps=warps,
                                     seconds=seconds))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
