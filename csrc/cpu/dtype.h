// Storage-type dispatch for the CPU kernels: maps the DType codes to c10 element types.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "fused_optim/multi_tensor.h"

namespace fused_optim {

// Calls fn(T{}) with T the C++ element type of `dtype`.
template <typename Fn>
void dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32:
      fn(float{});
      return;
    case DType::kFloat16:
      fn(c10::Half{});
      return;
    case DType::kBFloat16:
      fn(c10::BFloat16{});
      return;
  }
  TORCH_CHECK(false, "fused_optim: unsupported dtype code ", static_cast<int>(dtype));
}

}  // namespace fused_optim
