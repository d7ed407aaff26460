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
rows (GPU tiles of whole words never share one). The shard of an FSDP2 param holds the words of
the matrix rows its run of elements touches (`Window`; see `smmf`).
"""

import math

import torch

from fused_optim._reference.adafactor import _skip
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
    words = (padded.reshape(n, sign_words(m), WORD_BITS) << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # two's complement


class Window:
    """A contiguous run of the elements of an n x m matrix, in row-major order: all of them in one
    process, this rank's shard of an FSDP2 param (dim-0 shards are runs of the flattened tensor,
    which may start and end inside a row of the square-matricized view). Its sign words cover the
    rows it touches, [rows, ceil(m / 32)], bits of elements held elsewhere 0 (the kernels' layout:
    tiles of whole words never share one)."""

    def __init__(self, n: int, m: int, start: int, length: int):
        self.n, self.m, self.length = n, m, length
        self.row0 = start // m if m else 0
        self.rows = -(-(start + length) // m) - self.row0 if length else 0
        self.skip = start - self.row0 * m  # elements of the first row held elsewhere

    def outer(self, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        """The run's elements of row·colᵀ, flat."""
        full = torch.outer(row[self.row0 : self.row0 + self.rows], col).reshape(-1)
        return full[self.skip : self.skip + self.length]

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """The run's elements x (flat) in the rows they touch, [rows, m], zeros elsewhere."""
        block = x.new_zeros(self.rows * self.m)
        block[self.skip : self.skip + self.length] = x
        return block.view(self.rows, self.m)

    def sums(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The row sums (of the rows the run touches) and column sums (length m) of its elements x."""
        block = self.padded(x)
        return block.sum(dim=1), block.sum(dim=0)

    def unpack(self, words: torch.Tensor) -> torch.Tensor:
        """The run's sign bits (flat bool) from its words."""
        return unpack_signs(words, self.m).reshape(-1)[self.skip : self.skip + self.length]

    def pack(self, positive: torch.Tensor) -> torch.Tensor:
        return pack_signs(self.padded(positive))


class SmmfSums:
    """The raw row and column sums of |M| and V of a step's factorized params (n_k x m_k, k in
    order), flat in float64: [row sums of |M| (R) | of V (R) | column sums of |M| (C) | of V (C) |
    totals of |M| (K) | of V (K)], R = sum n_k, C = sum m_k; param k's rows from sum_{k'<k} n_k'.
    Every backend writes the sums of the elements it steps into a zeroed buffer (a rank's shard:
    rows it does not touch stay 0), so under FSDP2 one all-reduce of this buffer makes them the
    whole matrices' sums;
    `finish` then writes the new factors in a fixed number of ops, whatever the number of params."""

    def __init__(self, shapes, device):
        self.n = [n for n, _ in shapes]
        self.m = [m for _, m in shapes]
        self.row_at = [sum(self.n[:k]) for k in range(len(shapes))]
        self.col_at = [sum(self.m[:k]) for k in range(len(shapes))]
        self.R, self.C, self.K = sum(self.n), sum(self.m), len(shapes)
        self.size = 2 * (self.R + self.C + self.K)
        self.device = device
        # each column's param, to divide it by that param's total
        self.owner = torch.repeat_interleave(torch.arange(self.K), torch.tensor(self.m, dtype=torch.int64))
        self.owner = self.owner.to(device)

    def zeros(self) -> torch.Tensor:
        return torch.zeros(self.size, dtype=torch.float64, device=self.device)

    def add(self, sums, k: int, run: Window, abs_m, v) -> None:
        """Param k's sums over its run's elements (abs_m None without momentum)."""
        R, C, K = self.R, self.C, self.K
        for x, row_base, col_base, total in (
            (abs_m, 0, 2 * R, 2 * R + 2 * C),
            (v, R, 2 * R + C, 2 * R + 2 * C + K),
        ):
            if x is None:
                continue
            row_sum, col_sum = run.sums(x.double())
            at = row_base + self.row_at[k] + run.row0
            sums[at : at + run.rows] += row_sum
            sums[col_base + self.col_at[k] : col_base + self.col_at[k] + self.m[k]] += col_sum
            sums[total + k] += col_sum.sum()

    def finish(self, sums, row_ms, col_ms, row_vs, col_vs, found_inf=None) -> None:
        """The new factors from the whole sums: the row sums, the column sums divided by their
        total unless it is 0 (a select, not an `if`: no host sync); rounded to the factors' dtype
        once.
        A non-zero found_inf (GradScaler skipped the step) keeps the old factors."""
        if self.K == 0:
            return
        R, C, K = self.R, self.C, self.K
        rows_m, rows_v, cols_m, cols_v, total_m, total_v = sums.split([R, R, C, C, K, K])
        for rows, cols, total, row_out, col_out in (
            (rows_m, cols_m, total_m, row_ms, col_ms),
            (rows_v, cols_v, total_v, row_vs, col_vs),
        ):
            if not row_out:
                continue
            nonzero = (total != 0)[self.owner]
            dtype = row_out[0].dtype  # float32; fp64 in fp64 tests
            rows = rows.to(dtype)
            cols = torch.where(nonzero, cols / torch.where(total != 0, total, 1.0)[self.owner], cols).to(
                dtype
            )
            if found_inf is not None:
                skip = found_inf.to(rows.device) != 0
                rows = torch.where(skip, torch.cat(row_out), rows)
                cols = torch.where(skip, torch.cat(col_out), cols)
            torch._foreach_copy_(row_out, rows.split(self.n))
            torch._foreach_copy_(col_out, cols.split(self.m))


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
    global_numels=None,
    starts=None,
    sums: torch.Tensor | None = None,
) -> None:
    """One SMMF step (ALGORITHMS.md section 4) over lists of tensors, in place.

    decoupled=True is weight_decay_mode='adamw' (θ ← θ·(1 − lr·λ)), False is 'adam' (g ← g + λθ,
    which the authors' code skips by mistake). Factors are fp32; dense moments have the param's
    dtype (fp64 in fp64 tests).

    global_numels / starts / sums (FSDP2; all three or none): params[i] is the run of elements
    [starts[i], starts[i] + numel) of a flattened param of global_numels[i] elements (-1: one
    taking the dense path, decided on its global shape), whose square-matricized view is what is
    factored. Each signs[k] then holds the rows the run touches (`Window`), and the step writes
    its raw row and column sums into `sums` (zeros on entry, laid out as `SmmfSums`) instead of
    the factors: the caller reduces them over the ranks and calls SmmfSums.finish. In one
    process the step finishes them itself."""
    if _skip(found_inf):
        return
    lr = _scalar(lr)
    momentum = beta is not None
    if global_numels is None:
        numels = [p.numel() for p in params]
        dense_of = [is_dense(p, vector_reshape) for p in params]
    else:  # the dense path is decided on the global shape: the caller marks it -1
        numels = list(global_numels)
        dense_of = [n < 0 for n in numels]
    layout = SmmfSums(
        [smmf_shape(numels[i]) for i in range(len(params)) if not dense_of[i]], params[0].device
    )
    own_sums = sums is None
    if own_sums:
        sums = layout.zeros()
    k_fac = k_dense = 0
    for i, param in enumerate(params):
        dense = dense_of[i]
        k = k_dense if dense else k_fac
        if dense:
            k_dense += 1
        else:
            k_fac += 1
        step_t = state_steps[i]
        t = _scalar(step_t) + 1.0
        step_t.add_(1)
        if param.numel() == 0:
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
            start = 0 if starts is None else starts[i]
            run = Window(*smmf_shape(numels[i]), start, param.numel())
            g = g.reshape(-1)
            v = beta_v * run.outer(row_vs[k].to(md), col_vs[k].to(md)) + (1.0 - beta_v) * (g * g)
            if momentum:
                m_old = run.outer(row_ms[k].to(md), col_ms[k].to(md))
                m_old = torch.where(run.unpack(signs[k]), m_old, -m_old)
                m = beta_m * m_old + (1.0 - beta_m) * g
                signs[k].copy_(run.pack(m > 0))
            layout.add(sums, k, run, m.abs() if momentum else None, v)
        u = (m if momentum else g) / (v.sqrt() + eps)
        theta = theta - lr * u.reshape(theta.shape)
        param.copy_(theta)
    if own_sums:
        layout.finish(sums, row_ms, col_ms, row_vs, col_vs)
