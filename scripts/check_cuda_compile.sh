#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu with nvcc (sm_80 and sm_90, warnings as errors) to catch build
# breaks without a GPU. Usage: scripts/check_cuda_compile.sh   (nvcc from $CUDA_HOME or
# /usr/local/cuda). Exits non-zero and names the file when any compilation fails.
set -u

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cuda_home="${CUDA_HOME:-/usr/local/cuda}"
nvcc="${cuda_home}/bin/nvcc"
if [[ ! -x "${nvcc}" ]]; then
  echo "check_cuda_compile: nvcc not found at ${nvcc} (set CUDA_HOME to the CUDA toolkit)" >&2
  exit 1
fi

shopt -s nullglob
sources=("${repo_root}"/csrc/cuda/*.cu)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "check_cuda_compile: no .cu files under ${repo_root}/csrc/cuda" >&2
  exit 1
fi

out_dir="$(mktemp -d)"
trap 'rm -rf "${out_dir}"' EXIT

flags=(
  -std=c++17 -O3
  -I "${repo_root}/csrc/include"
  -gencode arch=compute_80,code=sm_80
  -gencode arch=compute_90,code=sm_90
  -Werror all-warnings
  -Xcompiler -Wall,-Wextra,-Werror
)

failed=()
for src in "${sources[@]}"; do
  name="$(basename "${src}" .cu)"
  echo "nvcc ${src#"${repo_root}"/}"
  if ! "${nvcc}" "${flags[@]}" -c "${src}" -o "${out_dir}/${name}.o"; then
    echo "check_cuda_compile: FAILED: ${src#"${repo_root}"/}" >&2
    failed+=("${src#"${repo_root}"/}")
  fi
done

# The host C++ of a CUDA build (csrc/ops/*.cpp with FO_WITH_CUDA, csrc/cuda/*.cpp) needs torch's CUDA
# headers; a CPU-only torch ships them minus one generated file, stubbed here, which is enough
# for a syntax check. Skipped (with a note) when python cannot import torch.
python="${PYTHON:-python}"
if torch_inc="$("${python}" -c 'from torch.utils.cpp_extension import include_paths; print(" ".join(include_paths()))' 2>/dev/null)"; then
  mkdir -p "${out_dir}/stub/c10/cuda/impl"
  echo '#define C10_CUDA_BUILD_SHARED_LIBS' >"${out_dir}/stub/c10/cuda/impl/cuda_cmake_macros.h"
  py_inc="$("${python}" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
  host_flags=(-std=c++17 -fsyntax-only -Wall -Wextra -Werror -DFO_WITH_CUDA -I "${repo_root}/csrc/include")
  for d in ${torch_inc} "${out_dir}/stub" "${cuda_home}/include" "${py_inc}"; do host_flags+=(-isystem "${d}"); done
  for src in "${repo_root}"/csrc/ops/*.cpp "${repo_root}"/csrc/cuda/*.cpp; do
    echo "g++ -DFO_WITH_CUDA -fsyntax-only ${src#"${repo_root}"/}"
    if ! "${CXX:-g++}" "${host_flags[@]}" "${src}"; then
      echo "check_cuda_compile: FAILED: ${src#"${repo_root}"/}" >&2
      failed+=("${src#"${repo_root}"/}")
    fi
  done
else
  echo "check_cuda_compile: torch not importable by ${python}; skipped the CUDA host-code check" >&2
fi

if [[ ${#failed[@]} -gt 0 ]]; then
  echo "check_cuda_compile: ${#failed[@]} file(s) failed: ${failed[*]}" >&2
  exit 1
fi
echo "check_cuda_compile: all files compiled"
