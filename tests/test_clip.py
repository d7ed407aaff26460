"""fused_optim.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_."""

import math

import pytest
import torch
from conftest import devices, random_tensors

import fused_optim
from fused_optim import _backends

SHAPES = [(), (0,), (7,), (33, 17), (2 * 65536 + 1,), (4097,)]


def _pair(device, dtypes=(torch.float32,), scale=1.0):
    ps = []
    for k, dt in enumerate(dtypes):
        ps += [torch.nn.Parameter(t) for t in random_tensors(SHAPES, dt, device, 10 + k)]
    for i, p in enumerate(ps):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(i)).mul(scale).to(p)
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    for p, q in zip(ps, qs, strict=True):
        q.grad = p.grad.clone()
    return ps, qs


def _fused_backends(device):
    return [b for b in fused_optim.available_backends(device)]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf, "inf"])
@pytest.mark.parametrize("max_norm", [0.1, 1e6])
def test_clip_grad_norm_matches_torch(device, norm_type, max_norm):
    for backend in _fused_backends(device):
        ps, qs = _pair(device)
        total = fused_optim.clip_grad_norm_(ps, max_norm, norm_type=norm_type, backend=backend)
        # torch refuses the inf-norm of an empty grad; an empty grad contributes nothing here.
        expected = torch.nn.utils.clip_grad_norm_(
            [q for q in qs if q.numel()], max_norm, norm_type=float(norm_type)
        )
        assert total.dtype == torch.float32 and total.shape == ()
        torch.testing.assert_close(total, expected, rtol=2e-5, atol=0)
        for p, q in zip(ps, qs, strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("device", devices())
def test_clip_grad_norm_mixed_dtypes_and_params_without_grads(device):
    ps, qs = _pair(device, dtypes=(torch.float32, torch.bfloat16, torch.float16))
    ps[3].grad = qs[3].grad = None
    exact = torch.cat([q.grad.double().flatten() for q in qs if q.grad is not None]).norm()
    total = fused_optim.clip_grad_norm_(ps, 0.5)
    expected = torch.nn.utils.clip_grad_norm_(qs, 0.5)
    torch.testing.assert_close(total.double(), exact, rtol=1e-6, atol=0)
    # torch rounds the per-tensor norms of 16-bit grads to 16 bits: agree to that precision.
    torch.testing.assert_close(total, expected, rtol=1e-2, atol=0)
    for p, q in zip(ps, qs, strict=True):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-2, atol=1e-3)
    assert ps[3].grad is None


def test_clip_grad_norm_single_tensor_and_no_grads():
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 2.0)
    assert fused_optim.clip_grad_norm_(p, 1.0).item() == pytest.approx(4.0)
    torch.testing.assert_close(p.grad, torch.full((4,), 2.0 / (4.0 + 1e-6)))
    assert fused_optim.clip_grad_norm_([torch.nn.Parameter(torch.ones(2))], 1.0).item() == 0.0


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_nonfinite_norm_raises_only_when_asked(bad):
    ps, qs = _pair("cpu")
    ps[2].grad[0] = bad
    qs[2].grad[0] = bad
    with pytest.raises(RuntimeError, match="non-finite"):
        fused_optim.clip_grad_norm_(ps, 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_(qs, 1.0, error_if_nonfinite=True)
    total = fused_optim.clip_grad_norm_(ps, 1.0)
    expected = torch.nn.utils.clip_grad_norm_(qs, 1.0)
    torch.testing.assert_close(total, expected, equal_nan=True)
    for p, q in zip(ps, qs, strict=True):
        torch.testing.assert_close(p.grad, q.grad, equal_nan=True)


def test_clip_uses_native_kernels_under_auto_when_built():
    if "cpu" not in _backends.available_backends("cpu"):
        pytest.skip("fused_optim._C is not built")
    assert _backends.resolve("auto", torch.device("cpu"), torch.float32) == "cpu"
