"""Loads the compiled extension fused_optim._C, which registers torch.ops.fused_optim.*.

A missing or broken extension never breaks `import fused_optim`: the reference backend is used
instead, with one warning, and asking for a native backend explicitly raises BUILD_HINT.
"""

import warnings

import torch

BUILD_HINT = (
    "build it with `pip install --no-build-isolation .` (or `pip install --no-build-isolation -e .`) "
    "from the fused_optim source tree; a CUDA toolkit and a CUDA-enabled torch add the CUDA kernels"
)

load_error: Exception | None = None
try:
    from fused_optim import _C  # noqa: F401
except Exception as exc:  # ImportError, or an undefined symbol from a torch mismatch
    load_error = exc
    warnings.warn(
        f"fused_optim: native extension not available ({exc}); using the pure-PyTorch reference "
        f"backend. To get the fused kernels, {BUILD_HINT}.",
        RuntimeWarning,
        stacklevel=2,
    )


def has_kernels(dispatch_key: str) -> bool:
    """True when the extension registered kernels for `dispatch_key` ("CPU" or "CUDA")."""
    return load_error is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "fused_optim::adam_", dispatch_key
    )
