#!/usr/bin/env bash
# Quick decode A/B on the device (one call): pack here, run there.
#   here:    scripts/device-quick.sh pack
#   device:  bash .device/device-quick.sh remote "7,263,135"   (run tool, carry [".device"])
# Runs the cuda_forward tests, then `yinsen bench` decode-only with the
# persistent kernel's variant flags A/B'd (YINSEN_CUDA_MEGA_AB) and traced.
set -u
. "$(dirname "$0")/pack-small.sh"
if [ "${1:-}" = pack ]; then
  set -e
  pack_small scripts/device-quick.sh cuda_forward cuda_kernels -- fixtures
  exit 0
fi
[ "${1:-}" = remote ] || { echo "usage: $0 pack | remote FLAGS [test-filter]"; exit 2; }
remote_env
nvidia-smi --query-gpu=name --format=csv,noheader
"$dev/tests/cuda_forward" --test-threads=2 ${3:-} >"$out/tests.log" 2>&1
"$dev/tests/cuda_kernels" ${3:-} >>"$out/tests.log" 2>&1
grep -E "test result|FAILED|panicked|SKIP" "$out/tests.log" | head -20
YINSEN_CUDA_BENCH=decode YINSEN_CUDA_MEGA_AB="$2" yinsen bench -m synthetic:2b4t --backend cuda -p 0 -n 1 -r 1 >"$out/bench.txt" 2>&1
grep -E "^flags|decode ctx|variant|persistent decode launch|tok/s" "$out/bench.txt"
