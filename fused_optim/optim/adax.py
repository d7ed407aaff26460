"""AdaX and AdaXW (Li et al., arXiv 2004.09740), with the authors' defaults.

beta2 is a growth increment, not a decay: the authors' raw second moment grows like
(1 + beta2)^t and overflows fp32 after ~0.9M steps. fused_optim keeps the normalised
v-hat = v / ((1 + beta2)^t - 1) in state["exp_avg_sq"] instead (same update, no overflow), so
checkpoints hold v-hat, not the authors' v. There is no bias correction on the first moment.
"""

import torch

from fused_optim.optim._base import check_betas, check_lr, check_range
from fused_optim.optim.adam import AdamFamily


class AdaX(AdamFamily):
    """AdaX with L2 (coupled) weight decay; decoupled_weight_decay=True gives AdaXW."""

    ADAX = True

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1.5e-3,
        betas: tuple[float, float] = (0.9, 1e-4),
        eps: float = 1e-12,
        weight_decay: float = 5e-4,
        *,
        decoupled_weight_decay: bool = False,
        maximize: bool = False,
        max_grad_norm: float | None = None,
        backend: str = "auto",
    ):
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay,
        )  # fmt: skip
        self._validate_group(defaults)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, backend=backend)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("decoupled_weight_decay", False)

    def _validate_group(self, group) -> None:
        check_lr(group["lr"])
        # beta2 is a growth increment: any positive value is meaningful, 0 would divide by 0.
        check_betas(group["betas"], beta2_high=float("inf"))
        if group["betas"][1] <= 0.0:
            beta2 = group["betas"][1]
            raise ValueError(f"Invalid beta parameter at index 1 (beta2): must be > 0, got {beta2!r}")
        check_range("epsilon value (eps)", group["eps"], 0.0, float("inf"))
        check_range("weight_decay value", group["weight_decay"], 0.0, float("inf"))


class AdaXW(AdaX):
    """AdaX with decoupled weight decay and the authors' AdaXW defaults."""

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 5e-3,
        betas: tuple[float, float] = (0.9, 1e-4),
        eps: float = 1e-12,
        weight_decay: float = 5e-2,
        *,
        maximize: bool = False,
        max_grad_norm: float | None = None,
        backend: str = "auto",
    ):
        super().__init__(
            params, lr, betas, eps, weight_decay, decoupled_weight_decay=True, maximize=maximize,
            max_grad_norm=max_grad_norm, backend=backend,
        )  # fmt: skip
