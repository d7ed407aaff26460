// Runtime ISA dispatch for the CPU inner loops. The extension is built for baseline x86-64, so
// each hot loop is compiled once more per wider ISA with GCC's `target` attribute, from one
// body (FO_CPU_ISA_VARIANTS), and the widest the CPU supports is picked at run time. The math
// headers inline into each variant; -ffp-contract=off keeps results bit-identical across them.
#pragma once

namespace fused_optim {

enum class CpuIsa { kBase, kAvx2, kAvx512 };

inline CpuIsa cpu_isa() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  static const CpuIsa isa = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
                                ? CpuIsa::kAvx512
                            : __builtin_cpu_supports("avx2") ? CpuIsa::kAvx2
                                                             : CpuIsa::kBase;
  return isa;
#else
  return CpuIsa::kBase;
#endif
}

}  // namespace fused_optim

// X(suffix, attributes) is expanded once per variant: define a function named with the suffix.
// Elsewhere than x86 the three variants are the same code.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FO_CPU_ISA_VARIANTS(X)             \
  X(base, )                                \
  X(avx2, __attribute__((target("avx2")))) \
  X(avx512, __attribute__((target("avx512f,avx512bw"))))
#else
#define FO_CPU_ISA_VARIANTS(X) X(base, ) X(avx2, ) X(avx512, )
#endif

namespace fused_optim {

// The variant for this CPU, e.g. pick_isa(f_base<T>, f_avx2<T>, f_avx512<T>).
template <typename Fn>
Fn pick_isa(Fn base, Fn avx2, Fn avx512) {
  switch (cpu_isa()) {
    case CpuIsa::kAvx512:
      return avx512;
    case CpuIsa::kAvx2:
      return avx2;
    default:
      return base;
  }
}

}  // namespace fused_optim
