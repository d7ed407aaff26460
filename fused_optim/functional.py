"""Functional API: one call per algorithm over lists of tensors of ONE device and one dtype
combination (params/grads share a dtype; states share a dtype). The optimizer classes group
tensors this way and call these; use them directly to drive the kernels yourself.

`lr` may be a float or a one-element tensor; `state_steps` are float32 one-element tensors on
the params' device, advanced by the call. `grad_scale`/`found_inf` follow torch's fused
GradScaler protocol (a step with found_inf != 0 changes nothing); `clip_coef` multiplies the
gradients in registers (they are never rewritten).
"""

import math

import torch

from fused_optim import _backends
from fused_optim._reference.adam import has_values


def _backend(name: str, tensors):
    if not has_values(tensors[0]):  # meta / FakeTensor: shapes only, through the fake impls
        return _backends.for_tracing()
    return _backends.get(name, tensors[0].device, tensors[0].dtype)


def adam(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_exp_avg_sqs,
    state_steps,
    *,
    lr: float | torch.Tensor = 1e-3,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled: bool = False,
    amsgrad: bool = False,
    maximize: bool = False,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    clip_coef: torch.Tensor | None = None,
    backend: str = "auto",
) -> None:
    r"""One fused Adam (``decoupled=False``, L2 decay) or AdamW (``decoupled=True``) step over
    lists of tensors, in place: the math of :class:`fused_optim.Adam`.

    Args:
        params, grads, exp_avgs, exp_avg_sqs (list of Tensor): one entry per param; params and
            grads share a dtype, states share a dtype (that of the params, or float32), all on
            one device.
        max_exp_avg_sqs (list of Tensor): the running maxima with ``amsgrad``, else ``[]``.
        state_steps (list of Tensor): one-element float32 tensors on the params' device,
            incremented by the call.
        lr (float or Tensor): learning rate; a tensor is read on the device.
        beta1, beta2, eps, weight_decay (float): as :class:`fused_optim.Adam`.
        decoupled, amsgrad, maximize (bool): AdamW decay, AMSGrad, maximize.
        grad_scale, found_inf (Tensor, optional): torch's GradScaler protocol: grads are
            divided by ``grad_scale``; nothing changes when ``found_inf`` is non-zero.
        clip_coef (Tensor, optional): multiplies every grad (e.g. from :func:`global_norm`).
        backend (str): ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"reference"``.

    Example:
        >>> norm, coef = functional.global_norm(grads, max_norm=1.0)
        >>> functional.adam(params, grads, ms, vs, [], steps, lr=1e-3, decoupled=True, clip_coef=coef)
    """
    if not params:
        return
    _backend(backend, params).adam(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else [], state_steps,
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, decoupled=decoupled,
        amsgrad=amsgrad, maximize=maximize, adax=False, grad_scale=grad_scale,
        found_inf=found_inf, clip_coef=clip_coef,
    )  # fmt: skip


def adax(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    state_steps,
    *,
    lr: float | torch.Tensor = 1.5e-3,
    beta1: float = 0.9,
    beta2: float = 1e-4,
    eps: float = 1e-12,
    weight_decay: float = 5e-4,
    decoupled: bool = False,
    maximize: bool = False,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    clip_coef: torch.Tensor | None = None,
    backend: str = "auto",
) -> None:
    r"""One fused AdaX (``decoupled=False``) or AdaXW (``decoupled=True``) step over lists of
    tensors, in place: the math of :class:`fused_optim.AdaX`. ``exp_avg_sqs`` hold the
    normalised second moment ``v_hat = v / ((1 + beta2)^t - 1)``, not the authors' raw ``v``.
    The arguments are those of :func:`adam`, ``backend`` included, without amsgrad; ``beta2``
    is AdaX's growth increment.
    """
    if not params:
        return
    _backend(backend, params).adam(
        params, grads, exp_avgs, exp_avg_sqs, [], state_steps,
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, decoupled=decoupled,
        amsgrad=False, maximize=maximize, adax=True, grad_scale=grad_scale,
        found_inf=found_inf, clip_coef=clip_coef,
    )  # fmt: skip


def global_norm(
    tensors,
    norm_type: float = 2.0,
    max_norm: float = math.inf,
    grad_scale: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The joint norm of ``tensors`` (all on one device) and the clip coefficient for it,
    without a host sync.

    Args:
        tensors (list of Tensor): float32/float16/bfloat16 (float64 runs on the reference).
        norm_type (float): the p of the p-norm, or ``inf`` (default: 2).
        max_norm (float): the norm to clip to (default: inf, no clipping).
        grad_scale (Tensor, optional): the norm of ``tensors / grad_scale`` is returned
            (GradScaler-scaled grads).
        backend (str): ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"reference"``.

    Returns:
        (total_norm, clip_coef): 0-d float32 tensors on the device, with
        ``clip_coef = min(1, max_norm / (total_norm + 1e-6))`` as torch computes it.
    """
    return _backend(backend, tensors).global_norm(tensors, norm_type, max_norm, grad_scale)


def adafactor(
    params,
    grads,
    row_vars,
    col_vars,
    variances,
    state_steps,
    *,
    lr: float | torch.Tensor = 1e-2,
    beta2_decay: float = -0.8,
    eps1: float | None = None,
    eps2: float = 1e-3,
    d: float = 1.0,
    weight_decay: float = 0.0,
    maximize: bool = False,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    clip_coef: torch.Tensor | None = None,
    backend: str = "auto",
) -> None:
    r"""One fused Adafactor step, torch.optim.Adafactor's flavour, over lists of tensors, in
    place: the math of :class:`fused_optim.Adafactor` (ALGORITHMS.md section 3a).

    Args:
        params, grads (list of Tensor): one entry per param, one dtype, one device.
        row_vars, col_vars (list of Tensor): the factored second moment, shapes
            ``[..., n, 1]`` and ``[..., 1, m]``: one entry per param with ``ndim >= 2``, in
            the order of ``params``.
        variances (list of Tensor): the full second moment (the param's shape), one entry per
            param with ``ndim < 2``, in order. States share one dtype.
        state_steps (list of Tensor): one-element float32 tensors on the params' device,
            incremented by the call.
        lr (float or Tensor): learning rate; a tensor is read on the device.
        beta2_decay, eps2, d, weight_decay (float), maximize (bool): as
            :class:`fused_optim.Adafactor`; ``eps1=None`` is ``finfo(params' dtype).eps``.
        grad_scale, found_inf, clip_coef (Tensor, optional): as in :func:`adam`.
        backend (str): ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"reference"``.
    """
    if not params:
        return
    if lr is None:
        raise TypeError("fused_optim: adafactor needs an lr (a float or a one-element tensor), got None")
    _backend(backend, params).adafactor(
        params, grads, row_vars, col_vars, variances, state_steps, lr=lr, beta2_decay=beta2_decay,
        eps1=eps1, eps2=eps2, d=d, weight_decay=weight_decay, maximize=maximize,
        grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef,
    )  # fmt: skip


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
    lr: float | torch.Tensor | None = None,
    eps1: float = 1e-30,
    eps2: float = 1e-3,
    clip_threshold: float = 1.0,
    decay_rate: float = -0.8,
    beta1: float | None = None,
    weight_decay: float = 0.0,
    scale_parameter: bool = True,
    relative_step: bool = True,
    warmup_init: bool = False,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    clip_coef: torch.Tensor | None = None,
    backend: str = "auto",
) -> None:
    r"""One fused Adafactor step, transformers' flavour, over lists of tensors, in place: the
    math of :class:`fused_optim.transformers.Adafactor` (ALGORITHMS.md section 3b).

    Args:
        params, grads (list of Tensor): one entry per param, one dtype, one device.
        exp_avg_sq_rows, exp_avg_sq_cols (list of Tensor): shapes ``shape[:-1]`` and
            ``shape[:-2] + shape[-1:]``, one entry per param with ``ndim >= 2``, in order.
        exp_avg_sqs (list of Tensor): the full second moment, one per param with ``ndim < 2``.
        exp_avgs (list of Tensor): the first moment, one per param with ``beta1``, else ``[]``.
        rmss (list of Tensor): 0-d tensors receiving RMS(param) before the step (transformers'
            ``RMS`` state), one per param, or ``[]``. States are float32 or the params' dtype.
        state_steps (list of Tensor): one-element float32 tensors, incremented by the call.
        lr (float, Tensor or None): used only without ``relative_step``.
        The other arguments are those of :class:`fused_optim.transformers.Adafactor`, and
        ``grad_scale``, ``found_inf``, ``clip_coef``, ``backend`` as in :func:`adam`.
    """
    if not params:
        return
    if lr is None and not relative_step:
        raise TypeError("fused_optim: adafactor_transformers with relative_step=False needs an lr, got None")
    _backend(backend, params).adafactor_transformers(
        params, grads, exp_avg_sq_rows, exp_avg_sq_cols, exp_avg_sqs, exp_avgs, rmss, state_steps,
        lr=lr, eps1=eps1, eps2=eps2, clip_threshold=clip_threshold, decay_rate=decay_rate,
        beta1=beta1, weight_decay=weight_decay, scale_parameter=scale_parameter,
        relative_step=relative_step, warmup_init=warmup_init, grad_scale=grad_scale,
        found_inf=found_inf, clip_coef=clip_coef,
    )  # fmt: skip


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
    lr: float | torch.Tensor = 1e-3,
    beta: float | None = 0.9,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decay_rate: float = -0.5,
    growth_rate: float = 0.999,
    vector_reshape: bool = True,
    decoupled: bool = True,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    clip_coef: torch.Tensor | None = None,
    backend: str = "auto",
    global_numels: list[int] | None = None,
    starts: list[int] | None = None,
    sums: torch.Tensor | None = None,
) -> None:
    r"""One fused SMMF step over lists of tensors, in place: the math of
    :class:`fused_optim.SMMF` (ALGORITHMS.md section 4).

    Args:
        params, grads (list of Tensor): one entry per param, one dtype, one device.
        row_ms, col_ms, signs (list of Tensor): the compressed first moment of each
            square-matricized (n x m) param, in order: float32 [n] and [m], and the sign bits
            as int32 [n, ceil(m / 32)]; ``[]`` when ``beta`` is None.
        row_vs, col_vs (list of Tensor): the second moment's float32 factors [n] and [m].
        exp_avgs, exp_avg_sqs (list of Tensor): the dense moments (the param's shape and dtype)
            of the params that are vectors once squeezed when ``vector_reshape`` is False, in
            order (``exp_avgs`` is ``[]`` when ``beta`` is None).
        state_steps (list of Tensor): one-element float32 tensors, incremented by the call.
        decoupled (bool): ``weight_decay_mode='adamw'`` (True) or ``'adam'`` (False).
        global_numels, starts, sums (optional, together): the params are shards, each the
            run of elements ``[starts[i], starts[i] + numel)`` of a param of
            ``global_numels[i]`` elements (-1 for a param on the dense path); ``sums`` (float64,
            zeros on entry) receives the raw row and column sums of what each shard holds
            instead of the factors being written (rows a shard does not touch stay 0), and signs[k]
            holds the words of the matrix rows the run touches (``fused_optim._reference.smmf``:
            ``smmf``, ``Window``, ``SmmfSums``, whose ``finish`` writes the factors once the
            sums are reduced over the ranks).
        The other arguments are those of :class:`fused_optim.SMMF`, and ``grad_scale``,
        ``found_inf``, ``clip_coef``, ``backend`` as in :func:`adam`.
    """
    if not params:
        return
    if not (global_numels is None) == (starts is None) == (sums is None):
        raise ValueError("fused_optim: global_numels, starts and sums go together")
    impl = _backend(backend, params)
    if not hasattr(impl, "smmf"):
        if backend != "auto" and has_values(params[0]):
            name = _backends.resolve(backend, params[0].device, params[0].dtype)
            raise RuntimeError(f"fused_optim: backend {name!r} has no SMMF kernels in this build")
        impl = _backends.get("reference", params[0].device)
    impl.smmf(
        params, grads, row_ms, col_ms, signs, row_vs, col_vs, exp_avgs, exp_avg_sqs, state_steps,
        lr=lr, beta=beta, eps=eps, weight_decay=weight_decay, decay_rate=decay_rate,
        growth_rate=growth_rate, vector_reshape=vector_reshape, decoupled=decoupled,
        grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef,
        **({} if sums is None else dict(global_numels=global_numels, starts=starts, sums=sums)),
    )  # fmt: skip
