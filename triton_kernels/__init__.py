"""Triton kernels of fused_optim, installed as fused_optim.triton_kernels (a top-level
`triton_kernels` would collide with the package of that name that Triton publishes).

The backend interface of fused_optim._backends: adam, global_norm and scale_, with the
semantics of fused_optim._reference. Runs on CUDA tensors, or on CPU tensors under
TRITON_INTERPRET=1. One launch per call for adam (one per dtype, plus one, for global_norm;
one per dtype for scale_) over a device-resident work plan, whatever the number of tensors.
"""

from ._adam import adam
from ._clip import global_norm, scale_

__all__ = ["adam", "global_norm", "scale_"]
