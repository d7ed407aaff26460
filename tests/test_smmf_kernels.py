"""The fused SMMF backends against the reference (fused_optim._reference.smmf), called through
fused_optim.functional.smmf.

Every step is compared from one state: the backend's state before the step is copied to the
reference, on the same storage (both compute in fp32: an fp64 reference would differ by far more
than rounding where g + wd·θ or the new M cancel), both take the step, and the results must
agree: theta and the dense moments to a few ulps, the reconstructed
factor products r·cᵀ of |M| and V to fp32 rounding, the sign bits exactly except where the
reference's M is within rounding of 0 (there a 1-ulp difference may flip the stored sign, and
from then on a trajectory would differ by design, which is why runs are not compared end to end).

The triton cases run on CPU tensors under TRITON_INTERPRET=1 (CI) or on CUDA tensors; sizes are
small, since the interpreter runs every program in Python. The cuda cases need a GPU."""

import importlib
import importlib.util
import os
import sys

import pytest
import torch

import fused_optim
from fused_optim import _backends, functional
from fused_optim._reference.smmf import is_dense, sign_words, smmf_shape, unpack_signs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _cpu_unavailable() -> str | None:
    reason = _backends.unavailable_reason("cpu", "cpu")
    if reason is None and not hasattr(torch.ops.fused_optim, "smmf_"):
        reason = "the native op torch.ops.fused_optim.smmf_ is not in this build of fused_optim._C"
    return reason


def _triton_unavailable() -> str | None:
    if not HAS_TRITON:
        return "triton is not installed"
    if not (INTERPRET or torch.cuda.is_available()):
        return "the triton backend needs CUDA or TRITON_INTERPRET=1 (CPU)"
    return None


_CPU_REASON = _cpu_unavailable()
_TRITON_REASON = _triton_unavailable()
triton_only = [pytest.mark.triton, pytest.mark.skipif(_TRITON_REASON is not None, reason=str(_TRITON_REASON))]
_CUDA_REASON = (
    _backends.unavailable_reason("cuda", "cuda") if torch.cuda.is_available() else "needs a CUDA device"
)
BACKENDS = [
    pytest.param("cpu", marks=pytest.mark.skipif(_CPU_REASON is not None, reason=str(_CPU_REASON)), id="cpu"),
    pytest.param("triton", marks=triton_only, id="triton"),
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(_CUDA_REASON is not None, reason=str(_CUDA_REASON))],
    ),
]


def _device(backend: str) -> torch.device:
    if backend in ("triton", "cuda") and not INTERPRET:
        return torch.device("cuda")
    return torch.device("cpu")


# 0-d (1 x 1), one element, a prime (N x 1), 1000 -> 40 x 25, 3-D, squeezes to 1-D, 630 -> 30 x 21,
# 3015 -> 67 x 45 (a partial second sign word), 4096 -> 64 x 64 (two whole words), empty tensors.
SHAPES = [(), (1,), (37,), (1000,), (3, 5, 7), (1, 13, 1), (70, 9), (67, 45), (64, 64), (0, 3), (0,)]
SMALL = [(7,), (1000,), (67, 45)]
STEPS = 3

DEFAULT = dict(lr=1e-2, beta=0.9, eps=1e-8, weight_decay=0.0, decay_rate=-0.5, growth_rate=0.999,
               vector_reshape=True, decoupled=True)  # fmt: skip
CONFIGS = {
    "default": {},
    "no_momentum": dict(beta=None),
    "adamw_decay": dict(weight_decay=0.1),
    "adam_l2": dict(weight_decay=0.1, decoupled=False),
    "dense_path": dict(vector_reshape=False, weight_decay=0.05),
    "dense_no_momentum_l2": dict(vector_reshape=False, beta=None, weight_decay=0.05, decoupled=False),
    "rates_eps": dict(decay_rate=-0.8, growth_rate=0.99, eps=1e-3, beta=0.5),
    "lr_tensor_f32": dict(lr="f32", weight_decay=0.1),
    "lr_tensor_f64": dict(lr="f64"),
}


class State:
    """An SMMF state laid out as functional.smmf takes it."""

    def __init__(self, params, beta, vector_reshape, steps=0.0, random_state=True):
        self.params = params
        self.vector_reshape = vector_reshape
        self.row_ms, self.col_ms, self.signs, self.row_vs, self.col_vs = [], [], [], [], []
        self.exp_avgs, self.exp_avg_sqs = [], []
        gen = torch.Generator().manual_seed(7)

        def positive(*shape, dtype=torch.float32):
            """Random positive factors (the state of an earlier step), or zeros (a fresh one)."""
            if not random_state:
                return torch.zeros(shape, dtype=dtype, device=p.device)
            return (torch.rand(shape, generator=gen) * 0.02 + 0.01).to(dtype=dtype, device=p.device)

        for p in params:
            if is_dense(p, vector_reshape):
                if beta is not None:
                    m = positive(*p.shape, dtype=p.dtype)
                    self.exp_avgs.append(
                        torch.where(torch.rand(p.shape, generator=gen).to(p.device) < 0.5, m, -m)
                    )
                self.exp_avg_sqs.append(positive(*p.shape, dtype=p.dtype) ** 2)
                continue
            n, m = smmf_shape(p.numel())
            if beta is not None:
                self.row_ms.append(positive(n))
                self.col_ms.append(positive(m))
                words = torch.randint(
                    -(2**31), 2**31 - 1, (n, sign_words(m)), generator=gen, dtype=torch.int32
                )
                self.signs.append(_clear_padding(words, m).to(p.device))
            self.row_vs.append(positive(n) ** 2)
            self.col_vs.append(positive(m) ** 2)
        self.steps = [torch.full((), steps, device=p.device) for p in params]

    def lists(self):
        return (self.params, self.row_ms, self.col_ms, self.signs, self.row_vs, self.col_vs, self.exp_avgs,
                self.exp_avg_sqs, self.steps)  # fmt: skip

    def copy(self, dtype=None, device=None):
        """A deep copy; params, dense moments and factors cast to `dtype` (signs and steps kept)."""
        out = State.__new__(State)
        out.vector_reshape = self.vector_reshape

        def cast(ts):
            return [t.detach().to(device=device, dtype=dtype).clone() for t in ts]

        out.params = cast(self.params)
        out.row_ms, out.col_ms = cast(self.row_ms), cast(self.col_ms)
        out.row_vs, out.col_vs = cast(self.row_vs), cast(self.col_vs)
        out.exp_avgs, out.exp_avg_sqs = cast(self.exp_avgs), cast(self.exp_avg_sqs)
        out.signs = [s.to(device=device).clone() for s in self.signs]
        out.steps = [s.to(device=device).clone() for s in self.steps]
        return out

    def step(self, grads, backend, **kw):
        functional.smmf(
            self.params, grads, self.row_ms, self.col_ms, self.signs, self.row_vs, self.col_vs, self.exp_avgs,
            self.exp_avg_sqs, self.steps, vector_reshape=self.vector_reshape, backend=backend, **kw,
        )  # fmt: skip


def _clear_padding(words, m):
    """Words whose padding bits (columns >= m) are 0, as every backend writes them."""
    pad = sign_words(m) * 32 - m
    if pad == 0:
        return words
    keep = (1 << (32 - pad)) - 1
    words = words.clone()
    words[:, -1] &= keep if keep < 2**31 else keep - 2**32  # only the last word of a row is padded
    return words


def _params(shapes, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype=dtype, device=device) for s in shapes]


def _grads(shapes, dtype, device, step):
    gen = torch.Generator().manual_seed(100 + step)
    return [(torch.randn(s, generator=gen) * 0.3).to(dtype=dtype, device=device) for s in shapes]


def _kwargs(config, device):
    kw = dict(DEFAULT, **config)
    if kw["lr"] in ("f32", "f64"):
        kw["lr"] = torch.tensor(
            0.01, dtype=torch.float32 if kw["lr"] == "f32" else torch.float64, device=device
        )
    return kw


def _first_moments(before: State, grads, kw, mult=1.0):
    """M of every factorized param in this step, in fp64, from the state before it (to know which
    signs are within rounding of 0)."""
    out = []
    if kw["beta"] is None:
        return out
    t = before.steps[0].item() + 1.0 if before.steps else 1.0
    beta_m = kw["beta"] * kw["growth_rate"] ** (t - 1.0)
    k = 0
    for p, g in zip(before.params, grads, strict=True):
        if is_dense(p, before.vector_reshape):
            continue
        n, m = smmf_shape(p.numel())
        g = g.double().reshape(n, m) * mult
        if not kw["decoupled"] and kw["weight_decay"] != 0.0:
            g = g + kw["weight_decay"] * p.double().reshape(n, m)
        m_old = torch.outer(before.row_ms[k].double(), before.col_ms[k].double())
        m_old = torch.where(unpack_signs(before.signs[k].cpu(), m).to(m_old.device), m_old, -m_old)
        out.append(beta_m * m_old + (1.0 - beta_m) * g)
        k += 1
    return out


def _ulp(x: torch.Tensor) -> torch.Tensor:
    return torch.finfo(x.dtype).eps * x.abs().clamp_min(torch.finfo(x.dtype).tiny)


def _check(ours: State, ref: State, before: State, moments, where: str, ulps=4):
    for i, (a, b) in enumerate(zip(ours.params, ref.params, strict=True)):
        dtype = a.dtype
        b = b.to(dtype).double().cpu()
        a = a.double().cpu()
        # A few ulps of theta, plus fp32 rounding of the update itself (which cancels against
        # theta where theta is small).
        update = (b - before.params[i].double().cpu()).abs()
        tol = ulps * _ulp(b.to(dtype)).double() + 8 * torch.finfo(torch.float32).eps * update + 1e-30
        bad = (a - b).abs() > tol
        assert not bad.any(), (
            f"{where}: params[{i}] differs at {bad.sum().item()} elements, max {(a - b).abs().max()}"
        )
    for what in ("exp_avgs", "exp_avg_sqs"):
        for i, (a, b) in enumerate(zip(getattr(ours, what), getattr(ref, what), strict=True)):
            b = b.to(a.dtype).double().cpu()
            if b.numel() == 0:
                continue
            eps = torch.finfo(a.dtype).eps  # moments sum terms of either sign: atol scales too
            atol = 4 * eps * b.abs().max().item() + 1e-30
            torch.testing.assert_close(a.double().cpu(), b, rtol=4 * eps, atol=atol,
                                       msg=lambda m, w=what, i=i: f"{where}: {w}[{i}]: {m}")  # fmt: skip
    for k in range(len(ours.row_vs)):
        for rows, cols, what in (("row_vs", "col_vs", "V"), ("row_ms", "col_ms", "|M|")):
            if not getattr(ours, rows):
                continue
            a = torch.outer(getattr(ours, rows)[k].double().cpu(), getattr(ours, cols)[k].double().cpu())
            b = torch.outer(getattr(ref, rows)[k].double().cpu(), getattr(ref, cols)[k].double().cpu())
            torch.testing.assert_close(
                a, b, rtol=2e-5, atol=1e-30, msg=lambda m, w=what, k=k: f"{where}: {w}[{k}]: {m}"
            )
    for k, (a, b) in enumerate(zip(ours.signs, ref.signs, strict=True)):
        m = moments[k]
        cols = m.shape[1]
        if m.numel() == 0:
            assert a.numel() == 0
            continue
        differ = unpack_signs(a.cpu(), cols) != unpack_signs(b.cpu(), cols)
        near_zero = m.abs().cpu() <= 1e-5 * m.abs().max().clamp_min(1e-30).cpu()
        assert not (differ & ~near_zero).any(), f"{where}: signs[{k}] differ where M is not ~0"
        assert torch.equal(
            a.cpu() & ~_clear_padding(torch.full_like(a.cpu(), -1), cols), torch.zeros_like(a.cpu())
        ), f"{where}: signs[{k}] has padding bits set"
    assert [s.item() for s in ours.steps] == [s.item() for s in ref.steps], where


def _run(backend, config, shapes=SMALL, dtype=torch.float32, steps=STEPS, step0=0.0, scale=None, clip=None):
    device = _device(backend)
    kw = _kwargs(config, device)
    ours = State(_params(shapes, dtype, device), kw["beta"], kw.pop("vector_reshape"), steps=step0)
    extra = {}
    mult = 1.0
    if scale is not None:
        extra["grad_scale"] = torch.full((), scale, device=device)
        mult /= scale
    if clip is not None:
        extra["clip_coef"] = torch.full((), clip, device=device)
        mult *= clip
    for k in range(steps):
        grads = _grads(shapes, dtype, device, k)
        before = ours.copy()
        ref = ours.copy(device="cpu")
        moments = _first_moments(before, grads, dict(kw, vector_reshape=ours.vector_reshape), mult)
        ours.step(grads, backend, **kw, **extra)
        ref_kw = {**kw, "lr": kw["lr"].cpu() if isinstance(kw["lr"], torch.Tensor) else kw["lr"]}
        ref_extra = {k: v.cpu() for k, v in extra.items()}
        ref.step([g.cpu() for g in grads], "reference", **ref_kw, **ref_extra)
        _check(ours, ref, before, moments, f"step {k + 1}")
    return ours


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_shapes(backend):
    _run(backend, dict(weight_decay=0.1), shapes=SHAPES)
    _run(backend, dict(vector_reshape=False), shapes=SHAPES, steps=2)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_options(backend, config):
    _run(backend, CONFIGS[config])


@pytest.mark.parametrize("backend", BACKENDS)
def test_later_steps_with_nonzero_state(backend):
    _run(backend, dict(weight_decay=0.1), step0=40.0, steps=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_small_tensors_and_larger_ones(backend):
    """Many small tensors in one call, plus (on the cpu backend) one of several tiles."""
    shapes = [(1 + i % 13, 1 + i % 5) for i in range(60)] + [(300, 7)]
    if backend != "triton" or not INTERPRET:
        shapes.append((600, 1000))  # 800 x 750: three row tiles on the CPU, 3 x 25 on CUDA
    _run(backend, {}, shapes=shapes, steps=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_16bit_storage(backend, dtype):
    _run(backend, dict(weight_decay=0.1), shapes=SMALL, dtype=dtype)
    _run(backend, dict(vector_reshape=False), shapes=[(7,), (1, 30)], dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scale_and_clip_coef(backend):
    _run(backend, dict(weight_decay=0.1), scale=1024.0, clip=0.25, steps=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_found_inf_changes_nothing(backend):
    device = _device(backend)
    kw = _kwargs({}, device)
    ours = State(_params(SHAPES, torch.float32, device), kw["beta"], kw.pop("vector_reshape"))
    ours.step(_grads(SHAPES, torch.float32, device, 0), backend, **kw)
    before = ours.copy()
    ours.step(_grads(SHAPES, torch.float32, device, 1), backend, found_inf=torch.ones((), device=device),
              grad_scale=torch.full((), 2.0, device=device), **kw)  # fmt: skip
    for a, b in zip(before.lists(), ours.lists(), strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_gradient_keeps_zero_state_finite(backend):
    """An all-zero gradient from a zero state: V and |M| sum to 0, the column factor is left
    undivided (no NaN), theta only decays."""
    device = _device(backend)
    kw = _kwargs(dict(weight_decay=0.1), device)
    shapes = [(6, 5), (40,)]
    ours = State(
        _params(shapes, torch.float32, device), kw["beta"], kw.pop("vector_reshape"), random_state=False
    )
    before = [p.clone() for p in ours.params]
    ours.step([torch.zeros(s, device=device) for s in shapes], backend, **kw)
    for p, b in zip(ours.params, before, strict=True):
        torch.testing.assert_close(p, b * (1 - 0.01 * 0.1))
    for t in ours.row_ms + ours.col_ms + ours.row_vs + ours.col_vs:
        assert torch.isfinite(t).all() and (t == 0).all()
    assert all((s == 0).all() for s in ours.signs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_params_and_grads(backend):
    device = _device(backend)
    kw = _kwargs(dict(weight_decay=0.1), device)
    base = _params([(9, 12)], torch.float32, device)[0]
    ours = State([base.t()], kw["beta"], kw.pop("vector_reshape"))  # a transposed view
    ref = ours.copy()
    ref.params = [ref.params[0].contiguous()]
    grads = [_grads([(9, 12)], torch.float32, device, 0)[0].t()]
    ours.step(grads, backend, **kw)
    ref.step([g.contiguous() for g in grads], backend, **kw)
    assert ours.params[0].data_ptr() == base.data_ptr()
    torch.testing.assert_close(ours.params[0], ref.params[0], rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(ours.signs, ref.signs, strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    a = _run(backend, {}, shapes=[(300, 7), (64, 64)], steps=2)
    b = _run(backend, {}, shapes=[(300, 7), (64, 64)], steps=2)
    for x, y in zip(a.lists(), b.lists(), strict=True):
        assert all(torch.equal(u, v) for u, v in zip(x, y, strict=True))


@pytest.mark.skipif(_CPU_REASON is not None, reason=str(_CPU_REASON))
@pytest.mark.parametrize(
    "config, dtype",
    [("adamw_decay", torch.float32), ("no_momentum", torch.float32), ("adam_l2", torch.bfloat16),
     ("default", torch.float16)],
)  # fmt: skip
def test_cpu_bits_do_not_depend_on_the_thread_count(config, dtype):
    """The CPU's threads take tiles as they come: which thread did a tile must not show."""
    # several tiles each for the large ones; 768 -> 32 x 24 and (5, 3) are narrow (< 32 columns)
    shapes = [(1200, 700), (768,), (300, 7), (5, 3)] * 2
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs.append(_run("cpu", CONFIGS[config], shapes=shapes, dtype=dtype, steps=2).lists())
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        for x, y in zip(runs[0], other, strict=True):
            assert all(torch.equal(u, v) for u, v in zip(x, y, strict=True))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, interpreter
@pytest.mark.parametrize("backend", BACKENDS)
def test_inf_and_nan_gradients_spread_as_in_the_reference(backend):
    """An inf or NaN gradient without GradScaler: the same elements end NaN as in the reference
    (through the factors, a whole row or matrix), and the finite ones agree."""
    device = _device(backend)

    def run(backend, device):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in [(40, 25), (64, 64), (7,)]]
        opt = fused_optim.SMMF(params, lr=1e-2, weight_decay=0.1, backend=backend)
        for k in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(k)).to(device)
            if k == 1:
                params[0].grad[3, 4] = float("inf")
                params[1].grad[0, 0] = float("nan")
            opt.step()
        return [p.detach().cpu() for p in params]

    ours, ref = run(backend, device), run("reference", torch.device("cpu"))
    assert ours[0].isnan().any() and ours[1].isnan().any() and not ours[2].isnan().any()
    for x, y in zip(ours, ref, strict=True):
        assert torch.equal(x.isnan(), y.isnan())
        torch.testing.assert_close(x, y, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_arguments_raise(backend):
    device = _device(backend)
    kw = _kwargs({}, device)
    vr = kw.pop("vector_reshape")
    p = _params([(6, 5)], torch.float32, device)
    st = State(p, kw["beta"], vr)
    g = _grads([(6, 5)], torch.float32, device, 0)
    short = [torch.zeros(5, device=device)]
    with pytest.raises((RuntimeError, ValueError), match="row_vs|col_vs|elements|shape"):
        functional.smmf(p, g, st.row_ms, st.col_ms, st.signs, short, st.col_vs, [], [], st.steps,
                        backend=backend, vector_reshape=vr, **kw)  # fmt: skip
    floats = [s.float() for s in st.signs]
    with pytest.raises((RuntimeError, TypeError), match="dtype|int32|Int"):
        functional.smmf(p, g, st.row_ms, st.col_ms, floats, st.row_vs, st.col_vs, [], [], st.steps,
                        backend=backend, vector_reshape=vr, **kw)  # fmt: skip
    with pytest.raises(RuntimeError, match="shape"):
        functional.smmf(p, [torch.zeros(5, 6, device=device)], st.row_ms, st.col_ms, st.signs, st.row_vs,
                        st.col_vs, [], [], st.steps, backend=backend, vector_reshape=vr, **kw)  # fmt: skip
    assert torch.equal(p[0], _params([(6, 5)], torch.float32, device)[0]), "a refused call changed the param"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


# ---- FSDP2 shards, simulated in one process ---------------------------------------------------


def _cuts(numel: int) -> list[tuple[int, int]]:
    """Four ranks' runs of a flat param: cut inside matrix rows and sign words, one run empty."""
    c1 = min(numel, numel // 3 + 1)
    c2 = max(c1, min(numel, 2 * numel // 3 - 1))
    return [(0, c1), (c1, c1), (c1, c2), (c2, numel)]


def _shard_step(state: State, grads, backend, kw):
    """One step of `state` as four ranks would take it: each rank's run of every param stepped
    with its own copy of the factors and its window of the sign words, the ranks' raw sums added
    (an all-reduce), then SmmfSums.finish on every rank. Returns the ranks' states reassembled as
    one process's, and asserts that every rank ends with the same factors."""
    from fused_optim._reference.smmf import SmmfSums, Window, pack_signs

    dense = [is_dense(p, state.vector_reshape) for p in state.params]
    numels = [-1 if d else p.numel() for p, d in zip(state.params, dense, strict=True)]
    shapes = [smmf_shape(n) for n in numels if n >= 0]
    device = state.params[0].device
    layout = SmmfSums(shapes, device)
    ranks, total = [], layout.zeros()
    for r in range(4):
        part = State.__new__(State)
        part.vector_reshape = state.vector_reshape
        part.params, rank_grads, starts = [], [], []
        part.row_ms, part.col_ms, part.signs, part.row_vs, part.col_vs = [], [], [], [], []
        part.exp_avgs, part.exp_avg_sqs, part.steps = [], [], [s.clone() for s in state.steps]
        k_fac = k_dense = 0
        for i, p in enumerate(state.params):
            a, b = _cuts(p.numel())[r]
            part.params.append(p.detach().reshape(-1)[a:b].clone())
            rank_grads.append(grads[i].reshape(-1)[a:b].clone())
            starts.append(a)
            if dense[i]:
                part.exp_avg_sqs.append(state.exp_avg_sqs[k_dense].reshape(-1)[a:b].clone())
                if state.exp_avgs:
                    part.exp_avgs.append(state.exp_avgs[k_dense].reshape(-1)[a:b].clone())
                k_dense += 1
                continue
            n, m = smmf_shape(p.numel())
            part.row_vs.append(state.row_vs[k_fac].clone())
            part.col_vs.append(state.col_vs[k_fac].clone())
            if state.signs:
                part.row_ms.append(state.row_ms[k_fac].clone())
                part.col_ms.append(state.col_ms[k_fac].clone())
                window = Window(n, m, a, b - a)
                bits = unpack_signs(state.signs[k_fac].cpu(), m).reshape(-1)[a:b]
                words = window.pack(bits) if b > a else torch.zeros(0, sign_words(m), dtype=torch.int32)
                part.signs.append(words.to(device))
            k_fac += 1
        sums = layout.zeros()
        functional.smmf(
            part.params, rank_grads, part.row_ms, part.col_ms, part.signs, part.row_vs, part.col_vs,
            part.exp_avgs, part.exp_avg_sqs, part.steps, vector_reshape=state.vector_reshape,
            backend=backend, global_numels=numels, starts=starts, sums=sums, **kw,
        )  # fmt: skip
        total += sums
        ranks.append((part, starts))
    for part, _ in ranks:
        layout.finish(
            total, part.row_ms, part.col_ms, part.row_vs, part.col_vs, found_inf=kw.get("found_inf")
        )
    out = state.copy()
    first = ranks[0][0]
    for part, _ in ranks[1:]:
        for what in ("row_ms", "col_ms", "row_vs", "col_vs"):
            for x, y in zip(getattr(part, what), getattr(first, what), strict=True):
                assert torch.equal(x, y), f"{what} differ between ranks"
    out.row_ms, out.col_ms, out.row_vs, out.col_vs = first.row_ms, first.col_ms, first.row_vs, first.col_vs
    out.steps = first.steps
    k_fac = k_dense = 0
    for i, p in enumerate(state.params):
        flat = torch.cat([part.params[i] for part, _ in ranks])
        out.params[i] = flat.reshape(p.shape)
        if dense[i]:
            out.exp_avg_sqs[k_dense] = torch.cat([part.exp_avg_sqs[k_dense] for part, _ in ranks]).reshape(
                p.shape
            )
            if state.exp_avgs:
                out.exp_avgs[k_dense] = torch.cat([part.exp_avgs[k_dense] for part, _ in ranks]).reshape(
                    p.shape
                )
            k_dense += 1
            continue
        if state.signs:
            n, m = smmf_shape(p.numel())
            bits = []
            for part, starts in ranks:
                a, b = _cuts(p.numel())[ranks.index((part, starts))]
                if b > a:
                    bits.append(Window(n, m, a, b - a).unpack(part.signs[k_fac].cpu()))
            full = torch.cat(bits) if bits else torch.zeros(0, dtype=torch.bool)
            out.signs[k_fac] = pack_signs(full.reshape(n, m)).to(device)
        k_fac += 1
    return out


SHARD_SHAPES = [(67, 45), (1000,), (37,), (3, 5, 7), (1, 13, 1), (2, 1), (70, 9)]


@pytest.mark.parametrize("config", ["default", "no_momentum", "adam_l2", "dense_path", "rates_eps"])
@pytest.mark.parametrize("backend", [pytest.param("reference", id="reference"), *BACKENDS])
def test_shards_of_a_param_step_as_one_process(backend, config):
    """FSDP2: ranks holding runs of each param (cut inside matrix rows and sign words, one empty)
    take the step of one process once their raw sums are added, on every backend."""
    device = _device(backend) if backend != "reference" else torch.device("cpu")
    kw = _kwargs(CONFIGS[config], device)
    ours = State(_params(SHARD_SHAPES, torch.float32, device), kw["beta"], kw.pop("vector_reshape"))
    for k in range(STEPS):
        grads = _grads(SHARD_SHAPES, torch.float32, device, k)
        before = ours.copy()
        ref = ours.copy(device="cpu")
        moments = _first_moments(before, grads, dict(kw, vector_reshape=ours.vector_reshape))
        ours = _shard_step(ours, grads, backend, kw)
        ref_kw = {**kw, "lr": kw["lr"].cpu() if isinstance(kw["lr"], torch.Tensor) else kw["lr"]}
        ref.step([g.cpu() for g in grads], "reference", **ref_kw)
        _check(ours, ref, before, moments, f"step {k + 1}")


@pytest.mark.parametrize("backend", [pytest.param("reference", id="reference"), *BACKENDS])
def test_shards_skip_the_step_on_found_inf(backend):
    device = _device(backend) if backend != "reference" else torch.device("cpu")
    kw = _kwargs({}, device)
    ours = State(_params(SHARD_SHAPES, torch.float32, device), kw["beta"], kw.pop("vector_reshape"))
    before = ours.copy()
    after = _shard_step(ours, _grads(SHARD_SHAPES, torch.float32, device, 0), backend,
                        dict(kw, found_inf=torch.ones((), device=device)))  # fmt: skip
    for what in ("params", "row_ms", "col_ms", "signs", "row_vs", "col_vs", "steps"):
        for x, y in zip(getattr(after, what), getattr(before, what), strict=True):
            assert torch.equal(x, y), what


@pytest.fixture
def launch_grids(monkeypatch):
    _plan = importlib.import_module("fused_optim.triton_kernels._plan")
    grids = []
    real = _plan._launch

    def counting(kernel, grid, *args, **kwargs):
        grids.append(grid)
        real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(_plan, "_launch", counting)
    return grids


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=triton_only)])
def test_two_launches_whatever_the_tensor_count(backend, launch_grids):
    """Two launches for 10 and for 300 tensors of mixed kinds (factorized, dense, empty), the
    update covering every tile and the finalize every part."""
    device = _device(backend)
    for count in (10, 300):
        shapes = [
            [(1 + i % 30,), (1 + i % 4, 1 + i % 9), (0,), (2, 1 + i % 3, 2 + i % 5)][i % 4]
            for i in range(count)
        ]
        kw = _kwargs(dict(vector_reshape=False), device)
        ours = State(_params(shapes, torch.float32, device), kw["beta"], kw.pop("vector_reshape"))
        for k in range(2):
            launch_grids.clear()
            before = [p.clone() for p in ours.params]
            ours.step(_grads(shapes, torch.float32, device, k), backend, **kw)
            assert len(launch_grids) == 2
            assert launch_grids[0][0] >= count and launch_grids[1][0] >= count
            moved = [not torch.equal(p, b) for p, b in zip(ours.params, before, strict=True) if p.numel()]
            assert all(moved)
        assert all(s.item() == 2.0 for s in ours.steps)


def test_shard_arguments_go_together():
    p = [torch.zeros(4)]
    with pytest.raises(ValueError, match="go together"):
        functional.smmf(p, [torch.zeros(4)], [], [], [], [torch.zeros(2)], [torch.zeros(2)], [], [],
                        [torch.zeros(())], beta=None, global_numels=[8], starts=[4])  # fmt: skip
