"""Fake (meta) implementations of torch.ops.fused_optim.*, so the ops trace under FakeTensor,
torch.compile and torch.export. The schemas themselves live in csrc/ops.cpp.

They also run when a call mixes meta tensors with real ones (the dispatcher then picks Meta),
so they enforce the one-device rule of the real kernels."""

import itertools

import torch

from fused_optim import _ext


def _check_one_device(*lists) -> None:
    tensors = [t for t in itertools.chain(*lists) if t is not None]
    if not tensors:
        return
    device = tensors[0].device
    for t in tensors:
        if t.device != device:
            raise RuntimeError(
                f"fused_optim: a tensor is on {t.device} but params[0] is on {device}; "
                "one call takes tensors of one device"
            )


if _ext.load_error is None:

    @torch.library.register_fake("fused_optim::adam_")
    def _adam_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, **kwargs):
        _check_one_device(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
        return None

    @torch.library.register_fake("fused_optim::adafactor_")
    def _adafactor_fake(params, grads, row_vars, col_vars, variances, exp_avgs, rmss, state_steps, **kwargs):
        _check_one_device(params, grads, row_vars, col_vars, variances, exp_avgs, rmss, state_steps)
        return None

    @torch.library.register_fake("fused_optim::smmf_")
    def _smmf_fake(params, grads, row_ms, col_ms, signs, row_vs, col_vs, exp_avgs, exp_avg_sqs, state_steps,
                   **kwargs):  # fmt: skip
        _check_one_device(
            params, grads, row_ms, col_ms, signs, row_vs, col_vs, exp_avgs, exp_avg_sqs, state_steps
        )
        return None

    @torch.library.register_fake("fused_optim::global_norm")
    def _global_norm_fake(tensors, norm_type, max_norm, grad_scale):
        _check_one_device(tensors)
        like = tensors[0]
        return (
            like.new_empty((), dtype=torch.float32),
            like.new_empty((), dtype=torch.float32),
        )

    @torch.library.register_fake("fused_optim::scale_")
    def _scale_fake(tensors, coef):
        _check_one_device(tensors, [coef])
        return None
