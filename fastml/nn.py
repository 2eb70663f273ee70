"""Drop-in modules: subclasses of their torch.nn twins (same constructor, parameters,
state_dict and repr) whose forward runs fastml's kernels.

Each forward starts with ``if torch.jit.is_scripting():`` and torch's computation: TorchScript
compiles only that branch (it drops the other unread), so ``torch.jit.script`` takes a patched
model, as it takes the torch model, and the scripted model computes what the torch model does.
fastml's kernels and its measured choice are Python, which TorchScript cannot run."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastml import (_few_windows, _gemm_weight_grad, _grouped, _layout, _onednn, _pointwise, _recycled_linear, _route,
                    _runs, _winograd, functional)
from fastml._layout import relayout  # (here too: tests swap fastml.nn.relayout to count the copies)
from fastml.ops import is_compiling, relu_in_place

__all__ = ["BatchNorm2d", "Conv2d", "ConvReLUPool2d", "CrossEntropyLoss", "Linear", "LinearCrossEntropyLoss",
           "LinearMSELoss", "MaxPool2d", "MSELoss"]


class Linear(torch.nn.Linear):
    """``torch.nn.Linear`` on fastml's linear kernels. Input (*, in_features)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # (see the module docstring)
            return F.linear(input, self.weight, self.bias)
        if _route.parametrized(self):
            return super().forward(input)
        weight = _route.weight_of(self)
        found = _route.settled(self, input, weight)
        if found[0] == _route.TORCH:  # torch's forward, its parameters read without Module.__getattr__
            return F.linear(input, weight, _route.registered(self, "bias"))
        return _route.call(self, input, weight, super().forward, self._fastml_forward, variants=self._torch_variants,
                           found=found)

    def _fastml_forward(self, input: torch.Tensor) -> torch.Tensor:
        return functional._linear(input, self.weight, self.bias, routed=False)  # (the layer routes itself)

    def _torch_variants(self, input: torch.Tensor, only: str | None = None, relu: bool = False) -> dict:
        """Other ways of computing this layer with torch's ops, for the measured choice to time
        against torch's module: {name: forward}, where they apply to ``input`` (then an in-place
        ReLU if ``relu``).

        "recycled_grad" (CPU, a weight gradient of 32 MiB or more wanted): torch's BLAS forward
        and backward, the weight gradient written contiguous into memory kept from the previous
        step rather than a fresh block whose every page faults (fastml/_recycled_linear.py)."""
        if only not in (None, "recycled_grad") or not _recycled_linear.applies(input, self.weight, self.bias):
            return {}

        def run(x):
            out = _recycled_linear.linear(x, self.weight, self.bias)
            return relu_in_place(out) if relu else out
        return {"recycled_grad": run}


class Conv2d(torch.nn.Conv2d):
    """``torch.nn.Conv2d`` on fastml's convolution kernels: same constructor (every padding mode;
    modes other than "zeros" pad in torch first), parameters, state_dict and repr. Input
    (N, C, H, W) or (C, H, W)."""

    def train(self, mode: bool = True):
        """torch's ``train``; what the layer's variants derived from its weight (oneDNN's packing,
        Winograd's transform) is formed anew at the next call. They are kept by the weight's
        version, which a write through ``.data`` does not change: switching the mode
        (``model.eval()``) takes such a write up."""
        _route.forget_derived_weights(self)
        return super().train(mode)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._conv_forward(input, self.weight, self.bias)
        if _route.parametrized(self):
            return self._torch_forward(input)
        weight = _route.weight_of(self)
        found = _route.settled(self, input, weight)
        if _route.trains_weight(found[1]):
            # A step may follow that changes the weight without a version bump: the course's
            # ``param.data.sub_(...)``. What the variants derived from it is formed anew at the
            # next call (fused optimizers' steps are followed by _route.state_key).
            _route.forget_derived_weights(self)
        if found[0] == _route.TORCH:  # (as Linear's)
            return _layout.torch_convolution(self, input, weight, _route.registered(self, "bias"))
        return _route.call(self, input, weight, self._torch_forward, self._fastml_forward,
                           variants=self._torch_variants, found=found)

    def _torch_forward(self, input: torch.Tensor) -> torch.Tensor:
        """torch.nn.Conv2d's forward (``_layout.torch_convolution``: where torch's oneDNN would
        fault on channels-last memory, on contiguous copies)."""
        return _layout.torch_convolution(self, input, self.weight, self.bias)

    def _fastml_forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._fastml_conv(input, self.weight, self.bias)

    def _torch_variants(self, input: torch.Tensor, only: str | None = None) -> dict:
        return torch_conv_variants(self, input, lambda: (self.weight, self.bias), only=only)

    def _fastml_conv(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """This layer's convolution with the given weight and bias (torch's ``_conv_forward``, on
        fastml's kernels)."""
        if self.padding_mode != "zeros":
            padded = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return functional._conv2d(padded, weight, bias, self.stride, 0, self.dilation, self.groups, routed=False)
        # (unrouted: the layer routes itself)
        return functional._conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups,
                                  routed=False)


def torch_conv_variants(conv: torch.nn.Conv2d, input: torch.Tensor, parameters, relu: bool = False,
                        only: str | None = None) -> dict:
    """Other ways of computing ``conv``'s convolution of ``input`` with the weight and bias that
    ``parameters()`` returns (then an in-place ReLU if ``relu``) with torch's ops, where they
    apply, for the measured choice to time against torch's own: {name: forward}. (A function, not
    the tensors: a folded weight formed with autograd is formed anew by each call, as each timed
    call runs its own backward.) ``only``: the one variant a layer's route names, the others not
    even checked (a routed call pays for one check, not all).

    "matmul" (1x1 convolutions, either layout, forward and backward): one matrix product
    (fastml/_pointwise.py), without oneDNN's per-call set-up.

    "few_windows" (a large kernel fitting its unpadded input only a few times, either layout,
    forward and backward): a linear layer on the windows, the flattened input where there is one
    (fastml/_few_windows.py), where torch's convolution (its weight gradient above all) is
    several times slower.

    "onednn_packed" (channels-last input, inference): torch's oneDNN convolution on a weight
    packed once, the ReLU in its epilogue (fastml/_onednn.py).

    "winograd" (channels-last input, 3x3 stride-1 convolutions): Winograd F(2x2, 3x3), fastml's
    transforms around oneDNN's product (fastml/_winograd.py); with gradients wanted, torch's own
    convolution backward.

    "grouped_direct" (channels-last input, depthwise or small groups): fastml's direct kernel
    (fastml/_grouped.py); with gradients wanted, a depthwise layer's backward by fastml's kernels,
    a grouped one's by torch's own convolution backward.

    "gemm_weight_grad" (channels-last input, one group, the weight's gradient wanted): torch's
    forward and input gradient, the weight gradient as one matrix product over the unfolded input
    (fastml/_gemm_weight_grad.py), where oneDNN's weight-gradient pass is slow (small images).

    "channels_last" ((N, C, H, W)-contiguous input and weight): torch's convolution on a
    channels-last copy of the input, the result and the input's gradient copied back, so the caller
    sees torch's layouts. oneDNN's CPU
    convolutions are up to 2x faster on that layout for some shapes (a 7x7 stem, 64 channels at
    28x28) and slower for others (depthwise, 1x1). Not for unbatched input, off the CPU, padding
    other than zeros, or where oneDNN's weight gradient on that layout faults
    (``_layout.faulting_shape``)."""
    def offered(name: str) -> bool:
        return only is None or only == name

    weight, bias = parameters()  # for the checks, which read only what the tensors are
    variants = {}
    if offered("matmul") and _pointwise.applies(conv, input, weight):
        variants["matmul"] = lambda x: _pointwise.convolution(conv, x, *parameters(), relu)
    if offered("few_windows") and _few_windows.applies(conv, input, weight):
        variants["few_windows"] = lambda x: _few_windows.convolution(conv, x, *parameters(), relu)
    inference = (offered("onednn_packed") or offered("winograd")) and _onednn.applies(conv, input, weight, bias)
    if inference and offered("onednn_packed"):
        variants["onednn_packed"] = lambda x: _onednn.packed_convolution(conv, x, *parameters(), relu)
    if offered("winograd") and _winograd.applies(conv, input, weight, bias):
        if inference:
            variants["winograd"] = lambda x: _winograd.convolution(conv, x, *parameters(), relu)
        else:  # channels-last, gradients wanted: torch's backward
            variants["winograd"] = lambda x: _winograd.differentiable_convolution(conv, x, *parameters(), relu)
    if offered("grouped_direct") and _grouped.applies(conv, input, weight, bias):
        if _onednn.gradients_wanted(input, weight, bias):
            variants["grouped_direct"] = lambda x: _grouped.differentiable_convolution(conv, x, *parameters(), relu)
        else:
            variants["grouped_direct"] = lambda x: _grouped.convolution(conv, x, *parameters(), relu)
    if offered("gemm_weight_grad") and _gemm_weight_grad.applies(conv, input, weight, bias):
        variants["gemm_weight_grad"] = lambda x: _gemm_weight_grad.convolution(conv, x, *parameters(), relu)
    if (offered("channels_last") and input.dim() == 4 and input.device.type == "cpu" and input.is_contiguous()
            and not _layout.suggests_channels_last(input) and not _layout.suggests_channels_last(weight)
            and conv.padding_mode == "zeros"
            and not (_layout.faulting_shape(weight, conv.stride) and _layout.grads_wanted(weight, bias))):
        def run(x):
            weight, bias = parameters()
            # the weight's gradient handed back contiguous, as torch's convolution of a contiguous
            # input hands it (a channels-last input makes oneDNN's channels-last)
            weight = _layout.Relayout.apply(weight, torch.contiguous_format, torch.contiguous_format)
            out = conv._conv_forward(x, weight, bias)
            return relu_in_place(out) if relu else out
        # and the input's gradient
        variants["channels_last"] = lambda x: relayout(run(_layout.Relayout.apply(
            x, torch.channels_last, torch.contiguous_format)), torch.contiguous_format)
    return variants


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
        if torch.jit.is_scripting():
            return F.max_pool2d(F.relu(self._conv_forward(input, self.weight, self.bias)), self.pool_kernel_size,
                                self.pool_stride)
        return self._eager_forward(input)

    def _eager_forward(self, input: torch.Tensor) -> torch.Tensor:
        """forward outside TorchScript."""
        run = self.__dict__.get(_runs.FUSED_RUN)  # built by fastml.patch from a Conv2d → ReLU → MaxPool2d run
        if run is not None and not isinstance(input, _route.PROXY) and not _runs.called_as_run(run, depth=1):
            # Called on its own, it is the run's convolution; the slots after it apply the
            # ReLU and the pool (fastml/_runs.py).
            return _layout.torch_convolution(self, input, _route.weight_of(self), _route.registered(self, "bias"))
        if _route.parametrized(self):
            out = self._torch_forward(input)
            return out if run is None else _runs.mark(out, run, 2)
        weight = _route.weight_of(self)
        found = _route.settled(self, input, weight)
        if found[0] == _route.TORCH:
            out = self._torch_forward(input)
        else:
            out = _route.call(self, input, weight, self._torch_forward, self._fastml_forward,
                              variants=self._torch_variants, found=found)
        return out if run is None else _runs.mark(out, run, 2)

    def _torch_variants(self, input: torch.Tensor, only: str | None = None) -> dict:
        """The convolution variants of ``torch_conv_variants`` with the ReLU in their epilogue,
        then torch's pool, where they apply (channels-last input, inference)."""
        def then_pool(convolve):
            return lambda x: F.max_pool2d(convolve(x), self.pool_kernel_size, self.pool_stride)
        if input.dim() != 4 or input.is_contiguous():  # only the channels-last variants: see _onednn.py
            return {}
        variants = torch_conv_variants(self, input, lambda: (self.weight, self.bias), relu=True, only=only)
        return {name: then_pool(convolve) for name, convolve in variants.items()}

    def _fastml_forward(self, input: torch.Tensor) -> torch.Tensor:
        return functional.conv2d_relu_max_pool2d(input, self.weight, self.bias, self.stride, self.padding,
                                                 self.dilation, self.groups, self.pool_kernel_size, self.pool_stride)

    def _torch_forward(self, input: torch.Tensor) -> torch.Tensor:
        """The three ops as torch runs them unfused, the ReLU in place on the convolution's fresh
        output (nothing else reads it, and the convolution's backward does not need it)."""
        conv = _layout.torch_convolution(self, input, _route.weight_of(self), _route.registered(self, "bias"))
        return F.max_pool2d(relu_in_place(conv), self.pool_kernel_size, self.pool_stride)


class MaxPool2d(torch.nn.MaxPool2d):
    """``torch.nn.MaxPool2d`` on fastml's max-pooling kernels (indices as torch's, so
    ``MaxUnpool2d`` takes them). Input (N, C, H, W) or (C, H, W)."""

    def forward(self, input: torch.Tensor):
        if torch.jit.is_scripting():
            return F.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                                ceil_mode=self.ceil_mode, return_indices=self.return_indices)
        found = _route.settled(self, input, None)
        if found[0] == _route.TORCH:
            return torch.nn.MaxPool2d.forward(self, input)
        return _route.call(self, input, None, super().forward, self._fastml_forward, found=found)

    def _fastml_forward(self, input: torch.Tensor):
        return functional._max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                                      self.ceil_mode, self.return_indices, routed=False)


class BatchNorm2d(torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on fastml's batch-norm kernels in training (fastml.functional.
    batch_norm: statistics in one pass, normalisation in another); in eval mode, torch's. The
    running statistics and ``num_batches_tracked`` move as torch's do."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._scripted_forward(input)
        if not self.uses_batch_statistics():  # eval mode: nothing of fastml's to run, not even a dispatch
            if isinstance(input, _route.PROXY):  # (traced: the mode is decided when the graph runs)
                return _route.traced(self, (input,), super().forward)
            return self._torch_forward(input)
        if _route.parametrized(self):
            return self._torch_forward(input)
        weight = _route.weight_of(self)
        found = _route.settled(self, input, weight)
        if found[0] == _route.TORCH:
            return self._torch_forward(input)
        return _route.call(self, input, weight, super().forward, self._fastml_forward, found=found)

    def uses_batch_statistics(self) -> bool:
        """Whether forward normalises with the batch's statistics (training mode, or no running
        statistics), torch's rule: only then do fastml's kernels apply. (Eager only: the buffers
        read ``_route.registered``.)"""
        return self.training or (_route.registered(self, "running_mean") is None
                                 and _route.registered(self, "running_var") is None)

    def _update_factor(self, num_batches_tracked: torch.Tensor | None) -> float:
        """torch's forward's bookkeeping, word for word: counts the batch where the running
        statistics track it, and returns the factor by which they move (TorchScript too).
        ``num_batches_tracked``: the layer's buffer."""
        factor = 0.0
        if self.momentum is not None:
            factor = self.momentum
        if self.training and self.track_running_stats:
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
                if self.momentum is None:
                    factor = 1.0 / float(num_batches_tracked)
        return factor

    def _scripted_forward(self, input: torch.Tensor) -> torch.Tensor:
        """torch's forward, for TorchScript (which cannot compile torch's own under another class)."""
        self._check_input_dim(input)
        factor = self._update_factor(self.num_batches_tracked)
        keep = not self.training or self.track_running_stats
        batch_statistics = self.training or (self.running_mean is None and self.running_var is None)
        return F.batch_norm(input, self.running_mean if keep else None, self.running_var if keep else None,
                            self.weight, self.bias, batch_statistics, factor, self.eps)

    def _batch_norm_arguments(self, input: torch.Tensor) -> tuple:
        """torch's forward up to its F.batch_norm call: the input's check, the bookkeeping, and
        the arguments after the input, its six to eight reads of parameters and buffers
        ``_route.registered`` (each ~0.35 µs through Module.__getattr__, as torch's forward pays)."""
        self._check_input_dim(input)
        factor = self._update_factor(_route.registered(self, "num_batches_tracked"))
        keep = not self.training or self.track_running_stats
        return (_route.registered(self, "running_mean") if keep else None,
                _route.registered(self, "running_var") if keep else None, _route.weight_of(self),
                _route.registered(self, "bias"), self.uses_batch_statistics(), factor, self.eps)

    def _torch_forward(self, input: torch.Tensor) -> torch.Tensor:
        """torch's forward, the same calls (``_batch_norm_arguments``)."""
        return F.batch_norm(input, *self._batch_norm_arguments(input))

    def _fastml_forward(self, input: torch.Tensor, relu: bool = False) -> torch.Tensor:
        """torch's forward on fastml's functional; then a ReLU where ``relu``."""
        return functional._batch_norm(input, *self._batch_norm_arguments(input), relu, routed=False)


class MSELoss(torch.nn.MSELoss):
    """``torch.nn.MSELoss`` on fastml's fused squared-error kernel (same broadcasting warning)."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return F.mse_loss(input, target, reduction=self.reduction)
        if (type(input) is torch.Tensor and type(target) is torch.Tensor and target.size() != input.size()
                and not is_compiling()):
            # torch's warning once, here, and both forwards given the shapes F.mse_loss broadcasts
            # them to: a route being measured calls each forward several times, and each would
            # warn again.
            input, target = functional._broadcast_with_warning(input, target, stacklevel=1)
        found = _route.settled(self, input, None, target)
        if found[0] == _route.TORCH:
            return self._torch_forward(input, target)
        return _route.call(self, input, None, self._torch_forward, self._fastml_forward, target, found=found)

    def _fastml_forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return functional._mse_loss(input, target, None, None, self.reduction, None, routed=False)

    def _torch_forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """What it replaces: torch.nn.MSELoss's forward (functional.torch_mse_loss)."""
        return functional.torch_mse_loss(input, target, self.reduction)


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
        if torch.jit.is_scripting():
            return F.mse_loss(F.linear(input, self.weight, self.bias), target, reduction=self.reduction)
        weight = _route.weight_of(self)
        found = _route.settled(self, input, weight, target)
        if found[0] == _route.TORCH:
            return self._torch_forward(input, target)
        return _route.call(self, input, weight, self._torch_forward, self._fastml_forward, target, found=found)

    def _fastml_forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return functional.linear_mse(input, self.weight, self.bias, target, self.reduction)

    def _torch_forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """What it replaces: nn.Linear, then nn.MSELoss."""
        return functional.torch_mse_loss(F.linear(input, _route.weight_of(self), _route.registered(self, "bias")),
                                         target, self.reduction)

    def predict(self, input: torch.Tensor) -> torch.Tensor:
        return functional.linear(input, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, reduction={self.reduction!r}")


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` on fastml's fused softmax + loss + gradient kernel (class
    indices or probabilities, weight, ignore_index, label_smoothing, every reduction; input (C),
    (N, C) or (N, C, d1, ...))."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                                   reduction=self.reduction, label_smoothing=self.label_smoothing)
        found = _route.settled(self, input, None, target)
        if found[0] == _route.TORCH:
            return self._torch_forward(input, target)
        return _route.call(self, input, None, self._torch_forward, self._fastml_forward, target, found=found)

    def _fastml_forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return functional._cross_entropy(input, target, self.weight, None, self.ignore_index, None, self.reduction,
                                         self.label_smoothing, routed=False)

    def _torch_forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """What it replaces: torch.nn.CrossEntropyLoss's forward (functional.torch_cross_entropy)."""
        return functional.torch_cross_entropy(input, target, _route.weight_of(self), self.ignore_index,
                                              self.reduction, self.label_smoothing)


# What each drop-in runs as where fastml.tune found the model faster unpatched (_route.run_as_torch).
_route.TORCH_TWINS.update({Linear: torch.nn.Linear, Conv2d: torch.nn.Conv2d, MaxPool2d: torch.nn.MaxPool2d,
                           BatchNorm2d: torch.nn.BatchNorm2d, MSELoss: torch.nn.MSELoss,
                           CrossEntropyLoss: torch.nn.CrossEntropyLoss})

_TorchLinearCrossEntropyLoss = getattr(torch.nn, "LinearCrossEntropyLoss", None)


class LinearCrossEntropyLoss(_TorchLinearCrossEntropyLoss or torch.nn.modules.loss._WeightedLoss):
    """``torch.nn.LinearCrossEntropyLoss`` (torch ≥ 2.13; here on any torch): a linear layer and
    softmax cross-entropy in one chunked kernel (fastml.functional.linear_cross_entropy), the
    logits never whole. Same constructor, attributes and state_dict (``linear.weight`` of shape
    (num_classes · prod(out_features), in_features), ``linear.bias`` when ``bias``); a subclass
    of torch's where torch has it. ``predict_proba(input)`` gives the class probabilities."""

    def __init__(self, in_features: int, num_classes: int, *, out_features: tuple[int, ...] = (), bias: bool = False,
                 device=None, dtype=None, reduction: str = "mean", weight: torch.Tensor | None = None,
                 ignore_index: int | None = None, label_smoothing: float = 0.0, options=None) -> None:
        if _TorchLinearCrossEntropyLoss is not None:
            super().__init__(in_features, num_classes, out_features=out_features, bias=bias, device=device,
                             dtype=dtype, reduction=reduction, weight=weight, ignore_index=ignore_index,
                             label_smoothing=label_smoothing, options=options)
            return
        # torch < 2.13: the same checks, attributes and parameters as torch's own.
        if weight is not None and weight.shape != (num_classes,):
            raise RuntimeError(f"expected weight shape to be {(num_classes,)}, got {tuple(weight.shape)}")
        if label_smoothing < 0 or label_smoothing > 1.0:
            raise RuntimeError(f"expected label_smoothing to be in range [0, 1], got {label_smoothing}")
        super().__init__(weight=weight, size_average=None, reduce=None, reduction=reduction)
        self.num_classes, self.out_features = num_classes, out_features
        self.ignore_index, self.label_smoothing, self.options = ignore_index, label_smoothing, options
        self.linear = torch.nn.Linear(in_features, math.prod(out_features, start=num_classes), bias=bias,
                                      device=device, dtype=dtype)

    def _linear_parameters(self):
        weight = self.linear.weight.reshape((self.num_classes, *self.out_features, self.linear.in_features))
        bias = None if self.linear.bias is None else self.linear.bias.reshape((self.num_classes, *self.out_features))
        return weight, bias

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight, bias = self._linear_parameters() if self.out_features else (self.linear.weight, self.linear.bias)
        return functional.linear_cross_entropy(input, weight, target, linear_bias=bias, weight=self.weight,
                                               reduction=self.reduction, ignore_index=self.ignore_index,
                                               label_smoothing=self.label_smoothing, options=self.options)

    def predict_proba(self, input: torch.Tensor) -> torch.Tensor:
        """softmax over the classes of the logits: (N, C, *out_features) for input (N, D),
        (C,) for input (D,)."""
        logits = functional.linear(input, self.linear.weight, self.linear.bias)
        logits = logits.reshape((*input.shape[:-1], self.num_classes, *self.out_features))
        return torch.softmax(logits, dim=input.dim() - 1)

    def extra_repr(self) -> str:
        return (f"in_features={self.linear.in_features}, num_classes={self.num_classes},"
                f" out_features={self.out_features}, bias={self.linear.bias is not None},"
                f" reduction={self.reduction}, ignore_index={self.ignore_index},"
                f" label_smoothing={self.label_smoothing}, options={self.options}")
