"""Adafactor, both flavours of ALGORITHMS.md section 3, one tensor at a time.

`adafactor` is torch.optim.Adafactor's flavour (3a), `adafactor_transformers` is
transformers.optimization.Adafactor's (3b). A tensor with ndim >= 2 is factored over its last
two dims (leading dims are batch dims); ndim < 2 keeps a full second moment.

State lists are compact, as every backend takes them: the row and column statistics list one
entry per factored param (ndim >= 2), in order, the full second moments one per other param.
"""

import math

import torch

from fused_optim._reference.adam import _math_dtype, _scalar, prepare_grad


def _rms(x: torch.Tensor) -> torch.Tensor:
    """‖x‖/√numel as a 0-d tensor (kept on the device: no host sync per tensor)."""
    return x.norm() / math.sqrt(x.numel())


def _positions(params) -> tuple[dict, dict]:
    """param index -> its index in the compact factored / full state lists."""
    factored, full = {}, {}
    for i, p in enumerate(params):
        if p.dim() >= 2:
            factored[i] = len(factored)
        else:
            full[i] = len(full)
    return factored, full


def _skip(found_inf) -> bool:
    # GradScaler saw an inf/NaN: params and state (step included) stay untouched.
    return found_inf is not None and _scalar(found_inf, placeholder=0.0) != 0.0


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
) -> None:
    """One torch-flavour step (ALGORITHMS.md 3a) over lists of tensors, in place.

    row_vars / col_vars ([..., n, 1] / [..., 1, m]) hold one entry per param with ndim >= 2,
    variances (the param's shape) one per other param, each in the order of params.
    eps1=None means finfo(param dtype).eps, taken per tensor."""
    if _skip(found_inf):
        return
    lr = _scalar(lr)
    factored, full = _positions(params)
    for i, param in enumerate(params):
        step_t = state_steps[i]
        if param.numel() == 0:
            step_t.add_(1)  # nothing to update; the step still counts, as for any tensor
            continue
        md = _math_dtype(param)
        t = _scalar(step_t) + 1.0
        e1 = torch.finfo(param.dtype).eps if eps1 is None else eps1

        g = prepare_grad(grads[i], md, maximize=maximize, grad_scale=grad_scale, clip_coef=clip_coef)
        theta = param.to(md)

        rho = min(lr, 1.0 / math.sqrt(t))
        alpha = torch.clamp(_rms(theta), min=eps2) * rho  # RMS of θ before the decay
        if weight_decay != 0.0:
            theta = theta * (1.0 - lr * weight_decay)  # lr, not rho: as torch does

        w = t**beta2_decay  # 1 - beta2_t, the weight of the new statistics
        if g.dim() >= 2:
            # torch.lerp: its rounding (two formulas split at w = 0.5) is torch's, exact at w = 1.
            row_var, col_var = row_vars[factored[i]], col_vars[factored[i]]
            r = row_var.to(md).lerp((g * g).mean(dim=-1, keepdim=True), w)
            c = col_var.to(md).lerp((g * g).mean(dim=-2, keepdim=True), w)
            # Normalise r before multiplying by c: r_i·c_j as raw products underflows in fp32
            # for tiny gradients (ALGORITHMS.md, precision rule).
            a = r / torch.clamp(r.mean(dim=-2, keepdim=True), min=e1)
            est = a * c
            row_var.copy_(r)
            col_var.copy_(c)
        else:
            v = variances[full[i]].to(md).lerp(g * g, w)
            est = v
            variances[full[i]].copy_(v)

        # eps1 squared: it bounds est, whose square root scales the update.
        u = g * torch.rsqrt(torch.clamp(est, min=e1 * e1))
        denom = torch.clamp(_rms(u) / d, min=1.0)
        theta = theta - (alpha / denom) * u

        param.copy_(theta)
        step_t.add_(1)


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
) -> None:
    """One transformers-flavour step (ALGORITHMS.md 3b) over lists of tensors, in place.

    exp_avg_sq_rows / exp_avg_sq_cols (shape[:-1] / shape[:-2] + shape[-1:]) hold one entry per
    param with ndim >= 2, exp_avg_sqs one per other param, in the order of params; exp_avgs
    one per param when beta1 is not None, else []; rmss (0-d, one per param, or []) receive
    RMS(θ) as transformers' `RMS` state. lr is ignored (may be None) when relative_step."""
    if _skip(found_inf):
        return
    lr = None if relative_step else _scalar(lr)
    factored, full = _positions(params)
    for i, param in enumerate(params):
        step_t = state_steps[i]
        rms_out = rmss[i] if rmss else None
        if param.numel() == 0:
            # Nothing to update. transformers would store RMS = 0/0 = NaN here; 0 is kept
            # instead so that a state_dict never carries a NaN.
            if rms_out is not None:
                rms_out.zero_()
            step_t.add_(1)
            continue
        md = _math_dtype(param)
        t = _scalar(step_t) + 1.0

        g = prepare_grad(grads[i], md, maximize=False, grad_scale=grad_scale, clip_coef=clip_coef)
        theta = param.to(md)

        rms = _rms(theta)  # before any decay
        if relative_step:
            rho = min(1e-6 * t if warmup_init else 1e-2, 1.0 / math.sqrt(t))
        else:
            rho = lr
        alpha = torch.clamp(rms, min=eps2) * rho if scale_parameter else rho

        beta2t = 1.0 - t**decay_rate
        s = g * g + eps1
        if g.dim() >= 2:
            row, col = exp_avg_sq_rows[factored[i]], exp_avg_sq_cols[factored[i]]
            r = beta2t * row.to(md) + (1.0 - beta2t) * s.mean(dim=-1)
            c = beta2t * col.to(md) + (1.0 - beta2t) * s.mean(dim=-2)
            # a_i, b_j: O(n + m) factors, never the raw product r_i·c_j (precision rule).
            a = torch.rsqrt(r / r.mean(dim=-1, keepdim=True))
            b = torch.rsqrt(c)
            u = g * a.unsqueeze(-1) * b.unsqueeze(-2)
            row.copy_(r)
            col.copy_(c)
        else:
            sq = exp_avg_sqs[full[i]]
            v = beta2t * sq.to(md) + (1.0 - beta2t) * s
            u = g * torch.rsqrt(v)
            sq.copy_(v)

        u = u / torch.clamp(_rms(u) / clip_threshold, min=1.0)
        u = alpha * u
        if beta1 is not None:
            # Momentum on the clipped, scaled update (transformers' order).
            m = beta1 * exp_avgs[i].to(md) + (1.0 - beta1) * u
            exp_avgs[i].copy_(m)
            u = m

        if weight_decay != 0.0:
            theta = theta - (weight_decay * alpha) * theta
        theta = theta - u

        param.copy_(theta)
        if rms_out is not None:
            rms_out.copy_(rms)
        step_t.add_(1)
