"""SMMF (ALGORITHMS.md section 4) in two launches per call, whatever the number and mix of
tensors. Same math as csrc/include/fused_optim/math/smmf.h, function for function: the jit
functions below named as the header's are THE per-element / per-step formulas here.

  1 update    per work item: a TILE_R x TILE_C tile of a factorized tensor's square-matricized
              matrix (TILE_C a whole number of sign words, so no two programs share a word), or
              a flat chunk of a dense tensor. Decompresses, updates theta, writes the new sign
              words, and the tile's partial row / column sums of |M| and V and their totals.
  2 finalize  per work item: a block of rows or of columns of one matrix: the new factors from
              the partials, added in a fixed order (fp64); the column factor divided by the
              matrix's total unless it is 0. Part 0 of every tensor advances its step (pass 1
              reads the OLD step + 1).
No float atomics: every partial has one writer, so results are bitwise deterministic. Plans are
built once per set of tensors and cached; lr and the step are read on the device.
"""

import torch
import triton
import triton.language as tl

from . import _common, _plan
from ._adafactor import _base_index, _cdiv, _encode_items, _lr_split, _offset
from ._common import INTERPRETED

TILE_R = 32
TILE_C = 128  # 4 sign words
WORD = 32
PART = 1024  # rows or columns per finalize work item
NUM_WARPS = 4

# Record words (int64), one record of RECORD words per tensor: role offsets (elements from the
# role's base pointer), then the matrix and where its partials live in the scratch.
RECORD = 28
_NUMEL = tl.constexpr(0)
_PARAM = tl.constexpr(1)
_GRAD = tl.constexpr(2)
_ROW_M = tl.constexpr(3)
_COL_M = tl.constexpr(4)
_SIGN = tl.constexpr(5)
_ROW_V = tl.constexpr(6)
_COL_V = tl.constexpr(7)
_EXP_AVG = tl.constexpr(8)
_EXP_AVG_SQ = tl.constexpr(9)
_STEP = tl.constexpr(10)
_FACTORED = tl.constexpr(11)
_N = tl.constexpr(12)  # rows: the matrix's n, or those a shard's run touches (from _ROW0)
_M = tl.constexpr(13)
_WORDS = tl.constexpr(14)  # sign words per row
_NRB = tl.constexpr(15)  # row tiles
_NCB = tl.constexpr(16)  # column tiles
_FIRST = tl.constexpr(17)  # its first tile among the call's tiles
_PARTIALS = tl.constexpr(18)  # its partials in the scratch: [N][NCB] |M|, V, then [NRB][M] |M|, V
_ROW_PARTS = tl.constexpr(19)  # finalize items over rows; the column items follow
# A shard's run of the matrix (FSDP2): its first row, and how many elements of that row it lacks;
# where its raw sums go (SmmfSums: its first row, column and matrix index).
_ROW0 = tl.constexpr(20)
_SKIP = tl.constexpr(21)
_SUM_ROW = tl.constexpr(22)
_SUM_COL = tl.constexpr(23)
_SUM_INDEX = tl.constexpr(24)

# Lists in the order functional.smmf takes them.
_NAMES = (
    "params",
    "grads",
    "row_ms",
    "col_ms",
    "signs",
    "row_vs",
    "col_vs",
    "exp_avgs",
    "exp_avg_sqs",
    "state_steps",
)
_L_PARAMS, _L_GRADS, _L_ROW_M, _L_COL_M, _L_SIGN, _L_ROW_V, _L_COL_V, _L_EXP_AVG, _L_EXP_AVG_SQ, _L_STEPS = (
    range(10)
)
_ROLE_WORD = {
    _L_PARAMS: 1,
    _L_GRADS: 2,
    _L_ROW_M: 3,
    _L_COL_M: 4,
    _L_SIGN: 5,
    _L_ROW_V: 6,
    _L_COL_V: 7,
    _L_EXP_AVG: 8,
    _L_EXP_AVG_SQ: 9,
    _L_STEPS: 10,
}


def _device_fn(fn):
    """triton.jit, or the plain function under the interpreter (as _adafactor.py's)."""
    return fn if INTERPRETED.value else triton.jit(fn)


f64 = _common.f64.fn if INTERPRETED.value else _common.f64
to_storage = _common.to_storage.fn if INTERPRETED.value else _common.to_storage


# ---- THE math: one jit function per function of math/smmf.h ---------------------------------


@_device_fn
def smmf_scalars(lr, t, beta, growth, decay_rate, eps, weight_decay, DECOUPLED: tl.constexpr):
    """Per-step scalars in fp64, rounded to fp32: beta_m = beta * growth^(t - 1), 1 - beta_v =
    t^decay_rate (t >= 1: pow as exp(log); growth^0 is 1 even for growth = 0)."""
    beta_m = beta * tl.where(t == 1.0, 1.0, tl.exp((t - 1.0) * tl.log(growth)))
    new_v = tl.exp(decay_rate * tl.log(t))
    if DECOUPLED:
        decay = tl.where(weight_decay != 0.0, 1.0 - lr * weight_decay, 1.0)
        l2 = 0.0 * weight_decay
    else:
        decay = 1.0 + 0.0 * weight_decay
        l2 = weight_decay
    return (
        beta_m.to(tl.float32),
        (1.0 - beta_m).to(tl.float32),
        (1.0 - new_v).to(tl.float32),
        new_v.to(tl.float32),
        lr.to(tl.float32),
        eps.to(tl.float32),
        decay.to(tl.float32),
        l2.to(tl.float32),
    )


@_device_fn
def smmf_signed(r, c, bit):
    """The decompressed first moment: +r c where the sign bit is set, else -(r c)."""
    x = r * c
    return tl.where(bit != 0, x, -x)


@_device_fn
def smmf_element(
    theta,
    g,
    m_old,
    v_old,
    beta_m,
    omb_m,
    beta_v,
    omb_v,
    lr,
    eps,
    decay,
    l2,
    MOMENTUM: tl.constexpr,
    L2: tl.constexpr,
):
    """One element: (theta, M, V) after the step (M = g without momentum)."""
    if L2:
        g = g + l2 * theta
    theta = theta * decay
    v = beta_v * v_old + omb_v * (g * g)
    if MOMENTUM:
        m = beta_m * m_old + omb_m * g
    else:
        m = g
    theta = theta - lr * tl.div_rn(m, tl.sqrt_rn(v) + eps)
    return theta, m, v


@_device_fn
def smmf_sign_bit(m):
    return (m > 0.0).to(tl.int32)


@_device_fn
def smmf_col_factor(col_sum, total):
    return tl.where(total != 0.0, col_sum / tl.where(total != 0.0, total, 1.0), col_sum).to(tl.float32)


# ---- Kernels --------------------------------------------------------------------------------


@_device_fn
def _ptr(base, record, ROLE: tl.constexpr):
    return base + tl.load(record + ROLE)


@triton.jit(do_not_specialize=["lr_bits", "beta_bits", "growth_bits", "decay_bits", "eps_bits", "wd_bits"])
def _update_kernel(
    items_ptr,
    meta_ptr,
    param_ptr,
    grad_ptr,
    row_m_ptr,
    col_m_ptr,
    sign_ptr,
    row_v_ptr,
    col_v_ptr,
    exp_avg_ptr,
    exp_avg_sq_ptr,
    step_ptr,
    lr_ptr,
    partials_ptr,
    totals_ptr,
    grad_scale_ptr,
    found_inf_ptr,
    clip_coef_ptr,
    lr_bits,
    beta_bits,
    growth_bits,
    decay_bits,
    eps_bits,
    wd_bits,
    RECORD: tl.constexpr,
    MOMENTUM: tl.constexpr,
    L2: tl.constexpr,
    DECOUPLED: tl.constexpr,
    LR_IS_TENSOR: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    TILE_R: tl.constexpr,
    TILE_C: tl.constexpr,
):
    if HAS_FOUND_INF:
        if tl.load(found_inf_ptr) != 0.0:
            return
    w = tl.program_id(0)
    item = tl.load(items_ptr + w)
    tensor = item >> 32
    q = item - (tensor << 32)
    record = meta_ptr + tensor * RECORD
    numel = tl.load(record + _NUMEL)
    if numel == 0:
        return
    t = tl.load(_ptr(step_ptr, record, _STEP)).to(tl.float64) + 1.0
    if LR_IS_TENSOR:
        lr = tl.load(lr_ptr).to(tl.float64)
    else:
        lr = f64(lr_bits)
    beta_m, omb_m, beta_v, omb_v, lr32, eps, decay, l2 = smmf_scalars(
        lr, t, f64(beta_bits), f64(growth_bits), f64(decay_bits), f64(eps_bits), f64(wd_bits), DECOUPLED
    )
    mult = tl.full([], 1.0, tl.float32)
    if HAS_GRAD_SCALE:
        mult = tl.div_rn(mult, tl.load(grad_scale_ptr))
    if HAS_CLIP:
        mult = mult * tl.load(clip_coef_ptr)
    p = _ptr(param_ptr, record, _PARAM)
    g_ptr = _ptr(grad_ptr, record, _GRAD)
    if tl.load(record + _FACTORED) == 0:  # dense: a flat chunk of TILE_R * TILE_C elements
        offs = q * (TILE_R * TILE_C) + tl.arange(0, TILE_R * TILE_C)
        mask = offs < numel
        theta = tl.load(p + offs, mask=mask).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32) * mult
        v_ptr = _ptr(exp_avg_sq_ptr, record, _EXP_AVG_SQ)
        if MOMENTUM:
            m_ptr = _ptr(exp_avg_ptr, record, _EXP_AVG)
            m_old = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
        else:
            m_old = g
        v_old = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
        theta, m, v = smmf_element(
            theta, g, m_old, v_old, beta_m, omb_m, beta_v, omb_v, lr32, eps, decay, l2, MOMENTUM, L2
        )
        tl.store(p + offs, to_storage(theta, p), mask=mask)
        if MOMENTUM:
            tl.store(m_ptr + offs, to_storage(m, m_ptr), mask=mask)
        tl.store(v_ptr + offs, to_storage(v, v_ptr), mask=mask)
        return
    n = tl.load(record + _N)
    m_cols = tl.load(record + _M)
    words = tl.load(record + _WORDS)
    nrb = tl.load(record + _NRB)
    ncb = tl.load(record + _NCB)
    rb = q // ncb
    cb = q - rb * ncb
    rows = rb * TILE_R + tl.arange(0, TILE_R)
    cols = cb * TILE_C + tl.arange(0, TILE_C)
    row_ok = rows < n
    col_ok = cols < m_cols
    # the tensor's elements: a shard's first and last rows hold only some of theirs
    offs = rows.to(tl.int64)[:, None] * m_cols + cols[None, :] - tl.load(record + _SKIP)
    mask = row_ok[:, None] & col_ok[None, :] & (offs >= 0) & (offs < numel)
    theta = tl.load(p + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32) * mult
    row0 = tl.load(record + _ROW0)
    rv = tl.load(_ptr(row_v_ptr, record, _ROW_V) + row0 + rows, mask=row_ok, other=0.0)
    cv = tl.load(_ptr(col_v_ptr, record, _COL_V) + cols, mask=col_ok, other=0.0)
    WORDS_PER_TILE: tl.constexpr = TILE_C // 32
    word_idx = cb * WORDS_PER_TILE + tl.arange(0, WORDS_PER_TILE)
    word_mask = row_ok[:, None] & (word_idx < words)[None, :]
    word_offs = rows.to(tl.int64)[:, None] * words + word_idx[None, :]
    shifts = tl.arange(0, 32)
    if MOMENTUM:
        s_ptr = _ptr(sign_ptr, record, _SIGN)
        old = tl.load(s_ptr + word_offs, mask=word_mask, other=0)
        bits = tl.reshape((old[:, :, None] >> shifts[None, None, :]) & 1, [TILE_R, TILE_C])
        rm = tl.load(_ptr(row_m_ptr, record, _ROW_M) + row0 + rows, mask=row_ok, other=0.0)
        cm = tl.load(_ptr(col_m_ptr, record, _COL_M) + cols, mask=col_ok, other=0.0)
        m_old = smmf_signed(rm[:, None], cm[None, :], bits)
    else:
        m_old = g
    theta, m, v = smmf_element(
        theta,
        g,
        m_old,
        rv[:, None] * cv[None, :],
        beta_m,
        omb_m,
        beta_v,
        omb_v,
        lr32,
        eps,
        decay,
        l2,
        MOMENTUM,
        L2,
    )
    tl.store(p + offs, to_storage(theta, p), mask=mask)
    v = tl.where(mask, v, 0.0)  # elements held elsewhere add nothing (their m is 0 below too)
    part = partials_ptr + tl.load(record + _PARTIALS)
    row_v_part = part + n * ncb
    col_m_part = row_v_part + n * ncb
    col_v_part = col_m_part + nrb * m_cols
    if MOMENTUM:
        new_bits = tl.where(mask, smmf_sign_bit(m), 0)
        new = tl.sum(tl.reshape(new_bits, [TILE_R, WORDS_PER_TILE, 32]) << shifts[None, None, :], axis=2)
        tl.store(s_ptr + word_offs, new.to(tl.int32), mask=word_mask)
        a = tl.where(mask, tl.abs(m), 0.0)
        tl.store(part + rows * ncb + cb, tl.sum(a, axis=1), mask=row_ok)
        col_sum_m = tl.sum(a, axis=0)
        tl.store(col_m_part + rb * m_cols + cols, col_sum_m, mask=col_ok)
        tl.store(totals_ptr + 2 * w, tl.sum(col_sum_m.to(tl.float64), axis=0))
    tl.store(row_v_part + rows * ncb + cb, tl.sum(v, axis=1), mask=row_ok)
    col_sum_v = tl.sum(v, axis=0)
    tl.store(col_v_part + rb * m_cols + cols, col_sum_v, mask=col_ok)
    tl.store(totals_ptr + 2 * w + 1, tl.sum(col_sum_v.to(tl.float64), axis=0))


@triton.jit(do_not_specialize=["sums_rows", "sums_cols", "sums_mats"])
def _finalize_kernel(
    items_ptr,
    meta_ptr,
    row_m_ptr,
    col_m_ptr,
    row_v_ptr,
    col_v_ptr,
    step_ptr,
    partials_ptr,
    totals_ptr,
    found_inf_ptr,
    sums_ptr,
    sums_rows,
    sums_cols,
    sums_mats,
    RECORD: tl.constexpr,
    MOMENTUM: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    RAW_SUMS: tl.constexpr,
    PART: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """RAW_SUMS (FSDP2 shards): the raw row and column sums and totals go to sums_ptr in
    float64 (SmmfSums' layout), for the caller to reduce over the ranks and divide."""
    if HAS_FOUND_INF:
        if tl.load(found_inf_ptr) != 0.0:
            return
    item = tl.load(items_ptr + tl.program_id(0))
    tensor = item >> 32
    part_idx = item - (tensor << 32)
    record = meta_ptr + tensor * RECORD
    if part_idx == 0:
        s = _ptr(step_ptr, record, _STEP)
        tl.store(s, tl.load(s) + 1.0)
    if tl.load(record + _FACTORED) == 0 or tl.load(record + _NUMEL) == 0:
        return
    n = tl.load(record + _N)
    m_cols = tl.load(record + _M)
    nrb = tl.load(record + _NRB)
    ncb = tl.load(record + _NCB)
    part = partials_ptr + tl.load(record + _PARTIALS)
    row_v_part = part + n * ncb
    col_m_part = row_v_part + n * ncb
    col_v_part = col_m_part + nrb * m_cols
    row_parts = tl.load(record + _ROW_PARTS)
    if part_idx < row_parts:
        rows = part_idx * PART + tl.arange(0, PART)
        ok = rows < n
        sum_m = tl.zeros([PART], tl.float64)
        sum_v = tl.zeros([PART], tl.float64)
        for k in range(0, ncb):
            if MOMENTUM:
                sum_m += tl.load(part + rows * ncb + k, mask=ok, other=0.0).to(tl.float64)
            sum_v += tl.load(row_v_part + rows * ncb + k, mask=ok, other=0.0).to(tl.float64)
        if RAW_SUMS:
            at = sums_ptr + tl.load(record + _SUM_ROW) + tl.load(record + _ROW0) + rows
            if MOMENTUM:
                tl.store(at, sum_m, mask=ok)
            tl.store(at + sums_rows, sum_v, mask=ok)
        else:
            if MOMENTUM:
                tl.store(_ptr(row_m_ptr, record, _ROW_M) + rows, sum_m.to(tl.float32), mask=ok)
            tl.store(_ptr(row_v_ptr, record, _ROW_V) + rows, sum_v.to(tl.float32), mask=ok)
    else:
        first = tl.load(record + _FIRST)
        n_tiles = nrb * ncb
        acc_m = tl.zeros([BLOCK_T], tl.float64)
        acc_v = tl.zeros([BLOCK_T], tl.float64)
        for k0 in range(0, n_tiles, BLOCK_T):
            k = k0 + tl.arange(0, BLOCK_T)
            ok = k < n_tiles
            if MOMENTUM:
                acc_m += tl.load(totals_ptr + 2 * (first + k), mask=ok, other=0.0)
            acc_v += tl.load(totals_ptr + 2 * (first + k) + 1, mask=ok, other=0.0)
        total_m = tl.sum(acc_m, axis=0)
        total_v = tl.sum(acc_v, axis=0)
        cols = (part_idx - row_parts) * PART + tl.arange(0, PART)
        ok = cols < m_cols
        sum_m = tl.zeros([PART], tl.float64)
        sum_v = tl.zeros([PART], tl.float64)
        for k in range(0, nrb):
            if MOMENTUM:
                sum_m += tl.load(col_m_part + k * m_cols + cols, mask=ok, other=0.0).to(tl.float64)
            sum_v += tl.load(col_v_part + k * m_cols + cols, mask=ok, other=0.0).to(tl.float64)
        if RAW_SUMS:
            at = sums_ptr + 2 * sums_rows + tl.load(record + _SUM_COL) + cols
            total_at = sums_ptr + 2 * (sums_rows + sums_cols) + tl.load(record + _SUM_INDEX)
            first_part = part_idx == row_parts
            if MOMENTUM:
                tl.store(at, sum_m, mask=ok)
                tl.store(total_at, total_m, mask=first_part)
            tl.store(at + sums_cols, sum_v, mask=ok)
            tl.store(total_at + sums_mats, total_v, mask=first_part)
        else:
            if MOMENTUM:
                tl.store(_ptr(col_m_ptr, record, _COL_M) + cols, smmf_col_factor(sum_m, total_m), mask=ok)
            tl.store(_ptr(col_v_ptr, record, _COL_V) + cols, smmf_col_factor(sum_v, total_v), mask=ok)


# ---- Host side ------------------------------------------------------------------------------


def smmf_shape(numel: int) -> tuple[int, int]:
    from fused_optim._reference.smmf import smmf_shape as shape

    return shape(numel)


class _SmmfPlan:
    __slots__ = (
        "meta",
        "tiles",
        "parts",
        "n_tiles",
        "n_parts",
        "bases",
        "partials",
        "totals",
        "dummies",
        "sums_shape",
        "_host",
    )


def _is_dense(p, vector_reshape):
    from fused_optim._reference.smmf import is_dense

    return is_dense(p, vector_reshape)


def _matrices(params, vector_reshape, windows):
    """Per param: None (the dense path), or (n, m, row0, rows, skip) of the run of its matrix it
    holds: all of it in one process; windows (FSDP2): (global numel or -1 for dense, start)."""
    out = []
    for i, p in enumerate(params):
        numel = p.numel()
        whole, start = (-1 if _is_dense(p, vector_reshape) else numel, 0) if windows is None else windows[i]
        if whole < 0:
            out.append(None)
            continue
        if not 0 <= start <= start + numel <= whole:
            raise RuntimeError(
                f"fused_optim: params[{i}] ({numel} elements from {start}) lies outside its param of "
                f"{whole} elements"
            )
        n, m = smmf_shape(whole)
        row0 = start // m if m else 0
        rows = -(-(start + numel) // m) - row0 if numel else 0
        out.append((n, m, row0, rows, start - row0 * m))
    return out


def _validate(lists, vector_reshape, momentum, matrices) -> None:
    params, grads, row_ms, col_ms, signs, row_vs, col_vs, exp_avgs, exp_avg_sqs, steps = lists
    n = len(params)
    if not (len(grads) == len(steps) == n):
        raise ValueError(
            f"fused_optim: params, grads and state_steps differ in length: {n}, {len(grads)}, {len(steps)}"
        )
    device, p_dtype = params[0].device, params[0].dtype
    n_dense = sum(x is None for x in matrices)
    n_fac = n - n_dense
    if len(row_vs) != n_fac or len(col_vs) != n_fac or len(exp_avg_sqs) != n_dense:
        raise ValueError(
            f"fused_optim: expected row_vs and col_vs for each of the {n_fac} factorized params and "
            f"exp_avg_sqs for each of the {n_dense} dense ones, got {len(row_vs)}, {len(col_vs)} and "
            f"{len(exp_avg_sqs)}"
        )
    want = (n_fac, n_dense) if momentum else (0, 0)
    if (len(row_ms), len(col_ms), len(signs), len(exp_avgs)) != (want[0], want[0], want[0], want[1]):
        raise ValueError(
            f"fused_optim: expected {want[0]} row_ms, col_ms and signs and {want[1]} exp_avgs, got "
            f"{len(row_ms)}, {len(col_ms)}, {len(signs)} and {len(exp_avgs)}"
        )
    k_fac = k_dense = 0
    for i, p in enumerate(params):
        for what, t in (("params", p), ("grads", grads[i])):
            _plan.check_plain(t, what, i)
            _plan.check_device(t, device, f"{what}[{i}]")
            if t.dtype != p_dtype:
                raise TypeError(f"fused_optim: {what}[{i}] has dtype {t.dtype}, expected {p_dtype}")
        if grads[i].shape != p.shape:
            raise RuntimeError(
                f"fused_optim: grads[{i}] has shape {tuple(grads[i].shape)} but params[{i}] has "
                f"shape {tuple(p.shape)}"
            )
        if matrices[i] is None:
            expected = [(exp_avg_sqs[k_dense], "exp_avg_sqs", p.numel(), p_dtype)]
            if momentum:
                expected.append((exp_avgs[k_dense], "exp_avgs", p.numel(), p_dtype))
            k_dense += 1
        else:
            rows, cols, _, run_rows, _ = matrices[i]
            expected = [
                (row_vs[k_fac], "row_vs", rows, torch.float32),
                (col_vs[k_fac], "col_vs", cols, torch.float32),
            ]
            if momentum:
                expected += [
                    (row_ms[k_fac], "row_ms", rows, torch.float32),
                    (col_ms[k_fac], "col_ms", cols, torch.float32),
                    (signs[k_fac], "signs", run_rows * (-(-cols // WORD)), torch.int32),
                ]
            k_fac += 1
        for t, what, numel, dtype in expected:
            _plan.check_plain(t, what, i, dtypes=(dtype,))
            _plan.check_device(t, device, f"{what} of params[{i}]")
            if t.dtype != dtype:
                raise TypeError(f"fused_optim: {what} of params[{i}] has dtype {t.dtype}, expected {dtype}")
            if t.numel() != numel:
                raise RuntimeError(
                    f"fused_optim: {what} of params[{i}] has {t.numel()} elements, expected {numel} "
                    f"for a param of shape {tuple(p.shape)}"
                )
    for i, t in enumerate(steps):
        if not isinstance(t, torch.Tensor) or t.numel() != 1 or t.dtype != torch.float32:
            raise TypeError(f"fused_optim: state_steps[{i}] must be a one-element float32 tensor")
        _plan.check_device(t, device, f"state_steps[{i}]")


def _build(lists, device, matrices) -> _SmmfPlan:
    params = lists[_L_PARAMS]
    n = len(params)
    sum_rows = sum_cols = sum_mats = 0
    bases = [_base_index(ts) for ts in lists]
    words = [0] * (n * RECORD)
    tile_counts, part_counts = [], []
    partials = n_tiles = 0
    k_fac = k_dense = 0
    seen = {}

    def offset(role, j, i):
        t = lists[role][j]
        return 0 if t.numel() == 0 else _offset(t, lists[role][bases[role]], _NAMES[role], i)

    for i, p in enumerate(params):
        rec = i * RECORD
        numel = p.numel()
        dense = matrices[i] is None
        k = k_dense if dense else k_fac
        if dense:
            k_dense += 1
        else:
            k_fac += 1
        words[rec] = numel
        words[rec + _STEP.value] = offset(_L_STEPS, i, i)
        words[rec + _FIRST.value] = n_tiles
        tiles = parts = 1
        if numel > 0:
            other = seen.setdefault(p.data_ptr(), i)
            if other != i:
                raise RuntimeError(
                    f"fused_optim: params[{other}] and params[{i}] share memory; pass each parameter once"
                )
            words[rec + _PARAM.value] = offset(_L_PARAMS, i, i)
            words[rec + _GRAD.value] = offset(_L_GRADS, i, i)
            if dense:
                words[rec + _EXP_AVG_SQ.value] = offset(_L_EXP_AVG_SQ, k, i)
                if lists[_L_EXP_AVG]:
                    words[rec + _EXP_AVG.value] = offset(_L_EXP_AVG, k, i)
                tiles = _cdiv(numel, TILE_R * TILE_C)
            else:
                _, cols, row0, rows, skip = matrices[i]
                nrb, ncb = _cdiv(rows, TILE_R), _cdiv(cols, TILE_C)
                for role, word in ((_L_ROW_V, _ROW_V), (_L_COL_V, _COL_V)):
                    words[rec + word.value] = offset(role, k, i)
                if lists[_L_SIGN]:
                    for role, word in ((_L_ROW_M, _ROW_M), (_L_COL_M, _COL_M), (_L_SIGN, _SIGN)):
                        words[rec + word.value] = offset(role, k, i)
                words[rec + _FACTORED.value] = 1
                words[rec + _N.value] = rows
                words[rec + _M.value] = cols
                words[rec + _WORDS.value] = -(-cols // WORD)
                words[rec + _NRB.value] = nrb
                words[rec + _NCB.value] = ncb
                words[rec + _PARTIALS.value] = partials
                words[rec + _ROW_PARTS.value] = _cdiv(rows, PART)
                words[rec + _ROW0.value] = row0
                words[rec + _SKIP.value] = skip
                words[rec + _SUM_ROW.value] = sum_rows
                words[rec + _SUM_COL.value] = sum_cols
                words[rec + _SUM_INDEX.value] = sum_mats
                partials += 2 * (rows * ncb + nrb * cols)
                tiles = nrb * ncb
                parts = _cdiv(rows, PART) + _cdiv(cols, PART)
        if not dense:  # an empty shard of a matrix too: its place in the sums
            sum_rows, sum_cols, sum_mats = sum_rows + matrices[i][0], sum_cols + matrices[i][1], sum_mats + 1
        if tiles >= 2**31:
            raise RuntimeError(f"fused_optim: params[{i}] is too large for one launch")
        tile_counts.append(tiles)
        part_counts.append(parts)
        n_tiles += tiles
    if n_tiles > 2**31 - 1 or sum(part_counts) > 2**31 - 1:
        raise RuntimeError("fused_optim: too many work items for one launch")
    tiles_t, parts_t = _encode_items(tile_counts), _encode_items(part_counts)
    on_cuda = device.type == "cuda"
    host = torch.empty(n * RECORD + len(tiles_t) + len(parts_t), dtype=torch.int64, pin_memory=on_cuda)
    host[: n * RECORD] = torch.tensor(words, dtype=torch.int64)
    host[n * RECORD : n * RECORD + len(tiles_t)] = tiles_t
    host[n * RECORD + len(tiles_t) :] = parts_t
    buf = host.to(device, non_blocking=True) if on_cuda else host
    plan = _SmmfPlan()
    plan.meta = buf[: n * RECORD]
    plan.tiles = buf[n * RECORD : n * RECORD + len(tiles_t)]
    plan.parts = buf[n * RECORD + len(tiles_t) :]
    plan.n_tiles, plan.n_parts = len(tiles_t), len(parts_t)
    plan.sums_shape = (sum_rows, sum_cols, sum_mats)
    plan.bases = bases
    plan._host = host if on_cuda else None
    plan.partials = torch.empty(partials + 1, dtype=torch.float32, device=device)
    plan.totals = torch.empty(2 * plan.n_tiles + 1, dtype=torch.float64, device=device)
    plan.dummies = {  # pointers for roles the call does not have: never read
        torch.float32: torch.zeros(1, dtype=torch.float32, device=device),
        torch.int32: torch.zeros(1, dtype=torch.int32, device=device),
        params[0].dtype: torch.zeros(1, dtype=params[0].dtype, device=device),
    }
    return plan


_CACHE = _plan.PlanCache()
_NEEDS_COPIES = object()


def _key(lists, device, vector_reshape, windows):
    params = lists[_L_PARAMS]
    try:
        return (
            device,
            vector_reshape,
            windows,
            params[0].dtype,
            tuple(map(torch.Tensor.size, params)),
            _plan.layouts(params),
            _plan.layouts(lists[_L_GRADS]),
            *(_plan.ptrs(ts) for ts in lists),
        )
    except (RuntimeError, AttributeError, TypeError):
        return None


def smmf(
    params,
    grads,
    row_ms,
    col_ms,
    signs,
    row_vs,
    col_vs,
    exp_avgs,
    exp_avg_sqs,
    state_steps,
    *,
    lr,
    beta,
    eps,
    weight_decay,
    decay_rate,
    growth_rate,
    vector_reshape,
    decoupled,
    grad_scale=None,
    found_inf=None,
    clip_coef=None,
    global_numels=None,
    starts=None,
    sums=None,
):
    """One SMMF step in two launches (fused_optim.functional.smmf has the arguments)."""
    if not params:
        return
    lists = [
        list(x)
        for x in (params, grads, row_ms, col_ms, signs, row_vs, col_vs, exp_avgs, exp_avg_sqs, state_steps)
    ]
    device = params[0].device
    momentum = beta is not None
    for what, t in (("grad_scale", grad_scale), ("found_inf", found_inf), ("clip_coef", clip_coef)):
        _plan.check_scalar(t, device, what)
    lr_value, lr_tensor = _lr_split(lr, device)
    if (global_numels is None) != (sums is None) or (starts is None) != (sums is None):
        raise ValueError("fused_optim: global_numels, starts and sums go together")
    windows = None if sums is None else tuple(zip(global_numels, starts, strict=True))
    key = _key(lists, device, vector_reshape, windows)
    plan = _CACHE.get(key) if key is not None else None
    if plan is None:
        matrices = _matrices(params, vector_reshape, windows)
        _validate(lists, vector_reshape, momentum, matrices)
        _plan.check_runnable(_update_kernel, device)
        contiguous = all(t.is_contiguous() for ts in lists for t in ts)
        plan = _build(lists, device, matrices) if contiguous else _NEEDS_COPIES
        if key is not None:
            _CACHE.put(key, plan)
    write_back = []
    if plan is _NEEDS_COPIES:  # rare: the kernels walk the row-major layout
        for r, ts in enumerate(lists):
            for i, t in enumerate(ts):
                if not t.is_contiguous():
                    ts[i] = t.contiguous()
                    if r != _L_GRADS:
                        write_back.append((t, ts[i]))
        plan = _build(lists, device, _matrices(params, vector_reshape, windows))
    if sums is not None:
        wanted = 2 * sum(plan.sums_shape)
        if sums.dtype != torch.float64 or sums.numel() != wanted or not sums.is_contiguous():
            raise ValueError(
                f"fused_optim: sums must be a contiguous float64 tensor of {wanted} elements (SmmfSums), got "
                f"{sums.dtype} of {sums.numel()}"
            )
        _plan.check_device(sums, device, "sums")

    def base(r, dtype):
        b = plan.bases[r]
        return lists[r][b] if b is not None else plan.dummies[dtype]

    p_dtype = params[0].dtype
    bits = _plan.f64_bits
    common = dict(RECORD=RECORD, MOMENTUM=momentum, HAS_FOUND_INF=found_inf is not None)
    with _plan.device_guard(device):
        _plan._launch(
            _update_kernel,
            (plan.n_tiles,),
            plan.tiles,
            plan.meta,
            base(_L_PARAMS, p_dtype),
            base(_L_GRADS, p_dtype),
            base(_L_ROW_M, torch.float32),
            base(_L_COL_M, torch.float32),
            base(_L_SIGN, torch.int32),
            base(_L_ROW_V, torch.float32),
            base(_L_COL_V, torch.float32),
            base(_L_EXP_AVG, p_dtype),
            base(_L_EXP_AVG_SQ, p_dtype),
            base(_L_STEPS, torch.float32),
            lr_tensor,
            plan.partials,
            plan.totals,
            grad_scale,
            found_inf,
            clip_coef,
            0 if lr_tensor is not None else bits(lr_value),
            bits(beta if momentum else 0.0),
            bits(growth_rate),
            bits(decay_rate),
            bits(eps),
            bits(weight_decay),
            L2=not decoupled and weight_decay != 0.0,
            DECOUPLED=decoupled,
            LR_IS_TENSOR=lr_tensor is not None,
            HAS_GRAD_SCALE=grad_scale is not None,
            HAS_CLIP=clip_coef is not None,
            TILE_R=TILE_R,
            TILE_C=TILE_C,
            num_warps=NUM_WARPS,
            **common,
        )
        _plan._launch(
            _finalize_kernel,
            (plan.n_parts,),
            plan.parts,
            plan.meta,
            base(_L_ROW_M, torch.float32),
            base(_L_COL_M, torch.float32),
            base(_L_ROW_V, torch.float32),
            base(_L_COL_V, torch.float32),
            base(_L_STEPS, torch.float32),
            plan.partials,
            plan.totals,
            found_inf,
            sums,
            *plan.sums_shape,
            RAW_SUMS=sums is not None,
            PART=PART,
            BLOCK_T=256,
            num_warps=NUM_WARPS,
            **common,
        )
    for dst, src in write_back:
        dst.copy_(src)
