"""Helpers for calling fastml._C: tensors cross as data pointers, chosen by dtype."""

from __future__ import annotations

import torch

_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def kernel(name: str, dtype: torch.dtype):
    """The compiled kernel ``name`` for ``dtype`` (float32 or float64)."""
    from fastml import _C

    return getattr(_C, f"{name}_{_SUFFIX[dtype]}")


def ptr(tensor: torch.Tensor | None) -> int:
    """Data pointer of a contiguous tensor, 0 for an absent one."""
    return 0 if tensor is None else tensor.data_ptr()


def threads() -> int:
    return torch.get_num_threads()
