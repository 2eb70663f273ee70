"""Adam in Triton: one launch for all tensors of a list; signature as in reference.py. Launch
shape and table as in fastml/ops/sgd/triton_impl.py; arithmetic in float32 for half types."""

from __future__ import annotations

import triton
import triton.language as tl

from fastml import _triton as tt
from fastml._triton import load_float, load_pointer, multi_tensor_block

# Warps per program of a multi-tensor launch (one block of tt.MULTI_TENSOR_BLOCK elements each).
# Adam holds four arrays' blocks at once: on an H200 (bench/gpu_optimizer_sweep.py, 100M
# parameters in 100 tensors) 2048 elements on 8 warps moved 3576 GB/s, 1.07x torch's fused
# Adam, against 3345 GB/s on 4 warps; 4096 or 8192 elements on 4 warps fell to 1505 and 968.
NUM_WARPS = 8


@triton.jit
def _adam_kernel(
    table_ptr,         # multi_tensor_table: pointer rows param, grad, exp_avg, exp_avg_sq[, max_exp_avg_sq];
                       # sizes; -step_size and bias2_sqrt per tensor; scalars (see adam_step)
    block_tensor_ptr,  # (n_blocks,) int32: the tensor each block belongs to
    block_start_ptr,   # (n_blocks,) int64: the block's first element within its tensor
    count, n_blocks,
    DTYPE: tl.constexpr, ACC: tl.constexpr, L2_DECAY: tl.constexpr, AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr, ZERO_GRAD: tl.constexpr, POINTER_ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    sizes_at = POINTER_ROWS * count
    neg_step_at = sizes_at + count
    bias2_at = neg_step_at + count
    scalars_at = bias2_at + count  # decay, weight_decay, 1 - beta1, beta2, 1 - beta2, eps
    decay = load_float(table_ptr, scalars_at).to(ACC)
    l2 = load_float(table_ptr, scalars_at + 1).to(ACC)
    w = load_float(table_ptr, scalars_at + 2).to(ACC)
    beta2 = load_float(table_ptr, scalars_at + 3).to(ACC)
    one_minus_beta2 = load_float(table_ptr, scalars_at + 4).to(ACC)
    eps = load_float(table_ptr, scalars_at + 5).to(ACC)
    for blk in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
        t, offs, mask = multi_tensor_block(table_ptr, block_tensor_ptr, block_start_ptr, sizes_at, blk, BLOCK)
        neg_step = load_float(table_ptr, neg_step_at + t).to(ACC)
        bias2_sqrt = load_float(table_ptr, bias2_at + t).to(ACC)
        p_ptr = load_pointer(table_ptr, 0, count, t, DTYPE)
        g_ptr = load_pointer(table_ptr, 1, count, t, DTYPE)
        m_ptr = load_pointer(table_ptr, 2, count, t, DTYPE)
        v_ptr = load_pointer(table_ptr, 3, count, t, DTYPE)
        p = tl.load(p_ptr + offs, mask=mask, other=0).to(ACC) * decay
        g = tl.load(g_ptr + offs, mask=mask, other=0).to(ACC)
        if MAXIMIZE:
            g = -g
        if L2_DECAY:
            g = tl.fma(l2, p, g)  # rounded once, as torch's grad.add(param, alpha=weight_decay): csrc/adam.cpp
        m = tl.load(m_ptr + offs, mask=mask, other=0).to(ACC)
        m = tl.where(tl.abs(w) < 0.5, m + w * (g - m), g - (g - m) * (1 - w))  # torch.lerp
        v = tl.load(v_ptr + offs, mask=mask, other=0).to(ACC) * beta2 + one_minus_beta2 * g * g
        tl.store(m_ptr + offs, m.to(DTYPE), mask=mask)
        tl.store(v_ptr + offs, v.to(DTYPE), mask=mask)
        second = v
        if AMSGRAD:
            vmax_ptr = load_pointer(table_ptr, 4, count, t, DTYPE)
            old = tl.load(vmax_ptr + offs, mask=mask, other=0).to(ACC)
            second = tl.where((old > v) | (old != old), old, v)  # NaN propagates, as torch.maximum
            tl.store(vmax_ptr + offs, second.to(DTYPE), mask=mask)
        if ACC == tl.float64:  # correctly rounded, as torch's sqrt: sqrt.rn.f64
            root = tl.sqrt(second)
        else:  # tl.sqrt would be the approximate sqrt.approx.f32 on the GPU
            root = tl.sqrt_rn(second)
        denom = root / bias2_sqrt + eps
        tl.store(p_ptr + offs, (p + neg_step * m / denom).to(DTYPE), mask=mask)
        if ZERO_GRAD:
            tl.store(g_ptr + offs, tl.zeros([BLOCK], DTYPE), mask=mask)


def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step_sizes, bias2_sqrts, *, lr, beta1,
              beta2, eps, weight_decay, decoupled, amsgrad, maximize, zero_grad):
    columns = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    decays = weight_decay != 0
    scalars = [1.0 - lr * weight_decay if decays and decoupled else 1.0, float(weight_decay), 1.0 - beta1,
               float(beta2), 1.0 - beta2, float(eps)]
    table = tt.multi_tensor_table(columns, [p.numel() for p in params],
                                  [[-s for s in step_sizes], list(bias2_sqrts)], scalars, params[0].device)
    block_tensor, block_start, programs, block = tt.multi_tensor_launch(params)
    dtype = params[0].dtype
    _adam_kernel[(programs,)](
        table, block_tensor, block_start, len(params), block_tensor.numel(),
        DTYPE=tt.TL_DTYPES[dtype], ACC=tt.acc_dtype(dtype), L2_DECAY=decays and not decoupled,
        AMSGRAD=bool(amsgrad), MAXIMIZE=bool(maximize), ZERO_GRAD=bool(zero_grad),
        POINTER_ROWS=len(columns), BLOCK=block, num_warps=NUM_WARPS)
