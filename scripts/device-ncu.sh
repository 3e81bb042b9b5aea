#!/usr/bin/env bash
# Nsight Compute on the prefill GEMM (issue 4), one device call:
#   here:    scripts/device-ncu.sh pack
#   device:  bash .device/device-ncu.sh remote [KERNEL_REGEX] [SKIP] [COUNT]   (run tool, carry [".device"])
# Profiles COUNT launches of the kernels matching KERNEL_REGEX (default the
# 256-token TMA GEMM) after SKIP of them, inside the prefill-only bench
# (`YINSEN_CUDA_BENCH=prefill`: 512- then 2048-token forwards), with the
# speed-of-light, warp-state, scheduler and pipe sections and the wgmma pipe
# utilisation (NCU_EXTRA: more ncu arguments, e.g. "--section
# MemoryWorkloadAnalysis"). Report: $OUT/ncu.txt. NCU_BENCH=decode NCU_PROMPT=0 NCU_GEN=1
# profiles the decode-only bench instead (its un-graphed decode steps come
# first: the full head, the screened pick, the screened top-k).
set -u
. "$(dirname "$0")/pack-small.sh"
pack_or_run "${1:-}" remote "$0 pack | remote [KERNEL_REGEX] [SKIP] [COUNT]" scripts/device-ncu.sh
remote_env
k=${2:-tern_wgmma_tma_s4}
ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
"$ncu" -k "regex:$k" -s "${3:-200}" -c "${4:-3}" \
  --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis \
  --section LaunchStats --section Occupancy ${NCU_EXTRA:-} \
  --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio$,regex:sm__pipe_tensor.*pct_of_peak_sustained_active$,regex:sm__inst_executed_pipe_tensor.*sum$,smsp__cycles_active.avg" \
  env YINSEN_CUDA_BENCH=${NCU_BENCH:-prefill} yinsen bench -m synthetic:2b4t --backend cuda -p "${NCU_PROMPT:-2048}" -n "${NCU_GEN:-0}" -r 1 >"$out/ncu.txt" 2>&1
echo "rc $?"
grep -E "tern_|$k|stalled|pipe_tensor|Duration|gmma|Compute \(SM\) Throughput|Memory Throughput|Issued Warp|No Eligible|Stall|Warp Cycles Per|Registers|Grid Size|Block Size|Theoretical Occ|Achieved Occ|L2 Cache Throughput|DRAM Throughput|Executed Ipc|Sectors|Excessive|uncoalesced|Mem Busy|Max Bandwidth" "$out/ncu.txt" | head -160
