"""The course's training loop in three small classes, after d2l's ``Module``, ``DataModule`` and
``Trainer``: the model says how to compute its loss and metrics, the data module hands out
minibatches, and the trainer runs the epochs on a device, shows progress, keeps a history and
plots it.

>>> class SoftmaxRegression(fastml.training.Classifier):
...     def __init__(self):
...         super().__init__(lr=0.1)
...         self.net = torch.nn.Sequential(torch.nn.Flatten(), fastml.nn.Linear(64, 10))
>>> data = fastml.training.DataModule((X_train, y_train), (X_test, y_test), batch_size=64, seed=0)
>>> trainer = fastml.training.Trainer(max_epochs=10)
>>> history = trainer.fit(SoftmaxRegression(), data)
>>> history.train_loss[-1], history.val["accuracy"][-1]
>>> trainer.plot("softmax.png")   # needs matplotlib: pip install "fastml[plot]"
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import sys
import time
from pathlib import Path

import torch

from fastml import data as _data
from fastml import functional, optim
from fastml.data import InvalidArgumentError

__all__ = ["Classifier", "DataModule", "History", "MissingDependencyError", "Module", "Trainer", "accuracy",
           "figure", "save_figure"]


class MissingDependencyError(ImportError):
    """An optional dependency (matplotlib for plots, scikit-learn for the digits) is not installed;
    the message says what to install."""


# --------------------------------------------------------------------------------------- model


class Module(torch.nn.Module):
    """A model that knows how it is trained. Set ``self.net`` (or override ``forward``), define
    ``loss(y_hat, y)``, and override whichever step differs; a batch is ``(*inputs, target)``.

    lr: the learning rate of the default optimizer, ``fastml.optim.SGD``.
    """

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.lr = lr

    def forward(self, *inputs):
        return self.net(*inputs)

    def loss(self, y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__}: define loss(y_hat, y), or override training_step(batch)")

    def training_step(self, batch) -> torch.Tensor:
        """The minibatch's loss, a scalar the Trainer differentiates."""
        return self.loss(self(*batch[:-1]), batch[-1])

    def validation_step(self, batch) -> dict[str, torch.Tensor]:
        """Metrics of one validation minibatch, each its mean over the minibatch's examples (the
        Trainer weighs them by minibatch size into the epoch's values)."""
        return {"loss": self.training_step(batch)}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return optim.SGD(self.parameters(), lr=self.lr)

    def on_train_step_end(self) -> None:
        """Called after every optimizer step, e.g. to record the parameters; does nothing here."""


def accuracy(y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The share of rows whose largest logit is the target class."""
    return (y_hat.argmax(dim=1) == y).float().mean()


class Classifier(Module):
    """A Module whose outputs are class logits: softmax cross-entropy loss, and validation
    metrics ``loss`` and ``accuracy``."""

    def loss(self, y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return functional.cross_entropy(y_hat, y)

    def validation_step(self, batch) -> dict[str, torch.Tensor]:
        y_hat = self(*batch[:-1])
        return {"loss": self.loss(y_hat, batch[-1]), "accuracy": accuracy(y_hat, batch[-1])}


# ---------------------------------------------------------------------------------------- data


def _tensors(name: str, value) -> tuple[torch.Tensor, ...]:
    if isinstance(value, torch.Tensor) or not isinstance(value, (tuple, list)) or not value:
        raise InvalidArgumentError(f"{name} must be a tuple of tensors (inputs..., targets), "
                                   f"got {type(value).__name__}")
    return tuple(value)


class DataModule:
    """Minibatches of in-memory tensors for the Trainer.

    train, val: tuples of tensors sharing their first (example) dimension, the targets last; val
    may be None. The training minibatches come in a new order every epoch, drawn from a generator
    seeded with ``seed``, so a run repeats exactly; validation minibatches keep their order.
    Override ``train_dataloader`` / ``val_dataloader`` to hand out any iterable of minibatches.
    """

    def __init__(self, train, val=None, *, batch_size: int = 32, shuffle: bool = True, seed: int = 0) -> None:
        self.train = _tensors("train", train)
        self.val = None if val is None else _tensors("val", val)
        if not isinstance(shuffle, bool):
            raise InvalidArgumentError(f"shuffle must be True or False, got {shuffle!r}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise InvalidArgumentError(f"seed must be an int, got {seed!r}")
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.train_dataloader(), self.val_dataloader()  # bad shapes and batch sizes fail here, not mid-fit

    def train_dataloader(self):
        return _data.batches(*self.train, batch_size=self.batch_size, shuffle=self.shuffle, generator=self.generator)

    def val_dataloader(self):
        if self.val is None:
            return None
        return _data.batches(*self.val, batch_size=self.batch_size, shuffle=False)


# ------------------------------------------------------------------------------------- trainer


@dataclasses.dataclass
class History:
    """What a ``Trainer.fit`` recorded."""

    train_loss: list[float] = dataclasses.field(default_factory=list)
    """one value per optimizer step"""
    epoch_end_step: list[int] = dataclasses.field(default_factory=list)
    """the number of steps done when each epoch ended: the x of the per-epoch values"""
    val: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    """validation metric name → one value per epoch"""
    epoch_seconds: list[float] = dataclasses.field(default_factory=list)


def _device(device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidArgumentError(f"device must be 'auto', 'cpu', 'cuda' or a torch.device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError("device: cuda was asked for but no CUDA GPU is visible; use 'auto' or 'cpu'")
    return device


class _ProgressBar:
    """A fit's progress on a stream. On a terminal, one line redrawn in place, at most 10 times a
    second so that tiny steps pay nothing for it; elsewhere (a log, a test's capture) a line after
    each epoch, ten lines a fit at most."""

    def __init__(self, stream, max_epochs: int) -> None:
        self.stream, self.max_epochs = stream, max_epochs
        self.live = hasattr(stream, "isatty") and stream.isatty()
        self.every = 1 if self.live else math.ceil(max_epochs / 10)
        self.last_draw, self.results = 0.0, ""

    def _write(self, line: str, end: str = "") -> None:
        self.stream.write(f"\r{line}\033[K{end}" if self.live else line + end)
        self.stream.flush()

    def _line(self, epoch: int, step: int, steps: int, loss: float) -> str:
        filled = 20 * step // max(steps, 1)
        return (f"epoch {epoch + 1:>{len(str(self.max_epochs))}}/{self.max_epochs} "
                f"[{'#' * filled}{'.' * (20 - filled)}] {step}/{steps}  loss {loss:.4g}{self.results}")

    def step(self, epoch: int, step: int, steps: int, loss: torch.Tensor) -> None:
        now = time.perf_counter()
        if self.live and now - self.last_draw > 0.1:
            self.last_draw = now
            self._write(self._line(epoch, step, steps, float(loss)))

    def epoch_end(self, epoch: int, steps: int, loss: float, val: dict[str, float], seconds: float) -> None:
        self.results = "".join(f"  val {name} {value:.4g}" for name, value in val.items())
        last = epoch + 1 == self.max_epochs
        if self.live or last or (epoch + 1) % self.every == 0:
            end = "" if self.live and not last else "\n"  # a terminal's line stays until the fit ends
            self._write(self._line(epoch, steps, steps, loss) + f"  {seconds:.1f}s", end)


class Trainer:
    """Runs a Module's training on a DataModule's minibatches.

    max_epochs: passes over the training data. device: "auto" (a CUDA GPU when one is visible,
    else the CPU), or any torch device; the model and every minibatch are moved there.
    progress: a progress line per epoch on stderr (or on the stream given); False for none.
    """

    def __init__(self, max_epochs: int, device="auto", progress=True) -> None:
        if isinstance(max_epochs, bool) or not isinstance(max_epochs, numbers.Integral) or max_epochs < 1:
            raise InvalidArgumentError(f"max_epochs must be a positive int, got {max_epochs!r}")
        if not (progress is None or isinstance(progress, bool) or callable(getattr(progress, "write", None))):
            raise InvalidArgumentError(f"progress must be True, False or a stream with a write method (such as "
                                       f"sys.stdout or an open file), got {progress!r}")
        self.max_epochs = int(max_epochs)
        self.device = _device(device)
        self.progress = sys.stderr if progress is True else progress or None
        self.history = History()

    def _to_device(self, batch):
        return tuple(t.to(self.device, non_blocking=True) for t in batch)

    def fit(self, model: Module, data: DataModule) -> History:
        """Train ``model`` for max_epochs, validating after each epoch when the data has a
        validation set; returns (and keeps as ``self.history``) the losses and metrics."""
        model.to(self.device)
        optimizer = model.configure_optimizers()
        # fastml's optimizers zero the gradients in the update's own pass: after each step, so
        # gradients left from before fit are cleared first, as the course's zero_grad would
        fused_zero = isinstance(optimizer, (optim.SGD, optim.Adam, optim.AdamW))
        if fused_zero:
            optimizer.zero_grad()
        train, val = data.train_dataloader(), data.val_dataloader()
        bar = _ProgressBar(self.progress, self.max_epochs) if self.progress else None
        self.history = history = History()
        model.train()
        for epoch in range(self.max_epochs):
            started = time.perf_counter()
            losses = []  # kept on the device: one synchronisation per epoch, not per step
            for batch in train:
                loss = model.training_step(self._to_device(batch))
                if not fused_zero:
                    optimizer.zero_grad()
                loss.backward()
                if fused_zero:
                    optimizer.step(zero_grad=True)
                else:
                    optimizer.step()
                model.on_train_step_end()
                losses.append(loss.detach())
                if bar:
                    bar.step(epoch, len(losses), len(train), loss)
            epoch_losses = torch.stack(losses).tolist() if losses else []
            history.train_loss += epoch_losses
            history.epoch_end_step.append(len(history.train_loss))
            metrics = self._validate(model, val) if val is not None else {}
            for name, value in metrics.items():
                history.val.setdefault(name, []).append(value)
            history.epoch_seconds.append(time.perf_counter() - started)
            if bar:
                mean_loss = sum(epoch_losses) / len(epoch_losses) if epoch_losses else math.nan
                bar.epoch_end(epoch, len(losses), mean_loss, metrics, history.epoch_seconds[-1])
        return history

    def _validate(self, model: Module, loader) -> dict[str, float]:
        model.eval()
        totals, count = {}, 0
        with torch.no_grad():
            for batch in loader:
                batch = self._to_device(batch)
                size = len(batch[-1])
                for name, value in model.validation_step(batch).items():
                    totals[name] = totals.get(name, 0.0) + torch.as_tensor(value).detach() * size
                count += size
        model.train()
        return {name: float(total) / count for name, total in totals.items()}

    def plot(self, path, title: str | None = None) -> Path:
        """Save the loss curve as a PNG: the training loss per step, the validation loss (and
        other validation metrics, on a second axis) per epoch. Needs matplotlib."""
        history = self.history
        if not history.train_loss:
            raise RuntimeError("Trainer.plot: nothing to plot yet, call fit() first")
        fig = figure(figsize=(6.4, 3.6))
        ax = fig.subplots()
        steps = range(1, len(history.train_loss) + 1)
        ax.plot(steps, history.train_loss, linewidth=0.8, alpha=0.7, label="training loss (per step)")
        if "loss" in history.val:
            ax.plot(history.epoch_end_step, history.val["loss"], "o-", label="validation loss (per epoch)")
        if min(history.train_loss + history.val.get("loss", [])) > 0:
            ax.set_yscale("log")  # the course's losses fall by orders of magnitude
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        lines, labels = ax.get_legend_handles_labels()
        others = [name for name in history.val if name != "loss"]
        if others:
            twin = ax.twinx()
            for name, color in zip(others, ("tab:green", "tab:red", "tab:purple")):
                twin.plot(history.epoch_end_step, history.val[name], "s--", color=color,
                          label=f"validation {name} (per epoch)")
            twin.set_ylabel(", ".join(others))
            more, more_labels = twin.get_legend_handles_labels()
            lines, labels = lines + more, labels + more_labels
        # below the axes: the falling loss and the rising accuracy leave no corner free
        ax.legend(lines, labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
        ax.set_title(title or f"{len(history.epoch_end_step)} epochs, {len(history.train_loss)} steps", fontsize=10)
        return save_figure(fig, path)


# ------------------------------------------------------------------------------------ plotting


def figure(**kwargs):
    """A matplotlib ``Figure`` on the Agg canvas (PNG, no window, no pyplot state), or a
    MissingDependencyError saying how to install matplotlib. kwargs go to ``Figure``."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingDependencyError(f"plotting needs matplotlib, an optional dependency of fastml ({exc}): "
                                     "pip install 'fastml[plot]' (or pip install matplotlib)") from exc
    kwargs.setdefault("layout", "constrained")
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
