"""A multilayer perceptron on scikit-learn's 8×8 digits: 64 pixels → 256 hidden ReLU units → 10
class scores, trained with minibatch SGD with momentum on the softmax cross-entropy, all on
fastml's layers (``fastml.nn.Linear``, ``fastml.nn.CrossEntropyLoss``, ``fastml.optim.SGD``).
"""

from __future__ import annotations

from pathlib import Path

import torch

import fastml
from fastml.examples._common import load_digits, train_classifier
from fastml.training import Classifier, DataModule


class MLP(Classifier):
    def __init__(self, num_inputs: int, num_hiddens: int, num_classes: int, lr: float) -> None:
        super().__init__(lr)
        self.net = torch.nn.Sequential(torch.nn.Flatten(), fastml.nn.Linear(num_inputs, num_hiddens), torch.nn.ReLU(),
                                       fastml.nn.Linear(num_hiddens, num_classes))
        self.loss_fn = fastml.nn.CrossEntropyLoss()

    def loss(self, y_hat, y):
        return self.loss_fn(y_hat, y)

    def configure_optimizers(self):
        return fastml.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def main(out_dir, quick: bool = False, progress: bool = True) -> dict:
    torch.manual_seed(0)
    X_train, y_train, X_test, y_test = load_digits()
    data = DataModule((X_train, y_train), (X_test, y_test), batch_size=64, seed=0)
    model = MLP(64, 256, 10, lr=0.05)
    return train_classifier(model, data, 5 if quick else 20, Path(out_dir) / "mlp.png",
                            "MLP (64-256-10) on the digits", progress)
