"""The optimizer classes as drop-in replacements for torch.optim: same results, state_dicts
that load both ways, schedulers, tensor lr, param groups, GradScaler, clipping, odd params."""

import copy
from types import SimpleNamespace

import pytest
import torch
from conftest import backend_device_params, random_tensors

import fused_optim

SHAPES = [(), (1,), (7,), (33, 17), (4097,), (2, 3, 5), (0,)]


def _params(device="cpu", dtype=torch.float32, seed=0):
    return [torch.nn.Parameter(t) for t in random_tensors(SHAPES, dtype, device, seed)]


def _grads(params, step):
    return random_tensors([p.shape for p in params], params[0].dtype, params[0].device, 1000 + step)


def _step(opt, params, step):
    for p, g in zip(params, _grads(params, step), strict=True):
        p.grad = g
    opt.step()


def _max_rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() if b.numel() else 0.0


# (fused class, torch class, kwargs)
PAIRS = [
    (fused_optim.AdamW, torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.01)),
    (fused_optim.AdamW, torch.optim.AdamW, dict(lr=3e-3, betas=(0.8, 0.99), amsgrad=True, maximize=True)),
    (fused_optim.Adam, torch.optim.Adam, dict(lr=1e-3)),
    (fused_optim.Adam, torch.optim.Adam, dict(lr=2e-3, weight_decay=0.1, amsgrad=True)),
]
PAIR_IDS = ["AdamW", "AdamW-amsgrad-maximize", "Adam", "Adam-L2-amsgrad"]


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("ours_cls,torch_cls,kwargs", PAIRS, ids=PAIR_IDS)
def test_matches_torch_to_1e6_relative_after_100_fp32_steps(backend, device, ours_cls, torch_cls, kwargs):
    ours = _params(device)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = ours_cls(ours, **kwargs, backend=backend)
    ref = torch_cls(theirs, **kwargs, foreach=False)
    for step in range(100):
        _step(opt, ours, step)
        _step(ref, theirs, step)
    for p, q in zip(ours, theirs, strict=True):
        assert _max_rel_err(p.detach(), q.detach()) < 1e-6
        for k in ("exp_avg", "exp_avg_sq"):
            assert _max_rel_err(opt.state[p][k], ref.state[q][k]) < 1e-6
        assert opt.state[p]["step"].item() == ref.state[q]["step"].item() == 100


@pytest.mark.parametrize("ours_cls,torch_cls,kwargs", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("direction", ["torch->fused", "fused->torch"])
def test_state_dict_interchanges_with_torch(ours_cls, torch_cls, kwargs, direction):
    first_cls, second_cls = (torch_cls, ours_cls) if direction == "torch->fused" else (ours_cls, torch_cls)
    a = _params()
    opt_a = first_cls(a, **kwargs)
    for step in range(3):
        _step(opt_a, a, step)
    b_params = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_b = second_cls(b_params, **kwargs)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    assert opt_b.state_dict()["param_groups"][0]["lr"] == kwargs["lr"]
    for step in range(3, 6):
        _step(opt_a, a, step)
        _step(opt_b, b_params, step)
    for p, q in zip(a, b_params, strict=True):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-6, atol=1e-7)
        assert set(opt_a.state[p]) == set(opt_b.state[q])
        assert opt_b.state[q]["step"].item() == 6
    if second_cls is torch.optim.AdamW:
        assert opt_b.param_groups[0]["decoupled_weight_decay"] is True


def test_lr_scheduler_and_param_groups_match_torch():
    ours, theirs = _params(), _params()
    groups = lambda ps: [{"params": ps[:3], "weight_decay": 0.0}, {"params": ps[3:], "lr": 5e-3}]  # noqa: E731
    opt = fused_optim.AdamW(groups(ours), lr=1e-3)
    ref = torch.optim.AdamW(groups(theirs), lr=1e-3, foreach=False)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[1e-2, 2e-2], total_steps=20)
    ref_sched = torch.optim.lr_scheduler.OneCycleLR(ref, max_lr=[1e-2, 2e-2], total_steps=20)
    for step in range(20):
        _step(opt, ours, step)
        _step(ref, theirs, step)
        sched.step()
        ref_sched.step()
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref.param_groups]
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_tensor_lr_equals_float_lr_and_follows_in_place_changes(backend, device):
    a, b = _params(device), _params(device)
    lr = torch.tensor(2.0**-10, device=device)  # exactly representable: results must be identical
    opt_t = fused_optim.AdamW(a, lr=lr, backend=backend)
    opt_f = fused_optim.AdamW(b, lr=2.0**-10, backend=backend)
    for step in range(4):
        if step == 2:
            lr.fill_(2.0**-8)  # what a scheduler does to a tensor lr
            opt_f.param_groups[0]["lr"] = 2.0**-8
        _step(opt_t, a, step)
        _step(opt_f, b, step)
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_params_without_grads_are_left_alone(backend, device):
    ps = _params(device)
    opt = fused_optim.AdamW(ps, lr=1e-2, backend=backend)
    before = [p.detach().clone() for p in ps]
    for i, (p, g) in enumerate(zip(ps, _grads(ps, 0), strict=True)):
        p.grad = g if i % 2 == 0 else None
    opt.step()
    for i, (p, b) in enumerate(zip(ps, before, strict=True)):
        if i % 2 == 1:
            assert torch.equal(p.detach(), b) and p not in opt.state
        elif p.numel():
            assert not torch.equal(p.detach(), b) and opt.state[p]["step"].item() == 1


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_non_contiguous_params_match_torch(backend, device):
    base = torch.randn(40, 30, device=device)
    ours = [
        torch.nn.Parameter(base.clone().t()),  # dense, transposed strides
        torch.nn.Parameter(base.clone()[:, ::3]),  # not dense in memory
        torch.nn.Parameter(base.clone().unsqueeze(-1).expand(40, 30, 1)[..., 0]),
    ]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = fused_optim.AdamW(ours, lr=1e-2, backend=backend)
    ref = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
    for step in range(3):
        for p, q, g in zip(ours, theirs, _grads(ours, step), strict=True):
            p.grad, q.grad = g.contiguous(), g.clone()  # grads with other strides than the params
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


def _scaler_run(opt_factory, inf_at):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    opt = opt_factory(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    x = torch.randn(4, 8)
    snapshots = []
    for step in range(6):
        opt.zero_grad()
        loss = model(x).square().mean()
        if step == inf_at:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        before = copy.deepcopy((list(model.parameters()), opt.state_dict()["state"]))
        scaler.step(opt)
        scaler.update()
        snapshots.append((before, copy.deepcopy((list(model.parameters()), opt.state_dict()["state"]))))
    return model, snapshots, scaler


def test_grad_scaler_skips_inf_steps_and_matches_torch_fused():
    ours, snaps, scaler = _scaler_run(lambda ps: fused_optim.AdamW(ps, lr=1e-2), inf_at=2)
    theirs, _, ref_scaler = _scaler_run(lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True), inf_at=2)
    (params_before, state_before), (params_after, state_after) = snaps[2]
    for p, q in zip(params_before, params_after, strict=True):
        assert torch.equal(p, q)  # skipped: params untouched
    for k in state_before:
        for name in state_before[k]:
            assert torch.equal(state_before[k][name], state_after[k][name])  # ... and state too
    assert scaler.get_scale() == ref_scaler.get_scale() < 256.0
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_grad_scaler_with_clipping_clips_the_unscaled_gradients():
    ours, _, _ = _scaler_run(lambda ps: fused_optim.AdamW(ps, lr=1e-2, max_grad_norm=0.05), inf_at=-1)

    # torch: unscale, clip, step
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    x = torch.randn(4, 8)
    for _ in range(6):
        opt.zero_grad()
        scaler.scale(model(x).square().mean()).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        scaler.step(opt)
        scaler.update()
    for p, q in zip(ours.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_max_grad_norm_equals_torch_clip_then_step(backend, device):
    ours = _params(device)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = fused_optim.AdamW(ours, lr=1e-2, max_grad_norm=1.0, backend=backend)
    ref = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
    for step in range(5):
        grads = _grads(ours, step)
        for p, q, g in zip(ours, theirs, grads, strict=True):
            p.grad, q.grad = g, g.clone()
        opt.step()
        norm = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        ref.step()
        torch.testing.assert_close(opt.last_grad_norm, norm, rtol=1e-5, atol=0)
        for p, g in zip(ours, grads, strict=True):
            assert p.grad is g  # the fused path never rewrites the gradients
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


def test_float64_params_fall_back_to_the_reference_under_auto():
    ps = _params(dtype=torch.float64)
    opt = fused_optim.AdamW(ps, lr=1e-3, max_grad_norm=1.0)
    _step(opt, ps, 0)
    assert opt.state[ps[2]]["exp_avg"].dtype == torch.float64


def test_closure_is_called_with_grad_enabled():
    p = torch.nn.Parameter(torch.ones(3))
    opt = fused_optim.AdamW([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p * 2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 6.0
    assert (p < 1).all()


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_cached_plan_follows_moved_params_and_changed_grad_layouts(backend, device):
    """The fused path keeps each bucket's plan between steps; it must notice a param whose
    .data was replaced (model.to(), weight re-tying) and a grad whose layout changed."""
    ours = [torch.nn.Parameter(t) for t in random_tensors([(6, 5), (40,), (3, 3)], torch.float32, device, 1)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = fused_optim.AdamW(ours, lr=1e-2, backend=backend)
    ref = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
    for step in range(6):
        if step == 2:
            for p, q in zip(ours, theirs, strict=True):
                p.data = p.data.clone()  # new storage under the same Parameter
                q.data = q.data.clone()
        grads = _grads(ours, step)
        for p, q, g in zip(ours, theirs, grads, strict=True):
            if step == 4 and g.dim() == 2:
                g = g.t().contiguous().t()  # same values, transposed strides
            p.grad, q.grad = g, g.clone()
        opt.step()
        ref.step()
        for p, q in zip(ours, theirs, strict=True):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


def test_sharded_buckets_step_in_lockstep_and_stop_at_a_failing_one():
    """FSDP2 buckets' steps (generators yielding sums to all-reduce) advance round by round; one
    whose first call fails ends the step as in one process: the buckets before it finish, the
    later ones never start, then the error is raised."""
    events = []

    def steps(name, fail=False):
        if fail:
            raise ValueError(f"bad input in {name}")
        for r in range(2):
            events.append((name, r))
            yield torch.zeros(1, dtype=torch.float64), None  # no mesh: the reduce is a no-op
        events.append((name, "done"))

    opt = fused_optim.Adafactor([torch.nn.Parameter(torch.zeros(2, 2))])
    bucket = SimpleNamespace(index=[0])
    opt._step_in_lockstep([(0, bucket, steps("A")), (0, bucket, steps("B"))])
    assert events == [("A", 0), ("B", 0), ("A", 1), ("B", 1), ("A", "done"), ("B", "done")]
    events.clear()
    with pytest.raises(ValueError, match="bad input in B"):
        opt._step_in_lockstep(
            [(0, bucket, steps("A")), (0, bucket, steps("B", True)), (0, bucket, steps("C"))]
        )
    assert events == [("A", 0), ("A", 1), ("A", "done")]


class _AdamWOverLists(fused_optim.AdamW):
    """AdamW whose buckets always run the registered op over lists: the path without the native
    backend's group object (AdamGroup), the oracle for it."""

    def _make_run(self, backend, bucket, group, op_only):
        return super()._make_run(backend, bucket, group, True)


def test_cached_adam_plan_notices_tensors_changed_in_place():
    """AdamGroup keeps a bucket's plan between steps. A param viewed as another dtype at the
    same address steps as the op over lists does, bit for bit; a state resized in place is
    refused with the op's error, changing nothing; an unchanged step builds no plan."""
    results, errors = [], []
    for cls in (fused_optim.AdamW, _AdamWOverLists):
        params = [torch.nn.Parameter(t) for t in random_tensors([(6, 5), (40,)], torch.bfloat16, "cpu", 2)]
        opt = cls(params, lr=1e-2)
        for step in range(4):
            if step == 2:
                for p in params:
                    p.data = p.data.view(torch.float16)
                    for t in (opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]):
                        t.data = t.data.view(torch.float16)
            for i, p in enumerate(params):
                p.grad = random_tensors([p.shape], torch.float32, "cpu", 10 * step + i)[0].to(p.dtype)
            opt.step()
        run = next(b.run for c in opt._buckets.values() for b in c.buckets)
        if hasattr(run, "plans"):
            built = run.plans()
            opt.step()
            assert run.plans() == built
        else:
            opt.step()
        results.append([p.detach().clone() for p in params])
        opt.state[params[0]]["exp_avg"].resize_(3)
        before = [t.clone() for t in [*params, *opt.state[params[1]].values()]]
        with pytest.raises(RuntimeError) as info:
            opt.step()
        errors.append(str(info.value))
        assert all(
            torch.equal(a, b) for a, b in zip(before, [*params, *opt.state[params[1]].values()], strict=True)
        )
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
    assert errors[0] == errors[1]


@pytest.mark.parametrize("make", [fused_optim.AdamW, fused_optim.SMMF], ids=["AdamW", "SMMF"])
def test_dispatch_modes_see_the_step(make):
    """Under a dispatch mode the step goes through the registered op (the native backends'
    group objects would bypass the mode): the mode sees it, and FakeTensorMode leaves the real
    params alone."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    p = torch.nn.Parameter(torch.randn(6, 5))
    opt = make([p], lr=1e-2)
    p.grad = torch.randn(6, 5)
    opt.step()  # the bucket's run is made here, outside any mode
    with Seen() as seen:
        opt.step()
    assert any(op.startswith("fused_optim.") for op in seen.ops), seen.ops
    before = p.detach().clone()
    with FakeTensorMode(allow_non_fake_inputs=True):
        opt.step()
    assert torch.equal(p.detach(), before)
