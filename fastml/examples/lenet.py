"""LeNet on scikit-learn's digits, each 8×8 image scaled up to the 28×28 LeNet was built for:
two convolution blocks (conv → ReLU → 2×2 max-pool, each one fused kernel,
``fastml.nn.ConvReLUPool2d``), then three fully connected layers, trained with
``fastml.optim.Adam``. The full run reaches about 99% test accuracy (97% at the least).
"""

from __future__ import annotations

from pathlib import Path

import torch

import fastml
from fastml.examples._common import load_digits, train_classifier
from fastml.training import Classifier, DataModule


class LeNet(Classifier):
    def __init__(self, num_classes: int = 10, lr: float = 1e-3) -> None:
        super().__init__(lr)
        self.net = torch.nn.Sequential(
            fastml.nn.ConvReLUPool2d(1, 6, kernel_size=5, padding=2),  # 28×28 → 14×14
            fastml.nn.ConvReLUPool2d(6, 16, kernel_size=5),            # 10×10 → 5×5
            torch.nn.Flatten(),
            fastml.nn.Linear(16 * 5 * 5, 120), torch.nn.ReLU(),
            fastml.nn.Linear(120, 84), torch.nn.ReLU(),
            fastml.nn.Linear(84, num_classes))

    def configure_optimizers(self):
        return fastml.optim.Adam(self.parameters(), lr=self.lr)


def to_28x28(images: torch.Tensor) -> torch.Tensor:
    """(N, 8, 8) → (N, 1, 28, 28): each pixel becomes 3×3, and a 2-pixel margin goes around, as
    MNIST's digits sit inside their 28×28 box."""
    big = torch.nn.functional.interpolate(images.unsqueeze(1), scale_factor=3, mode="nearest")
    return torch.nn.functional.pad(big, (2, 2, 2, 2))


def shifted_copies(images: torch.Tensor, labels: torch.Tensor, pixels: int = 2):
    """The images plus copies moved ``pixels`` up, down, left and right (what rolls off one edge
    is margin and comes back at the other). 1437 training digits are few: without the copies
    LeNet stops near 97.5% on the test digits, with them near 99%."""
    shifts = [(0, 0), (pixels, 0), (-pixels, 0), (0, pixels), (0, -pixels)]
    moved = [torch.roll(images, shift, dims=(2, 3)) for shift in shifts]
    return torch.cat(moved), labels.repeat(len(shifts))


def main(out_dir, quick: bool = False, progress: bool = True) -> dict:
    torch.manual_seed(0)
    X_train, y_train, X_test, y_test = load_digits()
    data = DataModule(shifted_copies(to_28x28(X_train), y_train), (to_28x28(X_test), y_test), batch_size=128,
                      seed=0)
    model = LeNet(lr=2e-3)
    return train_classifier(model, data, 2 if quick else 8, Path(out_dir) / "lenet.png",
                            "LeNet on the digits (upsampled to 28×28)", progress)
