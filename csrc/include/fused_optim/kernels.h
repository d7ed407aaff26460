// Entry points of the kernels, one per (algorithm, device). Torch-free.
#pragma once

#include "fused_optim/kernel_args.h"

#if defined(FO_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime_api.h>
#endif

namespace fused_optim {

// csrc/cpu: a parallel loop over the work items.
void adam_cpu(const AdamArgs& args);
void adafactor_cpu(const AdafactorArgs& args);  // all five phases
void smmf_cpu(const SmmfArgs& args);            // both passes
void norm_partials_cpu(const NormPartialsArgs& args);
void norm_finalize_cpu(const NormFinalizeArgs& args);
void scale_cpu(const ScaleArgs& args);

#if defined(FO_WITH_CUDA) || defined(__CUDACC__)
// csrc/cuda: one launch each; args' plan pointers are device pointers.
void adam_cuda(const AdamArgs& args, cudaStream_t stream);
void adafactor_cuda(const AdafactorArgs& args, cudaStream_t stream);  // five launches
void smmf_cuda(const SmmfArgs& args, cudaStream_t stream);            // two launches
void norm_partials_cuda(const NormPartialsArgs& args, cudaStream_t stream);
void norm_finalize_cuda(const NormFinalizeArgs& args, cudaStream_t stream);
void scale_cuda(const ScaleArgs& args, cudaStream_t stream);
#endif

}  // namespace fused_optim
