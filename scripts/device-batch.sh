#!/usr/bin/env bash
# Batched decode across sequences on the device (one call): pack here, run there.
#   here:    scripts/device-batch.sh pack
#   device:  bash .device/device-batch.sh run [MODEL] [CLIENTS]   (run tool, carry [".device"])
# 1. `yinsen bench --backend cpu --batch 1,4,16` (every logit and greedy picks) on the
#    host's CPU;
# 2. `yinsen serve` on the CPU path, --batch 1 against --batch CLIENTS: CLIENTS
#    concurrent greedy completions of 64 tokens, timed (curl);
# 3. the same on CUDA (the trait's default: one sequence after another).
# Output in $OUT/batch.txt.
set -u
. "$(dirname "$0")/pack-small.sh"
pack_or_run "${1:-}" run "$0 pack | run [MODEL] [CLIENTS]" scripts/device-batch.sh
remote_env
model=${2:-synthetic:2b4t}
clients=${3:-16}
port=18081
clients_run() { # backend batch
  local log="$out/serve-$1-$2.log" pid t0 t1 n
  start_serve "$log" -m "$model" --backend "$1" --port "$port" --batch "$2" --max-queue 64
  pid=$serve_pid
  for rep in 1 2; do
    rm -f "$out"/c-*.json
    t0=$(date +%s%N)
    for i in $(seq "$clients"); do
      curl -s "http://127.0.0.1:$port/v1/completions" -o "$out/c-$i.json" \
        -d "{\"prompt\": \"Request $i: the quick brown fox\", \"max_tokens\": 64, \"temperature\": 0}" &
    done
    wait $(jobs -p | grep -v "^$pid$") 2>/dev/null
    t1=$(date +%s%N)
    n=$(cat "$out"/c-*.json | grep -o '"completion_tokens":[0-9]*' | cut -d: -f2 | awk '{s+=$1} END {print s}')
    echo "serve $1 --batch $2, $clients clients, rep $rep: $n tokens in $(((t1 - t0) / 1000000)) ms; $(curl -s "http://127.0.0.1:$port/health")"
  done
  kill "$pid"
  wait "$pid" 2>/dev/null
}
{
  timeout 300 yinsen bench -m "$model" --backend cpu -p 0 -n 16 --batch 1,4,16 -r 2 --no-bandwidth 2>&1 | grep -E "^\| |machine"
  clients_run cpu 1
  clients_run cpu "$clients"
  if nvidia-smi >/dev/null 2>&1; then
    clients_run cuda 1
    clients_run cuda "$clients"
  fi
} 2>&1 | tee "$out/batch.txt"
