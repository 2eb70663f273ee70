"""Linear + cross-entropy a chunk of rows at a time, for large class counts.

Each chunk's logits (rows × C) are made by the BLAS behind torch.addmm, turned into their
gradient in place by a backend's cross-entropy row kernel (fastml.ops.cross_entropy), and
multiplied back into the input, weight and bias gradients, so the N × C logits never exist
whole: the peak extra memory is one chunk plus the gradients. The three matrix products are
nearly all the work (6·N·D·C flops against a few passes over a chunk that stays in cache), and
a vendor GEMM runs them faster than a hand-written one would.
"""

from __future__ import annotations

import functools

import torch

from fastml.ops.cross_entropy import accumulation_dtype, loss_scale, row_loss_buffer

# A chunk of logits as large as the input itself (torch's "aspect_ratio" rule), but never below
# _MIN_CHUNK_ELEMENTS (16 MiB of float32): smaller matrix products lose GEMM efficiency for
# little memory gain. At (4096, 512, 8192) on 2 Zen 4 cores, chunks of 256 / 512 / 1024 rows
# took 0.61 / 0.58 / 0.57 s.
_MIN_CHUNK_ELEMENTS = 1 << 22


# Half-precision inputs sum their weight gradient over chunks in a float32 buffer of C × D, read
# and written once per chunk: 8·C·D bytes against the chunk's 6·rows·D·C flops of products. A
# GPU does about 150 to 200 bf16 flops per byte of memory traffic (H100: 990 TFLOP/s over
# 3.35 TB/s; H200: over 4.8), so at 2048 rows that traffic costs about a tenth of the products;
# at the 520 rows of the N·D rule (16384 × 4096 → 128256) it cost as much as they did.
_ACCUMULATING_MIN_ROWS = 2048


def chunk_rows(n, d, c, accumulates=False):
    """Rows per chunk: logits of about N·D elements (at least 4 Mi), a multiple of 8 rows; at
    least _ACCUMULATING_MIN_ROWS where the weight gradient accumulates in a wider buffer."""
    rows = max(8, max(n * d, _MIN_CHUNK_ELEMENTS) // max(c, 1) // 8 * 8)
    if accumulates:
        rows = max(rows, _ACCUMULATING_MIN_ROWS)
    return max(1, min(n, rows))


@functools.cache
def _mixed_addmm(device_type: str) -> bool:
    """Whether torch.addmm here takes out_dtype (half inputs, a float32 sum): torch 2.8+ on CUDA."""
    try:
        a = torch.ones((2, 2), dtype=torch.bfloat16, device=device_type)
        c = torch.zeros((2, 2), dtype=torch.float32, device=device_type)
        torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
        return bool((c == 2).all())
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _accumulate(grad_w, logits_t, xs):
    """grad_w (float32) += logits_t @ xs for half inputs: one product into the float32 sum where
    torch can (no half-precision product to round, upcast and add: three passes over C × D)."""
    if _mixed_addmm(grad_w.device.type):
        torch.addmm(grad_w, logits_t, xs, out_dtype=torch.float32, out=grad_w)
    else:
        grad_w += (logits_t @ xs).to(grad_w.dtype)


def run(kernels, x, weight, bias, target, class_weight, ignore_index, label_smoothing, grad_scale,
        want_loss, need_input_grad, need_weight_grad, need_bias_grad):
    """→ (row_loss (N,) or None, grad_input, grad_weight, grad_bias).

    kernels: a cross-entropy backend module (its ``rows``). grad_scale: the float (or 0-dim
    tensor) that scales every row's gradient, or a tensor (N,) of per-row scales. Shapes as in reference.py.
    """
    n, d = x.shape
    c = weight.shape[0]
    want_grads = need_input_grad or need_weight_grad or need_bias_grad
    row_loss = row_loss_buffer(x) if want_loss else None
    grad_x = torch.empty_like(x) if need_input_grad else None
    # Low-precision weight gradients are summed over chunks in float32.
    acc = accumulation_dtype(x.dtype)
    grad_w = torch.zeros(weight.shape, dtype=acc, device=x.device) if need_weight_grad else None
    grad_b = torch.zeros(c, dtype=acc, device=x.device) if need_bias_grad else None
    step = chunk_rows(n, d, c, accumulates=need_weight_grad and acc != x.dtype)
    buffer = torch.empty((min(step, n), c), dtype=x.dtype, device=x.device)
    weight_t = weight.T
    per_row = isinstance(grad_scale, torch.Tensor) and grad_scale.dim() == 1
    for start in range(0, n, step):
        stop = min(n, start + step)
        xs, logits = x[start:stop], buffer[:stop - start]
        if bias is None:
            torch.mm(xs, weight_t, out=logits)
        else:
            torch.addmm(bias, xs, weight_t, out=logits)
        scale = grad_scale[start:stop] if per_row else grad_scale
        kernels.rows(logits, target[start:stop], class_weight, ignore_index, label_smoothing, scale,
                     None if row_loss is None else row_loss[start:stop], logits if want_grads else None)
        if need_input_grad:
            torch.mm(logits, weight, out=grad_x[start:stop])
        if need_weight_grad:
            if acc == x.dtype:
                grad_w.addmm_(logits.T, xs)
            else:
                _accumulate(grad_w, logits.T, xs)
        if need_bias_grad:
            grad_b += logits.sum(0, dtype=acc)
    if acc != x.dtype:
        grad_w = None if grad_w is None else grad_w.to(x.dtype)
        grad_b = None if grad_b is None else grad_b.to(x.dtype)
    return row_loss, grad_x, grad_w, grad_b


def forward(kernels, x, weight, bias, target, class_weight, ignore_index, label_smoothing, reduction,
            need_input_grad, need_weight_grad, need_bias_grad):
    """reference.forward's contract, chunked, on a backend's row kernel."""
    n, c = x.shape[0], weight.shape[0]
    scale = loss_scale(kernels, reduction, target, class_weight, ignore_index, c, n)
    reduced = reduction != "none"
    grads = (need_input_grad, need_weight_grad, need_bias_grad) if reduced else (False, False, False)
    row_loss, *grads = run(kernels, x, weight, bias, target, class_weight, ignore_index, label_smoothing,
                           scale, True, *grads)
    loss = row_loss.sum() * scale if reduced else row_loss
    return (loss.to(x.dtype), *grads)


def backward(kernels, x, weight, bias, target, class_weight, ignore_index, label_smoothing, grad_output,
             need_input_grad, need_weight_grad, need_bias_grad):
    """reference.backward's contract, chunked, on a backend's row kernel."""
    row_scale = grad_output.to(accumulation_dtype(x.dtype))
    return tuple(run(kernels, x, weight, bias, target, class_weight, ignore_index, label_smoothing, row_scale,
                     False, need_input_grad, need_weight_grad, need_bias_grad)[1:])
