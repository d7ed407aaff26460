"""Shared machinery of the fused optimizer classes: grouping tensors by (device, dtypes) once,
global-norm clipping folded into the update, the GradScaler fused protocol, validation."""

import math
import operator
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from fused_optim import _backends


def check_lr(lr) -> None:
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"lr as a tensor must have one element, got {lr.numel()}")
        if not lr.is_floating_point():
            raise ValueError(f"lr as a tensor must be floating point, got {lr.dtype}")
        return
    if not isinstance(lr, (int, float)) or math.isnan(lr) or lr < 0.0:
        raise ValueError(f"Invalid learning rate: lr must be a number >= 0, got {lr!r}")


def check_range(name: str, value, low: float, high: float, *, high_open: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not math.isnan(value) and low <= value
    ok = ok and (value < high if high_open else value <= high)
    if not ok:
        bracket = ")" if high_open else "]"
        raise ValueError(f"Invalid {name}: must be in [{low}, {high}{bracket}, got {value!r}")


def check_betas(betas, beta2_high: float = 1.0) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: must be a pair (beta1, beta2), got {betas!r}")
    check_range("beta parameter at index 0 (beta1)", betas[0], 0.0, 1.0)
    check_range("beta parameter at index 1 (beta2)", betas[1], 0.0, beta2_high)


@dataclass
class Bucket:
    """Tensors of one param group that one kernel call updates: same device and dtypes."""

    device: torch.device
    dtype: torch.dtype  # of the params
    index: list[int]  # positions in the group's params that have grads
    params: list[torch.Tensor]
    states: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    backend: object = None  # the backend `run` was made for
    run: object = None  # run(grads, **hyper, grad_scale=, found_inf=, clip_coef=): one fused call


class _CountedState(defaultdict):
    """The optimizer's state mapping, counting its own changes, so a step can tell in O(1)
    whether any param's state dict was added, replaced or deleted since the grouping was
    built (looking each one up costs ~0.1 us per param through Tensor.__hash__)."""

    def __init__(self, *args):
        super().__init__(dict, *args)
        self.changes = 0

    def __setitem__(self, key, value):  # also reached by defaultdict's insertion of a missing key
        self.changes += 1
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self.changes += 1
        super().__delitem__(key)

    def _changed(name):  # noqa: N805  (wraps the other mutating methods)
        def method(self, *args, **kwargs):
            self.changes += 1
            return getattr(defaultdict, name)(self, *args, **kwargs)

        return method

    pop = _changed("pop")
    popitem = _changed("popitem")
    clear = _changed("clear")
    update = _changed("update")
    setdefault = _changed("setdefault")
    __ior__ = _changed("__ior__")
    del _changed

    def __reduce__(self):  # pickles as the plain defaultdict(dict) torch.optim uses
        return (defaultdict, (dict, dict(self)))


@dataclass
class _GroupCache:
    """What a param group's buckets were built from; checked by identity every step."""

    group: dict
    state: object  # the optimizer's state mapping (a _CountedState)
    changes: int  # its change count
    params: list  # group["params"] as it was
    present: tuple  # which params had grads
    state_keys: tuple
    handles: list  # each param's C++ tensor (torch.utils.swap_tensors changes it)
    buckets: list


_HANDLE = operator.attrgetter("_cdata")


def _same_objects(a: list, b: list) -> bool:
    return len(a) == len(b) and all(map(operator.is_, a, b))


class FusedOptimizer(torch.optim.Optimizer):
    """Base class. Subclasses implement _state_keys(group) (tensor states besides "step"; the
    first one's dtype is the bucket's state dtype), _new_state(param, key), _hyper(group) (the
    keyword arguments of one call) and _make_run(backend, bucket, group) (a function running one
    fused call on the bucket's tensors with the given grads)."""

    _step_supports_amp_scaling = True  # torch.amp.GradScaler hands us grad_scale / found_inf

    def __init__(self, params, defaults, *, max_grad_norm=None, backend="auto"):
        if max_grad_norm is not None:
            check_range("max_grad_norm", max_grad_norm, 0.0, math.inf)
            if max_grad_norm <= 0.0:
                raise ValueError(f"Invalid max_grad_norm: must be > 0 or None, got {max_grad_norm!r}")
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.backend = _backends.check_name(backend)
        self.last_grad_norm: torch.Tensor | None = None  # total grad norm of the last clipped step
        self._buckets: dict[int, _GroupCache] = {}
        super().__init__(params, defaults)

    # ---- torch.optim.Optimizer hooks ------------------------------------------------------

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_group(group)
        except Exception:
            self.param_groups.pop()
            raise
        for p in group["params"]:
            if p.is_complex():
                self.param_groups.pop()
                raise TypeError("fused_optim: complex params are not supported; use torch.view_as_real")
        self._buckets.clear()

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._buckets.clear()

    # torch.optim.Optimizer pickles only defaults, state and param_groups: keep our settings
    # too (copy.deepcopy, torch.save of the optimizer) and rebuild the caches on the way back.
    def __getstate__(self):
        state = super().__getstate__()
        state["max_grad_norm"] = self.max_grad_norm
        state["backend"] = self.backend
        return state

    def __setstate__(self, state):
        state = dict(state)
        self.max_grad_norm = state.pop("max_grad_norm", getattr(self, "max_grad_norm", None))
        self.backend = state.pop("backend", getattr(self, "backend", "auto"))
        self.last_grad_norm = getattr(self, "last_grad_norm", None)
        self._buckets = {}
        super().__setstate__(state)

    def _validate_group(self, group) -> None:  # overridden by subclasses
        pass

    # ---- grouping ---------------------------------------------------------------------------

    def _buckets_for(self, gi: int, group, grads) -> list[Bucket]:
        """Buckets of group `gi` for this set of present grads. Rebuilt when anything they were
        built from changed: the group, its params, which have grads, the state mapping or a
        param's state dict (replaced or deleted), a param's tensor (swap_tensors). Assigning a
        new tensor into an existing state dict (state[p]["exp_avg"] = t) is not noticed."""
        params = group["params"]
        present = tuple(g is not None for g in grads)
        keys = self._state_keys(group)
        if type(self.state) is not _CountedState:  # e.g. the user assigned opt.state = {...}
            self.state = _CountedState(self.state)
        c = self._buckets.get(gi)
        if (
            c is not None
            and c.group is group
            and c.state is self.state
            and c.changes == self.state.changes
            and c.present == present
            and c.state_keys == keys
            and _same_objects(c.params, params)
            and c.handles == list(map(_HANDLE, params))
        ):
            return c.buckets
        by_kind: dict[tuple, Bucket] = {}
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError("fused_optim: sparse gradients are not supported (use a dense embedding)")
            state = self.state[p]
            for k in keys:  # new params, or a state_dict that lacked a key (e.g. amsgrad turned on)
                if k not in state:
                    state[k] = self._new_state(p, k)
            # Kernels read and advance `step` on the params' device, as float32.
            step = state.get("step", 0.0)
            if not torch.is_tensor(step) or step.dtype != torch.float32 or step.device != p.device:
                state["step"] = torch.as_tensor(float(step), dtype=torch.float32).to(p.device)
            kind = (p.device, p.dtype, state[keys[0]].dtype)
            b = by_kind.setdefault(kind, Bucket(p.device, p.dtype, [], []))
            b.index.append(i)
            b.params.append(p)
            for k in keys + ("step",):
                b.states.setdefault(k, []).append(state[k])
        buckets = list(by_kind.values())
        self._buckets[gi] = _GroupCache(
            group, self.state, self.state.changes, list(params), present, keys,
            list(map(_HANDLE, params)), buckets,
        )  # fmt: skip
        return buckets

    @staticmethod
    def _grads_of(bucket: Bucket, grads, n_params: int):
        if len(bucket.index) == n_params:
            return grads
        return [grads[i] for i in bucket.index]

    # ---- the step -------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)

        work = []  # (group, bucket, grads)
        for gi, group in enumerate(self.param_groups):
            grads = [p.grad for p in group["params"]]
            for bucket in self._buckets_for(gi, group, grads):
                work.append((group, bucket, self._grads_of(bucket, grads, len(grads))))
        if not work:
            return loss

        coefs = self._clip_coefficients(work, grad_scale) if self.max_grad_norm is not None else {}
        compiling = torch.compiler.is_compiling()
        for group, bucket, grads in work:
            backend = _backends.get(self.backend, bucket.device, bucket.dtype)
            if bucket.backend is not backend or compiling:
                bucket.backend, bucket.run = backend, self._make_run(backend, bucket, group, compiling)
            bucket.run(
                grads,
                **self._hyper(group),
                grad_scale=_on(grad_scale, bucket.device),
                found_inf=_on(found_inf, bucket.device),
                clip_coef=coefs.get(bucket.device),
            )
        return loss

    def _clip_coefficients(self, work, grad_scale) -> dict:
        """Global norm over every gradient of the step; one clip coefficient per device."""
        by_device = defaultdict(list)
        odd_dtype = {}  # a dtype the kernels do not take, per device (auto then uses the reference)
        for _, bucket, grads in work:
            if len(work) == 1:  # the common case: no list copy
                by_device[bucket.device] = grads
            else:
                by_device[bucket.device].extend(grads)
            if bucket.dtype not in _backends.KERNEL_DTYPES:
                odd_dtype[bucket.device] = bucket.dtype
        results = {
            d: _backends.get(self.backend, d, odd_dtype.get(d)).global_norm(
                gs, 2.0, self.max_grad_norm, _on(grad_scale, d)
            )
            for d, gs in by_device.items()
        }
        if len(results) == 1:
            ((device, (norm, coef)),) = results.items()
            self.last_grad_norm = norm
            return {device: coef}
        first = next(iter(results))
        norm = torch.linalg.vector_norm(torch.stack([n.to(first) for n, _ in results.values()]))
        coef = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)
        self.last_grad_norm = norm
        return {d: coef.to(d) for d in results}


def _on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    if t is None or t.device == device:
        return t
    return t.to(device, non_blocking=True)
