"""The course's examples (fastml.examples) at their quick sizes, and ``python -m fastml demo``;
LeNet's full run, which must reach 97% test accuracy, is marked slow."""

from __future__ import annotations

import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastml import examples
from fastml.__main__ import main
from fastml.training import MissingDependencyError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TRUE_W, TRUE_B = [2.0, -3.4], 4.2

pytest.importorskip("matplotlib", reason="the examples save plots (matplotlib is in the test extra)")
needs_sklearn = pytest.mark.skipif(bool(examples.missing_dependencies(["knn_digits"])),
                                   reason="the digits examples need scikit-learn (in the test extra)")


def run_quick(name: str, out_dir: Path) -> dict:
    results = examples.run(name, out_dir, quick=True, progress=False)
    assert results["files"], f"{name} wrote no picture"
    for path in results["files"]:
        assert Path(path).parent == out_dir and Path(path).read_bytes()[:8] == PNG_SIGNATURE, path
    assert isinstance(results["headline"], str) and results["headline"]
    return results


def test_every_example_module_is_registered_with_main():
    modules = {m.name for m in pkgutil.iter_modules(examples.__path__) if not m.name.startswith("_")}
    assert modules == {example.module for example in examples.EXAMPLES.values()}
    for example in examples.EXAMPLES.values():
        module = __import__(f"fastml.examples.{example.module}", fromlist=["main"])
        assert list(inspect.signature(module.main).parameters) == ["out_dir", "quick", "progress"]


@pytest.mark.parametrize("name", ["linreg_scratch", "linreg"])
def test_linear_regression_learns_the_true_parameters(name, tmp_path):
    results = run_quick(name, tmp_path)
    assert results["w"] == pytest.approx(TRUE_W, abs=0.02)
    assert results["b"] == pytest.approx(TRUE_B, abs=0.02)
    assert len(results["files"]) == (2 if name == "linreg" else 1)


def test_linear_regression_from_scratch_records_every_step(tmp_path):
    results = run_quick("linreg_scratch", tmp_path)
    assert results["steps"] == 2 * 1000 // 10  # two epochs of minibatches of 10
    assert results["final_loss"] < 1e-3


def test_wolf_pack_knn_reproduces_the_course(tmp_path):
    """The course's nine points and paw print (shared/seeds/004_*.txt, 4.1.3) and its printed
    answers: class 0 for k = 1, 3, 5 (at k = 1 a tie at distance 0.5, broken by the lower index)."""
    results = run_quick("knn_wolves", tmp_path)
    assert results["predictions"] == {1: 0, 3: 0, 5: 0} == results["course_answers"]
    assert results["matches_course"] and "the course prints the same" in results["headline"]


@needs_sklearn
def test_knn_on_digits(tmp_path):
    results = run_quick("knn_digits", tmp_path)
    assert all(accuracy > 0.95 for accuracy in results["accuracy"].values()), results["accuracy"]
    assert results["best_k"] in results["accuracy"]


@needs_sklearn
@pytest.mark.parametrize("name, bar", [("softmax", 0.88), ("mlp", 0.9), ("lenet", 0.85)])
def test_digit_classifiers_learn_at_their_quick_size(name, bar, tmp_path):
    results = run_quick(name, tmp_path)
    history = results["history"]
    assert results["test_accuracy"] == history.val["accuracy"][-1] >= bar
    assert history.train_loss[-1] < history.train_loss[0] / 2


@needs_sklearn
@pytest.mark.slow
def test_lenet_full_run_reaches_97_percent(tmp_path):
    results = examples.run("lenet", tmp_path, progress=False)
    assert results["test_accuracy"] >= 0.97


def test_digits_without_sklearn_says_how_to_install_it(monkeypatch):
    from fastml.examples._common import load_digits

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(MissingDependencyError, match="pip install 'fastml\\[examples\\]'"):
        load_digits()


@pytest.mark.long  # trains every demo in a child: 5 s
def test_demo_command_prints_results_and_writes_pngs(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fastml", "demo", "knn_wolves", "linreg", "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "knn_wolves:" in done.stdout and "b = 4.2" in done.stdout and "took" in done.stdout
    written = [Path(line.split("wrote ", 1)[1]) for line in done.stdout.splitlines() if "wrote " in line]
    assert {p.name for p in written} == {"knn_wolves.png", "linear_regression.png", "linear_regression_loss.png"}
    assert all(p.read_bytes()[:8] == PNG_SIGNATURE for p in written)
    assert "epoch 2/2" in done.stderr, "progress on stderr unless --no-progress"


def test_demo_unknown_name_exits_2_with_the_names(capsys):
    assert main(["demo", "linreg", "resnet"]) == 2
    err = capsys.readouterr().err
    assert "unknown example 'resnet'" in err and all(name in err for name in examples.EXAMPLES)


def test_demo_missing_dependency_exits_1_before_running(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # as if scikit-learn were not installed
    assert main(["demo", "knn_wolves", "lenet", "--out", str(tmp_path)]) == 1
    assert "need scikit-learn" in capsys.readouterr().err
    assert not list(tmp_path.iterdir()), "nothing ran"
