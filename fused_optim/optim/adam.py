"""Adam and AdamW: drop-in replacements for torch.optim.Adam / torch.optim.AdamW.

Same constructor arguments, defaults, param-group keys and state keys (step, exp_avg,
exp_avg_sq, max_exp_avg_sq), so state_dicts load into torch.optim and back. Extra keyword
arguments: max_grad_norm (global-norm clipping folded into the update) and backend.
`foreach`, `fused` and `capturable` are accepted and ignored: every step is one fused call and
the GPU kernels read lr and step from device memory (so steps can be captured in CUDA graphs).
"""

import torch

from fused_optim import _backends
from fused_optim.optim._base import FusedOptimizer, check_betas, check_lr, check_range


class AdamFamily(FusedOptimizer):
    """Adam/AdamW and AdaX/AdaXW: one elementwise kernel; only the per-step scalars differ."""

    ADAX = False

    def _state_keys(self, group) -> tuple[str, ...]:
        if group.get("amsgrad", False):
            return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
        return ("exp_avg", "exp_avg_sq")

    def _new_state(self, p, key):
        return torch.zeros_like(p, memory_format=torch.preserve_format)

    def _hyper(self, group) -> dict:
        beta1, beta2 = group["betas"]
        return dict(
            lr=group["lr"], beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]), decoupled=bool(group["decoupled_weight_decay"]),
            amsgrad=bool(group.get("amsgrad", False)), maximize=bool(group["maximize"]), adax=self.ADAX,
        )  # fmt: skip

    def _make_run(self, backend, bucket, group, compiling: bool):
        """One fused call over the bucket: the backend's own group object when it has one (the
        native one keeps the tensors in C++), else its list function. While torch.compile
        traces, always the annotated op over lists."""
        s = bucket.states
        lists = (bucket.params, s["exp_avg"], s["exp_avg_sq"], s.get("max_exp_avg_sq", []), s["step"])
        make = getattr(backend, "adam_group", None)
        if make is None or compiling:
            make = _backends.list_adam_group(backend)
        return make(*lists)


class Adam(AdamFamily):
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
        check_range("epsilon value (eps)", group["eps"], 0.0, float("inf"))
        check_range("weight_decay value", group["weight_decay"], 0.0, float("inf"))
        if group.get("differentiable"):
            raise ValueError("differentiable=True is not supported by fused_optim (use torch.optim)")


class AdamW(Adam):
    """torch.optim.AdamW: Adam with decoupled weight decay (default 1e-2)."""

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
