"""The registered ops themselves: torch.library.opcheck validates the schemas (the mutation
annotations match what the kernels write), the fake implementations (shapes, devices, no data
access) and the dispatcher registration against the real CPU kernels."""

import pytest
import torch

import fused_optim  # noqa: F401  (registers the fake implementations)
from fused_optim import _ext

pytestmark = pytest.mark.skipif(_ext.load_error is not None, reason="fused_optim._C is not built")

# opcheck's tests minus autograd ones (the ops are optimizer updates, never differentiated).
TESTS = ("test_schema", "test_faketensor")


def _adam_args(amsgrad: bool):
    g = torch.Generator().manual_seed(0)
    shapes = [(3,), (), (5, 2)]
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    states = [[torch.rand(s, generator=g) for s in shapes] for _ in range(3)]
    steps = [torch.zeros(()) for _ in shapes]
    args = (params, grads, states[0], states[1], states[2] if amsgrad else [], steps)
    kwargs = dict(lr=1e-3, lr_tensor=None, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
                  decoupled=True, amsgrad=amsgrad, maximize=False, adax=False, grad_scale=None,
                  found_inf=None, clip_coef=torch.tensor(0.5))  # fmt: skip
    return args, kwargs


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_op(amsgrad):
    args, kwargs = _adam_args(amsgrad)
    torch.library.opcheck(torch.ops.fused_optim.adam_.default, args, kwargs, test_utils=TESTS)


def test_global_norm_and_scale_ops():
    tensors = [torch.randn(4), torch.randn(2, 3).bfloat16(), torch.randn(())]
    torch.library.opcheck(
        torch.ops.fused_optim.global_norm.default, (tensors, 2.0, 1.0, None), test_utils=TESTS
    )
    torch.library.opcheck(
        torch.ops.fused_optim.scale_.default, (tensors, torch.tensor(0.5)), test_utils=TESTS
    )


def test_adam_op_traces_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    args, kwargs = _adam_args(False)
    with FakeTensorMode() as mode:
        fake_args = [[mode.from_tensor(t) for t in lst] for lst in args]
        kwargs["clip_coef"] = mode.from_tensor(kwargs["clip_coef"])
        torch.ops.fused_optim.adam_(*fake_args, **kwargs)
        norm, coef = torch.ops.fused_optim.global_norm(fake_args[1], 2.0, 1.0, None)
    assert norm.shape == () and coef.dtype == torch.float32


def test_smmf_op():
    """Factorized params (with momentum) and a dense one (vector_reshape=False): the schema's
    mutation annotations cover every list the kernels write (params, factors, signs, steps)."""
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g) for s in [(6, 5), (), (7,)]]
    grads = [torch.randn(p.shape, generator=g) for p in params]
    row_ms, col_ms, row_vs, col_vs = ([torch.rand(n, generator=g) for n in sizes] for sizes in
                                      ([6, 1], [5, 1], [6, 1], [5, 1]))  # fmt: skip
    signs = [torch.zeros(6, 1, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32)]
    exp_avgs, exp_avg_sqs = [torch.randn(7, generator=g)], [torch.rand(7, generator=g)]
    steps = [torch.zeros(()) for _ in params]
    args = (params, grads, row_ms, col_ms, signs, row_vs, col_vs, exp_avgs, exp_avg_sqs, steps)
    kwargs = dict(lr=1e-2, lr_tensor=None, beta=0.9, eps=1e-8, weight_decay=0.1, decay_rate=-0.5,
                  growth_rate=0.999, vector_reshape=False, decoupled=True, grad_scale=None, found_inf=None,
                  clip_coef=torch.tensor(0.5))  # fmt: skip
    torch.library.opcheck(torch.ops.fused_optim.smmf_.default, args, kwargs, test_utils=TESTS)


@pytest.mark.parametrize("phase", [1, 2, 3])
def test_adafactor_op_on_a_shard(phase):
    """One phase of an FSDP2 shard's step (phase, global_numels, stats_at, sums, carry); phase 1
    writes the sums of theta^2 and the matrix's statistics, not the sums of u^2."""
    g = torch.Generator().manual_seed(2)
    # rows 2 to 4 of a 7 x 5 matrix, elements of a vector
    params = [torch.randn(3, 5, generator=g), torch.randn(4, generator=g)]
    grads = [torch.randn(p.shape, generator=g) for p in params]
    rows, cols, fulls = (
        [torch.rand(3, 1, generator=g)],
        [torch.rand(1, 5, generator=g)],
        [torch.rand(4, generator=g)],
    )
    steps = [torch.zeros(()) for _ in params]
    args = (params, grads, rows, cols, fulls, [], [], steps)
    sums = torch.rand(2 + 6 + 2, generator=g, dtype=torch.float64)
    kwargs = dict(transformers=False, lr=1e-2, lr_tensor=None, eps1=None, eps2=1e-3, decay=-0.8, d=1.0,
                  weight_decay=0.0, beta1=None, maximize=False, relative_step=False, scale_parameter=True,
                  warmup_init=False, grad_scale=None, found_inf=None, clip_coef=None, phase=phase,
                  global_numels=[35, 10], stats_at=[2, -1], sums=sums,
                  carry=torch.rand(3 + 5, generator=g))  # fmt: skip
    torch.library.opcheck(torch.ops.fused_optim.adafactor_.default, args, kwargs, test_utils=TESTS)
    kwargs["sums"] = torch.zeros_like(sums)
    torch.ops.fused_optim.adafactor_(*args, **kwargs)
    written = kwargs["sums"] != 0
    assert written[:8].all().item() == (phase == 1) and written[8:].all().item() == (phase == 2)


def test_smmf_op_on_a_shard():
    """An FSDP2 shard (global_numels, starts, sums): the raw sums buffer is written too."""
    g = torch.Generator().manual_seed(1)
    # elements [7, 20) of a 6 x 5 matrix, and the dense path (-1) for a vector
    params = [torch.randn(13, generator=g), torch.randn(3, generator=g)]
    grads = [torch.randn(p.shape, generator=g) for p in params]
    row_ms, col_ms, row_vs, col_vs = ([torch.rand(n, generator=g)] for n in (6, 5, 6, 5))
    signs = [torch.zeros(3, 1, dtype=torch.int32)]  # rows 1 to 3 of the matrix
    exp_avgs, exp_avg_sqs = [torch.randn(3, generator=g)], [torch.rand(3, generator=g)]
    steps = [torch.zeros(()) for _ in params]
    args = (params, grads, row_ms, col_ms, signs, row_vs, col_vs, exp_avgs, exp_avg_sqs, steps)
    kwargs = dict(lr=1e-2, lr_tensor=None, beta=0.9, eps=1e-8, weight_decay=0.1, decay_rate=-0.5,
                  growth_rate=0.999, vector_reshape=True, decoupled=True, grad_scale=None, found_inf=None,
                  clip_coef=None, global_numels=[30, -1], starts=[7, 4],
                  sums=torch.zeros(2 * (6 + 5 + 1), dtype=torch.float64))  # fmt: skip
    torch.library.opcheck(torch.ops.fused_optim.smmf_.default, args, kwargs, test_utils=TESTS)
    torch.ops.fused_optim.smmf_(*args, **kwargs)
    assert kwargs["sums"][:6].count_nonzero() == 3  # the row sums of |M|: rows 1 to 3 only
