"""Global-norm gradient clipping (ALGORITHMS.md section 5), as math/clip.h: a multi-tensor
norm that is deterministic (per-work-item partials, then one program reduces them in a fixed
order; no float atomics) and an in-place multi-tensor scale. The per-element norm contribution
exists once, in `norm_contribution`."""

import math

import torch
import triton
import triton.language as tl

from . import _plan
from ._common import f64, role_ptr, to_storage, work_item

# Norm kinds (constexpr): how contributions are formed and combined.
NORM_TWO = tl.constexpr(0)  # sum of squares, then sqrt
NORM_INF = tl.constexpr(1)  # max of |x|
NORM_P = tl.constexpr(2)  # sum of |x|^p, then ^(1/p)
NORM_ONE = tl.constexpr(3)  # sum of |x|, exact (not via exp/log)

_FINAL_BLOCK = 1024  # partials reduced per iteration of the finalize kernel
_FLT_MAX = tl.constexpr(3.4028234663852886e38)  # torch.finfo(torch.float32).max


@triton.jit
def norm_contribution(x, p, NORM: tl.constexpr):
    """THE per-element contribution of x (fp32) to a p-norm (math/clip.h norm_contribution)."""
    a = tl.abs(x)
    if NORM == NORM_TWO:
        c = a * a
    elif NORM == NORM_P:
        zero = a == 0.0  # a^p for p > 0 via exp2/log2, with log2(0) kept out of the way
        c = tl.where(zero, 0.0, tl.exp2(p * tl.log2(tl.where(zero, 1.0, a))))
    else:
        c = a
    return c


@triton.jit
def _max_nan(a, b):
    """Elementwise max that propagates NaN, like torch's inf-norm (the hardware max drops NaN)."""
    return tl.where((b > a) | (b != b), b, a)


@triton.jit
def _combine(acc, x, NORM: tl.constexpr):
    if NORM == NORM_INF:
        acc = _max_nan(acc, x)
    else:
        acc = acc + x
    return acc


@triton.jit
def _reduce(acc, NORM: tl.constexpr):
    if NORM == NORM_INF:
        # tl.max on a GPU drops NaN, so NaNs are counted separately.
        n_nan = tl.sum((acc != acc).to(tl.int32), 0)
        r = tl.where(n_nan > 0, float("nan"), tl.max(acc, 0))
    else:
        r = tl.sum(acc, 0)
    return r


@triton.jit
def _norm_tile(acc, ptrs, mask, p, NORM: tl.constexpr):
    if mask is None:  # a full tile
        x = tl.load(ptrs).to(tl.float32)
    else:
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)  # 0 contributes 0 to every kind
    return _combine(acc, norm_contribution(x, p, NORM), NORM)


@triton.jit(do_not_specialize=["item_base", "p_bits"])
def _norm_partials_kernel(
    items_ptr,
    meta_ptr,
    x_ptr,
    partials_ptr,
    item_base,
    p_bits: tl.int64,
    RECORD: tl.constexpr,
    BLOCK: tl.constexpr,
    TILES: tl.constexpr,
    ALIGNED: tl.constexpr,
    NORM: tl.constexpr,
):
    """One program = one work item: writes that chunk's partial to partials[item_base + pid]."""
    CHUNK: tl.constexpr = BLOCK * TILES
    tensor, record, chunk = work_item(items_ptr, meta_ptr, RECORD)
    numel = tl.load(record)
    chunk_start = chunk * CHUNK
    x = role_ptr(x_ptr, record, 1, chunk_start, ALIGNED)
    p = f64(p_bits).to(tl.float32)
    arange = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    if chunk_start + CHUNK <= numel:
        for k in tl.static_range(TILES):
            acc = _norm_tile(acc, x + k * BLOCK + arange, None, p, NORM)
    else:
        rest = numel - chunk_start
        for k in range(tl.cdiv(rest, BLOCK)):  # rest < CHUNK: only tiles holding elements
            offs = k * BLOCK + arange
            acc = _norm_tile(acc, x + offs, offs < rest, p, NORM)
    tl.store(partials_ptr + item_base + tl.program_id(0), _reduce(acc, NORM))


@triton.jit(do_not_specialize=["n_partials", "p_bits", "max_norm_bits"])
def _norm_finalize_kernel(
    partials_ptr,
    n_partials,
    total_ptr,
    coef_ptr,
    grad_scale_ptr,
    p_bits: tl.int64,
    max_norm_bits: tl.int64,
    NORM: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    FINAL_BLOCK: tl.constexpr,
):
    """One program: combines the partials in a fixed order (fp64), writes the norm and
    coef = min(1, max_norm / (norm + 1e-6)) (NaN stays NaN), as math/clip.h."""
    arange = tl.arange(0, FINAL_BLOCK)
    acc = tl.zeros([FINAL_BLOCK], tl.float64)
    for start in range(0, n_partials, FINAL_BLOCK):
        offs = start + arange
        partial = tl.load(partials_ptr + offs, mask=offs < n_partials, other=0.0)
        acc = _combine(acc, partial.to(tl.float64), NORM)
    total = _reduce(acc, NORM)  # the sum of the contributions (their max for the inf-norm)
    # torch's overflow (math/clip.h norm_total): torch accumulates fp32/fp16/bf16 in fp32, so a
    # sum beyond FLT_MAX is +inf there; checked on the sum of the unscaled tensors.
    unscaled = total
    if HAS_GRAD_SCALE:
        scale = tl.load(grad_scale_ptr).to(tl.float64)
        if NORM == NORM_TWO:
            unscaled = total / (scale * scale)
        elif NORM == NORM_P:
            unscaled = total / tl.exp2(f64(p_bits) * tl.log2(scale))
        else:
            unscaled = total / scale
    overflow = unscaled > _FLT_MAX
    if NORM == NORM_TWO:
        total = tl.sqrt(total)
    elif NORM == NORM_P:
        zero = total == 0.0
        total = tl.where(zero, 0.0, tl.exp2(tl.log2(tl.where(zero, 1.0, total)) / f64(p_bits)))
    if HAS_GRAD_SCALE:
        total = total / tl.load(grad_scale_ptr).to(tl.float64)
    if NORM != NORM_INF:
        total = tl.where(overflow, float("inf"), total)
    total = total.to(tl.float32)
    # coef from the norm as reported (an fp32 norm of inf gives 0, as in torch)
    coef = f64(max_norm_bits) / (total.to(tl.float64) + 1e-6)
    coef = tl.where(coef > 1.0, 1.0, coef)
    tl.store(total_ptr, total)
    tl.store(coef_ptr, coef.to(tl.float32))


@triton.jit
def _scale_tile(ptrs, mask, coef):
    x = tl.load(ptrs, mask=mask).to(tl.float32)
    tl.store(ptrs, to_storage(x * coef, ptrs), mask=mask)


@triton.jit
def _scale_kernel(
    items_ptr,
    meta_ptr,
    x_ptr,
    coef_ptr,
    RECORD: tl.constexpr,
    BLOCK: tl.constexpr,
    TILES: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    CHUNK: tl.constexpr = BLOCK * TILES
    tensor, record, chunk = work_item(items_ptr, meta_ptr, RECORD)
    numel = tl.load(record)
    chunk_start = chunk * CHUNK
    x = role_ptr(x_ptr, record, 1, chunk_start, ALIGNED)
    coef = tl.load(coef_ptr).to(tl.float32)
    arange = tl.arange(0, BLOCK)
    if chunk_start + CHUNK <= numel:
        for k in tl.static_range(TILES):
            _scale_tile(x + k * BLOCK + arange, None, coef)
    else:
        rest = numel - chunk_start
        for k in range(tl.cdiv(rest, BLOCK)):  # rest < CHUNK: only tiles holding elements
            offs = k * BLOCK + arange
            _scale_tile(x + offs, offs < rest, coef)


class _Group:
    """The tensors of one dtype in a call: their plan and where their base tensor sits."""

    __slots__ = ("plan", "base", "item_base")

    def __init__(self, plan, base, item_base):
        self.plan = plan
        self.base = base  # index into the call's list of the tensor passed as base pointer
        self.item_base = item_base  # first partial of this group


class _Groups:
    __slots__ = ("groups", "n_items", "overlap")

    def __init__(self, groups, n_items, overlap):
        self.groups = groups
        self.n_items = n_items
        self.overlap = overlap  # None, or (i, j): tensors i and j share memory


_CACHE = _plan.PlanCache()
_NEEDS_COPIES = object()  # cache marker: some tensor is not dense in memory


def _groups(tensors, device):
    """Validates `tensors` and builds one plan per dtype (first-seen order); cached by caller."""
    _plan.check_runnable(_norm_partials_kernel, device)
    by_dtype = {}
    for i, t in enumerate(tensors):
        _plan.check_plain(t, "tensors", i)
        _plan.check_device(t, device, f"tensors[{i}]")
        by_dtype.setdefault(t.dtype, []).append(i)
    if not all(_plan.is_dense(t) for t in tensors):
        return _NEEDS_COPIES
    return _build_groups(tensors, by_dtype.values(), device)


def _build_groups(tensors, index_lists, device):
    groups, item_base = [], 0
    for idx in index_lists:
        plan = _plan.build([([tensors[i] for i in idx], True)], device)
        groups.append(_Group(plan, idx[plan.bases[0]], item_base))
        item_base += plan.n_items
    return _Groups(groups, item_base, _first_overlap(tensors))


def _first_overlap(tensors):
    """(i, j) for two tensors whose memory overlaps, else None: their byte spans sorted and
    neighbours compared, O(n log n), once per plan. The spans of tensors not dense in memory may
    overlap without sharing an element (interleaved views); counted as overlapping, as what
    cannot be proven apart. Like the C++ check_no_overlap (csrc/ops.cpp)."""
    spans = []
    for i, t in enumerate(tensors):
        if t.numel() == 0:
            continue
        extent = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True))
        begin = t.data_ptr()
        spans.append((begin, begin + extent * t.element_size(), i))
    spans.sort()
    reach_end, reach = -1, -1
    for begin, end, i in spans:
        if begin < reach_end:
            return (min(i, reach), max(i, reach))
        if end > reach_end:
            reach_end, reach = end, i
    return None


def _check_no_overlap(overlap) -> None:
    """scale_ writes all its tensors in one launch: two tensors over the same memory would be
    scaled concurrently (a race), where torch multiplies such memory once per occurrence, one
    after the other (clip_grad_norm_ splits repeated grads into rounds, one call each)."""
    if overlap is not None:
        i, j = overlap
        raise RuntimeError(
            f"fused_optim: tensors[{i}] and tensors[{j}] overlap in memory (the same tensor twice, or "
            "views of one tensor); one scale_ call scales its tensors in parallel, so pass memory "
            "shared by several tensors in separate calls"
        )


def _has_internal_overlap(t) -> bool:
    """A tensor with a stride-0 dimension of size > 1 (expanded): elements share memory."""
    return any(st == 0 and n > 1 for n, st in zip(t.shape, t.stride(), strict=True))


def _lookup(tensors):
    device = tensors[0].device
    try:
        key = (device, _plan.ptrs(tensors), _plan.numels(tensors), _plan.layouts(tensors))
    except (RuntimeError, AttributeError, TypeError):
        key = None  # e.g. a sparse tensor has no data_ptr: let validation say what is wrong
    entry = _CACHE.get(key) if key is not None else None
    if entry is None:
        entry = _groups(tensors, device)
        if key is not None:
            _CACHE.put(key, entry)
    return entry, device


def _norm_kind(norm_type: float) -> int:
    if norm_type == 2.0:
        return NORM_TWO.value
    if math.isinf(norm_type):
        return NORM_INF.value
    if norm_type == 1.0:
        return NORM_ONE.value
    return NORM_P.value


def global_norm(tensors, norm_type: float, max_norm: float, grad_scale: torch.Tensor | None = None):
    """(total_norm, clip_coef) over all tensors as float32 0-d tensors on their device, with
    clip_coef = min(1, max_norm / (total_norm + 1e-6)); total_norm is divided by grad_scale when
    given. Launches: one per dtype plus one; bitwise deterministic."""
    norm_type, max_norm = float(norm_type), float(max_norm)
    if not norm_type > 0.0:
        raise ValueError(f"fused_optim: norm_type must be positive or inf, got {norm_type}")
    if not tensors:
        raise ValueError("fused_optim: global_norm needs at least one tensor")
    entry, device = _lookup(tensors)
    _plan.check_scalar(grad_scale, device, "grad_scale")
    if entry is _NEEDS_COPIES:  # rare: norms of dense copies (reading only)
        tensors = [t if _plan.is_dense(t) else t.contiguous() for t in tensors]
        entry = _groups(tensors, device)
    kind = _norm_kind(norm_type)
    p_bits = _plan.f64_bits(norm_type if kind == NORM_P.value else 1.0)
    partials = torch.empty(entry.n_items, dtype=torch.float32, device=device)
    total = torch.empty((), dtype=torch.float32, device=device)
    coef = torch.empty((), dtype=torch.float32, device=device)
    with _plan.device_guard(device):
        for g in entry.groups:
            _plan._launch(
                _norm_partials_kernel,
                (g.plan.n_items,),
                g.plan.items,
                g.plan.meta,
                tensors[g.base],
                partials,
                g.item_base,
                p_bits,
                RECORD=_plan.RECORD,
                BLOCK=_plan.BLOCK,
                TILES=_plan.TILES,
                ALIGNED=g.plan.aligned,
                NORM=kind,
                num_warps=_plan.NUM_WARPS,
            )
        _plan._launch(
            _norm_finalize_kernel,
            (1,),
            partials,
            entry.n_items,
            total,
            coef,
            grad_scale,
            p_bits,
            _plan.f64_bits(max_norm),
            NORM=kind,
            HAS_GRAD_SCALE=grad_scale is not None,
            FINAL_BLOCK=_FINAL_BLOCK,
            num_warps=4,
        )
    return total, coef


def scale_(tensors, coef: torch.Tensor) -> None:
    """tensors[i] *= coef in place (coef a one-element float32 tensor on their device); math in
    fp32, one launch per dtype."""
    if not tensors:
        return
    entry, device = _lookup(tensors)
    _plan.check_scalar(coef, device, "coef")
    write_back = []
    if entry is _NEEDS_COPIES:  # rare: scale dense working copies, then copy back
        _check_no_overlap(_first_overlap(tensors))
        work = []
        for i, t in enumerate(tensors):
            if _plan.is_dense(t):
                work.append(t)
            else:
                if _has_internal_overlap(t):
                    raise RuntimeError(
                        f"fused_optim: tensors[{i}] has elements that share memory (an expanded "
                        "tensor?); it cannot be scaled in place"
                    )
                work.append(t.contiguous())
                write_back.append((t, work[-1]))
        tensors = work
        entry = _groups(tensors, device)
    else:
        _check_no_overlap(entry.overlap)
    with _plan.device_guard(device):
        for g in entry.groups:
            _plan._launch(
                _scale_kernel,
                (g.plan.n_items,),
                g.plan.items,
                g.plan.meta,
                tensors[g.base],
                coef,
                RECORD=_plan.RECORD,
                BLOCK=_plan.BLOCK,
                TILES=_plan.TILES,
                ALIGNED=g.plan.aligned,
                num_warps=_plan.NUM_WARPS,
            )
    for dst, src in write_back:
        dst.copy_(src)
