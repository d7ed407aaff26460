"""Adafactor: a fused drop-in for torch.optim.Adafactor, and the machinery it shares with the
transformers flavour (fused_optim.transformers.Adafactor)."""

import functools
import math
import os

import torch

from fused_optim import _backends, _distributed, _reference
from fused_optim._reference.adam import has_values
from fused_optim.optim._base import FusedOptimizer, _as_float, kernel_lr
from fused_optim.optim._docs import FUSED_ARGS, FUSED_ATTRIBUTES, FUSED_NOTES

_HALF = (torch.float16, torch.bfloat16)


def _holds(test, value) -> bool:
    """`test(value)` as torch.optim evaluates its checks (a wrong type raises as it does there);
    a tensor without values (meta, fake) passes: there is nothing to read."""
    if isinstance(value, torch.Tensor) and not has_values(value):
        return True
    return bool(test(value))


class AdafactorFamily(FusedOptimizer):
    # Both Adafactor flavours, and SMMF (optim/smmf.py): per-param state keys (e.g. factored
    # statistics for ndim >= 2, a full second moment otherwise), compact state lists per bucket,
    # one backend function per algorithm. Subclasses set KERNEL (the backend function's name),
    # FLOAT_KEYS (group entries read as floats once), and implement _param_state_keys,
    # _state_dtype, _lists, _hyper.

    KERNEL = ""
    ALGORITHM = "Adafactor"  # for error messages
    FLOAT_KEYS: tuple[str, ...] = ()

    # ---- state ------------------------------------------------------------------------------

    def _state_dtype(self, p) -> torch.dtype:  # overridden by the transformers flavour
        return p.dtype

    @staticmethod
    def _state_shape(p, key: str) -> tuple[int, ...]:
        shape = tuple(p.shape)
        if key in ("row_var", "col_var"):  # torch's: [..., n, 1] and [..., 1, m]
            return shape[:-1] + (1,) if key == "row_var" else shape[:-2] + (1,) + shape[-1:]
        if key == "exp_avg_sq_row":  # transformers': shape[:-1] and shape[:-2] + shape[-1:]
            return shape[:-1]
        if key == "exp_avg_sq_col":
            return shape[:-2] + shape[-1:]
        if key == "RMS":
            return ()
        return shape  # variance, exp_avg_sq, exp_avg

    # FSDP2 (Shard(0)) params: every state whose dim 0 is the param's dim 0 is split between
    # ranks as the param is; the column statistics of a matrix and RMS are whole on every rank.
    _dtensor_layouts = "dim0"

    @staticmethod
    def _follows_dim0(p, key: str) -> bool:
        if key == "RMS":
            return False
        if key in ("col_var", "exp_avg_sq_col"):
            return p.dim() >= 3  # a batch of matrices: split by matrix
        return True

    def _new_state(self, p, key):
        if _distributed.is_dtensor(p):
            local = self._new_state(p.to_local(), key)
            if not self._follows_dim0(p, key):
                return p.to_local().new_zeros(self._state_shape(p, key), dtype=local.dtype)
            return _distributed.from_local_like(local, p, self._state_shape(p, key))
        dtype = self._state_dtype(p)
        shape = self._state_shape(p, key)
        if shape == tuple(p.shape):
            return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return p.new_zeros(shape, dtype=dtype)

    def _usable_state(self, p, key, value):
        """A state found in the mapping (loaded, assigned) on the param's device in the state
        dtype: torch.optim's load_state_dict casts every state to the param's dtype, and
        transformers keeps ``RMS`` as a number until the first step."""
        dtype, shape = self._state_dtype(p), self._state_shape(p, key)
        if not torch.is_tensor(value):
            value = torch.full(shape, float(value), dtype=dtype, device=p.device)
        elif value.dtype != dtype or value.device != p.device:
            value = value.to(device=p.device, dtype=dtype)
        if tuple(value.shape) != shape:
            raise ValueError(
                f"fused_optim: state[{key!r}] of a param of shape {tuple(p.shape)} has shape "
                f"{tuple(value.shape)}, expected {shape}"
            )
        return super()._usable_state(p, key, value)

    def _usable_dtensor_state(self, p, key, value):
        if self._follows_dim0(p, key):
            return _distributed.like_param(value, p)
        return value.full_tensor() if _distributed.is_dtensor(value) else value

    # ---- backend ----------------------------------------------------------------------------

    def _kernel_backend(self, device, dtype, traced: bool = False):
        """The backend running this algorithm on (device, dtype): auto passes over a backend
        without its kernels to the reference; an explicit backend without them fails."""
        if traced:
            backend = _backends.for_tracing()
            return backend if hasattr(backend, self.KERNEL) else _backends.get("reference", device)
        backend = _backends.get(self.backend, device, dtype)
        if hasattr(backend, self.KERNEL):
            return backend
        explicit = self.backend != "auto" or os.environ.get(_backends.ENV_VAR, "auto") not in ("", "auto")
        if explicit:
            name = _backends.resolve(self.backend, device, dtype)
            raise RuntimeError(f"fused_optim: backend {name!r} has no {self.ALGORITHM} kernels in this build")
        return _backends.get("reference", device, dtype)

    def _backend_name(self, device, dtype) -> str:
        # "reference" where auto passes over a backend without this algorithm's kernels.
        reference = _backends.get("reference", device)
        return (
            "reference"
            if self._kernel_backend(device, dtype) is reference
            else super()._backend_name(device, dtype)
        )

    def _check_backends(self, params) -> None:
        super()._check_backends(params)
        for device, dtype in {(p.device, p.dtype) for p in params}:
            if device.type != "meta":
                self._kernel_backend(device, dtype)

    def _backend_of(self, bucket):
        return self._kernel_backend(bucket.device, bucket.dtype, bucket.traced)

    def _make_run(self, backend, bucket, group, op_only: bool):
        """One call of the backend's function over the bucket's compact lists, made once.
        Shards of FSDP2 params step in three calls with two all-reduces between them (ShardSums);
        the reference takes them in one call that all-reduces the same sums itself. SMMF
        overrides this."""
        fn = getattr(backend, self.KERNEL)
        params, lists = bucket.params, self._lists(bucket.states)
        if bucket.shard_key is not None and backend is _backends.get("reference", bucket.device):
            fn = functools.partial(getattr(_reference, self.KERNEL), **self._shard_args(bucket))
        elif bucket.shard_key is not None:
            shapes = [p.shape for p in bucket.dtensors]
            return ShardSums(params, shapes).run(fn, lists, bucket.shard_key)

        def run(grads, **kw):
            fn(params, grads, *lists, **kw)

        return run

    @staticmethod
    def _shard_args(bucket) -> dict:
        """What the reference's sharded step needs to know of the DTensors behind the shards."""
        return dict(shard_key=bucket.shard_key, global_shapes=[p.shape for p in bucket.dtensors])

    # ---- hyper-parameters -------------------------------------------------------------------

    def _read_hyper_tensors(self, group) -> None:
        super()._read_hyper_tensors(group)
        for key in self.FLOAT_KEYS:
            if key in group:
                group[key] = _as_float(group[key])
        eps = group.get("eps")
        if isinstance(eps, (tuple, list)) and any(isinstance(e, torch.Tensor) for e in eps):
            group["eps"] = type(eps)(_as_float(e) for e in eps)


class ShardSums:
    """Where the sums of an Adafactor step over this rank's shards (FSDP2, Shard(0)) of params go,
    flat in float64, and the step as the fused kernels take it: three calls (phases), the first two
    followed by one all-reduce each, whatever the number of params (shared with the optimizer's
    other buckets: FusedOptimizer._step_in_lockstep).

    Layout, for N params: [sum of theta^2 per param (N) | per matrix param (ndim 2): the sum of
    its new row statistics, its column sums of s (cols + 1) | per matrix of this rank's batches of
    matrices (ndim >= 3): the same | sum of u^2 per param (N)]. A matrix is split by rows between
    ranks, whose sums add up; a batch of matrices is split by matrix, each whole on one rank, so
    its sums are the rank's own and are never reduced (`reduced`: the two parts that are). Phase 1
    writes all but the sums of u^2, phase 2 those, phase 3 applies the update. `carry` (float32)
    holds the row and column factors of the rank's matrices from phase 1 to phase 3."""

    def __init__(self, shards, shapes):
        """shards: the rank's local tensors (dim-0 shards: whole rows) of params of these shapes."""
        n = len(shards)
        self.device, self.shards = shards[0].device, shards
        self.global_numels = [math.prod(shape) for shape in shapes]
        sizes = zip(shapes, self.global_numels, strict=True)
        matrices = [len(shape) >= 2 and numel > 0 for shape, numel in sizes]
        self.stats_at, at, carry = [-1] * n, n, 0
        for split in (True, False):  # the matrices split between ranks first, then the rank's own
            for i, (shard, shape) in enumerate(zip(shards, shapes, strict=True)):
                if matrices[i] and (len(shape) == 2) == split:
                    rows, cols = shard.shape[-2:]
                    self.stats_at[i] = at
                    at += shard.shape[:-2].numel() * (cols + 1)
                    carry += shard.shape[:-2].numel() * (rows + cols)
            if split:
                split_end = at
        self.size, self.carry_size = at + n, carry
        self.reduced = (slice(0, split_end), slice(at, at + n))

    def run(self, fn, lists, key):
        """The step of backend function fn over the shards with their compact state lists."""
        params = self.shards
        args = dict(global_numels=self.global_numels, stats_at=self.stats_at)

        def run(grads, **kw):
            # a generator: the optimizer all-reduces what it yields, with the other buckets' sums
            sums = torch.zeros(self.size, dtype=torch.float64, device=self.device)
            carry = torch.empty(self.carry_size, dtype=torch.float32, device=self.device)
            for phase, reduced in ((1, self.reduced[0]), (2, self.reduced[1]), (3, None)):
                fn(params, grads, *lists, phase=phase, sums=sums, carry=carry, **args, **kw)
                if reduced is not None:
                    yield sums[reduced], key

        return run


_UPDATE = """\
    .. code-block:: text

        g     = -grad if maximize else grad         (unscaled, clipped: see max_grad_norm)
        rho   = min(lr, 1 / sqrt(t))
        alpha = max(eps2, RMS(theta)) * rho         (RMS(x) = ||x|| / sqrt(numel(x)))
        theta = theta * (1 - lr * weight_decay)
        w     = t^beta2_decay                       (1 - beta2_t)
        ndim >= 2, factored over the last two dims (the leading ones are a batch):
            R = R + w * (mean(g^2 over columns) - R)     (row_var, shape [..., n, 1])
            C = C + w * (mean(g^2 over rows) - C)        (col_var, shape [..., 1, m])
            V = R / max(mean(R), eps1) * C
        ndim < 2:
            V = V + w * (g^2 - V)                        (variance, the param's shape)
        U     = g / sqrt(max(V, eps1^2))
        theta = theta - alpha / max(1, RMS(U) / d) * U
"""


class Adafactor(AdafactorFamily):
    __doc__ = rf"""Implements Adafactor (torch.optim's flavour), fused.

    A drop-in for :class:`torch.optim.Adafactor`: the same arguments, defaults, param-group
    keys and state (``step``, ``row_var`` and ``col_var`` for params with two or more dims,
    ``variance`` for the others, in the param's dtype), so state_dicts load into torch.optim
    and back. For transformers' Adafactor use :class:`fused_optim.transformers.Adafactor`.

    For each param, with :math:`t` the step (counted from 1), :math:`g` its gradient and
    ``eps1`` the machine epsilon of the param's dtype unless given:

{_UPDATE}
    (Shazeer and Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost",
    arXiv 1804.04235, with torch's use of lr and eps1.) Unlike torch, whose per-param loop
    reads RMS(theta), RMS(U) and the step on the host, a step never waits for the device.

    Args:
        params (iterable): params to optimize, or dicts defining param groups.
        lr (float or Tensor, optional): the largest relative step size rho, and the
            coefficient of the decoupled weight decay (default: 1e-2).
        beta2_decay (float, optional): the exponent of the second-moment weight
            ``1 - beta2_t = t^beta2_decay``, <= 0 (default: -0.8).
        eps (Tuple[float or None, float], optional): eps1 bounds the second-moment estimate
            from below (``None``: the machine epsilon of the param's dtype); eps2 the RMS of
            the param that scales the step (default: (None, 1e-3)).
        d (float, optional): the update clipping threshold on RMS(U), >= 1 (default: 1.0).
        weight_decay (float, optional): decoupled weight decay coefficient (default: 0.0).
        foreach (bool, optional): accepted for compatibility and ignored: every step is fused.
        maximize (bool, optional): maximize the objective instead of minimizing
            (default: False).
{FUSED_ARGS}

{FUSED_ATTRIBUTES}

    {FUSED_NOTES.strip()}
    With 16-bit params the states are 16-bit, as torch's, but the math is fp32 (torch's is
    in the param's dtype), so 16-bit trajectories differ from torch's by rounding.

    Example:
        >>> opt = fused_optim.Adafactor(model.parameters(), lr=1e-2, max_grad_norm=1.0)
        >>> loss_fn(model(x), y).backward()
        >>> opt.step()
        >>> opt.zero_grad()
    """

    KERNEL = "adafactor"
    FLOAT_KEYS = ("beta2_decay", "d")

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-2,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        max_grad_norm: float | None = None,
        backend: str = "auto",
    ):
        defaults = dict(
            lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay,
            foreach=foreach, maximize=maximize,
        )  # fmt: skip
        self._validate_group(defaults)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, backend=backend)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)

    def _validate_group(self, group) -> None:
        # torch.optim.Adafactor's checks, messages and exception types (a value of the wrong
        # type raises from the comparison, as it does there).
        lr, beta2_decay, eps, d, wd = (group[k] for k in ("lr", "beta2_decay", "eps", "d", "weight_decay"))
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not _holds(lambda v: 0.0 <= v, lr):
            raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if not _holds(lambda v: 0.0 >= v, beta2_decay):
            raise ValueError(f"beta2_decay should be <= 0 but is: {beta2_decay}")
        if eps[0] is not None and not _holds(lambda v: 0.0 <= v, eps[0]):
            raise ValueError(f"epsilon1 should be >= 0 but is: {eps[0]}")
        if not _holds(lambda v: 0.0 <= v, eps[1]):
            raise ValueError(f"epsilon2 should be >= 0 but is: {eps[1]}")
        if not _holds(lambda v: 1.0 <= v, d):
            raise ValueError(f"Clipping threshold d should be >= 1 but is: {d}")
        if not _holds(lambda v: 0.0 <= v, wd):
            raise ValueError(f"weight_decay should be >= 0 but is: {wd}")

    def _state_keys(self, group) -> tuple[str, ...]:
        return ("row_var", "col_var", "variance")

    def _param_state_keys(self, group, p) -> tuple[str, ...]:
        return ("row_var", "col_var") if p.dim() >= 2 else ("variance",)

    @staticmethod
    def _lists(states) -> tuple:
        return states["row_var"], states["col_var"], states["variance"], states["step"]

    def _hyper(self, group) -> dict:
        eps1, eps2 = group["eps"]
        return dict(
            lr=kernel_lr(group["lr"]), beta2_decay=float(group["beta2_decay"]),
            eps1=None if eps1 is None else float(eps1), eps2=float(eps2), d=float(group["d"]),
            weight_decay=float(group["weight_decay"]), maximize=bool(group["maximize"]),
        )  # fmt: skip


__all__ = ["Adafactor", "AdafactorFamily", "ShardSums"]
