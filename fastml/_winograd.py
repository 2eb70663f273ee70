"""Winograd F(2x2, 3x3) convolution: a variant a layer's measured choice may run for a 3x3,
stride-1 convolution on channels-last input, in inference (``convolution``) and in training
(``differentiable_convolution``: torch's own backward).

A direct 3x3 convolution takes 36 multiply-adds per 2x2 block of outputs per channel pair;
Winograd's minimal filtering (Lavin & Gray 2015) takes 16: each 4x4 input window and each 3x3
filter are transformed (B^T d B, G g G^T), multiplied elementwise and summed over input channels,
and the 4x4 product transformed back (A^T m A). The sum over channels is 16 independent matrix
products (tiles x C)·(C x K), the flops that remain: fastml hands them to oneDNN as one grouped
1x1 convolution on a weight packed once (the "plain matrix product that torch's BLAS does
better"), and keeps the two transforms in C++ (csrc/winograd.cpp), the bias and ReLU in the
output transform's epilogue. On a 2-core Zen 4 the grouped product runs at 0.6 to 0.8 of the
direct convolution's flop rate for 2.25x fewer flops.

Accuracy: the input and output transforms have entries 0 and ±1 (no rounding beyond their
sums); the weight transform (entries ±1/2) is done in float64 and rounded once. Against a
float64 reference the error measured 1.2x to 1.5x a direct float32 convolution's. F(4x4, 3x3),
4x fewer multiplies, was left out: its transforms' larger entries (up to 8, 1/24) make its error
20x to 30x the direct convolution's, which a drop-in should not add.

Non-finite values: 0 · inf is NaN, and each tile's transforms mix its whole 4x4 window, so an
inf or NaN in the input or weight reaches other outputs, or other values, than in a direct
convolution. The output transform reports whether every output came out finite; where one did
not, the convolution is computed again directly (oneDNN, as torch's), so such input gets torch's
answer, at the cost of a second convolution only for it.

The tiles go through in chunks whose transformed input and products fit in half the last-level
cache the CPU reports (``chunk_tiles``), so each chunk's 16 products read what the input
transform just wrote from cache, not memory.
"""

from __future__ import annotations

import functools
import os

import torch

from fastml import _conv_backward, _cpp, _onednn, _route
from fastml.ops import relu_in_place

WEIGHT_ATTR = "_fastml_winograd_weight"
_route.DERIVED_WEIGHT_ATTRS.add(WEIGHT_ATTR)
MIN_CHUNK_TILES = 256  # below this, each chunk's product re-reads the transformed weight for too few rows

# G of F(2x2, 3x3): the filter transform U = G g G^T (csrc/winograd.cpp applies it; the tests check it against this)
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def applies(conv: torch.nn.Conv2d, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether ``convolution`` (no gradient wanted) or ``differentiable_convolution`` computes
    ``conv``'s convolution of ``input`` as torch's module would: where oneDNN's packed
    convolution can (channels-last float32 input on the CPU, zero padding given as numbers, no
    graph being traced), for a 3x3 kernel, stride 1, dilation 1, one group, and an output of at
    least one pixel."""
    if tuple(conv.kernel_size) != (3, 3) or tuple(conv.stride) != (1, 1) or tuple(conv.dilation) != (1, 1):
        return False
    if conv.groups != 1 or not _onednn.packable(conv, input, weight, bias) or not _kernels_built():
        return False
    ph, pw = conv.padding
    return input.shape[2] + 2 * ph >= 3 and input.shape[3] + 2 * pw >= 3


@functools.cache
def _kernels_built() -> bool:
    """Whether fastml._C has the transforms (a build without the extension, or an older one, not)."""
    try:
        _cpp.kernel("winograd_f2_input", torch.float32)
        _cpp.kernel("winograd_f2_weight", torch.float32)
        return True
    except (ImportError, AttributeError):
        return False


@functools.cache
def last_level_cache_bytes() -> int:
    """The largest data cache the CPU reports (sysconf, then sysfs); 8 MiB where none is."""
    for name in ("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
        try:
            size = os.sysconf(name)
        except (ValueError, OSError, AttributeError):
            size = 0
        if size and size > 0:
            return size
    sizes = []
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for index in os.listdir(base):
            try:
                with open(os.path.join(base, index, "type")) as f:
                    if f.read().strip() == "Instruction":
                        continue
                with open(os.path.join(base, index, "size")) as f:
                    text = f.read().strip().upper()
                scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
                sizes.append(int(text.rstrip("KMG")) * scale)
            except (OSError, ValueError):
                continue
    except OSError:
        pass
    return max(sizes, default=8 << 20)


def chunk_tiles(c: int, k: int, tiles: int) -> int:
    """Tiles per chunk: their transformed input (16 x c floats each) and products (16 x k) in half
    the last-level cache, at least MIN_CHUNK_TILES, at most all."""
    per_tile = 16 * (c + k) * 4
    return max(1, min(tiles, max(MIN_CHUNK_TILES, last_level_cache_bytes() // 2 // per_tile)))


class _TransformedWeight:
    """A layer's transformed, packed weight and what it came from; derived state, which a copy or
    a pickle of the layer starts without."""
    __slots__ = ("source", "key", "grouped", "packed")

    def __init__(self) -> None:
        self.source = self.key = self.grouped = None
        self.packed = {}

    def __reduce__(self):
        return _TransformedWeight, ()

    def __deepcopy__(self, memo):
        return _TransformedWeight()


def transform_weight(weight: torch.Tensor) -> torch.Tensor:
    """(K, C, 3, 3) → (16 K, C, 1, 1): G g G^T of each filter, in float64 rounded once, laid out
    as the weight of a 16-group 1x1 convolution (group p holds position p of every filter), by
    fastml's C++ kernel (``applies`` needs it built). A training step pays it: 2-3 ms for 512x512
    filters where torch's float64 einsum took 90 ms on a 2-core Zen 3."""
    k, c = weight.shape[:2]
    source = weight.detach().contiguous()
    u = torch.empty((16 * k, c, 1, 1), dtype=source.dtype)
    _cpp.kernel("winograd_f2_weight", source.dtype)(source.data_ptr(), k, c, u.data_ptr(), _cpp.threads())
    return u


def _packed(conv: torch.nn.Conv2d, weight: torch.Tensor, chunk_shape: tuple) -> torch.Tensor:
    cache = conv.__dict__.get(WEIGHT_ATTR)
    if cache is None:
        cache = _TransformedWeight()
        object.__setattr__(conv, WEIGHT_ATTR, cache)  # a plain attribute: not state, not a buffer
    # a weight transformed in inference mode is an inference tensor: kept apart from one outside
    state = _route.state_key(weight)  # None: derived anew at every call
    key = None if state is None else (state, torch.is_inference_mode_enabled())
    # The source is held with its transform, so (identity, storage, version) names one weight.
    if key is None or cache.source is not weight or cache.key != key:
        cache.grouped, cache.packed = transform_weight(weight), {}
        cache.source, cache.key = weight, key
    packed = cache.packed.get(chunk_shape)
    if packed is None:
        reorder = _onednn.ops()[0]
        packed = cache.packed[chunk_shape] = reorder(cache.grouped, [0, 0], [1, 1], [1, 1], 16, list(chunk_shape))
    return packed


def convolution(conv: torch.nn.Conv2d, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                relu: bool) -> torch.Tensor:
    """``conv``'s convolution of ``input`` (then ReLU if ``relu``) by Winograd F(2x2, 3x3), in
    torch's output layout for such input (channels-last), without autograd. Only where
    ``applies``."""
    n, c, h, w = input.shape
    k = weight.shape[0]
    ph, pw = conv.padding
    oh, ow = h + 2 * ph - 2, w + 2 * pw - 2
    tiles_h, tiles_w = (oh + 1) // 2, (ow + 1) // 2
    tiles = n * tiles_h * tiles_w
    out = torch.empty((n, k, oh, ow), dtype=input.dtype, memory_format=torch.channels_last)
    chunk = chunk_tiles(c, k, tiles)
    scratch = torch.empty(chunk * 16 * c, dtype=input.dtype)
    transform_input = _cpp.kernel("winograd_f2_input", input.dtype)
    transform_output = _cpp.kernel("winograd_f2_output", input.dtype)
    convolve = _onednn.ops()[1]
    bias = None if bias is None else bias.detach().contiguous()  # held: the kernel reads its address
    bias_address = 0 if bias is None else bias.data_ptr()
    threads = _cpp.threads()
    for first in range(0, tiles, chunk):
        count = min(chunk, tiles - first)
        # (count, 16, c) in memory: a channels-last (1, 16 c, count, 1) image for the grouped product
        v = scratch[:count * 16 * c].view(1, count, 1, 16 * c).permute(0, 3, 1, 2)
        transform_input(input.data_ptr(), n, h, w, c, ph, pw, tiles_h, tiles_w, first, count, v.data_ptr(), threads)
        m = convolve(v, _packed(conv, weight, tuple(v.shape)), None, [0, 0], [1, 1], [1, 1], 16, "none", [], "")
        if not m.is_contiguous(memory_format=torch.channels_last):
            m = m.contiguous(memory_format=torch.channels_last)
        finite = transform_output(m.data_ptr(), bias_address, relu, oh, ow, k, tiles_h, tiles_w, first, count,
                                  out.data_ptr(), threads)
        if not finite:  # an inf or NaN spreads otherwise than in torch's: see the module docstring
            return _onednn.packed_convolution(conv, input, weight, bias, relu)
    return out


def differentiable_convolution(conv: torch.nn.Conv2d, input: torch.Tensor, weight: torch.Tensor,
                               bias: torch.Tensor | None, relu: bool) -> torch.Tensor:
    """``convolution`` with gradients: the forward by Winograd, the backward torch's own
    convolution backward (the one its module's autograd runs), so the gradients are torch's for
    the same upstream gradient. In training the weight changes every step, and its transform
    and packing are redone each step (about 2 ms and 5 ms for 512x512 filters on a 2-core Zen 3):
    the measured choice times training calls with that cost in (_route.retimes_derived_weights).
    The ReLU runs in place after, as torch's sequence does."""
    out = _conv_backward.with_torch_backward(conv, lambda x, w, b: convolution(conv, x, w, b, False),
                                             input, weight, bias)
    return relu_in_place(out) if relu else out
