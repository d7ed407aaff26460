"""The reference implementations against outside oracles: torch.optim.Adam/AdamW
(foreach=False), the AdaX authors' formulas, and torch.nn.utils.clip_grad_norm_."""

import copy
import math

import pytest
import torch

from fused_optim import _reference

SHAPES = [(), (1,), (7,), (33, 17), (4, 3, 5)]


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]


def _grads(dtype, step, seed=100):
    g = torch.Generator().manual_seed(seed + step)
    return [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]


def _run_reference(params, steps, *, lr, betas, eps, weight_decay, decoupled, amsgrad, maximize):
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    max_sqs = [torch.zeros_like(p) for p in params]
    state_steps = [torch.zeros((), dtype=torch.float32) for _ in params]
    for k in range(steps):
        _reference.adam(
            params, _grads(params[0].dtype, k), exp_avgs, exp_avg_sqs, max_sqs if amsgrad else [],
            state_steps, lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=weight_decay,
            decoupled=decoupled, amsgrad=amsgrad, maximize=maximize,
        )  # fmt: skip
    return exp_avgs, exp_avg_sqs, max_sqs, state_steps


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("decoupled", [False, True], ids=["Adam", "AdamW"])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
def test_adam_reference_matches_torch(dtype, decoupled, amsgrad, maximize, weight_decay, lr_kind):
    lr, betas, eps, steps = 3e-3, (0.8, 0.95), 1e-6, 12
    ours = _params(dtype)
    theirs = [torch.nn.Parameter(p.clone()) for p in ours]
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = cls(theirs, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
              maximize=maximize, foreach=False)  # fmt: skip
    for k in range(steps):
        for p, g in zip(theirs, _grads(dtype, k), strict=True):
            p.grad = g
        opt.step()
    our_lr = torch.tensor(lr, dtype=torch.float64) if lr_kind == "tensor" else lr
    m, v, vmax, st = _run_reference(
        ours, steps, lr=our_lr, betas=betas, eps=eps, weight_decay=weight_decay,
        decoupled=decoupled, amsgrad=amsgrad, maximize=maximize,
    )  # fmt: skip
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=2e-6, atol=1e-7)
    for i, p in enumerate(theirs):
        s = opt.state[p]
        torch.testing.assert_close(ours[i], p.detach(), **tol)
        torch.testing.assert_close(m[i], s["exp_avg"], **tol)
        torch.testing.assert_close(v[i], s["exp_avg_sq"], **tol)
        if amsgrad:
            torch.testing.assert_close(vmax[i], s["max_exp_avg_sq"], **tol)
        assert st[i].item() == s["step"].item() == steps


def _authors_adax(params, steps, *, lr, beta1, beta2, eps, weight_decay, decoupled):
    """AdaX / AdaXW exactly as written by the authors (raw v growing like (1 + beta2)^t), fp64."""
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for k in range(steps):
        t = k + 1
        for i, (p, g) in enumerate(zip(params, _grads(torch.float64, k), strict=True)):
            g = g.clone()
            if decoupled:
                p.mul_(1 - lr * weight_decay)
            elif weight_decay != 0:
                g.add_(p, alpha=weight_decay)
            m[i].mul_(beta1).add_(g, alpha=1 - beta1)
            v[i].mul_(1 + beta2).addcmul_(g, g, value=beta2)
            bias_correction = (1 + beta2) ** t - 1
            step_size = lr * math.sqrt(bias_correction)
            p.addcdiv_(m[i], v[i].sqrt() + eps, value=-step_size)
    return m, v


@pytest.mark.parametrize("decoupled", [False, True], ids=["AdaX", "AdaXW"])
@pytest.mark.parametrize("beta2", [1e-4, 0.05])
def test_adax_reference_matches_authors(decoupled, beta2):
    lr, beta1, eps, wd = (5e-3, 0.9, 1e-12, 5e-2) if decoupled else (1.5e-3, 0.9, 1e-12, 5e-4)
    theirs = _params(torch.float64)
    m_a, v_a = _authors_adax(theirs, steps := 40, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                             weight_decay=wd, decoupled=decoupled)  # fmt: skip
    ours = _params(torch.float64)
    exp_avgs = [torch.zeros_like(p) for p in ours]
    v_hat = [torch.zeros_like(p) for p in ours]
    state_steps = [torch.zeros((), dtype=torch.float32) for _ in ours]
    for k in range(steps):
        _reference.adam(
            ours, _grads(torch.float64, k), exp_avgs, v_hat, [], state_steps, lr=lr, beta1=beta1,
            beta2=beta2, eps=eps, weight_decay=wd, decoupled=decoupled, amsgrad=False,
            maximize=False, adax=True,
        )  # fmt: skip
    bc = (1 + beta2) ** steps - 1
    for i in range(len(ours)):
        torch.testing.assert_close(ours[i], theirs[i], rtol=1e-11, atol=1e-13)
        torch.testing.assert_close(exp_avgs[i], m_a[i], rtol=1e-12, atol=1e-14)
        # Checkpoints hold v-hat = v / ((1 + beta2)^t - 1), the authors' v normalised.
        torch.testing.assert_close(v_hat[i] * bc, v_a[i], rtol=1e-11, atol=1e-14)


def test_adax_reference_stays_finite_where_the_raw_form_overflows_fp32():
    # At t = 1e6 the authors' raw v ~ (1 + 1e-4)^t = e^100 is beyond fp32; v-hat is not.
    beta2, lr, t_prev = 1e-4, 1e-3, 1_000_000 - 1
    g = torch.tensor([0.5, -1.0, 2.0, 0.0])
    m0, vhat0, p0 = torch.tensor([0.05, -0.1, 0.3, 0.01]), torch.tensor([0.25, 1.0, 3.0, 0.5]), torch.ones(4)
    p, m, v = [p0.clone()], [m0.clone()], [vhat0.clone()]
    _reference.adam(p, [g], m, v, [], [torch.tensor(float(t_prev))], lr=lr, beta1=0.9, beta2=beta2,
                    eps=1e-12, weight_decay=0.0, decoupled=True, amsgrad=False, maximize=False,
                    adax=True)  # fmt: skip
    assert torch.isfinite(p[0]).all() and torch.isfinite(v[0]).all()
    # The authors' formulas in fp64, from the raw v that v-hat stands for.
    bc_prev, bc = (1 + beta2) ** t_prev - 1, (1 + beta2) ** (t_prev + 1) - 1
    g64, m64 = g.double(), 0.9 * m0.double() + 0.1 * g.double()
    v_raw = (1 + beta2) * vhat0.double() * bc_prev + beta2 * g64 * g64
    assert math.isinf(float(torch.tensor(bc, dtype=torch.float64).float()))
    expected = p0.double() - lr * math.sqrt(bc) * m64 / (v_raw.sqrt() + 1e-12)
    torch.testing.assert_close(p[0].double(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf])
@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_reference_global_norm_matches_torch_clip(norm_type, max_norm):
    grads = [t * 3 for t in _grads(torch.float32, 0)]
    ref_params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(ref_params, grads, strict=True):
        p.grad = g.clone()
    expected = torch.nn.utils.clip_grad_norm_(ref_params, max_norm, norm_type=norm_type, foreach=False)
    ours = copy.deepcopy(grads)
    total, coef = _reference.global_norm(ours, norm_type, max_norm)
    _reference.scale_(ours, coef)
    # torch sums in fp32 (norm of per-tensor norms): agree to its accuracy...
    torch.testing.assert_close(total, expected, rtol=2e-5, atol=0)
    for g, p in zip(ours, ref_params, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=2e-5, atol=1e-7)
    # ...and to the exact fp64 norm far more tightly.
    exact = torch.cat([g.double().flatten() for g in grads]).abs()
    exact = exact.max() if math.isinf(norm_type) else exact.pow(norm_type).sum().pow(1 / norm_type)
    torch.testing.assert_close(total.double(), exact, rtol=1e-7, atol=0)
