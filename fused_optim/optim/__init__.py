from fused_optim.optim.adafactor import Adafactor
from fused_optim.optim.adam import Adam, AdamW
from fused_optim.optim.adax import AdaX, AdaXW
from fused_optim.optim.smmf import SMMF

__all__ = ["Adafactor", "Adam", "AdamW", "AdaX", "AdaXW", "SMMF"]
