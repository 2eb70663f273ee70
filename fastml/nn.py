"""Drop-in modules: subclasses of their torch.nn twins (same constructor, parameters,
state_dict and repr) whose forward runs fastml's kernels."""

from __future__ import annotations

import torch

from fastml import functional

__all__ = ["Linear", "LinearMSELoss", "MaxPool2d", "MSELoss"]


class Linear(torch.nn.Linear):
    """``torch.nn.Linear`` on fastml's linear kernels. Input (*, in_features)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return functional.linear(input, self.weight, self.bias)


class MaxPool2d(torch.nn.MaxPool2d):
    """``torch.nn.MaxPool2d`` on fastml's max-pooling kernels (indices as torch's, so
    ``MaxUnpool2d`` takes them). Input (N, C, H, W) or (C, H, W)."""

    def forward(self, input: torch.Tensor):
        return functional.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                                     ceil_mode=self.ceil_mode, return_indices=self.return_indices)


class MSELoss(torch.nn.MSELoss):
    """``torch.nn.MSELoss`` on fastml's fused squared-error kernel (same broadcasting warning)."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return functional.mse_loss(input, target, reduction=self.reduction)


class LinearMSELoss(torch.nn.Module):
    """A linear layer and its squared loss in one kernel: linear regression's whole forward and
    backward pass reads the input once.

    ``forward(input, target)`` returns ``MSELoss(reduction)(Linear(input), target)``;
    ``predict(input)`` returns the layer's output. Parameters ``weight`` (out_features,
    in_features) and ``bias`` (out_features,) are initialised as ``torch.nn.Linear``'s, and the
    state_dict loads from and into an ``nn.Linear`` of the same size.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, reduction: str = "mean",
                 device=None, dtype=None) -> None:
        super().__init__()
        functional._check_reduction(reduction)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.reduction = in_features, out_features, reduction
        self.weight = torch.nn.Parameter(torch.empty((out_features, in_features), **factory))
        if bias:
            self.bias = torch.nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        torch.nn.Linear.reset_parameters(self)  # the same initialisation as nn.Linear

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return functional.linear_mse(input, self.weight, self.bias, target, self.reduction)

    def predict(self, input: torch.Tensor) -> torch.Tensor:
        return functional.linear(input, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, reduction={self.reduction!r}")
