"""fused_optim: fused multi-tensor optimizers for PyTorch.

One optimizer step updates every parameter of a param group in one kernel launch (CUDA,
Triton) or one parallel loop (native CPU), with a pure-PyTorch reference as the fallback.
"""

# _ext loads fused_optim._C, ops registers the fake impls; transformers holds the drop-ins for
# transformers' optimizers (fused_optim.transformers.Adafactor; it does not import transformers).
from fused_optim import _ext, ops, transformers  # noqa: F401
from fused_optim._backends import BACKENDS, available_backends
from fused_optim.clip import clip_grad_norm_
from fused_optim.optim import SMMF, Adafactor, Adam, AdamW, AdaX, AdaXW

__version__ = "0.1.0"

__all__ = [
    "SMMF",
    "Adafactor",
    "Adam",
    "AdamW",
    "AdaX",
    "AdaXW",
    "clip_grad_norm_",
    "available_backends",
    "BACKENDS",
]
