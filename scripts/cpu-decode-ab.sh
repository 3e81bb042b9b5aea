#!/usr/bin/env bash
# CPU decode A/B of kernels, alternated in rounds (this VM and the device host
# drift by 10-30% within minutes: only rows of one run are compared).
#
#   here:    scripts/cpu-decode-ab.sh pack            # release yinsen + kernels_exact -> .device/
#   either:  bash scripts/cpu-decode-ab.sh run [ROUNDS] [THREADS] [KERNELS] [N]
#            (on the device: bash .device/cpu-decode-ab.sh run ..., run tool, carry [".device"])
#
# Each round runs `yinsen bench -p 0 -n N -r 3` for every kernel in KERNELS
# (default "vnni vnni3"), with the F16 and the 8-bit (`--lm-head q8`) head.
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
. "$(dirname "$0")/pack-small.sh"
pack_or_run "${1:-}" run "$0 pack | run [ROUNDS] [THREADS] [KERNELS] [N]" scripts/cpu-decode-ab.sh kernels_exact
rounds=${2:-3}
threads=${3:-2}
kernels=${4:-vnni vnni3}
n=${5:-64}
# Packed binaries beside the script (.device/) win over the build tree.
here=$(cd "$(dirname "$0")" && pwd)
bin="$root/target/release/yinsen"
[ -x "$here/bin/yinsen" ] && bin="$here/bin/yinsen"
if [ -x "$here/tests/kernels_exact" ]; then
  YINSEN_DEVICE=1 "$here/tests/kernels_exact" 2>&1 | grep -E "test result|FAILED|panicked|SKIP"
fi
for r in $(seq "$rounds"); do
  for k in $kernels; do
    for head in native q8; do
      line=$("$bin" bench -m synthetic:2b4t -p 0 -n "$n" -r 3 --backend cpu --kernel "$k" --lm-head "$head" -t "$threads" 2>&1 |
        grep -E "\| tg|GB/s of weights" | tr '\n' ' ')
      echo "round $r $k head=$head load=$(cut -d' ' -f1 /proc/loadavg): $line"
    done
  done
done
