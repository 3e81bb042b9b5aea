#!/usr/bin/env bash
# Nsight Compute's per-line view of one CUDA kernel (where its warps stall),
# one device call:
#   here:    bash scripts/device-ncu-source.sh pack
#   device:  bash .device/device-ncu-source.sh remote [KERNEL_REGEX] [SKIP]   (run tool, carry [".device"])
# Profiles the launch after SKIP launches matching KERNEL_REGEX (default the
# persistent decode, `mega_f32`, at ctx 0) inside the decode-only bench, with
# PC sampling (SourceCounters) on code compiled with line information
# (YINSEN_NVRTC_LINEINFO), and leaves in $OUT: the report, the program
# source (src/yinsen.cu) and the source page as CSV per CUDA line and per
# SASS instruction (stall samples per line). NCU_SAMPLING=N sets the warp
# sampling interval (2^(5+N) cycles): 0 for short kernels (S13-3's source
# page of the 30 us top-k floor came back without sample columns).
# NCU_BENCH=prefill NCU_PROMPT=2048 runs the prefill bench instead (e.g. a
# GEMM: KERNEL_REGEX tern_wgmma_tma, SKIP 2 = layer 0's gate_up).
# YINSEN_CUDA_PROFILE_CTX=2048 puts the decode bench's first (un-graphed)
# launches at that position, so the default SKIP profiles a ctx-2048 launch.
set -u
. "$(dirname "$0")/pack-small.sh"
pack_or_run "${1:-}" remote "$0 pack | remote [KERNEL_REGEX] [SKIP]" scripts/device-ncu-source.sh
remote_env
k=${2:-mega_f32}
ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
src="$out/src"
mkdir -p "$src"
"$ncu" -k "regex:$k" -s "${3:-2}" -c 1 ${NCU_SAMPLING:+--warp-sampling-interval $NCU_SAMPLING} --section SourceCounters --section WarpStateStats --section SpeedOfLight \
  --import-source yes --source-folders "$src" -o "$out/prof" \
  env YINSEN_NVRTC_LINEINFO="$src" YINSEN_CUDA_BENCH="${NCU_BENCH:-decode}" yinsen bench -m synthetic:2b4t --backend cuda -p "${NCU_PROMPT:-0}" -n 0 -r 1 \
  >"$out/ncu.log" 2>&1
echo "profile rc $?"
tail -5 "$out/ncu.log"
for how in cuda sass; do
  "$ncu" -i "$out/prof.ncu-rep" --page source --csv --print-source "$how" >"$out/$how.csv" 2>&1
  echo "$how rc $? lines $(wc -l <"$out/$how.csv")"
  head -3 "$out/$how.csv" | cut -c1-400
done
"$ncu" -i "$out/prof.ncu-rep" --page details >"$out/details.txt" 2>&1
grep -E "Duration|Warp Cycles Per Issued|Issued Warp|No Eligible|Stall|Memory Throughput" "$out/details.txt" | head -30
ls -la "$out" "$src"
