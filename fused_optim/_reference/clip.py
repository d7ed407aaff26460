"""Global-norm gradient clipping (ALGORITHMS.md section 5): torch.nn.utils.clip_grad_norm_
semantics, split into the norm and the in-place scaling so optimizers can fold the scaling
into their update instead."""

import torch


def global_norm(tensors, norm_type: float, max_norm: float, grad_scale: torch.Tensor | None = None):
    """Returns (total_norm, clip_coef) as float32 0-d tensors. With grad_scale, the norm of
    tensors / grad_scale is reported (GradScaler-scaled gradients)."""
    # fp64 throughout: the reference should be more accurate than any kernel it judges.
    # Empty tensors contribute nothing (vector_norm refuses the inf-norm of an empty tensor).
    norms = [torch.linalg.vector_norm(t.double(), norm_type) for t in tensors if t.numel() > 0]
    if norms:
        total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
    else:
        total = torch.zeros((), dtype=torch.float64, device=tensors[0].device)
    if grad_scale is not None:
        total = total / grad_scale.double().reshape(())  # GradScaler's scale has shape [1]
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return total.to(torch.float32), coef.to(torch.float32)


def scale_(tensors, coef: torch.Tensor) -> None:
    for t in tensors:
        t.mul_(coef.to(t.dtype) if t.dtype == torch.float64 else coef)
