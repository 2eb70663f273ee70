"""Linear regression, concise: the same problem as ``linear_regression_scratch`` written with
modules. ``fastml.nn.LinearMSELoss`` is the linear layer and its mean squared loss in one op,
``fastml.optim.SGD`` the optimizer, and ``fastml.training.Trainer`` runs the loop.
"""

from __future__ import annotations

from pathlib import Path

import torch

import fastml
from fastml.examples._common import TRUE_B, TRUE_W, plot_linear_regression
from fastml.training import DataModule, Module, Trainer


class LinearRegression(Module):
    def __init__(self, num_inputs: int, lr: float) -> None:
        super().__init__(lr)
        self.net = fastml.nn.LinearMSELoss(num_inputs, 1)
        self.net.weight.data.normal_(0, 0.01)  # the course's initialisation, not nn.Linear's
        self.net.bias.data.fill_(0)
        self.weights, self.biases = [], []

    def forward(self, X):
        return self.net.predict(X)

    def training_step(self, batch):
        X, y = batch
        return self.net(X, y)  # the loss straight from the fused op: no prediction in between

    def on_train_step_end(self):
        self.weights.append(self.net.weight.detach().flatten().tolist())
        self.biases.append(self.net.bias.item())


def main(out_dir, quick: bool = False, progress: bool = True) -> dict:
    torch.manual_seed(0)
    X, y = fastml.data.synthetic_linear(TRUE_W, TRUE_B, 1000, generator=torch.Generator().manual_seed(0))
    data = DataModule((X[:800], y[:800]), (X[800:], y[800:]), batch_size=10, seed=0)
    model = LinearRegression(2, lr=0.03)
    trainer = Trainer(max_epochs=2 if quick else 3, progress=progress)
    history = trainer.fit(model, data)

    out_dir = Path(out_dir)
    curves = plot_linear_regression(out_dir / "linear_regression.png", history.train_loss, model.weights,
                                    model.biases, "linear regression, concise (fastml modules + Trainer)")
    loss_png = trainer.plot(out_dir / "linear_regression_loss.png", title="linear regression, concise")
    w, b = model.weights[-1], model.biases[-1]
    val_loss = history.val["loss"][-1]
    return {"w": w, "b": b, "val_loss": val_loss, "history": history, "files": [curves, loss_png],
            "headline": f"w = [{w[0]:.3f}, {w[1]:.3f}], b = {b:.3f} (true {TRUE_W}, {TRUE_B}); "
                        f"validation loss {val_loss:.2e}"}
