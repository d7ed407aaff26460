"""Regressions from review: the optimizers must follow whatever users do to param groups,
state and params between steps, and unusual inputs must neither corrupt memory nor race."""

import copy
import io
from collections import defaultdict

import pytest
import torch
from conftest import assert_close, backend_device_params, random_tensors

import fused_optim
from fused_optim import _reference, functional


def _both(make_params):
    """The same params for fused_optim and torch.optim."""
    ours = make_params()
    return ours, [torch.nn.Parameter(p.detach().clone()) for p in ours]


def _step_both(opt, ref, ours, theirs, seed, skip=()):
    grads = random_tensors([p.shape for p in ours], ours[0].dtype, ours[0].device, seed)
    for i, (p, q, g) in enumerate(zip(ours, theirs, grads, strict=True)):
        p.grad, q.grad = (None, None) if i in skip else (g, g.clone())
    opt.step()
    ref.step()


def _assert_same(ours, theirs):
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


def _params(device="cpu", n=3):
    return [torch.nn.Parameter(t) for t in random_tensors([(4,), (3, 2), (5,)][:n], torch.float32, device, 0)]


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize(
    "change",
    [
        "pop_group",
        "replace_param",
        "reset_state",
        "delete_param_state",
        "replace_param_state",
        "clear_state",
        "amsgrad_on",
    ],
)
def test_changes_between_steps_are_followed_like_torch(backend, device, change):
    ours, theirs = _both(lambda: _params(device))
    groups = lambda ps: [{"params": ps[:1]}, {"params": ps[1:]}]  # noqa: E731
    opt = fused_optim.Adam(groups(ours), lr=0.1, backend=backend)
    ref = torch.optim.Adam(groups(theirs), lr=0.1, foreach=False)
    _step_both(opt, ref, ours, theirs, 1)
    skip = ()
    for o in (opt, ref):
        if change == "pop_group":
            o.param_groups.pop(0)
            skip = (0,)
        elif change == "reset_state":
            o.state = defaultdict(dict)
        elif change == "delete_param_state":
            del o.state[o.param_groups[1]["params"][0]]
        elif change == "replace_param_state":
            o.state[o.param_groups[1]["params"][0]] = {}
        elif change == "clear_state":
            o.state.clear()
        elif change == "amsgrad_on":
            for g in o.param_groups:
                g["amsgrad"] = True
            for p in o.state:  # torch needs the state to exist; ours creates it when missing
                o.state[p].setdefault("max_exp_avg_sq", torch.zeros_like(p))
    if change == "replace_param":
        new_ours, new_theirs = (
            torch.nn.Parameter(torch.ones(4, device=device)),
            torch.nn.Parameter(torch.ones(4)),
        )
        opt.param_groups[0]["params"][0], ref.param_groups[0]["params"][0] = new_ours, new_theirs
        ours[0], theirs[0] = new_ours, new_theirs.to(device) if device != "cpu" else new_theirs
    for seed in (2, 3):
        _step_both(opt, ref, ours, theirs, seed, skip)
    _assert_same(ours, theirs)


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_copy_and_pickle_of_the_optimizer_keep_working(backend, device):
    ours = _params(device)
    opt = fused_optim.AdamW(ours, lr=0.1, max_grad_norm=0.5, backend=backend)
    for p in ours:
        p.grad = torch.ones_like(p)
    opt.step()
    clone = copy.deepcopy(opt)
    assert clone.max_grad_norm == 0.5 and clone.backend == backend
    buf = io.BytesIO()
    torch.save(opt, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.max_grad_norm == 0.5
    for o in (clone, loaded):
        for p in o.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        o.step()
        assert o.last_grad_norm is not None


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_swap_tensors_load_state_dict_matches_torch(backend, device):
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        results = []
        for make in (
            lambda ps: torch.optim.AdamW(ps, lr=0.1),
            lambda ps: fused_optim.AdamW(ps, lr=0.1, backend=backend),
        ):
            torch.manual_seed(0)
            model = torch.nn.Linear(4, 3).to(device)
            opt = make(model.parameters())
            x = torch.randn(8, 4, device=device)
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})  # swaps the params
            for _ in range(3):
                model(x).square().mean().backward()
                opt.step()
                opt.zero_grad()
            results.append(model.weight.detach().clone())
        torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=1e-7)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_working_copies_keep_each_tensors_dtype(backend, device):
    """bf16 params laid out unlike their fp32 states go through working copies: each copy must
    keep its own tensor's dtype (a bf16-sized copy of an fp32 state corrupted the heap)."""
    base = random_tensors([(6, 5)], torch.bfloat16, device, 3)[0]
    params = [base.t()]  # dense, transposed
    lists = dict(
        grads=[random_tensors([(5, 6)], torch.bfloat16, device, 4)[0]],
        exp_avgs=[torch.full((5, 6), 0.1, device=device)],  # fp32, contiguous
        exp_avg_sqs=[torch.full((5, 6), 0.2, device=device)],
        steps=[torch.zeros((), device=device)],
    )
    ref = copy.deepcopy((params, lists))
    functional.adam(params, lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"], [], lists["steps"],
                    lr=1e-2, weight_decay=0.1, decoupled=True, backend=backend)  # fmt: skip
    rp, rl = ref
    _reference.adam(rp, rl["grads"], rl["exp_avgs"], rl["exp_avg_sqs"], [], rl["steps"], lr=1e-2,
                    beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled=True, amsgrad=False,
                    maximize=False)  # fmt: skip
    assert_close(params[0], rp[0], torch.bfloat16)
    assert_close(lists["exp_avgs"][0], rl["exp_avgs"][0], torch.float32)
    assert_close(lists["exp_avg_sqs"][0], rl["exp_avg_sqs"][0], torch.float32)


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_non_finite_params_behave_like_the_reference(backend, device):
    """With weight_decay 0 an inf param must not turn the gradient into NaN."""
    p = torch.tensor([float("inf"), 1.0, -2.0], device=device)
    state = [[p.clone()], [torch.tensor([1.0, 2.0, 3.0], device=device)], [torch.zeros(3, device=device)],
             [torch.zeros(3, device=device)], [torch.zeros((), device=device)]]  # fmt: skip
    ref = copy.deepcopy(state)
    kw = dict(lr=1e-2, weight_decay=0.0, decoupled=False)
    functional.adam(state[0], state[1], state[2], state[3], [], state[4], backend=backend, **kw)
    functional.adam(ref[0], ref[1], ref[2], ref[3], [], ref[4], backend="reference", **kw)
    for x, y in zip(state, ref, strict=True):
        torch.testing.assert_close(x[0], y[0], equal_nan=True)
