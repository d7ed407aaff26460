"""The distributed checks of tests/test_distributed.py, run on 2 ranks over gloo on 127.0.0.1:
`python tests/distributed_worker.py OUT.json [CASE ...]`. Every rank runs every case in the same
order (the cases' collectives must pair up); rank 0 writes {case: {"value": ..., "error": ...}}.
Each case compares a sharded run (FSDP2 fully_shard per layer, uneven shards, an empty one)
with a one-process run of the same optimizer on the same model, in the same process."""

import copy
import datetime
import json
import os
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

import fused_optim
import fused_optim.transformers

STEPS = 20


class Net(nn.Module):
    """Small, with every shape the optimizers treat differently: dim 0 not divisible by 2
    (uneven shards), a [1, 4] param (rank 1's shard is empty), a vector, a 3-D param."""

    def __init__(self, hidden: int = 7, depth: int = 1):
        super().__init__()
        self.inp = nn.Linear(5, hidden)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth - 1))
        self.out = nn.Linear(hidden, 3)
        self.row = nn.Parameter(torch.randn(1, 4))
        self.cube = nn.Parameter(torch.randn(3, 4, 6) * 0.5)
        self.wide = nn.Parameter(torch.randn(33, 40) * 0.2)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for block in self.blocks:
            h = torch.tanh(block(h))
        y = self.out(h)
        extra = torch.tanh(x[:, :4] * self.row).sum(1) + torch.tanh(self.wide[:, :5] @ x.T).mean(0)
        extra = extra + (torch.tanh(self.cube) ** 2).sum() * 0.01 * y[:, 0]
        return (y**2).mean() + extra.mean()


def shard(model: nn.Module, mesh=None) -> nn.Module:
    for module in [model.inp, *model.blocks, model.out]:
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def inputs(step: int) -> torch.Tensor:
    return torch.randn(6, 5, generator=torch.Generator().manual_seed(1000 + step))


def train(model, opt, steps, start=0, clip=None):
    for s in range(start, start + steps):
        model(inputs(s)).backward()
        if clip is not None:
            clip(model.parameters())
        opt.step()
        opt.zero_grad()


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def max_rel(sharded: nn.Module, single: nn.Module) -> float:
    """max over params of max|sharded - single| / max|single|."""
    worst = 0.0
    for a, b in zip(sharded.parameters(), single.parameters(), strict=True):
        a = full(a.detach())
        scale = b.detach().abs().max().clamp_min(1e-30)
        worst = max(worst, float((a - b.detach()).abs().max() / scale))
    return worst


OPTIMIZERS = {
    "Adam": lambda ps, **kw: fused_optim.Adam(ps, lr=1e-2, weight_decay=0.01, **kw),
    "AdamW": lambda ps, **kw: fused_optim.AdamW(ps, lr=1e-2, weight_decay=0.1, **kw),
    "AdamW-amsgrad": lambda ps, **kw: fused_optim.AdamW(ps, lr=1e-2, amsgrad=True, **kw),
    "AdaX": lambda ps, **kw: fused_optim.AdaX(ps, lr=1e-2, **kw),
    "AdaXW": lambda ps, **kw: fused_optim.AdaXW(ps, lr=1e-2, **kw),
    "Adafactor": lambda ps, **kw: fused_optim.Adafactor(ps, lr=1e-2, weight_decay=0.01, **kw),
    "HFAdafactor": lambda ps, **kw: fused_optim.transformers.Adafactor(ps, **kw),
    "HFAdafactor-beta1-lr": lambda ps, **kw: fused_optim.transformers.Adafactor(
        ps, lr=1e-2, relative_step=False, beta1=0.9, weight_decay=0.01, **kw
    ),
    "SMMF": lambda ps, **kw: fused_optim.SMMF(ps, lr=1e-2, weight_decay=0.01, **kw),
    "SMMF-nobeta": lambda ps, **kw: fused_optim.SMMF(ps, lr=1e-2, beta=None, decay_rate=-0.8, **kw),
    "SMMF-dense-adam": lambda ps, **kw: fused_optim.SMMF(
        ps, lr=1e-2, weight_decay=0.01, vector_reshape=False, weight_decay_mode="adam", **kw
    ),
}


def sharded_and_single(depth: int = 1):
    torch.manual_seed(0)
    single = Net(depth=depth)
    sharded = shard(copy.deepcopy(single))
    return sharded, single


def two_groups(params) -> list:
    """The matrices, and the other params in a group of their own with other hyper-parameters."""
    params = list(params)
    return [
        {"params": [p for p in params if p.dim() >= 2]},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.05},
    ]


def case_optimizer(name, clip, backend="auto", groups=False):
    sharded, single = sharded_and_single()
    kw = dict(max_grad_norm=clip, backend=backend)
    params_of = two_groups if groups else list
    train(sharded, OPTIMIZERS[name](params_of(sharded.parameters()), **kw), STEPS)
    train(single, OPTIMIZERS[name](params_of(single.parameters()), **kw), STEPS)
    return max_rel(sharded, single)


def case_hsdp(name, clip):
    """HSDP's 2-D mesh (replicate x shard; here 1 x 2): placements (Replicate(), Shard(0))."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("replicate", "shard"))
    torch.manual_seed(0)
    single = Net()
    sharded = shard(copy.deepcopy(single), mesh)
    assert len(next(sharded.parameters()).placements) == 2
    train(sharded, OPTIMIZERS[name](sharded.parameters(), max_grad_norm=clip), STEPS)
    train(single, OPTIMIZERS[name](single.parameters(), max_grad_norm=clip), STEPS)
    return max_rel(sharded, single)


def case_clip_grad_norm(norm_type):
    """fused_optim.clip_grad_norm_ on DTensor grads, then a fused AdamW step: parameters and
    the returned norms against one process."""
    sharded, single = sharded_and_single()
    norms = {"sharded": [], "single": []}

    def clip(which):
        def run(params):
            norm = fused_optim.clip_grad_norm_(params, 0.5, norm_type=norm_type)
            if which == "sharded":
                assert isinstance(norm, DTensor), type(norm)
            norms[which].append(full(norm))

        return run

    train(sharded, OPTIMIZERS["AdamW"](sharded.parameters()), STEPS, clip=clip("sharded"))
    train(single, OPTIMIZERS["AdamW"](single.parameters()), STEPS, clip=clip("single"))
    a, b = torch.stack(norms["sharded"]), torch.stack(norms["single"])
    return max(max_rel(sharded, single), float(((a - b).abs() / b).max()))


class _CountCollectives:
    """Counts the collectives called while active (the optimizer's step only)."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast")

    def __enter__(self):
        self.count, self.saved = 0, {n: getattr(dist, n) for n in self.NAMES}
        for name, fn in self.saved.items():
            setattr(dist, name, self._counting(fn))
        return self

    def _counting(self, fn):
        def wrapper(*args, **kwargs):
            self.count += 1
            return fn(*args, **kwargs)

        return wrapper

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def case_collectives(name, clip, groups=False):
    """Collectives in one step of a model with 2 and with 8 sharded layers: [small, large]."""
    counts = []
    for depth in (1, 7):
        sharded, _ = sharded_and_single(depth)
        params = two_groups(sharded.parameters()) if groups else sharded.parameters()
        opt = OPTIMIZERS[name](params, max_grad_norm=clip)
        train(sharded, opt, 1)
        sharded(inputs(1)).backward()
        with _CountCollectives() as c:
            opt.step()
        counts.append(c.count)
    return counts


def case_state_dict_full(name):
    """get_optimizer_state_dict(full_state_dict=True) of a sharded run equals the one-process
    state; it loads into a one-process optimizer, and a one-process one into a sharded one,
    and both go on as if uninterrupted."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    full_opts = StateDictOptions(full_state_dict=True)
    sharded, single = sharded_and_single()
    opt_sharded = OPTIMIZERS[name](sharded.parameters(), max_grad_norm=1.0)
    opt_single = OPTIMIZERS[name](single.parameters(), max_grad_norm=1.0)
    train(sharded, opt_sharded, 5)
    train(single, opt_single, 5)
    sd_sharded = get_optimizer_state_dict(sharded, opt_sharded, options=full_opts)
    sd_single = get_optimizer_state_dict(single, opt_single, options=full_opts)
    worst = 0.0
    assert sd_sharded["state"].keys() == sd_single["state"].keys()
    numels = {fqn: p.numel() for fqn, p in single.named_parameters()}
    for fqn, state in sd_single["state"].items():
        assert sd_sharded["state"][fqn].keys() == state.keys(), (fqn, state.keys())
        for key, value in state.items():
            other = sd_sharded["state"][fqn][key]
            assert not isinstance(other, DTensor), (fqn, key)
            if key == "sign":  # packed in other rows (the param's dim 0): compare the bits
                other, value = (_sign_bits(w, numels[fqn]) for w in (other, value))
            assert other.shape == value.shape, (fqn, key, other.shape, value.shape)
            worst = max(worst, float((other - value).abs().max() / value.abs().max().clamp_min(1e-30)))

    # the sharded state into a fresh one-process run, the one-process state into a fresh sharded run
    single2 = copy.deepcopy(single)
    with torch.no_grad():
        for p, q in zip(single2.parameters(), sharded.parameters(), strict=True):
            p.copy_(full(q))
    opt_single2 = OPTIMIZERS[name](single2.parameters(), max_grad_norm=1.0)
    # (copies: a state_dict holds the live `step` tensors, which a load would share)
    set_optimizer_state_dict(single2, opt_single2, copy.deepcopy(sd_sharded), options=full_opts)
    sharded2 = shard(copy.deepcopy(single))
    opt_sharded2 = OPTIMIZERS[name](sharded2.parameters(), max_grad_norm=1.0)
    set_optimizer_state_dict(sharded2, opt_sharded2, copy.deepcopy(sd_single), options=full_opts)
    runs = ((sharded, opt_sharded), (single, opt_single), (single2, opt_single2), (sharded2, opt_sharded2))
    for model, opt in runs:
        train(model, opt, 5, start=5)
    return max(worst, max_rel(sharded, single), max_rel(sharded, single2), max_rel(sharded2, single))


def _sign_bits(words, numel):
    """SMMF's sign words as one float per element, whatever rows they were packed in."""
    from fused_optim._reference.smmf import unpack_signs

    rows = words.shape[0]
    return unpack_signs(words, numel // rows).reshape(-1).float() if rows else words.new_zeros(0).float()


def case_load_one_process(name):
    """A one-process optimizer's state_dict loaded with load_state_dict into a sharded one (each
    rank cuts its shards), both going on 5 steps: the sharded params against the one-process."""
    sharded, single = sharded_and_single()
    opt_single = OPTIMIZERS[name](single.parameters(), max_grad_norm=1.0)
    train(single, opt_single, 5)
    with torch.no_grad():
        for p, q in zip(sharded.parameters(), single.parameters(), strict=True):
            p.to_local().copy_(
                distribute_tensor(q, p.device_mesh, p.placements, src_data_rank=None).to_local()
            )
    opt_sharded = OPTIMIZERS[name](sharded.parameters(), max_grad_norm=1.0)
    opt_sharded.load_state_dict(copy.deepcopy(opt_single.state_dict()))
    train(single, opt_single, 5, start=5)
    train(sharded, opt_sharded, 5, start=5)
    return max_rel(sharded, single)


def case_dcp_round_trip(name):
    """torch.distributed.checkpoint save and load of model + optimizer mid-run: the resumed
    sharded run is bit-identical to the uninterrupted one (returns the max difference)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    sharded, single = sharded_and_single()
    opt = OPTIMIZERS[name](sharded.parameters(), max_grad_norm=1.0)
    train(sharded, opt, 5)
    directory = tempfile.mkdtemp(prefix="fo-dcp-") if dist.get_rank() == 0 else None
    holder = [directory]
    dist.broadcast_object_list(holder)
    model_sd, optim_sd = get_state_dict(sharded, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=holder[0])
    train(sharded, opt, 5, start=5)

    resumed = shard(copy.deepcopy(single))  # fresh params and optimizer, then the checkpoint
    opt2 = OPTIMIZERS[name](resumed.parameters(), max_grad_norm=1.0)
    model_sd, optim_sd = get_state_dict(resumed, opt2)
    loaded = {"model": model_sd, "optim": optim_sd}
    dcp.load(loaded, checkpoint_id=holder[0])
    set_state_dict(resumed, opt2, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    train(resumed, opt2, 5, start=5)
    return max_rel(resumed, _unsharded(sharded))


def case_cross_layout(name):
    """Optimizer state moved between a one-process run (a plain model on every rank) and an FSDP2
    run, both ways, through a torch.distributed.checkpoint save/load and through
    set_optimizer_state_dict(full_state_dict=True, broadcast_from_rank0=True); each moved run
    goes on 5 steps beside the run it came from (max relative difference of the params)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        get_state_dict,
        set_optimizer_state_dict,
        set_state_dict,
    )

    def directory():
        holder = [tempfile.mkdtemp(prefix="fo-dcp-") if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(holder)
        return holder[0]

    def moved(src, opt, dst):
        """dst (a fresh model holding src's current params) with a fresh optimizer that loads
        src's optimizer state from a DCP checkpoint."""
        path = directory()
        model_sd, optim_sd = get_state_dict(src, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
        opt2 = OPTIMIZERS[name](dst.parameters(), max_grad_norm=1.0)
        model_sd, optim_sd = get_state_dict(dst, opt2)
        loaded = {"model": model_sd, "optim": optim_sd}
        dcp.load(loaded, checkpoint_id=path)
        set_state_dict(dst, opt2, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
        return opt2

    worst = 0.0
    sharded, single = sharded_and_single()
    opt_sharded = OPTIMIZERS[name](sharded.parameters(), max_grad_norm=1.0)
    opt_single = OPTIMIZERS[name](single.parameters(), max_grad_norm=1.0)
    train(sharded, opt_sharded, 5)
    train(single, opt_single, 5)
    into_sharded = shard(copy.deepcopy(single))
    opt_into_sharded = moved(single, opt_single, into_sharded)
    into_single = _unsharded(sharded)
    opt_into_single = moved(sharded, opt_sharded, into_single)
    broadcast = shard(copy.deepcopy(single))
    opt_broadcast = OPTIMIZERS[name](broadcast.parameters(), max_grad_norm=1.0)
    full_sd = get_optimizer_state_dict(single, opt_single, options=StateDictOptions(full_state_dict=True))
    set_optimizer_state_dict(
        broadcast, opt_broadcast, copy.deepcopy(full_sd) if dist.get_rank() == 0 else {},
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
    )  # fmt: skip
    runs = [(sharded, opt_sharded), (single, opt_single), (into_sharded, opt_into_sharded)]
    runs += [(into_single, opt_into_single), (broadcast, opt_broadcast)]
    for model, opt in runs:
        train(model, opt, 5, start=5)
    for a, b in ((into_sharded, single), (sharded, into_single), (broadcast, single)):
        worst = max(worst, max_rel(a, b))
    return worst


def case_smmf_state_layout():
    """SMMF's state under FSDP2: the factors are plain tensors of the whole square-matricized
    param, identical on every rank; the kernels' sign words a plain tensor of the matrix rows the
    rank's run of elements touches; state_dict()'s sign words a DTensor split as the param is,
    packed in the param's own rows. Returns what differs from that (nothing when right)."""
    from fused_optim._distributed import flat_offset
    from fused_optim._reference.smmf import Window, sign_words, smmf_shape

    sharded, _ = sharded_and_single()
    opt = OPTIMIZERS["SMMF"](sharded.parameters())
    train(sharded, opt, 3)
    saved = opt.state_dict()["state"]
    wrong = []
    for i, (name, p) in enumerate(sharded.named_parameters()):
        state = opt.state[p]
        n, m = smmf_shape(p.numel())
        for key, length in (("row_m", n), ("col_m", m), ("row_v", n), ("col_v", m)):
            t = state[key]
            gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, t)
            if isinstance(t, DTensor) or t.shape != (length,) or not all(torch.equal(t, o) for o in gathered):
                wrong.append(f"{name}.{key}")
        window = Window(n, m, flat_offset(p), p.to_local().numel())
        if isinstance(state["sign"], DTensor) or state["sign"].shape != (window.rows, sign_words(m)):
            wrong.append(f"{name}.sign (kernels' layout)")
        sign = saved[i]["sign"]
        expected = (p.shape[0], sign_words(p.numel() // p.shape[0]))
        if not isinstance(sign, DTensor) or sign.placements != p.placements or sign.shape != expected:
            wrong.append(f"{name}.sign (saved)")
        elif sign.to_local().shape[0] != p.to_local().shape[0]:
            wrong.append(f"{name}.sign local rows")
    return wrong


def _unsharded(model):
    copy_ = Net()
    with torch.no_grad():
        for p, q in zip(copy_.parameters(), model.parameters(), strict=True):
            p.copy_(full(q))
    return copy_


def case_ddp(name, clip):
    """DDP: replicated plain params, the fused step unchanged."""
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    single = Net()
    ddp = DistributedDataParallel(copy.deepcopy(single))
    train(ddp, OPTIMIZERS[name](ddp.parameters(), max_grad_norm=clip), STEPS)
    train(single, OPTIMIZERS[name](single.parameters(), max_grad_norm=clip), STEPS)
    return max_rel(ddp.module, single)


def case_error_order(name):
    """A group whose step fails (a two-element lr tensor, refused by the kernels before they
    change anything) beside a group of sharded params and one of plain params: which groups
    stepped, [one process, FSDP2] for the failing group 0, then 1; they must agree."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    a, b, grad_a, grad_b = torch.randn(6, 4), torch.randn(5, 5), torch.randn(6, 4), torch.randn(5, 5)
    outcome = []
    for bad in (0, 1):
        stepped = []
        for sharded in (False, True):
            pa = nn.Parameter(distribute_tensor(a, mesh, [Shard(0)]) if sharded else a.clone())
            pa.grad = distribute_tensor(grad_a, mesh, [Shard(0)]) if sharded else grad_a.clone()
            pb = nn.Parameter(b.clone())  # a plain param, the same on every rank
            pb.grad = grad_b.clone()
            opt = OPTIMIZERS[name]([{"params": [pa]}, {"params": [pb]}])
            opt.param_groups[bad]["lr"] = torch.tensor([0.1, 0.2])
            try:
                opt.step()
            except RuntimeError:
                pass
            else:
                raise AssertionError("the step did not fail")
            whole = pa.full_tensor() if sharded else pa
            stepped.append([not torch.equal(whole.detach(), a), not torch.equal(pb.detach(), b)])
        outcome.append(stepped)
    return outcome


def case_refusals():
    """What the optimizers refuse on DTensors, with the messages (one per check)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial, Replicate, Shard

    mesh = init_device_mesh("cpu", (2,))
    messages = {}

    def refused(key, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001  (the type is part of the result)
            messages[key] = f"{type(e).__name__}: {e}"
        else:
            messages[key] = None

    weight = nn.Parameter(distribute_tensor(torch.randn(6, 4), mesh, [Shard(0)]))
    partial = nn.Parameter(DTensor.from_local(torch.randn(6, 4), mesh, [Partial()]))
    partial.grad = DTensor.from_local(torch.randn(6, 4), mesh, [Partial()])
    refused("partial param", lambda: fused_optim.AdamW([partial]).step())
    weight.grad = distribute_tensor(torch.randn(6, 4), mesh, [Replicate()])
    before = weight.to_local().clone()
    refused("replicated grad", lambda: fused_optim.AdamW([weight]).step())
    messages["param unchanged"] = bool(torch.equal(before, weight.to_local()))
    weight.grad = torch.randn(6, 4)
    refused("plain grad", lambda: fused_optim.AdamW([weight]).step())
    # Shard(1) (tensor parallel): elementwise optimizers step it shard by shard
    torch.manual_seed(1)
    plain = nn.Parameter(torch.randn(4, 6))
    plain.grad = torch.randn(4, 6)
    column = nn.Parameter(distribute_tensor(plain.detach(), mesh, [Shard(1)]))
    column.grad = distribute_tensor(plain.grad, mesh, [Shard(1)])
    refused("Shard(1) AdamW", lambda: fused_optim.AdamW([column], lr=0.1, max_grad_norm=1.0).step())
    fused_optim.AdamW([plain], lr=0.1, max_grad_norm=1.0).step()
    messages["Shard(1) AdamW max diff"] = float((column.full_tensor() - plain).detach().abs().max())
    column.grad = distribute_tensor(torch.ones(4, 6), mesh, [Shard(1)])
    refused("Shard(1) Adafactor", lambda: fused_optim.Adafactor([column]).step())
    refused("Shard(1) SMMF", lambda: fused_optim.SMMF([column]).step())
    return messages


def cases() -> dict:
    """name -> a function of no arguments; the same on every rank."""
    out = {}
    for name in OPTIMIZERS:
        for clip in (None, 0.1):
            out[f"fsdp-{name}-clip{clip}"] = lambda n=name, c=clip: case_optimizer(n, c)
    for backend in ("reference", "triton"):
        for name in ("AdamW", "Adafactor", "HFAdafactor-beta1-lr", "SMMF"):
            out[f"fsdp-{name}-clip0.1-{backend}"] = lambda n=name, b=backend: case_optimizer(n, 0.1, b)
    for name in ("AdamW", "Adafactor", "SMMF"):
        out[f"hsdp-{name}-clip0.1"] = lambda n=name: case_hsdp(n, 0.1)
    for norm_type in (2.0, 3.0, float("inf")):
        out[f"clip_grad_norm-{norm_type}"] = lambda t=norm_type: case_clip_grad_norm(t)
    for name in ("AdamW", "Adafactor", "HFAdafactor", "SMMF"):
        out[f"collectives-{name}-clip1.0"] = lambda n=name: case_collectives(n, 1.0)
        out[f"collectives-{name}-clipNone"] = lambda n=name: case_collectives(n, None)
        out[f"collectives-{name}-groups"] = lambda n=name: case_collectives(n, None, groups=True)
    for name in ("Adafactor", "HFAdafactor-beta1-lr", "SMMF"):
        out[f"fsdp-{name}-groups"] = lambda n=name: case_optimizer(n, 0.1, groups=True)
    for name in ("AdamW", "Adafactor", "HFAdafactor-beta1-lr", "SMMF", "SMMF-dense-adam"):
        out[f"state_dict_full-{name}"] = lambda n=name: case_state_dict_full(n)
        out[f"dcp-{name}"] = lambda n=name: case_dcp_round_trip(n)
        out[f"load_one_process-{name}"] = lambda n=name: case_load_one_process(n)
    for name in ("AdamW", "Adafactor", "SMMF"):
        out[f"cross-layout-{name}"] = lambda n=name: case_cross_layout(n)
    out["smmf-state-layout"] = case_smmf_state_layout
    out["ddp-AdamW-clip0.1"] = lambda: case_ddp("AdamW", 0.1)
    out["refusals"] = case_refusals
    for name in ("AdamW", "Adafactor", "SMMF"):
        out[f"error-order-{name}"] = lambda n=name: case_error_order(n)
    return out


def worker(rank: int, world: int, port: int, out: str, selected: list) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    results = {}
    for name, run in cases().items():
        if selected and name not in selected:
            continue
        if name.endswith("-triton") and os.environ.get("TRITON_INTERPRET") != "1":
            continue
        try:
            results[name] = {"value": run(), "error": None}
        except Exception:
            results[name] = {"value": None, "error": traceback.format_exc()}
        dist.barrier()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


def main() -> None:
    out, selected = sys.argv[1], sys.argv[2:]
    import socket

    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port, out, selected), nprocs=2)


if __name__ == "__main__":
    main()
