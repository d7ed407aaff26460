"""SMMF: square-matricized momentum factorization (arXiv 2412.08894), fused."""

import torch

from fused_optim import _distributed
from fused_optim._reference.smmf import (
    SmmfSums,
    Window,
    is_dense,
    pack_signs,
    sign_words,
    smmf_shape,
    unpack_signs,
)
from fused_optim.optim._base import _as_float, kernel_lr
from fused_optim.optim._docs import FUSED_ARGS, FUSED_ATTRIBUTES, FUSED_NOTES
from fused_optim.optim.adafactor import AdafactorFamily, _holds

_FACTORED_M = ("row_m", "col_m", "sign")
_FACTORED_V = ("row_v", "col_v")
_MODES = ("adamw", "adam")


class SMMF(AdafactorFamily):
    r"""Implements SMMF (square-matricized momentum factorization), fused.

        A drop-in for the authors' ``SMMF`` (eai-lab/SMMF): the same arguments, defaults,
        validation messages and param-group keys. Each param is viewed row-major as an n x m
        matrix that depends only on its number of elements N (n = m = √N for a perfect square,
        else m is the largest divisor of N below √N; a 0-d param is 1 x 1, a prime N gives N x 1),
        and both Adam moments are kept compressed: the second moment V as non-negative factors
        (r_V, c_V), the first moment M as the sign of each element plus factors (r_M, c_M) of |M|.
        For each param, with :math:`t` the step (counted from 1) and :math:`g` its gradient:

        .. code-block:: text

            theta = theta * (1 - lr * weight_decay)     (weight_decay_mode='adamw')
            g     = g + weight_decay * theta            (weight_decay_mode='adam')
            beta_m = beta * growth_rate^(t - 1)
            beta_v = 1 - t^decay_rate
            M     = beta_m * (±r_M c_M^T) + (1 - beta_m) * g      (± the stored sign)
            V     = beta_v * (r_V c_V^T)  + (1 - beta_v) * g^2
            theta = theta - lr * M / (sqrt(V) + eps)    (g instead of M when beta is None)
            sign  = M > 0
            r_M, c_M = row and column sums of |M|, c_M / sum(c_M)   (skipped when the sum is 0)
            r_V, c_V = row and column sums of V,   c_V / sum(c_V)

        No bias correction. With ``vector_reshape=False``, a param whose squeezed shape is 1-D
        keeps M and V whole (``exp_avg``, ``exp_avg_sq``, in the param's dtype).

        State per factorized param: ``step`` (0-d float32), ``row_v`` [n] and ``col_v`` [m]
        (float32), and with ``beta``: ``row_m`` [n], ``col_m`` [m] (float32) and ``sign``, the sign
        bits packed into int32 words, shape [n, ceil(m / 32)] (bit b of word w of row i is
        element (i, 32 w + b); rows are padded to whole words). That is 4 (2n + 2m) + 4 n ceil(m/32)
        bytes, about 0.13 bytes per parameter on large tensors, against AdamW's 8. The authors'
        state (tuples of factors, a bool sign matrix, an int step) is not the same layout, so their
        state_dicts do not load here.

        ``state_dict()`` packs ``sign`` in the param's own dim-0 rows instead,
        [shape[0], ceil(numel / shape[0] / 32)] (a 0-d param: [1, 1]), and loading repacks it.
        FSDP2 (DTensor params sharded on dim 0): each rank's fused step takes its run of the
        square-matricized matrix; the factors are those of the whole param, plain tensors
        identical on every rank (one all-reduce of row and column sums per step). ``sign`` holds
        the words of the matrix rows the rank's run touches, a plain tensor; ``state_dict()``
        gives it as a DTensor split like the param, in the dim-0 layout above (shard boundaries
        never cut a dim-0 row). So a checkpoint moves between one process and FSDP2 both ways,
        through ``torch.distributed.checkpoint`` and full state dicts alike.

        Args:
            params (iterable): params to optimize, or dicts defining param groups.
            lr (float or Tensor, optional): learning rate (default: 1e-3).
            beta (float or None, optional): the first-moment coefficient, in [0, 1]; ``None``
                keeps no first moment (default: 0.9).
            eps (float, optional): added to sqrt(V) (default: 1e-8).
            weight_decay (float, optional): weight decay coefficient (default: 0.0).
            decay_rate (float, optional): the exponent of beta_v, in [-1, 0] (default: -0.5; the
                authors suggest -0.8 for transformers).
            growth_rate (float, optional): the decay of beta_m over steps, in [0, 1]
                (default: 0.999).
            vector_reshape (bool, optional): square-matricize params that are vectors once
                squeezed too (default: True); ``False`` keeps their moments dense.
            weight_decay_mode (str, optional): ``'adamw'`` (decoupled, default) or ``'adam'``
                (L2: ``weight_decay * theta`` is added to the gradient). The authors' code computes
                the L2 gradient and then does not use it, so 'adam' there decays nothing; here it
                does. Any other value raises ``ValueError`` (the authors' code silently skips the
                decay).
    {FUSED_ARGS}

    {FUSED_ATTRIBUTES}

        {FUSED_NOTES}
        Unlike the authors' code, which runs a chain of ops per param and reads ``sum(c) != 0`` on
        the host for every param, a step never waits for the device.

        Example:
            >>> opt = fused_optim.SMMF(model.parameters(), lr=1e-3, decay_rate=-0.8)
            >>> loss_fn(model(x), y).backward()
            >>> opt.step()
            >>> opt.zero_grad()
    """

    KERNEL = "smmf"
    ALGORITHM = "SMMF"
    FLOAT_KEYS = ("eps", "decay_rate", "growth_rate")
    # FSDP2 (Shard(0)) params: the factors are those of the whole square-matricized param, the
    # same plain tensors on every rank; signs and dense moments are split as the param is.
    _dtensor_layouts = "dim0"

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        beta: float | None = 0.9,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decay_rate: float = -0.5,
        growth_rate: float = 0.999,
        vector_reshape: bool = True,
        weight_decay_mode: str = "adamw",
        *,
        max_grad_norm: float | None = None,
        backend: str = "auto",
    ):
        if weight_decay_mode not in _MODES:
            raise ValueError(f"weight_decay_mode should be 'adamw' or 'adam'. Current: {weight_decay_mode!r}")
        self.weight_decay_mode = weight_decay_mode
        defaults = dict(
            lr=lr, beta=beta, eps=eps, weight_decay=weight_decay, decay_rate=decay_rate,
            growth_rate=growth_rate, vector_reshape=vector_reshape,
        )  # fmt: skip
        self._validate_group(defaults)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, backend=backend)

    def _validate_group(self, group) -> None:
        # The authors' checks and messages (a value of the wrong type raises from the
        # comparison, as it does there).
        lr, beta, eps, wd = group["lr"], group["beta"], group["eps"], group["weight_decay"]
        decay_rate, growth_rate = group["decay_rate"], group["growth_rate"]
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not _holds(lambda v: 0.0 <= v, lr):
            raise ValueError(f"Learning-rate should be greater than or equal to 0.0. Current: {lr}")
        if beta is not None and not _holds(lambda v: 0.0 <= v <= 1.0, beta):
            raise ValueError(f"Beta should be in [0.0, 1.0]. Current: {beta}")
        if not _holds(lambda v: 0.0 <= v, eps):
            raise ValueError(f"Epilson should be greater than or equal to 0.0. Current: {eps}")
        if not _holds(lambda v: 0.0 <= v, wd):
            raise ValueError(f"Weight-decay should be greater than or equal to 0.0. Current: {wd}")
        if not _holds(lambda v: -1.0 <= v <= 0.0, decay_rate):
            raise ValueError(f"Decay-rate should be in [-1.0, 0.0]. Current: {decay_rate}")
        if not _holds(lambda v: 0.0 <= v <= 1.0, growth_rate):
            raise ValueError(f"Growth-rate should be in [0.0, 1.0]. Current: {growth_rate}")

    def _read_hyper_tensors(self, group) -> None:
        super()._read_hyper_tensors(group)
        if isinstance(group.get("beta"), torch.Tensor):
            group["beta"] = _as_float(group["beta"])

    # ---- state ------------------------------------------------------------------------------

    def _state_keys(self, group) -> tuple[str, ...]:
        m = group["beta"] is not None
        return (_FACTORED_M if m else ()) + _FACTORED_V + (("exp_avg",) if m else ()) + ("exp_avg_sq",)

    def _param_state_keys(self, group, p) -> tuple[str, ...]:
        m = group["beta"] is not None
        if is_dense(p, group["vector_reshape"]):
            return (("exp_avg",) if m else ()) + ("exp_avg_sq",)
        return (_FACTORED_M if m else ()) + _FACTORED_V

    @staticmethod
    def _state_dtype_of(p, key: str) -> torch.dtype:
        if key == "sign":
            return torch.int32
        return p.dtype if key in ("exp_avg", "exp_avg_sq") else torch.float32

    @staticmethod
    def _sign_rows(p) -> tuple[int, int]:
        """The (rows, elements per row) of p's whole sign state: the square-matricized view, or
        for a param sharded on dim 0 its own rows, the saved layout a loaded state is checked in
        (the kernels keep each rank's part of it as `_window_shape`)."""
        if _distributed.shard_key(p) is None:
            return smmf_shape(p.numel())
        return SMMF._saved_sign_rows(p)

    @staticmethod
    def _saved_sign_rows(p) -> tuple[int, int]:
        """The rows that state_dict() packs sign bits in: p's own dim-0 rows (a 0-d param is one
        row of one), the same in one process and under FSDP2, so a checkpoint of either loads
        into the other through every torch path (DCP, broadcast from rank 0, full state dicts)."""
        if p.dim() == 0:
            return 1, 1
        rows = p.shape[0]
        return rows, p.numel() // rows if rows else 0

    @staticmethod
    def _state_shape(p, key: str) -> tuple[int, ...]:
        n, m = smmf_shape(p.numel())
        if key in ("row_m", "row_v"):
            return (n,)
        if key in ("col_m", "col_v"):
            return (m,)
        if key == "sign":
            rows, cols = SMMF._sign_rows(p)
            return (rows, sign_words(cols))
        return tuple(p.shape)

    @staticmethod
    def _follows_dim0(p, key: str) -> bool:
        return key in ("sign", "exp_avg", "exp_avg_sq")

    def _new_state(self, p, key):
        dtype, shape = self._state_dtype_of(p, key), self._state_shape(p, key)
        if _distributed.is_dtensor(p):
            local = p.to_local()
            if key == "sign" and _distributed.shard_key(p) is not None:
                return local.new_zeros(_window_shape(p), dtype=dtype)
            if not self._follows_dim0(p, key):
                return local.new_zeros(shape, dtype=dtype)
            local = local.new_zeros(shape, dtype=dtype) if key == "sign" else torch.zeros_like(local)
            return _distributed.from_local_like(local, p, shape)
        if key in ("exp_avg", "exp_avg_sq"):
            return torch.zeros_like(p, memory_format=torch.preserve_format)
        return p.new_zeros(shape, dtype=dtype)

    def _usable_state(self, p, key, value):
        if _distributed.is_dtensor(p):
            return self._usable_dtensor_state(p, key, value)
        return super(AdafactorFamily, self)._usable_state(p, key, self._checked_state(p, key, value))

    def _usable_dtensor_state(self, p, key, value):
        """A state of DTensor param p: the factors whole and plain on every rank, the signs and
        dense moments a DTensor laid out as p (a one-process state, or one in another layout, is
        repacked where needed and cut into this rank's shard)."""
        if key == "sign" and _distributed.shard_key(p) is not None:
            return self._window_signs(p, value)
        follows = self._follows_dim0(p, key)
        if _distributed.is_dtensor(value):
            wanted = (p.device_mesh, p.placements, self._state_shape(p, key), self._state_dtype_of(p, key))
            if follows and (value.device_mesh, value.placements, tuple(value.shape), value.dtype) == wanted:
                return value
            value = value.full_tensor()  # another layout: gathered once, at load
        value = self._checked_state(p, key, value)
        return _distributed.like_param(value, p) if follows else value

    def _window_signs(self, p, value, *, kernel_layout_ok: bool = True):
        """The sign words of p, sharded on dim 0, in the kernels' layout: a plain tensor of the
        matrix rows this rank's run of elements touches (`Window`), from `value`: that layout
        already (kernel_layout_ok), a DTensor of the saved layout (dim-0 rows) split as p, or a
        whole state in either one-process layout (cut here: no communication)."""
        local_p = p.to_local()
        plain = not _distributed.is_dtensor(value)
        if plain and kernel_layout_ok and tuple(value.shape) == _window_shape(p):
            return (
                value
                if value.dtype == torch.int32 and value.device == local_p.device
                else value.to(device=local_p.device, dtype=torch.int32)
            )
        saved = (p.shape[0], sign_words(self._saved_sign_rows(p)[1]))
        if not plain and (value.device_mesh, value.placements, tuple(value.shape)) == (
            p.device_mesh,
            p.placements,
            saved,
        ):
            rows = value.to_local().to(device=local_p.device, dtype=torch.int32)
        else:
            whole = value.full_tensor() if not plain else value
            whole = self._checked_state(p, "sign", whole)  # repacked in dim-0 rows, shape checked
            rows = _distributed.like_param(whole, p).to_local()
        return _window_from_rows(rows, p)

    def _checked_state(self, p, key, value):
        """A plain tensor `value` for state `key` of p (plain or DTensor) on p's (local) device in
        the state dtype, sign words repacked from the other row layout (one process vs dim-0
        shards), or a ValueError naming the shape that is wrong."""
        dtype, shape = self._state_dtype_of(p, key), self._state_shape(p, key)
        if not torch.is_tensor(value):
            raise ValueError(f"fused_optim: state[{key!r}] must be a tensor, got {type(value).__name__}")
        if _distributed.is_dtensor(value) and not _distributed.is_dtensor(p):
            raise ValueError(
                f"fused_optim: state[{key!r}] is a DTensor but its param is a plain tensor; load a full "
                "state dict instead (get_optimizer_state_dict with StateDictOptions(full_state_dict=True))"
            )
        if value.dtype != dtype or value.device != p.device:
            value = value.to(device=p.device, dtype=dtype)
        if key == "sign" and tuple(value.shape) != shape:
            value = _repacked_signs(value, p.numel(), self._sign_rows(p))
        if tuple(value.shape) != shape:
            raise ValueError(
                f"fused_optim: state[{key!r}] of a param of shape {tuple(p.shape)} has shape "
                f"{tuple(value.shape)}, expected {shape}"
            )
        return value

    def state_dict(self):
        """As torch.optim's, with each ``sign`` packed in its param's dim-0 rows (see
        _saved_sign_rows), a copy: under FSDP2 a DTensor split like the param."""
        sd = super().state_dict()
        saved_ids = [i for g in sd["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params, strict=True):
            state = sd["state"].get(saved_id)
            sign = state.get("sign") if isinstance(state, dict) else None
            rows = self._saved_sign_rows(p)
            if torch.is_tensor(sign) and _distributed.shard_key(p) is not None:
                local = _rows_from_window(sign, p)
                state["sign"] = _distributed.from_local_like(local, p, (rows[0], sign_words(rows[1])))
                continue
            if not torch.is_tensor(sign) or tuple(sign.shape) == (rows[0], sign_words(rows[1])):
                continue
            if _distributed.is_dtensor(sign):  # replicated: every rank repacks its whole copy
                local = _repacked_signs(sign.to_local(), p.numel(), rows)
                state["sign"] = _distributed.replicated_like(local, sign)
            else:
                state["sign"] = _repacked_signs(sign, p.numel(), rows)
        return sd

    def load_state_dict(self, state_dict):
        """As torch.optim's, but the factors stay float32 and the sign words int32: torch.optim
        casts every loaded state to its param's dtype, which would round sign words to float
        and factors of 16-bit params to 16 bits."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params, strict=True):
            saved = state_dict["state"].get(saved_id)
            if not isinstance(saved, dict):
                continue
            for key in _FACTORED_M + _FACTORED_V:
                value = saved.get(key)
                if torch.is_tensor(value):
                    dtype = self._state_dtype_of(p, key)
                    value = value.to(device=p.device, dtype=dtype, copy=True)
                    if key == "sign" and _distributed.shard_key(p) is not None:
                        value = self._window_signs(p, value, kernel_layout_ok=False)
                    self.state[p][key] = value

    def _make_run(self, backend, bucket, group, op_only: bool):
        """One process: the backend's own group object when it has one (the native one keeps the
        tensors in C++, as Adam's), else one call over the bucket's lists.
        Shards of FSDP2 params: the backend's step over this rank's runs of the square-matricized
        params adds their raw row and column sums to one flat buffer, reduced over the mesh with
        one all-reduce (shared with the other buckets: FusedOptimizer._step_in_lockstep), from
        which every rank writes the same new factors (SmmfSums.finish)."""
        if bucket.shard_key is None:
            make = None if op_only else getattr(backend, "smmf_group", None)
            if make is None:
                return super()._make_run(backend, bucket, group, op_only)
            return make(bucket.params, *self._lists(bucket.states))  # the native one: tensors in C++
        fn, params, lists = backend.smmf, bucket.params, self._lists(bucket.states)
        vector_reshape = group["vector_reshape"]
        dense = [is_dense(p, vector_reshape) for p in bucket.dtensors]
        numels = [-1 if d else p.numel() for p, d in zip(bucket.dtensors, dense, strict=True)]
        starts = [_distributed.flat_offset(p) for p in bucket.dtensors]
        shapes = [smmf_shape(n) for n in numels if n >= 0]
        layout = SmmfSums(shapes, bucket.device)
        row_ms, col_ms, _, row_vs, col_vs = lists[:5]
        key = bucket.shard_key

        def run(grads, **kw):
            # a generator: the optimizer all-reduces what it yields, with the other buckets' sums
            sums = layout.zeros()
            fn(params, grads, *lists, global_numels=numels, starts=starts, sums=sums, **kw)
            yield sums, key
            layout.finish(sums, row_ms, col_ms, row_vs, col_vs, found_inf=kw.get("found_inf"))

        return run

    @staticmethod
    def _lists(states) -> tuple:
        return tuple(states.get(k, []) for k in _FACTORED_M + _FACTORED_V + ("exp_avg", "exp_avg_sq", "step"))

    def _hyper(self, group) -> dict:
        beta = group["beta"]
        return dict(
            lr=kernel_lr(group["lr"]), beta=None if beta is None else float(beta), eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]), decay_rate=float(group["decay_rate"]),
            growth_rate=float(group["growth_rate"]), vector_reshape=bool(group["vector_reshape"]),
            decoupled=self.weight_decay_mode == "adamw",
        )  # fmt: skip


def _window_of(p) -> Window:
    """The run of the square-matricized matrix that this rank's shard of DTensor p holds."""
    return Window(*smmf_shape(p.numel()), _distributed.flat_offset(p), p.to_local().numel())


def _window_shape(p) -> tuple[int, int]:
    window = _window_of(p)
    return window.rows, sign_words(window.m)


def _window_from_rows(rows: torch.Tensor, p) -> torch.Tensor:
    """This rank's sign words in the kernels' layout from those of its dim-0 rows."""
    window = _window_of(p)
    if window.length == 0:
        return rows.new_zeros(_window_shape(p))
    bits = unpack_signs(rows, p.numel() // p.shape[0]).reshape(-1)
    return window.pack(bits)


def _rows_from_window(words: torch.Tensor, p) -> torch.Tensor:
    """The reverse: this rank's sign words packed in its dim-0 rows (the saved layout)."""
    local = p.to_local()
    row_len = p.numel() // p.shape[0]
    if local.numel() == 0:
        return words.new_zeros((local.shape[0], sign_words(row_len)))
    return pack_signs(_window_of(p).unpack(words).reshape(local.shape[0], row_len))


def _repacked_signs(words: torch.Tensor, numel: int, to: tuple[int, int]) -> torch.Tensor:
    """Sign words packed row by row in another row length (a sharded run's state loaded in one
    process, or the reverse) repacked in rows of to[1] elements; words of no such layout are
    returned as they are (the shape check names them)."""
    rows = words.shape[0] if words.dim() == 2 else 0
    if rows == 0 or numel % rows or words.shape[1] != sign_words(numel // rows):
        return words
    bits = unpack_signs(words, numel // rows).reshape(-1)
    return pack_signs(bits.reshape(to)) if to[0] else words.new_zeros((0, 0))


SMMF.__doc__ = SMMF.__doc__.format(
    FUSED_ARGS=FUSED_ARGS, FUSED_ATTRIBUTES=FUSED_ATTRIBUTES, FUSED_NOTES=FUSED_NOTES.strip()
)

__all__ = ["SMMF"]
