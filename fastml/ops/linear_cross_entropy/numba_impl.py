"""Linear + cross-entropy on the numba row kernel (fastml.ops.cross_entropy.numba_impl), chunk by
chunk (chunked.py); signatures as in reference.py."""

from __future__ import annotations

import functools

from fastml.ops.cross_entropy import numba_impl as rows_kernels
from fastml.ops.linear_cross_entropy import chunked

forward = functools.partial(chunked.forward, rows_kernels)
backward = functools.partial(chunked.backward, rows_kernels)
