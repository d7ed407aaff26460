"""Every fused backend available here against the pure-PyTorch reference on identical inputs:
dtypes, odd shapes, empty and 0-d tensors, many small tensors plus a large one, every option,
and a state_dict save/load in the middle of a run."""

import copy
import itertools

import pytest
import torch
from conftest import TOL, assert_close, backend_device_params, random_tensors

import fused_optim
from fused_optim import _reference, functional

ODD_SHAPES = [(), (0,), (1,), (7,), (4097,), (3, 5, 7), (2, 0, 3)]
CHUNKY = [(2 * 65536 + 3,)]  # spans several work items of the CPU/CUDA plan
MANY = [(int(n),) for n in torch.randint(1, 300, (60,), generator=torch.Generator().manual_seed(3))]


def _state(shapes, dtype, state_dtype, device, seed):
    params = random_tensors(shapes, dtype, device, seed)
    m = random_tensors(shapes, state_dtype, device, seed + 1, scale=0.1)
    v = [t.abs() for t in random_tensors(shapes, state_dtype, device, seed + 2, scale=0.1)]
    vmax = [t.clone() for t in v]
    steps = [torch.full((), float(k % 3), dtype=torch.float32, device=device) for k in range(len(shapes))]
    return [params, m, v, vmax, steps]


def _run(fn_backend, state, shapes, steps, seed, **opts):
    params, m, v, vmax, st = state
    for k in range(steps):
        grads = random_tensors(shapes, params[0].dtype, params[0].device, seed + 10 + k)
        fn_backend(params, grads, m, v, vmax if opts.get("amsgrad") else [], st, **opts)


def _compare(state_a, state_b, dtype, state_dtype):
    for name, xs, ys, dt in zip(
        ["param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"],
        state_a,
        state_b,
        [dtype, state_dtype, state_dtype, state_dtype, torch.float32],
        strict=True,
    ):
        for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert_close(x.cpu(), y.cpu(), dt, msg=f"{name}[{i}] shape {tuple(x.shape)}")


def _backend_fn(backend, adax=False):
    impl = fused_optim._backends.get(backend, torch.device("cpu")) if backend == "reference" else None

    def run(params, grads, m, v, vmax, st, **opts):
        common = dict(grad_scale=opts.pop("grad_scale", None), found_inf=opts.pop("found_inf", None),
                      clip_coef=opts.pop("clip_coef", None))  # fmt: skip
        if impl is not None:
            impl.adam(params, grads, m, v, vmax, st, adax=adax, **opts, **common)
        elif adax:
            opts.pop("amsgrad")
            functional.adax(params, grads, m, v, st, backend=backend, **opts, **common)
        else:
            functional.adam(params, grads, m, v, vmax, st, backend=backend, **opts, **common)

    return run


DTYPES = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
]


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("dtype,state_dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("adax", [False, True], ids=["adam", "adax"])
def test_backend_matches_reference_across_dtypes_and_shapes(backend, device, dtype, state_dtype, adax):
    shapes = ODD_SHAPES + MANY + CHUNKY
    opts = dict(lr=2e-3, beta1=0.9, beta2=1e-3 if adax else 0.99, eps=1e-8, weight_decay=0.01,
                decoupled=True, amsgrad=False, maximize=False)  # fmt: skip
    ours = _state(shapes, dtype, state_dtype, device, seed=1)
    ref = copy.deepcopy(ours)
    _run(_backend_fn(backend, adax), ours, shapes, 3, 7, **opts)
    _run(_backend_fn("reference", adax), ref, shapes, 3, 7, **opts)
    _compare(ours, ref, dtype, state_dtype)


OPTIONS = list(itertools.product([False, True], [False, True], [False, True], [0.0, 0.05]))


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("amsgrad,maximize,decoupled,weight_decay", OPTIONS)
def test_backend_matches_reference_for_every_option(
    backend, device, amsgrad, maximize, decoupled, weight_decay
):
    shapes = [(), (5,), (130,), (3, 41)]
    opts = dict(lr=1e-2, beta1=0.8, beta2=0.9, eps=1e-6, weight_decay=weight_decay, decoupled=decoupled,
                amsgrad=amsgrad, maximize=maximize)  # fmt: skip
    ours = _state(shapes, torch.float32, torch.float32, device, seed=2)
    ref = copy.deepcopy(ours)
    _run(_backend_fn(backend), ours, shapes, 4, 11, **opts)
    _run(_backend_fn("reference"), ref, shapes, 4, 11, **opts)
    _compare(ours, ref, torch.float32, torch.float32)


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("adax", [False, True], ids=["adam", "adax"])
def test_backend_scalars_from_tensors(backend, device, adax):
    """lr as a tensor, GradScaler's grad_scale and a clip coefficient, read on the device."""
    shapes = [(), (9,), (4, 4)]
    dev = torch.device(device)
    opts = dict(beta1=0.9, beta2=0.999 if not adax else 1e-4, eps=1e-8, weight_decay=0.1, decoupled=False,
                amsgrad=False, maximize=True)  # fmt: skip
    # grad_scale shaped [1], as GradScaler's is
    scalars = dict(lr=torch.tensor(3e-3, device=dev), grad_scale=torch.tensor([1024.0], device=dev),
                   clip_coef=torch.tensor(0.25, device=dev))  # fmt: skip
    ours = _state(shapes, torch.float32, torch.float32, device, seed=4)
    ref = copy.deepcopy(ours)
    _run(_backend_fn(backend, adax), ours, shapes, 3, 5, **opts, **scalars)
    _run(_backend_fn("reference", adax), ref, shapes, 3, 5, **opts, **scalars)
    _compare(ours, ref, torch.float32, torch.float32)


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_found_inf_skips_the_step_and_touches_nothing(backend, device):
    shapes = [(), (0,), (6,), (65537,)]
    ours = _state(shapes, torch.bfloat16, torch.float32, device, seed=5)
    before = copy.deepcopy(ours)
    opts = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled=True,
                amsgrad=True, maximize=False)  # fmt: skip
    found_inf = torch.ones((), device=device)
    _run(_backend_fn(backend), ours, shapes, 2, 1, found_inf=found_inf, **opts)
    for xs, ys in zip(ours, before, strict=True):
        for x, y in zip(xs, ys, strict=True):
            assert torch.equal(x, y)


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_every_step_advances_once_including_empty_tensors(backend, device):
    shapes = [(0,), (), (3 * 65536 + 1,), (0, 4)]
    ours = _state(shapes, torch.float32, torch.float32, device, seed=6)
    start = [s.item() for s in ours[4]]
    opts = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True,
                amsgrad=False, maximize=False)  # fmt: skip
    _run(_backend_fn(backend), ours, shapes, 3, 2, **opts)
    assert [s.item() for s in ours[4]] == [s + 3 for s in start]


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, float("inf")])
def test_global_norm_matches_reference(backend, device, norm_type):
    shapes = ODD_SHAPES + MANY[:20] + CHUNKY
    tensors = random_tensors(shapes, torch.float32, device, 9) + random_tensors(
        [(300,), (2, 17)], torch.bfloat16, device, 10
    )
    scale = torch.tensor([8.0], device=device)  # shaped like GradScaler's
    norm, coef = functional.global_norm(tensors, norm_type, 1.5, scale, backend=backend)
    ref_norm, ref_coef = _reference.global_norm([t.cpu() for t in tensors], norm_type, 1.5, scale.cpu())
    torch.testing.assert_close(norm.cpu(), ref_norm, rtol=2e-6, atol=0)
    torch.testing.assert_close(coef.cpu(), ref_coef, rtol=2e-6, atol=0)
    again, _ = functional.global_norm(tensors, norm_type, 1.5, scale, backend=backend)
    assert torch.equal(norm, again)  # deterministic: bitwise the same


# ---- optimizer level, with a state_dict round trip in the middle --------------------------

OPTIMIZERS = [
    (fused_optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    (fused_optim.Adam, dict(lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True)),
    (fused_optim.AdaX, dict(lr=1e-2)),
    (fused_optim.AdaXW, dict(lr=1e-2, betas=(0.9, 1e-3))),
]


def _model_params(dtype, device):
    shapes = [(), (1,), (7,), (33, 65), (4097,), (2 * 65536 + 5,), (0,)] + [(int(n),) for n in range(1, 40)]
    return [torch.nn.Parameter(t) for t in random_tensors(shapes, dtype, device, 21)]


def _set_grads(params, step):
    grads = random_tensors([p.shape for p in params], params[0].dtype, params[0].device, 100 + step)
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        p.grad = None if (i % 9 == 4 and step % 2 == 1) else g  # some params skip some steps


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS, ids=lambda x: getattr(x, "__name__", ""))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_optimizer_backend_matches_reference_with_state_dict_round_trip(
    backend, device, cls, kwargs, dtype, clip
):
    ours = _model_params(dtype, device)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = cls(ours, **kwargs, max_grad_norm=clip, backend=backend)
    ref_opt = cls(ref, **kwargs, max_grad_norm=clip, backend="reference")
    for step in range(6):
        if step == 3:  # save, rebuild the optimizer, load, continue
            saved = copy.deepcopy(opt.state_dict())
            opt = cls(ours, **kwargs, max_grad_norm=clip, backend=backend)
            opt.load_state_dict(saved)
        _set_grads(ours, step)
        _set_grads(ref, step)
        opt.step()
        ref_opt.step()
        if clip is not None:
            norms = opt.last_grad_norm.cpu(), ref_opt.last_grad_norm.cpu()
            torch.testing.assert_close(*norms, rtol=1e-5, atol=0)
    for i, (p, q) in enumerate(zip(ours, ref, strict=True)):
        assert_close(p.detach().cpu(), q.detach().cpu(), dtype, msg=f"param {i}")
        for k, v in ref_opt.state[q].items():
            assert_close(opt.state[p][k].cpu(), v.cpu(), v.dtype, msg=f"state {k} of param {i}")


def test_tolerances_are_tight_enough_to_catch_a_wrong_update():
    """Guards the guard: a deliberately wrong step (eps 100x off) must fail the comparison."""
    shapes = [(64,)]
    a = _state(shapes, torch.float32, torch.float32, "cpu", seed=1)
    b = copy.deepcopy(a)
    opts = dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.0, decoupled=True, amsgrad=False,
                maximize=False)  # fmt: skip
    _run(_backend_fn("reference"), a, shapes, 2, 3, eps=1e-3, **opts)
    _run(_backend_fn("reference"), b, shapes, 2, 3, eps=1e-1, **opts)
    with pytest.raises(AssertionError):
        _compare(a, b, torch.float32, torch.float32)
    assert TOL[torch.float32]["rtol"] < 1e-4
