#!/usr/bin/env bash
# Persistent-decode A/B on the device in one call: the CUDA forward tests,
# then decode rows (ctx 0 / 2048) of this build over settings, alternated
# ROUNDS times (default 3), then one per-phase trace per setting.
# A setting is environment assignments joined by '+'
# ("YINSEN_CUDA_MEGA_FLAGS=215+YINSEN_CUDA_MEGA_VBYTES=32"), "-" for none,
# or "base": .device/bin/yinsen-base (a baseline binary copied there).
#   here:    scripts/device-mega-ab.sh pack   (then copy a baseline to .device/bin/yinsen-base)
#   device:  bash .device/device-mega-ab.sh remote "- base YINSEN_CUDA_MEGA_FLAGS=87" [test-filter]
#            (run tool, carry [".device"]); SKIP_TESTS=1 skips the tests, PHASES=0
#            the traces.
# Output also in $OUT: tests.log, ab.txt, phases.txt.
set -u
. "$(dirname "$0")/pack-small.sh"
pack_or_run "${1:-}" remote "$0 pack | remote SETTINGS [test-filter]" scripts/device-mega-ab.sh cuda_forward -- fixtures
remote_env
nvidia-smi --query-gpu=name --format=csv,noheader
if [ -z "${SKIP_TESTS:-}" ]; then
  "$dev/tests/cuda_forward" --test-threads=2 ${3:-} >"$out/tests.log" 2>&1
  grep -E "test result|FAILED|panicked" "$out/tests.log" | head -20
fi
# run SETTING ARGS...: yinsen (or yinsen-base) with the setting's environment.
run() {
  local s=$1 bin=yinsen
  shift
  case "$s" in base) bin=yinsen-base s=- ;; esac
  [ "$s" = - ] && s=
  env ${s//+/ } YINSEN_CUDA_BENCH=decode "$bin" bench -m synthetic:2b4t --backend cuda -p 0 -n 1 -r 1 "$@" 2>&1
}
for r in $(seq "${ROUNDS:-3}"); do
  for s in $2; do
    echo "$s: $(run "$s" | grep -E '^\| decode ctx (0|2048) \|' | awk -F'|' '{printf "%s %s;", $2, $3}')"
  done
done | tee "$out/ab.txt"
if [ "${PHASES:-1}" = 1 ]; then
  for s in $2; do
    echo "$s:"
    run "$s" | grep -E '^\| persistent ctx (0|2048):|attention (inner|merge)|^\| decode ctx (0|2048) \|'
  done | tee "$out/phases.txt"
fi
