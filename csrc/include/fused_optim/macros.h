// Portability macros and helpers for code compiled by both the host compiler and nvcc.
#pragma once

#if defined(__CUDACC__)
#define FO_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FO_HOST_DEVICE inline
#endif

#include <string.h>

// The bits of x as a To of the same size (std::bit_cast, C++20). memcpy is how C++17 says it
// without undefined behaviour; compilers, nvcc's device pass included, turn it into a move.
template <typename To, typename From>
FO_HOST_DEVICE To fo_bit_cast(From x) {
  static_assert(sizeof(To) == sizeof(From), "fo_bit_cast: sizes differ");
  To y;
  memcpy(&y, &x, sizeof y);
  return y;
}
