"""Pure-PyTorch reference implementations: the executable spec every backend is tested against,
and the fallback when no fused backend is available. Written for clarity, not speed; runs in
fp64 when given fp64 tensors (tests), in fp32 math for fp32/bf16/fp16 storage otherwise."""

from fused_optim._reference.adafactor import adafactor, adafactor_transformers
from fused_optim._reference.adam import adam
from fused_optim._reference.clip import global_norm, scale_
from fused_optim._reference.smmf import smmf

__all__ = ["adafactor", "adafactor_transformers", "adam", "global_norm", "scale_", "smmf"]
