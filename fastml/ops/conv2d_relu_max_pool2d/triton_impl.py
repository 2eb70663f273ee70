"""Fused conv + bias + ReLU + max-pool in Triton; signatures and shapes as in reference.py.

forward: one kernel. Each program owns a [BLOCK_M pooled positions (n, pi, pj), BLOCK_N output
channels] tile of one group, on a 1-D grid ordered (group, row tile, column tile) as conv2d's
forward. It walks the PKH·PKW pool window offsets (i, j) row by row (runtime loops) and, for each,
computes the convolution at (pi·PSH + i, pj·PSW + j) for the whole tile as an implicit GEMM
(fastml.ops.conv2d.triton_impl.conv_tile: tl.dot, or the float64 fallback), adds the bias,
rounds to the output dtype (the reference's z is in x's dtype, so its ties and maxima are those
of the rounded values), applies ReLU (z <= 0 → 0: NaN passes, -0 becomes 0) and keeps the running
maximum and its offset i·PKW + j with torch's rule: a value replaces the maximum when greater or
NaN, ties to the first; the offset is stored as -1 where the maximum is <= 0 (the ReLU passes no
gradient there; a NaN passes it, as torch's). The pre-pool activation (N, K, OH, OW) never goes
to memory; windows that overlap (PSH < PKH or PSW < PKW) recompute the convolution values they
share.

backward: _pool_grad_scatter_kernel rebuilds the gradient of z in a zeroed (N, K, OH, OW) buffer,
one program per BLOCK pooled outputs: grad at each window's argmax where it is not -1. Disjoint
windows write each element at most once (plain stores, in grad's dtype); overlapping ones add
with atomics into an accumulation-dtype buffer (float32 for half types), cast once after.
conv2d's Triton backward does the rest.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastml import _triton as tt
from fastml.ops.conv2d import triton_impl as conv_triton
from fastml.ops.conv2d.reference import output_size
from fastml.ops.conv2d.triton_impl import conv_tile, group_tile
from fastml.ops.conv2d_relu_max_pool2d.reference import empty_outputs

# Pooled outputs per program of the scatter kernel.
SCATTER_BLOCK = 1024
INTERPRETER_SCATTER_BLOCK = 256
NUM_WARPS = 4


@triton.jit
def _conv2d_relu_max_pool2d_forward_kernel(
    x_ptr,       # (N, C, H, W) input, contiguous
    w_ptr,       # (K, C / groups, KH, KW) filters, contiguous, x's dtype
    bias_ptr,    # (K,) bias, x's dtype (read when HAS_BIAS)
    out_ptr,     # (N, K, POH, POW) pooled maxima, x's dtype
    argmax_ptr,  # (N, K, POH, POW) int8: offset i·PKW + j of each maximum within its window, or -1
    M, C, H, W, K, POH, POW,  # M = N·POH·POW pooled positions
    KH, KW, SH, SW, PH, PW, DH, DW,  # convolution: filter size, stride, padding, dilation
    PKH, PKW, PSH, PSW,  # pool window and stride (rows, columns)
    groups,
    HAS_BIAS: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, USE_DOT: tl.constexpr,
    UPCAST: tl.constexpr,  # operands to ACC before the product (half types under the interpreter)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    CG = C // groups
    KG = K // groups
    g, offs_m, m_ok, offs_n, n_ok = group_tile(tl.program_id(0), M, KG, BLOCK_M, BLOCK_N)
    pooled = POH * POW
    n = offs_m // pooled
    q = (offs_m - n * pooled).to(tl.int32)
    # The window's top-left input row / column at offset (0, 0), and each offset's step.
    ih_base = (q // POW) * (PSH * SH) - PH
    iw_base = (q % POW) * (PSW * SW) - PW
    k = g * KG + offs_n
    x_rows = (n * C + g * CG) * H * W
    w_cols = k.to(tl.int64) * (CG * KH * KW)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + k, mask=n_ok, other=0).to(ACC)
    best = tl.full([BLOCK_M, BLOCK_N], float("-inf"), ACC)
    index = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    for i in range(PKH):
        for j in range(PKW):
            z = conv_tile(x_ptr, w_ptr, x_rows, ih_base + i * SH, iw_base + j * SW, m_ok, w_cols, n_ok,
                          CG, H, W, KH, KW, DH, DW, ACC=ACC, PREC=PREC, USE_DOT=USE_DOT, UPCAST=UPCAST,
                          BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
            if HAS_BIAS:
                z += bias[None, :]
            z = z.to(out_ptr.dtype.element_ty).to(ACC)
            z = tl.where(z <= 0, 0.0, z)
            # ReLU's values are >= 0 or NaN, so the first offset always replaces the -inf start.
            take = (z > best) | (z != z)  # noqa: PLR0124 (NaN test)
            best = tl.where(take, z, best)
            index = tl.where(take, i * PKW + j, index)
    at = (n * K * pooled + q)[:, None] + (k.to(tl.int64) * pooled)[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    tl.store(out_ptr + at, best.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(argmax_ptr + at, tl.where(best <= 0, -1, index).to(tl.int8), mask=mask)  # (NaN passes)


@triton.jit
def _pool_grad_scatter_kernel(
    grad_ptr,        # (N·K, POH, POW) gradient of the pooled output, contiguous
    argmax_ptr,      # (N·K, POH, POW) int8: offset i·PKW + j of each maximum, -1 where the ReLU blocks
    grad_input_ptr,  # (N·K, OH, OW) zeroed gradient of the pre-ReLU activation z
    n_outputs,       # N·K·POH·POW
    POH, POW, OH, OW, PKW, PSH, PSW,
    ATOMIC: tl.constexpr,  # windows overlap: several gradients may reach one element
    BLOCK: tl.constexpr,
):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = e < n_outputs
    pooled = POH * POW
    plane = e // pooled
    q = (e - plane * pooled).to(tl.int32)
    offset = tl.load(argmax_ptr + e, mask=ok, other=-1).to(tl.int32)
    passes = ok & (offset >= 0)
    grad = tl.load(grad_ptr + e, mask=passes, other=0).to(grad_input_ptr.dtype.element_ty)
    oh = (q // POW) * PSH + offset // PKW
    ow = (q % POW) * PSW + offset % PKW
    target = grad_input_ptr + plane * (OH * OW) + (oh * OW + ow)
    if ATOMIC:
        tl.atomic_add(target, grad, mask=passes, sem="relaxed")
    else:
        tl.store(target, grad, mask=passes)


def forward(x, weight, bias, stride, padding, dilation, groups, pool_kernel, pool_stride):
    n, c, h, w = x.shape
    k, cg, kh, kw = weight.shape
    out, argmax = empty_outputs(x, weight, stride, padding, dilation, pool_kernel, pool_stride)
    poh, pow_ = out.shape[2:]
    if out.numel() == 0:
        return out, argmax
    rows, kg = n * poh * pow_, k // groups

    def tiles(bm, bn):
        return groups * tt.cdiv(rows, bm) * tt.cdiv(kg, bn)

    args = (x, weight, bias, out, argmax, rows, c, h, w, k, poh, pow_, kh, kw, *stride, *padding, *dilation,
            *pool_kernel, *pool_stride, groups)
    conv_triton.launch(_conv2d_relu_max_pool2d_forward_kernel, tiles, rows, kg,
                       cg * kh * kw, args, dict(conv_triton._meta(x.dtype), HAS_BIAS=bias is not None), x.dtype)
    return out, argmax


def backward(grad, argmax, x, weight, stride, padding, dilation, groups, pool_kernel, pool_stride, needs):
    n, k, poh, pow_ = grad.shape
    oh = output_size(x.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
    ow = output_size(x.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
    overlap = pool_stride[0] < pool_kernel[0] or pool_stride[1] < pool_kernel[1]
    buffer_dtype = tt.torch_acc_dtype(grad.dtype) if overlap else grad.dtype
    grad_z = torch.zeros((n, k, oh, ow), dtype=buffer_dtype, device=grad.device)
    if grad.numel():
        grad, argmax = grad.contiguous(), argmax.contiguous()
        block = INTERPRETER_SCATTER_BLOCK if tt.interpreted() else SCATTER_BLOCK
        _pool_grad_scatter_kernel[(tt.cdiv(grad.numel(), block),)](
            grad, argmax, grad_z, grad.numel(), poh, pow_, oh, ow, pool_kernel[1], *pool_stride,
            ATOMIC=overlap, BLOCK=block, num_warps=NUM_WARPS)
    return conv_triton.backward(grad_z.to(grad.dtype), x, weight, stride, padding, dilation, groups, needs)
