"""Shared test helpers: which backends can run here, tolerances per dtype, random cases."""

import os

import pytest
import torch

import fused_optim
from fused_optim import _backends

HAS_CUDA = torch.cuda.is_available()
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def backends_for(device: str) -> list[str]:
    """Fused backends (not the reference) that can run on `device` tensors here."""
    return [b for b in fused_optim.available_backends(device) if b != "reference"]


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if HAS_CUDA else [])


def backend_device_params():
    """(backend, device) pairs for every fused backend runnable here."""
    pairs = [(b, d) for d in devices() for b in backends_for(d)]
    return [pytest.param(b, d, id=f"{b}-{d}") for b, d in pairs]


# Tolerances for comparing a backend with the reference on the same storage dtype after a few
# steps: a couple of units in the last place of the storage dtype (both compute in fp32).
TOL = {
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=4e-3, atol=2e-3),
    torch.float64: dict(rtol=1e-12, atol=1e-14),
}


def assert_close(actual, expected, dtype=None, msg=""):
    tol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), **tol, msg=lambda m: f"{msg}\n{m}")


def random_tensors(shapes, dtype, device, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g, dtype=torch.float32) * scale).to(dtype).to(device) for s in shapes]


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    monkeypatch.delenv(_backends.ENV_VAR, raising=False)
