#!/usr/bin/env bash
# One device call per build-check-bench sequence (see the README's device section).
#
#   here:    scripts/device-check.sh pack     # release build, test executables, fixtures -> .device/ (stripped)
#   device:  bash scripts/device-check.sh remote [quick]   (run tool, carry [".device"])
#
# Remote runs, with logs under $OUT (or /tmp/yinsen-out):
#   1. `yinsen info`
#   2. every test executable with YINSEN_DEVICE=1 (GPU and AMX tests must run, not skip)
#   3. compute-sanitizer memcheck on the CUDA kernel tests and the tiny CUDA forward
#   4. benchmarks on synthetic:2b4t: CPU (vnni, amx) and CUDA, seed table (bench --paths), tune --quick
set -u
cmd=${1:-}
root=$(cd "$(dirname "$0")/.." && pwd)

if [ "$cmd" = pack ]; then
  set -e
  cd "$root"
  ../shared/tools/device-pack >/dev/null
  # Test binaries carry debug info (profile.release debug = 1): strip to fit the 64 MiB carry limit.
  # c_abi (needs cargo and cc) and tokenizer_fixtures (the 9 MB Llama-3 tokenizer) are CI-only.
  rm -f .device/tests/gguf_throughput-* .device/tests/kernels_bench-* .device/tests/c_abi-* \
    .device/tests/tokenizer_fixtures-* .device/bin/*.so
  strip .device/bin/* .device/tests/* 2>/dev/null || true
  # Over ~60 MB the carry limit (64 MiB) is near: the tests travel as a tarball, unpacked there.
  if [ "$(du -sm .device | cut -f1)" -gt 60 ]; then
    tar czf .device/tests.tgz -C .device tests && rm -rf .device/tests
  fi
  cp scripts/device-check.sh .device/
  du -sh .device
  exit 0
fi

[ "$cmd" = remote ] || { echo "usage: $0 pack|remote [quick]"; exit 2; }
dev="$root/.device"
out=${OUT:-/tmp/yinsen-out}
mkdir -p "$out"
export YINSEN_DEVICE=1 YINSEN_FIXTURES="$dev/fixtures" PATH="$dev/bin:$PATH" YINSEN_CUDA_CACHE=/tmp/yinsen-cuda-cache
status=0
log() { echo "== $*"; }
{
  log "date $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  lscpu | grep -E "Model name|^CPU\(s\)|Thread|Core" || true
  yinsen info
} 2>&1 | tee "$out/info.txt"

log tests
[ -f "$dev/tests.tgz" ] && [ ! -d "$dev/tests" ] && tar xzf "$dev/tests.tgz" -C "$dev"
echo "c_abi, tokenizer_fixtures: CI only (not packed)"
: >"$out/tests.log"
for t in "$dev"/tests/*; do
  name=$(basename "$t")
  # CPU-only tests the device adds nothing to, whose inputs do not fit the carry limit
  # (c_abi needs cargo and cc; tokenizer_fixtures needs the 9 MB Llama-3 tokenizer): CI runs them.
  case "$name" in c_abi-* | tokenizer_fixtures-*) echo "$name: not run here (CI)"; continue ;; esac
  echo "== $name" >>"$out/tests.log"
  if "$t" --test-threads=4 --nocapture >>"$out/tests.log" 2>&1; then r=ok; else r=FAILED; fi
  echo "$name: $r $(grep -c '^SKIP' "$out/tests.log" 2>/dev/null) skips so far"
done 2>&1 | tee "$out/tests.txt"
grep -q FAILED "$out/tests.txt" && { status=1; grep -B2 -A25 "panicked" "$out/tests.log" | head -80; }
grep "^SKIP" "$out/tests.log" | sort | uniq -c

if command -v compute-sanitizer >/dev/null; then
  # Kernel tests (GEMV/GEMM, flash attention), the tiny forward (prefill
  # through flash attention, decode through the persistent kernel) and the
  # persistent multi-token step, the prefill flash kernel over hi/lo K/V, and
  # the decode step's top-k and screened greedy pick on the device, and the
  # batched step across sequences.
  # MEMCHECK="bin filter,bin filter" runs those instead (a shorter call).
  runs=${MEMCHECK:-cuda_kernels matmul_exact,cuda_kernels flash_attention,cuda_kernels flash_tcx,cuda_forward tiny_matches_cpu_backend,cuda_forward mega_multi,cuda_forward top_k,cuda_forward screened,cuda_forward batched}
  IFS=, read -ra runs <<<"$runs"
  for run in "${runs[@]}"; do
    read -r bin filter <<<"$run"
    t=$(ls "$dev"/tests/"$bin"-* | head -1)
    log "memcheck $bin $filter"
    compute-sanitizer --tool memcheck --error-exitcode 9 "$t" --test-threads=1 "$filter" 2>&1 | tail -4
  done 2>&1 | tee "$out/memcheck.txt"
  [ "$(grep -c "ERROR SUMMARY: 0 errors" "$out/memcheck.txt")" -ge "${#runs[@]}" ] || status=1
fi

if [ "${2:-}" != quick ]; then
  m=synthetic:2b4t
  log "bench cpu" | tee "$out/bench.txt"
  for k in vnni amx; do
    yinsen bench -m $m --backend cpu --kernel $k -p 16,64,512 -n 32 -r 2 -t 16 2>&1 | tee -a "$out/bench.txt"
  done
  yinsen bench -m $m --backend cpu --kernel vnni -p 0 -n 32 -r 2 -t 16 --lm-head q8 2>&1 | tee -a "$out/bench.txt"
  log "bench cuda" | tee -a "$out/bench.txt"
  yinsen bench -m $m --backend cuda -p 512 -n 128 -r 2 2>&1 | tee -a "$out/bench.txt"
  log "tune" | tee -a "$out/bench.txt"
  yinsen tune --quick --out "$out/tune" 2>&1 | tail -30 | tee -a "$out/bench.txt"
  log "seed table, default rules" | tee -a "$out/bench.txt"
  yinsen bench --paths -m $m --profile off 2>&1 | tee -a "$out/bench.txt"
  log "tune 2b4t (profile for the hybrid)" | tee -a "$out/bench.txt"
  yinsen tune -m $m -r 1 --max-call-s 1.5 --out "$out/tune2b4t" 2>&1 | tail -40 | tee -a "$out/bench.txt"
  log "seed table, measured profile" | tee -a "$out/bench.txt"
  yinsen bench --paths -m $m --profile "$out/tune2b4t/profile.json" 2>&1 | tee -a "$out/bench.txt"
  log "concurrent" | tee -a "$out/bench.txt"
  yinsen bench --concurrent -m $m 2>&1 | tail -20 | tee -a "$out/bench.txt"
fi
log "exit $status"
exit $status
