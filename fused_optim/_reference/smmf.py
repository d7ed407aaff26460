"""SMMF (ALGORITHMS.md section 4), one tensor at a time.

Each param is either factorized or dense. Factorized: the param is viewed row-major as its
square-matricized n x m matrix (`smmf_shape`), the first moment is kept as a sign bit per element
plus non-negative factors (row_m, col_m) of |M|, the second moment as factors (row_v, col_v) of
V; a step decompresses M~ = ±row_m·col_mᵀ and V~ = row_v·col_vᵀ, updates M and V, updates θ from
them, and compresses them back (row and column sums, the column vector divided by its sum).
Dense (vector_reshape=False and a param whose squeezed shape is 1-D): M and V kept whole.

State lists are compact, as every backend takes them: row_ms, col_ms, signs, row_vs, col_vs hold
one entry per factorized param, exp_avgs and exp_avg_sqs one per dense param, in the order of
params; the first-moment lists are empty when beta is None.

Signs are bit-packed: signs[k] is an int32 tensor of shape (n, ceil(m / 32)); bit b of word w of
row i is 1 where M[i, 32 w + b] > 0. Rows are padded to whole words, so no word holds bits of two
rows (GPU tiles of whole words never share one). The shard of an FSDP2 param packs the rows of
the param's own dim 0 instead (see `smmf`): a shard boundary can fall inside a square-matricized
row, never inside a row of dim 0.
"""

import math

import torch

from fused_optim._reference.adafactor import _skip, _Sums
from fused_optim._reference.adam import _math_dtype, _scalar, prepare_grad

WORD_BITS = 32


def smmf_shape(numel: int) -> tuple[int, int]:
    """(n, m) of the square-matricized view: (√N, √N) for a perfect square, else (N / i, i) for
    the largest divisor i <= √N; rows >= cols. 0-d is 1 x 1, an empty tensor 0 x 0."""
    root = math.isqrt(numel)
    for i in range(root, 0, -1):
        if numel % i == 0:
            return numel // i, i
    return 0, 0


def is_dense(param, vector_reshape: bool) -> bool:
    """True where the authors take the dense (Adam-like) path: vector_reshape=False and the
    param's squeezed shape is 1-D. `param` is a tensor or its shape."""
    shape = getattr(param, "shape", param)
    return not vector_reshape and sum(1 for s in shape if s != 1) == 1


def sign_words(cols: int) -> int:
    """int32 words of sign bits per matrix row."""
    return -(-cols // WORD_BITS)


def unpack_signs(words: torch.Tensor, cols: int) -> torch.Tensor:
    """The (n, cols) bool matrix of M > 0 from its packed words."""
    shifts = torch.arange(WORD_BITS, device=words.device, dtype=torch.int64)
    bits = (words.to(torch.int64).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(words.shape[0], words.shape[1] * WORD_BITS)[:, :cols].bool()


def pack_signs(positive: torch.Tensor) -> torch.Tensor:
    """The packed int32 words of a (n, m) bool matrix."""
    n, m = positive.shape
    padded = torch.zeros(n, sign_words(m) * WORD_BITS, dtype=torch.int64, device=positive.device)
    padded[:, :m] = positive.to(torch.int64)
    shifts = torch.arange(WORD_BITS, device=positive.device, dtype=torch.int64)
    words = (padded.reshape(n, -1, WORD_BITS) << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # two's complement


class _Window:
    """A contiguous run of the elements of an n x m matrix, in row-major order: all of them in one
    process, this rank's shard of an FSDP2 param (dim-0 shards are runs of the flattened tensor,
    which may start and end inside a row of the square-matricized view)."""

    def __init__(self, n: int, m: int, start: int, length: int):
        self.n, self.m, self.length = n, m, length
        self.row0 = start // m
        self.rows = -(-(start + length) // m) - self.row0
        self.skip = start - self.row0 * m  # elements of the first row held elsewhere

    def outer(self, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        """The run's elements of row·colᵀ, flat."""
        full = torch.outer(row[self.row0 : self.row0 + self.rows], col).reshape(-1)
        return full[self.skip : self.skip + self.length]

    def sums(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The row sums (length n, zero for rows the run misses) and column sums (length m) of the
        run's elements x (flat); in one process those of the whole matrix."""
        if self.skip == 0 and self.rows * self.m == self.length:
            block = x.reshape(self.rows, self.m)
        else:
            block = x.new_zeros(self.rows * self.m)
            block[self.skip : self.skip + self.length] = x
            block = block.view(self.rows, self.m)
        row = x.new_zeros(self.n)
        row[self.row0 : self.row0 + self.rows] = block.sum(dim=1)
        return row, block.sum(dim=0)


def _normalise(row_sum, col_sum, row: torch.Tensor, col: torch.Tensor) -> None:
    """Rank-1 non-negative factors from a matrix's row and column sums (n >= m): the column sums
    divided by their total unless it is 0 (no host sync: a select, not an `if`)."""
    total = col_sum.sum()
    row.copy_(row_sum)
    col.copy_(torch.where(total != 0, col_sum / total, col_sum))


def smmf(
    params,
    grads,
    row_ms,
    col_ms,
    signs,
    row_vs,
    col_vs,
    exp_avgs,
    exp_avg_sqs,
    state_steps,
    *,
    lr,
    beta: float | None,
    eps: float,
    weight_decay: float,
    decay_rate: float,
    growth_rate: float,
    vector_reshape: bool,
    decoupled: bool,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    clip_coef: torch.Tensor | None = None,
    shard_key=None,
    global_shapes=None,
    global_offsets=None,
) -> None:
    """One SMMF step (ALGORITHMS.md section 4) over lists of tensors, in place.

    decoupled=True is weight_decay_mode='adamw' (θ ← θ·(1 − lr·λ)), False is 'adam' (g ← g + λθ,
    which the authors' code skips by mistake). Factors are fp32; dense moments have the param's
    dtype (fp64 in fp64 tests).

    shard_key / global_shapes / global_offsets: the tensors are this rank's dim-0 shards of DTensor
    params of those shapes, starting at those flat offsets. The factors are those of the whole
    square-matricized param: each rank sums the part it holds, and the row and column sums of
    every param are all-reduced together, once per step (_Sums). Each signs[k] then packs the
    shard's own rows (shard.shape[0] rows of whole words), not the square-matricized ones."""
    if _skip(found_inf):
        return
    lr = _scalar(lr)
    momentum = beta is not None
    sums = _Sums(params, shard_key, global_shapes)
    new_factors = []  # (row sums, column sums, row factor, column factor), normalised last
    k_fac = k_dense = 0
    for i, param in enumerate(params):
        dense = is_dense(sums.shapes[i], vector_reshape)
        k = k_dense if dense else k_fac
        if dense:
            k_dense += 1
        else:
            k_fac += 1
        step_t = state_steps[i]
        t = _scalar(step_t) + 1.0
        step_t.add_(1)
        if sums.numel(i) == 0:
            continue
        md = _math_dtype(param)
        g = prepare_grad(grads[i], md, maximize=False, grad_scale=grad_scale, clip_coef=clip_coef)
        theta = param.to(md)
        if weight_decay != 0.0:
            if decoupled:
                theta = theta * (1.0 - lr * weight_decay)
            else:
                g = g + weight_decay * theta  # L2 on θ before the step

        beta_m = beta * growth_rate ** (t - 1.0) if momentum else 0.0
        beta_v = 1.0 - t**decay_rate
        if dense:
            v = beta_v * exp_avg_sqs[k].to(md) + (1.0 - beta_v) * (g * g)
            exp_avg_sqs[k].copy_(v)
            if momentum:
                m = beta_m * exp_avgs[k].to(md) + (1.0 - beta_m) * g
                exp_avgs[k].copy_(m)
        else:
            start = 0 if global_offsets is None else global_offsets[i]
            run = _Window(*smmf_shape(sums.numel(i)), start, param.numel())
            g = g.reshape(-1)
            v = beta_v * run.outer(row_vs[k].to(md), col_vs[k].to(md)) + (1.0 - beta_v) * (g * g)
            if momentum:
                m_old = run.outer(row_ms[k].to(md), col_ms[k].to(md))
                rows = signs[k].shape[0]
                if rows:
                    packed = (rows, param.numel() // rows)
                    m_old = torch.where(unpack_signs(signs[k], packed[1]).reshape(-1), m_old, -m_old)
                m = beta_m * m_old + (1.0 - beta_m) * g
                if rows:
                    signs[k].copy_(pack_signs((m > 0).reshape(packed)))
                new_factors.append((*map(sums.whole, run.sums(m.abs())), row_ms[k], col_ms[k]))
            new_factors.append((*map(sums.whole, run.sums(v)), row_vs[k], col_vs[k]))
        u = (m if momentum else g) / (v.sqrt() + eps)
        theta = theta - lr * u.reshape(theta.shape)
        param.copy_(theta)
    sums.reduce()
    for row_sum, col_sum, row, col in new_factors:
        _normalise(row_sum, col_sum, row, col)
