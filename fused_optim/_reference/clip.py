"""Global-norm gradient clipping (ALGORITHMS.md section 5): torch.nn.utils.clip_grad_norm_
semantics, split into the norm and the in-place scaling so optimizers can fold the scaling
into their update instead."""

import math

import torch

_FLT_MAX = torch.finfo(torch.float32).max


def total_norm(tensors, norm_type: float, grad_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The norm over all tensors (of tensors / grad_scale when given) as a float64 0-d tensor on
    their device, for a positive or inf norm_type.

    fp64 throughout: the reference should be more accurate than any kernel it judges. One rule
    keeps torch's overflow (math/clip.h norm_total, applied by every backend): torch accumulates
    fp32/fp16/bf16 tensors in fp32, so when their sum of squares (of |x|^p) exceeds FLT_MAX their
    norm is +inf; fp64 tensors are exact in fp64. With grad_scale the rule looks at the unscaled
    sum, as torch sees the grads after GradScaler.unscale_. Empty tensors contribute nothing
    (vector_norm refuses the inf-norm of an empty tensor)."""
    device = tensors[0].device if tensors else torch.device("cpu")
    scale = None if grad_scale is None else grad_scale.double().reshape(()).to(device)
    tensors = [t for t in tensors if t.numel() > 0]
    if not tensors:
        total = torch.zeros((), dtype=torch.float64, device=device)
    elif math.isinf(norm_type):
        norms = [torch.linalg.vector_norm(t.double(), norm_type) for t in tensors]
        total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
    else:
        sums = []  # of |x|^p, per class of dtype
        for wide in (False, True):
            group = [t for t in tensors if (t.dtype == torch.float64) == wide]
            if group:
                norms = [torch.linalg.vector_norm(t, norm_type, dtype=torch.float64) for t in group]
                s = torch.stack(norms).pow(norm_type).sum()
                if scale is not None:
                    s = s / scale.pow(norm_type)
                sums.append(s if wide else torch.where(s > _FLT_MAX, math.inf, s))
        total = sum(sums).pow(1.0 / norm_type)
        scale = None  # applied to the sums
    return total if scale is None else total / scale


def global_norm(tensors, norm_type: float, max_norm: float, grad_scale: torch.Tensor | None = None):
    """Returns (total_norm, clip_coef) as float32 0-d tensors. With grad_scale, the norm of
    tensors / grad_scale is reported (GradScaler-scaled gradients)."""
    norm_type = float(norm_type)
    if not norm_type > 0.0:
        raise ValueError(f"fused_optim: norm_type must be positive or inf, got {norm_type}")
    total = total_norm(tensors, norm_type, grad_scale).to(torch.float32)
    # coef from the norm as reported (an fp32 norm of inf gives 0, as in torch)
    coef = torch.clamp(max_norm / (total.double() + 1e-6), max=1.0)
    return total, coef.to(torch.float32)


def scale_(tensors, coef: torch.Tensor) -> None:
    """tensors[i] *= coef, one tensor after the other (memory shared by several tensors is
    scaled once per occurrence, as torch's clip_grad_norm_ does). coef: a one-element floating
    tensor; float64 tensors are multiplied by it in float64, the others by it in float32."""
    for t in tensors:
        t.mul_(coef.to(t.dtype) if t.dtype == torch.float64 else coef.float())
