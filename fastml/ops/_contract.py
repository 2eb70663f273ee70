"""The argument checks of the ``fastml::`` custom ops (ops/<op>/library.py).

fastml's public functions validate their arguments before they reach an op, but anyone can call
``torch.ops.fastml.<op>`` directly, and its kernels trust their inputs: a wrong shape, dtype or
index makes them read or write past a tensor's end. Each op checks its contract first, here,
with the error types and messages of fastml.functional (ShapeError, a ValueError; DTypeError, a
TypeError; both RuntimeErrors as torch's own) prefixed with the op's name.

The checks run on every call of a compiled graph, so they compare attributes (shapes, dims,
dtypes, lengths) and never read a tensor's data, except where a kernel indexes memory with a
value it reads (``indices_below``).
"""

from __future__ import annotations

import operator

import torch

from fastml.functional import DeviceError, DTypeError, ShapeError, _check_reduction, _check_same

_shape = operator.attrgetter("shape")


def prefixed(op: str, error: Exception) -> Exception:
    """``error``, of its own type, with its message led by the op's name."""
    return type(error)(f"fastml::{op}: {error}")


def fail(op: str, kind: type[Exception], message: str):
    raise kind(f"fastml::{op}: {message}")


def dims(op: str, name: str, t: torch.Tensor, dim: int, layout: str) -> None:
    """``t`` has ``dim`` dimensions, ``layout`` naming them, as "(N, C, H, W)"."""
    if t.dim() != dim:
        fail(op, ShapeError, f"{name} must be {dim}-D {layout}, got shape {tuple(t.shape)}")


def shape(op: str, name: str, t: torch.Tensor | None, expected: tuple, layout: str) -> None:
    """``t`` (where given) has the shape ``expected``, ``layout`` naming its dimensions."""
    if t is not None and t.shape != expected:
        fail(op, ShapeError, f"{name} must have shape {layout} = {tuple(expected)}, got {tuple(t.shape)}")


def floating(op: str, name: str, t: torch.Tensor) -> None:
    if not t.dtype.is_floating_point:
        fail(op, DTypeError, f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def same(op: str, first_name: str, first: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every tensor in ``others`` has ``first``'s dtype and device. The loop here; the message,
    where one differs, functional._check_same's (calling it on every call cost ~1 µs more)."""
    dtype, device = first.dtype, first.device
    for t in others.values():
        if t is not None and (t.dtype != dtype or t.device != device):
            try:
                _check_same(first_name, first, **others)
            except (DTypeError, DeviceError) as error:
                raise prefixed(op, error) from None


def reduction(op: str, value: str) -> None:
    try:
        _check_reduction(value)
    except ValueError as error:
        raise prefixed(op, error) from None


def pairs(op: str, **lists) -> None:
    """Each int list is a (rows, columns) pair."""
    for name, value in lists.items():
        if len(value) != 2:
            fail(op, ValueError, f"{name} must be a (rows, columns) pair, got {list(value)}")


def positive(op: str, **lists) -> None:
    for name, value in lists.items():
        if value[0] < 1 or value[1] < 1:
            fail(op, ValueError, f"{name} must be positive, got {list(value)}")


def non_negative(op: str, **lists) -> None:
    for name, value in lists.items():
        if value[0] < 0 or value[1] < 0:
            fail(op, ValueError, f"{name} must be non-negative, got {list(value)}")


def conv2d(op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation,
           groups: int) -> tuple[int, int]:
    """The convolution's contract (conv2d's and the fused op's): x (N, C, H, W) floating, weight
    (K, C / groups, R, S) and bias (K,) or None of x's dtype and device, positive stride and
    dilation, non-negative padding, groups dividing C and K, a window that fits the padded input.
    Returns the output's (OH, OW)."""
    dims(op, "x", x, 4, "(N, C, H, W)")
    dims(op, "weight", weight, 4, "(K, C / groups, R, S)")
    floating(op, "x", x)
    same(op, "x", x, weight=weight, bias=bias)
    pairs(op, stride=stride, padding=padding, dilation=dilation)
    positive(op, stride=stride, dilation=dilation)
    non_negative(op, padding=padding)
    k = weight.shape[0]
    if groups < 1 or k % groups:
        fail(op, ValueError, f"groups must be a positive divisor of weight's {k} output channels, got {groups}")
    if weight.shape[1] * groups != x.shape[1]:
        fail(op, ShapeError, f"x has {x.shape[1]} channels but weight of shape {tuple(weight.shape)} with "
                             f"groups={groups} expects {weight.shape[1] * groups}")
    shape(op, "bias", bias, (k,), "(K,)")
    out = []
    for d in range(2):
        extent = x.shape[2 + d] + 2 * padding[d] - dilation[d] * (weight.shape[2 + d] - 1) - 1
        if extent < 0:
            fail(op, ValueError, f"weight's window {tuple(weight.shape[2:])} (dilation {list(dilation)}) is larger "
                                 f"than the padded input {tuple(x.shape[2:])} (padding {list(padding)})")
        out.append(extent // stride[d] + 1)
    return out[0], out[1]


def needs(op: str, value) -> None:
    if len(value) != 3:
        fail(op, ValueError, f"needs must be three flags (input, weight, bias), got {list(value)}")


def window(op: str, kernel, stride, padding, dilation) -> None:
    """A pooling window: (rows, columns) pairs, positive kernel, stride and dilation, and
    non-negative padding."""
    pairs(op, kernel=kernel, stride=stride, padding=padding, dilation=dilation)
    positive(op, kernel=kernel, stride=stride, dilation=dilation)
    non_negative(op, padding=padding)


def indices_for(op: str, name: str, indices: torch.Tensor, dtype: torch.dtype, grad: torch.Tensor,
                layout: str) -> None:
    """``indices`` (a pooling backward's positions) is of ``dtype``, on ``grad``'s device and of
    its shape (``layout`` naming its dimensions): one position per gradient element."""
    if indices.dtype != dtype:
        fail(op, DTypeError, f"{name} must be {str(dtype).removeprefix('torch.')}, got dtype {indices.dtype}")
    if indices.device != grad.device:
        fail(op, DeviceError, f"{name} is on {indices.device} but grad is on {grad.device}")
    shape(op, name, indices, grad.shape, f"grad's {layout}")


def indices_below(op: str, name: str, indices: torch.Tensor, bound: int, meaning: str) -> None:
    """Every value of ``indices`` is below ``bound``: the one check that reads data, for an op
    whose kernels write at the position an index gives (one reduction over the indices). Off
    the CPU the comparison is asserted on the device, as torch's own CUDA kernels check an index,
    instead of waiting for the device in the middle of a graph."""
    if indices.numel() == 0:
        return
    top = indices.max()
    if indices.device.type != "cpu":
        torch._assert_async(top < bound, f"fastml::{op}: {name} must be below {bound} ({meaning})")
    elif top.item() >= bound:
        fail(op, ValueError, f"{name} holds {top.item()}, but must be below {bound} ({meaning})")


def class_targets(op: str, target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Every class index in ``target`` is in [0, num_classes) or ignore_index, as a row kernel
    reads and writes the row's element at its target: IndexError with torch's message, as the
    forward's check (cross_entropy.loss_scale) raises. A reduction to the range first; the rows
    are searched only where it leaves [0, num_classes). Off the CPU, asserted on the device."""
    if target.numel() == 0:
        return
    if target.device.type != "cpu":  # asserted on the device, as indices_below: no wait mid-graph
        valid = ((target >= 0) & (target < num_classes)) | (target == ignore_index)
        torch._assert_async(valid.all(), f"fastml::{op}: a target is out of bounds (class indices in "
                                         f"[0, {num_classes}) or ignore_index={ignore_index})")
        return
    low, high = torch.aminmax(target)
    if low >= 0 and high < num_classes:
        return
    bad = target[(target != ignore_index) & ((target < 0) | (target >= num_classes))]
    if bad.numel():
        fail(op, IndexError, f"Target {bad[0].item()} is out of bounds (target must hold class indices in "
                             f"[0, {num_classes}) or ignore_index={ignore_index})")


def class_target(op: str, first_name: str, first: torch.Tensor, m: int, c: int, target: torch.Tensor,
                 class_weight: torch.Tensor | None, label_smoothing: float) -> None:
    """The cross-entropy's target and options for M rows of C classes, ``first`` the tensor whose
    dtype and device they share: target (M,) int64 class indices or (M, C) probabilities of that
    dtype, class_weight (C,) or None, label_smoothing in [0, 1]."""
    if target.dtype == torch.int64:
        shape(op, "target", target, (m,), "(M,) class indices")
    elif target.dtype.is_floating_point:
        same(op, first_name, first, target=target)
        shape(op, "target", target, (m, c), "(M, C) probabilities")
    else:
        fail(op, DTypeError, f"target must be int64 class indices or floating-point probabilities, "
                             f"got dtype {target.dtype}")
    same(op, first_name, first, class_weight=class_weight)
    shape(op, "class_weight", class_weight, (c,), "(C,)")
    if not 0.0 <= label_smoothing <= 1.0:
        fail(op, ValueError, f"label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")


def same_lengths(op: str, first_name: str, first, **others) -> None:
    """Lists of tensors of one length (an optimizer's parameters, gradients and state)."""
    for name, tensors in others.items():
        if len(tensors) != len(first):
            fail(op, ValueError, f"{name} has {len(tensors)} entries but {first_name} has {len(first)}")


def same_shapes(op: str, first_name: str, first, **others) -> None:
    """Each tensor of each list in ``others`` has the shape of its counterpart in ``first`` (lists
    of one length): a kernel walks a row as its parameter's element count. One comparison of
    the lists of shapes, the row searched only where they differ."""
    shapes = list(map(_shape, first))
    for name, tensors in others.items():
        if list(map(_shape, tensors)) != shapes:
            i = next(i for i, t in enumerate(tensors) if t.shape != shapes[i])
            fail(op, ShapeError, f"{name}[{i}] has shape {tuple(tensors[i].shape)} but {first_name}[{i}] has "
                                 f"{tuple(shapes[i])}")
