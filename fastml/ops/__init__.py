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
