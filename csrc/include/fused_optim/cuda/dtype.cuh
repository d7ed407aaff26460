// Storage-dtype helpers shared by every CUDA kernel: float <-> fp16/bf16 conversion, aligned
// vector loads and stores, and the host-side dispatch from a DType code to a C++ type.
// CUDA headers only (no torch).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <stdexcept>
#include <string>

#include "fused_optim/multi_tensor.h"

namespace fused_optim {
namespace cuda {

// Conversions between a storage type and the fp32 math type (round to nearest even).
template <typename T>
struct Convert;

template <>
struct Convert<float> {
  static __device__ __forceinline__ float to_float(float x) { return x; }
  static __device__ __forceinline__ float from_float(float x) { return x; }
};

template <>
struct Convert<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};

template <>
struct Convert<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) {
    return __float2bfloat16_rn(x);
  }
};

// Element i of a tensor of storage type T, as fp32, and back (round to nearest even).
template <typename T>
__device__ __forceinline__ float load(const void* p, int64_t i) {
  return Convert<T>::to_float(static_cast<const T*>(p)[i]);
}

template <typename T>
__device__ __forceinline__ void store(void* p, int64_t i, float x) {
  static_cast<T*>(p)[i] = Convert<T>::from_float(x);
}

// Alignment every base pointer must have for the vectorised paths. Chunk starts are multiples
// of kChunkSize elements, so an aligned base makes every chunk's vectors aligned too.
constexpr int kVecBytes = 16;

// N elements moved by one load or store instruction; sizeof(Vec) <= kVecBytes.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Loads N elements at p[i * N .. i * N + N) and widens them to fp32.
template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* p, int64_t i, float (&out)[N]) {
  const Vec<T, N> x = reinterpret_cast<const Vec<T, N>*>(p)[i];
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = Convert<T>::to_float(x.v[k]);
}

// Narrows N fp32 values and stores them at p[i * N .. i * N + N).
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, int64_t i, const float (&in)[N]) {
  Vec<T, N> x;
#pragma unroll
  for (int k = 0; k < N; ++k) x.v[k] = Convert<T>::from_float(in[k]);
  reinterpret_cast<Vec<T, N>*>(p)[i] = x;
}

__host__ __device__ __forceinline__ bool is_aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % kVecBytes == 0;
}

// Host: calls f(TypeTag<T>{}) with T the storage type of the dtype code.
template <typename T>
struct TypeTag {
  using type = T;
};

template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      f(TypeTag<float>{});
      return;
    case DType::kFloat16:
      f(TypeTag<__half>{});
      return;
    case DType::kBFloat16:
      f(TypeTag<__nv_bfloat16>{});
      return;
  }
  throw std::invalid_argument("fused_optim: unsupported dtype code " +
                              std::to_string(static_cast<int>(dtype)));
}

}  // namespace cuda
}  // namespace fused_optim
