#!/usr/bin/env bash
# Batched decode across sequences on the device (one call): pack here, run there.
#   here:    scripts/device-batch.sh pack
#   device:  bash .device/device-batch.sh run [MODEL] [CLIENTS]   (run tool, carry [".device"])
# 1. `yinsen bench --backend cpu --batch 1,4,16` (every logit and greedy picks) on the
#    host's CPU;
# 2. `yinsen serve` on the CPU path, --batch 1 against --batch CLIENTS: CLIENTS
#    concurrent greedy completions of 64 tokens, timed (curl);
# 3. with a GPU: the batched-step test (`cuda_forward batched`, also under
#    compute-sanitizer memcheck), `yinsen bench --backend cuda --batch 1,4,16`,
#    and the serve runs of 2. on CUDA.
# SKIP_CPU=1 leaves out 1. and 2.'s CPU runs; CUDA_TESTS="" runs every
# `cuda_forward` test instead of the batched one. Output in $OUT/batch.txt.
set -u
. "$(dirname "$0")/pack-small.sh"
pack_or_run "${1:-}" run "$0 pack | run [MODEL] [CLIENTS]" scripts/device-batch.sh cuda_forward -- fixtures
remote_env
model=${2:-synthetic:2b4t}
clients=${3:-16}
port=18081
clients_run() { # backend batch (each temperature of $SERVE_TEMPS, default 0)
  local log="$out/serve-$1-$2.log" pid t0 t1 n
  start_serve "$log" -m "$model" --backend "$1" --port "$port" --batch "$2" --max-queue 64
  pid=$serve_pid
  for temp in ${SERVE_TEMPS:-0}; do
  for rep in 1 2; do
    rm -f "$out"/c-*.json
    t0=$(date +%s%N)
    for i in $(seq "$clients"); do
      curl -s "http://127.0.0.1:$port/v1/completions" -o "$out/c-$i.json" \
        -d "{\"prompt\": \"Request $i: the quick brown fox\", \"max_tokens\": 64, \"temperature\": $temp, \"seed\": $i}" &
    done
    wait $(jobs -p | grep -v "^$pid$") 2>/dev/null
    t1=$(date +%s%N)
    n=$(cat "$out"/c-*.json | grep -o '"completion_tokens":[0-9]*' | cut -d: -f2 | awk '{s+=$1} END {print s}')
    echo "serve $1 --batch $2, $clients clients, temperature $temp, rep $rep: $n tokens in $(((t1 - t0) / 1000000)) ms; $(curl -s "http://127.0.0.1:$port/health")"
  done
  done
  kill "$pid"
  wait "$pid" 2>/dev/null
}
{
  if [ "${SKIP_CPU:-0}" != 1 ]; then
    timeout 300 yinsen bench -m "$model" --backend cpu -p 0 -n 16 --batch 1,4,16 -r 2 --no-bandwidth 2>&1 | grep -E "^\| |machine"
    clients_run cpu 1
    clients_run cpu "$clients"
  fi
  if nvidia-smi >/dev/null 2>&1; then
    timeout 400 "$dev/tests/cuda_forward" --test-threads=1 ${CUDA_TESTS-batched} 2>&1 | grep -E "test |panicked|result"
    if command -v compute-sanitizer >/dev/null; then
      timeout 300 compute-sanitizer --tool memcheck --error-exitcode 9 "$dev/tests/cuda_forward" --test-threads=1 batched 2>&1 |
        grep -E "ERROR SUMMARY|test result"
    fi
    timeout 300 yinsen bench -m "$model" --backend cuda -p 0 -n 32 --batch 1,4,16 -r 3 --no-bandwidth 2>&1 | grep -E "^\| |machine"
    clients_run cuda 1
    clients_run cuda "$clients"
  fi
} 2>&1 | tee "$out/batch.txt"
