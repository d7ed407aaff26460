from fused_optim.optim.adam import Adam, AdamW
from fused_optim.optim.adax import AdaX, AdaXW

__all__ = ["Adam", "AdamW", "AdaX", "AdaXW"]
