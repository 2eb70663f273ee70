"""2-D max pooling in Triton; signatures and semantics as in reference.py.

Both kernels cut the work into tiles of [BLOCK_P planes, BLOCK output positions] (a plane is one
(sample, channel) pair; positions are oh·OW + ow, row-major), one program per tile on a 1-D grid
(positions fastest, so neighbouring programs read neighbouring input): the plane count N·C can pass
the 65535 limit of the second and third grid axes. BLOCK covers a plane's outputs where it can and
BLOCK_P fills the rest of the tile with planes, so small late-network maps (7×7) still give full
tiles.

forward: each program walks the KH·KW window offsets row by row (runtime loops: no recompilation
per kernel size, no unrolling of a large one), loading one input value per output of the tile
per offset, and keeps the running maximum (float32 for float16 / bfloat16 inputs: the maximum of
values is exact in either) and its int64 flat index ih·W + iw. The rule is reference.py's: the
first element inside the input is taken unconditionally, then a value replaces the maximum when it
is greater or NaN; padding is masked out and takes no part.

backward: each program reads a tile of gradients and their indices and adds them into the input
gradient with atomics (overlapping windows send several gradients to one input), in float32 for
float16 / bfloat16 gradients (cast once at the end), in the gradient's dtype otherwise. The
order of the additions on the GPU is not fixed, so overlapping windows may differ from the
reference by rounding; disjoint windows give one addition per input, exact.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastml import _triton as tt
from fastml.ops.max_pool2d.reference import empty_outputs

# Elements per tile (BLOCK_P · BLOCK): on the GPU 1024 (8 per thread of 4 warps); under the
# interpreter a small tile, so that the small maps of the tests still span several programs and
# exercise the masks on both axes.
TILE = 1024
INTERPRETER_TILE = 256
MAX_BLOCK = 512
INTERPRETER_MAX_BLOCK = 64
NUM_WARPS = 4


@triton.jit
def _max_pool2d_forward_kernel(
    x_ptr,    # (N·C, H, W) input planes, contiguous
    out_ptr,  # (N·C, OH, OW) maxima, x's dtype
    idx_ptr,  # (N·C, OH, OW) int64: flat index ih·W + iw of each maximum within its plane
    planes, H, W, OH, OW,
    KH, KW, SH, SW, PH, PW, DH, DW,  # window: size, stride, padding, dilation (rows, columns)
    ACC: tl.constexpr,  # comparison dtype: float32 for float16 / bfloat16, else x's dtype
    BLOCK_P: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    n_outputs = OH * OW
    tiles = tl.cdiv(n_outputs, BLOCK)
    plane = (pid // tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    pos = (pid % tiles) * BLOCK + tl.arange(0, BLOCK)
    plane_ok = plane < planes
    pos_ok = pos < n_outputs
    oh = pos // OW
    ow = pos % OW
    x_plane = plane.to(tl.int64) * H * W  # planes·H·W may pass 2**31
    best = tl.full([BLOCK_P, BLOCK], float("-inf"), ACC)
    index = tl.full([BLOCK_P, BLOCK], -1, tl.int64)  # -1: nothing inside the input seen yet
    for i in range(KH):
        ih = oh * SH - PH + i * DH
        row_ok = pos_ok & (ih >= 0) & (ih < H)
        row_start = ih.to(tl.int64) * W
        for j in range(KW):
            iw = ow * SW - PW + j * DW
            inside = row_ok & (iw >= 0) & (iw < W)
            spatial = row_start + iw
            mask = plane_ok[:, None] & inside[None, :]
            value = tl.load(x_ptr + x_plane[:, None] + spatial[None, :], mask=mask, other=float("-inf")).to(ACC)
            take = mask & ((value > best) | (value != value) | (index < 0))  # noqa: PLR0124 (NaN test)
            best = tl.where(take, value, best)
            index = tl.where(take, spatial[None, :], index)
    out_at = plane.to(tl.int64)[:, None] * n_outputs + pos[None, :]
    out_mask = plane_ok[:, None] & pos_ok[None, :]
    tl.store(out_ptr + out_at, best.to(out_ptr.dtype.element_ty), mask=out_mask)
    tl.store(idx_ptr + out_at, index, mask=out_mask)


@triton.jit
def _max_pool2d_backward_kernel(
    grad_ptr,        # (N·C, OH, OW) gradient of the outputs, contiguous
    idx_ptr,         # (N·C, OH, OW) int64: flat index of each output's maximum within its plane
    grad_input_ptr,  # (N·C, H, W) zero-initialised, accumulation dtype (float32 for half types)
    planes, n_outputs, n_inputs,  # n_outputs = OH·OW, n_inputs = H·W
    BLOCK_P: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles = tl.cdiv(n_outputs, BLOCK)
    plane = (pid // tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    pos = (pid % tiles) * BLOCK + tl.arange(0, BLOCK)
    mask = (plane < planes)[:, None] & (pos < n_outputs)[None, :]
    at = plane.to(tl.int64)[:, None] * n_outputs + pos[None, :]
    grad = tl.load(grad_ptr + at, mask=mask, other=0).to(grad_input_ptr.dtype.element_ty)
    index = tl.load(idx_ptr + at, mask=mask, other=-1)
    # An index of -1 (a window with no element inside the input) has nowhere to go.
    target = grad_input_ptr + plane.to(tl.int64)[:, None] * n_inputs + index
    tl.atomic_add(target, grad, mask=mask & (index >= 0), sem="relaxed")


def _tiling(planes: int, n_outputs: int) -> tuple[int, int, tuple[int]]:
    """(BLOCK_P, BLOCK, grid) for tiles over ``planes`` planes of ``n_outputs`` positions."""
    interpreted = tt.interpreted()
    tile = INTERPRETER_TILE if interpreted else TILE
    block = tt.block(n_outputs, 1, INTERPRETER_MAX_BLOCK if interpreted else MAX_BLOCK)
    block_p = tt.block(planes, 1, max(1, tile // block))
    grid = (triton.cdiv(planes, block_p) * triton.cdiv(n_outputs, block),)
    return block_p, block, grid


def forward(x, kernel, stride, padding, dilation, ceil_mode):
    x = x.contiguous()
    out, indices = empty_outputs(x, kernel, stride, padding, dilation, ceil_mode)
    n, c, oh, ow = out.shape
    h, w = x.shape[2:]
    if out.numel() == 0:
        return out, indices
    planes = n * c
    block_p, block, grid = _tiling(planes, oh * ow)
    _max_pool2d_forward_kernel[grid](
        x, out, indices, planes, h, w, oh, ow,
        kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        ACC=tt.acc_dtype(x.dtype), BLOCK_P=block_p, BLOCK=block, num_warps=NUM_WARPS)
    return out, indices


def backward(grad, indices, height, width):
    grad = grad.contiguous()
    indices = indices.contiguous()
    n, c, oh, ow = grad.shape
    grad_input = torch.zeros((n, c, height, width), dtype=tt.torch_acc_dtype(grad.dtype), device=grad.device)
    if grad.numel() and grad_input.numel():
        planes = n * c
        block_p, block, grid = _tiling(planes, oh * ow)
        _max_pool2d_backward_kernel[grid](grad, indices, grad_input, planes, oh * ow, height * width,
                                          BLOCK_P=block_p, BLOCK=block, num_warps=NUM_WARPS)
    return grad_input.to(grad.dtype)
