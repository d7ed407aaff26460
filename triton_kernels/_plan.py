"""The multi-tensor work plan of the Triton kernels, its cache, and the one launch helper.

Triton kernels take a fixed set of pointer arguments, not a list of tensors. Each *role* (params,
grads, exp_avgs, ...) is therefore passed as one base pointer, the first non-empty tensor of that
role, and the plan records every tensor's element offset from its role's base. All tensors of a
role share one dtype, so the byte distance divides exactly; the kernel forms
`base + offset + chunk * CHUNK + arange`. Element counts and offsets are int64.

Plan layout, one int64 buffer on the device (uploaded with a single copy):
  records: RECORD words per tensor: [numel, offset of role 0, offset of role 1, ...]
  items:   one word per work item: (tensor index << 32) | chunk index
An empty tensor gets one work item, so per-tensor bookkeeping (the step) happens once.

Plans are cached by the tensors' addresses and sizes; a step whose tensors did not move only
computes that key and launches.
"""

import struct
from collections import OrderedDict

import torch

from fused_optim._layout import is_dense

# Tile size of one inner iteration, and tiles per work item. A chunk (= one program) covers
# CHUNK elements: large enough to amortise the per-program fp64 step scalars and atomics, small
# enough to spread a 1M-element tensor over ~128 programs.
BLOCK = 1024
TILES = 8
CHUNK = BLOCK * TILES
NUM_WARPS = 4

RECORD = 8  # int64 words per tensor record (one 64-byte line: numel + up to 7 role offsets)
_MAX_ITEMS = 2**31 - 1  # grid dimension 0 limit
_CACHE_SIZE = 64

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _launch(kernel, grid, *args, **kwargs):
    """Every kernel launch of this package goes through here, so tests can count launches."""
    kernel[grid](*args, **kwargs)


def f64_bits(x: float) -> int:
    """The int64 bit pattern of float(x) as an fp64.

    Scalars reach the kernels this way because the interpreter hands Python floats to kernels
    as fp32; an int64 argument keeps all 64 bits both interpreted and compiled (the kernel
    bitcasts it back), and as a runtime argument it never causes a recompile."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def same_layout(t: torch.Tensor, ref: torch.Tensor) -> bool:
    """t (of ref's shape) can be walked as flat memory in lockstep with ref."""
    if t.numel() <= 1:
        return True
    same = all(a == b for size, a, b in zip(t.shape, t.stride(), ref.stride(), strict=True) if size != 1)
    return same and is_dense(t)


class Plan:
    __slots__ = ("meta", "items", "counters", "n_items", "aligned", "bases", "_host")

    def __init__(self, meta, items, counters, n_items, aligned, bases, host):
        self.meta = meta
        self.items = items
        self.counters = counters
        self.n_items = n_items
        self.aligned = aligned  # every vector role's data_ptr is 16-byte aligned
        self.bases = bases  # per role: index of the tensor passed as its base pointer
        self._host = host  # keeps the pinned source of a pending async upload alive


def build(roles, device: torch.device, counters: bool = False) -> Plan:
    """Builds the plan for `roles`: a list of (tensors, is_vector), tensors None for a role the
    call does not use (its record word stays 0); role r's offsets go to record word r + 1 and
    roles[0] gives the element counts. Scalar roles (step tensors) need no alignment.
    O(#tensors) Python work plus a few vectorised torch ops on the host."""
    first = roles[0][0]
    n = len(first)
    if len(roles) + 1 > RECORD:
        raise RuntimeError(f"fused_optim: a plan holds at most {RECORD - 1} roles")
    numels = [t.numel() for t in first]
    words = [0] * (n * RECORD)
    words[0::RECORD] = numels
    aligned = True
    bases = []
    for r, (tensors, is_vector) in enumerate(roles, start=1):
        if tensors is None:
            bases.append(0)
            continue
        b = next((i for i, t in enumerate(tensors) if t.numel() > 0), 0)
        bases.append(b)
        base = tensors[b].data_ptr()
        size = tensors[b].element_size()
        for i, t in enumerate(tensors):
            if t.numel() == 0:
                continue  # never dereferenced: offset 0
            ptr = t.data_ptr()
            dist, rest = divmod(ptr - base, size)
            if rest:
                raise RuntimeError(
                    f"fused_optim: tensor {i} of a role is not element-aligned with tensor {b}; "
                    "tensors of one role must share a dtype"
                )
            words[i * RECORD + r] = dist
            if is_vector and ptr % 16:
                aligned = False

    counts = [max(1, -(-k // CHUNK)) for k in numels]
    n_items = sum(counts)
    if n_items > _MAX_ITEMS or max(counts) > 2**32:
        raise RuntimeError("fused_optim: too many work items for one launch")
    counts_t = torch.tensor(counts, dtype=torch.int64)
    tensor_idx = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), counts_t)
    firsts = torch.repeat_interleave(torch.cumsum(counts_t, 0) - counts_t, counts_t)
    chunk_idx = torch.arange(n_items, dtype=torch.int64) - firsts

    on_cuda = device.type == "cuda"
    host = torch.empty(n * RECORD + n_items, dtype=torch.int64, pin_memory=on_cuda)
    host[: n * RECORD] = torch.tensor(words, dtype=torch.int64)
    host[n * RECORD :] = (tensor_idx << 32) | chunk_idx
    buf = host.to(device, non_blocking=True) if on_cuda else host
    ctr = torch.zeros(n, dtype=torch.int32, device=device) if counters else None
    meta, items = buf[: n * RECORD], buf[n * RECORD :]
    return Plan(meta, items, ctr, n_items, aligned, tuple(bases), host if on_cuda else None)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class PlanCache:
    """A small LRU map from a call's tensors (addresses, sizes, layouts) to its plan. A plan
    used while a CUDA graph is being captured is kept for good: the graph replays with its
    device buffers, so they must never be freed and reused."""

    def __init__(self, size: int = _CACHE_SIZE):
        self._size = size
        self._entries = OrderedDict()
        self._captured = {}

    def get(self, key):
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            if _capturing():
                self._captured[key] = entry
        return entry

    def put(self, key, entry) -> None:
        self._entries[key] = entry
        if _capturing():
            self._captured[key] = entry
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


def ptrs(tensors) -> tuple:
    return tuple(map(torch.Tensor.data_ptr, tensors))


def layouts(tensors) -> tuple:
    """Strides and dtypes: a tensor reallocated at a cached address may differ in either."""
    return tuple(map(torch.Tensor.stride, tensors)), tuple(t.dtype for t in tensors)


def numels(tensors) -> tuple:
    return tuple(map(torch.Tensor.numel, tensors))


def device_guard(device: torch.device):
    """Triton launches on the current CUDA device; make it the tensors' device."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return _NULL


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NULL = _Null()


def check_runnable(kernel, device: torch.device) -> None:
    """Interpreted kernels (TRITON_INTERPRET=1 at import) run on CPU tensors only: the
    interpreter copies a CUDA argument to the host but not the other tensors its plan points
    at. Compiled kernels need GPU tensors."""
    interpreted = not hasattr(kernel, "device_caches")
    if interpreted and device.type != "cpu":
        raise RuntimeError(
            f"fused_optim: under TRITON_INTERPRET=1 the triton backend runs on CPU tensors, not {device} ones"
        )
    if not interpreted and device.type == "cpu":
        raise RuntimeError(
            "fused_optim: the triton backend runs on CUDA tensors (or on CPU tensors when TRITON_INTERPRET=1 "
            "is set before fused_optim.triton_kernels is imported)"
        )


def check_plain(t, what: str, i: int, dtypes=DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fused_optim: {what}[{i}] is a {type(t).__name__}, not a tensor")
    if t.layout != torch.strided:
        raise RuntimeError(f"fused_optim: {what}[{i}] is sparse; fused optimizers support dense tensors only")
    if t.is_complex():
        raise TypeError(f"fused_optim: {what}[{i}] is complex; view it as real (torch.view_as_real) first")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"fused_optim: {what}[{i}] has dtype {t.dtype}; the supported ones are {names}")


def check_device(t, device: torch.device, what: str) -> None:
    if t.device != device:
        raise RuntimeError(
            f"fused_optim: {what} is on {t.device} but the first tensor is on {device}; "
            "one call takes tensors of one device"
        )


def check_scalar(t, device: torch.device, what: str) -> None:
    """grad_scale / found_inf / clip_coef: one-element float32 tensors on the device."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.numel() != 1 or t.dtype != torch.float32:
        raise TypeError(f"fused_optim: {what} must be a one-element float32 tensor")
    if t.device != device:
        raise RuntimeError(f"fused_optim: {what} is on {t.device} but the tensors are on {device}")
