"""The fused Adafactor backends (both flavours) against the reference (fused_optim._reference),
called through fused_optim.functional: fp32 storage against the reference in fp64, 16-bit
storage against the reference on the same storage; every option, odd shapes, GradScaler and
clipping, zero and tiny gradients, non-contiguous params; for the Triton backend also its launch
count, that hyper-parameters and steps do not recompile, and that its kernels compile for a GPU.

The triton cases run on CPU tensors under TRITON_INTERPRET=1 (CI) or on CUDA tensors; the cpu
cases run once the native op torch.ops.fused_optim.adafactor_ is built (skipped with the reason
until then). Sizes are small: the interpreter executes every program in Python."""

import importlib
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fused_optim import _backends, functional
from fused_optim import _reference as reference
from fused_optim.optim.adafactor import ShardSums

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _cpu_unavailable() -> str | None:
    reason = _backends.unavailable_reason("cpu", "cpu")
    if reason is None and not hasattr(torch.ops.fused_optim, "adafactor_"):
        reason = "the native op torch.ops.fused_optim.adafactor_ is not in this build of fused_optim._C"
    return reason


def _triton_unavailable() -> str | None:
    if not HAS_TRITON:
        return "triton is not installed"
    if not (INTERPRET or torch.cuda.is_available()):
        return "the triton backend needs CUDA or TRITON_INTERPRET=1 (CPU)"
    return None


_CPU_REASON = _cpu_unavailable()
_TRITON_REASON = _triton_unavailable()
BACKENDS = [
    pytest.param("cpu", marks=pytest.mark.skipif(_CPU_REASON is not None, reason=str(_CPU_REASON)), id="cpu"),
    pytest.param(
        "triton",
        marks=[
            pytest.mark.triton,
            pytest.mark.skipif(_TRITON_REASON is not None, reason=str(_TRITON_REASON)),
        ],
        id="triton",
    ),
]
triton_only = [pytest.mark.triton, pytest.mark.skipif(_TRITON_REASON is not None, reason=str(_TRITON_REASON))]


def _device(backend: str) -> torch.device:
    if backend == "cuda" or (backend == "triton" and not INTERPRET):
        return torch.device("cuda")
    return torch.device("cpu")


# Odd shapes: 0-d, 1 element, full tensors of one block and of several, a row vector and a
# column vector (two row blocks of one column), a row longer than a tile, 3-D / 4-D batches of
# matrices (a 3x3 conv kernel), a matrix taller than two tiles, empty tensors.
SHAPES = [
    (),
    (1,),
    (7,),
    (4097,),
    (1, 300),
    (40, 1),
    (3, 700),
    (2, 3, 5, 7),
    (4, 3, 3, 3),
    (70, 9),
    (0, 5),
    (0,),
]
# For the sweeps over options: one full tensor, a matrix of two column blocks, a batch of two
# matrices of two row blocks each (the interpreter runs every program in Python: keep them few).
SMALL = [(5,), (3, 300), (2, 35, 3)]
STEPS = 2

TORCH_DEFAULT = dict(lr=1e-2, beta2_decay=-0.8, eps1=None, eps2=1e-3, d=1.0, weight_decay=0.0, maximize=False)
TORCH_CONFIGS = {
    "default": {},
    "maximize_weight_decay": dict(maximize=True, weight_decay=0.1),
    "eps1_d_beta2_decay": dict(eps1=1e-4, d=0.5, beta2_decay=-0.5),  # d < RMS(u): the update is clipped
    "large_lr": dict(lr=0.5, weight_decay=0.3),  # rho = 1/sqrt(t); lr (not rho) in the decay
    "large_eps": dict(eps1=0.3, eps2=2.0),  # the clamps on mean(r), est and RMS(theta) bite
    "lr_tensor_f64": dict(lr="f64"),
    "lr_tensor_f32": dict(lr="f32", weight_decay=0.05),
}
HF_DEFAULT = dict(
    lr=None,
    eps1=1e-30,
    eps2=1e-3,
    clip_threshold=1.0,
    decay_rate=-0.8,
    beta1=None,
    weight_decay=0.0,
    scale_parameter=True,
    relative_step=True,
    warmup_init=False,
)
HF_CONFIGS = {
    "default": {},
    "warmup_init": dict(warmup_init=True),
    "lr": dict(relative_step=False, lr=0.05),
    "lr_no_scale_parameter": dict(relative_step=False, lr=0.05, scale_parameter=False),
    "beta1_weight_decay": dict(beta1=0.9, weight_decay=0.1),
    "clip_decay_rate_eps": dict(clip_threshold=0.5, decay_rate=-0.5, eps1=1e-3, eps2=0.5),
    "lr_tensor": dict(relative_step=False, lr="f32", beta1=0.5),
    "no_rms_state": dict(beta1=0.8, weight_decay=0.05, scale_parameter=False, no_rms=True),
}


class State:
    """A list of params with the compact state lists of one flavour, stepped by a backend or
    the reference. flavour "torch": row_vars, col_vars, variances; "hf": exp_avg_sq_rows,
    exp_avg_sq_cols, exp_avg_sqs, exp_avgs, rmss."""

    def __init__(self, flavour, params, state_dtype=None, beta1=False, rms=True, step0=0.0, seed=0):
        self.flavour = flavour
        self.params = params
        gen = torch.Generator().manual_seed(seed + 7)

        def stat(shape, like):
            # Positive second moments, as after earlier steps (zeros when starting at step 0).
            dtype = state_dtype or like.dtype
            x = torch.rand(shape, generator=gen, dtype=torch.float64) if step0 else torch.zeros(shape)
            return x.to(dtype).to(like.device)

        factored = [p for p in params if p.dim() >= 2]
        if flavour == "torch":
            rows = [stat(p.shape[:-1] + (1,), p) for p in factored]
            cols = [stat(p.shape[:-2] + (1,) + p.shape[-1:], p) for p in factored]
        else:
            rows = [stat(p.shape[:-1], p) for p in factored]
            cols = [stat(p.shape[:-2] + p.shape[-1:], p) for p in factored]
        full = [stat(p.shape, p) for p in params if p.dim() < 2]
        self.states = [rows, cols, full]
        if flavour == "hf":
            exp_avgs = [stat(p.shape, p) for p in params] if beta1 else []
            rmss = [torch.zeros((), device=p.device) for p in params] if rms else []
            self.states += [exp_avgs, rmss]
        self.steps = [torch.full((), step0, device=p.device) for p in params]

    def copy(self, fp64: bool = False):
        """A copy, in fp64 (params and states; RMS and steps stay float32) for the reference."""
        other = object.__new__(State)
        other.flavour = self.flavour
        conv = (lambda t: t.to(torch.float64, copy=True)) if fp64 else torch.clone
        other.params = [conv(p) for p in self.params]
        other.states = [[conv(t) for t in lst] for lst in self.states]
        if self.flavour == "hf":
            other.states[4] = [t.clone() for t in self.states[4]]
        other.steps = [s.clone() for s in self.steps]
        return other

    def tensors(self):
        """name -> list of tensors, for comparisons."""
        names = ["rows", "cols", "full"] + (["exp_avgs", "rmss"] if self.flavour == "hf" else [])
        out = {"params": self.params, "steps": self.steps}
        out.update(zip(names, self.states, strict=True))
        return out

    def step(self, grads, backend, **kw):
        if self.flavour == "torch":
            fn = reference.adafactor if backend == "reference" else functional.adafactor
        else:
            fn = (
                reference.adafactor_transformers
                if backend == "reference"
                else functional.adafactor_transformers
            )
        if backend != "reference":
            kw = dict(kw, backend=backend)
        fn(self.params, grads, *self.states, self.steps, **kw)


def _params(shapes, dtype, device, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(s, generator=g, dtype=torch.float64)).to(dtype).to(device) for s in shapes]


def _grads(shapes, dtype, device, step, scale=1.0):
    # A different scale every step, so the statistics really move.
    return _params(shapes, dtype, device, seed=1000 + step, scale=scale * (0.5 + 0.4 * step))


def _kwargs(flavour, config, device, dtype):
    """The call's keyword arguments from a config: lr "f32"/"f64" become tensors on the device."""
    kw = dict(TORCH_DEFAULT if flavour == "torch" else HF_DEFAULT, **config)
    kw.pop("no_rms", None)
    if isinstance(kw["lr"], str):
        value = 0.05 if flavour == "hf" else 0.02
        if kw["lr"] == "f64":
            kw["lr"] = torch.tensor(value, dtype=torch.float64, device=device)
        else:
            kw["lr"] = torch.tensor([value], dtype=torch.float32, device=device)
    return kw


def _reference_kwargs(kw, backend_dtype):
    """The reference in fp64 would take eps1=None as finfo(float64).eps: give it the backend's."""
    if "eps1" in kw and kw["eps1"] is None:
        kw = dict(kw, eps1=torch.finfo(backend_dtype).eps)
    return kw


def _close(actual, expected, what, rtol=1e-5):
    """Relative to each element, with an absolute floor relative to the tensor's largest element
    (elements near 0 carry the rounding of their neighbours' magnitude) and of a few fp32
    subnormal steps (the statistics of tiny gradients are subnormal, with fewer bits)."""
    assert actual.shape == expected.shape, what
    assert actual.dtype in (torch.float32, torch.float16, torch.bfloat16), what
    exp = expected.double()
    scale = exp.abs().max().item() if exp.numel() else 0.0
    atol = max(rtol * scale, 16 * 2.0**-149)
    torch.testing.assert_close(actual.double(), exp, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _ulp(x: torch.Tensor) -> torch.Tensor:
    fi = torch.finfo(x.dtype)
    _, exp = torch.frexp(x.float().abs())
    return torch.ldexp(torch.full_like(x, fi.eps, dtype=torch.float32), exp - 1).clamp_min(
        fi.smallest_normal * fi.eps
    )


def _close_ulps(actual, expected, before, what, ulps=2):
    """Same 16-bit storage on both sides: within `ulps` units in the last place of the larger of
    expected and the value before the step. A result that cancels (theta - update ~ 0) keeps the
    fp32 rounding of its operands: the full second moment v, stored in 16 bits by pass 1 and read
    back by the later passes, where the reference keeps it in fp32 within the step."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    diff = (actual.float() - expected.float()).abs()
    scale = torch.maximum(expected.float().abs(), before.float().abs()).to(expected.dtype)
    bad = ~(diff <= ulps * _ulp(scale))
    if bad.any():
        i = bad.flatten().nonzero()[0].item()
        got, want, was = (x.flatten()[i].item() for x in (actual, expected, before))
        raise AssertionError(
            f"{what} ({actual.dtype}, shape {tuple(actual.shape)}): {int(bad.sum())} elements off, the first "
            f"at flat index {i}: {got:.6g} instead of {want:.6g} (before the step: {was:.6g})"
        )


def _compare(ours: State, ref: State, where: str, rtol=1e-5, ulps=None, before=None):
    """ours against ref: 16-bit tensors within `ulps` (see _close_ulps; before: the State before
    the step), the others within rtol."""
    theirs = ref.tensors()
    for name, tensors in ours.tensors().items():
        for i, (a, e) in enumerate(zip(tensors, theirs[name], strict=True)):
            what = f"{name}[{i}] {where}"
            assert a.dtype != torch.float64, what
            if name == "steps":
                assert a.item() == e.item(), what
            elif ulps is not None and a.dtype != torch.float32:
                _close_ulps(a, e, before.tensors()[name][i], what, ulps)
            else:
                _close(a, e, what, rtol)


def _run_against_fp64(backend, flavour, config, shapes=SMALL, steps=STEPS, step0=0.0, grad_scale=1.0):
    device = _device(backend)
    kw = _kwargs(flavour, config, device, torch.float32)
    beta1 = kw.get("beta1") is not None
    rms = not config.get("no_rms", False)
    ours = State(flavour, _params(shapes, torch.float32, device), beta1=beta1, rms=rms, step0=step0)
    ref = ours.copy(fp64=True)
    for k in range(steps):
        grads = _grads(shapes, torch.float32, device, k, scale=grad_scale)
        ours.step(grads, backend, **kw)
        ref.step([g.double() for g in grads], "reference", **_reference_kwargs(kw, torch.float32))
        _compare(ours, ref, f"after step {k + 1}")
    return ours


# ---- every option, odd shapes, against the fp64 reference ----------------------------------------


@pytest.mark.parametrize("flavour", ["torch", "hf"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_shapes(backend, flavour):
    config = (
        dict(maximize=True, weight_decay=0.1) if flavour == "torch" else dict(beta1=0.9, weight_decay=0.1)
    )
    ours = _run_against_fp64(backend, flavour, config, shapes=SHAPES, steps=3)
    assert all(s.item() == 3 for s in ours.steps)  # empty tensors step too
    if flavour == "hf":
        for p, rms in zip(ours.params, ours.states[4], strict=True):
            if p.numel() == 0:
                assert rms.item() == 0.0  # not transformers' 0/0


@pytest.mark.parametrize("config", list(TORCH_CONFIGS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_flavour_options(backend, config):
    _run_against_fp64(backend, "torch", TORCH_CONFIGS[config])


@pytest.mark.parametrize("config", list(HF_CONFIGS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_transformers_flavour_options(backend, config):
    _run_against_fp64(backend, "hf", HF_CONFIGS[config])


@pytest.mark.parametrize("flavour", ["torch", "hf"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_later_steps_with_nonzero_state(backend, flavour):
    """Starting at step 10 from non-zero statistics: lerp below w = 0.5 (torch's other formula),
    transformers' beta2t well inside (0, 1)."""
    config = dict(beta1=0.9) if flavour == "hf" else dict(weight_decay=0.01)
    _run_against_fp64(backend, flavour, config, step0=10.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_small_tensors_and_larger_ones(backend):
    """Thirty small tensors of all kinds, a full tensor of two chunks and a matrix of 4 x 2 tiles."""
    shapes = [[(3 + i,), (2 + i % 5, 1 + i % 7), (2, 1 + i % 3, 4)][i % 3] for i in range(30)]
    shapes += [(8200,), (100, 300)]
    _run_against_fp64(backend, "hf", dict(beta1=0.9), shapes=shapes)


# ---- 16-bit storage: against the reference on the same storage -----------------------------------


@pytest.mark.parametrize(
    "flavour, dtype, state_dtype",
    [
        ("torch", torch.bfloat16, None),
        ("torch", torch.float16, None),
        ("hf", torch.bfloat16, torch.float32),  # transformers keeps fp32 state for 16-bit params
        ("hf", torch.float16, torch.float32),
        ("hf", torch.bfloat16, None),
    ],
    ids=["torch-bf16", "torch-fp16", "hf-bf16-fp32state", "hf-fp16-fp32state", "hf-bf16"],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_16bit_storage(backend, flavour, dtype, state_dtype):
    """Each step from the same state as the reference's (16-bit roundings would otherwise let
    the two trajectories drift apart by more than an ulp where updates cancel)."""
    device = _device(backend)
    shapes = [(), (4097,), (3, 300), (2, 35, 3), (0, 5)]
    config = (
        dict(weight_decay=0.1, maximize=True) if flavour == "torch" else dict(beta1=0.9, weight_decay=0.1)
    )
    kw = _kwargs(flavour, config, device, dtype)
    ref = State(flavour, _params(shapes, dtype, device), state_dtype=state_dtype, beta1=True)
    for k in range(3):
        grads = _grads(shapes, dtype, device, k)
        before, ours = ref.copy(), ref.copy()
        ours.step(grads, backend, **kw)
        ref.step([g.clone() for g in grads], "reference", **kw)
        # fp32 states (and RMS) depend on the 16-bit params only through RMS(theta)
        _compare(ours, ref, f"in step {k + 1}", rtol=1e-4, ulps=2, before=before)


# ---- GradScaler, clipping, lr, degenerate gradients ----------------------------------------------


@pytest.mark.parametrize("flavour", ["torch", "hf"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_found_inf_changes_nothing(backend, flavour):
    device = _device(backend)
    shapes = [(), (7,), (3, 5), (2, 3, 4), (0, 5)]
    kw = _kwargs(flavour, dict(beta1=0.9) if flavour == "hf" else {}, device, torch.float32)
    ours = State(flavour, _params(shapes, torch.float32, device), beta1=True, step0=2.0)
    twin = ours.copy()
    grads = _grads(shapes, torch.float32, device, 0)
    before = {name: [t.clone() for t in ts] for name, ts in ours.tensors().items()}
    ours.step(grads, backend, found_inf=torch.ones(1, device=device), **kw)
    for name, tensors in ours.tensors().items():
        for i, (a, b) in enumerate(zip(tensors, before[name], strict=True)):
            assert torch.equal(a, b), f"{name}[{i}] changed although found_inf was set"
    # found_inf = 0: the same step as without it
    ours.step(grads, backend, found_inf=torch.zeros(1, device=device), **kw)
    twin.step(grads, backend, **kw)
    _compare(ours, twin, "found_inf = 0", rtol=1e-6)
    assert all(s.item() == 3.0 for s in ours.steps)


@pytest.mark.parametrize("flavour", ["torch", "hf"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scale_and_clip_coef(backend, flavour):
    """grads are divided by grad_scale and multiplied by clip_coef in registers, never rewritten."""
    device = _device(backend)
    shapes = [(), (7,), (3, 300), (2, 3, 4)]
    kw = _kwargs(
        flavour, dict(maximize=True) if flavour == "torch" else dict(beta1=0.9), device, torch.float32
    )
    ours = State(flavour, _params(shapes, torch.float32, device), beta1=True)
    ref = ours.copy(fp64=True)
    scaler = dict(
        grad_scale=torch.full((1,), 1024.0, device=device), clip_coef=torch.tensor(0.3, device=device)
    )
    for k in range(2):
        grads = _grads(shapes, torch.float32, device, k, scale=1024.0)
        kept = [g.clone() for g in grads]
        ours.step(grads, backend, **scaler, **kw)
        assert all(torch.equal(g, c) for g, c in zip(grads, kept, strict=True)), "grads were rewritten"
        ref.step([g.double() for g in grads], "reference", **scaler, **_reference_kwargs(kw, torch.float32))
        _compare(ours, ref, f"after step {k + 1}")


@pytest.mark.parametrize("flavour", ["torch", "hf"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_gradient_gives_zero_update(backend, flavour):
    """The precision rule: an all-zero gradient matrix must not give NaN (it would from the raw
    product r_i * c_j / mean r in transformers' flavour); the update is exactly zero."""
    device = _device(backend)
    shapes = [(), (7,), (2, 3, 4), (35, 300)]
    kw = _kwargs(flavour, dict(beta1=0.9) if flavour == "hf" else {}, device, torch.float32)
    ours = State(flavour, _params(shapes, torch.float32, device), beta1=True)
    before = [p.clone() for p in ours.params]
    for _ in range(2):
        ours.step([torch.zeros(s, device=device) for s in shapes], backend, **kw)
    for i, (p, b) in enumerate(zip(ours.params, before, strict=True)):
        assert torch.equal(p, b), f"params[{i}] moved under a zero gradient"
    for name, tensors in ours.tensors().items():
        assert all(torch.isfinite(t).all() for t in tensors), name


@pytest.mark.parametrize("flavour", ["torch", "hf"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_gradient_gives_finite_updates(backend, flavour):
    """Gradients of 1e-20: g^2 underflows fp32's normal range; the normalised factors keep the
    update finite (and equal to the fp64 reference's)."""
    # (torch's flavour with the default eps1: eps1^2 bounds est. With eps1 = 1e-30, est = 0 in fp32
    # and u = g / 0, in torch.optim.Adafactor and in the fp32 reference alike.)
    config = dict(beta1=0.9) if flavour == "hf" else {}
    ours = _run_against_fp64(
        backend, flavour, config, shapes=[(7,), (3, 5), (2, 3, 4)], steps=2, grad_scale=1e-20
    )
    for name, tensors in ours.tensors().items():
        assert all(torch.isfinite(t).all() for t in tensors), name


@pytest.mark.parametrize("flavour", ["torch", "hf"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sum_of_u_squared_where_the_cap_binds(backend, flavour):
    """RMS(u) clips the update (d < RMS(u)), so its sum of u^2 shows in every param. The CPU
    kernel takes that sum from per-row and per-column sums where no product rr_i rc_j reaches
    the cap, element by element elsewhere: a matrix with one row of gradients 1e-6 times the
    others (torch's cap, 1/eps1, binds in that row only), one with an all-zero row (an infinite
    row factor), and one where nothing binds, each against the fp64 reference."""
    device = _device(backend)
    shapes = [(6, 40), (5, 33), (9, 17)]
    config = dict(eps1=1e-3, d=0.5) if flavour == "torch" else dict(clip_threshold=0.5, beta1=0.9)
    kw = _kwargs(flavour, config, device, torch.float32)
    ours = State(flavour, _params(shapes, torch.float32, device), beta1=flavour == "hf")
    ref = ours.copy(fp64=True)
    for k in range(3):
        grads = _grads(shapes, torch.float32, device, k)
        grads[0][2] *= 1e-6
        grads[1][3] = 0.0
        ours.step(grads, backend, **kw)
        ref.step([g.double() for g in grads], "reference", **_reference_kwargs(kw, torch.float32))
        _compare(ours, ref, f"after step {k + 1}")


@pytest.mark.parametrize("flavour", ["torch", "hf"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_params_and_grads(backend, flavour):
    """A transposed view and a channels_last param (and a transposed grad) run as contiguous
    working copies written back: the original memory is updated."""
    device = _device(backend)
    base = _params([(5, 9)], torch.float32, device, seed=3)[0]
    conv = _params([(4, 3, 3, 3)], torch.float32, device, seed=4)[0].to(memory_format=torch.channels_last)
    params = [base.t(), conv, _params([(6,)], torch.float32, device, seed=5)[0]]
    assert not params[0].is_contiguous() and not params[1].is_contiguous()
    shapes = [tuple(p.shape) for p in params]
    kw = _kwargs(
        flavour, dict(beta1=0.9) if flavour == "hf" else dict(weight_decay=0.1), device, torch.float32
    )
    ours = State(flavour, params, beta1=True)
    ref = ours.copy(fp64=True)
    for k in range(2):
        grads = _grads(shapes, torch.float32, device, k)
        grads[0] = grads[0].t().contiguous().t()  # transposed like its param
        ours.step(grads, backend, **kw)
        ref.step([g.double() for g in grads], "reference", **_reference_kwargs(kw, torch.float32))
        _compare(ours, ref, f"after step {k + 1}")
    _close(base.t(), ref.params[0], "the transposed param's base tensor")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_arguments_raise(backend):
    device = _device(backend)
    shapes = [(7,), (3, 5)]

    def call(**change):
        state = State("torch", _params(shapes, torch.float32, device))
        args = dict(zip(["row_vars", "col_vars", "variances"], state.states, strict=True))
        args.update(
            params=state.params, grads=_grads(shapes, torch.float32, device, 0), state_steps=state.steps
        )
        args.update(change)
        functional.adafactor(**args, backend=backend)

    errors = (ValueError, RuntimeError, TypeError)
    with pytest.raises(errors, match="fused_optim"):
        call(row_vars=[])  # one per factored param
    with pytest.raises(errors, match="fused_optim"):
        call(variances=[torch.zeros(7, dtype=torch.bfloat16, device=device)])  # states share a dtype
    with pytest.raises(errors, match="fused_optim"):
        call(grads=[torch.zeros(7, device=device), torch.zeros(5, 3, device=device)])
    with pytest.raises(errors, match="fused_optim"):
        call(state_steps=[torch.zeros((), dtype=torch.float64, device=device)] * 2)
    p = torch.zeros(3, 5, device=device)
    with pytest.raises(errors, match="fused_optim"):  # one memory twice would race
        functional.adafactor(
            [p, p], [torch.ones_like(p)] * 2, [torch.zeros(3, 1, device=device)] * 2,
            [torch.zeros(1, 5, device=device)] * 2, [], [torch.zeros((), device=device) for _ in range(2)],
            backend=backend,
        )  # fmt: skip


@pytest.mark.parametrize("flavour", ["torch", "hf"])
@pytest.mark.parametrize("backend", [BACKENDS[0]])
def test_native_tiles(backend, flavour):
    """The CPU kernels' tiles are whole rows of up to 65536 elements (math/adafactor.h): a row
    longer than that is cut into column tiles, a taller matrix into several row tiles, a batch of
    narrow matrices gets one tile per matrix, a full tensor several flat tiles; every partial is
    combined in phase 2 (matrices) or 4 (tensors)."""
    config = dict(weight_decay=0.1) if flavour == "torch" else dict(beta1=0.9)
    shapes = [(2, 66000), (300, 500), (3, 2, 9000), (5000, 3), (70000, 1), (140000,)]
    _run_against_fp64(backend, flavour, config, shapes=shapes, steps=3)


@pytest.mark.parametrize("flavour", ["torch", "hf"])
@pytest.mark.parametrize("backend", [BACKENDS[0]])
def test_native_waves(backend, flavour, monkeypatch):
    """The CPU kernel runs its phases wave by wave (consecutive tensors that fit a cache budget,
    FUSED_OPTIM_CPU_WAVE_BYTES): one tensor per wave, a few per wave and one wave for all give
    the same bits, and match the fp64 reference. So do 1 and 3 threads, which split a wave's tiles
    between them at other points (by elements)."""
    config = dict(weight_decay=0.1) if flavour == "torch" else dict(beta1=0.9)
    shapes = [(300, 500), (7,), (30, 20), (2, 40, 25), (9000,), (3, 5), (), (0, 4), (70000, 1)]
    results = []
    for budget in ["1", "40000", str(1 << 40)]:
        monkeypatch.setenv("FUSED_OPTIM_CPU_WAVE_BYTES", budget)
        results.append(_run_against_fp64(backend, flavour, config, shapes=shapes, steps=3))
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            results.append(_run_against_fp64(backend, flavour, config, shapes=shapes, steps=3))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        mine = results[0].params + [t for lst in results[0].states for t in lst] + results[0].steps
        theirs = other.params + [t for lst in other.states for t in lst] + other.steps
        for a, b in zip(mine, theirs, strict=True):
            assert torch.equal(a, b)


_FEWER_THREADS_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    import fused_optim, fused_optim.transformers
    torch.set_num_threads(int(sys.argv[2]))
    torch.manual_seed(0)
    shapes = [(300, 500), (7,), (30, 20), (2, 40, 25), (9000,), (70000, 1)]
    out = []
    for make in (lambda ps: fused_optim.Adafactor(ps, lr=1e-2, weight_decay=0.1, backend="cpu"),
                 lambda ps: fused_optim.transformers.Adafactor(ps, beta1=0.9, backend="cpu")):
        ps = [torch.randn(s) for s in shapes]
        opt = make(ps)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn_like(p)
            opt.step()
        out += ps
    torch.save(out, sys.argv[1])
    """
)


def test_native_fewer_threads_than_asked(tmp_path):
    """The CPU kernel sizes its per-thread tile ranges by the threads it asks OpenMP for; OpenMP
    may start fewer (OMP_THREAD_LIMIT), and the threads it did start then take the others'
    ranges (csrc/cpu/adafactor.cpp: Schedule). Same bits as with the threads it asked for."""
    runs = {}
    for name, limit, threads in [("full", None, 2), ("limited", "1", 4)]:
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_THREAD_LIMIT", "TRITON_INTERPRET")}
        if limit is not None:
            env["OMP_THREAD_LIMIT"] = limit
        path = tmp_path / f"{name}.pt"
        proc = subprocess.run(
            [sys.executable, "-c", _FEWER_THREADS_SCRIPT, str(path), str(threads)],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[name] = torch.load(path)
    for a, b in zip(runs["full"], runs["limited"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("flavour", ["torch", "hf"])
@pytest.mark.parametrize("backend", [pytest.param("triton", marks=triton_only)])
def test_loops_over_blocks(backend, flavour, monkeypatch):
    """Compiled kernels walk a tile 8 rows at a time, the interpreter whole tiles; pass 2 sums 8
    column blocks' or 32 row blocks' partials per load. Smaller blocks here, so that the loops
    run several times, with a last block partly past the matrix, under the interpreter too."""
    tiles = importlib.import_module("fused_optim.triton_kernels._adafactor")
    monkeypatch.setattr(tiles, "SUB_R", 8)
    monkeypatch.setattr(tiles, "PART_I", 2)
    monkeypatch.setattr(tiles, "PART_J", 2)
    config = dict(beta1=0.9) if flavour == "hf" else dict(weight_decay=0.1)
    _run_against_fp64(backend, flavour, config, shapes=[(5,), (70, 9), (2, 13, 300), (3, 700)])


# ---- Triton: launches, recompiles, compiling for a GPU ------------------------------------------


@pytest.fixture
def launches(monkeypatch):
    _plan = importlib.import_module("fused_optim.triton_kernels._plan")
    calls = []
    real = _plan._launch

    def counting(kernel, grid, *args, **kwargs):
        calls.append((kernel, grid, args, kwargs))
        real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(_plan, "_launch", counting)
    return calls


def _mixed_shapes(n):
    kinds = [lambda i: (1 + i % 30,), lambda i: (1 + i % 4, 1 + i % 9), lambda i: (2, 1 + i % 3, 2 + i % 5)]
    return [kinds[i % 3](i) for i in range(n)]


@pytest.mark.parametrize("flavour", ["torch", "hf"])
@pytest.mark.parametrize("backend", [pytest.param("triton", marks=triton_only)])
def test_five_launches_whatever_the_tensor_count(backend, flavour, launches, monkeypatch):
    """Five launches for 10 and for 300 tensors of mixed kinds. The 10 run for real (the plan
    built, then found cached); the 300 are only counted (the interpreter would take long)."""
    device = _device(backend)
    kw = _kwargs(flavour, dict(beta1=0.9) if flavour == "hf" else {}, device, torch.float32)
    shapes = _mixed_shapes(10)
    ours = State(flavour, _params(shapes, torch.float32, device), beta1=True)
    for k in range(2):
        launches.clear()
        before = [p.clone() for p in ours.params]
        ours.step(_grads(shapes, torch.float32, device, k), backend, **kw)
        assert len(launches) == 5
        assert all(not torch.equal(p, b) for p, b in zip(ours.params, before, strict=True))
    assert all(s.item() == 2.0 for s in ours.steps)

    _plan = importlib.import_module("fused_optim.triton_kernels._plan")
    grids = []
    monkeypatch.setattr(_plan, "_launch", lambda kernel, grid, *a, **k: grids.append(grid))
    shapes = _mixed_shapes(300)
    many = State(flavour, _params(shapes, torch.float32, device), beta1=True)
    for k in range(2):
        grids.clear()
        many.step(_grads(shapes, torch.float32, device, k), backend, **kw)
        assert len(grids) == 5
        assert grids[3] == (300,)  # the per-tensor pass covers every tensor


def _specialization_key(kernel, args, kwargs):
    """What a compiled kernel is cached under (argument types, alignment and value
    specialisation, constexprs, options), from Triton's own binder; works for interpreted
    kernels too (Triton internals, checked with triton 3.9)."""
    try:
        from triton.backends.compiler import BaseBackend
        from triton.runtime.jit import JITFunction, create_function_from_signature
    except ImportError as e:
        pytest.skip(f"this triton cannot compute specialisation keys: {e}")
    jit = kernel
    if not hasattr(kernel, "device_caches"):  # interpreted: an equivalent JITFunction
        jit = JITFunction(kernel.fn, do_not_specialize=kernel.kwargs.get("do_not_specialize"))
    binder = create_function_from_signature(jit.signature, jit.params, BaseBackend)
    _, specialization, options = binder(*args, **kwargs)
    return kernel.fn.__name__, repr(specialization), repr(sorted(options.items()))


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=triton_only)])
def test_lr_step_and_hyperparameters_do_not_recompile(backend, launches):
    device = _device(backend)
    shapes = [(5,), (3, 4)]
    ours = State("hf", _params(shapes, torch.float32, device), beta1=True)
    grads = _grads(shapes, torch.float32, device, 0)
    settings = [
        dict(HF_DEFAULT, relative_step=False, lr=0.05, beta1=0.9),
        dict(HF_DEFAULT, relative_step=False, lr=1e-4, beta1=0.5, eps1=1e-20, eps2=0.0, weight_decay=0.1),
        dict(HF_DEFAULT, relative_step=False, lr=0.3, beta1=0.0, clip_threshold=2.0, decay_rate=-0.5),
    ]
    keys = []
    for kw in settings:  # the steps advance too: 0, 1, 2
        launches.clear()
        ours.step(grads, backend, **kw)
        keys.append([_specialization_key(k, a, kw_) for k, _, a, kw_ in launches])
    assert keys[0] == keys[1] == keys[2], "lr, step or hyper-parameters caused a recompile"

    torch_state = State("torch", _params(shapes, torch.float32, device))
    keys = []
    for lr in (0.01, 0.5, 1e-6):
        launches.clear()
        torch_state.step(grads, backend, **dict(TORCH_DEFAULT, lr=lr, weight_decay=lr))
        keys.append([_specialization_key(k, a, kw_) for k, _, a, kw_ in launches])
    assert keys[0] == keys[1] == keys[2]


_AOT_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    try:  # Triton internals (checked with triton 3.9)
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, compile, make_backend
        from triton.runtime.jit import create_function_from_signature
    except ImportError as e:
        print("SKIP", e)
        sys.exit(0)
    from fused_optim import triton_kernels as tk
    from fused_optim.triton_kernels import _plan

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    compiled = []

    def aot(kernel, grid, *args, **kwargs):  # compile for sm_90 instead of launching
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, spec, options = binder(*args, **kwargs)
        opts, sig, constexprs, attrs = kernel._pack_args(backend, options, bound, spec, options)
        compile(ASTSource(kernel, sig, constexprs, attrs), target=target, options=opts.__dict__)
        compiled.append(kernel.fn.__name__)

    _plan._launch = aot
    _plan.check_runnable = lambda kernel, device: None
    shapes = [(7,), (3, 5)]
    ps = [torch.zeros(s) for s in shapes]
    tk.adafactor(ps, [torch.zeros(s) for s in shapes], [torch.zeros(3, 1)], [torch.zeros(1, 5)],
                 [torch.zeros(7)], [torch.zeros(()) for _ in shapes], lr=0.01, beta2_decay=-0.8, eps1=None,
                 eps2=1e-3, d=1.0, weight_decay=0.0, maximize=False)
    ps = [torch.zeros(s, dtype=torch.bfloat16) for s in shapes]
    one = torch.ones(1)
    zeros = lambda: [torch.zeros(()) for _ in shapes]
    hf = dict(lr=torch.tensor(0.01), eps1=1e-30, eps2=1e-3, clip_threshold=1.0, decay_rate=-0.8, beta1=0.9,
              weight_decay=0.1, scale_parameter=True, relative_step=False, warmup_init=False)
    tk.adafactor_transformers(ps, [torch.zeros_like(p) for p in ps], [torch.zeros(3)], [torch.zeros(5)],
                              [torch.zeros(7)], [torch.zeros(s) for s in shapes], zeros(), zeros(),
                              grad_scale=one, found_inf=torch.zeros(1), clip_coef=one, **hf)
    # a shard's three phases (ShardSums' layout for these shapes, one process)
    sums, carry = torch.zeros(10, dtype=torch.float64), torch.zeros(8)
    for phase in (1, 2, 3):
        ps = [torch.zeros(s) for s in shapes]
        shard = dict(phase=phase, global_numels=[7, 15], stats_at=[-1, 2], sums=sums, carry=carry)
        tk.adafactor(ps, [torch.zeros(s) for s in shapes], [torch.zeros(3, 1)], [torch.zeros(1, 5)],
                     [torch.zeros(7)], [torch.zeros(()) for _ in shapes], lr=0.01, beta2_decay=-0.8,
                     eps1=None, eps2=1e-3, d=1.0, weight_decay=0.0, maximize=False, **shard)
    print(compiled)
    assert len(compiled) == 18, compiled
    """
)


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels are compiled for real")
def test_kernels_compile_for_sm90():
    """Both flavours' five kernels, and a shard's phases, compile to sm_90 cubin with the ptxas
    bundled in the triton wheel: catches what the interpreter cannot (types of if/else branches,
    constexpr misuse)."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    if proc.stdout.startswith("SKIP"):
        pytest.skip(f"cannot compile ahead of time with this triton: {proc.stdout[5:].strip()}")
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("no ptxas available")
    assert proc.returncode == 0, proc.stderr[-4000:]


# ---- Found in review: non-finite scalars, expanded tensors, a missing lr -------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_infinite_lr_without_weight_decay_is_no_nan(backend):
    """torch accepts lr=inf (rho = min(lr, 1/sqrt(t)) caps it): 1 - lr * 0 must not become NaN."""
    _run_against_fp64(backend, "torch", dict(lr=float("inf")), shapes=SMALL, steps=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_infinite_rms_without_weight_decay_is_no_nan(backend):
    """transformers: an inf param makes RMS(theta) and alpha inf; without weight decay the decay
    is skipped (not inf * 0), so the other elements get +-inf as in transformers, not NaN."""
    device = _device(backend)
    shapes = [(4, 6)]
    ours = State("hf", _params(shapes, torch.float32, device), rms=True)
    with torch.no_grad():
        ours.params[0][0, 0] = float("inf")
    ref = ours.copy()
    kw = _kwargs("hf", {}, device, torch.float32)
    grads = _grads(shapes, torch.float32, device, 0)
    ours.step(grads, backend, **kw)
    ref.step(grads, "reference", **_reference_kwargs(kw, torch.float32))
    assert not ours.params[0].isnan().any()
    assert torch.equal(ours.params[0].isinf(), ref.params[0].isinf())


@pytest.mark.parametrize("flavour", ["torch", "hf"])
@pytest.mark.parametrize("backend", [BACKENDS[0]])
def test_expanded_written_tensor_is_refused_before_anything_changes(backend, flavour):
    shapes = [(3, 4), (5,)]
    ours = State(flavour, _params(shapes, torch.float32, "cpu"), beta1=flavour == "hf")
    ours.states[2] = [torch.zeros(1).expand(5)]  # the full second moment of (5,): expanded
    before = ours.copy()
    kw = _kwargs(flavour, dict(beta1=0.9) if flavour == "hf" else {}, "cpu", torch.float32)
    with pytest.raises(RuntimeError, match="sharing memory"):
        ours.step(_grads(shapes, torch.float32, "cpu", 0), backend, **kw)
    for name, tensors in ours.tensors().items():
        for a, b in zip(tensors, before.tensors()[name], strict=True):
            assert torch.equal(a, b), name


def test_missing_lr_is_a_type_error():
    p, g = [torch.zeros(3, 4)], [torch.ones(3, 4)]
    rows, cols, steps = [torch.zeros(3)], [torch.zeros(4)], [torch.zeros(())]
    with pytest.raises(TypeError, match="needs an lr"):
        functional.adafactor(p, g, [torch.zeros(3, 1)], [torch.zeros(1, 4)], [], steps, lr=None)
    with pytest.raises(TypeError, match="needs an lr"):
        functional.adafactor_transformers(p, g, rows, cols, [], [], [], steps, lr=None, relative_step=False)
    assert steps[0].item() == 0


# ---- FSDP2 shards: the step in three calls (optim/adafactor.py: ShardSums) -----------------------

# Matrices split by rows (taller and wider than a tile), batches of matrices split by matrix, full
# tensors split by elements, a matrix of 2 rows for 4 ranks (two ranks hold none of its rows).
SHARD_SHAPES = [(67, 45), (9, 300), (70, 9), (2, 3), (1000,), (37,), (5, 3, 7), (4, 3, 3, 3), (0, 4)]
RANKS = 4


def _cuts(size: int) -> list[int]:
    """Uneven dim-0 boundaries of RANKS shards, one of them empty."""
    inner = sorted({size // 3, size // 3, (3 * size) // 4})
    return [0, *inner, *([size] * (RANKS + 1 - 1 - len(inner)))]


class _Rank:
    """What one rank holds of a State: views of its dim-0 rows of the params and of the states
    that follow them, its own copies of the replicated ones (a matrix's column statistics, RMS)
    and of the steps."""

    def __init__(self, whole: State, r: int):
        self.cuts = [_cuts(p.shape[0]) if p.dim() else [0] * (RANKS + 1) for p in whole.params]
        lo_hi = [(c[r], c[r + 1]) for c in self.cuts]
        factored = [i for i, p in enumerate(whole.params) if p.dim() >= 2]
        full = [i for i, p in enumerate(whole.params) if p.dim() < 2]
        self.params = [p[lo:hi] for p, (lo, hi) in zip(whole.params, lo_hi, strict=True)]

        def mine(tensors, owners, replicated=lambda i: False):
            pairs = zip(tensors, owners, strict=True)
            return [t.clone() if replicated(i) else t[slice(*lo_hi[i])] for t, i in pairs]

        rows, cols, fulls = whole.states[:3]
        self.states = [
            mine(rows, factored),
            mine(cols, factored, replicated=lambda i: whole.params[i].dim() == 2),
            mine(fulls, full),
        ]
        if whole.flavour == "hf":
            exp_avgs, rmss = whole.states[3:]
            self.states += [mine(exp_avgs, range(len(exp_avgs))), [t.clone() for t in rmss]]
        self.steps = [s.clone() for s in whole.steps]
        self.matrices = [whole.params[i] for i in factored]
        self.layout = ShardSums(self.params, [p.shape for p in whole.params])

    def replicated(self) -> list:
        """The states every rank holds whole, and the steps."""
        cols = [c for c, p in zip(self.states[1], self.matrices, strict=True) if p.dim() == 2]
        return cols + self.steps + (self.states[4] if len(self.states) > 3 else [])


def _sharded_step(whole: State, grads, backend: str, **kw) -> list[_Rank]:
    """One step of `whole` as RANKS ranks take it: phase by phase, the sums that span ranks
    added between phases as the all-reduces would."""
    ranks = [_Rank(whole, r) for r in range(RANKS)]
    fn = getattr(_backends.get(backend, whole.params[0].device), KERNELS[whole.flavour])
    device = whole.params[0].device
    sums = [torch.zeros(r.layout.size, dtype=torch.float64, device=device) for r in ranks]
    carries = [torch.full((r.layout.carry_size,), float("nan"), device=device) for r in ranks]
    for phase in (1, 2, 3):
        for r, rank in enumerate(ranks):
            mine = [g[c[r] : c[r + 1]] if g.dim() else g for g, c in zip(grads, rank.cuts, strict=True)]
            args = dict(global_numels=rank.layout.global_numels, stats_at=rank.layout.stats_at, **kw)
            args.update(phase=phase, sums=sums[r], carry=carries[r])
            fn(rank.params, mine, *rank.states, rank.steps, **args)
        if phase < 3:  # what one all-reduce would do
            parts = [s[r.layout.reduced[phase - 1]] for s, r in zip(sums, ranks, strict=True)]
            total = sum(parts)
            for part in parts:
                part.copy_(total)
    return ranks


KERNELS = {"torch": "adafactor", "hf": "adafactor_transformers"}
# and the native CUDA kernels, on a GPU
SHARD_BACKENDS = [
    *BACKENDS,
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
        id="cuda",
    ),
]
SHARD_CONFIGS = {
    "torch": dict(maximize=True, weight_decay=0.1),
    "torch_clip": dict(d=0.5, eps1=1e-4, lr="f32"),
    "hf": dict(beta1=0.9, weight_decay=0.1),
    "hf_lr": dict(relative_step=False, lr=0.05, clip_threshold=0.5, scale_parameter=False),
}


@pytest.mark.parametrize("config", list(SHARD_CONFIGS))
@pytest.mark.parametrize("backend", SHARD_BACKENDS)
def test_shards_step_as_one_process(backend, config):
    """FSDP2: ranks holding dim-0 shards of each param (uneven, some empty) take the step of one
    process once their sums are added between the three calls; the replicated states (column
    statistics of a matrix, RMS) come out the same on every rank."""
    flavour = config.split("_")[0]
    device = _device(backend)
    kw = _kwargs(flavour, SHARD_CONFIGS[config], device, torch.float32)
    if flavour == "hf" and kw["lr"] is None:
        kw["lr"] = 0.0
    whole = State(flavour, _params(SHARD_SHAPES, torch.float32, device), beta1=kw.get("beta1") is not None)
    for k in range(STEPS + 1):
        grads = _grads(SHARD_SHAPES, torch.float32, device, k)
        one = whole.copy()
        one.step(grads, backend, **kw)
        ranks = _sharded_step(whole, grads, backend, **kw)
        # whole now holds every rank's rows; the replicated states and steps are the ranks' own
        for r in ranks:
            for got, want in zip(r.replicated(), ranks[0].replicated(), strict=True):
                assert torch.equal(got, want)
        matrices = [p for p in whole.params if p.dim() >= 2]
        cols = zip(whole.states[1], ranks[0].states[1], matrices, strict=True)
        whole.states[1] = [c if p.dim() >= 3 else mine for c, mine, p in cols]
        whole.steps = ranks[0].steps
        if flavour == "hf":
            whole.states[4] = ranks[0].states[4]
        _compare(whole, one, f"after step {k + 1}", rtol=1e-6)


@pytest.mark.parametrize("flavour", ["torch", "hf"])
@pytest.mark.parametrize("backend", SHARD_BACKENDS)
def test_shards_skip_the_step_on_found_inf(backend, flavour):
    device = _device(backend)
    kw = _kwargs(flavour, dict(beta1=0.9) if flavour == "hf" else {}, device, torch.float32)
    whole = State(flavour, _params(SHARD_SHAPES, torch.float32, device), beta1=True, step0=2.0)
    before = whole.copy()
    grads = _grads(SHARD_SHAPES, torch.float32, device, 0)
    ranks = _sharded_step(whole, grads, backend, found_inf=torch.ones((), device=device), **kw)
    for name, tensors in whole.tensors().items():
        for got, want in zip(tensors, before.tensors()[name], strict=True):
            assert torch.equal(got, want), name
    for r, rank in enumerate(ranks):
        for got, want in zip(rank.replicated(), _Rank(before, r).replicated(), strict=True):
            assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shard_arguments_are_checked(backend):
    """Missing, mis-sized or out-of-range shard arguments are refused before anything changes."""
    device = _device(backend)
    whole = State("torch", _params([(3, 5), (4,)], torch.float32, device))
    before = whole.copy()
    grads = _grads([(3, 5), (4,)], torch.float32, device, 0)
    fn = _backends.get(backend, device).adafactor
    good = dict(phase=1, global_numels=[15, 4], stats_at=[2, -1], sums=torch.zeros(10, dtype=torch.float64),
                carry=torch.zeros(8))  # fmt: skip
    for bad, match in (
        (dict(carry=None), "takes global_numels, stats_at, sums and carry"),
        (dict(phase=0), "phase 0 none of them"),
        (dict(carry=torch.zeros(7)), "carry"),
        (dict(stats_at=[5, -1]), "stats_at"),
        (dict(sums=torch.zeros(10)), "sums"),
    ):
        kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in {**good, **bad}.items()}
        kw.update(_kwargs("torch", {}, device, torch.float32))
        with pytest.raises(RuntimeError, match=match):
            fn(whole.params, grads, *whole.states, whole.steps, **kw)
        _compare(whole, before, f"after {bad}", rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_column_statistics_of_tall_narrow_matrices_stay_near_fp64(backend):
    """A column's statistic sums its whole height: long float32 chains of partial sums would put
    it tens of ulps off the float64 sum (measured 3e-6 with 65536-row CPU tiles)."""
    device = _device(backend)
    shapes = [(70001, 1), (20000, 3)] if backend == "cpu" else [(3000, 1)]
    ours = State("torch", _params(shapes, torch.float32, device))
    ref = ours.copy(fp64=True)
    grads = _grads(shapes, torch.float32, device, 0)
    kw = _kwargs("torch", {}, device, torch.float32)
    ours.step(grads, backend, **kw)
    ref.step([g.double() for g in grads], "reference", **_reference_kwargs(kw, torch.float32))
    for got, want in zip(ours.states[1], ref.states[1], strict=True):
        torch.testing.assert_close(got.double(), want, rtol=5e-7, atol=0)
