"""The SMMF reference (fused_optim._reference.smmf) against the authors' update rule as
ALGORITHMS.md section 4 states it, written here independently in fp64 with the authors' state
layout (a bool sign matrix, (row, col) factor pairs, an int step): θ trajectories, signs and the
reconstructed products r·cᵀ over 100 steps, every option, odd shapes; plus the square
matricization and the sign packing."""

import math
import sys

import pytest
import torch

import fused_optim._reference.smmf  # noqa: F401  (the module, not the function of the same name)

ref = sys.modules["fused_optim._reference.smmf"]


class AuthorsRule:
    """One param's SMMF state and step, per ALGORITHMS.md section 4 (fp64)."""

    def __init__(self, param, beta, vector_reshape):
        self.beta = beta
        self.step = 1
        self.dense = len(param.squeeze().shape) == 1 and not vector_reshape
        if self.dense:
            self.m = torch.zeros_like(param)
            self.v = torch.zeros_like(param)
            return
        n = param.numel()
        root = int(math.isqrt(n))
        shape = (
            (root, root) if root * root == n else next((n // i, i) for i in range(root, 0, -1) if n % i == 0)
        )
        self.shape = shape
        self.r_m, self.c_m = (
            torch.zeros(shape[0], dtype=torch.float64),
            torch.zeros(shape[1], dtype=torch.float64),
        )
        self.r_v, self.c_v = (
            torch.zeros(shape[0], dtype=torch.float64),
            torch.zeros(shape[1], dtype=torch.float64),
        )
        self.sign = torch.zeros(shape, dtype=torch.bool)

    @staticmethod
    def nnmf(x):
        r, c = x.sum(dim=1), x.sum(dim=0)
        if x.shape[0] < x.shape[1]:
            s = r.sum()
            if s != 0:
                r = r / s
        else:
            s = c.sum()
            if s != 0:
                c = c / s
        return r, c

    def apply(self, param, grad, lr, eps, weight_decay, mode, decay_rate, growth_rate):
        g = grad.clone()
        if weight_decay != 0.0:
            if mode == "adam":
                g = g + weight_decay * param  # ALGORITHMS.md: real L2, not the authors' no-op
            else:
                param.mul_(1 - lr * weight_decay)
        beta_v = 1.0 - self.step**decay_rate
        if self.beta is not None:
            beta_m = self.beta * growth_rate ** (self.step - 1.0)
        if self.dense:
            if self.beta is not None:
                self.m = beta_m * self.m + (1 - beta_m) * g
            self.v = beta_v * self.v + (1 - beta_v) * g**2
            m, v, g2 = self.m, self.v, g
        else:
            g2 = g.reshape(self.shape)
            if self.beta is not None:
                m = torch.outer(self.r_m, self.c_m)
                m = torch.where(self.sign, m, -m)
                m = beta_m * m + (1 - beta_m) * g2
                self.sign = m > 0
                self.r_m, self.c_m = self.nnmf(m.abs())
            v = beta_v * torch.outer(self.r_v, self.c_v) + (1 - beta_v) * g2**2
            self.r_v, self.c_v = self.nnmf(v)
        update = (m if self.beta is not None else g2) / (v.sqrt() + eps)
        param.add_(update.reshape(param.shape), alpha=-lr)
        self.step += 1


class RefState:
    """Compact state lists for the reference, fp64."""

    def __init__(self, params, beta, vector_reshape):
        dense = [ref.is_dense(p, vector_reshape) for p in params]
        shapes = [ref.smmf_shape(p.numel()) for p, d in zip(params, dense, strict=True) if not d]
        f64 = dict(dtype=torch.float64)
        m = beta is not None
        self.row_ms = [torch.zeros(n, **f64) for n, _ in shapes] if m else []
        self.col_ms = [torch.zeros(c, **f64) for _, c in shapes] if m else []
        self.signs = [torch.zeros(n, ref.sign_words(c), dtype=torch.int32) for n, c in shapes] if m else []
        self.row_vs = [torch.zeros(n, **f64) for n, _ in shapes]
        self.col_vs = [torch.zeros(c, **f64) for _, c in shapes]
        dense_params = [p for p, d in zip(params, dense, strict=True) if d]
        self.exp_avgs = [torch.zeros_like(p) for p in dense_params] if m else []
        self.exp_avg_sqs = [torch.zeros_like(p) for p in dense_params]
        self.steps = [torch.zeros(()) for _ in params]
        self.shapes = shapes

    def lists(self):
        return (
            self.row_ms,
            self.col_ms,
            self.signs,
            self.row_vs,
            self.col_vs,
            self.exp_avgs,
            self.exp_avg_sqs,
        )


SHAPES = [(), (1,), (7,), (13,), (1000,), (30, 40), (3, 5, 7), (1, 13, 1), (64, 64), (2, 1, 6), (0,), (0, 3)]

CONFIGS = {
    "default": dict(),
    "no_beta": dict(beta=None),
    "adamw_decay": dict(weight_decay=0.1),
    "adam_l2": dict(weight_decay=0.1, mode="adam"),
    "no_reshape": dict(vector_reshape=False),
    "no_reshape_no_beta": dict(vector_reshape=False, beta=None, weight_decay=0.05),
    "transformer_decay": dict(decay_rate=-0.8, growth_rate=0.99, eps=1e-6, lr=3e-3),
    "beta_1_growth_1": dict(beta=1.0, growth_rate=1.0, decay_rate=-1.0),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_reference_follows_the_authors_rule_for_100_steps(config):
    c = dict(lr=1e-2, beta=0.9, eps=1e-8, weight_decay=0.0, mode="adamw", decay_rate=-0.5, growth_rate=0.999,
             vector_reshape=True) | CONFIGS[config]  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    oracle_params = [p.clone() for p in params]
    oracle = [AuthorsRule(p, c["beta"], c["vector_reshape"]) for p in params]
    state = RefState(params, c["beta"], c["vector_reshape"])
    for _ in range(100):
        grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
        for p, g, o in zip(oracle_params, grads, oracle, strict=True):
            o.apply(p, g, c["lr"], c["eps"], c["weight_decay"], c["mode"], c["decay_rate"], c["growth_rate"])
        ref.smmf(params, grads, *state.lists(), state.steps, lr=c["lr"], beta=c["beta"], eps=c["eps"],
                 weight_decay=c["weight_decay"], decay_rate=c["decay_rate"], growth_rate=c["growth_rate"],
                 vector_reshape=c["vector_reshape"], decoupled=c["mode"] == "adamw")  # fmt: skip
    for p, q in zip(params, oracle_params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    k = 0
    for o in oracle:
        if o.dense:
            continue
        v = torch.outer(state.row_vs[k], state.col_vs[k])
        torch.testing.assert_close(v, torch.outer(o.r_v, o.c_v), rtol=1e-12, atol=1e-300)
        if c["beta"] is not None:
            m = torch.outer(state.row_ms[k], state.col_ms[k])
            torch.testing.assert_close(m, torch.outer(o.r_m, o.c_m), rtol=1e-12, atol=1e-300)
            assert torch.equal(ref.unpack_signs(state.signs[k], o.shape[1]), o.sign)
        k += 1
    assert all(s.item() == 100 for s in state.steps)


@pytest.mark.parametrize(
    "numel, shape",
    [
        (0, (0, 0)),
        (1, (1, 1)),
        (7, (7, 1)),
        (1000, (40, 25)),
        (768 * 3072, (1536, 1536)),
        (50257 * 768, (6932, 5568)),
        (2**31 - 1, (2**31 - 1, 1)),
        (12, (4, 3)),
    ],  # fmt: skip
)
def test_square_matricization(numel, shape):
    assert ref.smmf_shape(numel) == shape


def test_sign_packing_round_trip_and_layout():
    gen = torch.Generator().manual_seed(0)
    for n, m in [(1, 1), (3, 31), (2, 32), (5, 33), (4, 70)]:
        bits = torch.rand(n, m, generator=gen) > 0.5
        words = ref.pack_signs(bits)
        assert words.dtype == torch.int32 and words.shape == (n, ref.sign_words(m))
        assert torch.equal(ref.unpack_signs(words, m), bits)
    # Bit b of word w of a row is column 32 w + b; bit 31 is the int32 sign bit.
    bits = torch.zeros(1, 40, dtype=torch.bool)
    bits[0, 31] = bits[0, 33] = True
    assert ref.pack_signs(bits).tolist() == [[-(2**31), 2]]


def test_zero_gradients_keep_zero_factors_without_nan():
    """Σc = 0 skips the division (no 0/0), on the device."""
    params = [torch.randn(6, 4, dtype=torch.float64)]
    state = RefState(params, 0.9, True)
    ref.smmf(params, [torch.zeros(6, 4, dtype=torch.float64)], *state.lists(), state.steps, lr=1e-2, beta=0.9,
             eps=1e-8, weight_decay=0.0, decay_rate=-0.5, growth_rate=0.999, vector_reshape=True,
             decoupled=True)  # fmt: skip
    for t in state.row_vs + state.col_vs + state.row_ms + state.col_ms:
        assert torch.count_nonzero(t) == 0
    assert torch.isfinite(params[0]).all()
