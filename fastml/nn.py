"""Drop-in modules: subclasses of their torch.nn twins (same constructor, parameters,
state_dict and repr) whose forward runs fastml's kernels."""

from __future__ import annotations

import torch

from fastml import functional

__all__ = ["Conv2d", "ConvReLUPool2d", "Linear", "LinearMSELoss", "MaxPool2d", "MSELoss"]


class Linear(torch.nn.Linear):
    """``torch.nn.Linear`` on fastml's linear kernels. Input (*, in_features)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return functional.linear(input, self.weight, self.bias)


class Conv2d(torch.nn.Conv2d):
    """``torch.nn.Conv2d`` on fastml's convolution kernels: same constructor (every padding mode;
    modes other than "zeros" pad in torch first), parameters, state_dict and repr. Input
    (N, C, H, W) or (C, H, W)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            padded = torch.nn.functional.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return functional.conv2d(padded, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return functional.conv2d(input, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                 self.groups)


class ConvReLUPool2d(torch.nn.Conv2d):
    """Conv2d → ReLU → MaxPool2d(pool_kernel_size, pool_stride) in one kernel (fastml.functional.
    conv2d_relu_max_pool2d): the activation before pooling never goes to memory. A Conv2d by
    construction, parameters and state_dict (it loads from and into an nn.Conv2d of the same
    arguments); pool_stride defaults to pool_kernel_size."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, pool_kernel_size=2, pool_stride=None, device=None,
                 dtype=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         device=device, dtype=dtype)
        self.pool_kernel_size = pool_kernel_size
        self.pool_stride = pool_kernel_size if pool_stride is None else pool_stride

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pool_kernel_size={self.pool_kernel_size}, pool_stride={self.pool_stride}"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return functional.conv2d_relu_max_pool2d(input, self.weight, self.bias, self.stride, self.padding,
                                                 self.dilation, self.groups, self.pool_kernel_size, self.pool_stride)


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
