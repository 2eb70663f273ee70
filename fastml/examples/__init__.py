"""The course's models end to end on fastml, each a short module with ``main(out_dir, quick=False,
progress=True) -> dict`` that trains, saves its picture(s) as PNG under ``out_dir`` and returns
its results (``headline``: one line to print; ``files``: the PNGs written).

Run them with ``python -m fastml demo [name ...]``, or read them: they are written to be read.
``quick=True`` runs a reduced size in seconds (what the tests run).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util


@dataclasses.dataclass(frozen=True)
class Example:
    module: str
    about: str
    needs: tuple[str, ...]  # importable names of the optional dependencies it needs


PLOT = ("matplotlib",)
DIGITS = ("matplotlib", "sklearn")

EXAMPLES = {
    "linreg_scratch": Example("linear_regression_scratch", "linear regression from scratch (w = [2, -3.4], b = 4.2)",
                              PLOT),
    "linreg": Example("linear_regression", "linear regression, concise: fastml modules and the Trainer", PLOT),
    "knn_wolves": Example("knn_wolves", "the course's wolf-pack KNN (its nine points, paw print at (2, 2)), k = 1, 3, 5", PLOT),
    "knn_digits": Example("knn_digits", "KNN on scikit-learn's digits, accuracy for each k", DIGITS),
    "softmax": Example("softmax_regression", "softmax regression on the digits", DIGITS),
    "mlp": Example("mlp", "a multilayer perceptron on the digits", DIGITS),
    "lenet": Example("lenet", "LeNet on the digits upsampled to 28×28 (97% or more)", DIGITS),
}

# pip names where they differ from the import names
_PIP_NAMES = {"sklearn": "scikit-learn"}


def missing_dependencies(names) -> list[str]:
    """The pip names of the optional packages the named examples need and this Python lacks."""
    wanted = dict.fromkeys(need for name in names for need in EXAMPLES[name].needs)
    return [_PIP_NAMES.get(need, need) for need in wanted if importlib.util.find_spec(need) is None]


def run(name: str, out_dir, quick: bool = False, progress: bool = True) -> dict:
    """Run one example by its name in EXAMPLES; returns its results."""
    module = importlib.import_module(f"{__name__}.{EXAMPLES[name].module}")
    return module.main(out_dir, quick=quick, progress=progress)
