"""GPU-only checks (skipped without CUDA): the cuda and triton backends against torch's fused
AdamW, steps captured in CUDA graphs, launch counts, and a tensor above 2^31 elements.
The generic backend-vs-reference tests (test_backends.py) also run on CUDA when present."""

import copy

import pytest
import torch
from conftest import HAS_CUDA, assert_close, backends_for, random_tensors

import fused_optim
from fused_optim import _reference, functional

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]

SHAPES = [(), (1,), (7,), (33, 17), (4097,), (2 * 65536 + 3,), (0,)] + [(n,) for n in range(1, 50)]


def _gpu_backends():
    return backends_for("cuda") if HAS_CUDA else []


def _params(dtype=torch.float32, shapes=SHAPES):
    return [torch.nn.Parameter(t) for t in random_tensors(shapes, dtype, "cuda", 0)]


def _set_grads(params, step):
    grads = random_tensors([p.shape for p in params], params[0].dtype, "cuda", 50 + step)
    for p, g in zip(params, grads, strict=True):
        p.grad = g


@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_matches_torch_fused_adamw(backend, dtype, amsgrad):
    # lr large enough that the params move far more than the 16-bit tolerance: a wrong step
    # size or sign must fail. The deltas are compared, not just the params.
    ours = _params(dtype)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    start = [p.detach().float().clone() for p in ours]
    opt = fused_optim.AdamW(ours, lr=2e-2, amsgrad=amsgrad, backend=backend)
    ref = torch.optim.AdamW(theirs, lr=2e-2, amsgrad=amsgrad, fused=True)
    for step in range(10):
        _set_grads(ours, step)
        _set_grads(theirs, step)
        opt.step()
        ref.step()
    for p, q, p0 in zip(ours, theirs, start, strict=True):
        assert_close(p.detach().float() - p0, q.detach().float() - p0, dtype)
        for k in ("exp_avg", "exp_avg_sq"):
            assert_close(opt.state[p][k], ref.state[q][k], dtype)


@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("clip", [None, 1.0])
def test_step_captured_in_a_cuda_graph_matches_eager(backend, clip):
    ours = _params()
    eager = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    lr = torch.tensor(1e-3, device="cuda")
    opt = fused_optim.AdamW(ours, lr=lr, max_grad_norm=clip, backend=backend)
    ref = fused_optim.AdamW(eager, lr=1e-3, max_grad_norm=clip, backend=backend)
    static_grads = random_tensors([p.shape for p in ours], torch.float32, "cuda", 1)
    for p, g in zip(ours, static_grads, strict=True):
        p.grad = g
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture: state, plans, compiled kernels
        for _ in range(2):
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    # eager twin: the same 2 warm-up steps
    for p, g in zip(eager, static_grads, strict=True):
        p.grad = g.clone()
    ref.step()
    ref.step()
    for step in range(5):
        new = random_tensors([p.shape for p in ours], torch.float32, "cuda", 100 + step)
        for g, n, q in zip(static_grads, new, eager, strict=True):
            g.copy_(n)
            q.grad = n.clone()
        if step == 3:
            lr.fill_(5e-4)  # a tensor lr changed in place is seen by the replay
            ref.param_groups[0]["lr"] = 5e-4
        graph.replay()
        ref.step()
    torch.cuda.synchronize()
    for p, q in zip(ours, eager, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=2e-5, atol=2e-6)
        assert opt.state[p]["step"].item() == ref.state[q]["step"].item() == 7


def _count_kernels(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(
        1
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
        and "memcpy" not in e.name.lower()
        and "memset" not in e.name.lower()
    )


@pytest.mark.parametrize("backend", _gpu_backends())
def test_adamw_with_clipping_over_300_tensors_is_at_most_3_launches(backend):
    sizes = [int(s) for s in torch.randint(1, 200_000, (300,), generator=torch.Generator().manual_seed(0))]
    params = [torch.nn.Parameter(t) for t in random_tensors([(s,) for s in sizes], torch.float32, "cuda", 3)]
    _set_grads(params, 0)
    opt = fused_optim.AdamW(params, lr=1e-3, max_grad_norm=1.0, backend=backend)
    opt.step()  # first step: state and plan set-up
    assert _count_kernels(opt.step) <= 3


@pytest.mark.large
@pytest.mark.parametrize("backend", _gpu_backends())
def test_tensor_above_2_pow_31_elements(backend):
    n = 2**31 + 77
    free, _ = torch.cuda.mem_get_info()
    if free < 6 * n * 2 + (1 << 30):
        pytest.skip("not enough GPU memory for four bf16 tensors of 2^31 elements")
    p = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    g = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    step = [torch.zeros((), device="cuda")]
    # The reference on slices at both ends (the update is elementwise).
    ends = [slice(0, 1 << 20), slice(n - (1 << 20), n)]
    expected = []
    for sl in ends:
        ps, ms, vs = [p[sl].clone()], [m[sl].clone()], [v[sl].clone()]
        # lr 0.1: the first step moves every element by ~0.1, far above the bf16 tolerance, so
        # a kernel that skipped the tail (int32 indexing) fails.
        _reference.adam(ps, [g[sl]], ms, vs, [], [torch.zeros((), device="cuda")], lr=0.1, beta1=0.9,
                        beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled=True, amsgrad=False,
                        maximize=False)  # fmt: skip
        expected.append((p[sl].clone(), ps[0]))
    functional.adam([p], [g], [m], [v], [], step, lr=0.1, weight_decay=0.01, decoupled=True, backend=backend)
    for sl, (before, e) in zip(ends, expected, strict=True):
        assert_close(p[sl], e, torch.bfloat16)
        assert (p[sl].float() - before.float()).abs().mean() > 0.05  # every element moved ~0.1
    assert step[0].item() == 1
    del p, g, m, v
    torch.cuda.empty_cache()


@pytest.mark.parametrize("backend", _gpu_backends())
def test_global_norm_is_deterministic_on_gpu(backend):
    tensors = random_tensors(SHAPES * 4, torch.float32, "cuda", 7)
    first, _ = functional.global_norm(tensors, 2.0, 1.0, backend=backend)
    for _ in range(5):
        again, _ = functional.global_norm(tensors, 2.0, 1.0, backend=backend)
        assert torch.equal(first, again)
    ref, _ = _reference.global_norm(tensors, 2.0, 1.0)
    torch.testing.assert_close(first, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", _gpu_backends())
def test_grad_scaler_skip_on_gpu(backend):
    params = _params()
    _set_grads(params, 0)
    opt = fused_optim.AdamW(params, lr=1e-3, backend=backend)
    opt.step()
    before = copy.deepcopy((params, opt.state_dict()))
    opt.grad_scale = torch.tensor(1024.0, device="cuda")
    opt.found_inf = torch.tensor(1.0, device="cuda")
    opt.step()
    for p, q in zip(params, before[0], strict=True):
        assert torch.equal(p, q)
    assert all(s["step"].item() == 1 for s in opt.state.values())


# ---- Adafactor -----------------------------------------------------------------------------------

ADAFACTOR_SHAPES = [
    (),
    (7,),
    (4097,),
    (1, 300),
    (40, 1),
    (3, 9000),
    (300, 50),
    (2, 3, 5, 7),
    (4, 3, 3, 3),
    (0, 5),
]


def _adafactor_pair(backend, flavour, dtype=torch.float32, **kw):
    """(ours on `backend`, the reference on copies) for the flavour's optimizer class."""
    cls = fused_optim.Adafactor if flavour == "torch" else fused_optim.transformers.Adafactor
    ours = [torch.nn.Parameter(t) for t in random_tensors(ADAFACTOR_SHAPES, dtype, "cuda", 11)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    return ours, cls(ours, backend=backend, **kw), theirs, cls(theirs, backend="reference", **kw)


@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("flavour", ["torch", "hf"])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_adafactor_matches_the_reference_on_gpu(backend, flavour, clip):
    kw = dict(weight_decay=0.1) if flavour == "torch" else dict(beta1=0.9, weight_decay=0.01)
    ours, opt, theirs, ref = _adafactor_pair(backend, flavour, max_grad_norm=clip, **kw)
    for step in range(10):
        _set_grads(ours, step)
        _set_grads(theirs, step)
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for k, v in ref.state[q].items():
            torch.testing.assert_close(opt.state[p][k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("flavour", ["torch", "hf"])
def test_adafactor_is_at_most_7_launches_and_deterministic(backend, flavour):
    ours, opt, _, _ = _adafactor_pair(backend, flavour, max_grad_norm=1.0)
    _set_grads(ours, 0)
    opt.step()
    assert _count_kernels(opt.step) <= 7  # norm, coefficient, five phases
    # Bit-identical results from identical inputs: no float atomics anywhere.
    again, opt2, _, _ = _adafactor_pair(backend, flavour, max_grad_norm=1.0)
    _set_grads(again, 0)
    opt2.step()
    opt2.step()
    for p, q in zip(ours, again, strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("backend", _gpu_backends())
def test_adafactor_step_captured_in_a_cuda_graph(backend):
    ours, opt, theirs, ref = _adafactor_pair(backend, "torch", lr=torch.tensor(1e-2, device="cuda"))
    _set_grads(ours, 0)
    _set_grads(theirs, 0)
    opt.step()  # state and plans set up outside the capture
    ref.step()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    ref.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for _ in range(3):
        graph.replay()
        ref.step()
    torch.cuda.synchronize()
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def _smmf_pair(backend, **kw):
    """(params, SMMF on `backend`, params copies, the same optimizer on them) for repeat runs."""
    shapes = ADAFACTOR_SHAPES + [(50, 70), (3, 1000), (37,)]
    ours = [torch.nn.Parameter(t) for t in random_tensors(shapes, torch.float32, "cuda", 13)]
    again = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    return (
        ours,
        fused_optim.SMMF(ours, backend=backend, **kw),
        again,
        fused_optim.SMMF(again, backend=backend, **kw),
    )


@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("clip", [None, 1.0])
def test_smmf_launches_and_determinism(backend, clip):
    """At most 3 launches per step (5 with clipping: norm and coefficient), for any number of
    tensors, and bit-identical results from identical inputs (the step-by-step comparison with
    the reference is tests/test_smmf_kernels.py's, which runs the cuda backend too)."""
    ours, opt, again, opt2 = _smmf_pair(backend, max_grad_norm=clip, weight_decay=0.1)
    for params, o in ((ours, opt), (again, opt2)):
        for step in range(3):
            _set_grads(params, step)
            o.step()
    for p, q in zip(ours, again, strict=True):
        assert torch.equal(p, q)
        for k, v in opt.state[p].items():
            assert torch.equal(v, opt2.state[q][k]), k
    assert _count_kernels(opt.step) <= (5 if clip else 3)


@pytest.mark.parametrize("backend", _gpu_backends())
def test_smmf_step_captured_in_a_cuda_graph(backend):
    lr = torch.tensor(1e-2, device="cuda")
    ours, opt, again, eager = _smmf_pair(backend, lr=lr)
    _set_grads(ours, 0)
    _set_grads(again, 0)
    opt.step()  # state and plans set up outside the capture
    eager.step()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    eager.step()
    with torch.cuda.graph(graph):
        opt.step()
    for _ in range(3):
        graph.replay()
        eager.step()
    torch.cuda.synchronize()
    for p, q in zip(ours, again, strict=True):
        assert torch.equal(p, q)
        assert opt.state[p]["step"].item() == eager.state[q]["step"].item() == 5
