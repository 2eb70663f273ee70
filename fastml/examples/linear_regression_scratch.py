"""Linear regression from scratch, as the course writes it: the parameters are plain tensors
with ``requires_grad``, the minibatches come from a loop, and the SGD update is written by hand,
but each piece runs on fastml's kernels.

The data are the course's: y = X w + b + noise, with w = [2, -3.4], b = 4.2 and 1000 examples.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import fastml
from fastml.examples._common import TRUE_B, TRUE_W, plot_linear_regression


def linreg(X, w, b):
    """The model: X (n, 2) @ w.T + b, with w (1, 2) as a linear layer holds it."""
    return fastml.functional.linear(X, w, b)


def squared_loss(X, y, w, b):
    """Σ (linreg(X) − y)² / 2 over the minibatch, the model and the loss in one pass over X."""
    return fastml.functional.linear_mse(X, w, b, y, reduction="sum") / 2


def main(out_dir, quick: bool = False, progress: bool = True) -> dict:
    generator = torch.Generator().manual_seed(0)
    num_epochs, lr, batch_size = 2 if quick else 3, 0.03, 10
    X, y = fastml.data.synthetic_linear(TRUE_W, TRUE_B, 1000, generator=generator)
    w = torch.normal(0, 0.01, size=(1, 2), generator=generator, requires_grad=True)
    b = torch.zeros(1, requires_grad=True)

    losses, weights, biases = [], [], []
    for epoch in range(num_epochs):
        for X_batch, y_batch in fastml.data.batches(X, y, batch_size=batch_size, generator=generator):
            loss = squared_loss(X_batch, y_batch, w, b)
            loss.backward()
            fastml.optim.sgd_([w, b], lr, len(X_batch))  # the course's sgd(): update and zero grads, fused
            losses.append(loss.item() / len(X_batch))
            weights.append(w.detach().flatten().tolist())
            biases.append(b.item())
        with torch.no_grad():
            epoch_loss = float(((linreg(X, w, b) - y) ** 2 / 2).mean())
        if progress:
            print(f"epoch {epoch + 1}, loss {epoch_loss:f}", file=sys.stderr)

    png = plot_linear_regression(Path(out_dir) / "linear_regression_scratch.png", losses, weights, biases,
                                 "linear regression from scratch (fastml ops, hand-written SGD)")
    w_learned, b_learned = weights[-1], biases[-1]
    return {"w": w_learned, "b": b_learned, "final_loss": epoch_loss, "steps": len(losses), "files": [png],
            "headline": f"w = [{w_learned[0]:.3f}, {w_learned[1]:.3f}], b = {b_learned:.3f} "
                        f"(true {TRUE_W}, {TRUE_B}); loss {epoch_loss:.2e} after {len(losses)} steps"}
