"""Adam, AdamW, AdaX and AdaXW (ALGORITHMS.md sections 1 and 2): one launch per call over all
tensors. Same math as csrc/include/fused_optim/math/adam.h; the element update exists once here,
in `adam_update`, and the per-step scalars once, in `adam_step_scalars`."""

import math

import torch
import triton
import triton.language as tl

from . import _plan
from ._common import f64, role_ptr, to_storage, work_item

# Record words: 0 numel, then one element offset per role (the order of _roles below).
_PARAM = tl.constexpr(1)
_GRAD = tl.constexpr(2)
_EXP_AVG = tl.constexpr(3)
_EXP_AVG_SQ = tl.constexpr(4)
_MAX_EXP_AVG_SQ = tl.constexpr(5)
_STEP = tl.constexpr(6)


@triton.jit
def expm1_f64(x):
    """expm1 in fp64 from exp and log (the only transcendental functions the interpreter and
    every GPU backend share), with Kahan's correction: (u - 1) * x / log(u) is accurate to a
    few ulps where exp(x) - 1 would cancel."""
    u = tl.exp(x)
    um1 = u - 1.0
    # Where the correction is undefined: u == 1 (expm1 = x), u == 0 or inf (u - 1 is exact), NaN.
    ok = (u != 1.0) & (u > 0.0) & (u < float("inf"))
    fixed = um1 * (x / tl.log(tl.where(ok, u, 2.0)))
    return tl.where(ok, fixed, tl.where(u == 1.0, x, um1))


@triton.jit
def adam_step_scalars(
    t, lr, beta1, beta2, log_beta1, log_beta2, eps, weight_decay, ADAX: tl.constexpr, DECOUPLED: tl.constexpr
):
    """The scalars shared by every element of one tensor in one step, from fp64 inputs; t is the
    new (incremented) step. Adam: log_beta* = log(beta*). AdaX: log_beta2 = log1p(beta2), beta2
    is the growth increment, and v holds the normalised v-hat (ALGORITHMS.md section 2)."""
    if ADAX:
        bc = expm1_f64(t * log_beta2)  # (1 + beta2)^t - 1
        w = beta2 / bc  # weight of g^2 in the v-hat average; 1 at t = 1
        beta2_t = 1.0 - w
        one_minus_beta2_t = w
        step_size = lr
        bc2_sqrt = tl.full([], 1.0, tl.float64)
        eps_t = eps / tl.sqrt(bc)
    else:
        bc1 = -expm1_f64(t * log_beta1)  # 1 - beta1^t
        bc2 = -expm1_f64(t * log_beta2)
        beta2_t = beta2
        one_minus_beta2_t = 1.0 - beta2
        step_size = lr / bc1
        bc2_sqrt = tl.sqrt(bc2)
        eps_t = eps
    if DECOUPLED:
        l2_decay = tl.full([], 0.0, tl.float64)
        decay_factor = 1.0 - lr * weight_decay
    else:
        l2_decay = weight_decay
        decay_factor = tl.full([], 1.0, tl.float64)
    return (
        (1.0 - beta1).to(tl.float32),
        beta2_t.to(tl.float32),
        one_minus_beta2_t.to(tl.float32),
        step_size.to(tl.float32),
        bc2_sqrt.to(tl.float32),
        eps_t.to(tl.float32),
        l2_decay.to(tl.float32),
        decay_factor.to(tl.float32),
    )


@triton.jit
def adam_update(theta, g, m, v, vmax, scalars, AMSGRAD: tl.constexpr):
    """THE element update of the Adam family, in fp32 (math/adam.h adam_element). scalars is
    adam_step_scalars' tuple; g is the gradient already multiplied by the sign / unscale / clip
    factor. vmax is only meaningful with AMSGRAD: the raw second moment's maximum, as torch."""
    one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps, l2_decay, decay_factor = scalars
    # Skipped when 0 (not g + 0 * theta): a non-finite theta must not turn g into NaN.
    g = tl.where(l2_decay != 0.0, g + l2_decay * theta, g)
    theta = theta * decay_factor
    m = m + one_minus_beta1 * (g - m)
    v = beta2 * v + one_minus_beta2 * (g * g)
    if AMSGRAD:
        vmax = tl.maximum(vmax, v, propagate_nan=tl.PropagateNan.ALL)  # torch.maximum keeps NaN
        second = vmax
    else:
        second = v
    # IEEE sqrt/div (as torch's CUDA kernels), not the approximate ones Triton defaults to.
    denom = tl.div_rn(tl.sqrt_rn(second), bc2_sqrt) + eps
    theta = theta - step_size * tl.div_rn(m, denom)
    return theta, m, v, vmax


@triton.jit
def _adam_tile(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, mask, grad_mult, scalars, AMSGRAD: tl.constexpr):
    """Loads, updates and stores one tile. mask is None for full tiles (unmasked, vectorised)."""
    theta = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32) * grad_mult
    m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
    if AMSGRAD:
        vmax = tl.load(vmax_ptr + offs, mask=mask).to(tl.float32)
    else:
        vmax = v
    theta, m, v, vmax = adam_update(theta, g, m, v, vmax, scalars, AMSGRAD)
    tl.store(p_ptr + offs, to_storage(theta, p_ptr), mask=mask)
    tl.store(m_ptr + offs, to_storage(m, m_ptr), mask=mask)
    tl.store(v_ptr + offs, to_storage(v, v_ptr), mask=mask)
    if AMSGRAD:
        tl.store(vmax_ptr + offs, to_storage(vmax, vmax_ptr), mask=mask)


# Scalars that change between steps: never specialised on, so they never recompile.
_RUNTIME_SCALARS = [
    "lr_bits",
    "beta1_bits",
    "beta2_bits",
    "log_b1_bits",
    "log_b2_bits",
    "eps_bits",
    "wd_bits",
]


@triton.jit(do_not_specialize=_RUNTIME_SCALARS)
def _adam_kernel(
    items_ptr,
    meta_ptr,
    counters_ptr,
    param_ptr,
    grad_ptr,
    exp_avg_ptr,
    exp_avg_sq_ptr,
    max_exp_avg_sq_ptr,
    step_ptr,
    lr_ptr,
    grad_scale_ptr,
    found_inf_ptr,
    clip_coef_ptr,
    lr_bits: tl.int64,
    beta1_bits: tl.int64,
    beta2_bits: tl.int64,
    log_b1_bits: tl.int64,
    log_b2_bits: tl.int64,
    eps_bits: tl.int64,
    wd_bits: tl.int64,
    RECORD: tl.constexpr,
    BLOCK: tl.constexpr,
    TILES: tl.constexpr,
    ALIGNED: tl.constexpr,
    AMSGRAD: tl.constexpr,
    ADAX: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    DECOUPLED: tl.constexpr,
    LR_IS_TENSOR: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_CLIP: tl.constexpr,
):
    """One program = one (tensor, chunk) work item. Each program reads the tensor's OLD step;
    the last program of the tensor to finish (counted with an atomic per tensor) advances it."""
    if HAS_FOUND_INF:
        ok = tl.load(found_inf_ptr) == 0.0
    else:
        ok = True
    if ok:  # GradScaler saw inf/NaN: write nothing, not even the counters
        tensor, record, chunk = work_item(items_ptr, meta_ptr, RECORD)
        CHUNK: tl.constexpr = BLOCK * TILES
        numel = tl.load(record)
        chunk_start = chunk * CHUNK
        step_p = role_ptr(step_ptr, record, _STEP, 0, False)
        old_step = tl.load(step_p)

        if LR_IS_TENSOR:
            lr = tl.load(lr_ptr).to(tl.float64)
        else:
            lr = f64(lr_bits)
        t = old_step.to(tl.float64) + 1.0
        beta1, beta2 = f64(beta1_bits), f64(beta2_bits)
        log_b1, log_b2 = f64(log_b1_bits), f64(log_b2_bits)
        eps, wd = f64(eps_bits), f64(wd_bits)
        scalars = adam_step_scalars(t, lr, beta1, beta2, log_b1, log_b2, eps, wd, ADAX, DECOUPLED)
        # One factor for sign, unscale and clip, as math/adam.h grad_multiplier.
        if MAXIMIZE:
            grad_mult = tl.full([], -1.0, tl.float32)
        else:
            grad_mult = tl.full([], 1.0, tl.float32)
        if HAS_GRAD_SCALE:
            grad_mult = grad_mult / tl.load(grad_scale_ptr)
        if HAS_CLIP:
            grad_mult = grad_mult * tl.load(clip_coef_ptr)

        p = role_ptr(param_ptr, record, _PARAM, chunk_start, ALIGNED)
        g = role_ptr(grad_ptr, record, _GRAD, chunk_start, ALIGNED)
        m = role_ptr(exp_avg_ptr, record, _EXP_AVG, chunk_start, ALIGNED)
        v = role_ptr(exp_avg_sq_ptr, record, _EXP_AVG_SQ, chunk_start, ALIGNED)
        if AMSGRAD:
            vmax = role_ptr(max_exp_avg_sq_ptr, record, _MAX_EXP_AVG_SQ, chunk_start, ALIGNED)
        else:
            vmax = v
        arange = tl.arange(0, BLOCK)
        if chunk_start + CHUNK <= numel:
            for k in tl.static_range(TILES):
                _adam_tile(p, g, m, v, vmax, k * BLOCK + arange, None, grad_mult, scalars, AMSGRAD)
        else:  # the tensor's last chunk
            rest = numel - chunk_start
            for k in range(tl.cdiv(rest, BLOCK)):  # rest < CHUNK: only tiles holding elements
                offs = k * BLOCK + arange
                _adam_tile(p, g, m, v, vmax, offs, offs < rest, grad_mult, scalars, AMSGRAD)

        # Every thread has read the old step before this program reports completion.
        tl.debug_barrier()
        n_chunks = tl.maximum(tl.cdiv(numel, CHUNK), 1)
        if tl.atomic_add(counters_ptr + tensor, 1) == n_chunks - 1:
            tl.store(step_p, old_step + 1.0)
            tl.store(counters_ptr + tensor, 0)


_CACHE = _plan.PlanCache()
_NEEDS_COPIES = object()  # cache marker: some tensor is not laid out like its param


def _log(x: float) -> float:
    return math.log(x) if x > 0.0 else -math.inf


def _validate(lists, names, amsgrad: bool) -> torch.device:
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = lists
    device = params[0].device
    p_dtype, s_dtype = params[0].dtype, exp_avgs[0].dtype
    for name, tensors in zip(names, lists, strict=True):
        if tensors is None:
            continue
        for i, t in enumerate(tensors):
            if name == "state_steps":
                if not isinstance(t, torch.Tensor) or t.numel() != 1 or t.dtype != torch.float32:
                    raise TypeError(f"fused_optim: state_steps[{i}] must be a one-element float32 tensor")
            else:
                _plan.check_plain(t, name, i)
                want = p_dtype if name in ("params", "grads") else s_dtype
                if t.dtype != want:
                    raise TypeError(
                        f"fused_optim: {name}[{i}] has dtype {t.dtype}, expected {want}: params and grads "
                        "share one dtype and the optimizer states another (one call per dtype combination)"
                    )
                if t.shape != params[i].shape:
                    shapes = f"{tuple(t.shape)} and {tuple(params[i].shape)}"
                    raise RuntimeError(f"fused_optim: {name}[{i}] and params[{i}] differ in shape: {shapes}")
            _plan.check_device(t, device, f"{name}[{i}]")
    return device


def _launch_adam(plan, lists, hyper, flags, lr_tensor, grad_scale, found_inf, clip_coef):
    """hyper: (lr, beta1, beta2, eps, weight_decay) floats; flags: (decoupled, amsgrad, maximize, adax)."""
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = lists
    lr, beta1, beta2, eps, weight_decay = hyper
    decoupled, amsgrad, maximize, adax = flags
    b = plan.bases
    if adax:
        log_b1, log_b2 = 0.0, math.log1p(beta2)
    else:
        log_b1, log_b2 = _log(beta1), _log(beta2)
    bits = _plan.f64_bits
    with _plan.device_guard(params[0].device):
        _plan._launch(
            _adam_kernel,
            (plan.n_items,),
            plan.items,
            plan.meta,
            plan.counters,
            params[b[0]],
            grads[b[1]],
            exp_avgs[b[2]],
            exp_avg_sqs[b[3]],
            max_exp_avg_sqs[b[4]] if amsgrad else None,
            steps[b[5]],
            lr_tensor,
            grad_scale,
            found_inf,
            clip_coef,
            0 if lr_tensor is not None else bits(lr),
            bits(beta1),
            bits(beta2),
            bits(log_b1),
            bits(log_b2),
            bits(eps),
            bits(weight_decay),
            RECORD=_plan.RECORD,
            BLOCK=_plan.BLOCK,
            TILES=_plan.TILES,
            ALIGNED=plan.aligned,
            AMSGRAD=amsgrad,
            ADAX=adax,
            MAXIMIZE=maximize,
            DECOUPLED=decoupled,
            LR_IS_TENSOR=lr_tensor is not None,
            HAS_GRAD_SCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None,
            HAS_CLIP=clip_coef is not None,
            num_warps=_plan.NUM_WARPS,
        )


def _roles(lists, amsgrad):
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = lists
    return [
        (params, True),
        (grads, True),
        (exp_avgs, True),
        (exp_avg_sqs, True),
        (max_exp_avg_sqs if amsgrad else None, True),
        (steps, False),
    ]


def _with_dense_copies(lists, amsgrad, launch):
    """Rare path: some tensor is not dense, or not laid out like its param. Run on working copies
    laid out like the param (contiguous if the param itself is not dense), then copy back."""
    params = lists[0]
    write_back = []
    fixed = [list(t) if t is not None else None for t in lists]
    for i, p in enumerate(params):
        ref = p if _plan.is_dense(p) else torch.empty_like(p, memory_format=torch.contiguous_format)
        for r, written in ((0, True), (1, False), (2, True), (3, True), (4, True)):
            if fixed[r] is None or (r == 4 and not amsgrad):
                continue
            t = fixed[r][i]
            if not _plan.same_layout(t, ref):
                work = torch.empty_like(ref, dtype=t.dtype)
                work.copy_(t)
                fixed[r][i] = work
                if written:
                    write_back.append((t, work))
    plan = _plan.build(_roles(fixed, amsgrad), params[0].device, counters=True)
    launch(plan, fixed)
    for dst, src in write_back:
        dst.copy_(src)


def adam(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_exp_avg_sqs,
    state_steps,
    *,
    lr,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    amsgrad: bool,
    maximize: bool,
    adax: bool = False,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    clip_coef: torch.Tensor | None = None,
) -> None:
    """One Adam-family step over lists of tensors of one device, in place, in one launch.
    Same arguments and semantics as fused_optim._reference.adam."""
    n = len(params)
    if n == 0:
        return
    amsgrad = bool(amsgrad) and not adax  # AdaX has no amsgrad variant (as the reference)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(state_steps) == n):
        lengths = f"{n}, {len(grads)}, {len(exp_avgs)}, {len(exp_avg_sqs)}, {len(state_steps)}"
        raise ValueError(
            f"fused_optim: params, grads, exp_avgs, exp_avg_sqs and state_steps differ in length: {lengths}"
        )
    if amsgrad and len(max_exp_avg_sqs) != n:
        raise ValueError("fused_optim: amsgrad needs one max_exp_avg_sq per param")
    lists = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else None, state_steps)
    device = params[0].device
    for what, t in (("grad_scale", grad_scale), ("found_inf", found_inf), ("clip_coef", clip_coef)):
        _plan.check_scalar(t, device, what)
    lr_tensor = None
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or lr.dtype not in (torch.float32, torch.float64):
            raise TypeError("fused_optim: a tensor lr must be a one-element float32 or float64 tensor")
        if lr.device == device:
            lr_tensor = lr
        elif lr.device.type == "cpu":
            lr = float(lr)  # a CPU lr for GPU params: reading it is no device sync
        else:
            raise RuntimeError(f"fused_optim: lr is on {lr.device} but the params are on {device}")

    try:
        key = (
            device,
            amsgrad,
            params[0].dtype,
            exp_avgs[0].dtype,
            _plan.numels(params),
            _plan.ptrs(params),
            _plan.ptrs(grads),
            _plan.layouts(grads),  # grads are the tensors that are new every step
            _plan.ptrs(exp_avgs),
            _plan.ptrs(exp_avg_sqs),
            _plan.ptrs(max_exp_avg_sqs) if amsgrad else None,
            _plan.ptrs(state_steps),
        )
    except (RuntimeError, AttributeError, TypeError):
        key = None  # e.g. a sparse tensor has no data_ptr: let validation say what is wrong
    plan = _CACHE.get(key) if key is not None else None
    if plan is None:
        names = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps")
        _validate(lists, names, amsgrad)
        _plan.check_runnable(_adam_kernel, device)
        dense = all(
            _plan.is_dense(p) and all(_plan.same_layout(lst[i], p) for lst in lists[1:5] if lst is not None)
            for i, p in enumerate(params)
        )
        plan = _plan.build(_roles(lists, amsgrad), device, counters=True) if dense else _NEEDS_COPIES
        if key is not None:
            _CACHE.put(key, plan)

    hyper = (lr, beta1, beta2, eps, weight_decay)
    flags = (bool(decoupled), amsgrad, bool(maximize), bool(adax))

    def launch(plan, lists):
        _launch_adam(plan, lists, hyper, flags, lr_tensor, grad_scale, found_inf, clip_coef)

    if plan is _NEEDS_COPIES:
        _with_dense_copies(lists, amsgrad, launch)
    else:
        launch(plan, lists)
