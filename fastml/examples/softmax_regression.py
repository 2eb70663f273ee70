"""Softmax regression on scikit-learn's 8×8 digits: one linear layer, 64 pixels → 10 class
scores, trained with minibatch SGD on the softmax cross-entropy.

The layer and its loss run as one fused op (``fastml.nn.LinearCrossEntropyLoss``): the logits of
a training minibatch never exist in memory. Evaluation asks for the logits themselves.
"""

from __future__ import annotations

from pathlib import Path

import torch

import fastml
from fastml.examples._common import load_digits, train_classifier
from fastml.training import Classifier, DataModule


class SoftmaxRegression(Classifier):
    def __init__(self, num_inputs: int, num_classes: int, lr: float) -> None:
        super().__init__(lr)
        self.head = fastml.nn.LinearCrossEntropyLoss(num_inputs, num_classes, bias=True)

    def forward(self, X):
        return fastml.functional.linear(X.flatten(1), self.head.linear.weight, self.head.linear.bias)

    def training_step(self, batch):
        X, y = batch
        return self.head(X.flatten(1), y)


def main(out_dir, quick: bool = False, progress: bool = True) -> dict:
    torch.manual_seed(0)
    X_train, y_train, X_test, y_test = load_digits()
    data = DataModule((X_train, y_train), (X_test, y_test), batch_size=64, seed=0)
    model = SoftmaxRegression(64, 10, lr=0.5)
    return train_classifier(model, data, 5 if quick else 30, Path(out_dir) / "softmax_regression.png",
                            "softmax regression on the digits", progress)
