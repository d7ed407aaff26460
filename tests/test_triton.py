"""The Triton backend (fused_optim.triton_kernels) against the reference (fused_optim._reference)
and torch. Runs on CPU tensors under TRITON_INTERPRET=1 (CI) or on CUDA tensors on a GPU.
Sizes are kept small: the interpreter executes every program in Python."""

import importlib
import importlib.util
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = [pytest.mark.triton]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if not (INTERPRET or torch.cuda.is_available()):
    pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1 (CPU)", allow_module_level=True)

from fused_optim import _reference  # noqa: E402
from fused_optim import triton_kernels as tk  # noqa: E402

_plan = importlib.import_module("fused_optim.triton_kernels._plan")
_adam = importlib.import_module("fused_optim.triton_kernels._adam")
_clip = importlib.import_module("fused_optim.triton_kernels._clip")

DEVICE = torch.device("cpu" if INTERPRET else "cuda")
CHUNK = _plan.CHUNK
# Odd shapes: 0-d, empty, 1, 7, 4097 (several tiles), 2-d, and one spanning 3 work items.
SIZES = [(), (0,), (1,), (7,), (4097,), (3, 5), (2 * CHUNK + 5,)]
ADAMW = dict(
    lr=0.02,
    beta1=0.9,
    beta2=0.999,
    eps=1e-8,
    weight_decay=0.1,
    decoupled=True,
    amsgrad=False,
    maximize=False,
    adax=False,
)
ADAX = dict(ADAMW, lr=0.01, beta2=1e-4, eps=1e-12, weight_decay=5e-4, decoupled=False, adax=True)
# Allowed difference: ULPS units in the last place of the reference value (of the storage
# dtype), plus a small absolute slack for results that cancel to ~0 (fp32 rounding of the math).
ULPS = 3
ATOL = 1e-6


def _ulp(x: torch.Tensor) -> torch.Tensor:
    fi = torch.finfo(x.dtype)
    _, exp = torch.frexp(x.float().abs())
    return torch.ldexp(torch.full_like(x, fi.eps, dtype=torch.float32), exp - 1).clamp_min(
        fi.smallest_normal * fi.eps
    )


def assert_close(actual, expected, what, ulps=ULPS, atol=ATOL):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a.dtype == e.dtype and a.shape == e.shape, what
        diff = (a.float() - e.float()).abs()
        bound = ulps * _ulp(e) + atol
        bad = ~(diff <= bound)
        assert not bad.any(), (
            f"{what}[{i}] ({a.dtype}, shape {tuple(a.shape)}): {int(bad.sum())} elements off, max diff "
            f"{diff.max().item():.3g} at {e.flatten()[diff.flatten().argmax()].item():.6g}"
        )


def make_state(sizes, param_dtype, state_dtype, amsgrad=False, seed=0, step0=0.0):
    g = torch.Generator().manual_seed(seed)

    def randn(shape, dtype, scale=1.0):
        return (torch.randn(shape, generator=g) * scale).to(dtype).to(DEVICE)

    params = [randn(s, param_dtype) for s in sizes]
    exp_avgs = [randn(s, state_dtype, 0.1) for s in sizes]
    exp_avg_sqs = [randn(s, state_dtype, 0.03).square() for s in sizes]
    max_sqs = [v * 1.5 for v in exp_avg_sqs] if amsgrad else []
    steps = [torch.tensor(step0 + i % 3, dtype=torch.float32, device=DEVICE) for i in range(len(sizes))]
    return [params, exp_avgs, exp_avg_sqs, max_sqs, steps]


def clone(state):
    return [[t.clone() for t in lst] for lst in state]


def grads_for(params, seed, scale=1.0):
    g = torch.Generator().manual_seed(1000 + seed)
    return [(torch.randn(p.shape, generator=g) * scale).to(p.dtype).to(DEVICE) for p in params]


def run_both(
    sizes,
    param_dtype,
    state_dtype,
    n_steps=3,
    grad_scale_value=None,
    grad_scale_shape=(),
    lr_tensor=False,
    **kw,
):
    """n_steps of the Triton backend and of the reference on identical copies; compares all."""
    amsgrad = kw.get("amsgrad", False)
    ours = make_state(sizes, param_dtype, state_dtype, amsgrad)
    ref = clone(ours)
    for step in range(n_steps):
        grads = grads_for(ours[0], step, grad_scale_value or 1.0)
        extra = {}
        if grad_scale_value is not None:
            extra["grad_scale"] = torch.full(grad_scale_shape, grad_scale_value, device=DEVICE)
        if "clip" in kw:
            extra["clip_coef"] = torch.tensor(kw["clip"], device=DEVICE)
        opts = {k: v for k, v in kw.items() if k != "clip"}
        if lr_tensor:
            opts["lr"] = torch.tensor(opts["lr"] * (1.0 - 0.1 * step), device=DEVICE)
        p, m, v, vmax, st = ours
        ours_grads = [x.clone() for x in grads]
        tk.adam(p, ours_grads, m, v, vmax, st, **opts, **extra)
        assert all(torch.equal(a, b) for a, b in zip(ours_grads, grads, strict=True)), "grads were written"
        p, m, v, vmax, st = ref
        _reference.adam(p, [x.clone() for x in grads], m, v, vmax, st, **opts, **extra)
    for name, a, e in zip(
        ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"), ours[:4], ref[:4], strict=True
    ):
        assert_close(a, e, name)
    for a, e in zip(ours[4], ref[4], strict=True):
        assert torch.equal(a, e)
    return ours


# ---- Adam family against the reference ------------------------------------------------------


@pytest.mark.parametrize(
    "param_dtype, state_dtype",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
    ],
)
def test_adamw_dtypes(param_dtype, state_dtype):
    run_both(SIZES, param_dtype, state_dtype, **ADAMW)


OPTIONS = {
    "adam_l2": dict(ADAMW, decoupled=False),
    "no_decay": dict(ADAMW, weight_decay=0.0),
    "amsgrad": dict(ADAMW, amsgrad=True),
    "maximize": dict(ADAMW, maximize=True),
    "adax": ADAX,
    "adaxw": dict(ADAX, decoupled=True, weight_decay=5e-2),
    "clip": dict(ADAMW, clip=0.37),
    "everything": dict(ADAMW, amsgrad=True, maximize=True, decoupled=False, clip=0.5),
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_adam_options(name):
    run_both(SIZES, torch.float32, torch.float32, **OPTIONS[name])


def test_adam_options_bf16_amsgrad_adax():
    run_both(SIZES[:5], torch.bfloat16, torch.bfloat16, **dict(ADAMW, amsgrad=True, maximize=True))
    run_both(SIZES[:5], torch.bfloat16, torch.float32, **ADAX)


def test_adam_lr_tensor_and_grad_scale():
    run_both(SIZES, torch.float32, torch.float32, lr_tensor=True, **ADAMW)
    run_both(SIZES, torch.float32, torch.float32, grad_scale_value=1024.0, **dict(ADAMW, clip=0.8))
    # GradScaler's scale has shape [1] (the reference cannot broadcast that onto a 0-d param)
    run_both(
        SIZES[1:5],
        torch.float16,
        torch.float16,
        grad_scale_value=3.0,
        grad_scale_shape=(1,),
        lr_tensor=True,
        **ADAMW,
    )


@pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning"
)  # masked-off lanes, interpreter
def test_adax_many_steps_no_overflow():
    # bias correction (1 + beta2)^t - 1 at large t: v-hat stays finite, matches the reference
    sizes = [(5,), (9,)]
    ours = make_state(sizes, torch.float32, torch.float32, step0=2e6)
    ref = clone(ours)
    grads = grads_for(ours[0], 0)
    for state in (ours, ref):
        p, m, v, vmax, st = state
        (tk.adam if state is ours else _reference.adam)(p, grads, m, v, vmax, st, **ADAX)
    for a, e, name in zip(ours[:3], ref[:3], ("params", "exp_avgs", "exp_avg_sqs"), strict=True):
        assert_close(a, e, name)


def test_many_small_tensors_and_one_large():
    sizes = [(1 + (7 * i) % 50,) for i in range(60)] + [(CHUNK + 100,)]
    run_both(sizes, torch.float32, torch.float32, n_steps=2, **dict(ADAMW, amsgrad=True))


def test_found_inf_skips_everything():
    p, m, v, vmax, st = make_state(SIZES, torch.bfloat16, torch.float32, amsgrad=True)
    before = [[t.clone() for t in lst] for lst in (p, m, v, vmax, st)]
    grads = grads_for(p, 0)
    kw = dict(ADAMW, amsgrad=True)
    tk.adam(p, grads, m, v, vmax, st, found_inf=torch.tensor([1.0], device=DEVICE), **kw)
    tk.adam(p, grads, m, v, vmax, st, found_inf=torch.tensor([float("nan")], device=DEVICE), **kw)
    for lst, old in zip((p, m, v, vmax, st), before, strict=True):
        for a, b in zip(lst, old, strict=True):
            assert torch.equal(
                a.view(-1).view(torch.int16 if a.dtype != torch.float32 else torch.int32),
                b.view(-1).view(torch.int16 if b.dtype != torch.float32 else torch.int32),
            )
    # the per-tensor completion counters were not touched: later steps still advance once
    ref = clone([p, m, v, vmax, st])
    tk.adam(p, grads, m, v, vmax, st, found_inf=torch.zeros(1, device=DEVICE), **kw)
    _reference.adam(ref[0], grads, *ref[1:], found_inf=torch.zeros(1, device=DEVICE), **kw)
    assert_close(p, ref[0], "params")
    assert all(torch.equal(a, e) for a, e in zip(st, ref[4], strict=True))


def test_steps_advance_exactly_once_per_tensor():
    sizes = [(0,), (), (CHUNK,), (CHUNK + 1,), (3 * CHUNK,), (0,), (5,)]
    p, m, v, vmax, st = make_state(sizes, torch.float32, torch.float32)
    start = [s.clone() for s in st]
    for k in range(1, 4):
        tk.adam(p, grads_for(p, k), m, v, vmax, st, **ADAMW)
        assert [s.item() for s in st] == [s.item() + k for s in start]
    for plan in _adam._CACHE._entries.values():  # counters are reset for the next step
        if isinstance(plan, _plan.Plan):
            assert int(plan.counters.abs().sum()) == 0


def test_layouts_and_plan_cache(monkeypatch):
    builds = []
    real_build = _plan.build
    monkeypatch.setattr(_plan, "build", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    ours = make_state([(4, 6), (5,)], torch.float32, torch.float32)
    ours[0][0] = ours[0][0].t()  # a dense but transposed param ...
    ours[1][0] = ours[1][0].t()  # ... a state laid out alike ...
    ours[2][0] = ours[2][0].t().contiguous()  # ... and one (and the grad) laid out differently
    ref = clone(ours)
    for k in range(3):
        grads = grads_for(ours[0], k)
        tk.adam(ours[0], grads, *ours[1:], **ADAMW)
        _reference.adam(ref[0], grads, *ref[1:], **ADAMW)
    for name, a, e in zip(("params", "exp_avgs", "exp_avg_sqs"), ours[:3], ref[:3], strict=True):
        assert_close(a, e, name)
    # plain tensors: one plan for three steps; new tensors: a new plan
    builds.clear()
    state = make_state([(7,), (9,)], torch.float32, torch.float32)
    grads = grads_for(state[0], 0)
    for _ in range(3):
        tk.adam(state[0], grads, *state[1:], **ADAMW)
    assert len(builds) == 1
    state2 = make_state([(7,), (9,)], torch.float32, torch.float32)
    tk.adam(state2[0], grads, *state2[1:], **ADAMW)
    assert len(builds) == 2


def test_adam_errors():
    p, m, v, vmax, st = make_state([(3,)], torch.float32, torch.float32)
    with pytest.raises(TypeError):
        tk.adam(p, [torch.zeros(3, dtype=torch.float16, device=DEVICE)], m, v, vmax, st, **ADAMW)
    with pytest.raises(RuntimeError):
        tk.adam(p, [torch.zeros(4, device=DEVICE)], m, v, vmax, st, **ADAMW)
    with pytest.raises(TypeError):
        tk.adam(
            p, [torch.zeros(3, device=DEVICE)], m, v, vmax, [torch.zeros((), dtype=torch.float64)], **ADAMW
        )
    with pytest.raises(TypeError):
        tk.adam(p, [torch.zeros(3, device=DEVICE)], m, v, vmax, st, grad_scale=torch.ones(2), **ADAMW)
    with pytest.raises(ValueError):
        tk.adam(p, [], m, v, vmax, st, **ADAMW)


# ---- global norm and scaling -------------------------------------------------------------------


def _norm_tensors(seed=0, dtypes=(torch.float32, torch.bfloat16, torch.float16)):
    g = torch.Generator().manual_seed(seed)
    sizes = [(), (0,), (7,), (4097,), (3, 5), (2 * CHUNK + 5,), (1,)]
    return [
        (torch.randn(s, generator=g) * (i + 1)).to(dtypes[i % len(dtypes)]).to(DEVICE)
        for i, s in enumerate(sizes)
    ]


@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.0, 3.0])
def test_global_norm(norm_type):
    tensors = _norm_tensors()
    total, coef = tk.global_norm(tensors, norm_type, 1.0)
    ref_total, ref_coef = _reference.global_norm(tensors, norm_type, 1.0)
    assert total.dtype == coef.dtype == torch.float32 and total.shape == coef.shape == ()
    assert total.device == coef.device == DEVICE
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=0)
    torch.testing.assert_close(coef, ref_coef, rtol=1e-5, atol=0)
    # outside oracle: torch on fp32 copies (torch's own norm rounds 16-bit partial norms)
    f32 = [t.float() for t in tensors if t.numel() > 0]
    torch.testing.assert_close(total, torch.nn.utils.get_total_norm(f32, norm_type), rtol=1e-5, atol=0)
    # grad_scale divides the norm; coef follows
    gs = torch.tensor([8.0], device=DEVICE)
    total_s, coef_s = tk.global_norm(tensors, norm_type, 0.5, gs)
    ref_s = _reference.global_norm(tensors, norm_type, 0.5, gs)  # (shape [1] there, from gs's shape)
    assert total_s.shape == coef_s.shape == ()
    torch.testing.assert_close(total_s, ref_s[0].reshape(()), rtol=1e-5, atol=0)
    torch.testing.assert_close(coef_s, ref_s[1].reshape(()), rtol=1e-5, atol=0)
    # large max_norm: coef is exactly 1
    assert tk.global_norm(tensors, norm_type, 1e30)[1].item() == 1.0


def test_global_norm_deterministic_and_nonfinite():
    tensors = _norm_tensors(seed=3, dtypes=(torch.float32,))
    first = tk.global_norm(tensors, 2.0, 1.0)
    second = tk.global_norm(tensors, 2.0, 1.0)
    _clip._CACHE.clear()
    third = tk.global_norm(tensors, 2.0, 1.0)  # with a freshly built plan
    for a, b in ((first, second), (first, third)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for norm_type in (2.0, math.inf, 3.0):
        bad = [t.clone() for t in tensors]
        bad[3][17] = float("nan")
        total, coef = tk.global_norm(bad, norm_type, 1.0)
        assert total.isnan() and coef.isnan()
    bad = [t.clone() for t in tensors]
    bad[2][0] = float("inf")
    total, coef = tk.global_norm(bad, 2.0, 1.0)
    assert total.isinf() and coef.item() == 0.0
    with pytest.raises(ValueError):
        tk.global_norm(tensors, 0.0, 1.0)


def test_scale_():
    tensors = _norm_tensors(seed=5)
    tensors.append(torch.randn(4, 6, device=DEVICE).t())  # dense, transposed
    coef = torch.tensor(0.3, device=DEVICE)
    ours = [t.clone() for t in tensors]
    ref = [t.clone() for t in tensors]
    # a view that is not dense in memory: scaled through a working copy, the gaps untouched
    base = torch.randn(4, 6, device=DEVICE)
    ours_base, ref_base = base.clone(), base.clone()
    ours.append(ours_base[:, ::2])
    ref.append(ref_base[:, ::2])
    tk.scale_(ours, coef)
    _reference.scale_(ref, coef)
    # 16-bit: the reference rounds coef to the tensor's dtype first, we multiply in fp32
    assert_close(ours, ref, "scaled", ulps=1, atol=0)
    assert torch.equal(ours_base[:, 1::2], base[:, 1::2])


# ---- launches and recompiles --------------------------------------------------------------------


@pytest.fixture
def launches(monkeypatch):
    calls = []
    real = _plan._launch

    def counting(kernel, grid, *args, **kwargs):
        calls.append((kernel, grid, args, kwargs))
        real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(_plan, "_launch", counting)
    return calls


def test_launch_counts(launches):
    sizes = [(1 + (13 * i) % 40,) for i in range(299)] + [(CHUNK + 3,)]
    p, m, v, vmax, st = make_state(sizes, torch.float32, torch.float32, amsgrad=True)
    start = [s.item() for s in st]
    grads = grads_for(p, 0)
    tk.adam(p, grads, m, v, vmax, st, **dict(ADAMW, amsgrad=True))
    assert len(launches) == 1
    assert [s.item() for s in st] == [s + 1 for s in start]  # every one of the 300 tensors stepped

    launches.clear()
    tk.global_norm(grads, 2.0, 1.0)
    assert len(launches) == 2  # one dtype: partials + finalize
    launches.clear()
    mixed = [g.to(torch.bfloat16) if i % 2 else g for i, g in enumerate(grads)]
    tk.global_norm(mixed, 2.0, 1.0)
    assert len(launches) == 3  # two dtypes
    launches.clear()
    tk.scale_(mixed, torch.tensor(0.5, device=DEVICE))
    assert len(launches) == 2  # one per dtype


def _specialization_key(kernel, args, kwargs):
    """The key under which a compiled Triton kernel is cached: the argument specialisation
    (types, alignment, constexpr values) and the options. Computed with Triton's own binder,
    which also works for interpreted kernels (the interpreter itself compiles nothing)."""
    try:
        from triton.backends.compiler import BaseBackend
        from triton.runtime.jit import JITFunction, create_function_from_signature
    except ImportError as e:  # Triton internals (checked with triton 3.9)
        pytest.skip(f"this triton cannot compute kernel specialisation keys: {e}")

    if hasattr(kernel, "device_caches"):
        jit = kernel
    else:
        dns = {k: kernel.kwargs.get(k) for k in ("do_not_specialize", "do_not_specialize_on_alignment")}
        jit = JITFunction(kernel.fn, **dns)
    binder = create_function_from_signature(jit.signature, jit.params, BaseBackend)
    _, specialization, options = binder(*args, **kwargs)
    return repr(specialization) + repr(sorted(options.items()))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # eps=0: masked-off lanes 0/0
def test_no_recompile_when_hyperparameters_change(launches):
    p, m, v, vmax, st = make_state([(5,), (CHUNK + 1,)], torch.float32, torch.float32)
    grads = grads_for(p, 0)
    settings = [
        dict(ADAMW),
        dict(ADAMW, lr=3e-4, beta1=0.5, beta2=0.9, eps=1e-6, weight_decay=0.0),
        dict(ADAMW, lr=1.0, beta1=0.0, beta2=0.99999, eps=0.0, weight_decay=1e-5),
    ]
    for kw in settings:  # the steps advance too
        tk.adam(p, grads, m, v, vmax, st, **kw)
    lr_t = [dict(ADAMW, lr=torch.tensor(x, device=DEVICE)) for x in (1e-3, 0.5)]
    for kw in lr_t:
        tk.adam(p, grads, m, v, vmax, st, **kw)
    keys = [_specialization_key(k, a, kw) for k, _, a, kw in launches]
    assert len(set(keys[:3])) == 1 and len(set(keys[3:])) == 1, "hyper-parameters must not recompile"
    assert keys[0] != keys[3]  # lr float vs tensor is a real mode
    launches.clear()
    for norm_type, max_norm in ((3.0, 1.0), (2.5, 7.0)):
        tk.global_norm(grads, norm_type, max_norm)
    keys = [_specialization_key(k, a, kw) for k, _, a, kw in launches]
    assert keys[0] == keys[2] and keys[1] == keys[3]
    if hasattr(_adam._adam_kernel, "device_caches"):  # compiled: the real cache did not grow
        cache = _adam._adam_kernel.device_caches[torch.cuda.current_device()][0]
        n = len(cache)
        tk.adam(p, grads, m, v, vmax, st, **dict(ADAMW, lr=0.123, beta1=0.7))
        assert len(cache) == n


# ---- the kernels compile for a real GPU (no GPU needed) ------------------------------------------

_AOT_SCRIPT = textwrap.dedent(
    """
    import math, re, sys, torch
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
    vector_loads = {}

    def aot(kernel, grid, *args, **kwargs):  # compile for sm_90 instead of launching
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, spec, options = binder(*args, **kwargs)
        opts, sig, constexprs, attrs = kernel._pack_args(backend, options, bound, spec, options)
        src = ASTSource(kernel, sig, constexprs, attrs)
        ptx = compile(src, target=target, options=opts.__dict__).asm["ptx"]
        name = kernel.fn.__name__
        vector_loads[name] = vector_loads.get(name, 0) + len(re.findall(r"ld\\.global[.\\w]*\\.v4", ptx))

    _plan._launch = aot
    _plan.check_runnable = lambda kernel, device: None
    for pd, sd, flag in ((torch.float32, torch.float32, False), (torch.bfloat16, torch.float32, True)):
        ps = [torch.zeros(100 + i, dtype=pd) for i in range(3)]
        st = lambda: [torch.zeros(p.shape, dtype=sd) for p in ps]
        one = torch.ones(1)
        tk.adam(ps, [torch.zeros_like(p) for p in ps], st(), st(), st(), [torch.zeros(()) for p in ps],
                lr=torch.tensor(1e-3) if flag else 1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                decoupled=flag, amsgrad=flag, maximize=flag, adax=not flag, grad_scale=one if flag else None,
                found_inf=one if flag else None, clip_coef=None if flag else one)
    ts = [torch.zeros(10, dtype=torch.bfloat16), torch.zeros(10)]
    for p in (2.0, math.inf, 3.0):
        tk.global_norm(ts, p, 1.0, torch.ones(1))
    tk.scale_(ts, torch.ones(1))
    print(vector_loads)
    assert vector_loads["_adam_kernel"] > 0 and vector_loads["_norm_partials_kernel"] > 0, vector_loads
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels are compiled for real")
def test_kernels_compile_for_sm90():
    """Every kernel variant compiles to sm_90 PTX/cubin with the ptxas bundled in the triton
    wheel, and full tiles use 128-bit loads. Catches what the interpreter cannot (types,
    constexpr misuse, unsupported ops) in CPU-only CI."""
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
