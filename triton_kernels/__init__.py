"""Triton kernels of fused_optim, installed as fused_optim.triton_kernels (a top-level
`triton_kernels` would collide with the package of that name that Triton publishes).

The backend interface of fused_optim._backends: adam, adafactor, adafactor_transformers, smmf,
global_norm and scale_, with the semantics of fused_optim._reference. Runs on CUDA tensors, or on
CPU tensors under TRITON_INTERPRET=1. One launch per call for adam (one per dtype, plus one, for
global_norm; one per dtype for scale_), five for either Adafactor flavour and two for SMMF, over a
device-resident work plan, whatever the number of tensors.
"""

from ._adafactor import adafactor, adafactor_transformers
from ._adam import adam
from ._clip import global_norm, scale_
from ._smmf import smmf

__all__ = ["adafactor", "adafactor_transformers", "adam", "global_norm", "scale_", "smmf"]
