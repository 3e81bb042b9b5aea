#!/usr/bin/env bash
# Where NVRTC spills in a kernel: compiles the CUDA sources as the backend
# does (scripts/nvrtc-check.py, with -lineinfo), disassembles the kernel and
# prints, per source line, how many spill stores / refills (STL / LDL) it has.
#   NVRTC_LIB=.../libnvrtc.so.13 NVDISASM=.../nvdisasm [K=mega_f32] [YINSEN_NVRTC_DEFINES=...] \
#     scripts/nvrtc-spill-lines.sh
# Why: at 1024 threads the persistent decode has 64 registers; a value the
# compiler hoists out of the layer loop is live across the quantisation and
# spills there, far from the change that caused it (session 22).
set -eu
cd "$(dirname "$0")/.."
: "${NVRTC_LIB:?path to libnvrtc.so.13}" "${NVDISASM:?path to nvdisasm}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
NVRTC_EXTRA="-lineinfo" NVRTC_CUBIN="$tmp/k.cubin" LD_LIBRARY_PATH="$(dirname "$NVRTC_LIB")" \
  python3 scripts/nvrtc-check.py sm_90a "$NVRTC_LIB" >"$tmp/log" 2>&1 || { tail -20 "$tmp/log"; exit 1; }
grep -A1 "Function properties for ${K:-mega_f32}\$" "$tmp/log" | grep spill || true
"$NVDISASM" -g -c "$tmp/k.cubin" >"$tmp/sass"
awk -v k="${K:-mega_f32}" '$0 ~ "\\.text\\." k ":" {p=1; next} /^\t\.section|^\.section/ {if (p) exit} p' "$tmp/sass" |
  grep -E "line [0-9]+|STL|LDL" | grep -B1 -E "STL|LDL" | grep -oE "line [0-9]+" | awk '{print $2}' >"$tmp/lines"
python3 - "$tmp/lines" <<'PY'
import collections, os, re, sys
root = "crates/yinsen/src/backends/cuda/kernels"
order = re.findall(r'\("([\w.]+)", include_str!', open(os.path.join(root, "..", "nvrtc.rs")).read())
src = "".join(f"// ---- {n}\n{open(os.path.join(root, n)).read()}\n" for n in order).split("\n")
for ln, n in sorted(collections.Counter(int(x) for x in open(sys.argv[1]).read().split()).items()):
    k = ln - 1
    while not src[k].startswith("// ---- "):
        k -= 1
    print(f"{n} spill instr(s) at {src[k][8:]}:{ln - 1 - k}: {src[ln - 1].strip()[:80]}")
PY
