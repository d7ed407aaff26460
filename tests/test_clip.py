"""fused_optim.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_."""

import math

import numpy as np
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


# ---- every backend that runs on CPU tensors here (triton under TRITON_INTERPRET=1) -----------

CPU_BACKENDS = fused_optim.available_backends("cpu")
FUSED_CPU_BACKENDS = [b for b in CPU_BACKENDS if b != "reference"]


def _params(grads):
    ps = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros(g.shape, dtype=g.dtype))
        p.grad = g
        ps.append(p)
    return ps


def _assert_same_as_torch(total, expected, ours, theirs, rtol=2e-6, atol=1e-7):
    assert total.dtype == expected.dtype and total.shape == expected.shape == ()
    assert total.device == expected.device
    torch.testing.assert_close(total, expected, rtol=rtol, atol=0, equal_nan=True)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grad_not_dense_in_memory(backend):
    def make():
        g = torch.Generator().manual_seed(0)
        base = torch.randn(3, 8, generator=g)
        grads = [base[:, ::2], torch.randn(5, generator=g), torch.randn(4, 6, generator=g).t()]
        return base, grads

    (base, grads), (base_t, grads_t) = make(), make()
    total = fused_optim.clip_grad_norm_(_params(grads), 0.5, backend=backend)
    expected = torch.nn.utils.clip_grad_norm_(_params(grads_t), 0.5)
    _assert_same_as_torch(total, expected, [base, *grads], [base_t, *grads_t])
    assert not torch.equal(base[:, ::2], make()[0][:, ::2])  # written back into the view's memory
    assert torch.equal(base[:, 1::2], base_t[:, 1::2])  # and only there


def _shared_grads(views):
    """Grads sharing memory: one tensor listed three times; with views, also two overlapping
    views and two interleaved ones (no element in common, but their byte spans overlap)."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(7, 5, generator=g)
    big = torch.randn(4097, generator=g)
    base = torch.randn(300, generator=g)
    inter = torch.randn(4, 10, generator=g)
    if not views:
        return [a, big, a, a], [a, big]
    grads = [a, big, a, base[:200], base[100:], inter[:, ::2], inter[:, 1::2], a]
    return grads, [a, big, base, inter]


@pytest.mark.parametrize("views", [False, True])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grads_sharing_memory_are_counted_and_scaled_once_per_occurrence(backend, views):
    grads_t, memory_t = _shared_grads(views)
    expected = torch.nn.utils.clip_grad_norm_(_params(grads_t), 20.0)
    runs = []
    for _ in range(2):
        grads, memory = _shared_grads(views)
        total = fused_optim.clip_grad_norm_(_params(grads), 20.0, backend=backend)
        # coef ~ 0.3: `a` ends up scaled by coef^3, base[100:200] by coef^2, as by torch
        _assert_same_as_torch(total, expected, memory, memory_t, rtol=4e-6)
        runs.append((total, memory))
    (t1, m1), (t2, m2) = runs
    assert torch.equal(t1, t2) and all(torch.equal(x, y) for x, y in zip(m1, m2, strict=True))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_one_scale_call_unless_grads_repeat(backend, monkeypatch):
    impl = _backends._load(backend)
    calls = []
    real = impl.scale_

    def counting(tensors, coef):
        calls.append(len(tensors))
        return real(tensors, coef)

    monkeypatch.setattr(impl, "scale_", counting)
    grads = [torch.randn(5), torch.randn(3, 4), torch.randn(())]
    fused_optim.clip_grad_norm_(_params(grads), 0.1, backend=backend)
    assert calls == [3]
    calls.clear()
    fused_optim.clip_grad_norm_(_params([grads[0], grads[1], grads[0]]), 0.1, backend=backend)
    assert calls == [2, 1]  # rounds of distinct tensors, one after the other


@pytest.mark.parametrize("backend", FUSED_CPU_BACKENDS)
def test_fused_scale_refuses_tensors_sharing_memory(backend):
    scale_ = _backends._load(backend).scale_
    coef = torch.tensor(0.5)
    a = torch.randn(10)
    before = a.clone()
    for tensors in ([a, torch.randn(3), a], [a[:6], a[4:]], [torch.randn(2), a.view(2, 5), a]):
        with pytest.raises(RuntimeError, match="overlap in memory"):
            scale_(tensors, coef)
        assert torch.equal(a, before)  # refused before anything was written
    with pytest.raises(RuntimeError, match="share memory"):
        scale_([torch.randn(3).expand(4, 3)], coef)
    scale_([a[:5], a[5:]], coef)  # adjacent, not overlapping
    assert torch.equal(a, before * 0.5)


DTYPE_CASES = [
    ((torch.float64,), torch.float64),
    ((torch.float16,), torch.float16),
    ((torch.bfloat16,), torch.bfloat16),
    ((torch.float32, torch.bfloat16), torch.float32),
    ((torch.float16, torch.bfloat16), torch.float32),
    ((torch.float32, torch.float64), torch.float64),
]
# per-dtype agreement with torch, which rounds per-tensor norms (and the coefficient) to the
# grads' dtype; we compute in fp32 / fp64 and round the result once
DTYPE_RTOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("dtypes,out_dtype", DTYPE_CASES, ids=lambda x: str(x))
@pytest.mark.parametrize("backend", ["auto", *CPU_BACKENDS])
def test_norm_is_returned_in_torchs_dtype(backend, dtypes, out_dtype):
    def make():
        ts = []
        for k, dt in enumerate(dtypes):
            ts += random_tensors([(7,), (33, 17), (300,)], dt, "cpu", 20 + k)
        return ts

    grads, grads_t = make(), make()
    if torch.float64 in dtypes and backend not in ("auto", "reference"):
        # the kernels take fp32/fp16/bf16 (auto sends fp64 to the reference)
        with pytest.raises(RuntimeError, match="cannot run: .*float64"):
            fused_optim.clip_grad_norm_(_params(grads), 1.0, backend=backend)
        return
    total = fused_optim.clip_grad_norm_(_params(grads), 1.0, backend=backend)
    expected = torch.nn.utils.clip_grad_norm_(_params(grads_t), 1.0)
    assert expected.dtype == out_dtype
    rtol = max(DTYPE_RTOL[dt] for dt in dtypes)
    _assert_same_as_torch(total, expected, grads, grads_t, rtol=rtol, atol=1e-3 if rtol > 1e-5 else 1e-12)
    # computed accurately, rounded once
    exact = torch.cat([g.double().flatten() for g in make()]).norm()
    torch.testing.assert_close(total.double(), exact, rtol=DTYPE_RTOL[out_dtype] / 4, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_grads_or_only_empty_ones(backend):
    for grads in ([], [torch.empty(0, dtype=torch.float16)]):
        ps = _params(grads) + [torch.nn.Parameter(torch.ones(2))]  # one without a grad
        total = fused_optim.clip_grad_norm_(ps, 1.0, backend=backend)
        expected = torch.nn.utils.clip_grad_norm_(_params([g.clone() for g in grads]), 1.0)
        assert total.dtype == expected.dtype and total.device == expected.device
        assert torch.equal(total, expected)


def _sparse_grads(dtype=torch.float32):
    g = torch.Generator().manual_seed(4)
    a = torch.randn(33, 17, generator=g)
    a[a.abs() < 0.5] = 0.0  # some zeros
    return [torch.randn(7, generator=g), torch.zeros(5), a, (torch.randn(4097, generator=g) * 3).to(dtype)]


@pytest.mark.parametrize("norm_type", [0, 0.0, -math.inf, "-inf", -1.0, -2.0, -0.5])
@pytest.mark.parametrize("without_zero_grad", [False, True])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_and_negative_norm_types_match_torch(backend, norm_type, without_zero_grad):
    def make():
        grads = _sparse_grads()
        return [g for g in grads if g.abs().sum() > 0] if without_zero_grad else grads

    grads, grads_t = make(), make()
    # torch refuses the -inf / negative norm of an empty grad; an empty grad contributes nothing here
    total = fused_optim.clip_grad_norm_(_params([*grads, torch.empty(0)]), 0.5, norm_type, backend=backend)
    expected = torch.nn.utils.clip_grad_norm_(_params(grads_t), 0.5, norm_type)
    if float(norm_type) in (0.0, -math.inf):
        assert torch.equal(total, expected)
    _assert_same_as_torch(total, expected, grads, grads_t, rtol=1e-5)


def test_zero_norm_counts_tensors_with_a_nonzero_like_torch():
    grads = _sparse_grads(torch.float16)
    assert fused_optim.clip_grad_norm_(_params(grads), 1e9, norm_type=0).item() == 3.0
    grads = _sparse_grads()
    assert fused_optim.clip_grad_norm_(_params(grads), 1e9, norm_type=-math.inf).item() == 0.0


def test_nan_norm_type_is_refused():
    with pytest.raises(ValueError, match="norm_type"):
        fused_optim.clip_grad_norm_(_params([torch.randn(3)]), 1.0, norm_type=math.nan)


MAX_NORMS = [
    1,
    0,
    0.5,
    np.float32(0.5),
    np.float64(2.0),
    torch.tensor(0.5),
    torch.tensor([0.5]),
    torch.tensor([[3.0]], dtype=torch.float64),
    torch.tensor(7),
    -1.0,
    torch.tensor(-2.0),
    math.nan,
    math.inf,
    -math.inf,
    1e6,
]


@pytest.mark.parametrize("max_norm", MAX_NORMS, ids=lambda m: repr(m).replace(" ", ""))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_max_norm_like_torch(backend, dtype, max_norm):
    grads = random_tensors([(7,), (33, 17)], dtype, "cpu", 5)
    grads_t = [g.clone() for g in grads]
    total = fused_optim.clip_grad_norm_(_params(grads), max_norm, backend=backend)
    expected = torch.nn.utils.clip_grad_norm_(_params(grads_t), max_norm)
    rtol = DTYPE_RTOL[dtype]
    _assert_same_as_torch(total, expected, grads, grads_t, rtol=rtol, atol=1e-3 if rtol > 1e-5 else 1e-7)


def test_max_norm_tensor_of_several_elements_is_refused_like_torch():
    with pytest.raises(ValueError):
        torch.nn.utils.clip_grad_norm_(_params([torch.randn(3)]), torch.ones(2))
    with pytest.raises(ValueError):
        fused_optim.clip_grad_norm_(_params([torch.randn(3)]), torch.ones(2))


OVERFLOW_CASES = {
    # name: (grads, norm_type); fp32/bf16 grads whose norm torch's fp32 accumulation overflows
    "square_overflows": (lambda: [torch.full((5,), 1e20), torch.randn(7)], 2.0),
    "bf16_square_overflows": (lambda: [torch.full((4,), 1e20).bfloat16(), torch.randn(7)], 2.0),
    "sum_overflows_in_one_tensor": (lambda: [torch.full((1000,), 1e19)], 2.0),
    "sum_overflows_across_tensors": (lambda: [torch.full((1,), 1.5e19), torch.full((1,), 1.5e19)], 2.0),
    "sum_overflows_across_chunks": (lambda: [torch.full((3 * 65536,), 5e16)], 2.0),
    "cube_overflows": (lambda: [torch.full((2,), 1e13)], 3.0),
    "one_norm_overflows": (lambda: [torch.full((2,), 3e38)], 1.0),
    # finite
    "just_below": (lambda: [torch.full((3,), 1e19)], 2.0),
    "inf_norm_of_huge_values": (lambda: [torch.full((5,), 1e20)], math.inf),
    "fp64_is_exact": (lambda: [torch.full((5,), 1e20, dtype=torch.float64)], 2.0),
    # non-finite grads
    "nan_grad": (lambda: [torch.tensor([1.0, math.nan]), torch.randn(7)], 2.0),
    "inf_grad": (lambda: [torch.tensor([1.0, -math.inf]), torch.randn(7)], 2.0),
}


@pytest.mark.parametrize("case", OVERFLOW_CASES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_overflow_gives_torchs_outcome_on_every_backend(backend, case):
    make, norm_type = OVERFLOW_CASES[case]
    grads, grads_t = make(), make()
    if grads[0].dtype == torch.float64 and backend != "reference":
        backend = "auto"  # the kernels take no fp64; auto sends it to the reference
    total = fused_optim.clip_grad_norm_(_params(grads), 1.0, norm_type, backend=backend)
    expected = torch.nn.utils.clip_grad_norm_(_params(grads_t), 1.0, norm_type)
    assert total.isfinite() == expected.isfinite() and total.isnan() == expected.isnan()
    _assert_same_as_torch(total, expected, grads, grads_t, rtol=DTYPE_RTOL[grads[0].dtype])
    if expected.isinf():
        assert all(not g[make()[i].isfinite()].any() for i, g in enumerate(grads))  # coef 0, as torch
        with pytest.raises(RuntimeError, match="non-finite"):
            fused_optim.clip_grad_norm_(
                _params(make()), 1.0, norm_type, error_if_nonfinite=True, backend=backend
            )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_global_norm_overflow_rule_sees_unscaled_grads_and_stays_float32(backend):
    from fused_optim import functional

    # as torch sees them after GradScaler.unscale_: 7.5e18 (finite norm), then 2e19 (inf)
    scaled = [torch.full((1,), 1.5e19), torch.full((1,), 1.5e19)]
    norm, coef = functional.global_norm(scaled, 2.0, 1.0, torch.tensor(2.0), backend=backend)
    assert norm.dtype == coef.dtype == torch.float32
    torch.testing.assert_close(norm, torch.tensor(math.sqrt(2) * 7.5e18), rtol=1e-6, atol=0)
    norm, coef = functional.global_norm(
        [torch.full((8,), 1e19)], 2.0, 1.0, torch.tensor(0.5), backend=backend
    )
    assert norm.isinf() and coef.item() == 0.0
    norm, _ = functional.global_norm([torch.randn(5).half()], 2.0, 1.0, backend=backend)
    assert norm.dtype == torch.float32  # the optimizers' path keeps fp32
