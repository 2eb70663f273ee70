"""fastml.training: the course's Module / DataModule / Trainer."""

from __future__ import annotations

import io
import math
import re
import sys
from pathlib import Path

import pytest
import torch

import fastml
from fastml.data import InvalidArgumentError
from fastml.training import Classifier, DataModule, Module, Trainer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Regression(Module):
    def __init__(self, lr=0.2, optimizer=None):
        super().__init__(lr)
        self.net = fastml.nn.Linear(3, 1)
        self.optimizer = optimizer
        self.steps_seen = 0

    def loss(self, y_hat, y):
        return fastml.functional.mse_loss(y_hat, y)

    def configure_optimizers(self):
        return self.optimizer(self.parameters(), lr=self.lr) if self.optimizer else super().configure_optimizers()

    def on_train_step_end(self):
        self.steps_seen += 1


def regression_data(n=100, seed=0, batch_size=16):
    X, y = fastml.data.synthetic_linear([1.0, -2.0, 0.5], 0.3, n, generator=torch.Generator().manual_seed(seed))
    return DataModule((X[:80], y[:80]), (X[80:], y[80:]), batch_size=batch_size, seed=seed)


def flat_batches(loader):
    return [torch.cat(parts) for parts in zip(*loader)]


def test_datamodule_shuffles_each_epoch_and_repeats_with_its_seed():
    first, again, other = regression_data(seed=1), regression_data(seed=1), regression_data(seed=1)
    other.generator.manual_seed(2)
    loader = first.train_dataloader()
    epoch1, epoch2 = flat_batches(loader), flat_batches(loader)
    assert not torch.equal(epoch1[0], epoch2[0]), "a new order every epoch"
    assert sorted(epoch1[0][:, 0].tolist()) == sorted(first.train[0][:, 0].tolist()), "every example once"
    assert torch.equal(flat_batches(again.train_dataloader())[0], epoch1[0]), "the seed repeats the run"
    assert not torch.equal(flat_batches(other.train_dataloader())[0], epoch1[0])
    X_val, y_val = flat_batches(first.val_dataloader())
    assert torch.equal(X_val, first.val[0]) and torch.equal(y_val, first.val[1]), "validation keeps its order"
    assert DataModule((first.train[0], first.train[1])).val_dataloader() is None


@pytest.mark.parametrize("make, message", [
    (lambda X, y: DataModule(X), "train must be a tuple of tensors"),
    (lambda X, y: DataModule((X, y), val=y), "val must be a tuple of tensors"),
    (lambda X, y: DataModule((X, y[:-1])), "same first dimension"),
    (lambda X, y: DataModule((X, y), batch_size=0), "batch_size must be a positive int"),
    (lambda X, y: DataModule((X, y), shuffle="no"), "shuffle must be True or False"),
    (lambda X, y: DataModule((X, y), seed=None), "seed must be an int"),
    (lambda X, y: DataModule((X, y), seed=1.5), "seed must be an int"),
    (lambda X, y: Trainer(2, progress="log.txt"), "progress must be True, False or a stream"),
])
def test_datamodule_rejects_bad_data_when_built(make, message):
    X, y = torch.randn(10, 2), torch.randn(10, 1)
    with pytest.raises(InvalidArgumentError, match=message):
        make(X, y)


def test_trainer_records_every_step_and_every_epoch():
    torch.manual_seed(0)
    model, data = Regression(), regression_data()
    history = Trainer(max_epochs=4, progress=False).fit(model, data)
    steps_per_epoch = math.ceil(80 / 16)
    assert len(history.train_loss) == 4 * steps_per_epoch == model.steps_seen
    assert history.epoch_end_step == [steps_per_epoch * (e + 1) for e in range(4)]
    assert list(history.val) == ["loss"] and len(history.val["loss"]) == 4 and len(history.epoch_seconds) == 4
    assert history.val["loss"][-1] < history.val["loss"][0] / 10
    device = next(model.parameters()).device  # "auto" put the model on the GPU where there is one
    with torch.no_grad():  # the recorded validation loss is the whole validation set's mean
        expected = fastml.functional.mse_loss(model(data.val[0].to(device)), data.val[1].to(device)).item()
    assert history.val["loss"][-1] == pytest.approx(expected, rel=1e-5)


def test_fastml_optimizer_trains_as_torch_optimizer():
    """fastml's optimizers zero the gradients inside their step, torch's through zero_grad():
    the same model and data give the same parameters either way."""
    results = []
    for optimizer in (fastml.optim.SGD, torch.optim.SGD):
        torch.manual_seed(0)
        model = Regression(optimizer=optimizer)
        Trainer(max_epochs=3, progress=False).fit(model, regression_data())
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_gradients_left_from_before_fit_are_cleared_first():
    """A backward before fit (trying the model out) leaves gradients: the course's loop clears
    them with its first zero_grad, and so must a fastml optimizer that zeroes after its steps."""
    results = []
    for optimizer in (fastml.optim.SGD, torch.optim.SGD):
        torch.manual_seed(0)
        model, data = Regression(optimizer=optimizer), regression_data()
        model.loss(model(data.train[0]), data.train[1]).backward()  # left over
        Trainer(max_epochs=1, progress=False).fit(model, data)
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


class Logistic(Classifier):
    def __init__(self):
        super().__init__(lr=0.5)
        self.net = fastml.nn.Linear(2, 2)


def test_classifier_reports_loss_and_accuracy():
    torch.manual_seed(0)
    X = torch.randn(200, 2)
    y = (X[:, 0] + X[:, 1] > 0).long()  # separable by a line through the origin
    data = DataModule((X[:150], y[:150]), (X[150:], y[150:]), batch_size=25)
    history = Trainer(max_epochs=10, progress=False).fit(Logistic(), data)
    assert set(history.val) == {"loss", "accuracy"}
    assert history.val["accuracy"][-1] >= 0.95
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    assert fastml.training.accuracy(logits, torch.tensor([0, 1, 1, 1])).item() == 0.75


def test_module_without_a_loss_says_what_to_define():
    class NoLoss(Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(3, 1)

    with pytest.raises(NotImplementedError, match="define loss"):
        Trainer(max_epochs=1, progress=False).fit(NoLoss(), regression_data())


def test_device_choice():
    assert Trainer(1, progress=False).device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert Trainer(1, device="cpu", progress=False).device == torch.device("cpu")
    with pytest.raises(InvalidArgumentError, match="device must be"):
        Trainer(1, device="nowhere")
    with pytest.raises(InvalidArgumentError, match="max_epochs must be a positive int"):
        Trainer(0)
    if not torch.cuda.is_available():
        with pytest.raises(InvalidArgumentError, match="no CUDA GPU is visible"):
            Trainer(1, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_trainer_moves_model_and_cpu_batches_to_the_gpu():
    torch.manual_seed(0)
    model = Regression()
    history = Trainer(max_epochs=3, device="cuda", progress=False).fit(model, regression_data())
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert history.val["loss"][-1] < history.val["loss"][0]


def test_progress_goes_to_stderr_and_can_be_silenced(capsys):
    Trainer(max_epochs=2).fit(Regression(), regression_data())
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "epoch 1/2" in captured.err and "epoch 2/2" in captured.err and "val loss" in captured.err
    Trainer(max_epochs=2, progress=False).fit(Regression(), regression_data())
    assert capsys.readouterr().err == ""
    stream = io.StringIO()  # not a terminal: a line per epoch, ten lines a fit at most
    Trainer(max_epochs=25, progress=stream).fit(Regression(), regression_data())
    lines = stream.getvalue().splitlines()
    assert 1 < len(lines) <= 10 and lines[-1].startswith("epoch 25/25")


def test_plot_saves_the_loss_curve_as_png(tmp_path):
    pytest.importorskip("matplotlib")
    trainer = Trainer(max_epochs=2, progress=False)
    with pytest.raises(RuntimeError, match="call fit"):
        trainer.plot(tmp_path / "early.png")
    trainer.fit(Logistic(), DataModule((torch.randn(40, 2), torch.randint(0, 2, (40,))),
                                       (torch.randn(10, 2), torch.randint(0, 2, (10,))), batch_size=8))
    path = trainer.plot(tmp_path / "sub" / "loss.png")
    assert path == tmp_path / "sub" / "loss.png" and path.read_bytes()[:8] == PNG_SIGNATURE


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    trainer = Trainer(max_epochs=1, progress=False)
    trainer.fit(Regression(), regression_data())
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    with pytest.raises(fastml.training.MissingDependencyError, match=r"pip install 'fastml\[plot\]'"):
        trainer.plot(tmp_path / "loss.png")
    assert not (tmp_path / "loss.png").exists()


def test_readme_training_example_runs(tmp_path, monkeypatch):
    """The README's Trainer example, as written (it saves mlp.png in the working directory)."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "fastml.training" in b)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["history"].val["accuracy"][-1] > 0.9
    assert (tmp_path / "mlp.png").read_bytes()[:8] == PNG_SIGNATURE
