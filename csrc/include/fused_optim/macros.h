// Portability macros for code compiled by both the host compiler and nvcc.
#pragma once

#if defined(__CUDACC__)
#define FO_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FO_HOST_DEVICE inline
#endif
