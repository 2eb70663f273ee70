"""The C++ kernels' cache blocking on caches other than this CPU's (FASTML_CACHE_SIZES).

The kernels size their blocks from the caches the CPU reports: from the L2, rows per block of the
fused linear + squared loss, references per packed chunk of the distance tiles, rows per band of
the convolution's weight gradient, the choice between two ways of summing a weight gradient (and
whether the fused conv block's sparse weight gradient applies) and the order of the batch-layout
convolution's tasks; from the L1d, the input channels that convolution sums per pass. On this machine's caches the
tests' small shapes fit one block, so a block boundary, and the other side of each choice, would
run first on a CPU whose caches are smaller, or at shapes too large for the default run.
FASTML_CACHE_SIZES puts other sizes in place of the report: here, sizes below any CPU's, which
every derived size floors, so the cpp tests' own shapes cross many blocks.
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
# gradient's bands shrink to their floors (a register tile's rows, 4 tiles' width, 16 positions),
# the batch-layout convolution sums one input channel per pass and takes each output row's channel
# blocks one after another wherever its weights are under 2 KiB.
TINY = "l1d=1K,l2=4K"

# The tests of the ops whose kernels read the cache sizes (csrc: linear, linear_mse, cdist, knn,
# conv2d, conv2d_relu_max_pool2d), and of the convolution layouts, whose training runs the weight
# gradient's bands. (The fused softmax head and the grouped convolutions block by constants.)
BLOCKED_OPS = ["test_linear.py", "test_linear_mse.py", "test_cdist.py", "test_knn.py", "test_conv2d.py",
               "test_conv2d_relu_max_pool2d.py", "test_conv_layouts.py"]


@pytest.mark.parametrize("text, expected", [
    ("l1d=48K,l2=2M", {"l1d": 48 << 10, "l2": 2 << 20}),
    (" L2 = 512KiB ", {"l2": 512 << 10}),
    ("l2=48 KiB", {"l2": 48 << 10}),
    ("l1d=32768", {"l1d": 32768}),
    ("l2=1mib,l1d=1k", {"l1d": 1 << 10, "l2": 1 << 20}),
    ("l2=1G", {"l2": 1 << 30}),
])
def test_sizes_are_read_in_bytes_kib_or_mib(text, expected):
    assert _cpp.cache_sizes_given(text) == expected


@pytest.mark.parametrize("text, why", [
    ("l3=32M", "'l3=32M' names no cache"),
    ("l1d", "'l1d' names no cache"),
    ("l1d=48K,l1d=32K", "l1d is given twice"),
    ("l2=lots", "'lots' is not a size"),
    ("l2=2T", "'2T' is not a size"),
    ("l2=-1M", "'-1M' is not a size"),
    ("l2=\u00b2K", "'\u00b2K' is not a size"),  # str.isdigit's digits that are no decimal ones
    ("l2=\u0664K", "'\u0664K' is not a size"),
    ("l2=4K,", "'' names no cache"),
    ("l1d=512", "l1d=512 is out of range"),
    ("l2=2G", "l2=2G is out of range"),
])
def test_a_bad_value_names_the_variable_and_what_is_wrong(text, why):
    with pytest.raises(ValueError, match="FASTML_CACHE_SIZES") as raised:
        _cpp.cache_sizes_given(text)
    assert why in str(raised.value) and "e.g. 'l1d=48K,l2=2M'" in str(raised.value)


@pytest.fixture
def cpp():
    try:
        return _cpp.module()
    except ImportError:
        pytest.skip("the cpp backend is absent")


def _child(args: list[str], cache_sizes: str | None, **env_set: str) -> subprocess.CompletedProcess:
    """``python *args`` with FASTML_CACHE_SIZES=``cache_sizes`` (unset: None), no forced backend."""
    env = {name: value for name, value in os.environ.items() if name not in ("FASTML_CACHE_SIZES", "FASTML_BACKEND")}
    if cache_sizes is not None:
        env["FASTML_CACHE_SIZES"] = cache_sizes
    env.update(env_set)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=900)


REPORT = ("import fastml\nfrom fastml import _cpp\nprint(_cpp.module().cache_sizes())\n"
          "print(fastml.info(print_report=False)['backends']['cpp']['detail'])")


@pytest.mark.long  # two child processes that import torch and fastml: ~5 s
def test_the_kernels_block_for_the_sizes_given_and_info_says_so(cpp):
    own, given = _child(["-c", REPORT], None), _child(["-c", REPORT], "l2=2M")
    assert own.returncode == 0 and given.returncode == 0, own.stderr[-3000:] + given.stderr[-3000:]
    reported = eval(own.stdout.splitlines()[0])  # the CPU's own, in a child without the variable
    sizes, detail = given.stdout.splitlines()[:2]
    assert sizes == str({"l1d": reported["l1d"], "l2": 2 << 20})  # the one not given stays as reported
    assert "L2 2048 KiB (FASTML_CACHE_SIZES)" in detail
    assert "FASTML_CACHE_SIZES" not in own.stdout


def test_a_bad_value_stops_the_first_cpp_kernel_naming_the_variable(cpp):
    done = _child(["-c", "import torch, fastml\nwith fastml.use_backend('cpp'):\n"
                         "    fastml.functional.linear(torch.randn(3, 2), torch.randn(4, 2))"], "l2=2T")
    assert done.returncode != 0
    assert "ValueError: FASTML_CACHE_SIZES='l2=2T': '2T' is not a size" in done.stderr


@pytest.mark.long  # the blocked ops' test files again in a child: 15 s on 2 cores
def test_cpp_ops_match_the_reference_across_block_boundaries(cpp):
    """The tests of every blocked op, in a child whose caches are TINY and whose backend-parametrised
    tests run on cpp alone (FASTML_TEST_BACKENDS): each block boundary and each choice's other side
    runs on the tests' shapes, against the same float64 references; the tests without the backend
    fixture (the layouts' training, a model's) run on the measured choice, cpp among it."""
    done = _child(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore", "-m", "not slow",  # (long ones too)
                   *[str(REPO / "tests" / name) for name in BLOCKED_OPS]], TINY, FASTML_TEST_BACKENDS="cpp")
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-2000:]
    assert done.returncode == 0, f"tests on caches {TINY}: {summary}\n{done.stdout[-6000:]}"
    assert " passed" in summary, summary
