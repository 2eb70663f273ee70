"""Every Triton kernel compiles ahead of time to an sm_90 cubin, GPU or not (see triton_aot.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton_aot

KERNELS = ["fastml.ops.sgd.triton_impl:_sgd_kernel", "fastml.ops.sgd.triton_impl:_course_kernel",
           "fastml.ops.adam.triton_impl:_adam_kernel", "fastml.ops.cdist.triton_impl:_cdist_kernel",
           "fastml.ops.knn.triton_impl:_knn_kernel",
           "fastml.ops.knn.triton_impl:_screen_kernel", "fastml.ops.max_pool2d.triton_impl:_max_pool2d_forward_kernel",
           "fastml.ops.max_pool2d.triton_impl:_max_pool2d_backward_kernel",
           "fastml.ops.max_pool2d.triton_impl:_max_pool2d_scatter_kernel",
           *(f"fastml.ops.conv2d.triton_impl:{name}" for name in (
               "_conv2d_forward_kernel", "_conv2d_backward_input_kernel", "_conv2d_backward_weight_kernel",
               "_sum_partials_kernel")),
           "fastml.ops.conv2d_relu_max_pool2d.triton_impl:_conv2d_relu_max_pool2d_forward_kernel",
           "fastml.ops.conv2d_relu_max_pool2d.triton_impl:_pool_grad_scatter_kernel"]


def test_triton_kernels_compile_for_an_h100():
    """The interpreter runs the kernels' Python; this compiles them to sm_90 cubins (ptxas ships
    with triton), so a construct only the interpreter accepts fails here, GPU or not. In a child
    process: with TRITON_INTERPRET set, as in this one, kernels are not compilable objects."""
    pytest.importorskip("triton", reason="triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("triton_aot.py")
    done = subprocess.run([sys.executable, str(script), *KERNELS], env=env, capture_output=True, text=True,
                          timeout=600)
    if done.returncode == triton_aot.UNSUPPORTED:
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("compiled") == len(triton_aot.DTYPES) * len(KERNELS), done.stdout
