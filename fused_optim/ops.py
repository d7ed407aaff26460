"""Fake (meta) implementations of torch.ops.fused_optim.*, so the ops trace under FakeTensor,
torch.compile and torch.export. The schemas themselves live in csrc/ops.cpp."""

import torch

from fused_optim import _ext

if _ext.load_error is None:

    @torch.library.register_fake("fused_optim::adam_")
    def _adam_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, **kwargs):
        return None

    @torch.library.register_fake("fused_optim::global_norm")
    def _global_norm_fake(tensors, norm_type, max_norm, grad_scale):
        like = tensors[0]
        return (
            like.new_empty((), dtype=torch.float32),
            like.new_empty((), dtype=torch.float32),
        )

    @torch.library.register_fake("fused_optim::scale_")
    def _scale_fake(tensors, coef):
        return None
