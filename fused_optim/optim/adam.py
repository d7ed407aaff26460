"""Adam and AdamW: drop-in replacements for torch.optim.Adam / torch.optim.AdamW, fused."""

import torch

from fused_optim import _backends
from fused_optim.optim._base import FusedOptimizer, check_betas, check_lr, check_nonnegative, kernel_lr
from fused_optim.optim._docs import FUSED_ARGS, FUSED_ATTRIBUTES, FUSED_NOTES

ADAM_DECAY = """\
        g  = g + weight_decay * theta             (Adam: L2 decay)
        theta = theta * (1 - lr * weight_decay)   (AdamW: decoupled decay, instead)"""
ADAMW_DECAY = "        theta = theta * (1 - lr * weight_decay)"


def _update(decay: str) -> str:
    """The docstrings' update equations, with the weight-decay lines of a flavour."""
    return f"""\
    .. code-block:: text

        g  = -grad if maximize else grad          (unscaled, clipped: see max_grad_norm)
{decay}
        m  = beta1 * m + (1 - beta1) * g
        v  = beta2 * v + (1 - beta2) * g^2
        vmax = max(vmax, v)                       (amsgrad; then vmax replaces v below)
        theta = theta - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
"""


class AdamFamily(FusedOptimizer):
    # Adam/AdamW and AdaX/AdaXW: one elementwise kernel; only the per-step scalars differ.

    ADAX = False
    _dtensor_layouts = "any"  # elementwise: every shard steps on its own

    def _state_keys(self, group) -> tuple[str, ...]:
        if group.get("amsgrad", False):
            return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
        return ("exp_avg", "exp_avg_sq")

    def _new_state(self, p, key):
        return torch.zeros_like(p, memory_format=torch.preserve_format)

    def _hyper(self, group) -> dict:
        beta1, beta2 = group["betas"]
        return dict(
            lr=kernel_lr(group["lr"]), beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]), decoupled=bool(group["decoupled_weight_decay"]),
            amsgrad=bool(group.get("amsgrad", False)), maximize=bool(group["maximize"]), adax=self.ADAX,
        )  # fmt: skip

    def _make_run(self, backend, bucket, group, op_only: bool):
        """One fused call over the bucket: the backend's own group object when it has one (the
        native one keeps the tensors in C++), else its list function. While torch.compile
        traces, and for meta / fake params, always the annotated op over lists."""
        s = bucket.states
        lists = (bucket.params, s["exp_avg"], s["exp_avg_sq"], s.get("max_exp_avg_sq", []), s["step"])
        make = getattr(backend, "adam_group", None)
        if make is None or op_only:
            make = _backends.list_adam_group(backend)
        return make(*lists)


class Adam(AdamFamily):
    __doc__ = rf"""Implements Adam (and, with ``decoupled_weight_decay=True``, AdamW), fused.

    A drop-in for :class:`torch.optim.Adam`: the same arguments, defaults, param-group keys
    and state (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` with amsgrad), so
    state_dicts load into torch.optim and back.

    For each param, with :math:`t` the step (counted from 1) and :math:`g` its gradient:

{_update(ADAM_DECAY)}
    Args:
        params (iterable): params to optimize, or dicts defining param groups.
        lr (float or Tensor, optional): learning rate (default: 1e-3).
        betas (Tuple[float, float], optional): coefficients of the running averages of the
            gradient and its square (default: (0.9, 0.999)).
        eps (float, optional): added to the denominator for numerical stability
            (default: 1e-8).
        weight_decay (float, optional): weight decay, L2 or decoupled (default: 0).
        amsgrad (bool, optional): use the AMSGrad variant (default: False).
        foreach (bool, optional): accepted for compatibility and ignored: every step is fused.
        maximize (bool, optional): maximize the objective instead of minimizing
            (default: False).
        capturable (bool, optional): accepted and ignored: the GPU kernels always read lr and
            step from device memory, so every step can be captured in a CUDA graph.
        differentiable (bool, optional): must be False (not supported).
        fused (bool, optional): accepted and ignored.
        decoupled_weight_decay (bool, optional): AdamW's decoupled decay (default: False).
{FUSED_ARGS}

{FUSED_ATTRIBUTES}

    {FUSED_NOTES.strip()}

    Example:
        >>> opt = fused_optim.Adam(model.parameters(), lr=1e-3, max_grad_norm=1.0)
        >>> loss_fn(model(x), y).backward()
        >>> opt.step()
        >>> opt.zero_grad()
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        max_grad_norm: float | None = None,
        backend: str = "auto",
    ):
        if differentiable:
            raise ValueError("differentiable=True is not supported by fused_optim (use torch.optim)")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, foreach=foreach, capturable=capturable, differentiable=False,
            fused=fused, decoupled_weight_decay=decoupled_weight_decay,
        )  # fmt: skip
        self._validate_group(defaults)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, backend=backend)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)
            group.setdefault("decoupled_weight_decay", False)

    def _validate_group(self, group) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_nonnegative("eps", group["eps"], "epsilon value")
        check_nonnegative("weight_decay", group["weight_decay"], "weight_decay value")
        if group.get("differentiable"):
            raise ValueError("differentiable=True is not supported by fused_optim (use torch.optim)")


class AdamW(Adam):
    __doc__ = rf"""Implements AdamW (Adam with decoupled weight decay), fused.

    A drop-in for :class:`torch.optim.AdamW`: the same arguments, defaults (``weight_decay``
    1e-2), param-group keys and state, so state_dicts load into torch.optim and back.

    For each param, with :math:`t` the step (counted from 1) and :math:`g` its gradient:

{_update(ADAMW_DECAY)}
    Args:
        params (iterable): params to optimize, or dicts defining param groups.
        lr (float or Tensor, optional): learning rate (default: 1e-3).
        betas (Tuple[float, float], optional): coefficients of the running averages of the
            gradient and its square (default: (0.9, 0.999)).
        eps (float, optional): added to the denominator for numerical stability
            (default: 1e-8).
        weight_decay (float, optional): decoupled weight decay coefficient (default: 1e-2).
        amsgrad (bool, optional): use the AMSGrad variant (default: False).
        maximize (bool, optional): maximize the objective instead of minimizing
            (default: False).
        foreach, capturable, fused (optional): accepted for compatibility and ignored (every
            step is fused and capturable).
        differentiable (bool, optional): must be False (not supported).
{FUSED_ARGS}

{FUSED_ATTRIBUTES}

    {FUSED_NOTES.strip()}

    Example:
        >>> opt = fused_optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, max_grad_norm=1.0)
        >>> for x, y in loader:
        ...     loss_fn(model(x), y).backward()
        ...     opt.step()  # clip + AdamW in one fused pass per param group
        ...     opt.zero_grad()
        ...     log(opt.last_grad_norm)
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        max_grad_norm: float | None = None,
        backend: str = "auto",
    ):
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
            capturable=capturable, differentiable=differentiable, fused=fused,
            decoupled_weight_decay=True, max_grad_norm=max_grad_norm, backend=backend,
        )  # fmt: skip

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True  # as torch.optim.AdamW does on load
