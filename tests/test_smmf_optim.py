"""fused_optim.SMMF, the class: against the authors' rule (tests/test_reference_smmf.py's
oracle) through every backend that has SMMF kernels, the authors' signature, defaults and
validation, state keys / shapes / dtypes and bytes per parameter, state_dict round trips, GradScaler,
clipping and lr as a tensor."""

import copy
import math

import pytest
import torch
from conftest import backend_device_params, random_tensors
from test_reference_smmf import AuthorsRule

import fused_optim
from fused_optim._reference.smmf import unpack_signs
from fused_optim.optim.smmf import SMMF

SHAPES = [(), (7,), (1000,), (30, 40), (3, 5, 7), (1, 13, 1), (0, 3)]


def _params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]


def _grads(step, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(beta=None),
        dict(weight_decay=0.1),
        dict(weight_decay=0.1, weight_decay_mode="adam"),
        dict(vector_reshape=False),
        dict(decay_rate=-0.8, growth_rate=0.99, lr=3e-3, eps=1e-6),
    ],  # fmt: skip
)
def test_class_follows_the_authors_rule(kw):
    """30 fp32 steps of the class against the authors' rule in fp64, state_dict round trip midway."""
    params = _params()
    opt = SMMF(params, **kw)
    c = dict(lr=1e-3, beta=0.9, eps=1e-8, weight_decay=0.0, weight_decay_mode="adamw", decay_rate=-0.5,
             growth_rate=0.999, vector_reshape=True) | kw  # fmt: skip
    oracle_params = [p.detach().double().clone() for p in params]
    oracle = [AuthorsRule(p, c["beta"], c["vector_reshape"]) for p in oracle_params]
    for k in range(30):
        grads = _grads(k)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()
        for p, g, o in zip(oracle_params, grads, oracle, strict=True):
            hyper = [
                c[k] for k in ("lr", "eps", "weight_decay", "weight_decay_mode", "decay_rate", "growth_rate")
            ]
            o.apply(p, g.double(), *hyper)
        if k == 14:
            sd = opt.state_dict()
            opt = SMMF(params, **kw)
            opt.load_state_dict(sd)
    for p, q in zip(params, oracle_params, strict=True):
        torch.testing.assert_close(p.detach().double(), q, rtol=1e-5, atol=1e-6)


def test_state_keys_shapes_dtypes():
    params = _params(torch.bfloat16)
    opt = SMMF(params, vector_reshape=False)
    for p, g in zip(params, _grads(0, torch.bfloat16), strict=True):
        p.grad = g
    opt.step()
    s = opt.state[params[3]]  # 30 x 40 = 1200 -> 40 x 30
    assert set(s) == {"step", "row_m", "col_m", "sign", "row_v", "col_v"}
    assert s["row_m"].shape == (40,) and s["col_m"].shape == (30,) and s["sign"].shape == (40, 1)
    assert s["row_v"].dtype == torch.float32 and s["sign"].dtype == torch.int32
    assert s["step"].dtype == torch.float32 and s["step"].item() == 1
    dense = opt.state[params[1]]  # (7,) with vector_reshape=False
    assert set(dense) == {"step", "exp_avg", "exp_avg_sq"} and dense["exp_avg"].dtype == torch.bfloat16
    assert set(opt.state[params[0]]) == {"step", "row_m", "col_m", "sign", "row_v", "col_v"}  # 0-d: 1 x 1
    no_m = SMMF(params, beta=None)
    no_m.step()
    assert set(no_m.state[params[3]]) == {"step", "row_v", "col_v"}
    # state_dict() packs the signs in the param's own rows (30 rows of 40 bits: 2 words), the
    # layout FSDP2 shards keep, and loads back into the kernels' square-matricized one
    saved = opt.state_dict()["state"][3]["sign"]
    assert saved.shape == (30, 2) and saved.dtype == torch.int32 and s["sign"].shape == (40, 1)
    assert torch.equal(unpack_signs(saved, 40).reshape(-1), unpack_signs(s["sign"], 30).reshape(-1)), (
        "the same bits in both layouts"
    )
    twin_params = [p.detach().clone().requires_grad_() for p in params]
    twin = SMMF(twin_params, vector_reshape=False)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))  # (not sharing the live `step` tensors)
    for ps in (params, twin_params):
        for p, g in zip(ps, _grads(1, torch.bfloat16), strict=True):
            p.grad = g
    opt.step()
    twin.step()  # repacked into the kernels' layout: the same step, bit for bit
    assert torch.equal(twin.state[twin_params[3]]["sign"], s["sign"])
    assert all(torch.equal(a, b) for a, b in zip(params, twin_params, strict=True))


def test_state_bytes_per_parameter_on_gpt2_shapes():
    """Optimizer state (sign words + four fp32 factors + step) of GPT-2 124M: <= 0.14 B/param."""
    shapes = [(50257, 768), (1024, 768)]
    for _ in range(12):
        shapes += [(768,), (768,), (768, 2304), (2304,), (768, 768), (768,), (768,), (768,), (768, 3072),
                   (3072,), (3072, 768), (768,)]  # fmt: skip
    shapes += [(768,), (768,)]
    n_params = sum(math.prod(s) for s in shapes)
    total = 0
    for s in shapes:
        p = torch.empty(s, device="meta")
        for key in ("row_m", "col_m", "sign", "row_v", "col_v"):
            total += math.prod(SMMF._state_shape(p, key)) * 4
        total += 4  # step
    assert n_params == 124439808
    assert total / n_params <= 0.14


def test_signature_defaults_and_validation():
    p = [torch.nn.Parameter(torch.randn(4, 4))]
    opt = SMMF(p)
    g = opt.param_groups[0]
    assert {
        k: g[k] for k in ("lr", "beta", "eps", "weight_decay", "decay_rate", "growth_rate", "vector_reshape")
    } == dict(
        lr=1e-3, beta=0.9, eps=1e-8, weight_decay=0.0, decay_rate=-0.5, growth_rate=0.999, vector_reshape=True
    )
    assert opt.weight_decay_mode == "adamw"
    bad = [
        (dict(lr=-1.0), "Learning-rate should be greater than or equal to 0.0"),
        (dict(beta=1.5), "Beta should be in [0.0, 1.0]"),
        (dict(eps=-1.0), "Epilson should be greater than or equal to 0.0"),
        (dict(weight_decay=-0.1), "Weight-decay should be greater than or equal to 0.0"),
        (dict(decay_rate=0.5), "Decay-rate should be in [-1.0, 0.0]"),
        (dict(growth_rate=1.5), "Growth-rate should be in [0.0, 1.0]"),
        (dict(weight_decay_mode="sgd"), "weight_decay_mode should be 'adamw' or 'adam'"),
    ]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            SMMF(p, **kw)
    with pytest.raises(TypeError):
        SMMF(p, growth_rate=None)  # as the authors' check, which compares None
    assert not SMMF.__init__.__kwdefaults__ or "max_grad_norm" in SMMF.__init__.__kwdefaults__


def test_found_inf_skips_and_lr_tensor_and_clipping():
    params = _params()
    opt = SMMF(params, lr=torch.tensor(1e-3))
    for p, g in zip(params, _grads(0), strict=True):
        p.grad = g
    before = [p.detach().clone() for p in params]
    opt.found_inf = torch.ones(())
    opt.grad_scale = torch.ones(())
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))
    assert all(s["step"].item() == 0 for s in opt.state.values())
    del opt.found_inf, opt.grad_scale

    clipped, plain = _params(), _params()
    a = SMMF(clipped, max_grad_norm=0.5)
    b = SMMF(plain)
    for p, q, g in zip(clipped, plain, _grads(1), strict=True):
        p.grad, q.grad = g.clone(), g.clone()
    a.step()
    torch.nn.utils.clip_grad_norm_(plain, 0.5)
    b.step()
    for p, q in zip(clipped, plain, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_exported():
    assert fused_optim.SMMF is SMMF


class _OverLists(SMMF):
    """SMMF whose buckets always run the registered op over lists: the path without the native
    backend's group object (SmmfGroup), the oracle for it."""

    def _make_run(self, backend, bucket, group, op_only):
        return super()._make_run(backend, bucket, group, True)


def _states(opt):
    return [t for p in (q for g in opt.param_groups for q in g["params"]) for t in opt.state[p].values()]


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("beta,vector_reshape", [(0.9, True), (None, False)])
def test_cached_plan_follows_moved_tensors_and_changed_layouts(backend, device, beta, vector_reshape):
    """The native backend keeps each bucket's tensors and plan in C++ between steps (SmmfGroup).
    It must step as the op over lists does, bit for bit, through: a param whose .data was
    replaced, every state tensor's .data replaced (same Python objects, new memory), a param
    viewed as another dtype at the same address, grads in another layout, a param that is not
    row-major, an lr tensor changed in place and a GradScaler-skipped step; and an unchanged step
    must build no new plan."""
    shapes = [(6, 5), (40,), (3, 3), (2, 7, 3), (0, 3), (7, 4)]
    dtype = torch.bfloat16
    ours = [torch.nn.Parameter(t) for t in random_tensors(shapes, dtype, device, 1)]
    ours[-1] = torch.nn.Parameter(ours[-1].detach().t())  # 4 x 7, column-major: working copies
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]

    def make(cls, params):
        # the column-major param in a group of its own: its working copies make its bucket plan
        # anew every step, the other bucket's plan is kept
        lr = torch.tensor(1e-2, device=device)
        return cls([{"params": params[:-1]}, {"params": params[-1:]}], lr=lr, beta=beta, weight_decay=0.1,
                   vector_reshape=vector_reshape, backend=backend)  # fmt: skip

    opt, twin = make(SMMF, ours), make(_OverLists, theirs)
    for step in range(10):
        for o, params in ((opt, ours), (twin, theirs)):
            if step == 2:
                for p in params:
                    p.data = p.data.clone()  # new storage under the same Parameter
            if step == 4:
                for t in _states(o):
                    t.data = t.data.clone()  # new storage under the same state tensors
            if step == 5:  # the first group's params and dense moments: same addresses, fp16
                for t in [*params[:-1], *(t for t in _states(o) if t.dtype == dtype)]:
                    if t is not params[-1] and all(t is not u for u in o.state[params[-1]].values()):
                        t.data = t.data.view(torch.float16)
                o.param_groups[0]["lr"].fill_(5e-3)
            o.found_inf = torch.ones((), device=device) if step == 6 else None
        grads = random_tensors([p.shape for p in ours], torch.float32, device, 100 + step)
        for p, q, g in zip(ours, theirs, grads, strict=True):
            if step in (3, 7) and g.dim() == 2:
                g = g.t().contiguous().t()  # same values, transposed strides
            g = g.to(p.dtype)
            p.grad, q.grad = g, g.clone()
        opt.step()
        twin.step()
        for i, (p, q) in enumerate(zip(ours, theirs, strict=True)):
            assert torch.equal(p.detach(), q.detach()), f"step {step}: params[{i}]"
        for i, (a, b) in enumerate(zip(_states(opt), _states(twin), strict=True)):
            assert torch.equal(a, b), f"step {step}: state tensor {i}"

    def plans():  # of the buckets without the column-major param, which plan every step
        return [b.run.plans() for c in opt._buckets.values() for b in c.buckets
                if hasattr(b.run, "plans") and all(p is not ours[-1] for p in b.params)]  # fmt: skip

    kept = plans()
    assert (len(kept) > 0 and min(kept) >= 1) == (backend == "cpu")
    opt.step()
    assert plans() == kept


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s["row_v"].resize_(1),
        lambda s: setattr(s["sign"], "data", s["sign"].data.view(torch.float32)),
        lambda s: s["col_v"].as_strided_((5,), (0,)),
        lambda s: setattr(s["step"], "data", s["step"].data.view(torch.int32)),
    ],
    ids=["resized", "other-dtype", "overlapping", "step-dtype"],
)
def test_state_changed_in_place_is_refused_as_over_lists(change):
    """A state tensor changed in place keeps its Python object and often its address: the
    cached plan must notice, and the step refuse it with the op's error, changing nothing."""
    errors = []
    for cls in (SMMF, _OverLists):
        params = [torch.nn.Parameter(t) for t in random_tensors([(6, 5), (40,)], torch.float32, "cpu", 3)]
        opt = cls(params, lr=1e-2)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        change(opt.state[params[0]])
        before = [t.clone() for t in [*params, *opt.state[params[1]].values()]]
        with pytest.raises((RuntimeError, TypeError)) as info:
            opt.step()
        errors.append(str(info.value))
        after = [*params, *opt.state[params[1]].values()]
        assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert errors[0] == errors[1]
