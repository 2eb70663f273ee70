"""One package per op: the autograd.Function and per-backend dispatch in ``__init__``, the
pure-PyTorch oracle in ``reference``, and one module per kernel backend (``cpp_impl``,
``numba_impl``, ``triton_impl``) exposing the same functions with the same signatures."""

from __future__ import annotations

import torch
from torch.autograd import forward_ad


def tracks_gradients(*tensors: torch.Tensor | None) -> bool:
    """Whether a call must go through its autograd.Function: reverse mode (grad enabled and an
    input requiring grad) or forward mode (inside a dual level, whose dual tensors need not
    require grad). Otherwise the kernels run directly, without autograd's bookkeeping."""
    if torch.is_grad_enabled():
        for t in tensors:  # a plain loop: any() over a generator costs ~1 µs at batch 10
            if t is not None and t.requires_grad:
                return True
    return forward_ad_active()


def forward_ad_active() -> bool:
    """Whether a forward-mode AD dual level is open (torch.autograd.forward_ad.dual_level)."""
    return getattr(forward_ad, "_current_level", -1) >= 0


def backward_in_torch_ops(grad: torch.Tensor) -> bool:
    """Whether a Function's backward must run the reference's torch ops, which autograd and vmap
    see through, rather than kernels: under create_graph (double backward: grad mode is on inside
    backward), under a torch.func transform, or for a batched gradient without storage
    (gradcheck's batched check runs backward under the legacy vmap)."""
    return (torch.is_grad_enabled() or torch._C._are_functorch_transforms_active()
            or not _has_storage(grad))


def backward_backend(forward_backend: str, grad: torch.Tensor) -> str:
    """The backend a Function's backward runs on: the forward's, unless backward_in_torch_ops."""
    return "reference" if backward_in_torch_ops(grad) else forward_backend


_has_storage = getattr(torch._C, "_has_storage", lambda t: True)

is_compiling = getattr(torch.compiler, "is_compiling", None) or (lambda: False)
"""Whether torch.compile / torch.export's dynamo is tracing (torch >= 2.3; never, before)."""

LIBRARY = all(hasattr(torch.library, name) for name in ("custom_op", "register_fake", "register_autograd"))
"""Whether this torch (>= 2.4) has torch.library.custom_op: fastml/_library.py then registers
every op as fastml::<op> (ops/<op>/library.py), which torch.compile and torch.export trace."""


def in_custom_op_graph() -> bool:
    """Whether a call is being traced into a graph (torch.compile, torch.export) and goes to
    torch.ops.fastml.<op>, whose implementation picks the backend and runs the same kernels when
    the graph runs. Eager calls stay on the autograd.Functions, because a custom op's dispatch
    costs ~6 µs more per call without autograd and ~30 µs more per forward + backward (batch
    10, torch 2.13, CPU: linear 11.7 against 5.7 µs without grad, 63 against 35 µs with;
    linear_mse 65 against 32 µs), too much beside a whole softmax-regression step of ~130 µs.
    This check costs ~65 ns."""
    return LIBRARY and is_compiling()


def needs_grad(*tensors: torch.Tensor | None) -> tuple[bool, ...]:
    """Per tensor, whether the graph being traced wants its gradient: what an autograd.Function's
    ctx.needs_input_grad will say, known before the call (a custom op's forward is told)."""
    grad = torch.is_grad_enabled()
    return tuple(grad and t is not None and t.requires_grad for t in tensors)


def placeholder(like: torch.Tensor) -> torch.Tensor:
    """An empty tensor where a custom op has nothing to return (its schema has no optional
    outputs): of ``like``'s dtype and device, shape (0,)."""
    return like.new_empty(0)


def or_placeholder(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return placeholder(like) if t is None else t


def gradient_outputs(grads, needs, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A backend's gradients as a custom op returns them: the placeholder for each one not
    asked for (``needs``, one flag per gradient)."""
    return tuple(or_placeholder(g if need else None, like) for g, need in zip(grads, needs))


def gradient_fakes(like: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, needs) -> tuple[torch.Tensor, ...]:
    """A layer's uninitialised (grad_x, grad_weight, grad_bias), the bias being weight's first
    dimension, of ``like``'s dtype and device: the placeholder for each one not asked for."""
    shapes = (x.shape, weight.shape, weight.shape[:1])
    return tuple(like.new_empty(shape) if need else placeholder(like) for shape, need in zip(shapes, needs))


def asked(grads, needs) -> tuple[torch.Tensor | None, ...]:
    """Gradients as autograd takes them: None for each one not asked for (whatever a custom op
    returned there)."""
    return tuple(g if need else None for g, need in zip(grads, needs))


def contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()
