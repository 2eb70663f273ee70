"""Fused linear + squared loss in Triton; signatures and semantics as in reference.py.

forward: one pass over x. Persistent programs (a few per SM) loop over blocks of rows; each
block's prediction, residual and squared loss are formed in registers and, for "mean" / "sum",
the block's contribution to grad_weight = 2·scale·rᵀx and grad_bias = 2·scale·Σr is added to
the program's accumulators from the same tile of x. Programs write their partial sums to a
(P, C) buffer that one small launch (fastml._triton.reduce_partials) sums in a fixed order, so
results are deterministic. The N×O prediction is never stored for "mean" / "sum".

Two kernels:
- ``_rows_kernel`` for few outputs (O <= 16) and one D tile: each output's prediction is a
  broadcast multiply + row sum (no padding of O to a tl.dot size); the hot path, O = 1, keeps
  r·x un-reduced in registers and reduces it once at the end.
- ``_tiled_kernel`` for everything else: tl.dot over (row, O, D) tiles, a second grid axis over
  O blocks, D in chunks (partials then accumulate in the program's own slice of the buffer).

sgd_epoch: one program runs the whole epoch (one launch), batch after batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastml import _triton as tt

# Largest D the rows kernel takes in one tile, and its budget for BLOCK_O·BLOCK_D accumulators.
_ROWS_MAX_D = 1024
_ROWS_MAX_OD = 4096
_ROWS_MAX_O = 16
# Below this many x elements the GPU launch uses a default config instead of autotuning.
_AUTOTUNE_MIN_ELEMENTS = 1 << 22
_MIN_BLOCK_N = 4


@triton.jit
def _residual(xt, w, bias, t_ptr, res_ptr, loss_ptr, rows64, rmask, o: tl.constexpr, NUM_OUT: tl.constexpr,
              HAS_BIAS: tl.constexpr, REDUCE: tl.constexpr, KEEP_RES: tl.constexpr, ACC: tl.constexpr):
    """Residual of output ``o`` for a tile of rows xt (BLOCK_N, BLOCK_D) and weight row w
    (BLOCK_D,): stores it (KEEP_RES) and its square (reduction "none"), returns it, 0 past N."""
    pred = tl.sum(xt * w[None, :], axis=1)
    if HAS_BIAS:
        pred += bias
    t = tl.load(t_ptr + rows64 * NUM_OUT + o, mask=rmask, other=0).to(ACC)
    r = tl.where(rmask, pred - t, 0.0)
    if KEEP_RES:
        tl.store(res_ptr + rows64 * NUM_OUT + o, r.to(res_ptr.dtype.element_ty), mask=rmask)
    if not REDUCE:
        tl.store(loss_ptr + rows64 * NUM_OUT + o, (r * r).to(loss_ptr.dtype.element_ty), mask=rmask)
    return r


@triton.jit
def _accumulate_output(xt, w, bias, g, s, loss_acc, t_ptr, res_ptr, loss_ptr, rows64, rmask, o: tl.constexpr,
                       NUM_OUT: tl.constexpr, HAS_BIAS: tl.constexpr, REDUCE: tl.constexpr, KEEP_RES: tl.constexpr,
                       NEED_W: tl.constexpr, NEED_B: tl.constexpr, ACC: tl.constexpr):
    """One output's share of a row tile, for the register-resident path (NUM_OUT <= 4): its
    residual (_residual), added into the loss, the un-reduced r·x accumulator g (BLOCK_N,
    BLOCK_D) and the residual sum s (BLOCK_N,). Returns the new (g, s, loss_acc)."""
    r = _residual(xt, w, bias, t_ptr, res_ptr, loss_ptr, rows64, rmask, o, NUM_OUT, HAS_BIAS, REDUCE, KEEP_RES, ACC)
    loss_acc += r * r
    if NEED_W:
        g += r[:, None] * xt
    if NEED_B:
        s += r
    return g, s, loss_acc


@triton.jit
def _weight_row(w_ptr, b_ptr, o: tl.constexpr, D, offs_d, dmask, HAS_BIAS: tl.constexpr, ACC: tl.constexpr):
    w = tl.load(w_ptr + o * D + offs_d, mask=dmask, other=0).to(ACC)
    b = 0.0
    if HAS_BIAS:
        b = tl.load(b_ptr + o).to(ACC)
    return w, b


@triton.jit
def _rows_kernel(
    x_ptr,       # (N, D) inputs
    w_ptr,       # (NUM_OUT, D) weight
    b_ptr,       # (NUM_OUT,) bias (read only when HAS_BIAS)
    t_ptr,       # (N, NUM_OUT) target
    loss_ptr,    # (N, NUM_OUT) squared residual, written for reduction "none"
    res_ptr,     # (N, NUM_OUT) residual, written when KEEP_RES
    part_ptr,    # (P, C) partials when REDUCE: [rᵀx (NUM_OUT·D) | Σr (NUM_OUT) | Σr² (1)]
    N, D, C,
    N_BUCKET,    # autotune key only
    NUM_OUT: tl.constexpr, HAS_BIAS: tl.constexpr, REDUCE: tl.constexpr,
    NEED_W: tl.constexpr, NEED_B: tl.constexpr, KEEP_RES: tl.constexpr,
    ACC: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Rows of x in blocks of BLOCK_N, each block's D in one tile. For NUM_OUT <= 4 every
    output has its own weight row and (BLOCK_N, BLOCK_D) accumulator of r·x in registers,
    reduced over rows once at the end (no cross-warp reduction inside the loop); for
    5..16 outputs each block's rᵀx is reduced over rows and added to a (BLOCK_O, BLOCK_D) sum."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    offs_o = tl.arange(0, BLOCK_O)
    loss_acc = tl.zeros([BLOCK_N], ACC)
    if NUM_OUT <= 4:
        w0, b0 = _weight_row(w_ptr, b_ptr, 0, D, offs_d, dmask, HAS_BIAS, ACC)
        g0 = tl.zeros([BLOCK_N, BLOCK_D], ACC)
        s0 = tl.zeros([BLOCK_N], ACC)
        if NUM_OUT > 1:
            w1, b1 = _weight_row(w_ptr, b_ptr, 1, D, offs_d, dmask, HAS_BIAS, ACC)
            g1 = tl.zeros([BLOCK_N, BLOCK_D], ACC)
            s1 = tl.zeros([BLOCK_N], ACC)
        if NUM_OUT > 2:
            w2, b2 = _weight_row(w_ptr, b_ptr, 2, D, offs_d, dmask, HAS_BIAS, ACC)
            g2 = tl.zeros([BLOCK_N, BLOCK_D], ACC)
            s2 = tl.zeros([BLOCK_N], ACC)
        if NUM_OUT > 3:
            w3, b3 = _weight_row(w_ptr, b_ptr, 3, D, offs_d, dmask, HAS_BIAS, ACC)
            g3 = tl.zeros([BLOCK_N, BLOCK_D], ACC)
            s3 = tl.zeros([BLOCK_N], ACC)
    else:
        gw = tl.zeros([BLOCK_O, BLOCK_D], ACC)
        gb = tl.zeros([BLOCK_O], ACC)
    for rb in range(pid, tl.cdiv(N, BLOCK_N), nprog):
        rows = rb * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        rows64 = rows.to(tl.int64)
        xt = tl.load(x_ptr + rows64[:, None] * D + offs_d[None, :],
                     mask=rmask[:, None] & dmask[None, :], other=0).to(ACC)
        if NUM_OUT <= 4:
            g0, s0, loss_acc = _accumulate_output(xt, w0, b0, g0, s0, loss_acc, t_ptr, res_ptr, loss_ptr,
                rows64, rmask, 0, NUM_OUT, HAS_BIAS, REDUCE, KEEP_RES, NEED_W, NEED_B, ACC)
            if NUM_OUT > 1:
                g1, s1, loss_acc = _accumulate_output(xt, w1, b1, g1, s1, loss_acc, t_ptr, res_ptr, loss_ptr,
                    rows64, rmask, 1, NUM_OUT, HAS_BIAS, REDUCE, KEEP_RES, NEED_W, NEED_B, ACC)
            if NUM_OUT > 2:
                g2, s2, loss_acc = _accumulate_output(xt, w2, b2, g2, s2, loss_acc, t_ptr, res_ptr, loss_ptr,
                    rows64, rmask, 2, NUM_OUT, HAS_BIAS, REDUCE, KEEP_RES, NEED_W, NEED_B, ACC)
            if NUM_OUT > 3:
                g3, s3, loss_acc = _accumulate_output(xt, w3, b3, g3, s3, loss_acc, t_ptr, res_ptr, loss_ptr,
                    rows64, rmask, 3, NUM_OUT, HAS_BIAS, REDUCE, KEEP_RES, NEED_W, NEED_B, ACC)
        else:
            for o in tl.static_range(NUM_OUT):
                wo, bo = _weight_row(w_ptr, b_ptr, o, D, offs_d, dmask, HAS_BIAS, ACC)
                r = _residual(xt, wo, bo, t_ptr, res_ptr, loss_ptr, rows64, rmask, o, NUM_OUT,
                              HAS_BIAS, REDUCE, KEEP_RES, ACC)
                loss_acc += r * r
                if NEED_W:
                    gw += tl.where(offs_o[:, None] == o, tl.sum(r[:, None] * xt, axis=0)[None, :], 0.0)
                if NEED_B:
                    gb += tl.where(offs_o == o, tl.sum(r, axis=0), 0.0)
    if REDUCE:
        part = part_ptr + pid.to(tl.int64) * C
        bias_part = part + NUM_OUT * D
        if NUM_OUT <= 4:
            if NEED_W:
                tl.store(part + offs_d, tl.sum(g0, axis=0), mask=dmask)
                if NUM_OUT > 1:
                    tl.store(part + D + offs_d, tl.sum(g1, axis=0), mask=dmask)
                if NUM_OUT > 2:
                    tl.store(part + 2 * D + offs_d, tl.sum(g2, axis=0), mask=dmask)
                if NUM_OUT > 3:
                    tl.store(part + 3 * D + offs_d, tl.sum(g3, axis=0), mask=dmask)
            if NEED_B:
                tl.store(bias_part, tl.sum(s0, axis=0))
                if NUM_OUT > 1:
                    tl.store(bias_part + 1, tl.sum(s1, axis=0))
                if NUM_OUT > 2:
                    tl.store(bias_part + 2, tl.sum(s2, axis=0))
                if NUM_OUT > 3:
                    tl.store(bias_part + 3, tl.sum(s3, axis=0))
        else:
            omask = offs_o < NUM_OUT
            if NEED_W:
                tl.store(part + offs_o[:, None] * D + offs_d[None, :], gw, mask=omask[:, None] & dmask[None, :])
            if NEED_B:
                tl.store(bias_part + offs_o, gb, mask=omask)
        tl.store(bias_part + NUM_OUT, tl.sum(loss_acc, axis=0))


def _prune_rows_configs(configs, named_args, **kwargs):
    block_d = kwargs["BLOCK_D"]
    # O <= 4 holds O + 1 (BLOCK_N, BLOCK_D) tiles (x and each output's un-reduced r·x).
    tiles = kwargs["NUM_OUT"] + 1 if kwargs["NUM_OUT"] <= 4 else 1
    budget = 16384 if kwargs["ACC"] == tl.float32 else 8192
    kept = [c for c in configs if c.kwargs["BLOCK_N"] * block_d * tiles <= budget * c.num_warps // 4]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_N"])]


# Measured on an H100 (N = 2**20, D = 256, float32): 16-32 rows, 4 warps best for O = 1..4.
_ROWS_CONFIGS = [
    tt.cfg(4, 3, BLOCK_N=16),
    tt.cfg(4, 1, BLOCK_N=16),
    tt.cfg(4, 2, BLOCK_N=32),
    tt.cfg(8, 2, BLOCK_N=64),
    tt.cfg(4, 2, BLOCK_N=8),
    tt.cfg(4, 2, BLOCK_N=4),
]

_rows_tuned = triton.autotune(
    configs=_ROWS_CONFIGS,
    key=["N_BUCKET", "BLOCK_D", "NUM_OUT", "REDUCE", "NEED_W", "KEEP_RES"],
    prune_configs_by={"early_config_prune": _prune_rows_configs},
)(_rows_kernel)


@triton.jit
def _tiled_kernel(
    x_ptr,       # (N, D) inputs
    w_ptr,       # (O, D) weight
    b_ptr,       # (O,) bias (read only when HAS_BIAS)
    t_ptr,       # (N, O) target
    loss_ptr,    # (N, O) squared residual, written for reduction "none"
    res_ptr,     # (N, O) residual, written when KEEP_RES
    part_ptr,    # (P, C) zeroed partials when REDUCE: [rᵀx (O·D) | Σr (O) | Σr² (one per O block)]
    N, D, O, C,
    HAS_BIAS: tl.constexpr, REDUCE: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
    KEEP_RES: tl.constexpr, ONE_D: tl.constexpr,  # ONE_D: D <= BLOCK_D, x read once per row block
    ACC: tl.constexpr, PREC: tl.constexpr, USE_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    pid_o = tl.program_id(1)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    omask = offs_o < O
    offs_d = tl.arange(0, BLOCK_D)
    if REDUCE:
        part = part_ptr + pid.to(tl.int64) * C
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_o, mask=omask, other=0).to(ACC)
    if ONE_D:
        dmask1 = offs_d < D
        w_t = tl.load(w_ptr + offs_o[None, :].to(tl.int64) * D + offs_d[:, None],
                      mask=dmask1[:, None] & omask[None, :], other=0).to(ACC)  # (BLOCK_D, BLOCK_O) = Wᵀ
        gw = tl.zeros([BLOCK_O, BLOCK_D], ACC)
    loss_acc = tl.zeros([BLOCK_N, BLOCK_O], ACC)
    gb = tl.zeros([BLOCK_O], ACC)
    for rb in range(pid, tl.cdiv(N, BLOCK_N), nprog):
        rows = rb * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        rows64 = rows.to(tl.int64)
        pred = tl.zeros([BLOCK_N, BLOCK_O], ACC)
        if ONE_D:
            xt = tl.load(x_ptr + rows64[:, None] * D + offs_d[None, :],
                         mask=rmask[:, None] & dmask1[None, :], other=0).to(ACC)
            pred = tt.mm(xt, w_t, pred, PREC, USE_DOT)
        else:
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + offs_d
                dmask = dd < D
                xc = tl.load(x_ptr + rows64[:, None] * D + dd[None, :],
                             mask=rmask[:, None] & dmask[None, :], other=0).to(ACC)
                wc = tl.load(w_ptr + offs_o[None, :].to(tl.int64) * D + dd[:, None],
                             mask=dmask[:, None] & omask[None, :], other=0).to(ACC)
                pred = tt.mm(xc, wc, pred, PREC, USE_DOT)
        if HAS_BIAS:
            pred += bias[None, :]
        m2 = rmask[:, None] & omask[None, :]
        out_offs = rows64[:, None] * O + offs_o[None, :]
        t = tl.load(t_ptr + out_offs, mask=m2, other=0).to(ACC)
        r = tl.where(m2, pred - t, 0.0)
        if KEEP_RES:
            tl.store(res_ptr + out_offs, r.to(res_ptr.dtype.element_ty), mask=m2)
        if REDUCE:
            loss_acc += r * r
            if NEED_B:
                gb += tl.sum(r, axis=0)
            if NEED_W:
                r_t = tl.trans(r)
                if ONE_D:
                    gw = tt.mm(r_t, xt, gw, PREC, USE_DOT)
                else:
                    for d0 in range(0, D, BLOCK_D):
                        dd = d0 + offs_d
                        dmask = dd < D
                        xc = tl.load(x_ptr + rows64[:, None] * D + dd[None, :],
                                     mask=rmask[:, None] & dmask[None, :], other=0).to(ACC)
                        g = tt.mm(r_t, xc, tl.zeros([BLOCK_O, BLOCK_D], ACC), PREC, USE_DOT)
                        # This program's own slice of the buffer: no other program touches it.
                        ptrs = part + offs_o[:, None].to(tl.int64) * D + dd[None, :]
                        pm = omask[:, None] & dmask[None, :]
                        tl.store(ptrs, tl.load(ptrs, mask=pm, other=0) + g, mask=pm)
        else:
            tl.store(loss_ptr + out_offs, (r * r).to(loss_ptr.dtype.element_ty), mask=m2)
    if REDUCE:
        if NEED_W:
            if ONE_D:
                tl.store(part + offs_o[:, None].to(tl.int64) * D + offs_d[None, :], gw,
                         mask=omask[:, None] & dmask1[None, :])
        if NEED_B:
            tl.store(part + O * D + offs_o, gb, mask=omask)
        tl.store(part + O * D + O + pid_o, tl.sum(tl.sum(loss_acc, axis=1), axis=0))


def _uses_rows_kernel(d: int, o: int) -> bool:
    return o <= _ROWS_MAX_O and tt.next_pow2(d) <= _ROWS_MAX_D and tt.next_pow2(o) * tt.next_pow2(d) <= _ROWS_MAX_OD


def forward(x, weight, bias, target, reduction, need_weight_grad, need_bias_grad, keep_residual):
    n, d = x.shape
    o = weight.shape[0]
    new = x.new_empty
    reduce = reduction != "none"
    mean = reduction == "mean"
    loss = new(()) if reduce else new((n, o))
    residual = new((n, o)) if keep_residual else None
    need_w = reduce and bool(need_weight_grad)
    need_b = reduce and bool(need_bias_grad)
    grad_w = new((o, d)) if need_w else None
    grad_b = new((o,)) if need_b else None
    if n == 0 or o == 0:
        if reduce:
            loss.fill_(float("nan") if mean else 0.0)
            for g in (grad_w, grad_b):
                if g is not None:
                    g.zero_()
        return loss, residual, grad_w, grad_b

    acc = tt.acc_dtype(x.dtype)
    part_dtype = tt.torch_acc_dtype(x.dtype)
    interp = tt.interpreted()
    flags = dict(HAS_BIAS=bias is not None, REDUCE=reduce, NEED_W=need_w, NEED_B=need_b,
                 KEEP_RES=keep_residual, ACC=acc)
    loss_out = None if reduce else loss
    if _uses_rows_kernel(d, o):
        block_d = tt.block(d, 1 if interp else 16, _ROWS_MAX_D)
        C = o * d + o + 1
        n_programs = tt.persistent_programs(tt.cdiv(n, _MIN_BLOCK_N), x.device)
        part = x.new_empty((n_programs, C), dtype=part_dtype) if reduce else None
        args = (x, weight, bias, target, loss_out, residual, part, n, d, C, tt.size_bucket(n))
        meta = dict(NUM_OUT=o, BLOCK_O=tt.next_pow2(o), BLOCK_D=block_d, **flags)
        if interp:
            block_n = tt.block(tt.cdiv(n, n_programs), 1, max(16, 8192 // block_d))
            _rows_kernel[(n_programs,)](*args, **meta, BLOCK_N=block_n, num_warps=4)
        elif n * max(d, o) < _AUTOTUNE_MIN_ELEMENTS:
            block_n = max(_MIN_BLOCK_N, min(64, tt.prev_pow2(4096 // (block_d * (o + 1 if o <= 4 else 1)))))
            _rows_kernel[(n_programs,)](*args, **meta, BLOCK_N=block_n, num_warps=4, num_stages=2)
        else:
            key = (tt.size_bucket(n), block_d, o, x.dtype, *flags.values())
            tt.launch_tuned(_rows_tuned, _rows_kernel, (n_programs,), key, *args, **meta)
    else:
        use_dot = tt.use_dot(x.dtype)
        if interp:
            block_n, block_o, block_d = tt.block(n, 16, 64), tt.block(o, 16, 64), tt.block(d, 16, 128)
        elif use_dot:
            block_n, block_o = 64, tt.block(o, 16, 64)
            block_d = tt.block(d, 16, 64 if block_o == 64 else 128)
        else:
            block_n, block_o, block_d = 16, 16, 16
        n_oblocks = tt.cdiv(o, block_o)
        C = o * d + o + n_oblocks
        row_programs = tt.persistent_programs(tt.cdiv(n, block_n), x.device)
        row_programs = max(1, min(row_programs // n_oblocks if not interp else row_programs,
                                  (1 << 25) // C))
        part = torch.zeros((row_programs, C), dtype=part_dtype, device=x.device) if reduce else None
        _tiled_kernel[(row_programs, n_oblocks)](
            x, weight, bias, target, loss_out, residual, part, n, d, o, C,
            ONE_D=d <= block_d, PREC=tt.upcast_dot_precision(x.dtype), USE_DOT=use_dot,
            BLOCK_N=block_n, BLOCK_O=block_o, BLOCK_D=block_d, **flags,
            num_warps=4 if interp else 8, num_stages=1 if interp else 2)
    if reduce:
        tt.reduce_partials(part, o * d + o, o * d, n * o, mean,
                           grad_w.view(-1) if need_w else None, grad_b, loss)
    return loss, residual, grad_w, grad_b


@triton.jit
def _sgd_epoch_kernel(
    x_ptr,       # (N, D) inputs
    t_ptr,       # (N, O) targets
    order_ptr,   # (N,) int64 row order of the epoch
    w_ptr,       # (O, D) weight, updated in place after every batch
    b_ptr,       # (O,) bias, updated in place (when HAS_BIAS)
    r_ptr,       # (BATCH, O) scratch: the current batch's residuals, accumulation dtype
    N, D, O, BATCH,
    alpha_hi, alpha_lo,  # lr / batch_size as a float32 pair (see fastml._triton.split_float)
    HAS_BIAS: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, USE_DOT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program, the whole epoch. Per batch: (1) residuals of the batch's rows with the
    current weights into the scratch, (2) w -= alpha·rᵀx_b, b -= alpha·Σr. Barriers order the
    phases, since different threads write and read the scratch and the weights."""
    alpha = (tl.zeros([], ACC) + alpha_hi) + alpha_lo
    DTYPE = x_ptr.dtype.element_ty
    offs_b = tl.arange(0, BLOCK_B)
    offs_d = tl.arange(0, BLOCK_D)
    offs_o0 = tl.arange(0, BLOCK_O)
    for start in range(0, N, BATCH):
        nb = tl.minimum(N - start, BATCH)
        # (1) residuals with the weights before this batch's update
        for sb in range(0, nb, BLOCK_B):
            bi = sb + offs_b
            bmask = bi < nb
            rows = tl.load(order_ptr + start + bi, mask=bmask, other=0).to(tl.int64)
            for o0 in range(0, O, BLOCK_O):
                offs_o = o0 + offs_o0
                omask = offs_o < O
                pred = tl.zeros([BLOCK_B, BLOCK_O], ACC)
                for d0 in range(0, D, BLOCK_D):
                    dd = d0 + offs_d
                    dmask = dd < D
                    xc = tl.load(x_ptr + rows[:, None] * D + dd[None, :],
                                 mask=bmask[:, None] & dmask[None, :], other=0).to(ACC)
                    wc = tl.load(w_ptr + offs_o[None, :] * D + dd[:, None],
                                 mask=dmask[:, None] & omask[None, :], other=0).to(ACC)
                    pred = tt.mm(xc, wc, pred, PREC, USE_DOT)
                # Round where the reference rounds (a no-op for float32 / float64 inputs).
                pred = pred.to(DTYPE).to(ACC)
                if HAS_BIAS:
                    pred = (pred + tl.load(b_ptr + offs_o, mask=omask, other=0).to(ACC)[None, :]).to(DTYPE).to(ACC)
                m2 = bmask[:, None] & omask[None, :]
                t = tl.load(t_ptr + rows[:, None] * O + offs_o[None, :], mask=m2, other=0).to(ACC)
                r = tl.where(m2, pred - t, 0.0).to(DTYPE).to(ACC)
                tl.store(r_ptr + bi[:, None] * O + offs_o[None, :], r, mask=m2)
        tl.debug_barrier()
        # (2) the update, from the stored residuals
        for o0 in range(0, O, BLOCK_O):
            offs_o = o0 + offs_o0
            omask = offs_o < O
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + offs_d
                dmask = dd < D
                g = tl.zeros([BLOCK_O, BLOCK_D], ACC)
                for sb in range(0, nb, BLOCK_B):
                    bi = sb + offs_b
                    bmask = bi < nb
                    rows = tl.load(order_ptr + start + bi, mask=bmask, other=0).to(tl.int64)
                    xc = tl.load(x_ptr + rows[:, None] * D + dd[None, :],
                                 mask=bmask[:, None] & dmask[None, :], other=0).to(ACC)
                    r_t = tl.load(r_ptr + bi[None, :] * O + offs_o[:, None],
                                  mask=bmask[None, :] & omask[:, None], other=0)
                    g = tt.mm(r_t, xc, g, PREC, USE_DOT)
                wm = omask[:, None] & dmask[None, :]
                wp = w_ptr + offs_o[:, None] * D + dd[None, :]
                w = tl.load(wp, mask=wm, other=0).to(ACC)
                tl.store(wp, (w - alpha * g.to(DTYPE).to(ACC)).to(DTYPE), mask=wm)
            if HAS_BIAS:
                gsum = tl.zeros([BLOCK_O], ACC)
                for sb in range(0, nb, BLOCK_B):
                    bi = sb + offs_b
                    bmask = bi < nb
                    r = tl.load(r_ptr + bi[:, None] * O + offs_o[None, :],
                                mask=bmask[:, None] & omask[None, :], other=0)
                    gsum += tl.sum(r, axis=0)
                bias = tl.load(b_ptr + offs_o, mask=omask, other=0).to(ACC)
                tl.store(b_ptr + offs_o, (bias - alpha * gsum.to(DTYPE).to(ACC)).to(DTYPE), mask=omask)
        tl.debug_barrier()


def sgd_epoch(x, target, order, weight, bias, lr, batch_size):
    n, d = x.shape
    o = weight.shape[0]
    batch_size = int(batch_size)
    if n == 0 or o == 0 or d == 0 and bias is None:
        return
    interp = tt.interpreted()
    use_dot = tt.use_dot(x.dtype)
    if use_dot:
        block_b = tt.block(batch_size, 16, 128 if interp else 64)
        block_o = tt.block(o, 16, 64 if interp else 32)
        block_d = tt.block(d, 16, 128 if interp else 64)
    else:
        block_b, block_o, block_d = 16, tt.block(o, 1, 16), tt.block(d, 1, 16)
    scratch = x.new_empty((min(batch_size, n), o), dtype=tt.torch_acc_dtype(x.dtype))
    alpha_hi, alpha_lo = tt.split_float(float(lr) / batch_size)
    order = order.contiguous()
    _sgd_epoch_kernel[(1,)](
        x, target, order, weight, bias, scratch, n, d, o, batch_size, alpha_hi, alpha_lo,
        HAS_BIAS=bias is not None, ACC=tt.acc_dtype(x.dtype), PREC=tt.upcast_dot_precision(x.dtype),
        USE_DOT=use_dot, BLOCK_B=block_b, BLOCK_O=block_o, BLOCK_D=block_d,
        num_warps=4, num_stages=1)
