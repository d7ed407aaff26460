"""Docstring pieces shared by every fused optimizer, written once and formatted into each
class's docstring."""

FUSED_ARGS = """\
        max_grad_norm (float, optional): clip the gradients to this global L2 norm (over every
            param of every group, as ``torch.nn.utils.clip_grad_norm_``) inside the step: the
            norm is one extra pass and the clip coefficient multiplies the gradient in
            registers, so ``.grad`` is never rewritten. ``None`` (default) does not clip.
        backend (str, optional): ``"auto"`` (default), ``"cuda"``, ``"triton"``, ``"cpu"`` or
            ``"reference"``. ``auto`` picks cuda > triton > reference for GPU params and
            cpu > reference for CPU params, and the reference for float64 params. The
            environment variable ``FUSED_OPTIM_BACKEND`` overrides ``auto``. A backend that
            cannot run on the params given raises an error in the constructor."""

FUSED_ATTRIBUTES = """\
    Attributes:
        last_grad_norm (Tensor or None): with ``max_grad_norm``, the total gradient norm of
            the last step (before clipping), as a 0-d float32 tensor on the params' device (no
            host sync).
        backends (dict): the backend that runs each device's params, e.g.
            ``{device(type='cuda', index=0): 'cuda'}``."""

FUSED_NOTES = """\
    Each step updates all params of a group that share a device and dtype in one kernel
    launch (CUDA, Triton) or one parallel loop (native CPU), in fp32 math whatever the storage
    dtype. ``lr`` may be a float or a one-element tensor (read on the device, so a step can be
    captured in a CUDA graph and ``lr.fill_(...)`` takes effect); a tensor ``lr`` that is not
    float32/float64 is converted once, and tensor ``betas``, ``eps`` and ``weight_decay`` are
    read once, in the constructor. ``torch.amp.GradScaler`` works through torch's fused
    protocol: a step with an inf/NaN gradient changes nothing; gradients are unscaled in
    registers and stay scaled in memory (torch's fused AdamW writes them back unscaled).
    The same param twice, or params that are overlapping views of one buffer, are refused
    (``ValueError``); torch warns and applies a repeated param twice."""
