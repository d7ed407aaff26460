"""Backend registry: which implementation runs an algorithm for tensors on a given device.

Every backend exposes the same functions (see fused_optim/functional.py for the arguments):
adam(...), adafactor(...), adafactor_transformers(...), smmf(...), global_norm(tensors, norm_type,
max_norm, grad_scale) -> (norm, coef) and scale_(tensors, coef).

  cuda       fused_optim._C built with CUDA; CUDA tensors
  triton     triton installed; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1
  cpu        fused_optim._C; CPU tensors
  reference  pure PyTorch; anything

backend="auto" picks cuda > triton > reference on GPU and cpu > reference on CPU. An explicit
backend (argument or FUSED_OPTIM_BACKEND) that cannot run raises an error saying what is missing.
"""

import importlib.util
import os
from types import SimpleNamespace

import torch

from fused_optim import _ext

BACKENDS = ("cuda", "triton", "cpu", "reference")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
ENV_VAR = "FUSED_OPTIM_BACKEND"


def _split_lr(lr, device: torch.device) -> tuple[float, torch.Tensor | None]:
    """(lr as a float, lr as a tensor on `device` or None) for the native ops."""
    if not isinstance(lr, torch.Tensor):
        if torch.compiler.is_compiling():
            # A float lr is a graph input there; as a float argument of the op it would be
            # specialised on (one recompile per lr value), as a tensor it is not.
            return 0.0, torch.scalar_tensor(lr, dtype=torch.float64, device=device)
        return float(lr), None
    if lr.device != device:
        if lr.device.type != "cpu":
            raise RuntimeError(f"fused_optim: lr is on {lr.device} but the params are on {device}")
        return float(lr), None  # a CPU lr for GPU params: reading it is no device sync
    return 0.0, lr


def _native_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr, **kw):
    lr, lr_tensor = _split_lr(lr, params[0].device)
    torch.ops.fused_optim.adam_(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr=lr, lr_tensor=lr_tensor, **kw
    )


def _native_adam_group(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps):
    """The bucket's tensors held in C++ (fused_optim::AdamGroup): a step passes only its grads."""
    group = torch.classes.fused_optim.AdamGroup(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
    device = params[0].device

    def step(grads, *, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize, adax,
             grad_scale=None, found_inf=None, clip_coef=None):  # fmt: skip
        lr, lr_tensor = _split_lr(lr, device)
        group.step(grads, lr, lr_tensor, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize, adax,
                   grad_scale, found_inf, clip_coef)  # fmt: skip

    step.plans = group.plans  # full plans built so far (tests: an unchanged step builds none)
    return step


def _native_smmf_group(params, row_ms, col_ms, signs, row_vs, col_vs, exp_avgs, exp_avg_sqs, state_steps):
    """The bucket's tensors held in C++ (fused_optim::SmmfGroup): a step passes only its grads."""
    group = torch.classes.fused_optim.SmmfGroup(
        params, row_ms, col_ms, signs, row_vs, col_vs, exp_avgs, exp_avg_sqs, state_steps
    )
    device = params[0].device

    def step(grads, *, lr, beta, eps, weight_decay, decay_rate, growth_rate, vector_reshape, decoupled,
             grad_scale=None, found_inf=None, clip_coef=None):  # fmt: skip
        lr, lr_tensor = _split_lr(lr, device)
        group.step(grads, lr, lr_tensor, beta, eps, weight_decay, decay_rate, growth_rate, vector_reshape,
                   decoupled, grad_scale, found_inf, clip_coef)  # fmt: skip

    step.plans = group.plans
    return step


_SHARD_KEYS = ("phase", "global_numels", "stats_at", "sums", "carry")


def _shard_kw(kw) -> dict:
    """The arguments of one call of a sharded Adafactor step (optim/adafactor.py: ShardSums)."""
    return {k: kw[k] for k in _SHARD_KEYS if k in kw}


def _native_adafactor(params, grads, row_vars, col_vars, variances, state_steps, *, lr, **kw):
    """torch.optim.Adafactor's flavour through the one Adafactor op."""
    lr, lr_tensor = _split_lr(lr, params[0].device)
    torch.ops.fused_optim.adafactor_(
        params, grads, row_vars, col_vars, variances, [], [], state_steps, transformers=False,
        lr=lr, lr_tensor=lr_tensor, eps1=kw["eps1"], eps2=kw["eps2"], decay=kw["beta2_decay"], d=kw["d"],
        weight_decay=kw["weight_decay"], beta1=None, maximize=kw["maximize"], relative_step=False,
        scale_parameter=True, warmup_init=False, grad_scale=kw.get("grad_scale"),
        found_inf=kw.get("found_inf"), clip_coef=kw.get("clip_coef"), **_shard_kw(kw),
    )  # fmt: skip


def _native_adafactor_transformers(params, grads, rows, cols, sqs, exp_avgs, rmss, state_steps, *, lr, **kw):
    """transformers' flavour through the one Adafactor op (lr is unused with relative_step)."""
    if kw["relative_step"] or lr is None:
        lr, lr_tensor = 0.0, None
    else:
        lr, lr_tensor = _split_lr(lr, params[0].device)
    beta1 = kw["beta1"]
    torch.ops.fused_optim.adafactor_(
        params, grads, rows, cols, sqs, exp_avgs if beta1 is not None else [], rmss, state_steps,
        transformers=True, lr=lr, lr_tensor=lr_tensor, eps1=kw["eps1"], eps2=kw["eps2"],
        decay=kw["decay_rate"], d=kw["clip_threshold"], weight_decay=kw["weight_decay"], beta1=beta1,
        maximize=False, relative_step=kw["relative_step"], scale_parameter=kw["scale_parameter"],
        warmup_init=kw["warmup_init"], grad_scale=kw.get("grad_scale"), found_inf=kw.get("found_inf"),
        clip_coef=kw.get("clip_coef"), **_shard_kw(kw),
    )  # fmt: skip


def _native_smmf(params, grads, row_ms, col_ms, signs, row_vs, col_vs, exp_avgs, exp_avg_sqs, state_steps,
                 *, lr, **kw):  # fmt: skip
    lr, lr_tensor = _split_lr(lr, params[0].device)
    torch.ops.fused_optim.smmf_(
        params, grads, row_ms, col_ms, signs, row_vs, col_vs, exp_avgs, exp_avg_sqs, state_steps,
        lr=lr, lr_tensor=lr_tensor, **kw,
    )  # fmt: skip


def list_adam_group(backend):
    """adam_group for backends without one of their own: a closure over the bucket's lists."""

    def make(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps):
        def step(grads, **kw):
            backend.adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, **kw)

        return step

    return make


def _native():
    return SimpleNamespace(
        name="native",
        adam=_native_adam,
        adam_group=_native_adam_group,
        adafactor=_native_adafactor,
        adafactor_transformers=_native_adafactor_transformers,
        smmf=_native_smmf,
        smmf_group=_native_smmf_group,
        global_norm=lambda tensors, norm_type, max_norm, grad_scale=None: torch.ops.fused_optim.global_norm(
            tensors, float(norm_type), float(max_norm), grad_scale
        ),
        scale_=lambda tensors, coef: torch.ops.fused_optim.scale_(tensors, coef),
    )


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# What this process can run, read once: selection then only reads module constants and the
# environment, which torch.compile traces without a graph break.
_HAS_KERNELS = {key: _ext.has_kernels(key) for key in ("CPU", "CUDA")}
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def unavailable_reason(name: str, device_type: str) -> str | None:
    """None when `name` can run on `device_type` tensors, else why not (one sentence)."""
    if name == "reference":
        return None
    if name == "cpu":
        if device_type != "cpu":
            return f"the cpu backend runs on CPU tensors, these are on {device_type}"
        if not _HAS_KERNELS["CPU"]:
            return f"the native extension fused_optim._C is not built ({_ext.load_error}); {_ext.BUILD_HINT}"
        return None
    if name == "cuda":
        if device_type != "cuda":
            return f"the cuda backend runs on CUDA tensors, these are on {device_type}"
        if not _HAS_KERNELS["CUDA"]:
            return (
                "fused_optim._C was built without CUDA kernels; rebuild with a CUDA toolkit and a "
                f"CUDA-enabled torch ({_ext.BUILD_HINT})"
            )
        return None
    if name == "triton":
        if not _HAS_TRITON:
            return "triton is not installed (pip install triton)"
        if device_type == "cuda" or (device_type == "cpu" and _triton_interpreted()):
            return None
        return (
            "the triton backend runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
            f"these are on {device_type}"
        )
    return f"unknown backend {name!r}; choose one of {', '.join(('auto',) + BACKENDS)}"


_LOADED = {}  # backend name -> its module-like object, filled on first use


def _load(name: str):
    backend = _LOADED.get(name)
    if backend is None:
        if name in ("cpu", "cuda"):
            backend = _native()
        elif name == "triton":
            from fused_optim import triton_kernels as backend
        else:
            from fused_optim import _reference as backend
        _LOADED[name] = backend
    return backend


def check_name(name: str) -> str:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}")
    return name


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def resolve(requested: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The backend name to use for tensors on `device` (of `dtype`, when known: auto sends
    dtypes the kernels do not take, such as float64, to the reference)."""
    if requested == "auto":
        requested = os.environ.get(ENV_VAR, "auto") or "auto"
        if requested != "auto" and requested not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={requested!r} is not one of {('auto',) + BACKENDS}")
    if requested == "auto":
        if dtype is not None and dtype not in KERNEL_DTYPES:
            return "reference"
        for name in _AUTO_ORDER.get(device.type, ("reference",)):
            if unavailable_reason(name, device.type) is None:
                return name
        return "reference"
    reason = unavailable_reason(requested, device.type)
    if reason is None and requested != "reference" and dtype is not None and dtype not in KERNEL_DTYPES:
        reason = f"its kernels take float32, float16 and bfloat16, not {dtype} (use 'auto' or 'reference')"
    if reason is not None:
        raise RuntimeError(f"fused_optim: backend {requested!r} cannot run: {reason}")
    return requested


def get(requested: str, device: torch.device, dtype: torch.dtype | None = None):
    """The backend module-like object for tensors on `device` (of `dtype`)."""
    return _load(resolve(requested, device, dtype))


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends that can run on tensors of `device`, in auto-selection order."""
    dev = torch.device(device)
    return [b for b in BACKENDS if unavailable_reason(b, dev.type) is None]


def for_tracing():
    """The backend for FakeTensor / meta params (tracing, memory estimation): the registered ops,
    whose fake implementations only check shapes, when the extension is loaded; else the
    reference, which reads no tensor values of such params."""
    return _load("cpu" if _ext.load_error is None else "reference")


# Loaded up front, so torch.compile only ever reads _LOADED (triton stays lazy: it is heavy).
_load("cpu")
_LOADED["cuda"] = _LOADED["cpu"]
_load("reference")
