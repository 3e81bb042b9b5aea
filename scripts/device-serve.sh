#!/usr/bin/env bash
# `yinsen serve` on the device's GPU (one call): pack here, run there.
#   here:    scripts/device-serve.sh pack
#   device:  bash .device/device-serve.sh run [MODEL] [BACKEND]   (run tool, carry [".device"])
# Starts the server (default synthetic:2b4t on cuda), waits for it to listen,
# then over HTTP (curl): /health, a greedy completion of 256 tokens (timed,
# with the server's usage counts), the same streamed, a streamed chat reply,
# and two bad requests; then stops it. Output in $OUT/serve.txt.
set -u
. "$(dirname "$0")/pack-small.sh"
pack_or_run "${1:-}" run "$0 pack | run [MODEL] [BACKEND]" scripts/device-serve.sh
remote_env
model=${2:-synthetic:2b4t}
backend=${3:-cuda}
port=18080
log="$out/serve.log"
start_serve "$log" -m "$model" --backend "$backend" --port "$port"
pid=$serve_pid
url="http://127.0.0.1:$port"
{
  head -3 "$log"
  echo "health: $(curl -s "$url/health")"
  for r in 1 2 3; do
    t0=$(date +%s%N)
    body=$(curl -s "$url/v1/completions" -d '{"prompt": "The quick brown fox jumps over the lazy dog", "max_tokens": 256, "temperature": 0}')
    t1=$(date +%s%N)
    echo "completion $r: $(echo "$body" | grep -o '"usage":{[^}]*}') finish $(echo "$body" | grep -o '"finish_reason":"[a-z]*"') in $(((t1 - t0) / 1000000)) ms"
  done
  t0=$(date +%s%N)
  n=$(curl -sN "$url/v1/completions" -d '{"prompt": "The quick brown fox jumps over the lazy dog", "max_tokens": 256, "temperature": 0, "stream": true}' | grep -c '^data: ')
  t1=$(date +%s%N)
  echo "streamed completion: $n events in $(((t1 - t0) / 1000000)) ms"
  echo "streamed chat, last events: $(curl -sN "$url/v1/chat/completions" -d '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32, "temperature": 0.8, "stream": true}' | grep '^data: ' | tail -2 | tr '\n' ' ')"
  echo "bad json: $(curl -s -w ' %{http_code}' "$url/v1/completions" -d '{"prompt":')"
  echo "bad token: $(curl -s -w ' %{http_code}' "$url/v1/completions" -d '{"prompt":[999999999]}')"
} 2>&1 | tee "$out/serve.txt"
kill "$pid"
wait "$pid" 2>/dev/null
tail -3 "$log"
