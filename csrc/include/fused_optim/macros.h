// Portability macros for code compiled by both the host compiler and nvcc.
#pragma once

#if defined(__CUDACC__)
#define FO_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FO_HOST_DEVICE inline
#endif

#include <stdint.h>
#include <string.h>

// A float's bits and back (memcpy is how host C++ says it without undefined behaviour).
FO_HOST_DEVICE uint32_t fo_float_as_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  return u;
#endif
}

FO_HOST_DEVICE float fo_bits_as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  memcpy(&x, &u, sizeof x);
  return x;
#endif
}
