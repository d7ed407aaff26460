"""Fused drop-ins for optimizers of Hugging Face transformers (which this module does not
import): ``fused_optim.transformers.Adafactor`` for ``transformers.optimization.Adafactor``."""

import math

import torch

from fused_optim.optim._base import _STATE_LIST_NAME, kernel_lr
from fused_optim.optim._docs import FUSED_ARGS, FUSED_ATTRIBUTES, FUSED_NOTES
from fused_optim.optim.adafactor import _HALF, AdafactorFamily

__all__ = ["Adafactor"]

_UPDATE = """\
    .. code-block:: text

        g     = grad                                (unscaled, clipped: see max_grad_norm)
        rho   = min(1e-6 * t if warmup_init else 1e-2, 1 / sqrt(t))   if relative_step
              = lr                                                    otherwise
        alpha = max(eps2, RMS(theta)) * rho  if scale_parameter  else rho
                                                    (RMS(x) = ||x|| / sqrt(numel(x)))
        beta2 = 1 - t^decay_rate
        s     = g^2 + eps1
        ndim >= 2, factored over the last two dims (the leading ones are a batch):
            R = beta2 * R + (1 - beta2) * mean(s over the last dim)     (exp_avg_sq_row)
            C = beta2 * C + (1 - beta2) * mean(s over the dim before)   (exp_avg_sq_col)
            U = g / sqrt(R / mean(R)) / sqrt(C)     (R along the rows, C along the columns)
        ndim < 2:
            V = beta2 * V + (1 - beta2) * s                             (exp_avg_sq)
            U = g / sqrt(V)
        U     = alpha * U / max(1, RMS(U) / clip_threshold)
        m     = beta1 * m + (1 - beta1) * U;  U = m                     (with beta1: exp_avg)
        theta = theta - weight_decay * alpha * theta - U
        RMS   = RMS(theta before this step)                             (state["RMS"])
"""


class Adafactor(AdafactorFamily):
    __doc__ = rf"""Implements Adafactor (transformers' flavour), fused.

    A drop-in for ``transformers.optimization.Adafactor`` (the fairseq port): the same
    arguments, defaults, errors, param-group keys and state (``step``, ``exp_avg_sq_row``
    and ``exp_avg_sq_col`` for params with two or more dims, ``exp_avg_sq`` for the others,
    ``exp_avg`` with ``beta1``, and ``RMS``), float32 for 16-bit params as there, so
    state_dicts load into transformers' Adafactor and back. Its ``AdafactorSchedule`` works
    with this class (it reads the step size of the last step through ``_get_lr``).

    For each param, with :math:`t` the step (counted from 1) and :math:`g` its gradient:

{_UPDATE}
    Unlike transformers, whose per-param loop reads RMS(theta) on the host, a step never
    waits for the device, and the math is fp32 whatever the param's dtype.

    Args:
        params (iterable): params to optimize, or dicts defining param groups.
        lr (float or Tensor, optional): the external learning rate; only without
            ``relative_step``, which then needs it (default: None).
        eps (Tuple[float, float], optional): eps1 is added to the squared gradient, eps2
            bounds RMS(theta) from below when scaling by it (default: (1e-30, 1e-3)).
        clip_threshold (float, optional): the update clipping threshold on RMS(U)
            (default: 1.0).
        decay_rate (float, optional): the exponent of ``1 - beta2 = t^decay_rate``
            (default: -0.8).
        beta1 (float, optional): coefficient of the running average of the updates; None
            keeps no first moment (default: None).
        weight_decay (float, optional): weight decay, scaled by the step size alpha
            (default: 0.0).
        scale_parameter (bool, optional): scale the step size by RMS(theta) (default: True).
        relative_step (bool, optional): the time-dependent step size rho instead of ``lr``
            (default: True).
        warmup_init (bool, optional): rho grows as 1e-6 * t at first; needs
            ``relative_step`` (default: False).
{FUSED_ARGS}

{FUSED_ATTRIBUTES}

    {FUSED_NOTES.strip()}

    ``state["step"]`` is a float32 tensor on the param's device (transformers keeps a Python
    int) and ``state["RMS"]`` a 0-d tensor; either form loads into either optimizer. An
    empty param keeps ``RMS = 0`` where transformers stores NaN. The closure runs with
    gradients enabled (transformers calls it under ``torch.no_grad``).

    Example:
        >>> opt = fused_optim.transformers.Adafactor(
        ...     model.parameters(), scale_parameter=False, relative_step=False, warmup_init=False, lr=1e-3
        ... )
        >>> loss_fn(model(x), y).backward()
        >>> opt.step()
        >>> opt.zero_grad()
    """

    KERNEL = "adafactor_transformers"
    FLOAT_KEYS = ("clip_threshold", "decay_rate", "beta1")
    _state_list_names = {
        **_STATE_LIST_NAME,
        "row_vars": 'state["exp_avg_sq_row"] of ',
        "col_vars": 'state["exp_avg_sq_col"] of ',
        "variances": 'state["exp_avg_sq"] of ',
    }

    def __init__(
        self,
        params,
        lr: float | torch.Tensor | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
        *,
        max_grad_norm: float | None = None,
        backend: str = "auto",
    ):
        # transformers' two checks, on the constructor's arguments only, as there.
        if lr is not None and relative_step:
            raise ValueError("Cannot combine manual `lr` and `relative_step=True` options")
        if warmup_init and not relative_step:
            raise ValueError("`warmup_init=True` requires `relative_step=True`")
        defaults = dict(
            lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate, beta1=beta1,
            weight_decay=weight_decay, scale_parameter=scale_parameter,
            relative_step=relative_step, warmup_init=warmup_init,
        )  # fmt: skip
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, backend=backend)

    def _state_dtype(self, p) -> torch.dtype:
        return torch.float32 if p.dtype in _HALF else p.dtype

    def _state_keys(self, group) -> tuple[str, ...]:
        keys = ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq", "RMS")
        return keys + ("exp_avg",) if group["beta1"] is not None else keys

    def _param_state_keys(self, group, p) -> tuple[str, ...]:
        keys = ("exp_avg_sq_row", "exp_avg_sq_col") if p.dim() >= 2 else ("exp_avg_sq",)
        if group["beta1"] is not None:
            keys += ("exp_avg",)
        return keys + ("RMS",)

    @staticmethod
    def _lists(states) -> tuple:
        return (
            states["exp_avg_sq_row"], states["exp_avg_sq_col"], states["exp_avg_sq"],
            states.get("exp_avg", []), states["RMS"], states["step"],
        )  # fmt: skip

    def _hyper(self, group) -> dict:
        relative = bool(group["relative_step"])
        if not relative and group["lr"] is None:
            raise TypeError("fused_optim: lr is None but relative_step=False: give an lr")
        eps1, eps2 = group["eps"]
        beta1 = group["beta1"]
        return dict(
            lr=0.0 if relative else kernel_lr(group["lr"]), eps1=float(eps1), eps2=float(eps2),
            clip_threshold=float(group["clip_threshold"]), decay_rate=float(group["decay_rate"]),
            beta1=None if beta1 is None else float(beta1),
            weight_decay=float(group["weight_decay"]),
            scale_parameter=bool(group["scale_parameter"]), relative_step=relative,
            warmup_init=bool(group["warmup_init"]),
        )  # fmt: skip

    def load_state_dict(self, state_dict):
        """As torch.optim's, but the float32 states of 16-bit params stay float32: torch.optim
        casts every loaded state to its param's dtype, which would round them to 16 bits."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params, strict=True):
            saved = state_dict["state"].get(saved_id)
            if p.dtype not in _HALF or not isinstance(saved, dict):
                continue
            state = self.state[p]
            for key, value in saved.items():
                if key != "step" and torch.is_tensor(value) and value.is_floating_point():
                    state[key] = value.to(device=p.device, dtype=torch.float32, copy=True)

    @staticmethod
    def _get_lr(param_group, param_state):
        """The step size alpha of the last step, as transformers' ``Adafactor._get_lr``
        computes it (``AdafactorSchedule`` calls it): reads ``step`` and ``RMS`` on the host,
        so a scheduler step waits for the device (the optimizer step does not)."""
        lr = param_group["lr"]
        step = float(param_state["step"])
        if param_group["relative_step"]:
            lr = min(1e-6 * step if param_group["warmup_init"] else 1e-2, 1.0 / math.sqrt(step))
        scale = 1.0
        if param_group["scale_parameter"]:
            scale = max(float(param_group["eps"][1]), float(param_state["RMS"]))
        return scale * lr
