#!/usr/bin/env bash
# Issue 10 on a lent GPU machine (no network; its python3 has torch with CUDA, triton, nvcc):
# build against that interpreter, run the whole suite on every backend, compute-sanitizer over one
# step of every fused optimizer, the benches. Stages, so that each device call stays inside its
# 10-minute limit (the build stays on a warm machine between calls):
#
#   OUT=/somewhere bash scripts/gpu_proof.sh build test          # or: make gpu-proof STAGES="build test"
#   OUT=/somewhere bash scripts/gpu_proof.sh sanitize
#   OUT=/somewhere bash scripts/gpu_proof.sh bench
#
# Every stage's log, CSV and PNG go into $OUT/gpu_proof_<stages>.tgz, and $OUT/summary.txt says
# which stage ended how (the device returns at most 8 files, two folders deep).
set -u
OUT=${OUT:-/tmp/gpu_proof}
PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
work=$(mktemp -d)
mkdir -p "$OUT"

log() { echo "[$(date +%T)] $*" | tee -a "$OUT/summary.txt"; }
run() {  # run NAME COMMAND...: its output to NAME.log, its exit status to the summary
  local name=$1
  shift
  log "start $name: $*"
  "$@" >"$work/$name.log" 2>&1
  log "end $name: rc=$? ($(tail -n 1 "$work/$name.log"))"
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(build test)
for stage in "${stages[@]}"; do
  case $stage in
    build)
      run nvidia-smi nvidia-smi
      run build "$PY" -m pip install --no-build-isolation --no-deps -e .
      run build-info "$PY" -c "import fused_optim._build_info as b; print(b.WITH_CUDA, b.CUDA_ARCHS, b.TORCH_VERSION)"
      ;;
    test)
      run pytest-gpu "$PY" -m pytest tests/test_gpu.py -q -rs
      run pytest-all "$PY" -m pytest tests -q -rs -m "not large" -p no:cacheprovider
      run pytest-large "$PY" -m pytest tests -q -rs -m large
      ;;
    sanitize)
      for tool in memcheck racecheck synccheck; do
        run "sanitize-$tool" compute-sanitizer --tool "$tool" --error-exitcode 3 "$PY" scripts/sanitize_steps.py
      done
      ;;
    bench)
      for algo in adam adafactor smmf; do
        run "bench-$algo" "$PY" "bench/bench_$algo.py" --csv "$work/bench_${algo}_cuda.csv"
        run "plot-$algo" "$PY" bench/plot.py "$work/bench_${algo}_cuda.csv"
      done
      run bench-fsdp2 "$PY" bench/bench_fsdp2.py --device cuda --ranks 1 --csv "$work/bench_fsdp2_cuda.csv"
      ;;
    *)
      log "unknown stage $stage (build, test, sanitize, bench)"
      ;;
  esac
done
tag=$(IFS=_ && echo "${stages[*]}")
tar czf "$OUT/gpu_proof_$tag.tgz" -C "$work" .
rm -rf "$work"
log "wrote $OUT/gpu_proof_$tag.tgz"
