"""The README's example runs as written and does what it says."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_learns_the_course_parameters():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(blocks[0], str(README), "exec"), namespace)
    model, reg = namespace["model"], namespace["reg"]
    true_w = torch.tensor([2.0, -3.4])
    assert (model.weight.detach().reshape(-1) - true_w).abs().max() < 1e-2
    assert abs(model.bias.item() - 4.2) < 1e-2
    assert (torch.as_tensor(reg.coef_).reshape(-1) - true_w).abs().max() < 1e-2
    assert len(reg.loss_history_) == 3 and reg.loss_history_[-1] < 1e-4


def test_readme_commands_match_ci():
    """.ci/run runs exactly the README's test command."""
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    command = 'python -m pip install -e ".[test]" && python -m pytest'
    assert command in text and command in ci
    assert 'python -m pip install -e ".[plot]" && python -m fastml bench' in text


def test_readme_profile_table_is_the_recorded_profile():
    """The README's profile table is fastml's own report of the recorded JSON (bench/update_readme.py
    writes it), not typed numbers."""
    spec = importlib.util.spec_from_file_location("update_readme", README.parent / "bench" / "update_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.table_block() in README.read_text()
