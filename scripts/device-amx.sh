#!/usr/bin/env bash
# CPU paths on the device host (issue 3), one device call:
#   here:    scripts/device-amx.sh pack
#   device:  bash .device/device-amx.sh remote "AMX_SPECS" "DECODE_SPECS" [ROUNDS]
#            (run tool, carry [".device"])
# A spec is a space-free list of ENV=value words joined by commas ("-" for
# none), e.g. "- YINSEN_AMX_VARIANT=4". kernels_exact runs on real AMX first
# (once per AMX spec); then, ROUNDS times and alternated (the host drifts by
# 10-20% within a call), the layer matmuls (kernels_bench) and pp512 with the
# forward profile for every AMX spec, and tg32 with the F16 head and its
# decode profile for every decode spec (a word T=N there: N threads). Ends with a VNNI pp512 row.
set -u
. "$(dirname "$0")/pack-small.sh"
pack_or_run "${1:-}" remote "$0 pack | remote AMX_SPECS DECODE_SPECS [ROUNDS]" scripts/device-amx.sh kernels_exact kernels_bench
remote_env
amx_specs=$2
dec_specs=$3
rounds=${4:-2}
envs() { [ "$1" = - ] && return; echo "${1//,/ }" | tr ' ' '\n' | grep -v '^T=' | tr '\n' ' '; }
# A spec word T=N sets the thread count (default 16).
threads() { echo "${1//,/ }" | tr ' ' '\n' | grep '^T=' | cut -d= -f2 | grep . || echo 16; }
lscpu | grep -E "Model name|^CPU\(s\)|MHz|L3" | head -5
for s in $amx_specs; do
  # shellcheck disable=SC2046 # the spec's words are ENV=value assignments
  echo "exact [$s]: $(env $(envs "$s") "$dev/tests/kernels_exact" 2>&1 | grep -E "test result|FAILED|panicked|SKIP" | tr '\n' ' ')"
done
for r in $(seq "$rounds"); do
  for s in $amx_specs; do
    # shellcheck disable=SC2046
    env $(envs "$s") YINSEN_BENCH_THREADS=16 YINSEN_BENCH_KERNELS=amx "$dev/tests/kernels_bench" --ignored \
      --nocapture bench_threads 2>&1 | grep -E "layer" | sed "s/^/round $r [$s]: /"
    # shellcheck disable=SC2046
    env $(envs "$s") YINSEN_PROFILE=1 yinsen bench -m synthetic:2b4t --backend cpu --kernel amx \
      -p 512 -n 0 -r 4 -t 16 --no-bandwidth >"$out/pp.txt" 2>&1
    pp=$(grep -E "\| pp512" "$out/pp.txt" | tail -1 | awk -F'|' '{print $6 "|" $7}')
    prof=$(grep "profile cpu forward" "$out/pp.txt" | tail -1 | sed 's/profile cpu forward n=512: //')
    echo "round $r [$s] pp512 | $pp | $prof"
  done
  for s in $dec_specs; do
    # shellcheck disable=SC2046
    env $(envs "$s") YINSEN_PROFILE=1 yinsen bench -m synthetic:2b4t --backend cpu -p 0 -n 32 -r 3 -t "$(threads "$s")" \
      >"$out/tg.txt" 2>&1
    tg=$(grep -E "\| tg" "$out/tg.txt" | tail -1 | awk -F'|' '{print $6 "|" $7}')
    bw=$(grep -E "GB/s" "$out/tg.txt" | tail -1)
    prof=$(grep "profile cpu forward n=1" "$out/tg.txt" | tail -1 | sed 's/profile cpu forward n=1: //')
    echo "round $r [$s] tg32 | $tg | $bw | $prof"
  done
done
[ -n "$amx_specs" ] && yinsen bench -m synthetic:2b4t --backend cpu --kernel vnni -p 512 -n 0 -r 3 -t 16 --no-bandwidth 2>&1 | grep -E "\| pp512"
exit 0
