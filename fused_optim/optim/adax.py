"""AdaX and AdaXW (Li et al., arXiv 2004.09740), with the authors' defaults, fused."""

import torch

from fused_optim.optim._base import check_betas, check_lr, check_nonnegative
from fused_optim.optim._docs import FUSED_ARGS, FUSED_ATTRIBUTES, FUSED_NOTES
from fused_optim.optim.adam import AdamFamily


class AdaX(AdamFamily):
    __doc__ = rf"""Implements AdaX (L2 weight decay; ``decoupled_weight_decay=True`` gives AdaXW), fused.

    AdaX (Li et al., "AdaX: Adaptive Gradient Descent with Exponential Long Term Memory",
    arXiv 2004.09740) with the authors' defaults. For each param, with :math:`t` the step
    (counted from 1):

    .. code-block:: text

        g  = -grad if maximize else grad          (unscaled, clipped: see max_grad_norm)
        g  = g + weight_decay * theta             (decoupled: theta = theta * (1 - lr * weight_decay))
        m  = beta1 * m + (1 - beta1) * g          (no bias correction on m)
        bc = (1 + beta2)^t - 1
        v_hat = v_hat + (beta2 / bc) * (g^2 - v_hat)
        theta = theta - lr * m / (sqrt(v_hat) + eps / sqrt(bc))

    ``beta2`` is a growth increment, not a decay: the authors' raw second moment
    ``v = (1 + beta2) * v + beta2 * g^2`` grows like (1 + beta2)^t and overflows float32 after
    ~0.9M steps. The same update is computed from the normalised ``v_hat = v / bc``, which
    never overflows; ``state["exp_avg_sq"]`` (and so checkpoints) holds ``v_hat``, not the
    authors' ``v``.

    Args:
        params (iterable): params to optimize, or dicts defining param groups.
        lr (float or Tensor, optional): learning rate (default: 1.5e-3).
        betas (Tuple[float, float], optional): beta1, the first-moment decay in [0, 1), and
            beta2, the second moment's growth increment, > 0 (default: (0.9, 1e-4)).
        eps (float, optional): added to the denominator (default: 1e-12).
        weight_decay (float, optional): weight decay (default: 5e-4).
        decoupled_weight_decay (bool, optional): decoupled decay, as AdaXW (default: False).
        maximize (bool, optional): maximize the objective instead of minimizing
            (default: False).
{FUSED_ARGS}

{FUSED_ATTRIBUTES}

    {FUSED_NOTES.strip()}

    Example:
        >>> opt = fused_optim.AdaX(model.parameters())
        >>> loss_fn(model(x), y).backward()
        >>> opt.step()
        >>> opt.zero_grad()
    """

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
        check_nonnegative("eps", group["eps"], "epsilon value")
        check_nonnegative("weight_decay", group["weight_decay"], "weight_decay value")


class AdaXW(AdaX):
    __doc__ = rf"""Implements AdaXW (AdaX with decoupled weight decay), fused, with the authors' defaults.

    The update of :class:`AdaX` with ``decoupled_weight_decay=True``: each step first decays
    ``theta = theta * (1 - lr * weight_decay)`` instead of adding ``weight_decay * theta`` to
    the gradient. ``state["exp_avg_sq"]`` holds AdaX's normalised ``v_hat`` (see
    :class:`AdaX`).

    Args:
        params (iterable): params to optimize, or dicts defining param groups.
        lr (float or Tensor, optional): learning rate (default: 5e-3).
        betas (Tuple[float, float], optional): as :class:`AdaX` (default: (0.9, 1e-4)).
        eps (float, optional): added to the denominator (default: 1e-12).
        weight_decay (float, optional): decoupled weight decay (default: 5e-2).
        maximize (bool, optional): maximize the objective instead of minimizing
            (default: False).
{FUSED_ARGS}

    Example:
        >>> opt = fused_optim.AdaXW(model.parameters(), max_grad_norm=1.0)
        >>> loss_fn(model(x), y).backward()
        >>> opt.step()
        >>> opt.zero_grad()
    """

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
