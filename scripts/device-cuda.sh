#!/usr/bin/env bash
# Repeatable CUDA check on the device machine (H100 + CUDA 13, no Rust there).
#
# Here (build machine), from the worktree:
#   cargo test --release --no-run -p yinsen --test cuda_kernels --test cuda_forward
#   d=/work/main/.device-cudaperf; rm -rf $d && mkdir -p $d/tests $d/fixtures
#   cp target/release/deps/cuda_{kernels,forward}-<hash> $d/tests/  (strip them)
#   cp -r /work/shared/fixtures/tiny-bitnet-a $d/fixtures/; cp scripts/device-cuda.sh $d/
#   (/.device-cudaperf/ in /work/main/.git/info/exclude)
# Device (run tool, carry [".device-cudaperf"]):
#   bash .device-cudaperf/device-cuda.sh 2>&1 | tail -200
#
# Runs: the cuda_* test binaries with YINSEN_DEVICE=1 (GPU tests must run,
# not skip), compute-sanitizer memcheck on the kernel tests and the tiny
# forward, then the 2B4T-shaped benchmark. Exit status: non-zero on any failure.
set -u
here=$(cd "$(dirname "$0")" && pwd)
export YINSEN_DEVICE=1 YINSEN_FIXTURES="$here/fixtures" YINSEN_CUDA_CACHE=/tmp/yinsen-cuda-cache
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
kernels=$(ls "$here"/tests/cuda_kernels-* | head -1)
forward=$(ls "$here"/tests/cuda_forward-* | head -1)
echo "== cuda_kernels"
"$kernels" --test-threads=1 --nocapture || status=1
echo "== cuda_forward (tiny vs CPU, fixtures)"
"$forward" --test-threads=1 --nocapture --skip bench_2b4t || status=1
if command -v compute-sanitizer >/dev/null; then
  echo "== memcheck cuda_kernels"
  compute-sanitizer --tool memcheck --error-exitcode 9 "$kernels" --test-threads=1 matmul_exact 2>&1 | tail -15 || status=1
  echo "== memcheck cuda_forward tiny"
  compute-sanitizer --tool memcheck --error-exitcode 9 "$forward" --test-threads=1 tiny_matches_cpu_backend 2>&1 | tail -15 || status=1
else
  echo "compute-sanitizer not found"
fi
echo "== bench 2b4t"
"$forward" --test-threads=1 --nocapture bench_2b4t || status=1
if [ "${PROFILE:-0}" = 1 ] && command -v nsys >/dev/null; then
  echo "== nsys kernel summary (2b4t bench)"
  nsys profile -o /tmp/yinsen-prof --force-overwrite true "$forward" --test-threads=1 bench_2b4t >/dev/null 2>&1
  nsys stats --report cuda_gpu_kern_sum --format csv /tmp/yinsen-prof.nsys-rep 2>/dev/null | cut -c1-160 | head -25
fi
echo "== exit $status"
exit $status
