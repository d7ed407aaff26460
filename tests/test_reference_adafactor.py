"""The Adafactor reference (both flavours) against its outside oracles: torch.optim.Adafactor
(foreach=False; its own test configurations plus more) and transformers' Adafactor (every
option), compared after every step on params and state; plus GradScaler, clipping, empty and
0-d tensors."""

import ast
import math
from pathlib import Path

import pytest
import torch

from fused_optim._reference.adafactor import adafactor, adafactor_transformers

SHAPES = [(), (0,), (7,), (5, 3), (2, 3, 4), (1, 9), (33, 17)]
# torch.optim.Adafactor divides by numel on the host: an empty tensor raises ZeroDivisionError
# there, so the empty tensor is checked on its own below.
TORCH_SHAPES = [s for s in SHAPES if math.prod(s) != 0]
STEPS = 6
RTOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def _tensors(shapes, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


def _grads(shapes, dtype, step):
    # Gradient scales that differ per step, so the statistics really move.
    return _tensors(shapes, dtype, 1000 + step, scale=0.5 + 0.4 * step)


def _close(actual, expected, dtype, what):
    """Relative to each element, with an absolute floor relative to the tensor's largest
    element (elements near 0 carry the rounding of their neighbours' magnitude)."""
    rtol = RTOL[dtype]
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, msg=what)


# ------------------------------------------------------------------ torch flavour (3a)


def _present(states: list) -> list:
    """The compact state list the functions take (entries of params that have the state)."""
    return [t for t in states if t is not None]


class _TorchFlavour:
    """Our reference's tensors for a list of params, laid out as torch.optim.Adafactor's."""

    def __init__(self, params):
        self.params = params
        self.rows = [p.new_zeros(p.shape[:-1] + (1,)) if p.dim() >= 2 else None for p in params]
        self.cols = [
            p.new_zeros(p.shape[:-2] + (1,) + p.shape[-1:]) if p.dim() >= 2 else None for p in params
        ]
        self.variances = [torch.zeros_like(p) if p.dim() < 2 else None for p in params]
        self.steps = [torch.zeros((), dtype=torch.float32) for _ in params]

    def step(self, grads, *, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0,
             weight_decay=0.0, maximize=False, **scaler):  # fmt: skip
        adafactor(
            self.params, grads, _present(self.rows), _present(self.cols), _present(self.variances),
            self.steps, lr=lr,
            beta2_decay=beta2_decay, eps1=eps[0], eps2=eps[1], d=d, weight_decay=weight_decay,
            maximize=maximize, **scaler,
        )  # fmt: skip


def _check_against_torch(dtype, kwargs, shapes=TORCH_SHAPES, steps=STEPS):
    ours = _tensors(shapes, dtype, 0)
    theirs = [torch.nn.Parameter(p.clone()) for p in ours]
    opt = torch.optim.Adafactor(theirs, foreach=False, **kwargs)
    ref = _TorchFlavour(ours)
    for k in range(steps):
        grads = _grads(shapes, dtype, k)
        for p, g in zip(theirs, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        ref.step(grads, **kwargs)
        for i, p in enumerate(theirs):
            s, where = opt.state[p], f"step {k + 1}, shape {tuple(p.shape)}"
            _close(ours[i], p.detach(), dtype, f"param, {where}")
            if p.dim() >= 2:
                assert s["row_var"].shape == ref.rows[i].shape
                assert s["col_var"].shape == ref.cols[i].shape
                _close(ref.rows[i], s["row_var"], dtype, f"row_var, {where}")
                _close(ref.cols[i], s["col_var"], dtype, f"col_var, {where}")
            else:
                _close(ref.variances[i], s["variance"], dtype, f"variance, {where}")
            assert ref.steps[i].dtype == s["step"].dtype == torch.float32
            assert ref.steps[i].item() == s["step"].item() == k + 1


TORCH_CONFIGS = {
    "default": {},
    "lr_large": {"lr": 0.5},  # rho = 1/sqrt(t) from step 5 on
    "lr_one": {"lr": 1.0},
    "lr_tensor": {"lr": "tensor"},
    "lr_tensor_1elem": {"lr": "tensor1"},
    "beta2_decay_-0.5": {"beta2_decay": -0.5},
    "beta2_decay_-1": {"beta2_decay": -1.0},
    "beta2_decay_0": {"beta2_decay": 0.0},  # w = 1: no memory at all
    "eps1_tiny": {"eps": (1e-30, 1e-3)},
    "eps1_zero": {"eps": (0.0, 1e-3)},
    "eps1_large": {"eps": (0.3, 1e-3)},  # the clamps on mean(row_var) and est bite
    "eps2_large": {"eps": (None, 2.0)},  # eps2 > RMS(theta)
    "eps2_zero": {"eps": (None, 0.0)},
    "d_1.5": {"d": 1.5},
    "d_large": {"d": 1e6},  # no update clipping
    "weight_decay": {"weight_decay": 0.1},
    "weight_decay_lr": {"weight_decay": 0.3, "lr": 0.5},
    "maximize": {"maximize": True},
    "everything": {
        "lr": 0.2,
        "beta2_decay": -0.6,
        "eps": (1e-4, 1e-2),
        "d": 1.2,
        "weight_decay": 0.05,
        "maximize": True,
    },  # fmt: skip
}


def _materialise(kwargs, dtype):
    kwargs = dict(kwargs)
    # A tensor lr in the param's dtype: torch multiplies it into alpha as a tensor, so an fp32
    # lr would round alpha to fp32 in an fp64 run.
    if kwargs.get("lr") == "tensor":
        kwargs["lr"] = torch.tensor(0.03, dtype=dtype)
    elif kwargs.get("lr") == "tensor1":
        kwargs["lr"] = torch.tensor([0.03], dtype=dtype)
    return kwargs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", list(TORCH_CONFIGS))
def test_torch_flavour_matches_torch(name, dtype):
    _check_against_torch(dtype, _materialise(TORCH_CONFIGS[name], dtype))


def _torch_own_configs():
    """torch's own optim_inputs_func_adafactor, read from its source: importing
    common_optimizers needs expecttest and much of torch's test machinery."""
    import torch.testing._internal as internal

    path = Path(internal.__file__).parent / "common_optimizers.py"
    tree = ast.parse(path.read_text())
    fn = [n for n in tree.body if isinstance(n, ast.FunctionDef)
          and n.name == "optim_inputs_func_adafactor"]  # fmt: skip
    if not fn:
        return []
    ns = {"OptimizerInput": lambda params, kwargs, desc: pytest.param(kwargs, id=desc)}
    exec(compile(ast.Module(body=fn, type_ignores=[]), str(path), "exec"), ns)
    return ns["optim_inputs_func_adafactor"]("cpu")


TORCH_OWN = _torch_own_configs()


def test_torch_own_configs_found():
    assert len(TORCH_OWN) >= 5, "torch's optim_inputs_func_adafactor moved or shrank"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("kwargs", TORCH_OWN)
def test_torch_flavour_matches_torch_own_configs(kwargs, dtype):
    _check_against_torch(dtype, kwargs)


def test_torch_flavour_eps1_none_is_finfo_eps_of_param_dtype():
    shapes = [(5, 3), (7,)]
    explicit = _tensors(shapes, torch.float32, 0)
    default = [p.clone() for p in explicit]
    a, b = _TorchFlavour(explicit), _TorchFlavour(default)
    for k in range(3):
        grads = _grads(shapes, torch.float32, k)
        a.step(grads, eps=(torch.finfo(torch.float32).eps, 1e-3))
        b.step(grads, eps=(None, 1e-3))
    for x, y in zip(explicit, default, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


# ------------------------------------------------------------ transformers flavour (3b)


class _HFFlavour:
    """Our reference's tensors laid out as transformers' Adafactor state."""

    def __init__(self, params, beta1):
        self.params = params
        st = [torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype
              for p in params]  # fmt: skip
        f = [p.dim() >= 2 for p in params]
        self.rows = [torch.zeros(p.shape[:-1], dtype=d) if fa else None
                     for p, d, fa in zip(params, st, f, strict=True)]  # fmt: skip
        self.cols = [torch.zeros(p.shape[:-2] + p.shape[-1:], dtype=d) if fa else None
                     for p, d, fa in zip(params, st, f, strict=True)]  # fmt: skip
        self.sqs = [None if fa else torch.zeros(p.shape, dtype=d)
                    for p, d, fa in zip(params, st, f, strict=True)]  # fmt: skip
        self.exp_avgs = [torch.zeros(p.shape, dtype=d) if beta1 is not None else None
                         for p, d in zip(params, st, strict=True)]  # fmt: skip
        self.rmss = [torch.zeros((), dtype=d) for d in st]
        self.steps = [torch.zeros((), dtype=torch.float32) for _ in params]

    def step(self, grads, *, lr=None, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8,
             beta1=None, weight_decay=0.0, scale_parameter=True, relative_step=True,
             warmup_init=False, **scaler):  # fmt: skip
        adafactor_transformers(
            self.params, grads, _present(self.rows), _present(self.cols), _present(self.sqs),
            _present(self.exp_avgs), self.rmss, self.steps, lr=lr, eps1=eps[0], eps2=eps[1],
            clip_threshold=clip_threshold,
            decay_rate=decay_rate, beta1=beta1, weight_decay=weight_decay,
            scale_parameter=scale_parameter, relative_step=relative_step,
            warmup_init=warmup_init, **scaler,
        )  # fmt: skip


HF_CONFIGS = {
    "default": {},
    "warmup_init": {"warmup_init": True},
    "relative_no_scale": {"scale_parameter": False},
    "warmup_no_scale": {"warmup_init": True, "scale_parameter": False},
    "lr_no_scale": {"relative_step": False, "scale_parameter": False, "lr": 1e-2},
    "lr_scale": {"relative_step": False, "scale_parameter": True, "lr": 0.3},
    "beta1": {"beta1": 0.9},
    "beta1_lr": {"beta1": 0.9, "relative_step": False, "scale_parameter": False, "lr": 1e-3},
    "beta1_0": {"beta1": 0.0},
    "weight_decay": {"weight_decay": 0.1},
    "weight_decay_lr": {"weight_decay": 0.2, "relative_step": False, "lr": 0.05},
    "clip_small": {"clip_threshold": 0.5},
    "clip_large": {"clip_threshold": 1e6},
    "decay_rate_-0.5": {"decay_rate": -0.5},
    "decay_rate_-1": {"decay_rate": -1.0},
    "eps1_large": {"eps": (1e-2, 1e-3)},  # eps1 comparable to g^2
    "eps2_large": {"eps": (1e-30, 2.0)},  # eps2 > RMS(theta)
    "eps_zero": {"eps": (0.0, 0.0)},
    # The usual T5 fine-tuning recipe, plus everything else switched on.
    "finetune": {
        "scale_parameter": False,
        "relative_step": False,
        "warmup_init": False,
        "lr": 1e-3,
        "beta1": 0.9,
        "weight_decay": 0.01,
    },  # fmt: skip
    "everything": {
        "warmup_init": True,
        "beta1": 0.8,
        "weight_decay": 0.05,
        "clip_threshold": 0.7,
        "decay_rate": -0.6,
        "eps": (1e-20, 1e-2),
    },  # fmt: skip
}


def _check_against_hf(dtype, kwargs, shapes=SHAPES, steps=STEPS, param_dtype=None):
    tr = pytest.importorskip("transformers")
    from transformers.optimization import Adafactor as HFAdafactor

    param_dtype = param_dtype or dtype
    ours = _tensors(shapes, param_dtype, 0)
    theirs = [torch.nn.Parameter(p.clone()) for p in ours]
    opt = HFAdafactor(theirs, **kwargs)
    ref = _HFFlavour(ours, kwargs.get("beta1"))
    for k in range(steps):
        grads = _grads(shapes, param_dtype, k)
        for p, g in zip(theirs, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        ref.step(grads, **kwargs)
        for i, p in enumerate(theirs):
            s, where = opt.state[p], f"step {k + 1}, shape {tuple(p.shape)}, {tr.__version__}"
            _close(ours[i], p.detach(), dtype, f"param, {where}")
            if p.dim() >= 2:
                assert s["exp_avg_sq_row"].shape == ref.rows[i].shape
                assert s["exp_avg_sq_col"].shape == ref.cols[i].shape
                assert s["exp_avg_sq_row"].dtype == ref.rows[i].dtype
                _close(ref.rows[i], s["exp_avg_sq_row"], dtype, f"exp_avg_sq_row, {where}")
                _close(ref.cols[i], s["exp_avg_sq_col"], dtype, f"exp_avg_sq_col, {where}")
                assert "exp_avg_sq" not in s
            else:
                assert s["exp_avg_sq"].dtype == ref.sqs[i].dtype
                _close(ref.sqs[i], s["exp_avg_sq"], dtype, f"exp_avg_sq, {where}")
            if kwargs.get("beta1") is not None:
                _close(ref.exp_avgs[i], s["exp_avg"], dtype, f"exp_avg, {where}")
            else:
                assert "exp_avg" not in s
            if p.numel() == 0:
                # transformers stores RMS = 0/0 = NaN for an empty tensor; ours keeps 0.
                assert torch.isnan(s["RMS"]) and ref.rmss[i].item() == 0.0
            else:
                _close(ref.rmss[i], s["RMS"].to(ref.rmss[i].dtype), dtype, f"RMS, {where}")
            assert ref.steps[i].item() == s["step"] == k + 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_transformers_flavour_matches_transformers(name, dtype):
    _check_against_hf(dtype, HF_CONFIGS[name])


@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_transformers_flavour_16bit_params_fp32_state(param_dtype):
    """16-bit params: fp32 state and fp32 math in both; the params themselves round to 16 bits,
    so they are compared to within one unit in the last place of the 16-bit type, the fp32
    state to 1e-6 (a one-ulp parameter difference would show there first)."""
    pytest.importorskip("transformers")
    from transformers.optimization import Adafactor as HFAdafactor

    shapes = [s for s in SHAPES if math.prod(s) != 0]
    kwargs = {"beta1": 0.9, "weight_decay": 0.01}
    ours = _tensors(shapes, param_dtype, 0)
    theirs = [torch.nn.Parameter(p.clone()) for p in ours]
    opt = HFAdafactor(theirs, **kwargs)
    ref = _HFFlavour(ours, 0.9)
    for k in range(3):
        grads = _grads(shapes, param_dtype, k)
        for p, g in zip(theirs, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        ref.step(grads, **kwargs)
    ulp = torch.finfo(param_dtype).eps
    for i, p in enumerate(theirs):
        torch.testing.assert_close(ours[i], p.detach(), rtol=ulp, atol=ulp)
        key = "exp_avg_sq_row" if p.dim() >= 2 else "exp_avg_sq"
        mine = ref.rows[i] if p.dim() >= 2 else ref.sqs[i]
        assert mine.dtype == opt.state[p][key].dtype == torch.float32
        torch.testing.assert_close(mine, opt.state[p][key], rtol=1e-6, atol=1e-9)


# --------------------------------------------- GradScaler, clipping, empty and 0-d tensors


def _flavours():
    """(name, state factory, step kwargs) for both flavours, options chosen so every branch
    (weight decay, momentum, clipping) runs."""
    return [
        ("torch", _TorchFlavour, {"lr": 0.05, "weight_decay": 0.1, "maximize": True}),
        ("transformers", lambda ps: _HFFlavour(ps, 0.9), {"beta1": 0.9, "weight_decay": 0.1}),
    ]


FLAVOURS = [pytest.param(f, kw, id=n) for n, f, kw in _flavours()]


def _all_state(ref):
    out = list(ref.params) + list(ref.steps)
    for name in ("rows", "cols", "variances", "sqs", "exp_avgs", "rmss"):
        out += [t for t in getattr(ref, name, []) if t is not None]
    return [t.clone() for t in out]


@pytest.mark.parametrize("factory,kw", FLAVOURS)
def test_found_inf_skips_everything(factory, kw):
    ref = factory(_tensors(SHAPES, torch.float32, 0))
    ref.step(_grads(SHAPES, torch.float32, 0), **kw)
    before = _all_state(ref)
    bad = _grads(SHAPES, torch.float32, 1)
    bad[3][0, 0] = float("inf")
    ref.step(bad, found_inf=torch.ones(1), grad_scale=torch.full((1,), 8.0), **kw)
    for a, b in zip(_all_state(ref), before, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    ref.step(_grads(SHAPES, torch.float32, 1), found_inf=torch.zeros(1), **kw)
    assert all(s.item() == 2 for s in ref.steps)  # found_inf == 0 steps normally


@pytest.mark.parametrize("factory,kw", FLAVOURS)
@pytest.mark.parametrize("scaler", ["grad_scale", "clip_coef"])
def test_grad_scale_divides_and_clip_coef_multiplies(factory, kw, scaler):
    dtype, factor = torch.float64, 1024.0
    plain = factory(_tensors(SHAPES, dtype, 0))
    scaled = factory(_tensors(SHAPES, dtype, 0))
    for k in range(4):
        grads = _grads(SHAPES, dtype, k)
        coef = 0.375 if scaler == "clip_coef" else 1.0 / factor
        plain.step([g * coef for g in grads], **kw)
        s = torch.tensor([factor if scaler == "grad_scale" else coef], dtype=torch.float32)
        scaled.step(grads, **{scaler: s}, **kw)
    for a, b in zip(_all_state(scaled), _all_state(plain), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("factory,kw", FLAVOURS)
def test_empty_and_zero_dim(factory, kw):
    shapes = [(0,), (0, 5), (3, 0), (2, 0, 4), ()]
    params = _tensors(shapes, torch.float32, 0)
    ref = factory(params)
    for k in range(3):
        ref.step(_grads(shapes, torch.float32, k), **kw)
    assert all(s.item() == 3 for s in ref.steps)
    assert params[-1].shape == () and torch.isfinite(params[-1])
    for t in _all_state(ref):
        assert torch.isfinite(t).all()


def test_lr_tensor_equals_float():
    for factory, kw in [(_TorchFlavour, {}),
                        (lambda ps: _HFFlavour(ps, None), {"relative_step": False})]:  # fmt: skip
        a = factory(_tensors(SHAPES, torch.float64, 0))
        b = factory(_tensors(SHAPES, torch.float64, 0))
        for k in range(3):
            grads = _grads(SHAPES, torch.float64, k)
            a.step(grads, lr=0.125, **kw)
            b.step(grads, lr=torch.tensor([0.125]), **kw)
        for x, y in zip(_all_state(a), _all_state(b), strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("factory,kw", FLAVOURS)
def test_zero_and_tiny_gradients(factory, kw):
    """A zero gradient gives a finite state and no update beyond the weight decay; a gradient
    of RMS ~1e-15 (r_i·c_j ~1e-60 would underflow in fp32) agrees with the fp64 run."""
    shapes = [(5, 3), (2, 3, 4), (7,)]
    kw = {**kw, "weight_decay": 0.0}
    zero = factory(_tensors(shapes, torch.float32, 0))
    start = [p.clone() for p in zero.params]
    zero.step([torch.zeros(s) for s in shapes], **kw)
    for a, b in zip(zero.params, start, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for t in _all_state(zero):
        assert torch.isfinite(t).all()
    kw["eps"] = (1e-35, 1e-3)  # the same eps1 in fp32 and fp64, below the g^2 ~ 1e-30
    runs = {}
    for dtype in (torch.float32, torch.float64):
        ref = factory(_tensors(shapes, dtype, 0))
        for k in range(3):
            ref.step([g * 1e-15 for g in _grads(shapes, dtype, k)], **kw)
        runs[dtype] = ref.params
    for a, b in zip(runs[torch.float32], runs[torch.float64], strict=True):
        torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-6)
