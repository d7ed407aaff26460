"""clip_grad_norm_: torch.nn.utils.clip_grad_norm_ semantics, multi-tensor and without a host
sync (unless error_if_nonfinite=True, which must look at the norm, as torch's does)."""

import math
from collections import defaultdict

import torch

from fused_optim import _backends


def _validate(max_norm: float, norm_type: float) -> tuple[float, float]:
    norm_type = float(norm_type)
    max_norm = float(max_norm)
    if not (norm_type > 0.0):
        raise ValueError(f"norm_type must be positive or inf, got {norm_type}")
    if math.isnan(max_norm) or max_norm < 0.0:
        raise ValueError(f"max_norm must be a non-negative number, got {max_norm}")
    return max_norm, norm_type


def clip_grad_norm_(
    parameters,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Clips the gradients of `parameters` in place so their joint norm is at most max_norm and
    returns the total norm (a float32 tensor) before clipping. `foreach` is accepted for
    drop-in compatibility and ignored (the fused path is always multi-tensor)."""
    max_norm, norm_type = _validate(max_norm, norm_type)
    _backends.check_name(backend)
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    by_device = defaultdict(list)
    odd_dtype = {}  # a dtype the kernels do not take, per device (auto then uses the reference)
    for g in grads:
        by_device[g.device].append(g)
        if g.dtype not in _backends.KERNEL_DTYPES:
            odd_dtype[g.device] = g.dtype
    backends = {d: _backends.get(backend, d, odd_dtype.get(d)) for d in by_device}
    results = {d: backends[d].global_norm(gs, norm_type, max_norm, None) for d, gs in by_device.items()}
    if len(results) == 1:
        total_norm, coef = next(iter(results.values()))
    else:  # several devices: combine the per-device norms on the first one, like torch
        first = grads[0].device
        norms = torch.stack([n.to(first) for n, _ in results.values()])
        total_norm = torch.linalg.vector_norm(norms, norm_type)
        coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    if error_if_nonfinite and not torch.isfinite(total_norm).item():
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it "
            "cannot be clipped. To disable this error and scale the gradients by the non-finite norm "
            "anyway, set `error_if_nonfinite=False`"
        )
    for device, gs in by_device.items():
        c = coef if coef.device == device else coef.to(device)
        backends[device].scale_(gs, c)
    return total_norm
