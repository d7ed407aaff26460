"""Adafactor, both flavours (ALGORITHMS.md section 3): torch.optim.Adafactor's (`adafactor`) and
transformers' (`adafactor_transformers`), in five launches per call whatever the number and mix
of tensors. Same math as csrc/include/fused_optim/math/adafactor.h, function for function: the
jit functions below named as the header's are THE per-element / per-tensor formulas here.

A param with ndim >= 2 is B matrices of n x m (its last two dims; leading dims are batch), a
param with ndim < 2 keeps a full second moment v. The five passes (header, "phases"):
  1 stats    per work item: a tile of one matrix (TILE_R x TILE_C) writes its partial row and
             column sums of s; a flat chunk of a full tensor updates v in place. Both write a
             partial sum of theta^2.
  2 factors  per matrix: row/col partials combined in a fixed order (fp64), the row/col states
             updated, the factors rf_i, cf_j written to an fp32 scratch.
  3 unorm    per work item: partial sum of u^2 (u recomputed from g and the factors / v).
  4 scalars  per tensor: partials combined in a fixed order (fp64) -> RMS(theta), RMS(u), the
             apply scalars; writes the RMS state and advances the step. Earlier passes read the
             OLD step + 1; only this pass writes it.
  5 apply    per work item: theta (and transformers' momentum) updated, u recomputed.
No float atomics: every partial has one writer and is combined in a fixed order, so results are
bitwise deterministic.

Plans (records, work items, scratch buffers) are built once per set of tensors and cached like
_adam.py's; a cached step computes its key and launches. lr and the step are read on the device.
"""

import torch
import triton
import triton.language as tl

from . import _common, _plan
from ._common import INTERPRETED

# Tile of one matrix in passes 1, 3 and 5 (fixed: never derived from the shapes, so shapes,
# lr and the step never recompile). A full tensor's work item is a flat chunk of CHUNK.
TILE_R = 32
TILE_C = 256
# Rows of a tile processed at once: 8 bounds the registers of compiled kernels; the interpreter,
# whose cost is per operation, takes whole tiles (the loop over sub-blocks is tested by setting 8).
SUB_R = TILE_R if INTERPRETED.value else 8
BLOCK = _plan.BLOCK
TILES = _plan.TILES
CHUNK = BLOCK * TILES
# Pass 2 combines BLOCK_I rows x PART_I column blocks, or BLOCK_J columns x PART_J row blocks,
# per load: a tall matrix has many row blocks, summed a [PART_J, BLOCK_J] block at a time rather
# than in a chain of dependent loads.
BLOCK_I, PART_I = 1024, 8
BLOCK_J, PART_J = 256, 32
BLOCK_S = 256  # partials per iteration in pass 4
NUM_WARPS = 8  # 32 elements of a tile per thread: registers for their pointers and values

# Record words (int64), one record of RECORD words per tensor. Role offsets are element offsets
# from the role's base pointer (see _plan.py); the rest describe the tensor's matrices and where
# its partials and factors live in the scratch buffers.
RECORD = 24
_NUMEL = tl.constexpr(0)
_PARAM = tl.constexpr(1)
_GRAD = tl.constexpr(2)
_ROW = tl.constexpr(3)
_COL = tl.constexpr(4)
_VAR = tl.constexpr(5)
_EXP_AVG = tl.constexpr(6)
_RMS = tl.constexpr(7)
_STEP = tl.constexpr(8)
_FACTORED = tl.constexpr(9)
_N = tl.constexpr(10)  # rows of each matrix
_M = tl.constexpr(11)  # columns of each matrix
_NRB = tl.constexpr(12)  # row blocks (tiles down a matrix)
_NCB = tl.constexpr(13)  # column blocks (tiles across a matrix)
_FIRST = tl.constexpr(14)  # its first work item of passes 1, 3, 5
_COUNT = tl.constexpr(15)  # its number of work items
_ROW_PART = tl.constexpr(16)  # row partials: [B, NCB, N] from here
_COL_PART = tl.constexpr(17)  # column partials: [B, NRB, M] from here
_RF = tl.constexpr(18)  # row factors: [B, N] from here
_CF = tl.constexpr(19)  # column factors: [B, M] from here
# FSDP2 shards (the step in three calls, PHASE 1, 2, 3; kernel_args.h: AdafactorArgs::phase): the
# whole param's numel and rows of each matrix, and where its first matrix's [sum of r, column
# sums] go in the sums. In one process: numel, N and unused.
_GLOBAL_NUMEL = tl.constexpr(20)
_GLOBAL_N = tl.constexpr(21)
_STATS_AT = tl.constexpr(22)


def _device_fn(fn):
    """triton.jit for the device functions of this file. Under TRITON_INTERPRET=1 the plain
    function instead, called directly by the interpreted kernels (triton.language is patched for
    the whole launch): the interpreter re-patches triton.language on every call of a jit function,
    about a millisecond each, which was most of an interpreted step here."""
    return fn if INTERPRETED.value else triton.jit(fn)


def _direct(jit_fn):
    """A device function of _common, called the same way as _device_fn's under the interpreter."""
    return jit_fn.fn if INTERPRETED.value else jit_fn


f64, role_ptr, to_storage, work_item = map(
    _direct, (_common.f64, _common.role_ptr, _common.to_storage, _common.work_item)
)


# ---- THE math: one jit function per function of math/adafactor.h ----------------------------


@_device_fn
def adafactor_stat_weights(t, decay):
    """(w, keep): w = t^decay, the weight of the new mean, and keep = 1 - w (transformers'
    beta2t), each rounded to fp32 from fp64. t >= 1, so pow is exp(decay * log t) (exact 1 at
    t = 1, where the lerp then takes the new mean exactly)."""
    w = tl.exp(decay * tl.log(t))
    return w.to(tl.float32), (1.0 - w).to(tl.float32)


@_device_fn
def lerp(a, b, w):
    """torch.lerp's two-sided formula (exact at w = 1)."""
    return tl.where(tl.abs(w) < 0.5, a + w * (b - a), b - (b - a) * (1.0 - w))


@_device_fn
def adafactor_stat_update(old, mean, w, keep, TRANSFORMERS: tl.constexpr):
    """The new second-moment statistic from its old value and the new mean of s."""
    if TRANSFORMERS:
        new = keep * old + w * mean
    else:
        new = lerp(old, mean, w)
    return new


@_device_fn
def adafactor_square(g, eps1_add):
    """s of one gradient element (eps1_add: transformers' eps1, 0 for torch)."""
    return g * g + eps1_add


@_device_fn
def rsqrt_ieee(x):
    """1 / sqrt(x) with IEEE division and square root (NaN propagates)."""
    return tl.div_rn(1.0, tl.sqrt_rn(x))


@_device_fn
def clamp_min_nan(x, floor):
    """max(x, floor) that keeps a NaN x (a select, not a max)."""
    return tl.where(x < floor, floor, x)


@_device_fn
def clamp_max_nan(x, cap):
    """min(x, cap) that keeps a NaN x (a select, not a min)."""
    return tl.where(x > cap, cap, x)


@_device_fn
def adafactor_row_factor(r, mean_r, eps1, TRANSFORMERS: tl.constexpr):
    """rr_i = rsqrt(r_i / mean r) (torch: mean r clamped at eps1 first), fp32."""
    if TRANSFORMERS:
        rr = rsqrt_ieee(tl.div_rn(r, mean_r))
    else:
        rr = rsqrt_ieee(tl.div_rn(r, clamp_min_nan(mean_r, eps1)))
    return rr


@_device_fn
def adafactor_col_factor(c):
    """rc_j = rsqrt(c_j)."""
    return rsqrt_ieee(c)


@_device_fn
def adafactor_u_cap(eps1, TRANSFORMERS: tl.constexpr):
    """The cap of u / g: torch clamps the estimate at eps1^2, i.e. its rsqrt at 1 / eps1 (fp64
    in, fp32 out); transformers does not clamp."""
    if TRANSFORMERS:
        cap = tl.full([], float("inf"), tl.float32)
    else:
        cap = (1.0 / eps1).to(tl.float32)
    return cap


@_device_fn
def adafactor_u_factored(g, rr, rc, cap):
    """u of a factored element: two multiplies and a select (the factors were rsqrt'ed and
    normalised before they meet: the precision rule)."""
    return g * clamp_max_nan(rr * rc, cap)


@_device_fn
def adafactor_u_full(g, v, cap):
    """u of a full tensor's element."""
    return g * clamp_max_nan(rsqrt_ieee(v), cap)


@_device_fn
def adafactor_apply_scalars(
    sum_theta_sq,
    sum_u_sq,
    numel,
    t,
    lr,
    eps2,
    d,
    weight_decay,
    TRANSFORMERS: tl.constexpr,
    RELATIVE_STEP: tl.constexpr,
    WARMUP_INIT: tl.constexpr,
    SCALE_PARAMETER: tl.constexpr,
):
    """Pass 4: (scale, decay, RMS(theta)) of a tensor from fp64 sums, its numel, the new step
    t and lr (fp64). scale is u's factor alpha / max(1, RMS(u) / d); decay is torch's
    theta *= (1 - lr * wd) factor or transformers' theta -= decay * theta one. d is torch's d or
    transformers' clip_threshold."""
    n = numel.to(tl.float64)
    # RMS in fp32, as the peers take x.norm() / sqrt(numel) in fp32.
    rms = (tl.sqrt(sum_theta_sq) / tl.sqrt(n)).to(tl.float32)
    rms_u = (tl.sqrt(sum_u_sq) / tl.sqrt(n)).to(tl.float32)
    inv_sqrt_t = 1.0 / tl.sqrt(t)
    if not TRANSFORMERS:
        rho = tl.minimum(lr, inv_sqrt_t)
    elif RELATIVE_STEP:
        if WARMUP_INIT:
            rho = tl.minimum(1e-6 * t, inv_sqrt_t)
        else:
            rho = tl.minimum(tl.full([], 1e-2, tl.float64), inv_sqrt_t)
    else:
        rho = lr
    alpha = rho.to(tl.float32)
    if (not TRANSFORMERS) or SCALE_PARAMETER:
        alpha = clamp_min_nan(rms, eps2.to(tl.float32)) * alpha
    denom = clamp_min_nan(tl.div_rn(rms_u, d.to(tl.float32)), 1.0)
    scale = tl.div_rn(alpha, denom)
    # Exactly "no decay" without weight decay, even where lr or alpha is inf (inf * 0 = NaN).
    if TRANSFORMERS:
        decay = tl.where(weight_decay != 0.0, weight_decay.to(tl.float32) * alpha, 0.0)
    else:
        decay = tl.where(weight_decay != 0.0, (1.0 - lr * weight_decay).to(tl.float32), 1.0)
    return scale, decay, rms


@_device_fn
def adafactor_apply(
    theta,
    u,
    m,
    scale,
    decay,
    has_wd,
    beta1,
    one_minus_beta1,
    TRANSFORMERS: tl.constexpr,
    HAS_BETA1: tl.constexpr,
):
    """Pass 5 for one element: the new theta and (transformers with beta1) momentum m. torch's
    decay factor is exactly 1 without weight decay; transformers' decay is skipped then (not
    theta - 0 * theta: an inf theta must not become NaN)."""
    if not TRANSFORMERS:
        theta = theta * decay - scale * u
    else:
        step = scale * u
        if HAS_BETA1:
            m = beta1 * m + one_minus_beta1 * step
            step = m
        theta = tl.where(has_wd, theta - decay * theta, theta)
        theta = theta - step
    return theta, m


# ---- Helpers of the kernels --------------------------------------------------------------


@_device_fn
def _grad_multiplier(
    grad_scale_ptr,
    clip_coef_ptr,
    MAXIMIZE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_CLIP: tl.constexpr,
):
    """Sign, GradScaler unscale and clip as one factor (math/adam.h grad_multiplier)."""
    if MAXIMIZE:
        mult = tl.full([], -1.0, tl.float32)
    else:
        mult = tl.full([], 1.0, tl.float32)
    if HAS_GRAD_SCALE:
        mult = tl.div_rn(mult, tl.load(grad_scale_ptr))
    if HAS_CLIP:
        mult = mult * tl.load(clip_coef_ptr)
    return mult


@_device_fn
def _proceed(found_inf_ptr, HAS_FOUND_INF: tl.constexpr):
    """False when GradScaler saw inf/NaN: then no pass writes anything (the step included)."""
    if HAS_FOUND_INF:
        ok = tl.load(found_inf_ptr) == 0.0
    else:
        ok = True
    return ok


@_device_fn
def _new_step(step_ptr, record):
    """t = OLD step + 1 in fp64 (pass 4 alone writes the step)."""
    return tl.load(role_ptr(step_ptr, record, _STEP, 0, False)).to(tl.float64) + 1.0


@_device_fn
def _tile_origin(record, k, TILE_R: tl.constexpr):
    """Work item k of a factored tensor: its matrix b, row block rb and column block cb, the
    matrix's n and m, and the number of the tile's rows inside the matrix."""
    n = tl.load(record + _N)
    m = tl.load(record + _M)
    nrb = tl.load(record + _NRB)
    ncb = tl.load(record + _NCB)
    per_matrix = nrb * ncb
    b = k // per_matrix
    rest = k - b * per_matrix
    rb = rest // ncb
    cb = rest - rb * ncb
    n_rows = tl.minimum(n - rb * TILE_R, TILE_R)
    return b, rb, cb, n, m, n_rows


@_device_fn
def _tile_rows(b, rb, cb, n, m, r0, SUB_R: tl.constexpr, TILE_R: tl.constexpr, TILE_C: tl.constexpr):
    """Rows r0 .. r0 + SUB_R of a tile: row and column indices in the matrix, their masks, and
    the element offsets (int64) inside the param. A tile is walked SUB_R rows at a time, which
    bounds the registers that per-element pointers take."""
    rows = rb * TILE_R + r0 + tl.arange(0, SUB_R)
    cols = cb * TILE_C + tl.arange(0, TILE_C)
    row_ok = rows < n
    col_ok = cols < m
    mask = row_ok[:, None] & col_ok[None, :]
    offs = b * n * m + rows[:, None] * m + cols[None, :]
    return rows, cols, row_ok, col_ok, mask, offs


@_device_fn
def _factor_ptrs(factors_ptr, record, b):
    """Pointers to matrix b's row factors and column factors in the scratch."""
    rf = factors_ptr + tl.load(record + _RF) + b * tl.load(record + _N)
    cf = factors_ptr + tl.load(record + _CF) + b * tl.load(record + _M)
    return rf, cf


# ---- Pass 1: statistics ------------------------------------------------------------------
# Each pass's work on a matrix tile and on a full tensor's chunk is its own function: the two
# branches of a runtime `if` may not bind one name to values of different shapes.


@_device_fn
def _stats_tile(
    p,
    g,
    row_part_ptr,
    col_part_ptr,
    record,
    k,
    mult,
    eps1_add,
    SUB_R: tl.constexpr,
    TILE_R: tl.constexpr,
    TILE_C: tl.constexpr,
):
    """Partial row and column sums of s over the tile (fp32 within the tile); returns its
    partial sum of theta^2."""
    b, rb, cb, n, m, n_rows = _tile_origin(record, k, TILE_R)
    row_part = row_part_ptr + tl.load(record + _ROW_PART) + (b * tl.load(record + _NCB) + cb) * n
    col_part = col_part_ptr + tl.load(record + _COL_PART) + (b * tl.load(record + _NRB) + rb) * m
    col_acc = tl.zeros([TILE_C], tl.float32)
    theta_acc = tl.zeros([SUB_R, TILE_C], tl.float32)
    for r0 in range(0, n_rows, SUB_R):
        rows, cols, row_ok, col_ok, mask, offs = _tile_rows(b, rb, cb, n, m, r0, SUB_R, TILE_R, TILE_C)
        grad = tl.load(g + offs, mask=mask, other=0.0).to(tl.float32) * mult
        s = tl.where(mask, adafactor_square(grad, eps1_add), 0.0)
        tl.store(row_part + rows, tl.sum(s, 1), mask=row_ok)
        col_acc += tl.sum(s, 0)
        theta = tl.load(p + offs, mask=mask, other=0.0).to(tl.float32)
        theta_acc += theta * theta
    cols = cb * TILE_C + tl.arange(0, TILE_C)
    tl.store(col_part + cols, col_acc, mask=cols < m)
    return tl.sum(tl.sum(theta_acc, 1), 0)


@_device_fn
def _stats_chunk(
    p,
    g,
    var_ptr,
    step_ptr,
    record,
    k,
    mult,
    eps1_add,
    decay,
    TRANSFORMERS: tl.constexpr,
    BLOCK: tl.constexpr,
    TILES: tl.constexpr,
):
    """v <- update(v, s) in place over chunk k of a full tensor; returns its partial sum of
    theta^2."""
    w, keep = adafactor_stat_weights(_new_step(step_ptr, record), decay)
    CHUNK: tl.constexpr = BLOCK * TILES
    start = k * CHUNK
    rest = tl.minimum(tl.load(record + _NUMEL) - start, CHUNK)
    p += start
    g += start
    v = role_ptr(var_ptr, record, _VAR, start, False)
    arange = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for j in range(tl.cdiv(rest, BLOCK)):
        offs = j * BLOCK + arange
        mask = offs < rest
        grad = tl.load(g + offs, mask=mask, other=0.0).to(tl.float32) * mult
        old = tl.load(v + offs, mask=mask, other=0.0).to(tl.float32)
        new = adafactor_stat_update(old, adafactor_square(grad, eps1_add), w, keep, TRANSFORMERS)
        tl.store(v + offs, to_storage(new, v), mask=mask)
        theta = tl.load(p + offs, mask=mask, other=0.0).to(tl.float32)
        acc += theta * theta
    return tl.sum(acc, 0)


_STATS_SCALARS = ["eps1_bits", "decay_bits"]


@triton.jit(do_not_specialize=_STATS_SCALARS)
def _stats_kernel(
    items_ptr,
    meta_ptr,
    param_ptr,
    grad_ptr,
    var_ptr,
    step_ptr,
    row_part_ptr,
    col_part_ptr,
    theta_part_ptr,
    grad_scale_ptr,
    found_inf_ptr,
    clip_coef_ptr,
    eps1_bits: tl.int64,
    decay_bits: tl.int64,
    RECORD: tl.constexpr,
    SUB_R: tl.constexpr,
    TILE_R: tl.constexpr,
    TILE_C: tl.constexpr,
    BLOCK: tl.constexpr,
    TILES: tl.constexpr,
    TRANSFORMERS: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_CLIP: tl.constexpr,
):
    """Pass 1, one program per work item: a matrix tile or a full tensor's chunk. Writes the
    item's partial sum of theta^2 to theta_part[pid]."""
    if _proceed(found_inf_ptr, HAS_FOUND_INF):
        tensor, record, k = work_item(items_ptr, meta_ptr, RECORD)
        mult = _grad_multiplier(grad_scale_ptr, clip_coef_ptr, MAXIMIZE, HAS_GRAD_SCALE, HAS_CLIP)
        if TRANSFORMERS:
            eps1_add = f64(eps1_bits).to(tl.float32)
        else:
            eps1_add = tl.full([], 0.0, tl.float32)
        p = role_ptr(param_ptr, record, _PARAM, 0, False)
        g = role_ptr(grad_ptr, record, _GRAD, 0, False)
        if tl.load(record + _FACTORED) != 0:
            partial = _stats_tile(
                p, g, row_part_ptr, col_part_ptr, record, k, mult, eps1_add, SUB_R, TILE_R, TILE_C
            )
        else:
            partial = _stats_chunk(
                p,
                g,
                var_ptr,
                step_ptr,
                record,
                k,
                mult,
                eps1_add,
                f64(decay_bits),
                TRANSFORMERS,
                BLOCK,
                TILES,
            )
        tl.store(theta_part_ptr + tl.program_id(0), partial)


# ---- Pass 2: factors ---------------------------------------------------------------------


@_device_fn
def _sum_partials(part, stride, count, idx, ok, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    """sum over k < count of part[k * stride + idx], in fp64 and a fixed order: BLOCK_K partials
    at a time, each block summed as a tree, the blocks in order."""
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_V], tl.float64)
    for k0 in range(0, count, BLOCK_K):
        k = k0 + ks
        mask = (k < count)[:, None] & ok[None, :]
        x = tl.load(part + k[:, None] * stride + idx[None, :], mask=mask, other=0.0)
        acc += tl.sum(x.to(tl.float64), 0)
    return acc


@triton.jit(do_not_specialize=_STATS_SCALARS)
def _factors_kernel(
    mat_items_ptr,
    meta_ptr,
    row_ptr,
    col_ptr,
    step_ptr,
    row_part_ptr,
    col_part_ptr,
    factors_ptr,
    sums_ptr,
    found_inf_ptr,
    eps1_bits: tl.int64,
    decay_bits: tl.int64,
    RECORD: tl.constexpr,
    BLOCK_I: tl.constexpr,
    PART_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    PART_J: tl.constexpr,
    TRANSFORMERS: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    PHASE: tl.constexpr,
):
    """One program per matrix: means of s from the partials (fixed order, fp64), the row and
    column states updated, then rf_i (once mean r is known) and cf_j into the scratch.
    A shard's PHASE 1 stops at the new row statistics (kept in rf) and writes [their sum, the
    column sums] to the sums; its PHASE 2 takes the factors from the whole sums."""
    if _proceed(found_inf_ptr, HAS_FOUND_INF):
        tensor, record, b = work_item(mat_items_ptr, meta_ptr, RECORD)
        n = tl.load(record + _N)
        m = tl.load(record + _M)
        nrb = tl.load(record + _NRB)
        ncb = tl.load(record + _NCB)
        w, keep = adafactor_stat_weights(_new_step(step_ptr, record), f64(decay_bits))
        eps1 = f64(eps1_bits).to(tl.float32)
        row = role_ptr(row_ptr, record, _ROW, b * n, False)
        col = role_ptr(col_ptr, record, _COL, b * m, False)
        rf, cf = _factor_ptrs(factors_ptr, record, b)
        row_part = row_part_ptr + tl.load(record + _ROW_PART) + b * ncb * n
        col_part = col_part_ptr + tl.load(record + _COL_PART) + b * nrb * m
        # the whole matrix's rows; [sum of r, column sums] in the sums
        global_n = tl.load(record + _GLOBAL_N).to(tl.float64)
        stats = sums_ptr + tl.load(record + _STATS_AT) + b * (m + 1)

        rows = tl.arange(0, BLOCK_I)
        if PHASE != 2:
            sum_r = tl.zeros([BLOCK_I], tl.float64)
            for i0 in range(0, n, BLOCK_I):
                i = i0 + rows
                ok = i < n
                acc = _sum_partials(row_part, n, ncb, i, ok, PART_I, BLOCK_I)
                mean = (acc / m.to(tl.float64)).to(tl.float32)
                old = tl.load(row + i, mask=ok, other=0.0).to(tl.float32)
                r = adafactor_stat_update(old, mean, w, keep, TRANSFORMERS)
                tl.store(row + i, to_storage(r, row), mask=ok)
                tl.store(rf + i, r, mask=ok)  # replaced by the factor below, once mean r is known
                sum_r += tl.where(ok, r.to(tl.float64), 0.0)
            if PHASE == 1:
                tl.store(stats, tl.sum(sum_r, 0))
            else:
                mean_r = (tl.sum(sum_r, 0) / n.to(tl.float64)).to(tl.float32)
        else:
            mean_r = (tl.load(stats) / global_n).to(tl.float32)
        if PHASE != 1:
            tl.debug_barrier()  # the fp32 r written above is read back by other threads
            for i0 in range(0, n, BLOCK_I):
                i = i0 + rows
                ok = i < n
                r = tl.load(rf + i, mask=ok, other=1.0)
                tl.store(rf + i, adafactor_row_factor(r, mean_r, eps1, TRANSFORMERS), mask=ok)

        cols = tl.arange(0, BLOCK_J)
        for j0 in range(0, m, BLOCK_J):
            j = j0 + cols
            ok = j < m
            if PHASE == 0:
                acc = _sum_partials(col_part, m, nrb, j, ok, PART_J, BLOCK_J)
                mean = (acc / n.to(tl.float64)).to(tl.float32)
            elif PHASE == 1:
                tl.store(stats + 1 + j, _sum_partials(col_part, m, nrb, j, ok, PART_J, BLOCK_J), mask=ok)
            else:
                mean = (tl.load(stats + 1 + j, mask=ok, other=0.0) / global_n).to(tl.float32)
            if PHASE != 1:
                old = tl.load(col + j, mask=ok, other=0.0).to(tl.float32)
                c = adafactor_stat_update(old, mean, w, keep, TRANSFORMERS)
                tl.store(col + j, to_storage(c, col), mask=ok)
                c = tl.where(ok, c, 1.0)  # lanes past the matrix: no 1/0
                tl.store(cf + j, adafactor_col_factor(c), mask=ok)


# ---- Pass 3: norm of u -------------------------------------------------------------------


@_device_fn
def _u_rows(
    g,
    rf,
    cf,
    b,
    rb,
    cb,
    n,
    m,
    r0,
    mult,
    cap,
    TRANSFORMERS: tl.constexpr,
    SUB_R: tl.constexpr,
    TILE_R: tl.constexpr,
    TILE_C: tl.constexpr,
):
    """u over rows r0 .. r0 + SUB_R of a matrix tile (0 outside the matrix), with their mask
    and element offsets."""
    rows, cols, row_ok, col_ok, mask, offs = _tile_rows(b, rb, cb, n, m, r0, SUB_R, TILE_R, TILE_C)
    grad = tl.load(g + offs, mask=mask, other=0.0).to(tl.float32) * mult
    f1 = tl.load(rf + rows, mask=row_ok, other=1.0)
    f2 = tl.load(cf + cols, mask=col_ok, other=1.0)
    u = adafactor_u_factored(grad, f1[:, None], f2[None, :], cap)
    return tl.where(mask, u, 0.0), mask, offs


@_device_fn
def _unorm_tile(
    g,
    factors_ptr,
    record,
    k,
    mult,
    cap,
    TRANSFORMERS: tl.constexpr,
    SUB_R: tl.constexpr,
    TILE_R: tl.constexpr,
    TILE_C: tl.constexpr,
):
    b, rb, cb, n, m, n_rows = _tile_origin(record, k, TILE_R)
    rf, cf = _factor_ptrs(factors_ptr, record, b)
    acc = tl.zeros([SUB_R, TILE_C], tl.float32)
    for r0 in range(0, n_rows, SUB_R):
        u, mask, offs = _u_rows(
            g, rf, cf, b, rb, cb, n, m, r0, mult, cap, TRANSFORMERS, SUB_R, TILE_R, TILE_C
        )
        acc += u * u
    return tl.sum(tl.sum(acc, 1), 0)


@_device_fn
def _u_block(g, v, offs, mask, mult, cap, TRANSFORMERS: tl.constexpr):
    """u over one block of a full tensor's chunk (0 outside the tensor)."""
    grad = tl.load(g + offs, mask=mask, other=0.0).to(tl.float32) * mult
    var = tl.load(v + offs, mask=mask, other=1.0).to(tl.float32)
    return tl.where(mask, adafactor_u_full(grad, var, cap), 0.0)


@_device_fn
def _unorm_chunk(
    g, var_ptr, record, k, mult, cap, TRANSFORMERS: tl.constexpr, BLOCK: tl.constexpr, TILES: tl.constexpr
):
    CHUNK: tl.constexpr = BLOCK * TILES
    start = k * CHUNK
    rest = tl.minimum(tl.load(record + _NUMEL) - start, CHUNK)
    v = role_ptr(var_ptr, record, _VAR, start, False)
    arange = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for j in range(tl.cdiv(rest, BLOCK)):
        offs = j * BLOCK + arange
        u = _u_block(g + start, v, offs, offs < rest, mult, cap, TRANSFORMERS)
        acc += u * u
    return tl.sum(acc, 0)


@triton.jit(do_not_specialize=["eps1_bits"])
def _unorm_kernel(
    items_ptr,
    meta_ptr,
    grad_ptr,
    var_ptr,
    factors_ptr,
    u_part_ptr,
    grad_scale_ptr,
    found_inf_ptr,
    clip_coef_ptr,
    eps1_bits: tl.int64,
    RECORD: tl.constexpr,
    SUB_R: tl.constexpr,
    TILE_R: tl.constexpr,
    TILE_C: tl.constexpr,
    BLOCK: tl.constexpr,
    TILES: tl.constexpr,
    TRANSFORMERS: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_CLIP: tl.constexpr,
):
    """Pass 3, one program per work item: its partial sum of u^2 to u_part[pid]."""
    if _proceed(found_inf_ptr, HAS_FOUND_INF):
        tensor, record, k = work_item(items_ptr, meta_ptr, RECORD)
        mult = _grad_multiplier(grad_scale_ptr, clip_coef_ptr, MAXIMIZE, HAS_GRAD_SCALE, HAS_CLIP)
        eps1 = f64(eps1_bits)
        cap = adafactor_u_cap(eps1, TRANSFORMERS)
        g = role_ptr(grad_ptr, record, _GRAD, 0, False)
        if tl.load(record + _FACTORED) != 0:
            partial = _unorm_tile(g, factors_ptr, record, k, mult, cap, TRANSFORMERS, SUB_R, TILE_R, TILE_C)
        else:
            partial = _unorm_chunk(g, var_ptr, record, k, mult, cap, TRANSFORMERS, BLOCK, TILES)
        tl.store(u_part_ptr + tl.program_id(0), partial)


# ---- Pass 4: per-tensor scalars ----------------------------------------------------------

_SCALAR_ARGS = ["lr_bits", "eps2_bits", "d_bits", "wd_bits", "u_sq_at"]


@triton.jit(do_not_specialize=_SCALAR_ARGS)
def _scalars_kernel(
    meta_ptr,
    step_ptr,
    rms_ptr,
    lr_ptr,
    theta_part_ptr,
    u_part_ptr,
    apply_ptr,
    sums_ptr,
    u_sq_at,
    found_inf_ptr,
    lr_bits: tl.int64,
    eps2_bits: tl.int64,
    d_bits: tl.int64,
    wd_bits: tl.int64,
    RECORD: tl.constexpr,
    BLOCK_S: tl.constexpr,
    TRANSFORMERS: tl.constexpr,
    RELATIVE_STEP: tl.constexpr,
    WARMUP_INIT: tl.constexpr,
    SCALE_PARAMETER: tl.constexpr,
    HAS_RMS: tl.constexpr,
    LR_IS_TENSOR: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    PHASE: tl.constexpr,
):
    """One program per tensor: its partials combined in a fixed order (fp64), the apply scalars
    to apply[2 * tensor : 2 * tensor + 2], RMS(theta) to its RMS state (0 for an empty tensor),
    and the step advanced. A shard's PHASE 1 and 2 stop at the sum of its partials of theta^2
    (to sums[tensor]), of u^2 (to sums[u_sq_at + tensor]); its PHASE 3 reads the whole sums."""
    if _proceed(found_inf_ptr, HAS_FOUND_INF):
        tensor = tl.program_id(0)
        record = meta_ptr + tensor * RECORD
        numel = tl.load(record + _GLOBAL_NUMEL)
        first = tl.load(record + _FIRST)
        count = tl.load(record + _COUNT)
        arange = tl.arange(0, BLOCK_S)
        acc_theta = tl.zeros([BLOCK_S], tl.float64)
        acc_u = tl.zeros([BLOCK_S], tl.float64)
        for k0 in range(0, count if PHASE != 3 else 0, BLOCK_S):
            k = k0 + arange
            ok = k < count
            if PHASE != 2:
                acc_theta += tl.load(theta_part_ptr + first + k, mask=ok, other=0.0).to(tl.float64)
            if PHASE != 1:
                acc_u += tl.load(u_part_ptr + first + k, mask=ok, other=0.0).to(tl.float64)
        theta_sq = tl.sum(acc_theta, 0)
        u_sq = tl.sum(acc_u, 0)
        if PHASE == 1:
            tl.store(sums_ptr + tensor, theta_sq)
        if PHASE == 2:
            tl.store(sums_ptr + u_sq_at + tensor, u_sq)
        if PHASE == 3:
            theta_sq = tl.load(sums_ptr + tensor)
            u_sq = tl.load(sums_ptr + u_sq_at + tensor)
        step_p = role_ptr(step_ptr, record, _STEP, 0, False)
        old_step = tl.load(step_p)
        if LR_IS_TENSOR:
            lr = tl.load(lr_ptr).to(tl.float64)
        else:
            lr = f64(lr_bits)
        scale, decay, rms = adafactor_apply_scalars(
            theta_sq,
            u_sq,
            tl.maximum(numel, 1),  # an empty tensor's scalars are never used
            old_step.to(tl.float64) + 1.0,
            lr,
            f64(eps2_bits),
            f64(d_bits),
            f64(wd_bits),
            TRANSFORMERS,
            RELATIVE_STEP,
            WARMUP_INIT,
            SCALE_PARAMETER,
        )
        if PHASE == 0 or PHASE == 3:
            tl.store(apply_ptr + 2 * tensor, scale)
            tl.store(apply_ptr + 2 * tensor + 1, decay)
            if HAS_RMS:
                # transformers stores 0/0 = NaN for an empty tensor; 0 keeps state_dicts NaN-free.
                tl.store(role_ptr(rms_ptr, record, _RMS, 0, False), tl.where(numel > 0, rms, 0.0))
            tl.store(step_p, old_step + 1.0)


# ---- Pass 5: apply -----------------------------------------------------------------------


@_device_fn
def _apply_block(
    p,
    ea,
    offs,
    mask,
    u,
    scale,
    decay,
    has_wd,
    beta1,
    one_minus_beta1,
    TRANSFORMERS: tl.constexpr,
    HAS_BETA1: tl.constexpr,
):
    """Loads, updates and stores theta (and the momentum ea) at offs, given u there."""
    theta = tl.load(p + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BETA1:
        m = tl.load(ea + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        m = theta
    theta, m = adafactor_apply(
        theta, u, m, scale, decay, has_wd, beta1, one_minus_beta1, TRANSFORMERS, HAS_BETA1
    )
    tl.store(p + offs, to_storage(theta, p), mask=mask)
    if HAS_BETA1:
        tl.store(ea + offs, to_storage(m, ea), mask=mask)


@_device_fn
def _apply_tile(
    p,
    g,
    ea,
    factors_ptr,
    record,
    k,
    mult,
    cap,
    scale,
    decay,
    has_wd,
    beta1,
    one_minus_beta1,
    TRANSFORMERS: tl.constexpr,
    HAS_BETA1: tl.constexpr,
    SUB_R: tl.constexpr,
    TILE_R: tl.constexpr,
    TILE_C: tl.constexpr,
):
    b, rb, cb, n, m, n_rows = _tile_origin(record, k, TILE_R)
    rf, cf = _factor_ptrs(factors_ptr, record, b)
    for r0 in range(0, n_rows, SUB_R):
        u, mask, offs = _u_rows(
            g, rf, cf, b, rb, cb, n, m, r0, mult, cap, TRANSFORMERS, SUB_R, TILE_R, TILE_C
        )
        _apply_block(
            p, ea, offs, mask, u, scale, decay, has_wd, beta1, one_minus_beta1, TRANSFORMERS, HAS_BETA1
        )


@_device_fn
def _apply_chunk(
    p,
    g,
    ea,
    var_ptr,
    record,
    k,
    mult,
    cap,
    scale,
    decay,
    has_wd,
    beta1,
    one_minus_beta1,
    TRANSFORMERS: tl.constexpr,
    HAS_BETA1: tl.constexpr,
    BLOCK: tl.constexpr,
    TILES: tl.constexpr,
):
    CHUNK: tl.constexpr = BLOCK * TILES
    start = k * CHUNK
    rest = tl.minimum(tl.load(record + _NUMEL) - start, CHUNK)
    v = role_ptr(var_ptr, record, _VAR, start, False)
    arange = tl.arange(0, BLOCK)
    for j in range(tl.cdiv(rest, BLOCK)):
        offs = j * BLOCK + arange
        mask = offs < rest
        u = _u_block(g + start, v, offs, mask, mult, cap, TRANSFORMERS)
        _apply_block(
            p + start,
            ea + start,
            offs,
            mask,
            u,
            scale,
            decay,
            has_wd,
            beta1,
            one_minus_beta1,
            TRANSFORMERS,
            HAS_BETA1,
        )


_APPLY_SCALARS = ["eps1_bits", "wd_bits", "beta1_bits"]


@triton.jit(do_not_specialize=_APPLY_SCALARS)
def _apply_kernel(
    items_ptr,
    meta_ptr,
    param_ptr,
    grad_ptr,
    var_ptr,
    exp_avg_ptr,
    factors_ptr,
    apply_ptr,
    grad_scale_ptr,
    found_inf_ptr,
    clip_coef_ptr,
    eps1_bits: tl.int64,
    wd_bits: tl.int64,
    beta1_bits: tl.int64,
    RECORD: tl.constexpr,
    SUB_R: tl.constexpr,
    TILE_R: tl.constexpr,
    TILE_C: tl.constexpr,
    BLOCK: tl.constexpr,
    TILES: tl.constexpr,
    TRANSFORMERS: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_BETA1: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_CLIP: tl.constexpr,
):
    """Pass 5, one program per work item: the update of its elements, u recomputed from g and
    the factors / v, with the tensor's apply scalars from pass 4."""
    if _proceed(found_inf_ptr, HAS_FOUND_INF):
        tensor, record, k = work_item(items_ptr, meta_ptr, RECORD)
        mult = _grad_multiplier(grad_scale_ptr, clip_coef_ptr, MAXIMIZE, HAS_GRAD_SCALE, HAS_CLIP)
        eps1 = f64(eps1_bits)
        cap = adafactor_u_cap(eps1, TRANSFORMERS)
        has_wd = f64(wd_bits) != 0.0
        beta1 = f64(beta1_bits)
        beta1_f = beta1.to(tl.float32)
        one_minus_beta1 = (1.0 - beta1).to(tl.float32)
        scale = tl.load(apply_ptr + 2 * tensor)
        decay = tl.load(apply_ptr + 2 * tensor + 1)
        p = role_ptr(param_ptr, record, _PARAM, 0, False)
        g = role_ptr(grad_ptr, record, _GRAD, 0, False)
        if HAS_BETA1:
            ea = role_ptr(exp_avg_ptr, record, _EXP_AVG, 0, False)
        else:
            ea = p  # never read or written
        if tl.load(record + _FACTORED) != 0:
            _apply_tile(
                p,
                g,
                ea,
                factors_ptr,
                record,
                k,
                mult,
                cap,
                scale,
                decay,
                has_wd,
                beta1_f,
                one_minus_beta1,
                TRANSFORMERS,
                HAS_BETA1,
                SUB_R,
                TILE_R,
                TILE_C,
            )
        else:
            _apply_chunk(
                p,
                g,
                ea,
                var_ptr,
                record,
                k,
                mult,
                cap,
                scale,
                decay,
                has_wd,
                beta1_f,
                one_minus_beta1,
                TRANSFORMERS,
                HAS_BETA1,
                BLOCK,
                TILES,
            )


# ---- Host side: plans --------------------------------------------------------------------

# Indices into a call's lists of tensors (adafactor and adafactor_transformers build them).
_L_PARAMS, _L_GRADS, _L_ROWS, _L_COLS, _L_VARS, _L_EXP_AVGS, _L_RMSS, _L_STEPS = range(8)
_NAMES = ("params", "grads", "row_vars", "col_vars", "variances", "exp_avgs", "rmss", "state_steps")


class _AdafactorPlan:
    """A call's device-resident plan and the scratch buffers its launches reuse."""

    __slots__ = (
        "meta",
        "items",
        "mat_items",
        "n_items",
        "n_mats",
        "n_tensors",
        "bases",
        "dummy",
        "theta_part",
        "u_part",
        "row_part",
        "col_part",
        "factors",
        "apply",
        "_host",
    )


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _base_index(tensors) -> int | None:
    """Index of the role's base tensor (its first non-empty one), None if it has none."""
    return next((i for i, t in enumerate(tensors) if t.numel() > 0), None)


def _offset(t: torch.Tensor, base: torch.Tensor, what: str, i: int) -> int:
    dist, rest = divmod(t.data_ptr() - base.data_ptr(), t.element_size())
    if rest:
        raise RuntimeError(
            f"fused_optim: {what}[{i}] is not element-aligned with the other {what}; "
            "tensors of one role must share a dtype"
        )
    return dist


def _build(lists, device: torch.device, shards=None) -> _AdafactorPlan:
    """Records, work items and scratch for the call's (validated, contiguous) tensors.
    O(#tensors) Python work plus a few vectorised torch ops, once per set of tensors.
    shards: (global_numels, stats_at, sums.numel()) for a rank's shards of FSDP2 params, else None."""
    params = lists[_L_PARAMS]
    n = len(params)
    bases = [_base_index(tensors) for tensors in lists]  # per list: its base tensor's index

    words = [0] * (n * RECORD)
    counts, mats = [], []
    row_part = col_part = factors = 0
    n_items = 0
    next_factored = next_full = 0
    seen = {}
    for i, p in enumerate(params):
        rec = i * RECORD
        numel = p.numel()
        factored = p.dim() >= 2
        fi = next_factored if factored else next_full
        if factored:
            next_factored += 1
        else:
            next_full += 1
        words[rec] = numel
        whole = numel if shards is None else shards[0][i]
        words[rec + _GLOBAL_NUMEL.value] = whole
        words[rec + _STEP.value] = _role_offset(lists, bases, _L_STEPS, i, i)
        if lists[_L_RMSS]:
            words[rec + _RMS.value] = _role_offset(lists, bases, _L_RMSS, i, i)
        words[rec + _FIRST.value] = n_items
        # A shard without rows of a non-empty matrix (ndim 2) still updates its column statistics.
        rowless = p.dim() == 2 and numel == 0 and whole > 0
        if numel == 0 and not rowless:  # only pass 4 touches it: RMS 0, the step
            counts.append(0)
            mats.append(0)
            continue
        other = seen.setdefault(p.data_ptr(), i) if numel else i
        if other != i:
            raise RuntimeError(
                f"fused_optim: params[{other}] and params[{i}] share memory; pass each parameter once"
            )
        if numel:
            words[rec + _PARAM.value] = _role_offset(lists, bases, _L_PARAMS, i, i)
            words[rec + _GRAD.value] = _role_offset(lists, bases, _L_GRADS, i, i)
        if lists[_L_EXP_AVGS] and numel:
            words[rec + _EXP_AVG.value] = _role_offset(lists, bases, _L_EXP_AVGS, i, i)
        if factored:
            rows, cols = p.shape[-2], p.shape[-1]
            batch = 1 if rowless else numel // (rows * cols)
            words[rec + _GLOBAL_N.value] = whole // cols if p.dim() == 2 else rows
            if shards is not None:
                at = words[rec + _STATS_AT.value] = shards[1][i]
                if not n <= at <= shards[2] - n - batch * (cols + 1):
                    raise RuntimeError(f"fused_optim: stats_at[{i}] points outside sums")
            nrb, ncb = _cdiv(rows, TILE_R), _cdiv(cols, TILE_C)
            words[rec + _ROW.value] = _role_offset(lists, bases, _L_ROWS, fi, i)
            words[rec + _COL.value] = _role_offset(lists, bases, _L_COLS, fi, i)
            words[rec + _FACTORED.value] = 1
            words[rec + _N.value] = rows
            words[rec + _M.value] = cols
            words[rec + _NRB.value] = nrb
            words[rec + _NCB.value] = ncb
            words[rec + _ROW_PART.value] = row_part
            words[rec + _COL_PART.value] = col_part
            words[rec + _RF.value] = factors
            words[rec + _CF.value] = factors + batch * rows
            row_part += batch * ncb * rows
            col_part += batch * nrb * cols
            factors += batch * (rows + cols)
            count = batch * nrb * ncb
            mats.append(batch)
        else:
            words[rec + _VAR.value] = _role_offset(lists, bases, _L_VARS, fi, i)
            count = _cdiv(numel, CHUNK)
            mats.append(0)
        if count >= 2**32 or mats[-1] >= 2**32:
            raise RuntimeError(f"fused_optim: params[{i}] is too large for one launch")
        words[rec + _COUNT.value] = count
        counts.append(count)
        n_items += count
    if n_items > 2**31 - 1 or sum(mats) > 2**31 - 1 or n > 2**31 - 1:
        raise RuntimeError("fused_optim: too many work items for one launch")

    items = _encode_items(counts)
    mat_items = _encode_items(mats)
    on_cuda = device.type == "cuda"
    host = torch.empty(n * RECORD + len(items) + len(mat_items), dtype=torch.int64, pin_memory=on_cuda)
    host[: n * RECORD] = torch.tensor(words, dtype=torch.int64)
    host[n * RECORD : n * RECORD + len(items)] = items
    host[n * RECORD + len(items) :] = mat_items
    buf = host.to(device, non_blocking=True) if on_cuda else host

    plan = _AdafactorPlan()
    plan.meta = buf[: n * RECORD]
    plan.items = buf[n * RECORD : n * RECORD + len(items)]
    plan.mat_items = buf[n * RECORD + len(items) :]
    plan.n_items, plan.n_mats, plan.n_tensors = len(items), len(mat_items), n
    plan.bases = bases
    plan._host = host if on_cuda else None
    # Pointer for a role the call does not have (no factored / no full tensor): never read.
    state_dtype = _state_dtype(lists) or params[0].dtype
    plan.dummy = torch.zeros(1, dtype=state_dtype, device=device)
    # One fp32 allocation for every scratch buffer, reused by every step with this plan.
    sizes = (plan.n_items, plan.n_items, row_part, col_part, factors, 2 * n)
    scratch = torch.empty(sum(sizes) + 1, dtype=torch.float32, device=device)
    views, at = [], 0
    for size in sizes:
        views.append(scratch[at : at + size])
        at += size
    plan.theta_part, plan.u_part, plan.row_part, plan.col_part, plan.factors, plan.apply = views
    return plan


def _role_offset(lists, bases, role: int, j: int, i: int) -> int:
    """Element offset of lists[role][j] (for params[i]) from its role's base tensor."""
    tensors = lists[role]
    t = tensors[j]
    if t.numel() == 0:
        return 0
    return _offset(t, tensors[bases[role]], _NAMES[role], i)


def _encode_items(counts) -> torch.Tensor:
    """(tensor index << 32) | local index, for counts[i] items of tensor i."""
    counts_t = torch.tensor(counts, dtype=torch.int64)
    total = int(counts_t.sum()) if counts else 0
    tensor_idx = torch.repeat_interleave(torch.arange(len(counts), dtype=torch.int64), counts_t)
    firsts = torch.repeat_interleave(torch.cumsum(counts_t, 0) - counts_t, counts_t)
    return (tensor_idx << 32) | (torch.arange(total, dtype=torch.int64) - firsts)


def _state_dtype(lists):
    for r in (_L_ROWS, _L_VARS, _L_EXP_AVGS):
        if lists[r]:
            return lists[r][0].dtype
    return None


# ---- Host side: checks --------------------------------------------------------------------


def _validate(lists) -> None:
    """Everything the kernels assume, checked once per plan."""
    params, grads, rows, cols, variances, exp_avgs, rmss, steps = lists
    n = len(params)
    device = params[0].device
    p_dtype = params[0].dtype
    for i, p in enumerate(params):
        for what, t in (("params", p), ("grads", grads[i])):
            _plan.check_plain(t, what, i)
            _plan.check_device(t, device, f"{what}[{i}]")
            if t.dtype != p_dtype:
                raise TypeError(
                    f"fused_optim: {what}[{i}] has dtype {t.dtype}, expected {p_dtype}: params and grads "
                    "share one dtype (one call per dtype)"
                )
        if grads[i].shape != p.shape:
            raise RuntimeError(
                f"fused_optim: grads[{i}] has shape {tuple(grads[i].shape)} but params[{i}] has shape "
                f"{tuple(p.shape)}"
            )
    n_factored = sum(p.dim() >= 2 for p in params)
    if len(rows) != n_factored or len(cols) != n_factored or len(variances) != n - n_factored:
        raise ValueError(
            f"fused_optim: expected one row and one column statistic per param with ndim >= 2 "
            f"({n_factored}) and one full second moment per other param ({n - n_factored}), got "
            f"{len(rows)}, {len(cols)} and {len(variances)}"
        )
    s_dtype = _state_dtype(lists)
    fi = 0
    for i, p in enumerate(params):
        if p.dim() >= 2:
            n_rows, n_cols = p.shape[:-1].numel(), p.shape[:-2].numel() * p.shape[-1]
            expected = ((rows[fi], "row_vars", n_rows), (cols[fi], "col_vars", n_cols))
            fi += 1
        else:
            expected = ((variances[i - fi], "variances", p.numel()),)
        if exp_avgs:
            expected += ((exp_avgs[i], "exp_avgs", p.numel()),)
        for t, what, numel in expected:
            _plan.check_plain(t, what, i)
            _plan.check_device(t, device, f"{what} of params[{i}]")
            if t.dtype != s_dtype:
                raise TypeError(
                    f"fused_optim: {what} of params[{i}] has dtype {t.dtype}; the optimizer states of "
                    f"one call share one dtype ({s_dtype})"
                )
            if t.numel() != numel:
                raise RuntimeError(
                    f"fused_optim: {what} of params[{i}] has {t.numel()} elements, expected {numel} "
                    f"for a param of shape {tuple(p.shape)}"
                )
    for what, tensors in (("state_steps", steps), ("rmss", rmss)):
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor) or t.numel() != 1 or t.dtype != torch.float32:
                raise TypeError(f"fused_optim: {what}[{i}] must be a one-element float32 tensor")
            _plan.check_device(t, device, f"{what}[{i}]")


def _lr_split(lr, device: torch.device):
    """(lr as a float, lr as a tensor read on the device, or None)."""
    if not isinstance(lr, torch.Tensor):
        return float(lr), None
    if lr.numel() != 1 or lr.dtype not in (torch.float32, torch.float64):
        raise TypeError("fused_optim: a tensor lr must be a one-element float32 or float64 tensor")
    if lr.device == device:
        return 0.0, lr
    if lr.device.type == "cpu":
        return float(lr), None  # a CPU lr for GPU params: reading it is no device sync
    raise RuntimeError(f"fused_optim: lr is on {lr.device} but the params are on {device}")


# ---- Host side: the call ------------------------------------------------------------------

_CACHE = _plan.PlanCache()
_NEEDS_COPIES = object()  # cache marker: some tensor is not contiguous (row-major)


def _contiguous(lists) -> bool:
    return all(t.is_contiguous() for r in range(_L_RMSS) for t in lists[r])


def _key(lists, device, transformers: bool, shards):
    params = lists[_L_PARAMS]
    try:
        return (
            device,
            transformers,
            shards,
            params[0].dtype,
            _state_dtype(lists),
            tuple(map(torch.Tensor.size, params)),
            _plan.layouts(params),
            _plan.ptrs(params),
            _plan.ptrs(lists[_L_GRADS]),
            _plan.layouts(lists[_L_GRADS]),  # grads are the tensors that are new every step
            *(_plan.ptrs(lists[r]) for r in range(_L_ROWS, _L_STEPS + 1)),
        )
    except (RuntimeError, AttributeError, TypeError):
        return None  # e.g. a sparse tensor has no data_ptr: let validation say what is wrong


def _run(lists, transformers: bool, hyper: dict, flags: dict, found_inf, grad_scale, clip_coef, shard: dict):
    """Looks up (or builds) the plan and launches the five passes, or those of one phase of a
    sharded step (shard: phase, global_numels, stats_at, sums, carry; kernel_args.h)."""
    params = lists[_L_PARAMS]
    n = len(params)
    shards = _check_shard(shard, n, params[0].device)
    if not (len(lists[_L_GRADS]) == len(lists[_L_STEPS]) == n):
        raise ValueError(
            f"fused_optim: params, grads and state_steps differ in length: {n}, "
            f"{len(lists[_L_GRADS])}, {len(lists[_L_STEPS])}"
        )
    if lists[_L_EXP_AVGS] is not None and len(lists[_L_EXP_AVGS]) != n:
        raise ValueError(f"fused_optim: beta1 needs one exp_avg per param, got {len(lists[_L_EXP_AVGS])}")
    if lists[_L_RMSS] and len(lists[_L_RMSS]) != n:
        raise ValueError(
            f"fused_optim: rmss must be empty or hold one tensor per param, got {len(lists[_L_RMSS])}"
        )
    lists = [t if t is not None else () for t in lists]
    device = params[0].device
    for what, t in (("grad_scale", grad_scale), ("found_inf", found_inf), ("clip_coef", clip_coef)):
        _plan.check_scalar(t, device, what)
    lr, lr_tensor = _lr_split(hyper["lr"], device) if hyper["lr"] is not None else (0.0, None)

    key = _key(lists, device, transformers, shards)
    plan = _CACHE.get(key) if key is not None else None
    if plan is None:
        _validate(lists)
        _plan.check_runnable(_stats_kernel, device)
        plan = _build(lists, device, shards) if _contiguous(lists) else _NEEDS_COPIES
        if key is not None:
            _CACHE.put(key, plan)

    write_back = []
    if plan is _NEEDS_COPIES:
        # Rare path: the kernels walk rows and columns of the row-major layout, so tensors that
        # are not contiguous run as contiguous working copies, copied back afterwards.
        lists = [list(t) for t in lists]
        for r in range(_L_RMSS):
            for i, t in enumerate(lists[r]):
                if not t.is_contiguous():
                    work = t.contiguous()
                    lists[r][i] = work
                    if r != _L_GRADS:
                        write_back.append((t, work))
        plan = _build(lists, device, shards)

    if shards is not None and shard["carry"].numel() != plan.factors.numel():
        raise RuntimeError(
            f"fused_optim: carry must hold {plan.factors.numel()} float32 elements (the row and column "
            f"factors of this rank's matrices), got {shard['carry'].numel()}"
        )
    _launch_passes(
        plan, lists, transformers, hyper, flags, lr, lr_tensor, found_inf, grad_scale, clip_coef, shard
    )
    for dst, src in write_back:
        dst.copy_(src)


def _check_shard(shard: dict, n: int, device) -> tuple | None:
    """(global_numels, stats_at, sums.numel()) of a sharded phase; None for the whole step."""
    phase = shard.get("phase", 0)
    given = [shard.get(k) is not None for k in ("global_numels", "stats_at", "sums", "carry")]
    if phase not in (0, 1, 2, 3):
        raise RuntimeError(f"fused_optim: phase must be 0, 1, 2 or 3, got {phase}")
    if any(given) != bool(phase) or not all(given) and phase:
        raise RuntimeError(
            "fused_optim: a sharded phase (1, 2 or 3) takes global_numels, stats_at, sums and carry, and "
            "phase 0 none of them"
        )
    if not phase:
        return None
    sums, carry = shard["sums"], shard["carry"]
    if len(shard["global_numels"]) != n or len(shard["stats_at"]) != n:
        raise RuntimeError("fused_optim: global_numels and stats_at need one entry per param")
    for what, t, dtype in (("sums", sums, torch.float64), ("carry", carry, torch.float32)):
        if t.dtype != dtype or t.dim() != 1 or not t.is_contiguous() or t.device != device:
            raise RuntimeError(f"fused_optim: {what} must be a contiguous 1-D {dtype} tensor on {device}")
    if sums.numel() < 2 * n:
        raise RuntimeError(f"fused_optim: sums must have at least 2 * {n} elements")
    return tuple(shard["global_numels"]), tuple(shard["stats_at"]), sums.numel()


def _launch_passes(
    plan, lists, transformers, hyper, flags, lr, lr_tensor, found_inf, grad_scale, clip_coef, shard
):
    def base(r):
        b = plan.bases[r]
        return lists[r][b] if b is not None else plan.dummy

    bits = _plan.f64_bits
    params = lists[_L_PARAMS]
    has_beta1 = hyper["beta1"] is not None
    has_rms = bool(lists[_L_RMSS])
    eps1_bits, decay_bits = bits(hyper["eps1"]), bits(hyper["decay"])
    common = dict(
        RECORD=RECORD,
        TRANSFORMERS=transformers,
        HAS_FOUND_INF=found_inf is not None,
    )
    grads_in = dict(
        MAXIMIZE=flags["maximize"],
        HAS_GRAD_SCALE=grad_scale is not None,
        HAS_CLIP=clip_coef is not None,
    )
    tiles = dict(SUB_R=SUB_R, TILE_R=TILE_R, TILE_C=TILE_C, BLOCK=BLOCK, TILES=TILES, num_warps=NUM_WARPS)
    # A sharded step's phase runs some of the passes (kernel_args.h: AdafactorArgs::phase).
    phase = shard.get("phase", 0)
    factors = shard["carry"] if phase else plan.factors
    sums = shard["sums"] if phase else plan.theta_part  # never read in one process
    u_sq_at = sums.numel() - len(params)
    passes = {0: "sfuka", 1: "sfk", 2: "fuk", 3: "ka"}[phase]
    with _plan.device_guard(params[0].device):
        if "s" in passes:
            _plan._launch(
                _stats_kernel,
                (plan.n_items,),
                plan.items,
                plan.meta,
                base(_L_PARAMS),
                base(_L_GRADS),
                base(_L_VARS),
                base(_L_STEPS),
                plan.row_part,
                plan.col_part,
                plan.theta_part,
                grad_scale,
                found_inf,
                clip_coef,
                eps1_bits,
                decay_bits,
                **common,
                **grads_in,
                **tiles,
            )
        if "f" in passes:
            _plan._launch(
                _factors_kernel,
                (plan.n_mats,),
                plan.mat_items,
                plan.meta,
                base(_L_ROWS),
                base(_L_COLS),
                base(_L_STEPS),
                plan.row_part,
                plan.col_part,
                factors,
                sums,
                found_inf,
                eps1_bits,
                decay_bits,
                PHASE=phase,
                BLOCK_I=BLOCK_I,
                PART_I=PART_I,
                BLOCK_J=BLOCK_J,
                PART_J=PART_J,
                num_warps=NUM_WARPS,
                **common,
            )
        if "u" in passes:
            _plan._launch(
                _unorm_kernel,
                (plan.n_items,),
                plan.items,
                plan.meta,
                base(_L_GRADS),
                base(_L_VARS),
                factors,
                plan.u_part,
                grad_scale,
                found_inf,
                clip_coef,
                eps1_bits,
                **common,
                **grads_in,
                **tiles,
            )
        if "k" in passes:
            _plan._launch(
                _scalars_kernel,
                (plan.n_tensors,),
                plan.meta,
                base(_L_STEPS),
                base(_L_RMSS) if has_rms else None,
                lr_tensor,
                plan.theta_part,
                plan.u_part,
                plan.apply,
                sums,
                u_sq_at,
                found_inf,
                0 if lr_tensor is not None else bits(lr),
                bits(hyper["eps2"]),
                bits(hyper["d"]),
                bits(hyper["weight_decay"]),
                BLOCK_S=BLOCK_S,
                RELATIVE_STEP=flags["relative_step"],
                WARMUP_INIT=flags["warmup_init"],
                SCALE_PARAMETER=flags["scale_parameter"],
                HAS_RMS=has_rms,
                LR_IS_TENSOR=lr_tensor is not None,
                PHASE=phase,
                num_warps=1,
                **common,
            )
        if "a" in passes:
            _plan._launch(
                _apply_kernel,
                (plan.n_items,),
                plan.items,
                plan.meta,
                base(_L_PARAMS),
                base(_L_GRADS),
                base(_L_VARS),
                base(_L_EXP_AVGS) if has_beta1 else None,
                factors,
                plan.apply,
                grad_scale,
                found_inf,
                clip_coef,
                eps1_bits,
                bits(hyper["weight_decay"]),
                bits(hyper["beta1"] if has_beta1 else 0.0),
                HAS_BETA1=has_beta1,
                **common,
                **grads_in,
                **tiles,
            )


def adafactor(
    params,
    grads,
    row_vars,
    col_vars,
    variances,
    state_steps,
    *,
    lr,
    beta2_decay: float,
    eps1: float | None,
    eps2: float,
    d: float,
    weight_decay: float,
    maximize: bool,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    clip_coef: torch.Tensor | None = None,
    **shard,
) -> None:
    """One torch-flavour Adafactor step (ALGORITHMS.md 3a) over lists of tensors of one device,
    in place, in five launches. Same arguments and semantics as fused_optim._reference's;
    `shard` (phase, global_numels, stats_at, sums, carry): one phase of a sharded step, as the
    native op takes it (optim/adafactor.py: ShardSums)."""
    if not params:
        return
    if eps1 is None:
        eps1 = torch.finfo(params[0].dtype).eps
    hyper = dict(lr=lr, eps1=eps1, eps2=eps2, decay=beta2_decay, d=d, weight_decay=weight_decay, beta1=None)
    flags = dict(maximize=bool(maximize), relative_step=False, warmup_init=False, scale_parameter=True)
    lists = (params, grads, row_vars, col_vars, variances, None, None, state_steps)
    _run(lists, False, hyper, flags, found_inf, grad_scale, clip_coef, shard)


def adafactor_transformers(
    params,
    grads,
    exp_avg_sq_rows,
    exp_avg_sq_cols,
    exp_avg_sqs,
    exp_avgs,
    rmss,
    state_steps,
    *,
    lr,
    eps1: float,
    eps2: float,
    clip_threshold: float,
    decay_rate: float,
    beta1: float | None,
    weight_decay: float,
    scale_parameter: bool,
    relative_step: bool,
    warmup_init: bool,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    clip_coef: torch.Tensor | None = None,
    **shard,
) -> None:
    """One transformers-flavour Adafactor step (ALGORITHMS.md 3b) over lists of tensors of one
    device, in place, in five launches. Same arguments and semantics as fused_optim._reference's;
    lr is not read (may be None) with relative_step. `shard`: as for `adafactor`."""
    if not params:
        return
    hyper = dict(
        lr=None if relative_step else lr,
        eps1=eps1,
        eps2=eps2,
        decay=decay_rate,
        d=clip_threshold,
        weight_decay=weight_decay,
        beta1=beta1,
    )
    flags = dict(
        maximize=False,
        relative_step=bool(relative_step),
        warmup_init=bool(warmup_init),
        scale_parameter=bool(scale_parameter),
    )
    lists = (
        params,
        grads,
        exp_avg_sq_rows,
        exp_avg_sq_cols,
        exp_avg_sqs,
        exp_avgs if beta1 is not None else None,
        rmss,
        state_steps,
    )
    _run(lists, True, hyper, flags, found_inf, grad_scale, clip_coef, shard)
