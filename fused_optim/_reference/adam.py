"""Adam, AdamW, AdaX and AdaXW (ALGORITHMS.md sections 1 and 2), one tensor at a time."""

import math

import torch
from torch._subclasses.fake_tensor import is_fake


def _math_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def has_values(t: torch.Tensor) -> bool:
    """False for meta and FakeTensor tensors (tracing, memory estimation): they have a shape but
    no values, so their steps compute shapes only. Under torch.compile tensors stand for real
    ones (dynamo traces them as fakes, but what it traces runs on real tensors)."""
    if torch.compiler.is_compiling():
        return True
    return t.device.type != "meta" and not is_fake(t)


def _scalar(x, placeholder: float = 1.0) -> float:
    """x as a float; a tensor without values gives `placeholder` (only shapes matter then)."""
    if not isinstance(x, torch.Tensor):
        return float(x)
    return float(x.item()) if has_values(x) else placeholder


def prepare_grad(grad, md, *, maximize, grad_scale, clip_coef):
    """The gradient an update sees, in the math dtype: sign, GradScaler unscale, clip."""
    g = grad.to(md)
    if maximize:
        g = -g
    # One-element scalars (GradScaler's are shape [1]) must not broadcast 0-d tensors up.
    if grad_scale is not None:
        g = g / grad_scale.to(md).reshape(())
    if clip_coef is not None:
        g = g * clip_coef.to(md).reshape(())
    return g


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
    """One step over lists of tensors, in place. With adax=True, exp_avg_sq holds AdaX's
    normalised second moment v-hat and beta2 is AdaX's growth increment."""
    if found_inf is not None and _scalar(found_inf, placeholder=0.0) != 0.0:
        return  # GradScaler saw an inf/NaN: params and state stay untouched
    lr = _scalar(lr)
    for i, param in enumerate(params):
        md = _math_dtype(param)
        step_t = state_steps[i]
        t = _scalar(step_t) + 1.0

        g = prepare_grad(grads[i], md, maximize=maximize, grad_scale=grad_scale, clip_coef=clip_coef)
        theta = param.to(md)
        m = exp_avgs[i].to(md)
        v = exp_avg_sqs[i].to(md)

        if weight_decay != 0.0:
            if decoupled:
                theta = theta * (1.0 - lr * weight_decay)
            else:
                g = g + weight_decay * param.to(md)

        m = m + (1.0 - beta1) * (g - m)
        if adax:
            if torch.compiler.is_compiling():
                # t is symbolic there and expm1 cannot be traced; in fp64 the power form is
                # within ~1e-12 relative of expm1 and overflows only past ~7M steps.
                bc = (1.0 + beta2) ** t - 1.0
            else:
                bc = math.expm1(t * math.log1p(beta2))  # (1 + beta2)^t - 1 without overflow
            w = beta2 / bc  # weight of g^2 in the v-hat average (1 at t = 1)
            # Convex form (Adam with beta2_t = 1 - w): exact at w = 1, unlike v + w (g^2 - v).
            v = (1.0 - w) * v + w * g * g
            theta = theta - lr * m / (v.sqrt() + eps / math.sqrt(bc))
        else:
            v = beta2 * v + (1.0 - beta2) * g * g
            bc1 = 1.0 - beta1**t
            bc2 = 1.0 - beta2**t
            second = v
            if amsgrad:
                second = torch.maximum(max_exp_avg_sqs[i].to(md), v)
                max_exp_avg_sqs[i].copy_(second)
            denom = second.sqrt() / math.sqrt(bc2) + eps
            theta = theta - (lr / bc1) * m / denom

        param.copy_(theta)
        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(v)
        step_t.add_(1)
