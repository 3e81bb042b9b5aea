#!/usr/bin/env python3
"""Compile the embedded CUDA kernels with NVRTC on a machine without a GPU.

    python3 scripts/nvrtc-check.py [arch] [libnvrtc.so path]

Catches syntax and register/ptxas errors before a device run. NVRTC comes
from the PyPI wheel `nvidia-cuda-nvrtc` (unzip it; point at lib/libnvrtc.so.13,
with that lib folder on LD_LIBRARY_PATH for its builtins). Take 13.0.* to see
what the device compiles: its register allocation differs from 13.5's (the
persistent decode spills 32-36 bytes with 13.0, none with 13.5).
Prints the compile log and, via -Xptxas -v, registers/smem per kernel.
$YINSEN_NVRTC_DEFINES="NAME=VALUE ..." passes macros as the backend does
(spaces or commas between them). NVRTC_CUBIN=FILE writes the cubin, for
`cuobjdump -sass FILE` (PyPI wheels nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm).
"""
import ctypes, os, sys

arch = sys.argv[1] if len(sys.argv) > 1 else "sm_90a"
lib = sys.argv[2] if len(sys.argv) > 2 else os.environ.get("NVRTC_LIB", "/tmp/nvrtc/x/nvidia/cu13/lib/libnvrtc.so.13")
root = os.path.join(os.path.dirname(__file__), "..", "crates", "yinsen", "src", "backends", "cuda", "kernels")
# The sources in the order nvrtc.rs concatenates them.
import re
rs = open(os.path.join(root, "..", "nvrtc.rs")).read()
order = re.findall(r'\("([\w.]+)", include_str!', rs)
src = "".join(f"// ---- {n}\n{open(os.path.join(root, n)).read()}\n" for n in order)
n = ctypes.CDLL(lib)
prog = ctypes.c_void_p()
assert n.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"yinsen.cu", 0, None, None) == 0
opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17", b"-default-device", b"-Xptxas", b"-v"]
opts += [f"-D{d}".encode() for d in os.environ.get("YINSEN_NVRTC_DEFINES", "").replace(",", " ").split()]
# NVRTC_EXTRA="OPT ...": more compiler options (studies only; the backend passes none).
opts += [o.encode() for o in os.environ.get("NVRTC_EXTRA", "").split()]
arr = (ctypes.c_char_p * len(opts))(*opts)
r = n.nvrtcCompileProgram(prog, len(opts), arr)
size = ctypes.c_size_t()
n.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
log = ctypes.create_string_buffer(size.value)
n.nvrtcGetProgramLog(prog, log)
print(log.value.decode(errors="replace"))
print("nvrtc result", r)
if r == 0 and os.environ.get("NVRTC_CUBIN"):
    size = ctypes.c_size_t()
    n.nvrtcGetCUBINSize(prog, ctypes.byref(size))
    cubin = ctypes.create_string_buffer(size.value)
    n.nvrtcGetCUBIN(prog, cubin)
    open(os.environ["NVRTC_CUBIN"], "wb").write(cubin.raw)
sys.exit(1 if r else 0)
