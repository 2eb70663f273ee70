"""fastml's public functions: argument checks with clear errors, then the op's dispatch.

``linear``, ``mse_loss``, ``cross_entropy``, ``linear_cross_entropy``, ``cdist``, ``conv2d``,
``max_pool2d``, ``batch_norm`` and ``conv2d_relu_max_pool2d`` accept what their torch twins accept: where no
fastml kernel covers a configuration (mixed dtypes, integer tensors, extra options, tracers,
transforms), they run torch's own implementation, so they never fail where torch works and are
never silently different.
``linear_mse`` and ``knn`` have no twin and are strict: wrong shapes, dtypes or devices are clear
errors.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.nn.functional as F
from torch.nn import _reduction
from torch.overrides import has_torch_function, has_torch_function_variadic

from fastml import _backend, _layout, _route
from fastml.ops import (LIBRARY, dispatch_mode_active, forward_ad_active, in_custom_op_graph, is_compiling,
                        onnx_exporting, relu_in_place)
from fastml.ops import batch_norm as _batch_norm_op
from fastml.ops import cdist as _cdist_op
from fastml.ops import conv2d as _conv2d_op
from fastml.ops import conv2d_relu_max_pool2d as _fused_op
from fastml.ops import cross_entropy as _cross_entropy_op
from fastml.ops import knn as _knn_op
from fastml.ops import linear as _linear_op
from fastml.ops import linear_cross_entropy as _linear_cross_entropy_op
from fastml.ops import linear_mse as _linear_mse_op
from fastml.ops import max_pool2d as _max_pool2d_op
from fastml.ops import mse_loss as _mse_loss_op

__all__ = ["batch_norm", "cdist", "conv2d", "conv2d_relu_max_pool2d", "cross_entropy", "knn", "linear",
           "linear_cross_entropy", "linear_mse", "max_pool2d", "mse_loss"]

_REDUCTIONS = ("mean", "sum", "none")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FULL_DTYPES = (torch.float32, torch.float64)  # every backend's kernels take these


class ShapeError(ValueError, RuntimeError):
    """A tensor argument has the wrong shape (a RuntimeError too, as torch raises)."""


class DTypeError(TypeError, RuntimeError):
    """Tensor arguments disagree in dtype, or one is not floating point."""


class DeviceError(ValueError, RuntimeError):
    """Tensor arguments live on different devices."""


def _not_kernel_dtype(t: torch.Tensor) -> bool:
    """Whether no fastml kernel takes ``t``'s dtype on its device, so that torch's own op runs:
    any dtype but the floating ones, and float16 / bfloat16 where no Triton kernel covers them
    (the CPU kernels take float32 and float64 only). The op's dispatch would otherwise run its
    pure-torch oracle (fastml/ops/<op>/reference.py), which rounds half types as it is made to,
    not as torch's op does (cross_entropy's in float64, max_pool2d's backward scatter-adds in
    the half type). ``use_backend("reference")`` still runs the oracle it asks for. In a graph
    being traced, half types on the CPU run torch's op, on CUDA fastml's (Triton's when the graph
    runs). float32 and float64 cost one tuple test, as before."""
    dtype = t.dtype
    if dtype in _FULL_DTYPES:
        return False
    if dtype is not torch.float16 and dtype is not torch.bfloat16:
        return True
    if is_compiling():  # the backend is chosen when the graph runs: only the device is known here
        return t.device.type != "cuda"
    want = _backend.requested()
    if want is None:
        return not _backend.kernel_candidates(t)
    return want != "reference" and not _backend.covers(want, t)


def _check_tensor(name: str, value, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, torch.Tensor):
        kind = "a Tensor or None" if optional else "a Tensor"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")


def _check_same(first_name: str, first: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every tensor in ``others`` has ``first``'s dtype and device."""
    for name, t in others.items():
        if t is None:
            continue
        if t.device != first.device:
            raise DeviceError(f"{name} is on {t.device} but {first_name} is on {first.device}; "
                              "move them to the same device")
        if t.dtype != first.dtype:
            raise DTypeError(f"{name} has dtype {t.dtype} but {first_name} has dtype {first.dtype}; "
                             "cast them to the same floating-point dtype")


def _check_reduction(reduction) -> None:
    if reduction not in _REDUCTIONS:  # (a str in a 3-tuple: ~50 ns on the hot path)
        raise ValueError(f"{reduction!r} is not a valid value for reduction: expected 'mean', 'sum' or 'none'")


_REDUCTION_ENUMS = {name: _reduction.get_enum(name) for name in ("none", "mean", "sum")}


def torch_mse_loss(input: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
    """``torch.nn.functional.mse_loss(input, target, reduction=reduction)``: the same values,
    gradients, warnings and errors. Where the shapes match and no tensor type or mode overrides
    torch's functions, it calls the op F.mse_loss ends in directly: F.mse_loss adds its checks
    and broadcast_tensors, an identity at equal shapes that still runs an op and adds an
    autograd node, ~5 µs of a 10-row regression's 55 µs training step (Zen 5), which is what a
    drop-in whose route is torch's would add to it otherwise."""
    enum = _REDUCTION_ENUMS.get(reduction)
    if enum is not None and not has_torch_function_variadic(input, target) and input.shape == target.shape:
        return torch._C._nn.mse_loss(input, target, enum)
    return F.mse_loss(input, target, reduction=reduction)


def torch_cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int,
                        reduction: str, label_smoothing: float) -> torch.Tensor:
    """``torch.nn.functional.cross_entropy`` with these arguments: the same values, gradients and
    errors, calling the op it ends in directly where no tensor type or mode overrides torch's
    functions (torch_mse_loss says why: the torch side of a drop-in's route runs on every call)."""
    enum = _REDUCTION_ENUMS.get(reduction)
    if enum is not None and not has_torch_function_variadic(input, target, weight):
        return torch._C._nn.cross_entropy_loss(input, target, weight, enum, ignore_index, label_smoothing)
    return F.cross_entropy(input, target, weight, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)


def _check_linear_args(input, weight, bias, weight_rank_1_ok: bool, strict_bias: bool) -> None:
    _check_tensor("input", input)
    _check_tensor("weight", weight)
    _check_tensor("bias", bias, optional=True)
    if input.dim() == 0:
        raise ShapeError("input must have at least 1 dimension (..., in_features), got a 0-dim tensor")
    if weight.dim() != 2 and not (weight_rank_1_ok and weight.dim() == 1):
        raise ShapeError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if input.shape[-1] != weight.shape[-1]:
        raise ShapeError(f"input has {input.shape[-1]} features (last dim of shape {tuple(input.shape)}) "
                         f"but weight of shape {tuple(weight.shape)} expects in_features={weight.shape[-1]}")
    out_features = weight.shape[0] if weight.dim() == 2 else None
    if strict_bias and bias is not None and out_features is not None and bias.shape != (out_features,):
        raise ShapeError(f"bias must have shape ({out_features},) to match weight's out_features, "
                         f"got {tuple(bias.shape)}")


def _in_torchs_words(error: Exception, torch_function, *args) -> Exception:
    """``error`` with the message torch's own function gives for the same arguments after its
    own: a drop-in's errors are matched by their words too (torch's tests match them). torch's
    function runs only to say them."""
    try:
        torch_function(*args)
    except RuntimeError as theirs:
        return type(error)(f"{error} ({theirs})")
    return error


def _autocast_on() -> bool:
    """Whether torch.autocast is active on the CPU or CUDA (an autograd.Function is invisible to it)."""
    return _autocast_enabled("cpu") or _autocast_enabled("cuda")


def _legacy_autocast_enabled(device: str) -> bool:  # torch < 2.4: no device argument
    return torch.is_autocast_cpu_enabled() if device == "cpu" else torch.is_autocast_enabled()


try:
    torch.is_autocast_enabled("cpu")
    _autocast_enabled = torch.is_autocast_enabled
except TypeError:
    _autocast_enabled = _legacy_autocast_enabled


def _defer_to_torch(*args) -> bool:
    """Whether torch's own op must run, before any check of ours: arguments that carry
    __torch_function__ (torch.fx proxies, tensor subclasses) or a tracer that records torch ops
    (torch.jit.trace; torch.compile / torch.export on a torch without custom ops), which cannot
    see a kernel call. torch.compile and torch.export on torch >= 2.4 trace the checks below and
    record the kernels as fastml::<op> custom ops."""
    if is_compiling():
        # torch.export's non-strict tracing holds a torch-function mode, which makes
        # has_torch_function true for any argument: only the arguments' own types count here.
        return not LIBRARY or _overrides_torch_function(args) or onnx_exporting()
    return has_torch_function(args) or torch.jit.is_tracing()


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _overrides_torch_function(args) -> bool:
    """Whether an argument's type has its own __torch_function__ (the fake and functional
    tensors of tracing disable theirs)."""
    for a in args:
        if (a is not None and type(a) not in _PLAIN_TENSORS
                and getattr(type(a), "__torch_function__", torch._C._disabled_torch_function_impl)
                is not torch._C._disabled_torch_function_impl):
            return True
    return False


def _variant_can_run(*tensors: torch.Tensor | None) -> bool:
    """``_kernels_can_run``, and no graph being traced: for a layer's variant that is an
    autograd.Function around torch's ops (fastml/_recycled_linear.py, fastml/_gemm_weight_grad.py),
    whose backward a traced graph would not see as torch's."""
    return _kernels_can_run(*tensors) and not is_compiling() and not torch.jit.is_tracing()


def _kernels_can_run(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernels can take these tensors: dense (not sparse or another layout), outside
    torch.func transforms (vmap, grad, jvp: their wrapped tensors have no data pointer) and
    outside torch.autocast (which casts torch's own ops only). Otherwise torch's own ops run,
    which the transforms batch and differentiate, and autocast casts, exactly as for torch; nor
    under a Python dispatch mode (``dispatch_mode_active``), which would not see them."""
    if (torch._C._are_functorch_transforms_active() or _autocast_on()
            or (not is_compiling() and dispatch_mode_active())):
        return False
    for t in tensors:  # a plain loop: all() over a generator costs ~0.4 us more, on every call
        if t is not None and (not isinstance(t, torch.Tensor) or t.layout is not torch.strided):
            return False  # (not a tensor: torch's op says what is wrong)
    return True


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(*, F) → (prod(*), F); explicit row count, since reshape(-1, 0) is ambiguous."""
    if t.dim() == 2:
        return t  # the common case, without a reshape's ~1 µs
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = input @ weight.T + bias, as ``torch.nn.functional.linear``.

    input (*, in_features); weight (out_features, in_features) or (in_features,); bias
    (out_features,) or None → (*, out_features) (or (*) for a 1-D weight). Routed as the fused
    functionals are: where torch's F.linear measured faster for a call's signature, later calls
    of it run F.linear, without fastml's checks (torch's own function).
    """
    return _linear(input, weight, bias, routed=True)


def _linear(input, weight, bias, routed: bool):
    """``linear``; ``routed``: a route of its own (a direct call), or none (a layer's call: the
    layer routes itself, and a second route inside it would time the same work twice)."""
    if _defer_to_torch(input, weight, bias):
        return F.linear(input, weight, bias)
    if routed:
        sig = _route.function_signature("linear", (input, weight, bias), ())
        if _route.settled_on_torch(sig, input):
            return F.linear(input, weight, bias)
    try:
        _check_linear_args(input, weight, bias, weight_rank_1_ok=True, strict_bias=False)
    except ShapeError as error:
        raise _in_torchs_words(error, F.linear, input, weight, bias) from None
    if (weight.dim() != 2 or not _kernels_can_run(input, weight, bias)
            or _not_kernel_dtype(input) or weight.dtype != input.dtype
            or (bias is not None and (bias.dtype != input.dtype or bias.shape != (weight.shape[0],)))
            or weight.device != input.device or (bias is not None and bias.device != input.device)):
        return F.linear(input, weight, bias)  # a configuration the kernels do not cover: torch's own
    if not routed:
        return _fastml_linear(input, weight, bias)
    return _route.call_function("linear", (input, weight, bias), (), F.linear, _fastml_linear, sig)


def _fastml_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``linear`` on fastml's kernels, for arguments its checks passed."""
    lead = input.shape[:-1]
    rows = _rows(input)
    if (((rows.requires_grad and rows.stride(0) == 1) or (weight.requires_grad and not weight.is_contiguous()))
            and torch.is_grad_enabled()):  # (the common case: two attribute reads and is_contiguous)
        rows, weight = _matrix_product_gradient_layouts(rows, weight)
    out = _linear_op.linear(rows, weight, bias)
    return out.reshape(*lead, weight.shape[0])


class _GradientLayout(torch.autograd.Function):
    """``x`` itself (a view); its gradient handed back contiguous, or for a matrix column-major
    (``column_major``): the layouts torch's ops give gradients where fastml's kernels form them
    in another."""

    @staticmethod
    def forward(ctx, x, column_major: bool):
        ctx.column_major = column_major
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return (grad.t().contiguous().t() if ctx.column_major else grad.contiguous()), None


def _matrix_product_gradient_layouts(rows: torch.Tensor, weight: torch.Tensor):
    """(rows, weight) of rows @ weight.T, wrapped so that their gradients come back in the layouts
    torch's matrix-product backward gives them (it follows its operands' strides): column-major
    for column-major rows (a transposed input), and for a weight that is not row-major contiguous.
    The kernels work on contiguous copies and give contiguous gradients; the rare operand that
    is neither pays one copy of its gradient."""
    if (rows.requires_grad and rows.stride(0) == 1 and rows.stride(1) == rows.shape[0]
            and rows.shape[0] > 1 and rows.shape[1] > 1):
        rows = _GradientLayout.apply(rows, True)
    if weight.requires_grad and not weight.is_contiguous():
        weight = _GradientLayout.apply(weight, True)
    return rows, weight


def _linear_mse_args_ok(input, weight, bias, target) -> bool:
    """The common case, checked in a few attribute reads: the training-step hot path."""
    tensor = torch.Tensor
    return (isinstance(input, tensor) and isinstance(weight, tensor) and isinstance(target, tensor)
            and (bias is None or isinstance(bias, tensor))
            and input.dtype in _KERNEL_DTYPES and weight.dtype == input.dtype == target.dtype
            and weight.dim() == 2 and input.dim() >= 1 and input.shape[-1] == weight.shape[1]
            and target.shape == (*input.shape[:-1], weight.shape[0])
            and input.device == weight.device == target.device
            and (bias is None or (bias.shape == (weight.shape[0],) and bias.dtype == input.dtype
                                  and bias.device == input.device)))


def linear_mse(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
               reduction: str = "mean") -> torch.Tensor:
    """Squared loss of a linear layer, fused: ``mse_loss(linear(input, weight, bias), target)``.

    input (*, D); weight (O, D); bias (O,) or None (a bias that broadcasts to the prediction, as
    F.linear takes one, runs torch's ops); target (*, O), the prediction's shape. The
    loss and the weight / bias gradients come from one pass over ``input``; gradients flow to
    every argument that requires them. reduction: "mean" (over all elements), "sum" or "none"
    (→ (*, O)), as in ``torch.nn.MSELoss``.
    """
    _check_reduction(reduction)

    def torch_forward(input, weight, bias, target):  # what it replaces: nn.Linear, then nn.MSELoss
        return torch_mse_loss(F.linear(input, weight, bias), target, reduction)

    args = (input, weight, bias, target)
    if _defer_to_torch(*args):
        # its strict shapes hold for tensor subclasses too (not for torch.fx's proxies: no shapes)
        if all(a is None or isinstance(a, torch.Tensor) for a in args) and not _linear_mse_args_ok(*args):
            _diagnose_linear_mse(*args)
        return torch_forward(*args)
    sig = _route.function_signature("linear_mse", args, (reduction,))
    if _route.settled_on_torch(sig, input):
        return torch_forward(*args)
    if not _linear_mse_args_ok(*args):
        _diagnose_linear_mse(*args)
        return torch_forward(*args)  # a bias that broadcasts, which the kernels do not take
    if not _kernels_can_run(*args):  # sparse and other layouts: torch's own ops
        return torch_forward(*args)

    def fastml_forward(input, weight, bias, target):
        loss = _linear_mse_op.linear_mse(_rows(input), weight, bias, _rows(target), reduction)
        return loss.reshape(target.shape) if reduction == "none" else loss

    return _route.call_function("linear_mse", args, (reduction,), torch_forward, fastml_forward, sig)


def _diagnose_linear_mse(input, weight, bias, target) -> None:
    """Raises the clear error for whatever _linear_mse_args_ok rejected, except a bias that
    broadcasts to the prediction (a 1-element bias), which F.linear takes: that one returns, for
    torch's ops to compute, on every route alike."""
    _check_linear_args(input, weight, bias, weight_rank_1_ok=False, strict_bias=False)
    _check_tensor("target", target)
    expected = (*input.shape[:-1], weight.shape[0])
    if bias is not None and not _broadcasts_to(bias, expected):
        raise ShapeError(f"bias must have shape ({weight.shape[0]},) to match weight's out_features, "
                         f"got {tuple(bias.shape)}")
    if tuple(target.shape) != expected:
        raise ShapeError(f"target must have the prediction's shape {expected} (input's leading dims, "
                         f"then out_features), got {tuple(target.shape)}")
    if input.dtype not in _KERNEL_DTYPES:
        raise DTypeError(f"input must be a floating-point tensor, got dtype {input.dtype}")
    _check_same("input", input, weight=weight, bias=bias, target=target)


def _broadcasts_to(tensor: torch.Tensor, shape: tuple) -> bool:
    """Whether ``tensor`` broadcasts to ``shape`` without changing it."""
    try:
        return torch.broadcast_shapes(tensor.shape, shape) == shape
    except RuntimeError:
        return False


def mse_loss(input: torch.Tensor, target: torch.Tensor, size_average=None, reduce=None, reduction: str = "mean",
             weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error, as ``torch.nn.functional.mse_loss`` (same broadcasting and warning).
    Routed as the fused functionals are (``_route.call_function``): where torch's function
    measured faster for a call's signature, later calls of it run torch's."""
    return _mse_loss(input, target, size_average, reduce, reduction, weight, routed=True)


def _mse_loss(input, target, size_average, reduce, reduction, weight, routed: bool):
    """``mse_loss``; ``routed`` as in ``_linear``."""
    if _defer_to_torch(input, target, weight):
        return F.mse_loss(input, target, size_average, reduce, reduction, weight=weight)
    if routed:
        config = (size_average, reduce, reduction)
        sig = _route.function_signature("mse_loss", (input, target, weight), config)
        if (size_average is None and reduce is None and weight is None and isinstance(target, torch.Tensor)
                and target.shape == input.shape and _route.settled_on_torch(sig, input)):
            return torch_mse_loss(input, target, reduction)  # (a broadcasting call warns below, as the caller's)
    _check_tensor("input", input)
    _check_tensor("target", target)
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    if (weight is not None or not _kernels_can_run(input, target) or input.dtype != target.dtype
            or _not_kernel_dtype(input)
            or input.device != target.device or reduction not in _REDUCTIONS):
        # Not covered by a kernel (weights, type promotion, a bad reduction): torch's own, which
        # also gives torch's warnings and errors.
        return F.mse_loss(input, target, reduction=reduction, weight=weight)
    if target.size() != input.size():
        if in_custom_op_graph():  # torch's op warns inside the graph; warnings.warn would break it
            return F.mse_loss(input, target, reduction=reduction)
        # the caller of mse_loss (as torch's), or the layer
        input, target = _broadcast_with_warning(input, target, stacklevel=3 if routed else 2)

    def fastml_forward(input, target):
        return _mse_loss_op.mse_loss(input, target, reduction)

    if not routed:
        return fastml_forward(input, target)

    def torch_forward(input, target):  # (shapes made equal above: no second warning)
        return torch_mse_loss(input, target, reduction)

    return _route.call_function("mse_loss", (input, target), config, torch_forward, fastml_forward, sig)


def _broadcast_with_warning(input: torch.Tensor, target: torch.Tensor, stacklevel: int):
    """F.mse_loss's warning for a target of another size than the input's (``stacklevel`` as
    warnings.warn's, counted from the caller of this), then both broadcast to one shape as it
    broadcasts them (differentiably: their gradients sum back; torch's error if they cannot be)."""
    warnings.warn(
        f"Using a target size ({target.size()}) that is different to the input size ({input.size()}). "
        "This will likely lead to incorrect results due to broadcasting. Please ensure they have the same size.",
        stacklevel=stacklevel + 1,
    )
    return torch.broadcast_tensors(input, target)


_CDIST_MODES = ("use_mm_for_euclid_dist_if_necessary", "use_mm_for_euclid_dist", "donot_use_mm_for_euclid_dist")
_DISTANCE_DTYPES = (torch.float32, torch.float64)


def _batched_pair(x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """(*b1, P, M), (*b2, R, M) → contiguous (B, P, M), (B, R, M) over the broadcast batch
    shape, and that shape."""
    batch = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2])
    flat = math.prod(batch)
    a = x1.expand(*batch, *x1.shape[-2:]).reshape(flat, *x1.shape[-2:]).contiguous()
    b = x2.expand(*batch, *x2.shape[-2:]).reshape(flat, *x2.shape[-2:]).contiguous()
    return a, b, batch


def cdist(x1: torch.Tensor, x2: torch.Tensor, p: float = 2.0,
          compute_mode: str = "use_mm_for_euclid_dist_if_necessary") -> torch.Tensor:
    """Distances between the rows of x1 (*, P, M) and of x2 (*, R, M) → (*, P, R), as
    ``torch.cdist`` (batch dimensions broadcast), with backward.

    p = 2, 1 and inf run fastml's kernels, always from coordinate differences: exact to rounding
    even between points far from the origin, where torch's matrix-product shortcut cancels
    (``compute_mode`` only chooses that shortcut in torch, so it changes nothing here). The
    gradient at zero distance is 0. Other p, and what the kernels do not cover, run torch.cdist.
    """
    if (_defer_to_torch(x1, x2) or not isinstance(x1, torch.Tensor) or not isinstance(x2, torch.Tensor)
            or compute_mode not in _CDIST_MODES or x1.dim() < 2 or x2.dim() < 2
            or x1.shape[-1] != x2.shape[-1] or x1.dtype not in _DISTANCE_DTYPES or x2.dtype != x1.dtype
            or x1.device != x2.device or not isinstance(p, (int, float)) or float(p) not in _cdist_op.KERNEL_NORMS
            or not _kernels_can_run(x1, x2) or forward_ad_active()
            or 0 in (x1.shape[-2], x2.shape[-2], *x1.shape[:-2], *x2.shape[:-2])):
        return torch.cdist(x1, x2, p, compute_mode)  # torch's own path and errors
    a, b, batch = _batched_pair(x1, x2)
    out = _cdist_op.cdist(a, b, float(p))
    return out.reshape(*batch, x1.shape[-2], x2.shape[-2])


def knn(query: torch.Tensor, reference: torch.Tensor, k: int, p: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest rows of ``reference`` to each row of ``query``: (distances, indices).

    query (*, Q, M), reference (*, R, M) (batch dimensions broadcast); 0 <= k <= R; p >= 0
    (2, 1 and inf on fastml's kernels, other p through exact torch.cdist) → distances (*, Q, k)
    in the inputs' dtype and indices (*, Q, k) int64, ascending by distance, ties broken by the
    lower index, NaN distances last. The query × reference matrix is never formed: distances are
    reduced to each query's k best tile by tile, and are exact (coordinate differences).
    Gradients flow to query and reference through the returned distances.
    """
    _check_tensor("query", query)
    _check_tensor("reference", reference)
    if query.dim() < 2 or reference.dim() < 2:
        raise ShapeError(f"query and reference must be (*, points, features); got shapes {tuple(query.shape)} "
                         f"and {tuple(reference.shape)}")
    if query.shape[-1] != reference.shape[-1]:
        raise ShapeError(f"query has {query.shape[-1]} features but reference has {reference.shape[-1]}")
    if not query.dtype.is_floating_point:
        raise DTypeError(f"query must be a floating-point tensor, got dtype {query.dtype}")
    _check_same("query", query, reference=reference)
    if isinstance(k, torch.Tensor):
        integral = k.numel() == 1 and not (k.dtype.is_floating_point or k.dtype.is_complex or k.dtype == torch.bool)
    else:
        integral = isinstance(k, numbers.Integral) and not isinstance(k, bool)
    if not integral:
        raise TypeError(f"k must be an int (or a one-element integer tensor), got {k!r}")
    k, r = int(k), reference.shape[-2]
    if not 0 <= k <= r:
        raise ValueError(f"k must be between 0 and the number of reference points ({r}), got k={k}")
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not float(p) >= 0:
        raise ValueError(f"p must be a non-negative number, got {p!r}")
    try:
        batch = torch.broadcast_shapes(query.shape[:-2], reference.shape[:-2])
    except RuntimeError as exc:
        raise ShapeError(f"the batch dimensions of query {tuple(query.shape)} and reference "
                         f"{tuple(reference.shape)} do not broadcast") from exc
    shape = (*batch, query.shape[-2], k)
    if k == 0 or math.prod(shape) == 0:
        return query.new_empty(shape), torch.empty(shape, dtype=torch.int64, device=query.device)
    q, ref, _ = _batched_pair(query, reference)
    p = float(p)
    kernels = (p in _cdist_op.KERNEL_NORMS and query.dtype in _KERNEL_DTYPES and _kernels_can_run(query, reference)
               and not _defer_to_torch(query, reference))
    distances, indices = _knn_op.knn(q, ref, k, p, None if kernels else "reference")
    return distances.reshape(shape), indices.reshape(shape)


def _pair(value, allow_empty: bool = False) -> tuple[int, int] | None:
    """An int, or a sequence of one or two ints, as a (rows, columns) pair; None if it is not one
    (or is empty where allow_empty says an empty sequence means "the default")."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value, value
    if isinstance(value, (tuple, list, torch.Size)) and all(isinstance(v, int) and not isinstance(v, bool)
                                                          for v in value):
        if len(value) == 2:
            return value[0], value[1]
        if len(value) == 1:
            return value[0], value[0]
    return None


_C_INT_MAX = 2**31 - 1


def _pool_args(input, kernel_size, stride, padding, dilation, ceil_mode):
    """(kernel, stride, padding, dilation) pairs where fastml's kernels take this max_pool2d call as
    it is, else None: then torch's own max_pool2d runs, with its results and its errors."""
    if (not isinstance(input, torch.Tensor) or input.dim() not in (3, 4) or 0 in input.shape[-3:]
            or _not_kernel_dtype(input) or not isinstance(ceil_mode, bool) or not _kernels_can_run(input)
            or forward_ad_active()):
        return None
    kernel = _pair(kernel_size)
    stride = kernel if stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0) else _pair(stride)
    padding, dilation = _pair(padding), _pair(dilation)
    if None in (kernel, stride, padding, dilation) or min(*kernel, *stride, *dilation) <= 0:
        return None
    if max(*kernel, *stride, *padding, *dilation) > _C_INT_MAX:  # torch raises: its pooling takes C ints
        return None
    if not (0 <= padding[0] <= kernel[0] // 2 and 0 <= padding[1] <= kernel[1] // 2):
        return None
    for size, k, s, p, d in zip(input.shape[-2:], kernel, stride, padding, dilation):
        outputs = _max_pool2d_op.output_size(size, k, s, p, d, ceil_mode)
        if outputs < 1 or (d > 1 and _empty_window(size, outputs, k, s, p, d)):
            return None
    return kernel, stride, padding, dilation


def _empty_window(size, outputs, kernel, stride, padding, dilation) -> bool:
    """Whether some pooling window has no tap inside the input. Only dilated windows can: a
    contiguous one starts before the end and, padding being at most half the kernel, ends after
    the start. torch then reports an index outside the plane; its own max_pool2d runs."""
    for o in range(outputs):
        start = o * stride - padding
        if not any(0 <= start + i * dilation < size for i in range(kernel)):
            return True
    return False


def max_pool2d(input: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False,
               return_indices: bool = False):
    """``torch.nn.functional.max_pool2d``: input (N, C, H, W) or (C, H, W) → the maxima of each
    window, with torch's indices (flat positions in the input plane, ties to the first maximum,
    NaN propagating) when ``return_indices``; backward routes each gradient to its maximum.
    A channels_last input gives channels_last outputs and input gradient, as torch. What the
    kernels do not cover (other dtypes, transforms, invalid arguments) runs torch's max_pool2d.
    Routed as the fused functionals are: a small pooling's cost is its dispatch (2x16x28x28:
    0.58x torch's unrouted).
    """
    return _max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices, routed=True)


def _max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices, routed: bool):
    """``max_pool2d``; ``routed`` as in ``_linear``, and keyed by the arguments as given, as
    ``_conv2d``'s (parsing them costs 2 µs, torch's whole max_pool2d of 2x3x8x8 2.6 µs)."""
    config = sig = None
    if routed:
        config, sig = _route.given_signature("max_pool2d", (input,),
                                             (kernel_size, stride, padding, dilation, ceil_mode, return_indices))
        if _route.settled_on_torch(sig, input):
            return F.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode,
                                return_indices=return_indices)
    args = None if _defer_to_torch(input) else _pool_args(input, kernel_size, stride, padding, dilation, ceil_mode)
    if args is None:
        return F.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode,
                            return_indices=return_indices)

    def fastml_forward(input):
        x = input if input.dim() == 4 else input.unsqueeze(0)
        # (channels_last is a layout of 4-D tensors: torch pools an unbatched input into a contiguous
        # output; and its rule is the strides' order, which a channel-sliced channels-last view keeps)
        channels_last = input.dim() == 4 and not x.is_contiguous() and _layout.suggests_channels_last(x)
        out, indices = _max_pool2d_op.max_pool2d(_nchw(x, channels_last), *args, ceil_mode)
        if channels_last:
            out, indices = (t.contiguous(memory_format=torch.channels_last) for t in (out, indices))
        if input.dim() == 3:
            out, indices = out.squeeze(0), indices.squeeze(0)
        return (out, indices) if return_indices else out

    if not routed:
        return fastml_forward(input)

    def torch_forward(input):
        return F.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode,
                            return_indices=return_indices)

    return _route.call_function("max_pool2d", (input,), config, torch_forward, fastml_forward, sig,
                                (*args, ceil_mode, return_indices))


_BATCH_NORM_DTYPES = (torch.float32, torch.float64)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _batch_norm_runs_kernels(input, running_mean, running_var, weight, bias, training, momentum, eps) -> bool:
    """Whether fastml's kernels take this batch_norm call: training statistics of a 4-D float32 or
    float64 input of more than one value per channel, the other tensors (C,) of its dtype and
    device. Anything else runs torch's batch_norm, with its results and its errors."""
    # torch checks training's type (a bool) and eps (> 0 in training) itself: anything else is its error
    if not (training is True and isinstance(input, torch.Tensor) and input.dim() == 4
            and input.dtype in _BATCH_NORM_DTYPES and _is_real(momentum) and _is_real(eps) and eps > 0):
        return False
    n, c, h, w = input.shape
    if n * h * w <= 1 or c == 0:  # torch's error for one value; torch's results for an empty batch
        return False
    for t in (running_mean, running_var, weight, bias):
        if t is not None and not (isinstance(t, torch.Tensor) and t.shape == (c,) and t.dtype == input.dtype
                                  and t.device == input.device):
            return False
    if (running_mean is None) != (running_var is None):
        return False  # torch's own rules for half a pair of running statistics
    return not _defer_to_torch(input, running_mean, running_var, weight, bias) and not forward_ad_active() \
        and _kernels_can_run(input, running_mean, running_var, weight, bias)


def batch_norm(input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5, relu: bool = False) -> torch.Tensor:
    """``torch.nn.functional.batch_norm``, then a ReLU where ``relu``: in training, one kernel
    gathers the batch's statistics and another normalises (and applies the ReLU) in one pass;
    backward recomputes the ReLU's mask from the input and reads it twice in all. The running
    statistics are updated in place as torch updates them (momentum, unbiased variance). What the
    kernels do not cover (eval mode, other dtypes or ranks, transforms) runs torch's batch_norm,
    then torch's ReLU. Routed as the other functionals are (2x3x8x8 in training: 0.44x torch's
    unrouted); the timed calls leave the running statistics as the real call left them."""
    if not isinstance(relu, bool):  # (fastml's own argument: torch checks the others)
        raise TypeError(f"relu must be True or False, got {relu!r}")
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, relu, routed=True)


def _torch_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, relu):
    out = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return relu_in_place(out) if relu else out  # (batch norm's backward does not read its output)


def _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, relu, routed: bool):
    """``batch_norm``; ``routed`` as in ``_linear`` (a BatchNorm2d routes itself), the route keyed by
    the arguments as given, as ``_conv2d``'s."""
    args = (input, running_mean, running_var, weight, bias)
    config = sig = None
    if routed:
        config, sig = _route.given_signature("batch_norm", args, (training, momentum, eps, relu))
        if _route.settled_on_torch(sig, input):
            return _torch_batch_norm(*args, training, momentum, eps, relu)
    if not _batch_norm_runs_kernels(input, running_mean, running_var, weight, bias, training, momentum, eps):
        return _torch_batch_norm(*args, training, momentum, eps, relu)

    def fastml_forward(input, running_mean, running_var, weight, bias):
        x = input.contiguous(memory_format=_batch_norm_op.reference.layout_of(input))
        weight = None if weight is None else weight.contiguous()
        bias = None if bias is None else bias.contiguous()
        out, stats = _batch_norm_op.batch_norm(x, weight, bias, float(eps), bool(relu))
        if running_mean is not None:
            count = x.numel() // x.shape[1]
            with torch.no_grad():  # torch's update: (1 − momentum) · running + momentum · batch
                # (in that form, not lerp_'s: at momentum >= 0.5 lerp_ computes batch − (batch −
                # running)·(1 − momentum), NaN for an infinite statistic where torch's is ±inf)
                running_mean.mul_(1 - momentum).add_(stats[0], alpha=momentum)
                running_var.mul_(1 - momentum).add_(stats[1] * (count / (count - 1)), alpha=momentum)
        return out

    if not routed:
        return fastml_forward(*args)

    def torch_forward(*args):
        return _torch_batch_norm(*args, training, momentum, eps, relu)

    parsed = (True, float(momentum), float(eps), bool(relu))  # (the kernels run training statistics only)
    return _route.call_function("batch_norm", args, config, torch_forward, fastml_forward, sig, parsed,
                                kept=(running_mean, running_var))


def _conv_padding(padding, weight, stride, dilation):
    """(top, bottom, left, right) zero padding for conv2d's padding argument (ints, a pair, "valid"
    or "same", torch's meaning), or None. An uneven "same" (an even kernel length at an odd
    dilation) is torch's alone: it warns, then pads a copy of the input, the odd one out at the
    bottom and right."""
    if padding == "valid":
        return 0, 0, 0, 0
    if padding == "same":
        if stride != (1, 1):
            return None  # torch's error
        (top, left) = (dilation[0] * (weight.shape[2] - 1), dilation[1] * (weight.shape[3] - 1))
        if top % 2 or left % 2:
            return None  # uneven: torch's, with its warning that it pads a copy of the input
        return top // 2, top // 2, left // 2, left // 2
    pair = _pair(padding)
    if pair is None or min(pair) < 0:
        return None
    return pair[0], pair[0], pair[1], pair[1]


def _conv_args(input, weight, bias, stride, padding, dilation, groups):
    """(stride, (top, bottom, left, right), dilation) where fastml's kernels take this conv2d
    call as it is, else None: then torch's conv2d runs, with its results and its errors."""
    if (not isinstance(input, torch.Tensor) or not isinstance(weight, torch.Tensor) or input.dim() not in (3, 4)
            or weight.dim() != 4 or _not_kernel_dtype(input) or weight.dtype != input.dtype
            or weight.device != input.device or 0 in input.shape or 0 in weight.shape
            or not isinstance(groups, int) or isinstance(groups, bool) or groups <= 0
            or (bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],)
                                      or bias.dtype != input.dtype or bias.device != input.device))
            or not _kernels_can_run(input, weight, bias) or forward_ad_active()):
        return None
    stride, dilation = _pair(stride), _pair(dilation)
    if stride is None or dilation is None or min(*stride, *dilation) <= 0:
        return None
    channels = input.shape[-3]
    if channels % groups or weight.shape[0] % groups or weight.shape[1] * groups != channels:
        return None
    pads = _conv_padding(padding, weight, stride, dilation)
    if pads is None:
        return None
    h, w = input.shape[-2:]
    extent = (h + pads[0] + pads[1], w + pads[2] + pads[3])
    if (extent[0] < dilation[0] * (weight.shape[2] - 1) + 1
            or extent[1] < dilation[1] * (weight.shape[3] - 1) + 1):
        return None
    # A stride past the padded image takes one window along it, as a stride of the image's extent
    # does, and a 1-tap kernel's dilation spans nothing: given so, the kernels' products of strides
    # and sizes stay far from int64's limit (a stride of 2**59 sized a scratch buffer by overflow).
    stride = (min(stride[0], extent[0]), min(stride[1], extent[1]))
    dilation = (dilation[0] if weight.shape[2] > 1 else 1, dilation[1] if weight.shape[3] > 1 else 1)
    return stride, pads, dilation


def conv2d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
           dilation=1, groups: int = 1) -> torch.Tensor:
    """``torch.nn.functional.conv2d``: input (N, C, H, W) or (C, H, W), weight (K, C / groups, R, S),
    bias (K,) or None; stride, padding (ints, a pair, "valid" or "same") and dilation as torch's;
    with backward for input, weight and bias. The output and the gradients of input and weight are
    channels_last where torch's are: when the input or the weight is. What the kernels do not cover
    (other dtypes, transforms, invalid arguments) runs torch's conv2d. Routed as the fused
    functionals are: where torch's F.conv2d measured faster for a call's signature, later calls
    of it run F.conv2d (8x16x28x28, 3x3 to 32 channels: 0.89x torch's unrouted).
    """
    return _conv2d(input, weight, bias, stride, padding, dilation, groups, routed=True)


def _conv2d(input, weight, bias, stride, padding, dilation, groups, routed: bool):
    """``conv2d``; ``routed`` as in ``_linear``. A routed call's route is keyed by the arguments as
    given, so a call settled on torch's F.conv2d skips parsing them too (3 µs of Python, which
    measured 10 µs, 3%, beside LeNet's 0.3 ms second convolution)."""
    config = sig = None
    if routed:
        config, sig = _route.given_signature("conv2d", (input, weight, bias), (stride, padding, dilation, groups))
        if _route.settled_on_torch(sig, input):
            return _layout.conv2d(input, weight, bias, stride, padding, dilation, groups)
    args = None if _defer_to_torch(input, weight, bias) else _conv_args(input, weight, bias, stride, padding,
                                                                        dilation, groups)
    if args is None:
        return _layout.conv2d(input, weight, bias, stride, padding, dilation, groups)

    def fastml_forward(input, weight, bias):
        x, weight, pads, restore = _conv_operands(input, weight, args[1])
        return restore(_conv2d_op.conv2d(x, weight, None if bias is None else bias.contiguous(), args[0], pads,
                                         args[2], groups))

    if not routed:
        return fastml_forward(input, weight, bias)

    def torch_forward(input, weight, bias):
        return _layout.conv2d(input, weight, bias, stride, padding, dilation, groups)

    return _route.call_function("conv2d", (input, weight, bias), config, torch_forward, fastml_forward, sig,
                                (*args, groups))


def _nchw(x: torch.Tensor, grad_channels_last: bool) -> torch.Tensor:
    """x contiguous for the kernels; its gradient channels_last if ``grad_channels_last``, as
    torch's CPU convolution and pooling hand back a channels-last layer's gradients."""
    if grad_channels_last and x.requires_grad and torch.is_grad_enabled():
        return _layout.Relayout.apply(x, torch.contiguous_format, torch.channels_last)
    if grad_channels_last and _layout.suggests_channels_last(x):
        # a copy even where x is contiguous both ways (one channel, a 1x1 weight): the reference
        # backend hands x to torch, which would read its strides as channels-last
        return _layout.relayout(x, torch.contiguous_format)  # (no gradient flows to x here)
    return x.contiguous()


def _conv_operands(input, weight, pads):
    """The kernels' view of a convolution's operands: (x (N, C, H, W) contiguous, weight
    contiguous, padding (rows, columns), restore) where restore gives the output torch's layout
    (unbatched; channels_last when the input or the weight is, torch's CPU rule, which then holds
    for their gradients too). ``pads``: _conv_padding's (top, bottom, left, right), symmetric."""
    top, _, left, _ = pads
    x = input if input.dim() == 4 else input.unsqueeze(0)
    channels_last = _layout.suggests_channels_last(x) or _layout.suggests_channels_last(weight)

    def restore(out):
        if channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return out if input.dim() == 4 else out.squeeze(0)

    return _nchw(x, channels_last), _nchw(weight, channels_last), (top, left), restore


def conv2d_relu_max_pool2d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1,
                           padding=0, dilation=1, groups: int = 1, pool_kernel_size=2,
                           pool_stride=None) -> torch.Tensor:
    """``max_pool2d(relu(conv2d(input, weight, bias, stride, padding, dilation, groups)),
    pool_kernel_size, pool_stride)`` in one kernel (pool_stride defaults to the pool kernel): the
    activation before pooling is never stored, and backward keeps only the pooled output and an
    int8 offset per window. Arguments as conv2d's and max_pool2d's; what the kernels do not cover
    runs those three torch ops.
    """
    pool_kernel = _pair(pool_kernel_size)
    pool_step = pool_kernel if pool_stride is None else _pair(pool_stride)
    args = None if _defer_to_torch(input, weight, bias) else _conv_args(input, weight, bias, stride, padding,
                                                                        dilation, groups)
    if args is not None and pool_kernel is not None and pool_step is not None:
        conv_stride, (top, bottom, left, right), conv_dilation = args
        conv_size = [_conv2d_op.output_size(size + before + after, k, s, 0, d) for size, before, after, k, s, d in
                     zip(input.shape[-2:], (top, left), (bottom, right), weight.shape[2:], conv_stride, conv_dilation)]
        # int8 window offsets hold windows of up to 127 elements
        if (min(*pool_kernel, *pool_step) > 0 and pool_kernel[0] * pool_kernel[1] <= 127
                and max(*pool_kernel, *pool_step) <= _C_INT_MAX  # (torch's pooling raises beyond)
                and all(size >= k for size, k in zip(conv_size, pool_kernel))):
            def fastml_forward(input, weight, bias):
                x, weight, fused_padding, restore = _conv_operands(input, weight, args[1])
                out = restore(_fused_op.conv2d_relu_max_pool2d(
                    x, weight, None if bias is None else bias.contiguous(), conv_stride, fused_padding,
                    conv_dilation, groups, pool_kernel, pool_step))
                # torch's max_pool2d gives an unbatched input a contiguous output, whatever the
                # layout of the convolution's (channels_last is a layout of 4-D tensors alone)
                return out if input.dim() == 4 else out.contiguous()

            def torch_forward(input, weight, bias):
                return F.max_pool2d(F.relu(_layout.conv2d(input, weight, bias, stride, padding, dilation, groups)),
                                    pool_kernel, pool_step)

            config = (conv_stride, args[1], conv_dilation, groups, pool_kernel, pool_step)
            return _route.call_function("conv2d_relu_max_pool2d", (input, weight, bias), config, torch_forward,
                                        fastml_forward)
    # torch's ops, with the caller's own arguments (and so torch's errors for bad ones)
    z = torch.relu(conv2d(input, weight, bias, stride, padding, dilation, groups))
    return max_pool2d(z, pool_kernel_size, pool_stride)



def _class_weight_ok(weight, input, num_classes) -> bool:
    """Whether a class-weight argument is one the kernels take: absent, or (C,) in the input's
    dtype and device, not itself requiring a gradient (torch has none to give it)."""
    return weight is None or (isinstance(weight, torch.Tensor) and weight.shape == (num_classes,)
                              and weight.dtype == input.dtype and weight.device == input.device
                              and not (weight.requires_grad and torch.is_grad_enabled()))


def _target_kind(target, input, index_shape, probs_shape) -> str | None:
    """"index" for an int64 target of index_shape, "probs" for a floating one of probs_shape in
    the input's dtype (neither requiring a gradient through a kernel), else None."""
    if not isinstance(target, torch.Tensor) or target.device != input.device:
        return None
    if target.dtype == torch.int64 and target.shape == index_shape:
        return "index"
    if target.dtype == input.dtype and target.shape == probs_shape:
        return "probs"
    return None


def _smoothing_ok(label_smoothing) -> bool:
    return (isinstance(label_smoothing, (int, float)) and not isinstance(label_smoothing, bool)
            and 0.0 <= label_smoothing <= 1.0)


def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None, size_average=None,
                  ignore_index: int = -100, reduce=None, reduction: str = "mean",
                  label_smoothing: float = 0.0) -> torch.Tensor:
    """``torch.nn.functional.cross_entropy`` on one fused softmax + loss + gradient kernel: input
    (C), (N, C) or (N, C, d1, ...); target class indices (int64, the input's shape without C) or
    class probabilities (the input's shape and dtype); ``weight``, ``ignore_index``,
    ``label_smoothing`` and every reduction with torch's meaning. What the kernels do not cover
    (legacy size_average / reduce, other dtypes, transforms, invalid arguments) runs torch's
    cross_entropy, with its results and errors. Routed as the fused functionals are
    (``_route.call_function``): where torch's function measured faster for a call's signature
    (a small batch, whose cost is the dispatch), later calls of it run torch's.
    """
    return _cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing,
                          routed=True)


def _cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing,
                   routed: bool):
    """``cross_entropy``; ``routed`` as in ``_linear``."""
    rows = sig = None
    if not _defer_to_torch(input, target, weight) and size_average is None and reduce is None:
        config = (ignore_index, reduction, label_smoothing)
        if routed:
            sig = _route.function_signature("cross_entropy", (input, target, weight), config)
            if _route.settled_on_torch(sig, input):
                return torch_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing)
        rows = _cross_entropy_rows(input, target, weight, ignore_index, reduction, label_smoothing)
    if rows is None:
        return F.cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing)
    checked = input

    def fastml_forward(input, target, weight):
        # The rows checked above, or (for the timed copies of the arguments) their own.
        logits, flat_target, shape = rows if input is checked else _cross_entropy_rows(
            input, target, weight, ignore_index, reduction, label_smoothing)
        loss = _cross_entropy_op.cross_entropy(logits, flat_target, None if weight is None else weight.contiguous(),
                                               ignore_index, float(label_smoothing), reduction)
        return loss.reshape(shape) if reduction == "none" else loss

    if not routed:
        return fastml_forward(input, target, weight)

    def torch_forward(input, target, weight):
        return torch_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing)

    return _route.call_function("cross_entropy", (input, target, weight), config, torch_forward, fastml_forward, sig)


def _cross_entropy_rows(input, target, weight, ignore_index, reduction, label_smoothing):
    """(logits (M, C), target (M,) or (M, C), the "none" loss's shape), contiguous, where the
    kernels take this call, else None."""
    if (not isinstance(input, torch.Tensor) or _not_kernel_dtype(input) or input.dim() < 1
            or reduction not in _REDUCTIONS or not isinstance(ignore_index, int) or isinstance(ignore_index, bool)
            or not _smoothing_ok(label_smoothing) or not _kernels_can_run(input, target, weight)
            or forward_ad_active()):
        return None
    rank = input.dim()
    shape = input.shape
    num_classes = shape[1] if rank > 1 else shape[0]
    # (N, C) with (N,) targets, the common case, without slicing torch.Size or reshaping: ~1 us
    index_shape = shape[:1] if rank == 2 else shape[:1] + shape[2:] if rank > 1 else torch.Size()
    kind = _target_kind(target, input, index_shape, shape)
    if (kind is None or num_classes == 0 or not _class_weight_ok(weight, input, num_classes)
            or (kind == "probs" and ignore_index != -100)):  # torch's error
        return None
    if rank == 1:
        logits = input.unsqueeze(0)
    elif rank == 2:
        logits = input
    else:
        logits = _channels_to_rows(input, num_classes)
    if kind == "index":
        flat = target if target.dim() == 1 else target.reshape(-1)
    else:
        flat = target.unsqueeze(0) if rank == 1 else _channels_to_rows(target, num_classes)
    return logits.contiguous(), flat.contiguous(), index_shape


def _channels_to_rows(t: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, C, d1, ...) → (N·d1·..., C), a view where it can be. The gradient that comes back
    through the view is (N, C, d1, ...) with the classes innermost; torch's cross_entropy hands
    back a contiguous one (whatever the layout of the input), so it is made contiguous."""
    if t.requires_grad and torch.is_grad_enabled():
        t = _GradientLayout.apply(t, False)
    return t.movedim(1, -1).reshape(-1, num_classes)


def linear_cross_entropy(input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor, *,
                         linear_bias: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                         reduction: str = "mean", ignore_index: int | None = None, label_smoothing: float = 0.0,
                         options=None) -> torch.Tensor:
    """``torch.nn.functional.linear_cross_entropy`` (torch ≥ 2.13; here on any torch):
    ``cross_entropy(linear(input, linear_weight, linear_bias), target, ...)`` computed chunk by
    chunk, so the N × C logits never exist whole, with the gradients for input, weight and bias
    formed in the same pass. input (D) or (N, D); linear_weight (C, D); target class indices
    ((), (N)) or probabilities ((C), (N, C)); ``ignore_index`` None means -100 for index
    targets. fastml always chunks: ``options`` (torch's LinearCrossEntropyOptions) is accepted
    and not needed. What the kernels do not cover (K-dimensional losses, probability targets
    that require a gradient, other dtypes, transforms, invalid arguments) runs torch's
    linear_cross_entropy (or linear + cross_entropy before torch 2.13), with its errors.
    """
    if (not _defer_to_torch(input, linear_weight, target, linear_bias, weight)
            and _contiguous_where_grad(input, linear_weight)
            and not _options_ignored(options, target, label_smoothing)):
        config = (reduction, ignore_index, label_smoothing)
        sig = _route.function_signature("linear_cross_entropy", (input, linear_weight, linear_bias, target, weight),
                                        config)
        backend = _route.kernel_route(sig, config)
        if backend is not None and _kernels_can_run() and not forward_ad_active():
            return _fused_linear_cross_entropy(input, linear_weight, linear_bias, target, weight, ignore_index,
                                               label_smoothing, reduction, backend)
        if _route.settled_on_torch(sig, input):
            return _unfused_or_torch_linear_cross_entropy(input, linear_weight, target, linear_bias, weight, reduction,
                                                          ignore_index, label_smoothing, options)
        passed = _route.checks_passed(sig, config)
        if ((passed and _kernels_can_run() and not forward_ad_active())
                or _linear_cross_entropy_args(input, linear_weight, target, linear_bias, weight, reduction,
                                              ignore_index, label_smoothing) is not None):
            if not passed:
                _route.pass_checks(sig, config)

            def fastml_forward(input, linear_weight, linear_bias, target, weight):
                return _fused_linear_cross_entropy(input, linear_weight, linear_bias, target, weight, ignore_index,
                                                   label_smoothing, reduction)

            def torch_forward(input, linear_weight, linear_bias, target, weight):
                return _unfused_or_torch_linear_cross_entropy(input, linear_weight, target, linear_bias, weight,
                                                              reduction, ignore_index, label_smoothing, options)

            loss = _route.call_function("linear_cross_entropy", (input, linear_weight, linear_bias, target, weight),
                                        config, torch_forward, fastml_forward, sig)
            _route.remember_kernel_route(sig, config, lambda: _linear_cross_entropy_op.decided_backend(
                *_kernel_operands(input, linear_weight, linear_bias, target, weight), float(label_smoothing),
                reduction))
            return loss
    return _torch_linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, weight=weight,
                                       reduction=reduction, ignore_index=ignore_index,
                                       label_smoothing=label_smoothing, options=options)


def _options_ignored(options, target, label_smoothing) -> bool:
    """Whether torch's linear_cross_entropy would warn that it ignores ``options`` (its chunked
    path takes class-index targets without label smoothing; the other cases it warns about, a
    K-dimensional weight, a bad reduction, tracing, never reach the kernels): torch's function
    runs, and warns as it does."""
    return options is not None and (label_smoothing != 0.0 or not isinstance(target, torch.Tensor)
                                    or target.dtype != torch.int64)


def _contiguous_where_grad(*tensors) -> bool:
    """Whether each of these (tensors, or not) that requires a gradient is contiguous. The layouts
    of torch's gradients for other operands depend on its path: its linear + cross_entropy follows
    the operands' strides (see _matrix_product_gradient_layouts), its chunked
    linear_cross_entropy does not; fastml's kernels work on contiguous copies and give contiguous
    gradients. Such calls (rare: parameters and activations are contiguous) run torch's own
    function."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.requires_grad and not t.is_contiguous():
            return False
    return True


def _linear_cross_entropy_args(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                               label_smoothing):
    """(x (N, D), target (N,) or (N, C), whether indices), contiguous, where the kernels take
    this call, else None."""
    if (not isinstance(input, torch.Tensor) or not isinstance(linear_weight, torch.Tensor)
            or input.dim() not in (1, 2) or linear_weight.dim() != 2 or _not_kernel_dtype(input)
            or linear_weight.dtype != input.dtype or linear_weight.device != input.device
            or input.shape[-1] != linear_weight.shape[1] or reduction not in _REDUCTIONS
            or not _smoothing_ok(label_smoothing) or not _kernels_can_run(input, linear_weight, target, linear_bias,
                                                                          weight)
            or forward_ad_active()):
        return None
    num_classes = linear_weight.shape[0]
    if linear_bias is not None and (not isinstance(linear_bias, torch.Tensor) or linear_bias.shape != (num_classes,)
                                    or linear_bias.dtype != input.dtype or linear_bias.device != input.device):
        return None
    kind = _target_kind(target, input, input.shape[:-1], input.shape[:-1] + (num_classes,))
    if (kind is None or num_classes == 0 or not _class_weight_ok(weight, input, num_classes)
            or (kind == "index" and ignore_index is not None
                and (not isinstance(ignore_index, int) or isinstance(ignore_index, bool)))
            or (kind == "probs" and (ignore_index is not None or (target.requires_grad and torch.is_grad_enabled())))):
        return None
    return (*_as_rows(input, target), kind == "index")


def _as_rows(input, target):
    """A (D,) input and its target as a batch of one row, both contiguous."""
    x = input if input.dim() == 2 else input.unsqueeze(0)
    rows = target if input.dim() == 2 else target.unsqueeze(0)
    return x.contiguous(), rows.contiguous()


def _kernel_operands(input, linear_weight, linear_bias, target, weight) -> tuple:
    """linear_cross_entropy's tensors as its op takes them: (x, linear weight, linear bias,
    target, class weight), the input and target as rows, every one contiguous."""
    x, rows = _as_rows(input, target)
    return (x, linear_weight.contiguous(), None if linear_bias is None else linear_bias.contiguous(), rows,
            None if weight is None else weight.contiguous())


def _fused_linear_cross_entropy(input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing,
                                reduction, backend=None):
    """fastml's path of linear_cross_entropy, its arguments checked: the op's measured choice,
    or ``backend`` where the call's route remembers it (fastml/_route.py's kernel_route)."""
    x, w, b, rows, class_weight = _kernel_operands(input, linear_weight, linear_bias, target, weight)
    ignore = -100 if ignore_index is None else ignore_index
    if backend is None:
        loss = _linear_cross_entropy_op.linear_cross_entropy(x, w, b, rows, class_weight, ignore,
                                                             float(label_smoothing), reduction)
    else:
        loss = _linear_cross_entropy_op.on_backend(backend, x, w, b, rows, class_weight, ignore,
                                                   float(label_smoothing), reduction)
    return loss.squeeze(0) if reduction == "none" and input.dim() == 1 else loss


LOGITS_HELD_MAX = 1 << 24
"""The most logits (64 MB of float32) fastml's measured choice may hold whole when it runs torch's
linear + cross_entropy in place of a fused linear_cross_entropy; above it, torch's chunked one."""


def _unfused_or_torch_linear_cross_entropy(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                                           label_smoothing, options):
    """The torch twin the measured choice times against fastml's kernel: linear + cross_entropy,
    what the course writes and on a CPU faster than torch's chunked linear_cross_entropy (which
    runs where the logits would not fit LOGITS_HELD_MAX). ``ignore_index`` None: torch's default."""
    if input.numel() // max(1, input.shape[-1]) * linear_weight.shape[0] > LOGITS_HELD_MAX:
        return _torch_linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, weight=weight,
                                           reduction=reduction, ignore_index=ignore_index,
                                           label_smoothing=label_smoothing, options=options)
    return F.cross_entropy(F.linear(input, linear_weight, linear_bias), target, weight=weight, reduction=reduction,
                           ignore_index=-100 if ignore_index is None else ignore_index, label_smoothing=label_smoothing)


def _torch_linear_cross_entropy(input, linear_weight, target, *, linear_bias, weight, reduction, ignore_index,
                                label_smoothing, options):
    """torch's linear_cross_entropy where it exists; before torch 2.13, its reference path."""
    twin = getattr(F, "linear_cross_entropy", None)
    if twin is not None:
        return twin(input, linear_weight, target, linear_bias=linear_bias, weight=weight, reduction=reduction,
                    ignore_index=ignore_index, label_smoothing=label_smoothing, options=options)
    if input.dim() < 1 or input.dim() > 2:
        raise RuntimeError(f"expected input with dimensionality 1 or 2, got {input.dim()}")
    if linear_weight.dim() < 2:
        raise RuntimeError(f"expected linear_weight with dimensionality at least 2, got {linear_weight.dim()}")
    in_features, num_classes, out_features = input.shape[-1], linear_weight.shape[0], linear_weight.shape[1:-1]
    if in_features != linear_weight.shape[-1]:
        raise RuntimeError("expected equal input and linear_weight last dimensions (in_features), "
                           f"got {in_features} and {linear_weight.shape[-1]}, respectively")
    if linear_bias is not None and tuple(linear_bias.shape) != (num_classes, *out_features):
        raise RuntimeError(f"expected linear_bias shape {(num_classes, *out_features)}, "
                           f"got {tuple(linear_bias.shape)}")
    if out_features and input.dim() == 1:
        raise RuntimeError(f"K-dimensional loss defined by linear_weight shape {tuple(linear_weight.shape)} "
                           f"requires batched input, (N, {in_features}), got unbatched input with shape "
                           f"{tuple(input.shape)}")
    logits_shape = (*input.shape[:-1], num_classes, *out_features)
    if target.shape == logits_shape and ignore_index is not None:
        raise RuntimeError("ignore_index cannot be specified when target contains probabilities")
    flat = math.prod(out_features) * num_classes
    logits = linear(input, linear_weight.reshape(flat, in_features),
                    None if linear_bias is None else linear_bias.reshape(flat))
    return cross_entropy(logits.reshape(logits_shape), target, weight=weight, reduction=reduction,
                         ignore_index=-100 if ignore_index is None else ignore_index, label_smoothing=label_smoothing)
