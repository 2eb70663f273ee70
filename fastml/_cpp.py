"""Helpers for calling fastml._C: tensors cross as data pointers, chosen by dtype."""

from __future__ import annotations

import functools

import torch

_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


@functools.cache
def kernel(name: str, dtype: torch.dtype):
    """The compiled kernel ``name`` for ``dtype`` (float32 or float64), looked up once."""
    from fastml import _C

    return getattr(_C, f"{name}_{_SUFFIX[dtype]}")


def ptr(tensor: torch.Tensor | None) -> int:
    """Data pointer of a contiguous tensor, 0 for an absent one."""
    return 0 if tensor is None else tensor.data_ptr()


threads = torch.get_num_threads


def addresses(tensors) -> list[int]:
    """The tensors' data pointers, as a list (pybind11 takes it as a std::vector)."""
    return [t.data_ptr() for t in tensors]
