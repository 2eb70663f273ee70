"""The C++ kernels' cache blocking on caches other than this CPU's (FASTML_CACHE_SIZES).

The kernels size their blocks from the L1d and L2 the CPU reports: rows per block of the fused
linear + squared loss, references per packed chunk of the distance tiles, rows per band of the
convolution's weight gradient, and the choice between two ways of summing a weight gradient. On
this machine's caches the tests' small shapes fit one block, so a block boundary, and the other
side of each choice, would run first on a CPU whose caches are smaller, or at shapes too large
for the default run. FASTML_CACHE_SIZES puts other sizes in place of the report: here, sizes
below any CPU's, which every derived size floors, so the cpp tests' own shapes cross many blocks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastml import _cpp

REPO = Path(__file__).resolve().parents[1]

# Below every CPU's caches: the fused loss's row blocks, the distance tiles' chunks and the weight
# gradient's bands shrink to their floors (a register tile's rows, 4 tiles' width, 16 positions).
TINY = "l1d=1K,l2=4K"

# The cpp tests of the ops whose blocks follow the caches (see the docstring), and of those built
# on them (the fused head's products, knn on the distance tiles, the fused conv block's gradient).
BLOCKED_OPS = ["test_linear.py", "test_linear_mse.py", "test_linear_cross_entropy.py", "test_cdist.py", "test_knn.py",
               "test_conv2d.py", "test_conv2d_relu_max_pool2d.py", "test_grouped_conv.py", "test_conv_layouts.py"]


@pytest.mark.parametrize("text, expected", [
    ("l1d=48K,l2=2M", {"l1d": 48 << 10, "l2": 2 << 20}),
    (" L2 = 512KiB ", {"l2": 512 << 10}),
    ("l1d=32768", {"l1d": 32768}),
    ("l2=1mib,l1d=1k", {"l1d": 1 << 10, "l2": 1 << 20}),
])
def test_sizes_are_read_in_bytes_kib_or_mib(text, expected):
    assert _cpp.cache_sizes_given(text) == expected


@pytest.mark.parametrize("text, why", [
    ("l3=32M", "'l3=32M' names no cache"),
    ("l1d", "'l1d' names no cache"),
    ("l1d=48K,l1d=32K", "l1d is given twice"),
    ("l2=lots", "'lots' is not a size"),
    ("l2=2G", "'2g' is not a size"),
    ("l2=-1M", "'-1m' is not a size"),
    ("l1d=512", "l1d=512 is out of range"),
    ("l2=2048M", "l2=2048m is out of range"),
])
def test_a_bad_value_names_the_variable_and_what_is_wrong(text, why):
    with pytest.raises(ValueError, match="FASTML_CACHE_SIZES") as raised:
        _cpp.cache_sizes_given(text)
    assert why in str(raised.value) and "e.g. 'l1d=48K,l2=2M'" in str(raised.value)


def _child(code: str, cache_sizes: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, FASTML_CACHE_SIZES=cache_sizes)
    env.pop("FASTML_BACKEND", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_the_kernels_block_for_the_sizes_given_and_info_says_so():
    try:
        reported = _cpp.module().cache_sizes()
    except ImportError:
        pytest.skip("the cpp backend is absent")
    done = _child("import fastml\nfrom fastml import _cpp\nprint(_cpp.module().cache_sizes())\n"
                  "print(fastml.info(print_report=False)['backends']['cpp']['detail'])", "l2=2M")
    assert done.returncode == 0, done.stderr[-3000:]
    sizes, detail = done.stdout.splitlines()[:2]
    assert sizes == str({"l1d": reported["l1d"], "l2": 2 << 20})  # the one not given stays as reported
    assert "L2 2048 KiB (FASTML_CACHE_SIZES)" in detail


def test_a_bad_value_stops_the_first_cpp_kernel_naming_the_variable():
    try:
        _cpp.module()
    except ImportError:
        pytest.skip("the cpp backend is absent")
    done = _child("import torch, fastml\nwith fastml.use_backend('cpp'):\n"
                  "    fastml.functional.linear(torch.randn(3, 2), torch.randn(4, 2))", "l2=2G")
    assert done.returncode != 0
    assert "ValueError: FASTML_CACHE_SIZES='l2=2G': '2g' is not a size" in done.stderr


def test_cpp_ops_match_the_reference_across_block_boundaries():
    """The cpp tests of every blocked op, in a child whose caches are TINY: each block boundary and
    each choice's other side runs on the tests' shapes, against the same float64 references."""
    try:
        _cpp.module()
    except ImportError:
        pytest.skip("the cpp backend is absent")
    env = dict(os.environ, FASTML_CACHE_SIZES=TINY)
    env.pop("FASTML_BACKEND", None)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cpp", "-W", "ignore",
         *[str(REPO / "tests" / name) for name in BLOCKED_OPS]],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-2000:]
    assert done.returncode == 0, f"cpp tests on caches {TINY}: {summary}\n{done.stdout[-6000:]}"
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary
