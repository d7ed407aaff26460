"""Launches per optimizer step on the Triton backend (on CPU tensors under TRITON_INTERPRET=1,
as in CI): AdamW with max_grad_norm over 300 tensors of mixed sizes is at most 3 launches (norm,
coefficient, update), whatever the number of tensors. tests/test_gpu.py counts the CUDA
backend's kernels with the profiler."""

import importlib.util
import os

import pytest
import torch
from conftest import random_tensors

import fused_optim

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(
        importlib.util.find_spec("triton") is None
        or not (os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()),
        reason="needs triton, and TRITON_INTERPRET=1 or a CUDA device",
    ),
]


def _launches_per_step(n_tensors: int, device: str, monkeypatch) -> int:
    from fused_optim.triton_kernels import _plan

    sizes = torch.randint(1, 400, (n_tensors,), generator=torch.Generator().manual_seed(n_tensors))
    params = [
        torch.nn.Parameter(t) for t in random_tensors([(int(s),) for s in sizes], torch.float32, device, 0)
    ]
    for p, g in zip(params, random_tensors([p.shape for p in params], torch.float32, device, 1), strict=True):
        p.grad = g
    opt = fused_optim.AdamW(params, lr=1e-3, max_grad_norm=1.0, backend="triton")
    opt.step()  # the first step builds states and plans

    launched = []
    real = _plan._launch
    monkeypatch.setattr(
        _plan,
        "_launch",
        lambda kernel, grid, *a, **kw: (launched.append(kernel), real(kernel, grid, *a, **kw)),
    )
    before = [p.detach().clone() for p in params]
    opt.step()
    assert all(not torch.equal(p.detach(), b) for p, b in zip(params, before, strict=True))  # it did update
    return len(launched)


def test_adamw_with_clipping_is_three_launches_whatever_the_tensor_count(monkeypatch):
    device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    assert _launches_per_step(300, device, monkeypatch) <= 3
    assert _launches_per_step(300, device, monkeypatch) == _launches_per_step(7, device, monkeypatch)
