"""Data for the course's models: a synthetic linear-regression data set and an in-memory
minibatch iterator.

``synthetic_linear`` is the course's ``synthetic_data``; ``batches`` replaces its ``data_iter``
(and a ``DataLoader`` over a ``TensorDataset``) without any per-example Python work: one
``randperm`` and one gather per tensor per pass, then each minibatch is a view.

>>> X, y = fastml.data.synthetic_linear([2, -3.4], 4.2, 1000)
>>> for Xb, yb in fastml.data.batches(X, y, batch_size=10):
...     ...
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = ["Batches", "InvalidArgumentError", "batches", "synthetic_linear"]


class InvalidArgumentError(ValueError, TypeError):
    """An argument has the wrong type or value (a ValueError and a TypeError, as scikit-learn's
    InvalidParameterError), with a message naming the argument."""


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_positive_int(name: str, value) -> int:
    if not _is_int(value) or value <= 0:
        raise InvalidArgumentError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_nonnegative_int(name: str, value) -> int:
    if not _is_int(value) or value < 0:
        raise InvalidArgumentError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def _check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise InvalidArgumentError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def _randperm(n: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """A random permutation of range(n) on ``device``, drawn from ``generator`` (which may live on
    another device: the permutation is drawn there, so a seed reproduces it, then moved)."""
    if generator is None:
        return torch.randperm(n, device=device)
    return torch.randperm(n, generator=generator, device=generator.device).to(device)


def synthetic_linear(w, b, num_examples: int, noise_std: float = 0.01,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The course's ``synthetic_data``: features X ~ N(0, 1) of shape (num_examples, len(w)) and
    labels y = X @ w + b + N(0, noise_std²) of shape (num_examples, 1).

    w: the true weights, 1-D (a list, numpy array or tensor); b: the true bias, a number or a
    0-dim (or one-element) tensor. The result is float32 on the CPU, unless w is a floating-point
    tensor: then it has w's dtype and device. Draws come from ``generator`` when given (X first,
    then the noise, as the course), otherwise from torch's global generator.
    """
    num_examples = _check_nonnegative_int("num_examples", num_examples)
    if isinstance(noise_std, bool) or not isinstance(noise_std, numbers.Real) or not noise_std >= 0:
        raise InvalidArgumentError(f"noise_std must be a non-negative number, got {noise_std!r}")
    _check_generator(generator)
    if isinstance(w, torch.Tensor):
        if w.is_complex():  # (as a complex list is refused: the model is real)
            raise InvalidArgumentError(f"w must be real, got a tensor of dtype {w.dtype}")
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        w = w.detach().to(dtype)
    else:
        try:
            w = torch.as_tensor(w, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InvalidArgumentError(f"w must be a 1-D list, numpy array or tensor of numbers ({exc})") from None
    if w.dim() != 1:
        raise InvalidArgumentError(f"w must be 1-D (num_features,), got shape {tuple(w.shape)}")
    if isinstance(b, torch.Tensor):
        if b.numel() != 1:
            raise InvalidArgumentError(f"b must be a number or a 0-dim tensor, got shape {tuple(b.shape)}")
        b = b.detach().reshape(()).to(device=w.device, dtype=w.dtype)
    elif isinstance(b, numbers.Real) and not isinstance(b, bool):
        b = float(b)
    else:
        raise InvalidArgumentError(f"b must be a number or a 0-dim tensor, got {type(b).__name__}")

    draw_device = generator.device if generator is not None else w.device
    X = torch.randn(num_examples, w.shape[0], generator=generator, device=draw_device, dtype=w.dtype)
    noise = torch.randn(num_examples, 1, generator=generator, device=draw_device, dtype=w.dtype)
    X, noise = X.to(w.device), noise.to(w.device)
    y = (X @ w).unsqueeze(1) + b + noise * noise_std
    return X, y


class Batches:
    """Minibatches of in-memory tensors, re-iterable like a ``DataLoader``: each ``iter()`` is one
    pass over the data (reshuffled when ``shuffle``), ``len()`` the number of minibatches.

    Every minibatch is a tuple with one slice per tensor, in the order given (a tuple even for a
    single tensor: ``for (X,) in batches(X, batch_size=8)``), on the tensors' device.

    With ``shuffle``, each pass draws one ``randperm`` (on the tensors' device). Then, for data up
    to ``COPY_LIMIT_BYTES`` on the CPU (and for any size on a GPU), every tensor is gathered once in
    that order and the minibatches are views of that copy: one gather per tensor per pass, not one
    per minibatch (1000×2 floats, batch 10: 0.35 ms a pass against 0.58 ms). Larger CPU data is
    gathered minibatch by minibatch instead, which keeps each gathered minibatch in cache and
    allocates no second copy of the data set (65536×256, batch 256: 8 ms against 25 ms). On a GPU
    the single gather wins at every size (H100, 65536×256, batch 256: 2.2 ms against 7.2 ms). Without
    ``shuffle`` the minibatches are views of the inputs themselves, in order: writing into one
    writes into the input.
    """

    COPY_LIMIT_BYTES = 4 * 2**20

    def __init__(self, *tensors: torch.Tensor, batch_size: int, shuffle: bool = True, drop_last: bool = False,
                 generator: torch.Generator | None = None) -> None:
        if not tensors:
            raise InvalidArgumentError("tensors: batches() needs at least one tensor")
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise InvalidArgumentError(f"tensors[{i}] must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() == 0:
                raise InvalidArgumentError(f"tensors[{i}] is 0-dim: every tensor needs a first (example) dimension")
        n = tensors[0].shape[0]
        for i, t in enumerate(tensors[1:], start=1):
            if t.shape[0] != n:
                raise InvalidArgumentError(f"tensors must have the same first dimension (number of examples): "
                                           f"tensors[0] has {n}, tensors[{i}] has {t.shape[0]}")
            if t.device != tensors[0].device:
                raise InvalidArgumentError(f"tensors must be on one device: tensors[0] is on {tensors[0].device}, "
                                           f"tensors[{i}] on {t.device}")
        _check_generator(generator)
        self.tensors = tensors
        self.batch_size = _check_positive_int("batch_size", batch_size)
        self.shuffle, self.drop_last, self.generator = bool(shuffle), bool(drop_last), generator
        self.num_examples = n

    def __len__(self) -> int:
        n, bs = self.num_examples, self.batch_size
        return n // bs if self.drop_last else math.ceil(n / bs)

    def __iter__(self):
        n, bs = self.num_examples, self.batch_size
        tensors = self.tensors
        stop = n - n % bs if self.drop_last else n
        if self.shuffle and n > 1:
            order = _randperm(n, tensors[0].device, self.generator)
            nbytes = sum(t.numel() * t.element_size() for t in tensors)
            if tensors[0].device.type == "cpu" and nbytes > self.COPY_LIMIT_BYTES:
                for start in range(0, stop, bs):
                    rows = order[start:start + bs]
                    yield tuple(t.index_select(0, rows) for t in tensors)
                return
            tensors = tuple(t.index_select(0, order) for t in tensors)
        for start in range(0, stop, bs):
            yield tuple(t[start:start + bs] for t in tensors)

    def __repr__(self) -> str:
        shapes = ", ".join(str(tuple(t.shape)) for t in self.tensors)
        return (f"Batches({shapes}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
                f"drop_last={self.drop_last}, batches={len(self)})")


def batches(*tensors: torch.Tensor, batch_size: int, shuffle: bool = True, drop_last: bool = False,
            generator: torch.Generator | None = None) -> Batches:
    """Minibatches of ``tensors`` (all with the same first dimension), the course's ``data_iter``:

    >>> for X, y in batches(features, labels, batch_size=10):
    ...     loss = squared_loss(linreg(X, w, b), y)

    batch_size: a positive int; the last minibatch is shorter unless ``drop_last``. shuffle:
    a new random order on every pass, drawn from ``generator`` (a torch.Generator) when given.
    Returns a re-iterable ``Batches`` with ``len()``; see there.
    """
    return Batches(*tensors, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, generator=generator)
