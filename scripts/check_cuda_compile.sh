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

if [[ ${#failed[@]} -gt 0 ]]; then
  echo "check_cuda_compile: ${#failed[@]} file(s) failed: ${failed[*]}" >&2
  exit 1
fi
echo "check_cuda_compile: all ${#sources[@]} file(s) compiled"
