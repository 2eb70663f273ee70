"""scikit-learn's own neighbours tests, run on fastml.neighbors' estimators.

scikit-learn ships its test suite. ``sklearn.neighbors.tests.test_neighbors`` (and the graph and
pipeline tests) run here in a child pytest with ``sklearn.neighbors.KNeighborsClassifier`` and
``KNeighborsRegressor`` replaced by fastml's, as a user's code that swaps them would see them.
Every test must pass. About ten seconds on a 2-core machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("sklearn", reason="scikit-learn's own suite is what this runs")

PLUGIN = textwrap.dedent('''
    import types
    import sklearn.neighbors as neighbors
    import fastml.neighbors

    # fastml's estimators hand what their kernels do not compute to scikit-learn's: those stay
    # scikit-learn's own classes, not the swapped names
    _originals = types.SimpleNamespace(KNeighborsClassifier=neighbors.KNeighborsClassifier,
                                       KNeighborsRegressor=neighbors.KNeighborsRegressor)

    def pytest_configure(config):
        neighbors.KNeighborsClassifier = fastml.neighbors.KNeighborsClassifier
        neighbors.KNeighborsRegressor = fastml.neighbors.KNeighborsRegressor
        fastml.neighbors._sklearn_neighbors = lambda: _originals

    def pytest_collection_modifyitems(session, config, items):
        # A test that asks issubclass(cls, KNeighborsMixin) to pick n_neighbors over a radius
        # asks it of fastml's estimators too (issubclass takes a tuple of classes).
        for module in {item.module for item in items if hasattr(item, "module")}:
            mixin = getattr(module, "KNeighborsMixin", None)
            if isinstance(mixin, type):
                module.KNeighborsMixin = (mixin, fastml.neighbors.KNeighborsClassifier,
                                          fastml.neighbors.KNeighborsRegressor)
''')


def test_sklearn_neighbors_suite_passes_on_fastml(tmp_path):
    (tmp_path / "swap_to_fastml.py").write_text(PLUGIN)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "swap_to_fastml", "-p", "no:cacheprovider", "-q", "-W", "ignore",
         "--pyargs", "sklearn.neighbors.tests.test_neighbors", "sklearn.neighbors.tests.test_graph",
         "sklearn.neighbors.tests.test_neighbors_pipeline"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True,
        timeout=1200)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-2000:]
    assert done.returncode == 0, f"scikit-learn's suite on fastml: {summary}\n{done.stdout[-6000:]}"
    passed = int(summary.split(" passed")[0].split()[-1]) if " passed" in summary else 0
    assert passed >= 500 and "failed" not in summary and "deselected" not in summary, summary
