"""Shared machinery of the fused optimizer classes: grouping tensors by (device, dtypes) once,
global-norm clipping folded into the update, the GradScaler fused protocol, validation."""

import bisect
import contextlib
import math
import operator
import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from fused_optim import _backends, _distributed
from fused_optim._layout import is_dense
from fused_optim._reference.adam import has_values


def _is_at_least_zero(name: str, value, what: str) -> None:
    """torch.optim's acceptance rule `0.0 <= value`: Python and numpy numbers, and one-element
    tensors of any real dtype; NaN and negative values are refused. inf is accepted."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element, got {value.numel()} elements")
        if value.is_complex():
            raise ValueError(f"Invalid {what}: a complex tensor {name} is not supported")
        if not has_values(value):
            return  # a meta / fake tensor (tracing): nothing to read
    try:
        ok = bool(0.0 <= value)
    except (TypeError, RuntimeError):
        raise ValueError(f"Invalid {what}: {name} must be a real number >= 0, got {value!r}") from None
    if not ok:
        raise ValueError(f"Invalid {what}: {value!r} ({name} must be >= 0)")


def check_lr(lr) -> None:
    _is_at_least_zero("lr", lr, "learning rate")


def check_nonnegative(name: str, value, what: str) -> None:
    _is_at_least_zero(name, value, what)


def check_betas(betas, beta2_high: float = 1.0) -> None:
    """torch.optim.Adam's rules: each beta in [0, high), one-element if a tensor, and both Python
    floats or both tensors (so integer betas are refused, as torch refuses them)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: must be a pair (beta1, beta2), got {betas!r}")
    for i, (beta, high) in enumerate(zip(betas, (1.0, beta2_high), strict=True)):
        if isinstance(beta, torch.Tensor) and beta.numel() != 1:
            raise ValueError(f"Tensor betas[{i}] must be 1-element")
        try:
            ok = bool(0.0 <= beta < high)
        except (TypeError, RuntimeError):
            ok = False
        if not ok:
            raise ValueError(
                f"Invalid beta parameter at index {i} (beta{i + 1}): {beta!r}, must be in [0, {high})"
            )
    both_floats = all(isinstance(b, float) for b in betas)
    both_tensors = all(isinstance(b, torch.Tensor) for b in betas)
    if not (both_floats or both_tensors):
        raise ValueError(f"betas must be either both floats or both Tensors, got {betas!r}")


def check_range(name: str, value, low: float, high: float, *, high_open: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not math.isnan(value) and low <= value
    ok = ok and (value < high if high_open else value <= high)
    if not ok:
        bracket = ")" if high_open else "]"
        raise ValueError(f"Invalid {name}: must be in [{low}, {high}{bracket}, got {value!r}")


def kernel_lr(lr):
    """lr as the kernels take it: a float, or a float32/float64 tensor (another tensor dtype is
    converted: once, in the constructor; every step only if one is assigned later)."""
    if isinstance(lr, torch.Tensor) and lr.dtype not in (torch.float32, torch.float64):
        return lr.to(torch.float32)
    return lr


def _as_float(value):
    """A tensor hyper-parameter read once, as a Python float (no host read per step)."""
    if isinstance(value, torch.Tensor) and has_values(value):
        return float(value)
    return value


@dataclass
class Bucket:
    """Tensors of one param group that one kernel call updates: same device and dtypes."""

    device: torch.device
    dtype: torch.dtype  # of the params
    index: list[int]  # positions in the group's params that have grads
    params: list[torch.Tensor]
    states: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    traced: bool = False  # meta / FakeTensor params: shapes only, through the ops' fake impls
    # DTensor params: the lists hold their local shards; sums that span shards are reduced over
    # shard_key (from _distributed.shard_key), None when each rank holds whole tensors.
    dtensor: bool = False
    shard_key: object = None
    dtensors: list = field(default_factory=list)  # the DTensor params themselves
    backend: object = None  # the backend `run` was made for
    run: object = None  # run(grads, **hyper, grad_scale=, found_inf=, clip_coef=): one fused call


class _ParamState(dict):
    """One param's state dict. Every change to it is counted on the optimizer's state mapping,
    so a step notices in O(1) that a state tensor was replaced, a key deleted or the dict
    cleared (in-place changes to the tensors themselves need no notice: the kernels use them)."""

    __slots__ = ("_owner",)

    def __init__(self, owner, *args):
        super().__init__(*args)
        self._owner = owner

    def _changed(name):  # noqa: N805  (wraps the mutating methods)
        def method(self, *args, **kwargs):
            self._owner.changes += 1
            return getattr(dict, name)(self, *args, **kwargs)

        method.__name__ = name
        return method

    __setitem__ = _changed("__setitem__")
    __delitem__ = _changed("__delitem__")
    pop = _changed("pop")
    popitem = _changed("popitem")
    clear = _changed("clear")
    update = _changed("update")
    setdefault = _changed("setdefault")
    __ior__ = _changed("__ior__")
    del _changed

    def __reduce__(self):  # pickles (torch.save, deepcopy) as the plain dict torch.optim uses
        return (dict, (dict(self),))


def _fingerprint(d) -> tuple:
    """Which objects a plain state dict holds: changes when an entry is added, removed or
    replaced (the objects it held stay alive in the cached buckets, so ids are not reused)."""
    return (id(d), tuple((k, id(v)) for k, v in d.items()) if isinstance(d, dict) else ())


class _CountedState(defaultdict):
    """The optimizer's state mapping (param -> its state dict), as torch.optim's defaultdict(dict)
    but counting every change to itself and to the per-param dicts it made in `changes`, so a
    step can tell in O(1) whether the grouping it cached is still right. A dict the user assigns
    (opt.state[p] = d) is kept as it is, as torch keeps it, and compared entry by entry every
    step instead (`plain_signature`): few params ever have one."""

    def __init__(self, mapping=(), *, adopt: bool = False):
        """adopt: the mapping's dicts are ours to replace (torch.optim's load_state_dict just
        made them), so they become counted dicts; else the user's dicts are kept as they are."""
        super().__init__(self._new_param_state)
        self.changes = 0
        self._plain = {}  # param -> a dict that is not a _ParamState of this mapping
        for key, value in dict(mapping).items():
            self[key] = _ParamState(self, value) if adopt and isinstance(value, dict) else value

    def _new_param_state(self):
        return _ParamState(self)

    def __setitem__(self, key, value):  # also reached by defaultdict's insertion of a missing key
        self.changes += 1
        if type(value) is _ParamState and value._owner is self:
            self._plain.pop(key, None)
        else:
            self._plain[key] = value
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self.changes += 1
        self._plain.pop(key, None)
        super().__delitem__(key)

    def pop(self, key, *default):
        self.changes += 1
        self._plain.pop(key, None)
        return super().pop(key, *default)

    def popitem(self):
        self.changes += 1
        key, value = super().popitem()
        self._plain.pop(key, None)
        return key, value

    def clear(self):
        self.changes += 1
        self._plain.clear()
        super().clear()

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = self._new_param_state() if default is None else default
        return self[key]

    def update(self, *args, **kwargs):
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __ior__(self, other):
        self.update(other)
        return self

    def plain_signature(self) -> tuple:
        return tuple(map(_fingerprint, self._plain.values())) if self._plain else ()

    def __reduce__(self):  # pickles as the plain defaultdict(dict) torch.optim uses
        return (defaultdict, (dict, {k: dict(v) for k, v in self.items()}))


@dataclass
class _GroupCache:
    """What a param group's buckets were built from; checked by identity every step."""

    group: dict
    state: object  # the optimizer's state mapping (a _CountedState)
    changes: int  # its change count
    plain: tuple  # its plain_signature()
    params: list  # group["params"] as it was
    present: tuple  # which params had grads
    state_keys: tuple
    handles: list  # each param's C++ tensor (torch.utils.swap_tensors changes it)
    buckets: list
    local_handles: list | None = None  # DTensor params' local shards (FSDP2 may replace them)


_HANDLE = operator.attrgetter("_cdata")


def _local_handles(params) -> list:
    return [_HANDLE(_distributed.local(p)) for p in params]


# The names the kernels give to their tensor lists, for error messages. An index in a message
# is the tensor's position among the call's params, also for the compact Adafactor lists (which
# hold entries only for some params): the kernels name each entry by the param it belongs to.
_STATE_LIST_NAME = {
    "params": "",
    "grads": "the grad of ",
    "exp_avgs": 'state["exp_avg"] of ',
    "exp_avg_sqs": 'state["exp_avg_sq"] of ',
    "max_exp_avg_sqs": 'state["max_exp_avg_sq"] of ',
    "state_steps": 'state["step"] of ',
    "row_vars": 'state["row_var"] of ',
    "col_vars": 'state["col_var"] of ',
    "variances": 'state["variance"] of ',
    "exp_avg_sq_rows": 'state["exp_avg_sq_row"] of ',
    "exp_avg_sq_cols": 'state["exp_avg_sq_col"] of ',
    "rmss": 'state["RMS"] of ',
    "row_ms": 'state["row_m"] of ',
    "col_ms": 'state["col_m"] of ',
    "signs": 'state["sign"] of ',
    "row_vs": 'state["row_v"] of ',
    "col_vs": 'state["col_v"] of ',
}
_LIST_INDEX = re.compile(r"\b([A-Za-z_]+)\[(\d+)\]")


def _same_objects(a: list, b: list) -> bool:
    return len(a) == len(b) and all(map(operator.is_, a, b))


def _storage_span(t: torch.Tensor):
    """(storage key, first byte, end byte) of the memory t can touch, or None if unknown/empty."""
    if t.numel() == 0 or not has_values(t):
        return None
    try:
        key = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a storage with no data (some tensor subclasses)
        return None  # nothing to compare: such params are not checked for shared memory
    first = t.storage_offset()
    last = first + sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True))
    size = t.element_size()
    return key, first * size, (last + 1) * size


def check_no_repeats(params: list) -> None:
    """A Parameter listed twice in one group: refused (torch warns and applies it twice; the
    fused kernels update all params at once, so it would race)."""
    if len(set(map(id, params))) != len(params):
        seen = set()
        i = next(i for i, p in enumerate(params) if id(p) in seen or seen.add(id(p)))
        raise ValueError(
            f"fused_optim: params[{i}] appears more than once in this param group; pass each "
            "parameter once (torch.optim warns and applies it twice; the fused kernels update "
            "all params at once, so a repeated one is refused)"
        )


class _MemoryIndex:
    """The memory spans of an optimizer's dense params, per storage, sorted, to refuse a new
    param that overlaps one already there in O(log n). Params that are not dense (a column
    slice of a weight) are left out: the kernels update them through dense working copies
    written back one after the other, so even overlapping ones cannot race. Entries of params
    removed since are not dropped: a conflict is confirmed against the current groups first."""

    def __init__(self, params=()):
        self.spans = defaultdict(list)  # storage key -> sorted [(first byte, end byte)]
        self.add(params)

    @staticmethod
    def _spans(params):
        for p in map(_distributed.local, params):
            span = _storage_span(p) if is_dense(p) else None
            if span is not None:
                yield span

    def add(self, params) -> None:
        for key, first, end in self._spans(params):
            bisect.insort(self.spans[key], (first, end))

    def overlaps(self, params) -> bool:
        """Whether two of `params`, or one of them and an indexed one, share memory."""
        new = sorted(self._spans(params))
        for (k1, _, end1), (k2, first2, _) in zip(new, new[1:], strict=False):
            if k1 == k2 and first2 < end1:
                return True
        for key, first, end in new:
            spans = self.spans.get(key)
            if spans:
                i = bisect.bisect_left(spans, (first, end))
                if (i > 0 and spans[i - 1][1] > first) or (i < len(spans) and spans[i][0] < end):
                    return True
        return False


class FusedOptimizer(torch.optim.Optimizer):
    # Base class. Subclasses implement _state_keys(group) (tensor states besides "step"),
    # _new_state(param, key), _hyper(group) (the keyword arguments of one call) and
    # _make_run(backend, bucket, group, op_only) (a function running one fused call on the
    # bucket's tensors with the given grads; op_only: through the registered op over lists, as
    # tracing needs). Optimizers whose params have different states (Adafactor: factored or
    # not) also override _param_state_keys(group, p): the keys of one param, a subset of
    # _state_keys(group) that depends only on the group and p's shape; bucket.states then holds
    # compact lists (one entry per param that has the key, in order). The first key of a
    # param's keys gives its state dtype. _usable_state(p, key, value) fixes up a state found
    # in the mapping (loaded, assigned) once, when the buckets are built.

    _step_supports_amp_scaling = True  # torch.amp.GradScaler hands us grad_scale / found_inf
    _state_list_names = _STATE_LIST_NAME  # kernel list name -> how an error message names it

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

    # The state mapping is always a _CountedState: torch.optim assigns a defaultdict(dict) in
    # __init__, load_state_dict and unpickling, users may assign their own; each is wrapped once,
    # so an `s = opt.state` taken at any point stays the optimizer's state until the next one.
    @property
    def state(self):
        s = self.__dict__["state"]
        if type(s) is not _CountedState:
            s = self.__dict__["state"] = _CountedState(s, adopt=True)
        return s

    @state.setter
    def state(self, value):
        self.__dict__["state"] = value if type(value) is _CountedState else _CountedState(value)

    # ---- torch.optim.Optimizer hooks ------------------------------------------------------

    def add_param_group(self, param_group):
        if isinstance(param_group, dict):
            params = param_group.get("params")
            if isinstance(params, torch.Tensor):
                params = [params]
            elif params is not None and not isinstance(params, (set, list)):
                params = list(params)  # a generator: read it once, here
            if isinstance(params, list):
                param_group = {**param_group, "params": params}
                check_no_repeats(params)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            for p in group["params"]:
                if p.is_complex():
                    raise TypeError("fused_optim: complex params are not supported; use torch.view_as_real")
            self._validate_group(group)
            self._read_hyper_tensors(group)
            self._check_memory(group["params"])
            self._check_backends(group["params"])
        except Exception:
            self.param_groups.pop()
            raise
        self._buckets.clear()

    def state_dict(self):
        # Plain dicts, as torch.optim's: a counted dict would pickle as a reference to the
        # dict builtin, which torch.load(weights_only=True), the default, refuses.
        sd = super().state_dict()
        sd["state"] = {k: dict(v) if isinstance(v, dict) else v for k, v in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            self._read_hyper_tensors(group)
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

    def _read_hyper_tensors(self, group) -> None:
        """Hyper-parameters given as tensors, read once so no step reads them from the device:
        betas, eps and weight_decay become floats; a tensor lr stays a tensor (the kernels read
        it on the device, so it may change in place) but in float32 unless it is float64."""
        for key in ("eps", "weight_decay"):
            if key in group:
                group[key] = _as_float(group[key])
        if "betas" in group:
            group["betas"] = tuple(_as_float(b) for b in group["betas"])
        if "lr" in group:
            group["lr"] = kernel_lr(group["lr"])

    def _check_memory(self, params) -> None:
        """Refuses params that share memory with each other or with the optimizer's other
        params (overlapping views of one buffer); disjoint views of one buffer are fine."""
        index = self.__dict__.get("_memory")
        if index is None or index.overlaps(params):  # confirm against the groups as they are now
            others = [p for g in self.param_groups[:-1] for p in g["params"]]
            index = self._memory = _MemoryIndex(others)
            if index.overlaps(params):
                raise ValueError(
                    "fused_optim: two params share memory (overlapping views of one buffer); the "
                    "fused kernels update all params at once, so each element must belong to one param"
                )
        index.add(params)

    def _check_backends(self, params) -> None:
        """An explicit backend (or FUSED_OPTIM_BACKEND) that cannot run on these params fails
        here, before any state exists."""
        for device, dtype in {(p.device, p.dtype) for p in params}:
            if device.type != "meta":
                _backends.resolve(self.backend, device, dtype)

    def _backend_name(self, device, dtype) -> str:
        """The name of the backend that runs this optimizer's (device, dtype) params."""
        return _backends.resolve(self.backend, device, dtype)

    @property
    def backends(self) -> dict[torch.device, str]:
        """The backend that runs each device's params, e.g. {device("cuda", 0): "cuda"}. Where
        params of one device use different backends by dtype (under auto, float64 runs on
        the reference), the value names each: "cpu (torch.float32); reference (torch.float64)"."""
        by_device: dict = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.device.type == "meta":
                    name = "traced"
                else:
                    name = self._backend_name(p.device, p.dtype)
                by_device.setdefault(p.device, {}).setdefault(name, set()).add(p.dtype)
        return {
            d: next(iter(names)) if len(names) == 1
            else "; ".join(f"{n} ({', '.join(sorted(map(str, dts)))})" for n, dts in names.items())
            for d, names in by_device.items()
        }  # fmt: skip

    # ---- grouping ---------------------------------------------------------------------------

    def _buckets_for(self, gi: int, group, grads) -> list[Bucket]:
        """Buckets of group `gi` for this set of present grads. Rebuilt when anything they were
        built from changed: the group, its params, which have grads, the state mapping or any
        param's state dict (an entry replaced, deleted or cleared), a param's tensor
        (swap_tensors)."""
        params = group["params"]
        present = tuple(g is not None for g in grads)
        keys = self._state_keys(group)
        state = self.state
        c = self._buckets.get(gi)
        if (
            c is not None
            and c.group is group
            and c.state is state
            and c.changes == state.changes
            and c.plain == state.plain_signature()
            and c.present == present
            and c.state_keys == keys
            and _same_objects(c.params, params)
            and c.handles == list(map(_HANDLE, params))
            and (c.local_handles is None or c.local_handles == _local_handles(params))
        ):
            return c.buckets
        buckets = self._build_buckets(group, grads, keys)
        local_handles = _local_handles(params) if any(b.dtensor for b in buckets) else None
        self._buckets[gi] = _GroupCache(
            group, state, state.changes, state.plain_signature(), list(params), present, keys,
            list(map(_HANDLE, params)), buckets, local_handles,
        )  # fmt: skip
        return buckets

    def _build_buckets(self, group, grads, keys) -> list[Bucket]:
        """Groups the params that have grads by (device, dtype, state dtype), creating missing
        state and fixing up state that the kernels cannot use as it is, once."""
        by_kind: dict[tuple, Bucket] = {}
        for i, (p, g) in enumerate(zip(group["params"], grads, strict=True)):
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError("fused_optim: sparse gradients are not supported (use a dense embedding)")
            dtensor = _distributed.is_dtensor(p)
            if dtensor:
                gi = next(k for k, other in enumerate(self.param_groups) if other is group)
                self._check_dtensor(p, f'param_groups[{gi}]["params"][{i}]')
            state = self.state.get(p)
            if state is None:
                state = self.state[p] = self.state._new_param_state()
            p_keys = self._param_state_keys(group, p)
            for k in p_keys:  # new params, or a state_dict that lacked a key (e.g. amsgrad turned on)
                t = state.get(k)
                if t is None:
                    state[k] = self._new_state(p, k)
                else:
                    usable = self._usable_state(p, k, t)
                    if usable is not t:
                        state[k] = usable
            # Kernels read and advance `step` on the params' device, as float32 (a plain tensor
            # for DTensor params too, as torch.optim keeps it).
            step = state.get("step", 0.0)
            if _distributed.is_dtensor(step):
                step = step.to_local()
            if not torch.is_tensor(step) or step.dtype != torch.float32 or step.device != p.device:
                state["step"] = torch.as_tensor(_as_float(step), dtype=torch.float32).to(p.device)
            shard_key = _distributed.shard_key(p)
            kind = (p.device, p.dtype, state[p_keys[0]].dtype if p_keys else p.dtype, dtensor, shard_key)
            b = by_kind.get(kind)
            if b is None:
                b = by_kind[kind] = Bucket(p.device, p.dtype, [], [], traced=not has_values(p))
                b.states = {k: [] for k in keys + ("step",)}
                b.dtensor, b.shard_key = dtensor, shard_key
            b.index.append(i)
            b.params.append(_distributed.local(p))
            if dtensor:
                b.dtensors.append(p)
            for k in p_keys + ("step",):
                b.states[k].append(_distributed.local(state[k]))
        return list(by_kind.values())

    # Which DTensor params an optimizer steps: "any" (elementwise: any Shard(d) or Replicate
    # placement steps shard by shard), "dim0" (FSDP2's Shard(0) or Replicate: statistics across
    # rows are reduced over the mesh), None (not yet).
    _dtensor_layouts: str | None = None

    def _check_dtensor(self, p, where: str) -> None:
        if self._dtensor_layouts is None:
            raise NotImplementedError(
                f"fused_optim.{type(self).__name__} does not step DTensor params (FSDP2) yet: {where} is one"
            )
        _distributed.check_placements(p, where, only_dim0=self._dtensor_layouts == "dim0")

    def _param_state_keys(self, group, p) -> tuple[str, ...]:
        """The state keys of param `p` (besides "step"); all of the group's by default."""
        return self._state_keys(group)

    def _usable_state(self, p, key, value):
        """The state `key` of `p` as the kernels can use it, given `value` found in the mapping
        (loaded or assigned): `value` itself when it is fine, else a replacement, made once."""
        if _distributed.is_dtensor(p):
            return self._usable_dtensor_state(p, key, value)
        if value.shape == p.shape and value.stride() != p.stride() and is_dense(p):
            # Loaded in another layout (a contiguous checkpoint into a channels_last model):
            # re-laid out like the param once, not copied around every step.
            return torch.empty_like(p, dtype=value.dtype).copy_(value)
        return value

    def _usable_dtensor_state(self, p, key, value):
        """A per-element state of DTensor param p: a DTensor laid out as p (one loaded from a
        one-process state_dict is cut into this rank's shard)."""
        if value.shape != p.shape:
            raise RuntimeError(
                f'fused_optim: state["{key}"] has shape {tuple(value.shape)} but its param has '
                f"{tuple(p.shape)}"
            )
        return _distributed.like_param(value, p)

    @staticmethod
    def _grads_of(bucket: Bucket, grads, n_params: int, gi: int):
        if len(bucket.index) != n_params:
            grads = [grads[i] for i in bucket.index]
        if bucket.dtensor:
            mismatch = _distributed.grad_mismatch(grads, bucket.dtensors)
            if mismatch is not None:
                raise _in_group_terms(RuntimeError(f"fused_optim: {mismatch}"), gi, bucket.index)
            grads = _distributed.locals_of(grads)
        return grads

    def _backend_of(self, bucket: Bucket):
        if bucket.traced:
            return _backends.for_tracing()
        return _backends.get(self.backend, bucket.device, bucket.dtype)

    # ---- the step -------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """Performs a single optimization step.

        Args:
            closure (Callable, optional): a closure that reevaluates the model and returns the
                loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        compiling = torch.compiler.is_compiling()

        work = []  # (group index, group, bucket, grads)
        for gi, group in enumerate(self.param_groups):
            grads = [p.grad for p in group["params"]]
            if compiling:  # traced once per compiled graph: no cache to check
                buckets = self._build_buckets(group, grads, self._state_keys(group))
            else:
                buckets = self._buckets_for(gi, group, grads)
            for bucket in buckets:
                work.append((gi, group, bucket, self._grads_of(bucket, grads, len(grads), gi)))
        if not work:
            return loss

        coefs = self._clip_coefficients(work, grad_scale) if self.max_grad_norm is not None else {}
        calls = []  # (group index, bucket, its run, grads, keyword arguments of the run)
        # Under a dispatch mode (FakeTensorMode, FlopCounterMode, memory trackers) every call goes
        # through the registered ops, which the mode sees: a backend's group object (tensors
        # held in C++) would bypass it and step the real tensors. (Compiling: ops only anyway.)
        modes = not compiling and torch._C._len_torch_dispatch_stack() > 0
        for gi, group, bucket, grads in work:
            backend = self._backend_of(bucket)
            if bucket.backend is not backend or compiling:
                op_only = compiling or bucket.traced
                bucket.backend, bucket.run = backend, self._make_run(backend, bucket, group, op_only)
            run = self._make_run(backend, bucket, group, True) if modes else bucket.run
            kw = dict(
                self._hyper(group),
                grad_scale=_on(grad_scale, bucket.device),
                found_inf=_on(found_inf, bucket.device),
                clip_coef=coefs.get(bucket.device),
            )
            calls.append((gi, bucket, run, grads, kw))
        if any(bucket.shard_key is not None for _, bucket, _, _, _ in calls):
            # every bucket in the lockstep, in order: an error stops the step where it would
            # in one process
            self._step_in_lockstep([(gi, b, _steps_of(run, grads, kw)) for gi, b, run, grads, kw in calls])
            return loss
        for gi, bucket, run, grads, kw in calls:
            with self._errors_in_group_terms(gi, bucket):
                run(grads, **kw)
        return loss

    @contextlib.contextmanager
    def _errors_in_group_terms(self, gi: int, bucket: Bucket):
        try:
            yield
        except (RuntimeError, TypeError, ValueError) as exc:
            mapped = _in_group_terms(exc, gi, bucket.index, self._state_list_names)
            if mapped is exc:
                raise
            raise mapped from exc

    def _step_in_lockstep(self, buckets) -> None:
        """The steps of the buckets of a step with sharded ones (FSDP2), whose sums span ranks:
        each a generator that yields (sums, shard key) where it needs the sums all-reduced over
        the mesh (one that yields nothing steps at once). They advance together, and the sums
        they yield at the same point over the same mesh go in ONE all-reduce, so the collectives
        of a step do not grow with the number of param groups and dtypes either (every rank
        builds the same buckets in the same order).
        A bucket whose first call fails (bad input, before it changes anything) ends the step as
        in one process: the buckets before it finish their step, the others do not start, then
        the error is raised."""
        live, error = buckets, None
        while live:
            waiting = []  # (group index, bucket, generator, sums, key)
            for gi, bucket, steps in live:
                try:
                    with self._errors_in_group_terms(gi, bucket):
                        got = next(steps, None)
                except (RuntimeError, TypeError, ValueError) as exc:
                    if live is not buckets:  # after the first round: not bad input
                        raise
                    error = exc
                    break
                if got is not None:
                    waiting.append((gi, bucket, steps, *got))
            by_key = defaultdict(list)
            for *_, sums, key in waiting:
                by_key[key].append(sums)
            for key, parts in by_key.items():
                _distributed.all_reduce_together(parts, key)
            live = [(gi, bucket, steps) for gi, bucket, steps, _, _ in waiting]
        if error is not None:
            raise error

    def _clip_coefficients(self, work, grad_scale) -> dict:
        """Global norm over every gradient of the step; one clip coefficient per device. The
        norm of DTensor grads is that of their local shards, summed over the mesh (one
        all-reduce of a scalar per step under FSDP2)."""
        parts = defaultdict(list)  # (device, shard key) -> grads
        backend = {}  # per part; a dtype the kernels do not take sends auto to the reference
        for _, _, bucket, grads in work:
            part = (bucket.device, bucket.shard_key)
            if len(work) == 1:  # the common case: no list copy
                parts[part] = grads
            else:
                parts[part].extend(grads)
            if part not in backend or bucket.dtype not in _backends.KERNEL_DTYPES:
                backend[part] = self._backend_of(bucket)
        results = {
            part: backend[part].global_norm(gs, 2.0, self.max_grad_norm, _on(grad_scale, part[0]))
            for part, gs in parts.items()
        }
        if len(results) == 1 and next(iter(results))[1] is None:
            (((device, _), (norm, coef)),) = results.items()
            self.last_grad_norm = norm
            return {device: coef}
        first = next(iter(results))[0]
        norm = _distributed.combine_norms([(n, key) for (_, key), (n, _) in results.items()], 2.0, first)
        coef = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)
        self.last_grad_norm = norm
        return {d: coef.to(d) for d, _ in results}


def _steps_of(run, grads, kw):
    """A bucket's step as a generator for FusedOptimizer._step_in_lockstep: a sharded bucket's own
    (its run returns one), or the one call of any other; nothing runs before the first next()."""
    steps = run(grads, **kw)
    if steps is not None:
        yield from steps


def _in_group_terms(exc: Exception, gi: int, index: list[int], names=_STATE_LIST_NAME) -> Exception:
    """The kernels name tensors by their position in one call (params[3]); say which param of
    the user's param group that is, e.g. param_groups[0]["params"][7]. `names`: how each list
    is named (the state keys differ between optimizers)."""
    if type(exc) not in (RuntimeError, TypeError, ValueError):
        return exc

    def name(m: re.Match) -> str:
        k = int(m.group(2))
        if m.group(1) not in names or k >= len(index):
            return m.group(0)
        return names[m.group(1)] + f'param_groups[{gi}]["params"][{index[k]}]'

    message = _LIST_INDEX.sub(name, str(exc))
    return exc if message == str(exc) else type(exc)(message)


def _on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    if t is None or t.device == device:
        return t
    return t.to(device, non_blocking=True)
