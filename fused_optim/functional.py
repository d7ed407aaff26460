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


def _backend(name: str, tensors):
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
    """Adam (decoupled=False, L2 decay) or AdamW (decoupled=True), as torch.optim."""
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
    """AdaX (decoupled=False) or AdaXW (decoupled=True). exp_avg_sqs hold the normalised
    second moment v-hat = v / ((1 + beta2)^t - 1), not the authors' raw v."""
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
    """(total_norm, clip_coef) over all tensors of one device, as float32 0-d tensors on it,
    with clip_coef = min(1, max_norm / (total_norm + 1e-6)). No host sync."""
    return _backend(backend, tensors).global_norm(tensors, norm_type, max_norm, grad_scale)
