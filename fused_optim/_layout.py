"""Memory-layout predicates shared by the optimizer classes and the Triton backend."""

import torch


def is_dense(t: torch.Tensor) -> bool:
    """True when t's elements fill one gap-free block of memory starting at data_ptr() (any
    dimension order), so the kernels can walk it as flat memory."""
    if t.numel() == 0:
        return True
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride(), strict=True) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True
