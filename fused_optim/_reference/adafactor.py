"""Adafactor, both flavours of ALGORITHMS.md section 3, one tensor at a time.

`adafactor` is torch.optim.Adafactor's flavour (3a), `adafactor_transformers` is
transformers.optimization.Adafactor's (3b). A tensor with ndim >= 2 is factored over its last
two dims (leading dims are batch dims); ndim < 2 keeps a full second moment.

State lists are compact, as every backend takes them: the row and column statistics list one
entry per factored param (ndim >= 2), in order, the full second moments one per other param.
"""

import math

import torch

from fused_optim._reference.adam import _math_dtype, _scalar, prepare_grad


def _positions(params) -> tuple[dict, dict]:
    """param index -> its index in the compact factored / full state lists."""
    factored, full = {}, {}
    for i, p in enumerate(params):
        if p.dim() >= 2:
            factored[i] = len(factored)
        else:
            full[i] = len(full)
    return factored, full


def _skip(found_inf) -> bool:
    # GradScaler saw an inf/NaN: params and state (step included) stay untouched.
    return found_inf is not None and _scalar(found_inf, placeholder=0.0) != 0.0


class _Sums:
    """Sums that may span the shards of a DTensor param (FSDP2), taken phase by phase over all
    tensors so that each phase ends with at most one all-reduce per mesh (`reduce`), never one
    per tensor: two per Adafactor step (the statistics, then the sums of U²). In one process
    (shard_key None) every sum is already whole.

    Which sums span shards, for a param sharded on dim 0: its sums of θ² and U² always; for a
    matrix (ndim 2) also its column sums and the sum of its row statistics (rows are split
    between ranks); a batch of matrices (ndim >= 3) keeps each matrix on one rank."""

    def __init__(self, params, shard_key, global_shapes):
        self.key = shard_key
        self.shapes = [tuple(p.shape) for p in params] if global_shapes is None else list(global_shapes)
        self.pending: list[torch.Tensor] = []

    def numel(self, i: int) -> int:
        return math.prod(self.shapes[i])

    def rows(self, i: int) -> int:
        return self.shapes[i][-2]

    def whole(self, t: torch.Tensor) -> torch.Tensor:
        """t (a sum over this rank's elements of a param) becomes the sum over all ranks at the
        next reduce(): the caller reads it after that."""
        if self.key is not None:
            self.pending.append(t)
        return t

    def across_rows(self, i: int, t: torch.Tensor) -> torch.Tensor:
        """As whole(), for a sum over the rows of param i's matrices."""
        return self.whole(t) if len(self.shapes[i]) == 2 else t

    def squares(self, indices, tensor_of) -> dict:
        """{i: the whole sum of tensor_of(i)²} for each index, after one reduce()."""
        out = {}
        for i in indices:
            x = tensor_of(i)
            out[i] = self.whole((x * x).sum())
        self.reduce()
        return out

    def reduce(self) -> None:
        if not self.pending:
            return
        from fused_optim import _distributed

        flat = torch.cat([t.reshape(-1).double() for t in self.pending])
        _distributed.all_reduce(flat, self.key)
        for t, part in zip(self.pending, flat.split([t.numel() for t in self.pending]), strict=True):
            t.copy_(part.view_as(t))
        self.pending = []


def _statistics(params, grads, factored, sums, new_row, *, add: float, keepdim: bool, **grad_kw):
    """Phases 1 and 2's rows in both flavours over every tensor, then ONE all-reduce: sums of θ²
    and of s = g² + add along columns, and the new row statistics (`new_row(i, md, row sums)`:
    rows are whole on every rank) with their sum over each matrix. Returns (live: the indices of
    non-empty params, their math dtypes, grad(i): the prepared gradient, recomputed where needed
    as the kernels do rather than kept for every tensor, the sums of θ², the column sums, the new
    row statistics, their sums)."""
    live = [i for i in range(len(params)) if sums.numel(i) > 0]
    md = {i: _math_dtype(params[i]) for i in live}

    def grad(i):
        return prepare_grad(grads[i], md[i], **grad_kw)

    theta_sq, col_sum, new_r, r_sum = {}, {}, {}, {}
    for i in live:
        theta = params[i].to(md[i])
        theta_sq[i] = sums.whole((theta * theta).sum())
        if i in factored:
            s = grad(i).square() + add
            col_sum[i] = sums.across_rows(i, s.sum(dim=-2, keepdim=keepdim))
            new_r[i] = new_row(i, md[i], s.sum(dim=-1, keepdim=keepdim))
            r_sum[i] = sums.across_rows(i, new_r[i].sum(dim=-2 if keepdim else -1, keepdim=True))
    sums.reduce()
    return live, md, grad, theta_sq, col_sum, new_r, r_sum


def adafactor(
    params,
    grads,
    row_vars,
    col_vars,
    variances,
    state_steps,
    *,
    lr,
    beta2_decay: float,
    eps1: float | None,
    eps2: float,
    d: float,
    weight_decay: float,
    maximize: bool,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    clip_coef: torch.Tensor | None = None,
    shard_key=None,
    global_shapes=None,
) -> None:
    """One torch-flavour step (ALGORITHMS.md 3a) over lists of tensors, in place.

    row_vars / col_vars ([..., n, 1] / [..., 1, m]) hold one entry per param with ndim >= 2,
    variances (the param's shape) one per other param, each in the order of params.
    eps1=None means finfo(param dtype).eps, taken per tensor.

    shard_key / global_shapes: the tensors are this rank's shards (dim 0) of DTensor params of
    those shapes; sums that span shards are all-reduced over shard_key's mesh (_Sums)."""
    if _skip(found_inf):
        return
    lr = _scalar(lr)
    factored, full = _positions(params)
    sums = _Sums(params, shard_key, global_shapes)
    t = {i: _scalar(state_steps[i]) + 1.0 for i in range(len(params))}

    # 1 and 2: sums of θ² and of g² along columns; the new row statistics and their sums (torch.lerp:
    # its rounding, two formulas split at w = 0.5, is torch's, exact at w = 1)
    def new_row(i, md, row_sum):
        w = t[i] ** beta2_decay
        return row_vars[factored[i]].to(md).lerp(row_sum / sums.shapes[i][-1], w)

    live, md, grad, theta_sq, col_sum, new_r, r_sum = _statistics(
        params, grads, factored, sums, new_row, add=0.0, keepdim=True,
        maximize=maximize, grad_scale=grad_scale, clip_coef=clip_coef,
    )  # fmt: skip
    # 2: the new column statistics, from the whole column sums
    new_c = {}
    for i in live:
        if i in factored:
            w = t[i] ** beta2_decay
            new_c[i] = col_vars[factored[i]].to(md[i]).lerp(col_sum[i] / sums.shapes[i][-2], w)

    # 3: the update direction U and the sums of U²
    def direction(i):
        e1 = torch.finfo(params[i].dtype).eps if eps1 is None else eps1
        g = grad(i)
        if i in factored:
            # Normalise r before multiplying by c: r_i·c_j as raw products underflows in fp32
            # for tiny gradients (ALGORITHMS.md, precision rule).
            est = new_r[i] / torch.clamp(r_sum[i] / sums.rows(i), min=e1) * new_c[i]
        else:
            est = variances[full[i]].to(md[i]).lerp(g * g, t[i] ** beta2_decay)
        # eps1 squared: it bounds est, whose square root scales the update.
        return g * torch.rsqrt(torch.clamp(est, min=e1 * e1)), est

    u_sq = sums.squares(live, lambda i: direction(i)[0])

    # 4: apply; the states and the step are written last
    for i, param in enumerate(params):
        if i in md:
            u, est = direction(i)
            rho = min(lr, 1.0 / math.sqrt(t[i]))
            alpha = (
                torch.clamp(torch.sqrt(theta_sq[i] / sums.numel(i)), min=eps2) * rho
            )  # RMS(θ) before decay
            denom = torch.clamp(torch.sqrt(u_sq[i] / sums.numel(i)) / d, min=1.0)
            theta = param.to(md[i])
            if weight_decay != 0.0:
                theta = theta * (1.0 - lr * weight_decay)  # lr, not rho: as torch does
            param.copy_(theta - (alpha / denom) * u)
            if i in factored:
                row_vars[factored[i]].copy_(new_r[i])
                col_vars[factored[i]].copy_(new_c[i])
            else:
                variances[full[i]].copy_(est)
        state_steps[i].add_(1)  # an empty tensor's step counts too, as for any tensor


def adafactor_transformers(
    params,
    grads,
    exp_avg_sq_rows,
    exp_avg_sq_cols,
    exp_avg_sqs,
    exp_avgs,
    rmss,
    state_steps,
    *,
    lr,
    eps1: float,
    eps2: float,
    clip_threshold: float,
    decay_rate: float,
    beta1: float | None,
    weight_decay: float,
    scale_parameter: bool,
    relative_step: bool,
    warmup_init: bool,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    clip_coef: torch.Tensor | None = None,
    shard_key=None,
    global_shapes=None,
) -> None:
    """One transformers-flavour step (ALGORITHMS.md 3b) over lists of tensors, in place.

    exp_avg_sq_rows / exp_avg_sq_cols (shape[:-1] / shape[:-2] + shape[-1:]) hold one entry per
    param with ndim >= 2, exp_avg_sqs one per other param, in the order of params; exp_avgs
    one per param when beta1 is not None, else []; rmss (0-d, one per param, or []) receive
    RMS(θ) as transformers' `RMS` state. lr is ignored (may be None) when relative_step.
    shard_key / global_shapes: as for `adafactor`."""
    if _skip(found_inf):
        return
    lr = None if relative_step else _scalar(lr)
    factored, full = _positions(params)
    sums = _Sums(params, shard_key, global_shapes)
    t = {i: _scalar(state_steps[i]) + 1.0 for i in range(len(params))}
    beta2t = {i: 1.0 - t[i] ** decay_rate for i in t}

    # 1 and 2: sums of θ² and of s = g² + eps1 along columns; the new row statistics and their sums
    def new_row(i, md, row_sum):
        b = beta2t[i]
        return b * exp_avg_sq_rows[factored[i]].to(md) + (1.0 - b) * (row_sum / sums.shapes[i][-1])

    live, md, grad, theta_sq, col_sum, new_r, r_sum = _statistics(
        params, grads, factored, sums, new_row, add=eps1, keepdim=False,
        maximize=False, grad_scale=grad_scale, clip_coef=clip_coef,
    )  # fmt: skip
    # 2: the new column statistics, from the whole column sums
    new_c = {}
    for i in live:
        if i in factored:
            b = beta2t[i]
            new_c[i] = b * exp_avg_sq_cols[factored[i]].to(md[i]) + (1.0 - b) * (
                col_sum[i] / sums.shapes[i][-2]
            )

    # 3: the update direction U and the sums of U²
    def direction(i):
        g = grad(i)
        if i in factored:
            # a_i, b_j: O(n + m) factors, never the raw product r_i·c_j (precision rule).
            a = torch.rsqrt(new_r[i] / (r_sum[i] / sums.rows(i)))
            return g * a.unsqueeze(-1) * torch.rsqrt(new_c[i]).unsqueeze(-2), None
        v = beta2t[i] * exp_avg_sqs[full[i]].to(md[i]) + (1.0 - beta2t[i]) * (g * g + eps1)
        return g * torch.rsqrt(v), v

    u_sq = sums.squares(live, lambda i: direction(i)[0])

    # 4: apply; the states and the step are written last
    for i, param in enumerate(params):
        step_t = state_steps[i]
        rms_out = rmss[i] if rmss else None
        if i not in md:
            # Nothing to update. transformers would store RMS = 0/0 = NaN here; 0 is kept
            # instead so that a state_dict never carries a NaN.
            if rms_out is not None:
                rms_out.zero_()
            step_t.add_(1)
            continue
        u, v = direction(i)
        rms = torch.sqrt(theta_sq[i] / sums.numel(i))  # RMS(θ) before any decay
        if relative_step:
            rho = min(1e-6 * t[i] if warmup_init else 1e-2, 1.0 / math.sqrt(t[i]))
        else:
            rho = lr
        alpha = torch.clamp(rms, min=eps2) * rho if scale_parameter else rho
        u = u / torch.clamp(torch.sqrt(u_sq[i] / sums.numel(i)) / clip_threshold, min=1.0)
        u = alpha * u
        if beta1 is not None:
            # Momentum on the clipped, scaled update (transformers' order).
            m = beta1 * exp_avgs[i].to(md[i]) + (1.0 - beta1) * u
            exp_avgs[i].copy_(m)
            u = m
        theta = param.to(md[i])
        if weight_decay != 0.0:
            theta = theta - (weight_decay * alpha) * theta
        param.copy_(theta - u)
        if i in factored:
            exp_avg_sq_rows[factored[i]].copy_(new_r[i])
            exp_avg_sq_cols[factored[i]].copy_(new_c[i])
        else:
            exp_avg_sqs[full[i]].copy_(v)
        if rms_out is not None:
            rms_out.copy_(rms)
        step_t.add_(1)
