#!/usr/bin/env bash
# Where a CPU decode token goes on the device host: YINSEN_PROFILE phase
# times (ms per token, mean over the timed tokens) and the GB/s each matmul
# streams, per (model, kernel, threads, head) row.
#
#   here:   bash scripts/device-cpu-decode.sh pack
#   device: bash .device/device-cpu-decode.sh remote [ROWS...]   (run tool, carry [".device"])
#
# A row is MODEL:KERNEL:THREADS:HEAD[:VAR=VALUE,...], e.g. 2b4t:vnni3:16:native
# or 2b4t:vnni3:16:native:YINSEN_DECODE_PREFETCH_KB=0 (the default
# list covers the 2B4T shape with both one-token kernels, fewer threads, and
# the smaller synthetic models whose weights fit the host's L3).
set -u
. "$(dirname "$0")/pack-small.sh"
pack_or_run "${1:-}" remote "$0 pack | remote [MODEL:KERNEL:THREADS:HEAD[:VAR=VALUE,...] ...]" scripts/device-cpu-decode.sh
shift
remote_env
rows=("$@")
[ ${#rows[@]} -gt 0 ] || rows=(2b4t:vnni3:16:native 2b4t:vnni:16:native 2b4t:vnni3:12:native 2b4t:vnni3:8:native
  2b4t:vnni3:16:q8 700m:vnni3:16:native 125m:vnni3:16:q8)
{ date -u; lscpu | grep -E "Model name|^CPU\(s\)|Thread|MHz|L2|L3"; } 2>&1
for row in "${rows[@]}"; do
  IFS=: read -r model kernel threads head vars <<<"$row"
  envs=()
  [ -n "${vars:-}" ] && IFS=, read -r -a envs <<<"$vars"
  # Weight bytes per token of each matmul come from the model shape (base-3:
  # 5 codes per byte; 2-bit: 4), printed by the awk below as GB/s.
  env ${envs[@]+"${envs[@]}"} YINSEN_PROFILE=1 yinsen bench -m "synthetic:$model" -p 0 -n 32 -r 1 --backend cpu --kernel "$kernel" \
    --lm-head "$head" -t "$threads" 2>&1 |
    awk -v row="$row" '
      /^profile cpu forward n=1:/ {
        n++; if (n <= 4) next   # warm-up tokens
        sub(/^.*ms: /, "")
        k = split($0, parts, ", ")
        for (i = 1; i <= k; i++) { split(parts[i], kv, " "); t[kv[1]] += kv[2]; if (!(kv[1] in seen)) { seen[kv[1]] = 1; order[++m] = kv[1] } }
        c++
      }
      /\| tg/ { tg = $0 }
      /GB\/s/ { gb = $0 }
      END {
        s = row ":"; tot = 0
        for (i = 1; i <= m; i++) { s = s sprintf(" %s %.3f", order[i], t[order[i]] / c); tot += t[order[i]] / c }
        printf "%s | total %.2f ms (%d tokens)\n  %s\n  %s\n", s, tot, c, tg, gb
      }'
done
