#!/usr/bin/env bash
# Prefill GEMM check and A/B on the device (one call): pack here, run there.
#   here:    scripts/device-gemm.sh pack
#   device:  bash .device/device-gemm.sh remote   (run tool, carry [".device"])
# Runs the exact matmul tests over every tile variant (and memcheck on them),
# the cuda_forward tests, then `yinsen bench` prefill-only with the GEMM
# sweep and the big-call tile A/B (YINSEN_CUDA_GEMM_AB, default: every wgmma
# variant against the shape's default). Logs and the bench table go to $OUT.
set -u
. "$(dirname "$0")/pack-small.sh"
pack_or_run "${1:-}" remote "$0 pack | remote" scripts/device-gemm.sh cuda_kernels cuda_forward -- fixtures
remote_env
nvidia-smi --query-gpu=name --format=csv,noheader
"$dev/tests/cuda_kernels" --test-threads=1 matmul >"$out/kernels.log" 2>&1
grep -E "test result|FAILED|panicked|SKIP|out\[" "$out/kernels.log" | head -20
if [ "${SKIP_MEMCHECK:-0}" != 1 ]; then
  san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  "$san" --tool memcheck --error-exitcode 9 "$dev/tests/cuda_kernels" --test-threads=1 matmul_exact_random \
    >"$out/memcheck.log" 2>&1
  echo "memcheck rc $? ($(grep -c "Invalid" "$out/memcheck.log") invalid accesses)"
fi
"$dev/tests/cuda_forward" --test-threads=2 >"$out/forward.log" 2>&1
grep -E "test result|FAILED|panicked|SKIP" "$out/forward.log" | head -20
YINSEN_CUDA_BENCH=prefill YINSEN_CUDA_GEMM_SWEEP=1 yinsen bench -m synthetic:2b4t --backend cuda -p 512,2048 -n 0 -r 1 \
  >"$out/bench.txt" 2>"$out/bench.err"
grep -E "A/B|rror" "$out/bench.err"
grep -E "prefill|gemm" "$out/bench.txt"
