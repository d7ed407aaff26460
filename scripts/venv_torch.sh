#!/usr/bin/env bash
# Makes the venv's torch follow TORCH_SPEC, for the Makefile. Usage:
#   scripts/venv_torch.sh VENV_PYTHON "TORCH_SPEC" RECORD_FILE BUILD_STAMP
# RECORD_FILE (.venv/.torch-spec) holds the spec last installed. The same spec: nothing to do. A
# different one: torch is uninstalled and the new spec installed (uninstalled first, because
# `torch==2.13.0` from a CUDA index is "already satisfied" by an installed 2.13.0+cpu), the record
# rewritten (newer than BUILD_STAMP, so make rebuilds the extension) and the old build removed.
# No record yet (a new venv, or one made before the record existed): the spec is installed, a no-op
# when the installed torch satisfies it; the build is kept if torch did not change.
# Prints one "torch: ..." line saying which case it was.
set -euo pipefail
set -f # TORCH_SPEC is split into words for pip below, never globbed

py="$1"
spec="$2"
record="$3"
stamp="$4"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

torch_version() { "${py}" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo "none"; }

if [[ -z "${spec//[[:space:]]/}" ]]; then
  echo "torch: TORCH_SPEC is empty; give a pip requirement, e.g. TORCH_SPEC=torch==2.13.0" >&2
  exit 2
fi

if [[ -f "${record}" ]]; then
  recorded="$(cat "${record}")"
  if [[ "${recorded}" == "${spec}" ]]; then
    echo "torch: TORCH_SPEC='${spec}' unchanged (torch $(torch_version) in $(dirname "${record}"))"
    exit 0
  fi
  echo "torch: TORCH_SPEC changed from '${recorded}' to '${spec}': reinstalling torch, then rebuilding fused_optim._C"
  # Forget the old spec first: if the new one fails to install, the next run must not find the
  # old record "unchanged" over a venv that has no torch any more.
  rm -f "${record}" "${stamp}"
  "${py}" -m pip uninstall -y -q torch
  before="replaced"
else
  before="$(torch_version)"
  if [[ "${before}" == "none" ]]; then
    echo "torch: installing TORCH_SPEC='${spec}'"
  else
    echo "torch: $(dirname "${record}") has torch ${before} but no record of its TORCH_SPEC; installing TORCH_SPEC='${spec}' (a no-op if torch ${before} satisfies it)"
  fi
fi

# shellcheck disable=SC2086  # the spec may carry pip options: "torch==2.13.0 --index-url URL"
"${py}" -m pip install -q ${spec}
after="$(torch_version)"
if [[ "${after}" == "none" ]]; then
  echo "torch: TORCH_SPEC='${spec}' installed no importable torch" >&2
  exit 1
fi
printf '%s\n' "${spec}" >"${record}"

if [[ "${before}" == "none" ]]; then
  echo "torch: torch ${after} installed for TORCH_SPEC='${spec}' (recorded in ${record})"
elif [[ "${before}" == "${after}" && -f "${stamp}" ]]; then
  touch -r "${stamp}" "${record}" # same torch as the existing build: no forced rebuild
  echo "torch: torch ${after}, recorded TORCH_SPEC='${spec}' in ${record}"
else
  rm -f "${stamp}" "${repo_root}/fused_optim/_build_info.py"
  find "${repo_root}/fused_optim" -maxdepth 1 -name '_C.*.so' -delete
  rm -rf "${repo_root}/build"
  echo "torch: torch ${after} installed for TORCH_SPEC='${spec}' (recorded in ${record}); fused_optim._C will be rebuilt"
fi
