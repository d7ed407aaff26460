"""DTensor params (FSDP2's fully_shard, tensor parallelism): the fused kernels run on each rank's
local shard, and what spans shards is reduced across the mesh with one small collective per
step (per mesh and set of sharded mesh dims), never per tensor."""

import functools
import math
import sys

import torch


def _dtensor_class():
    # Anyone holding a DTensor has imported torch.distributed.tensor; nobody else pays for it.
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def is_dtensor(t) -> bool:
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def any_dtensor(tensors) -> bool:
    cls = _dtensor_class()
    return cls is not None and any(isinstance(t, cls) for t in tensors)


def local(t):
    """The rank's shard of a DTensor (the same memory: in-place updates reach the DTensor)."""
    return t._local_tensor if is_dtensor(t) else t


def locals_of(tensors: list) -> list:
    cls = _dtensor_class()
    if cls is None:
        return tensors
    return [t._local_tensor if isinstance(t, cls) else t for t in tensors]


def check_placements(p, where: str, *, only_dim0: bool = False) -> None:
    """Shard(d) and Replicate placements are stepped shard by shard; a Partial param (a sum
    still to be reduced) cannot be. only_dim0: the optimizer reduces statistics that span rows
    (Adafactor, SMMF) for Shard(0) only, FSDP2's layout."""
    from torch.distributed.tensor import Replicate, Shard

    for placement in p.placements:
        if isinstance(placement, Replicate):
            continue
        if isinstance(placement, Shard) and (placement.dim == 0 or not only_dim0):
            continue
        wanted = "Shard(0) (FSDP2) or Replicate" if only_dim0 else "Shard(dim) or Replicate"
        raise NotImplementedError(
            f"fused_optim: {where} is a DTensor with placements {tuple(p.placements)}; this "
            f"optimizer steps DTensor params whose placements are {wanted}"
        )


def shard_key(t):
    """What a DTensor's partial sums must be reduced over: (mesh, sharded mesh dims), or None
    for a plain tensor or one replicated on every mesh dim (its local values are the whole)."""
    if not is_dtensor(t):
        return None
    dims = tuple(i for i, placement in enumerate(t.placements) if placement.is_shard())
    return (t.device_mesh, dims) if dims else None


def flat_offset(p) -> int:
    """Where DTensor p's local shard starts in the flattened global tensor, for Shard(0) and
    Replicate placements (the shard is then a contiguous run of it)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return offset[0] * math.prod(p.shape[1:]) if p.dim() else 0


def all_reduce(t: torch.Tensor, key, op: str = "sum") -> torch.Tensor:
    """Reduces t in place over the mesh dims of `key` (from shard_key): one collective per
    sharded mesh dim (one under FSDP2), whatever t holds."""
    if key is None:
        return t
    import torch.distributed as dist

    mesh, dims = key
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    for dim in dims:
        dist.all_reduce(t, op=reduce_op, group=mesh.get_group(dim))
    return t


def all_reduce_together(parts: list, key) -> None:
    """Sums each float64 tensor of `parts` over the mesh of `key` in place, with one collective
    (per sharded mesh dim) for all of them."""
    if len(parts) == 1:
        all_reduce(parts[0], key)
        return
    flat = all_reduce(torch.cat([t.reshape(-1) for t in parts]), key)
    for t, part in zip(parts, flat.split([t.numel() for t in parts]), strict=True):
        t.copy_(part.view_as(t))


def grad_mismatch(grads: list, params: list) -> str | None:
    """Says which grad of a DTensor param is not laid out as its param (FSDP2 reduce-scatters
    grads so; the kernels pair local shards element by element), or None when all are."""
    for i, (g, p) in enumerate(zip(grads, params, strict=True)):
        if is_dtensor(p) and (not is_dtensor(g) or g.placements != p.placements):
            got = f"a DTensor with placements {tuple(g.placements)}" if is_dtensor(g) else "a plain tensor"
            return (
                f"the grad of params[{i}] is {got} but its param is a DTensor with placements "
                f"{tuple(p.placements)}; reduce or redistribute the grad to the param's placements first"
            )
    return None


def like_param(value: torch.Tensor, p) -> torch.Tensor:
    """A state tensor for DTensor param p from `value`: a DTensor laid out as p (a plain tensor of
    p's global shape, e.g. from a one-process state_dict, is cut into this rank's shard without
    communication; a DTensor of other placements is redistributed)."""
    from torch.distributed.tensor import distribute_tensor

    if is_dtensor(value):
        if value.device_mesh == p.device_mesh and value.placements == p.placements:
            return value
        return value.redistribute(p.device_mesh, p.placements)
    return distribute_tensor(value.to(p.device), p.device_mesh, p.placements, src_data_rank=None)


def from_local_like(local: torch.Tensor, p, shape) -> torch.Tensor:
    """A DTensor of global `shape` from this rank's `local` part, split on dim 0 as p is."""
    from torch.distributed.tensor import DTensor

    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=shape, stride=stride)


def replicated_like(t: torch.Tensor, like):
    """t (the same value on every rank) as a DTensor replicated on `like`'s mesh."""
    from torch.distributed.tensor import DTensor, Replicate

    mesh = like.device_mesh
    return DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False)


def combine_norms(parts: list, norm_type: float, device: torch.device) -> torch.Tensor:
    """The norm of the union of disjoint sets of tensors, from (norm, shard_key) per set: for a
    sharded set (shard_key not None) the norm of this rank's shards, combined over the mesh
    with one all-reduce of a scalar. Returned on `device`, in the widest of the norms' dtypes.
    Powers are summed in float64 (a float32 norm of 1e20 squared would overflow)."""
    dtype = functools.reduce(torch.promote_types, [n.dtype for n, _ in parts])
    if len(parts) == 1 and parts[0][1] is None:
        return parts[0][0].to(device)
    if norm_type == float("inf"):
        maxima = [all_reduce(n.clone(), key, "max").to(device) for n, key in parts]
        return torch.stack(maxima).amax().to(dtype)
    powers = [all_reduce(n.double() ** norm_type, key).to(device) for n, key in parts]
    return (torch.stack(powers).sum() ** (1.0 / norm_type)).to(dtype)
