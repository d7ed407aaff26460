"""clip_grad_norm_: torch.nn.utils.clip_grad_norm_ semantics, multi-tensor and without a host
sync (unless error_if_nonfinite=True, which must look at the norm, as torch's does)."""

import functools
import math
from collections import defaultdict

import torch

from fused_optim import _backends, _distributed
from fused_optim._reference import clip as _reference_clip
from fused_optim._reference.adam import has_values


def _validate_norm_type(norm_type) -> float:
    norm_type = float(norm_type)
    if math.isnan(norm_type):
        raise ValueError(f"norm_type must be a number or +-inf, got {norm_type}")
    return norm_type


def _validate_max_norm(max_norm):
    """max_norm as torch takes it (it calls float(max_norm)): a Python or numpy number, or a
    one-element tensor, kept as a 0-d tensor (its coefficient is computed with torch ops, with no
    host sync). Negative and NaN values go through, with torch's results."""
    if isinstance(max_norm, torch.Tensor):
        if max_norm.numel() != 1:
            raise ValueError("only one element tensors can be converted to Python scalars (max_norm)")
        return max_norm.reshape(())
    return float(max_norm)


def _rounds(tensors):
    """Splits a list holding some tensors more than once into rounds of distinct tensors, the
    k-th occurrence of each in round k (order kept within a round)."""
    rounds, seen = [], defaultdict(int)
    for t in tensors:
        k = seen[id(t)]
        seen[id(t)] = k + 1
        if k == len(rounds):
            rounds.append([])
        rounds[k].append(t)
    return rounds


def _scale_(backend, tensors, coef) -> None:
    try:
        backend.scale_(tensors, coef)
    except RuntimeError as e:
        # Distinct tensors over shared memory (views of one grad): the fused scale_ refuses them
        # before writing anything. torch multiplies such memory once per occurrence, one tensor
        # after the other: do so (rare, so a call per tensor).
        if "overlap in memory" not in str(e):
            raise
        for t in tensors:
            backend.scale_([t], coef)


def _torch_total_norm(grads, norm_type: float, first_device) -> torch.Tensor:
    """torch's own algorithm with torch ops (no host sync, any backend) for the rare norm types
    the kernels do not take: 0 (per tensor the count of nonzeros; in total the number of tensors
    with one), negative p and -inf (min |x|). Per-tensor norms with torch._foreach_norm per
    (device, dtype), then vector_norm of them stacked, as torch does; 16-bit grads are normed in
    fp32 (torch rounds their per-tensor norms to 16 bits). Empty grads contribute nothing (torch
    refuses the -inf or negative norm of an empty tensor), as for the inf-norm."""
    groups = defaultdict(list)
    for g in grads:
        if g.numel() > 0:
            groups[(g.device, g.dtype)].append(g)
    if not groups:
        return torch.zeros((), device=first_device)
    norms = []
    for (_, dtype), gs in groups.items():
        wide = dtype if dtype == torch.float64 else torch.float32
        norms.extend(torch._foreach_norm(gs, norm_type, dtype=wide))
    return torch.linalg.vector_norm(torch.stack([n.to(first_device) for n in norms]), norm_type)


@torch.no_grad()
def clip_grad_norm_(
    parameters,
    max_norm,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Clips the gradients of ``parameters`` in place so their joint norm is at most
    ``max_norm``, like :func:`torch.nn.utils.clip_grad_norm_`, fused and without a host sync.

    .. code-block:: text

        total_norm = norm_type-norm of all grads joined into one vector
        coef = min(1, max_norm / (total_norm + 1e-6))
        grad = grad * coef                        (for every grad)

    One deterministic multi-tensor norm (fixed-order reduction) and one in-place scale per
    device, whatever the number of grads.

    Args:
        parameters (Tensor or iterable of Tensors): the params whose ``.grad`` is clipped.
        max_norm (float or Tensor): the norm to clip to; a number or a one-element tensor
            (negative and NaN values behave as in torch).
        norm_type (float, optional): the p of the p-norm: any positive number, ``inf``, 0,
            a negative number or ``-inf`` (default: 2.0). 0 and negative orders are computed
            with torch ops, as torch does, not with the fused kernels.
        error_if_nonfinite (bool, optional): raise if the norm is inf or NaN; this reads the
            norm on the host, one sync (default: False).
        foreach (bool, optional): accepted for compatibility and ignored.
        backend (str, optional): ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"`` or
            ``"reference"`` (default: ``"auto"``; ``FUSED_OPTIM_BACKEND`` overrides it).

    Returns:
        Total norm of the gradients before clipping, a 0-d tensor in the dtype torch returns
        (the promotion of the grads' dtypes), computed in fp32 (fp64 for fp64 grads).

    Differences from torch: 16-bit grads are normed in fp32 (torch rounds per-tensor norms to
    16 bits); empty grads contribute nothing (torch refuses the inf- or negative-order norm of
    an empty grad). A grad listed twice is counted and scaled twice, as in torch.

    Example:
        >>> loss.backward()
        >>> norm = fused_optim.clip_grad_norm_(model.parameters(), max_norm=1.0)
        >>> opt.step()
    """
    norm_type = _validate_norm_type(norm_type)
    max_norm = _validate_max_norm(max_norm)
    _backends.check_name(backend)
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    # DTensor grads (FSDP2): the kernels run on the local shards; the norms of sharded ones
    # are combined over the mesh with one all-reduce of a scalar.
    dtensor = _distributed.any_dtensor(grads)
    if dtensor and norm_type <= 0.0:
        raise NotImplementedError(
            f"fused_optim.clip_grad_norm_: norm_type={norm_type} is not supported for DTensor grads "
            "(positive orders and inf are)"
        )
    parts = defaultdict(list)  # (device, shard key) -> local grads
    if dtensor:
        for g in grads:
            parts[(g.device, _distributed.shard_key(g))].append(_distributed.local(g))
    else:
        for g in grads:
            parts[(g.device, None)].append(g)
    by_device = defaultdict(list)
    for (d, _), gs in parts.items():
        by_device[d].extend(gs)
    dtypes = {d: {g.dtype for g in gs} for d, gs in by_device.items()}
    # torch's result dtype: per-(device, dtype) norms in the grads' dtypes, stacked (promoted)
    out_dtype = functools.reduce(torch.promote_types, set().union(*dtypes.values()))
    names = {}  # the backend per device; auto takes a dtype the kernels do not take to the reference
    for d, dts in dtypes.items():
        odd_dtype = next((dt for dt in dts if dt not in _backends.KERNEL_DTYPES), None)
        names[d] = _backends.resolve(backend, d, odd_dtype)
    backends = {d: _backends._load(name) for d, name in names.items()}
    if not has_values(grads[0]):  # meta / FakeTensor: shapes only, through the fake impls
        backends = {d: _backends.for_tracing() for d in names}
    first = grads[0].device

    coef = None  # the kernels' coefficient, when it is the one to use
    if norm_type > 0.0:  # positive and inf: the kernels
        results = []  # (norm, coef or None, shard key) per part
        for (d, key), gs in parts.items():
            if names[d] == "reference" and torch.float64 in dtypes[d]:
                # fp64 grads: the norm in fp64, not rounded to the fp32 that global_norm returns
                results.append((_reference_clip.total_norm(gs, norm_type), None, key))
            else:
                m = max_norm if isinstance(max_norm, float) else 1.0
                results.append((*backends[d].global_norm(gs, norm_type, m, None), key))
        if len(results) == 1 and results[0][2] is None:
            total_norm, fused_coef, _ = results[0]
            if fused_coef is not None and total_norm.dtype == out_dtype and isinstance(max_norm, float):
                coef = fused_coef  # the common case: the kernels' finalize computed it
        elif not dtensor:  # several devices: combine the per-device norms on the first one, like torch
            norms = torch.stack([n.to(first) for n, _, _ in results])
            total_norm = torch.linalg.vector_norm(norms, norm_type)
        else:
            total_norm = _distributed.combine_norms([(n, key) for n, _, key in results], norm_type, first)
    else:
        total_norm = _torch_total_norm(grads, norm_type, first)
    if total_norm.dtype != out_dtype:
        total_norm = total_norm.to(out_dtype)

    if error_if_nonfinite and not torch.isfinite(total_norm).item():
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it "
            "cannot be clipped. To disable this error and scale the gradients by the non-finite norm "
            "anyway, set `error_if_nonfinite=False`"
        )
    if coef is None:  # torch's formula on the norm it returns, in its dtype
        if isinstance(max_norm, torch.Tensor):
            max_norm = max_norm.to(device=first, dtype=torch.promote_types(out_dtype, torch.float32))
        coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    for d, gs in by_device.items():
        # the kernels take a float32 coef; the reference any float dtype (float64 for its grads)
        c = coef.to(d) if names[d] == "reference" else coef.to(device=d, dtype=torch.float32)
        # A grad listed twice is scaled twice, as by torch, in separate rounds (one call each):
        # one call scales its tensors in parallel. Only repeated grads make a second round.
        rounds = [gs] if len(set(map(id, gs))) == len(gs) else _rounds(gs)
        for r in rounds:
            _scale_(backends[d], r, c)
    if dtensor:  # as torch returns it for DTensor grads: replicated on the grads' mesh
        return _distributed.replicated_like(total_norm, next(g for g in grads if _distributed.is_dtensor(g)))
    return total_norm
