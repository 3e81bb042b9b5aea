#!/usr/bin/env bash
# Quick decode A/B on the device (one call): pack here, run there.
#   here:    scripts/device-quick.sh pack
#   device:  bash .device/device-quick.sh remote "23,7"   (run tool, carry [".device"])
# A baseline binary copied to .device/bin/yinsen-base (e.g. built from the
# previous commit) gets decode rows alternated with this build's: a
# same-call A/B of a kernel change. AB_FLAGS="23 55" alternates this build's
# rows over those persistent-kernel flag values too (YINSEN_CUDA_MEGA_FLAGS).
# Everything is also written to $OUT (ab.txt, bench.txt, tests.log), so a
# long output's tail loses nothing. MEMCHECK="cuda_forward top_k" runs that
# test binary and filter under compute-sanitizer memcheck; TG_AB=1 also
# alternates the engine's tg128 rows (every logit, greedy pick, top-40 pick)
# and `yinsen run`'s default sampling with the baseline's (tg.txt).
# AB_ENV="VAR=a VAR=b" alternates this build's decode rows (and the head's
# un-graphed kernel times) over environment settings (ab-env.txt); one
# setting of several variables joins them with '+' ("A=1+B=2").
# PREFILL_AB_ENV="VAR=a VAR=b" ("-": no setting) alternates the prefill rows (512, 2048) and
# their per-kernel profile over environment settings (prefill-ab.txt,
# PREFILL_AB_REPS rounds, default 3; PREFILL_AB_P the prompt lengths, default
# 512,2048; an item bin=NAME runs .device/bin/NAME instead, e.g. bin=yinsen-base);
# QUICK_SKIP_DECODE=1 then skips the decode rows and `yinsen run`.
# Runs the cuda_forward and cuda_kernels tests, then `yinsen bench`
# decode-only with the persistent kernel's variant flags A/B'd
# (YINSEN_CUDA_MEGA_AB) and traced, then `yinsen run` greedy with the token
# picked on the device vs through the host's logits.
set -u
. "$(dirname "$0")/pack-small.sh"
pack_or_run "${1:-}" remote "$0 pack | remote FLAGS [test-filter]" scripts/device-quick.sh cuda_forward cuda_kernels -- fixtures
remote_env
nvidia-smi --query-gpu=name --format=csv,noheader
"$dev/tests/cuda_forward" --test-threads=2 ${3:-} >"$out/tests.log" 2>&1
"$dev/tests/cuda_kernels" ${3:-} >>"$out/tests.log" 2>&1
grep -E "test result|FAILED|panicked|SKIP" "$out/tests.log" | head -20
if [ -n "${MEMCHECK:-}" ] && command -v compute-sanitizer >/dev/null; then
  read -r bin filter <<<"$MEMCHECK"
  compute-sanitizer --tool memcheck --error-exitcode 9 "$dev/tests/$bin" --test-threads=1 "$filter" 2>&1 |
    tail -4 | tee "$out/memcheck.txt"
fi
if [ -n "${PREFILL_AB_ENV:-}" ]; then
  for r in $(seq "${PREFILL_AB_REPS:-3}"); do
    for e in $PREFILL_AB_ENV; do
      bin=yinsen
      # "-" is no setting (a bare `env -` would empty the environment).
      case "$e" in bin=*) bin=${e#bin=} e=YINSEN_AB_BIN=$bin ;; -) e=YINSEN_AB=none ;; esac
      echo "prefill A/B env $e: $(env ${e//+/ } YINSEN_CUDA_BENCH=prefill "$bin" bench -m synthetic:2b4t --backend cuda -p "${PREFILL_AB_P:-512,2048}" -n 0 -r 3 2>&1 |
        grep -E '^\| prefill [0-9]+(: (norm_quant|attention|qkv|o|gate_up|down))? \|' | awk -F'|' '{printf "%s %s; ", $2, $3}')"
    done
  done | tee "$out/prefill-ab.txt"
  [ -n "${QUICK_SKIP_DECODE:-}" ] && exit 0
fi
if [ -n "${TG_AB:-}" ] && [ -x "$dev/bin/yinsen-base" ]; then
  tg() { "$1" bench -m synthetic:2b4t --backend cuda -p 0 -n 128 -r 3 2>&1 | grep -E '^\| .*tg128' | awk -F'|' '{printf "%s %s; ", $5, $6}'; }
  run() { "$1" run -m synthetic:2b4t --backend cuda -p "The quick brown fox jumps over the lazy dog" -n 256 2>&1 | grep -o "generated: [0-9.]* tok/s"; }
  for r in 1 2 3; do
    for b in yinsen yinsen-base; do echo "tg $b: $(YINSEN_CUDA_BENCH=decode tg $b)"; echo "run default sampling $b: $(run $b)"; done
  done | tee "$out/tg.txt"
fi
YINSEN_CUDA_BENCH=decode YINSEN_CUDA_MEGA_AB="$2" yinsen bench -m synthetic:2b4t --backend cuda -p 0 -n 1 -r 1 >"$out/bench.txt" 2>&1
grep -E "^flags|decode ctx|variant|persistent decode launch|tok/s" "$out/bench.txt"
rows() { YINSEN_CUDA_BENCH=decode "$@" bench -m synthetic:2b4t --backend cuda -p 0 -n 1 -r 1 2>&1 | grep -E '^\| decode ctx (0|2048) \||^persistent decode launch lm_head' | tr '\n' ' '; }
# AB_ENV="VAR=a VAR=b": this build's rows alternated over those settings.
if [ -n "${AB_ENV:-}" ]; then
  for r in 1 2; do
    for e in $AB_ENV; do echo "A/B env $e: $(env ${e//+/ } bash -c "$(declare -f rows); rows yinsen")"; done
  done | tee "$out/ab-env.txt"
fi
if [ -x "$dev/bin/yinsen-base" ] || [ -n "${AB_FLAGS:-}" ]; then
  for r in 1 2 3; do
    for f in ${AB_FLAGS:-default}; do
      if [ "$f" = default ]; then echo "A/B yinsen: $(rows yinsen)"; else echo "A/B yinsen flags $f: $(YINSEN_CUDA_MEGA_FLAGS=$f rows yinsen)"; fi
    done
    [ -x "$dev/bin/yinsen-base" ] && echo "A/B yinsen-base: $(rows yinsen-base)"
  done | tee "$out/ab.txt"
fi
# The engine's loop (`yinsen run`): greedy picked on the device vs greedy
# through the host's logits (a repetition penalty of 1.0001 needs them).
for r in 1 2; do
  for pen in 1 1.0001; do
    echo "run greedy, repeat penalty $pen: $(yinsen run -m synthetic:2b4t --backend cuda -p "The quick brown fox jumps over the lazy dog" -n 256 --temp 0 --repeat-penalty $pen 2>&1 | grep -o "[0-9]* generated: [0-9.]* tok/s")"
  done
  echo "run default sampling: $(yinsen run -m synthetic:2b4t --backend cuda -p "The quick brown fox jumps over the lazy dog" -n 256 2>&1 | grep -o "[0-9]* generated: [0-9.]* tok/s")"
done
