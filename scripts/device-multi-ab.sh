#!/usr/bin/env bash
# The persistent multi-token kernel (2-16 tokens, batched steps) A/B on the
# device in one call, as session 28 ran it (S28-3, S28-5):
#   1. `yinsen logits` of a 16- and an 11-token call (both through the
#      multi-token kernel) per setting, as md5s: kernel changes that keep the
#      int32 sums and the float order must give the same bits everywhere;
#   2. the multi-token tests (`cuda_forward mega_multi batched`, or the
#      filter given; "all" runs every test) with this build's defaults;
#   3. per setting, alternated ROUNDS times (default 2): the batch-16 step
#      (`YINSEN_CUDA_BENCH=batch-head`) and the 16-token steps after 0-1024
#      keys with the per-layer trace's scales / quantisation / dot rows
#      (`YINSEN_CUDA_BENCH=step`); BATCH=1 adds the batched steps'
#      persistent / per-kernel sweep over contexts (`YINSEN_CUDA_BENCH=batch`).
# A setting is environment assignments joined by '+' (e.g.
# "YINSEN_NVRTC_DEFINES=MM_THREADS=1024", the launch follows it), "-"
# for none, or "base": .device/bin/yinsen-base.
#   here:    scripts/device-multi-ab.sh pack [BASE_REV]
#            (BASE_REV: a git revision built as .device/bin/yinsen-base, in a
#            worktree under /tmp; several minutes on 2 cores)
#   device:  bash .device/device-multi-ab.sh remote "base -" [test-filter]
#            (run tool, carry [".device"])
# Output also in $OUT: md5.txt, tests.log, ab.txt, batch-*.txt.
set -u
if [ "${1:-}" = pack ] && [ -n "${2:-}" ]; then
  rev=$2
  root=$(cd "$(dirname "$0")/.." && pwd)
  "$0" pack || exit 1
  wt=/tmp/yinsen-base-src
  git -C "$root" worktree remove --force "$wt" 2>/dev/null
  git -C "$root" worktree add --detach "$wt" "$rev" >/dev/null || exit 1
  (cd "$wt" && CARGO_TARGET_DIR=/tmp/yinsen-base-target cargo build --release -q -p yinsen-cli) || exit 1
  cp /tmp/yinsen-base-target/release/yinsen "$root/.device/bin/yinsen-base"
  strip "$root/.device/bin/yinsen-base"
  git -C "$root" worktree remove --force "$wt"
  echo "yinsen-base: $(git -C "$root" rev-parse --short "$rev")"
  exit 0
fi
. "$(dirname "$0")/pack-small.sh"
pack_or_run "${1:-}" remote "$0 pack [BASE_REV] | remote SETTINGS [test-filter]" scripts/device-multi-ab.sh cuda_forward -- fixtures
remote_env
settings=${2:-"-"}
nvidia-smi --query-gpu=name --format=csv,noheader
# `with SETTING CMD...`: CMD with the setting's environment (or the base binary).
with() {
  local s=$1 bin=yinsen
  shift
  case "$s" in
    base) bin=yinsen-base s=YINSEN_AB=base ;;
    -) s=YINSEN_AB=none ;;
  esac
  env ${s//+/ } "$bin" "$@"
}
for s in $settings; do
  for n in 16 11; do
    with "$s" logits -m synthetic:2b4t --backend cuda --tokens "$(seq -s, 7 $((6 + n)))" --out "$out/l.npy" >/dev/null 2>&1
    echo "logits $n tokens [$s]: $(md5sum <"$out/l.npy" | cut -c1-12)"
  done
done | tee "$out/md5.txt"
filter=${3:-"mega_multi batched"}
[ "$filter" = all ] && filter=""
"$dev/tests/cuda_forward" --test-threads=2 $filter >"$out/tests.log" 2>&1
grep -E "test result|FAILED|panicked" "$out/tests.log" | head -20
for r in $(seq "${ROUNDS:-2}"); do
  for s in $settings; do
    b16=$(YINSEN_CUDA_BENCH=batch-head with "$s" bench -m synthetic:2b4t --backend cuda -p 0 -n 1 -r 3 2>&1 |
      grep -E '^\| batch-16 decode step \|' | awk -F'|' '{print $3}' | tr -s ' ')
    YINSEN_CUDA_BENCH=step with "$s" bench -m synthetic:2b4t --backend cuda -p 0 -n 1 -r 1 >"$out/step.txt" 2>&1
    steps=$(grep -E '^step 16 tokens ctx (0|256|512|1024):' "$out/step.txt" | sed 's/step 16 tokens //' | tr '\n' ';' | tr -s ' ')
    trace=$(grep -E "trace 16 tokens ctx 0: .*(per layer|scales|dot)" "$out/step.txt" | sed 's/trace 16 tokens ctx 0://' | tr '\n' ';' | tr -s ' ')
    echo "[$s] batch-16 step$b16; 16 tokens: $steps trace:$trace"
  done
done | tee "$out/ab.txt"
if [ -n "${BATCH:-}" ]; then
  for s in $settings; do
    YINSEN_CUDA_BENCH=batch with "$s" bench -m synthetic:2b4t --backend cuda -p 0 -n 1 -r 1 2>&1 |
      grep -E '^batch +[0-9]+ sequences ctx [0-9]+: persistent' | tee "$out/batch-${s//[^A-Za-z0-9]/_}.txt"
  done
fi
