"""Bad input gets a clear error naming the problem, and never corrupts params or state."""

import copy
import os
import subprocess
import sys

import pytest
import torch
from conftest import backend_device_params

import fused_optim
from fused_optim import functional


def _p(*shape, dtype=torch.float32):
    return torch.nn.Parameter(torch.randn(*shape, dtype=dtype))


@pytest.mark.parametrize(
    "cls,kwargs,match",
    [
        (fused_optim.AdamW, dict(lr=-1e-3), "lr"),
        (fused_optim.AdamW, dict(lr=float("nan")), "lr"),
        (fused_optim.AdamW, dict(lr=torch.ones(2)), "lr"),
        (fused_optim.AdamW, dict(betas=(1.0, 0.999)), "beta1"),
        (fused_optim.AdamW, dict(betas=(0.9, -0.1)), "beta2"),
        (fused_optim.AdamW, dict(betas=(0.9,)), "betas"),
        (fused_optim.Adam, dict(eps=-1.0), "eps"),
        (fused_optim.Adam, dict(weight_decay=-0.1), "weight_decay"),
        (fused_optim.AdamW, dict(max_grad_norm=0.0), "max_grad_norm"),
        (fused_optim.AdamW, dict(max_grad_norm=-1.0), "max_grad_norm"),
        (fused_optim.AdamW, dict(backend="gpu"), "backend"),
        (fused_optim.Adam, dict(differentiable=True), "differentiable"),
        (fused_optim.AdaX, dict(betas=(0.9, 0.0)), "beta2"),
        (fused_optim.AdaXW, dict(lr=-1.0), "lr"),
    ],
)
def test_invalid_hyper_parameters_raise_value_error_naming_them(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls([_p(3)], **kwargs)


def test_invalid_param_group_is_rejected_and_not_added():
    opt = fused_optim.AdamW([_p(3)])
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [_p(2)], "lr": -1.0})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize(
    "kwargs,match", [(dict(max_norm=torch.ones(2)), "max_norm"), (dict(norm_type=float("nan")), "norm_type")]
)
def test_clip_rejects_bad_arguments(kwargs, match):
    p = _p(3)
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match=match):
        fused_optim.clip_grad_norm_([p], **{"max_norm": 1.0, **kwargs})


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_sparse_gradients_are_refused(backend, device):
    emb = torch.nn.Embedding(10, 3, sparse=True).to(device)
    emb(torch.tensor([1, 2], device=device)).sum().backward()
    opt = fused_optim.AdamW(emb.parameters(), backend=backend)
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(emb.weight.detach(), before)


def test_complex_params_are_refused():
    with pytest.raises(TypeError, match="complex"):
        fused_optim.AdamW([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])


def _lists(params):
    return dict(
        grads=[torch.randn_like(p) for p in params],
        exp_avgs=[torch.zeros_like(p) for p in params],
        exp_avg_sqs=[torch.zeros_like(p) for p in params],
        max_exp_avg_sqs=[],
        state_steps=[torch.zeros((), dtype=torch.float32, device=p.device) for p in params],
    )


def _call(params, lists, backend):
    functional.adam(params, lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"],
                    lists["max_exp_avg_sqs"], lists["state_steps"], lr=1e-3, backend=backend)  # fmt: skip


@pytest.mark.parametrize("backend", ["cpu"])
def test_native_errors_leave_every_tensor_untouched(backend):
    if backend not in fused_optim.available_backends("cpu"):
        pytest.skip("fused_optim._C is not built")
    cases = [
        # (how to spoil the last tensor, exception, message fragment)
        (lambda p, lst: lst["grads"].__setitem__(-1, torch.randn(5)), RuntimeError, "size"),
        (lambda p, lst: lst["grads"].__setitem__(-1, torch.randn(4).double()), TypeError, "dtype"),
        (lambda p, lst: lst["grads"].__setitem__(-1, torch.randn(4, device="meta")), RuntimeError, "meta"),
        (lambda p, lst: lst["state_steps"].__setitem__(-1, torch.zeros((), dtype=torch.int64)), RuntimeError,
         "state_steps"),
        (lambda p, lst: lst["exp_avgs"].pop(), RuntimeError, "same length"),
    ]  # fmt: skip
    for spoil, exc, match in cases:
        params = [torch.randn(3), torch.randn(7), torch.randn(4)]
        lists = _lists(params)
        spoil(params, lists)
        before = copy.deepcopy((params, lists))
        with pytest.raises(exc, match=match):
            _call(params, lists, backend)
        after = (params, lists)
        for x, y in zip(before[0], after[0], strict=True):
            assert torch.equal(x, y)
        for key in lists:
            for x, y in zip(before[1][key], after[1][key], strict=True):
                assert x.device.type == "meta" or torch.equal(x, y)


def test_unsupported_dtype_with_an_explicit_native_backend():
    if "cpu" not in fused_optim.available_backends("cpu"):
        pytest.skip("fused_optim._C is not built")
    params = [torch.randn(3, dtype=torch.float64)]
    with pytest.raises(RuntimeError, match="float32, float16 and bfloat16, not torch.float64"):
        _call(params, _lists(params), "cpu")


def test_explicit_backend_that_cannot_run_names_what_is_missing(monkeypatch):
    p = _p(3)
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="cuda backend runs on CUDA tensors"):
        fused_optim.AdamW([p], backend="cuda").step()
    monkeypatch.setenv("FUSED_OPTIM_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cuda"):
        fused_optim.AdamW([p]).step()
    monkeypatch.setenv("FUSED_OPTIM_BACKEND", "fastest")
    with pytest.raises(ValueError, match="FUSED_OPTIM_BACKEND"):
        fused_optim.AdamW([p]).step()
    monkeypatch.setenv("FUSED_OPTIM_BACKEND", "reference")
    before = p.detach().clone()
    fused_optim.AdamW([p], lr=0.1).step()  # the env var picks the backend when backend="auto"
    assert not torch.equal(p.detach(), before)


def test_import_without_the_extension_warns_once_and_falls_back():
    code = (
        "import sys, warnings\n"
        "sys.modules['fused_optim._C'] = None  # as if the extension were not built\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import fused_optim, torch\n"
        "msgs = [str(x.message) for x in w if 'fused_optim' in str(x.message)]\n"
        "assert len(msgs) == 1 and 'reference' in msgs[0] and 'pip install' in msgs[0], msgs\n"
        "p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)\n"
        "fused_optim.AdamW([p], lr=0.1).step()\n"
        "assert (p < 1).all()\n"
        "assert fused_optim.available_backends('cpu') == ['reference']\n"
        "try:\n"
        "    fused_optim.AdamW([p], backend='cpu').step()\n"
        "except RuntimeError as e:\n"
        "    assert 'pip install' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('backend=cpu should fail without the extension')\n"
        "print('ok')\n"
    )
    # Without TRITON_INTERPRET, so that the reference is the only backend left on CPU.
    env = {k: v for k, v in os.environ.items() if k not in ("FUSED_OPTIM_BACKEND", "TRITON_INTERPRET")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
