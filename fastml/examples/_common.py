"""What several examples share: the course's synthetic regression problem and its picture,
scikit-learn's digits as tensors, and the training and report of a digits classifier."""

from __future__ import annotations

import torch

from fastml.training import MissingDependencyError, Trainer, figure, save_figure

TRUE_W, TRUE_B = [2.0, -3.4], 4.2


def plot_linear_regression(path, losses, weights, biases, title: str):
    """Loss, weights and bias after every step, the true values dashed."""
    fig = figure(figsize=(10, 3))
    loss_ax, w_ax, b_ax = fig.subplots(1, 3)
    steps = range(1, len(losses) + 1)
    loss_ax.plot(steps, losses, linewidth=0.8)
    loss_ax.set_yscale("log")
    loss_ax.set(title="minibatch loss", xlabel="step")
    for i, (track, true) in enumerate(zip(zip(*weights), TRUE_W)):
        line, = w_ax.plot(steps, track, label=f"w[{i}]")
        w_ax.axhline(true, color=line.get_color(), linestyle="--", linewidth=0.8)
    w_ax.set(title=f"weights (true {TRUE_W}, dashed)", xlabel="step")
    w_ax.legend(fontsize=8)
    b_ax.plot(steps, biases)
    b_ax.axhline(TRUE_B, color="black", linestyle="--", linewidth=0.8)
    b_ax.set(title=f"bias (true {TRUE_B}, dashed)", xlabel="step")
    fig.suptitle(title)
    return save_figure(fig, path)


def load_digits(seed: int = 0, test_size: float = 0.2):
    """scikit-learn's 1797 handwritten 8×8 digits (bundled with it: no download), as float32
    images (N, 8, 8) scaled to [0, 1] and int64 labels, split stratified into train and test:
    (X_train, y_train, X_test, y_test)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise MissingDependencyError(f"the digits examples need scikit-learn, which bundles the data set ({exc}): "
                                     "pip install 'fastml[examples]' (or pip install scikit-learn)") from exc
    digits = load_digits()
    train, test = train_test_split(range(len(digits.target)), test_size=test_size, random_state=seed,
                                   stratify=digits.target)
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    return images[train], labels[train], images[test], labels[test]


def train_classifier(model, data, epochs: int, png, title: str, progress: bool) -> dict:
    """Trains a digits classifier for ``epochs``, plots its curves to ``png`` and reports the
    accuracy on the validation split, which is the held-out test fifth of the digits."""
    trainer = Trainer(max_epochs=epochs, progress=progress)
    history = trainer.fit(model, data)
    path = trainer.plot(png, title=title)
    test_accuracy = history.val["accuracy"][-1]
    return {"test_accuracy": test_accuracy, "history": history, "files": [path],
            "headline": f"test accuracy {test_accuracy:.1%} after {epochs} epochs"}
