"""Device-side helpers shared by the kernels: reading the work plan (see _plan.py)."""

import triton
import triton.language as tl


@triton.jit
def f64(bits):
    """fp64 from the int64 bit pattern made by _plan.f64_bits (an int32 when the interpreter
    sees a small pattern, e.g. 0.0, hence the widening first)."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def work_item(items_ptr, meta_ptr, RECORD: tl.constexpr):
    """This program's (tensor index, pointer to its record, chunk index) from its work item."""
    item = tl.load(items_ptr + tl.program_id(0))
    tensor = item >> 32
    return tensor, meta_ptr + tensor * RECORD, item - (tensor << 32)


@triton.jit
def role_ptr(base, record, ROLE: tl.constexpr, chunk_start, ALIGNED: tl.constexpr):
    """Scalar pointer to element `chunk_start` of this tensor in role ROLE (record word ROLE is
    its element offset from the role's base pointer)."""
    offset = tl.load(record + ROLE)
    if ALIGNED:
        # Every tensor of the plan is 16-byte aligned: say so, so full tiles use 128-bit accesses.
        offset = tl.multiple_of(offset, 16 // (base.dtype.element_ty.primitive_bitwidth // 8))
    return base + offset + chunk_start


# Decided as triton.jit decided for the functions above (TRITON_INTERPRET at import time).
INTERPRETED = tl.constexpr(not hasattr(f64, "device_caches"))


@triton.jit
def to_storage(x, ptr):
    """x (fp32) converted to the element type of ptr, rounded to nearest even (as torch). The
    interpreter's fp32 -> bf16 cast truncates instead, so there (only) bf16 is rounded by hand;
    compiled kernels use the hardware's round-to-nearest-even conversion."""
    if INTERPRETED and ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + ((bits >> 16) & 1) + 0x7FFF) >> 16
        bits = tl.where(x != x, 0x7FC0, bits)  # NaN stays a (quiet) NaN
        y = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(ptr.dtype.element_ty)
    return y
