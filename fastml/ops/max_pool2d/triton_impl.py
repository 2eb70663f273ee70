"""2-D max pooling in Triton; signatures and semantics as in reference.py.

The kernels cut the work into tiles of [BLOCK_P planes, BLOCK positions] (``_tile``; a plane is
one (sample, channel) pair; positions are row-major: the outputs oh·OW + ow going forward and in
the scatter, the inputs ih·W + iw in the gather), one program per tile on a 1-D grid
(positions fastest, so neighbouring programs read neighbouring input): the plane count N·C can pass
the 65535 limit of the second and third grid axes. BLOCK covers a plane's positions where it can and
BLOCK_P fills the rest of the tile with planes, so small late-network maps (7×7) still give full
tiles.

forward: each program walks the KH·KW window offsets row by row (runtime loops: no recompilation
per kernel size, no unrolling of a large one), loading one input value per output of the tile
per offset, and keeps the running maximum (float32 for float16 / bfloat16 inputs: the maximum of
values is exact in either) and its int64 flat index ih·W + iw. The rule is reference.py's: the
first element inside the input is taken unconditionally, then a value replaces the maximum when it
is greater or NaN; padding is masked out and takes no part.

backward, where windows do not overlap (a stride at least the window's extent, as the 2×2
stride-2 pools of VGG and LeNet): a scatter, one program per tile of outputs, each storing its
gradient where its maximum was, into a zero-filled input gradient. No two outputs reach one
input, so plain stores suffice: no atomics, no sum, the same bits on every run. It is the work of
the atomic scatter it replaced, which ran at 2.3x torch's backward on an H200 at 16×64×112²,
2×2 stride 2, where the gather below ran at 1.7x (the plain-store scatter not yet timed there).

backward where windows overlap: a gather, one program per tile of input positions. Output (oh, ow) has a tap on input (ih, iw) when oh·SH - PH + i·DH == ih for some i in
0..KH-1 (ih + PH - oh·SH a multiple of DH, at most (KH-1)·DH, at least 0), likewise for ow. Each
input walks its candidate outputs, at most (KH-1)·DH // SH + 1 rows by (KW-1)·DW // SW + 1
columns of them starting at the first row and column whose window reaches it (runtime loops, as
forward; fewer steps than the window's offsets when the stride is over 1: 4 for ResNet's 3×3
stride 2 pool, 1 for 2×2 stride 2), and adds an output's gradient where its saved index
names the input (a window with nothing inside the input has index -1 and names none). Only the
first candidate costs divisions; the walk adds and compares. Candidates go in increasing oh,
then ow, so each input sums its gradients in row-major output order, as reference.py's
scatter_add does on the CPU; the sum is float32 for float16 / bfloat16 gradients (float64 for
float64) and is stored once, in the gradient's dtype. So: no atomics, the same bits on every run
with overlapping windows too (the scatter with atomics this replaced added in whatever order
the GPU ran them), and no zero-fill pass or cast copy, since every input element is written
exactly once. The gather needs the forward's window; a call without it (the custom op called
with indices alone) takes a window of stride 1 that makes every output a candidate for every
input: right for any indices, at OH·OW index reads per input.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastml import _triton as tt
from fastml.ops.max_pool2d.reference import empty_outputs

# Elements per tile (BLOCK_P · BLOCK): on the GPU 1024 going forward (8 per thread of 4 warps) and
# 512 going backward (the gather's walk is a chain of dependent loads per element: fewer per
# thread, more programs in flight; on an H200 512 beat 1024 by 1.1-1.5x and 256 to 4096 did no
# better); under the interpreter a small tile, so that the small maps of the tests still span
# several programs and exercise the masks on both axes.
TILE = 1024
BACKWARD_TILE = 512
INTERPRETER_TILE = 256
MAX_BLOCK = 512
INTERPRETER_MAX_BLOCK = 64
NUM_WARPS = 4


@triton.jit
def _tile(planes, positions, BLOCK_P: tl.constexpr, BLOCK: tl.constexpr):
    """(plane, pos, plane_ok, pos_ok) of this program's tile: BLOCK_P planes by BLOCK positions of
    ``positions`` per plane, positions fastest along the 1-D grid."""
    pid = tl.program_id(0)
    tiles = tl.cdiv(positions, BLOCK)
    plane = (pid // tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    pos = (pid % tiles) * BLOCK + tl.arange(0, BLOCK)
    return plane, pos, plane < planes, pos < positions


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
    n_outputs = OH * OW
    plane, pos, plane_ok, pos_ok = _tile(planes, n_outputs, BLOCK_P, BLOCK)
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
    grad_input_ptr,  # (N·C, H, W) gradient of the input, grad's dtype, written whole
    planes, H, W, OH, OW,
    KH, KW, SH, SW, PH, PW, DH, DW,  # the forward's window: size, stride, padding, dilation
    ACC: tl.constexpr,  # accumulation dtype: float32 for float16 / bfloat16, else grad's dtype
    BLOCK_P: tl.constexpr, BLOCK: tl.constexpr,
):
    n_inputs = H * W
    plane, pos, plane_ok, pos_ok = _tile(planes, n_inputs, BLOCK_P, BLOCK)
    ih = pos // W
    iw = pos % W
    spatial = ih.to(tl.int64) * W + iw  # what an output's index holds when its maximum is here
    out_plane = plane.to(tl.int64) * OH * OW  # planes·OH·OW may pass 2**31
    # Output oh has a tap on row ih when off = ih + PH - oh·SH is i·DH for some i in 0..KH-1:
    # oh from ceil((ih + PH - (KH-1)·DH) / SH) (at least 0) up, NH candidates at most, each with
    # off SH smaller than the last. The one division per input is done here (on a shifted,
    # non-negative numerator: C and Python round negative quotients apart); the walk then only
    # adds and compares, off mod DH kept by subtracting SH mod DH and wrapping.
    span_h = (KH - 1) * DH
    NH = span_h // SH + 1
    oh0 = tl.maximum((ih + PH - span_h + NH * SH + SH - 1) // SH - NH, 0)
    off_h0 = ih + PH - oh0 * SH  # <= span_h
    rem_h0 = tl.maximum(off_h0, 0) % DH  # once off is negative no later candidate counts
    span_w = (KW - 1) * DW
    NW = span_w // SW + 1
    ow0 = tl.maximum((iw + PW - span_w + NW * SW + SW - 1) // SW - NW, 0)
    off_w0 = iw + PW - ow0 * SW
    rem_w0 = tl.maximum(off_w0, 0) % DW
    step_h = SH % DH
    step_w = SW % DW
    acc = tl.zeros([BLOCK_P, BLOCK], ACC)
    # Candidates in increasing oh, then ow: the gradients add in row-major output order.
    off_h = off_h0
    rem_h = rem_h0
    for t in range(NH):
        oh = oh0 + t
        row_ok = pos_ok & (off_h >= 0) & (rem_h == 0) & (oh < OH)
        row_start = out_plane[:, None] + (oh.to(tl.int64) * OW)[None, :]
        off_w = off_w0
        rem_w = rem_w0
        for u in range(NW):
            ow = ow0 + u
            inside = row_ok & (off_w >= 0) & (rem_w == 0) & (ow < OW)
            mask = plane_ok[:, None] & inside[None, :]
            at = row_start + ow[None, :]
            index = tl.load(idx_ptr + at, mask=mask, other=-1)
            hit = mask & (index == spatial[None, :])
            acc += tl.load(grad_ptr + at, mask=hit, other=0).to(ACC)
            off_w -= SW
            rem_w -= step_w
            rem_w = tl.where(rem_w < 0, rem_w + DW, rem_w)
        off_h -= SH
        rem_h -= step_h
        rem_h = tl.where(rem_h < 0, rem_h + DH, rem_h)
    in_at = plane.to(tl.int64)[:, None] * n_inputs + pos[None, :]
    tl.store(grad_input_ptr + in_at, acc.to(grad_input_ptr.dtype.element_ty),
             mask=plane_ok[:, None] & pos_ok[None, :])


@triton.jit
def _max_pool2d_scatter_kernel(
    grad_ptr,        # (N·C, OH, OW) gradient of the outputs, contiguous
    idx_ptr,         # (N·C, OH, OW) int64: flat index of each output's maximum within its plane
    grad_input_ptr,  # (N·C, H, W) gradient of the input, grad's dtype, zero-filled
    planes, n_outputs, n_inputs,  # n_outputs = OH·OW, n_inputs = H·W
    BLOCK_P: tl.constexpr, BLOCK: tl.constexpr,
):
    """Windows that do not overlap: each output's gradient is the only one its maximum receives,
    so it is stored there, one plain store per output (no atomics, no sum, any order)."""
    plane, pos, plane_ok, pos_ok = _tile(planes, n_outputs, BLOCK_P, BLOCK)
    mask = plane_ok[:, None] & pos_ok[None, :]
    at = plane.to(tl.int64)[:, None] * n_outputs + pos[None, :]
    grad = tl.load(grad_ptr + at, mask=mask, other=0)
    index = tl.load(idx_ptr + at, mask=mask, other=-1)
    # An index of -1 (a window with no element inside the input) has nowhere to go.
    tl.store(grad_input_ptr + plane.to(tl.int64)[:, None] * n_inputs + index, grad, mask=mask & (index >= 0))


def windows_overlap(kernel, stride, dilation) -> bool:
    """Whether two windows of a pool can share an input: a stride below the window's extent."""
    return any(s < (k - 1) * d + 1 for k, s, d in zip(kernel, stride, dilation))


def _tiling(planes: int, n_outputs: int, gpu_tile: int = TILE) -> tuple[int, int, tuple[int]]:
    """(BLOCK_P, BLOCK, grid) for tiles of ``gpu_tile`` elements (on the GPU) over ``planes``
    planes of ``n_outputs`` positions (the outputs going forward, the inputs going backward)."""
    interpreted = tt.interpreted()
    tile = INTERPRETER_TILE if interpreted else gpu_tile
    block = tt.block(n_outputs, 1, INTERPRETER_MAX_BLOCK if interpreted else MAX_BLOCK)
    block_p = tt.block(planes, 1, max(1, tile // block))
    grid = (tt.cdiv(planes, block_p) * tt.cdiv(n_outputs, block),)
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


def backward(grad, indices, height, width, window=None):
    grad = grad.contiguous()
    indices = indices.contiguous()
    n, c, oh, ow = grad.shape  # OH, OW as the forward made them (ceil_mode included)
    grad_input = grad.new_empty((n, c, height, width))
    if grad_input.numel() == 0:
        return grad_input
    if grad.numel() == 0:  # no outputs: nothing reaches the input
        return grad_input.zero_()
    if window is None:
        # Unknown window: one of stride 1 whose taps reach from every output to every input
        # (oh - PH + i == ih for exactly one i in 0..KH-1 whatever oh and ih), for any indices.
        window = ((height + oh - 1, width + ow - 1), (1, 1), (oh - 1, ow - 1), (1, 1))
    kernel, stride, padding, dilation = window
    planes = n * c
    if not windows_overlap(kernel, stride, dilation):
        grad_input.zero_()
        block_p, block, grid = _tiling(planes, oh * ow)
        _max_pool2d_scatter_kernel[grid](grad, indices, grad_input, planes, oh * ow, height * width,
                                         BLOCK_P=block_p, BLOCK=block, num_warps=NUM_WARPS)
        return grad_input
    block_p, block, grid = _tiling(planes, height * width, BACKWARD_TILE)
    _max_pool2d_backward_kernel[grid](
        grad, indices, grad_input, planes, height, width, oh, ow,
        kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        ACC=tt.acc_dtype(grad.dtype), BLOCK_P=block_p, BLOCK=block, num_warps=NUM_WARPS)
    return grad_input
