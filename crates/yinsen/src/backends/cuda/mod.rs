//! The CUDA backend. CUDA is loaded at run time (cudarc "dynamic-loading"),
//! so one `yinsen` binary runs on machines with and without a GPU: every
//! entry point probes for libcuda / libnvrtc first and turns their absence
//! into an error instead of cudarc's panic.
//!
//! - `nvrtc`: kernels (`kernels/*.cu`, embedded) compiled to CUBIN for the
//!   device's arch at first use, cached on disk.
//! - `layout`: the GPU weight layout derived from the canonical form.
//! - `forward`: [`CudaBackend`], the model forward pass and KV cache.
//! - `bench`: timings for `yinsen bench --backend cuda`.

pub mod bench;
pub mod forward;
pub mod layout;
pub mod nvrtc;

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, OnceLock};

use cudarc::driver::{result, sys, CudaContext};

use crate::error::{Error, Result};
use crate::model::TernaryMatrix;

pub use forward::{
    flash_tc_smem, flash_tcx, flash_tcx_prec, flash_tcx_scap, CudaBackend, CudaCache, FlashMode, KvDtype, TcxKernel,
    TcxPrec, FLASH_TC_THREADS, NQ_GROUPS, TCX_MIN_NT, TCX_VARIANTS,
};
pub use layout::GpuLayout;

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DeviceInfo {
    pub name: String,
    pub mem_bytes: usize,
    pub sm: (i32, i32),
    /// Streaming multiprocessors.
    pub sms: i32,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum CudaStatus {
    Available { devices: Vec<DeviceInfo> },
    Unavailable(String),
}

fn berr(msg: impl Into<String>) -> Error {
    Error::backend("cuda", msg)
}

fn drv<T>(r: std::result::Result<T, result::DriverError>, what: &str) -> Result<T> {
    r.map_err(|e| berr(format!("{what}: {e:?}")))
}

/// Directories tried (before the loader's default search) for the CUDA
/// libraries: `$YINSEN_CUDA_LIB_DIR`, `$CUDA_HOME/lib64`, `$CUDA_PATH/lib64`.
fn extra_lib_dirs() -> Vec<std::path::PathBuf> {
    let mut v = Vec::new();
    if let Some(d) = std::env::var_os("YINSEN_CUDA_LIB_DIR") {
        v.push(d.into());
    }
    for k in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(d) = std::env::var_os(k) {
            v.push(std::path::PathBuf::from(d).join("lib64"));
        }
    }
    v
}

/// Pre-load libraries found in the extra directories. The dynamic loader
/// matches later loads by soname, so cudarc's bare-name dlopen finds them.
fn preload_from_dirs() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        for dir in extra_lib_dirs() {
            for name in [
                "libnvrtc.so.13",
                "libnvrtc.so.12",
                "libnvrtc.so",
                "libcuda.so.1",
                "libcuda.so",
            ] {
                let p = dir.join(name);
                if p.exists() {
                    // SAFETY: loading a system library; its initialisers are the vendor's.
                    if let Ok(lib) = unsafe { libloading::Library::new(&p) } {
                        std::mem::forget(lib); // keep it loaded for the process
                    }
                }
            }
        }
    });
}

/// Ok when NVRTC can be loaded (enough to compile kernels, no GPU needed).
pub fn nvrtc_available() -> Result<()> {
    preload_from_dirs();
    // SAFETY: only tries dlopen on candidate names.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(berr(
            "no CUDA device: libnvrtc not found (install the CUDA toolkit or set CUDA_HOME)",
        ))
    }
}

/// Ok when the driver and NVRTC libraries can both be loaded.
pub fn load_libs() -> Result<()> {
    preload_from_dirs();
    // SAFETY: only tries dlopen on candidate names.
    if !unsafe { sys::is_culib_present() } {
        return Err(berr("no CUDA device: libcuda.so not found (no NVIDIA driver)"));
    }
    nvrtc_available()
}

/// What `yinsen info` shows: the devices, or why there are none.
pub fn probe() -> CudaStatus {
    match probe_inner() {
        Ok(devices) if devices.is_empty() => CudaStatus::Unavailable("no CUDA device: driver reports 0 devices".into()),
        Ok(devices) => CudaStatus::Available { devices },
        Err(e) => CudaStatus::Unavailable(e.to_string()),
    }
}

fn probe_inner() -> Result<Vec<DeviceInfo>> {
    load_libs()?;
    drv(result::init(), "no CUDA device: cuInit")?;
    let n = drv(result::device::get_count(), "cuDeviceGetCount")?;
    (0..n)
        .map(|i| {
            let d = drv(result::device::get(i), "cuDeviceGet")?;
            let name = drv(result::device::get_name(d), "cuDeviceGetName")?;
            let mem_bytes = drv(unsafe { result::device::total_mem(d) }, "cuDeviceTotalMem")?;
            let attr = |a| drv(unsafe { result::device::get_attribute(d, a) }, "cuDeviceGetAttribute");
            use sys::CUdevice_attribute_enum as A;
            let sm = (
                attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
                attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
            );
            let sms = attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
            Ok(DeviceInfo {
                name,
                mem_bytes,
                sm,
                sms,
            })
        })
        .collect()
}

/// Dynamic shared memory of the streamed 8-bit head passes
/// (`lm_head_screen_q8_tma`, `lm_head_dec_q8_tma`) at `ring` stages of 8
/// rows, in decode.cu's layout: the 2 x ring mbarriers padded to 128 bytes,
/// the stages (codes, block scales, two bound floats a row), then the normed
/// x (f32), its codes and their block scales.
pub fn head_tma_smem(hidden: usize, ring: usize) -> usize {
    (16 * ring).div_ceil(128) * 128 + ring * (8 * hidden + hidden / 2 + 64) + 4 * hidden + hidden + 4 * (hidden / 32)
}

/// NVRTC target for a compute capability: the arch-specific `a` variant on
/// Hopper/Blackwell (sm_90a), plain `sm_XY` elsewhere.
pub fn arch_for(sm: (i32, i32)) -> String {
    if sm.0 >= 9 {
        format!("sm_{}{}a", sm.0, sm.1)
    } else {
        format!("sm_{}{}", sm.0, sm.1)
    }
}

/// One device: context, a private stream, and the loaded kernels.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: sys::CUstream,
    module: sys::CUmodule,
    funcs: HashMap<&'static str, sys::CUfunction>,
    pub info: DeviceInfo,
    pub arch: String,
    /// Whether the kernels came from the disk cache.
    pub from_cache: bool,
    /// Per-launch timing (bench profile mode): the tag of the next launches
    /// and, while on, (tag, start, stop) events per launch.
    prof: std::sync::Mutex<Profile>,
    /// Split-K scratch of the tensor-core GEMM (see `splitk_finish` in
    /// ternary.cu): int32 sums [token][row] and per-tile arrival counters,
    /// zero between launches. 0 where there is no tensor-core GEMM.
    splitk_sum: sys::CUdeviceptr,
    splitk_cnt: sys::CUdeviceptr,
    /// The TMA GEMM's tail split (`TwTail` in ternary.cu): the pieces' int32
    /// sums, room for one 128 x 256 tile per SM (0: no TMA GEMM here), and
    /// the SMs it plans for: 0 off, else that many (at most the device's;
    /// `YINSEN_CUDA_TAIL_SPLIT=0` turns it off, tests plan for fewer SMs to
    /// reach it with small shapes). Its counters are `splitk_cnt`'s.
    tail_ws: sys::CUdeviceptr,
    tail_sms: std::sync::atomic::AtomicUsize,
}

/// Split-K scratch capacity: int32 sums (16 tokens x 64 Ki rows) and tile counters.
const SPLITK_SUM_INTS: usize = 16 << 16;
const SPLITK_TILES: usize = 8192;
/// Int32 sums of one TMA GEMM tile (128 rows x 256 tokens at most).
const TAIL_TILE_INTS: usize = 128 * TILED_TOKENS;

#[derive(Default)]
struct Profile {
    tag: &'static str,
    on: bool,
    events: Vec<(&'static str, sys::CUevent, sys::CUevent)>,
}

// SAFETY: the raw handles are used only with the context bound (`bind`), and
// the backend serialises all work on the stream behind a Mutex.
unsafe impl Send for Gpu {}
unsafe impl Sync for Gpu {}

/// Every kernel the host launches (looked up at load; the NVRTC test checks them).
pub const KERNELS: [&str; 121] = [
    "tern_gemv_t1",
    "tern_gemv_t2",
    "tern_gemv_t4",
    "tern_gemv_t8",
    "tern_gemv_t16",
    "tern_mma_32x16",
    "tern_mma_64x16",
    "tern_mma_128x16",
    "tern_mma_64x32",
    "tern_mma_64x64",
    "tern_mma_128x128",
    "tern_mma_256x64",
    "tern_mma_256x128",
    "tern_wgmma_tma_s4",
    "tern_wgmma_tma_s4_add",
    "tern_wgmma_tma_s4_gated",
    "tern_wgmma_tma_s4_rope",
    "tern_wgmma_tma_s6",
    "tern_wgmma_tma_s6_add",
    "tern_wgmma_tma_s6_gated",
    "tern_wgmma_tma_s6_rope",
    "tern_wgmma_tma_n128",
    "tern_wgmma_tma_n128_add",
    "tern_wgmma_tma_n128_gated",
    "tern_wgmma_tma_n128_rope",
    "row_sums_i8",
    "embed_f16",
    "fdiv_check",
    "norm_quant",
    "norm_quant_w1",
    "norm_quant_w2",
    "norm_quant_w4r5",
    "norm_quant_w4",
    "norm_quant_w8r3",
    "norm_quant_w8r7",
    "norm_quant_w8",
    "norm_quant_w16r2",
    "norm_quant_w16",
    "rope_kv_f16",
    "rope_kv_f32",
    "attn_partial_f16",
    "attn_partial_f32",
    "rope_kv_batch_f16",
    "rope_kv_batch_f32",
    "attn_partial_batch_f16",
    "attn_partial_batch_f32",
    "lm_head_f16",
    "lm_head_f16_rows",
    "argmax_f32",
    "decode_advance",
    "topk_logits",
    "dec_mm_l8_f16",
    "dec_mm_l8_f32",
    "dec_mm_l16_f16",
    "dec_mm_l16_f32",
    "lm_head_dec",
    "lm_head_dec_q8",
    "lm_head_screen_q8",
    "lm_head_screen_q8_tma",
    "lm_head_dec_q8_tma",
    "lm_head_pick_f16",
    "lm_head_topk_floor",
    "lm_head_topk_f16",
    "lm_head_screen_prep",
    "lm_head_screen_q8_batch",
    "lm_head_screen_q8_mma_cp",
    "lm_head_pick_f16_batch",
    "lm_head_topk_floor_batch",
    "lm_head_topk_f16_batch",
    "mega_begin",
    "mega_f16",
    "mega_f32",
    "mega_multi_begin",
    "mega_multi_f16",
    "mega_multi_f32",
    "flash_attn_d128_f16",
    "flash_attn_d128_f32",
    "flash_attn_d256_f16",
    "flash_attn_d256_f32",
    "flash_tc_d128_f16",
    "flash_tc_d128_f32",
    "flash_tc_d256_f16",
    "flash_tc_d256_f32",
    "flash_tc16_d128_f16",
    "flash_tc16_d128_f32",
    "flash_tc16_d256_f16",
    "flash_tc16_d256_f32",
    "flash_tc_merge",
    "flash_tcs_d128_f32",
    "flash_tcx_merge",
    "kv_split_f32",
    "flash_tcx_d128_h1",
    "flash_tcx_d128_h2",
    "flash_tcx_d128_h4",
    "flash_tcx_d128_w4",
    "flash_tcx_d64_h1",
    "flash_tcx_d64_h2",
    "flash_tcx_d64_h4",
    "flash_tcx_d64_w4",
    "kv_half_f32",
    "flash_tcx16_d128_h1",
    "flash_tcx16_d128_h2",
    "flash_tcx16_d128_h4",
    "flash_tcx16_d128_w4",
    "flash_tcx16_d64_h1",
    "flash_tcx16_d64_h2",
    "flash_tcx16_d64_h4",
    "flash_tcx16_d64_w4",
    "flash_tcxv_d128_h1",
    "flash_tcxv_d128_h2",
    "flash_tcxv_d128_h4",
    "flash_tcxv_d128_w4",
    "flash_tcxv_d64_h1",
    "flash_tcxv_d64_h2",
    "flash_tcxv_d64_h4",
    "flash_tcxv_d64_w4",
    "kv_tile_f32",
    "flash_wg_d128",
    "flash_wg_d64",
    "flash_wg3_d128",
    "flash_wg3_d64",
];

/// How a kernel is launched: plainly, with PDL, or cooperatively.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launch {
    Plain,
    Pdl,
    Cooperative,
    /// Cooperative, and with PDL: it may launch while its predecessor runs.
    CooperativePdl,
}

/// A kernel argument, passed by value.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    P(sys::CUdeviceptr),
    I(i32),
    F(f32),
}

impl Gpu {
    pub fn new(device: usize) -> Result<Arc<Self>> {
        // Settings first: nothing is allocated yet when they are refused.
        let tail_on = match std::env::var("YINSEN_CUDA_TAIL_SPLIT").as_deref() {
            Err(_) | Ok("" | "1") => true,
            Ok("0") => false,
            Ok(v) => return Err(Error::input(format!("YINSEN_CUDA_TAIL_SPLIT={v}: expected 0 or 1"))),
        };
        load_libs()?;
        drv(result::init(), "no CUDA device: cuInit")?;
        let n = drv(result::device::get_count(), "cuDeviceGetCount")?;
        if device >= n.max(0) as usize {
            return Err(berr(format!("no CUDA device {device} ({n} present)")));
        }
        let ctx = drv(CudaContext::new(device), "creating context")?;
        let info = probe_inner()?.swap_remove(device);
        let arch = arch_for(info.sm);
        let stream = drv(
            result::stream::create(result::stream::StreamKind::NonBlocking),
            "cuStreamCreate",
        )?;
        let (module, from_cache) = load_module(&arch)?;
        let mut funcs = HashMap::new();
        for name in KERNELS {
            let c = CString::new(name).expect("kernel name");
            let f = drv(
                unsafe { result::module::get_function(module, c) },
                &format!("kernel {name}"),
            )?;
            funcs.insert(name, f);
        }
        let (splitk_sum, splitk_cnt) = if info.sm.0 >= 8 {
            let alloc = |n: usize| -> Result<sys::CUdeviceptr> {
                let p = drv(unsafe { result::malloc_sync(4 * n) }, "allocating split-K scratch")?;
                drv(
                    unsafe { result::memset_d8_sync(p, 0, 4 * n) },
                    "zeroing split-K scratch",
                )?;
                Ok(p)
            };
            let bufs = (alloc(SPLITK_SUM_INTS)?, alloc(SPLITK_TILES)?);
            // The memsets ran on the legacy stream, which ours does not wait for.
            drv(result::ctx::synchronize(), "zeroing split-K scratch")?;
            bufs
        } else {
            (0, 0)
        };
        let sms = info.sms.max(1) as usize;
        let tail_ws = if arch == "sm_90a" {
            drv(
                unsafe { result::malloc_sync(4 * sms * TAIL_TILE_INTS) },
                "allocating the tail split's scratch",
            )?
        } else {
            0
        };
        let gpu = Arc::new(Self {
            ctx,
            stream,
            module,
            funcs,
            info,
            arch,
            from_cache,
            prof: Default::default(),
            splitk_sum,
            splitk_cnt,
            tail_ws,
            tail_sms: std::sync::atomic::AtomicUsize::new(if tail_on && tail_ws != 0 { sms } else { 0 }),
        });
        if gpu.has_mma() {
            for v in MmaVariant::ALL.into_iter().filter(|v| v.available(&gpu)) {
                for name in [v.name].into_iter().chain(v.ep_names).filter(|n| !n.is_empty()) {
                    if !gpu.allow_dynamic_smem(name, v.smem())? {
                        return Err(berr(format!("{name} needs {} B of shared memory", v.smem())));
                    }
                }
            }
        }
        Ok(gpu)
    }

    pub fn bind(&self) -> Result<()> {
        drv(self.ctx.bind_to_thread(), "binding context")
    }

    /// The SMs the TMA GEMM's tail split plans for (0: off).
    pub fn tail_sms(&self) -> usize {
        self.tail_sms.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Plans the tail split for `sms` SMs (0: off; at most the device's,
    /// whose count its scratch is sized for); returns the previous setting.
    /// Tests plan for a few SMs so that small shapes take it.
    pub fn set_tail_sms(&self, sms: usize) -> usize {
        let sms = if self.tail_ws == 0 {
            0
        } else {
            sms.min(self.info.sms.max(1) as usize)
        };
        self.tail_sms.swap(sms, std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the tensor-core GEMM can run (mma.sync s8 needs sm_80+).
    pub fn has_mma(&self) -> bool {
        self.info.sm.0 >= 8
    }

    pub fn launch(&self, name: &str, grid: (u32, u32, u32), block: u32, args: &[Arg]) -> Result<()> {
        self.launch_ex(name, grid, block, args, false)
    }

    /// SM clock in kHz (converts clock64 cycles to time).
    pub fn clock_khz(&self) -> Result<i32> {
        let dev = drv(result::device::get(self.ctx.ordinal() as i32), "cuDeviceGet")?;
        drv(
            unsafe { result::device::get_attribute(dev, sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CLOCK_RATE) },
            "clock rate",
        )
    }

    /// Resident blocks per SM of kernel `name` at `block` threads (0: it
    /// cannot run at that size, e.g. too many registers).
    pub fn occupancy(&self, name: &str, block: u32, smem: usize) -> Result<i32> {
        let f = *self
            .funcs
            .get(name)
            .ok_or_else(|| berr(format!("unknown kernel {name}")))?;
        let mut n = 0i32;
        let r = unsafe { sys::cuOccupancyMaxActiveBlocksPerMultiprocessor(&mut n, f, block as i32, smem) };
        drv(r.result(), &format!("occupancy of {name}"))?;
        Ok(n)
    }

    /// Whether PDL (programmatic dependent launch) is available: sm_90+.
    pub fn has_pdl(&self) -> bool {
        self.info.sm.0 >= 9
    }

    /// Launch; with `pdl` the kernel may start before its predecessor on the
    /// stream ends (it must `pdl_wait()` before touching what that wrote).
    pub fn launch_ex(&self, name: &str, grid: (u32, u32, u32), block: u32, args: &[Arg], pdl: bool) -> Result<()> {
        let how = if pdl { Launch::Pdl } else { Launch::Plain };
        self.launch_smem(name, grid, block, 0, args, how)
    }

    /// Let kernel `name` use `bytes` of dynamic shared memory (beyond the
    /// 48 KB default), if the device allows that much next to its static use.
    pub fn allow_dynamic_smem(&self, name: &str, bytes: usize) -> Result<bool> {
        let f = *self
            .funcs
            .get(name)
            .ok_or_else(|| berr(format!("unknown kernel {name}")))?;
        let dev = drv(result::device::get(self.ctx.ordinal() as i32), "cuDeviceGet")?;
        let optin = drv(
            unsafe {
                result::device::get_attribute(
                    dev,
                    sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
                )
            },
            "shared memory limit",
        )? as usize;
        let stat = drv(
            unsafe {
                result::function::get_function_attribute(
                    f,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES,
                )
            },
            "static shared memory",
        )? as usize;
        if stat + bytes > optin {
            return Ok(false);
        }
        let r = unsafe {
            sys::cuFuncSetAttribute(
                f,
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
        };
        drv(r.result(), "setting dynamic shared memory")?;
        Ok(true)
    }

    /// Launch with `smem` bytes of dynamic shared memory, plainly, with PDL
    /// (see launch_ex) or cooperatively: then the driver starts the grid only
    /// when every block can be resident at once, which a kernel with grid-wide
    /// barriers needs (two such kernels on two streams could otherwise each
    /// hold part of the GPU and deadlock).
    pub fn launch_smem(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        args: &[Arg],
        how: Launch,
    ) -> Result<()> {
        let pdl = matches!(how, Launch::Pdl | Launch::CooperativePdl) && self.has_pdl();
        let coop = matches!(how, Launch::Cooperative | Launch::CooperativePdl);
        let f = *self
            .funcs
            .get(name)
            .ok_or_else(|| berr(format!("unknown kernel {name}")))?;
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        let mut slots: Vec<u64> = args
            .iter()
            .map(|a| match *a {
                Arg::P(p) => p,
                Arg::I(i) => i as u32 as u64,
                Arg::F(f) => f.to_bits() as u64,
            })
            .collect();
        let mut ptrs: Vec<*mut c_void> = slots.iter_mut().map(|s| s as *mut u64 as *mut c_void).collect();
        let ev = self.prof_start()?;
        // SAFETY: `f` comes from our module; argument kinds match the kernel
        // signatures (checked by the device tests); the driver copies them.
        let r = if pdl || coop {
            let mut attrs: [sys::CUlaunchAttribute; 2] = unsafe { std::mem::zeroed() };
            let mut n = 0;
            if coop {
                attrs[n].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_COOPERATIVE;
                attrs[n].value.cooperative = 1;
                n += 1;
            }
            if pdl {
                attrs[n].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
                attrs[n].value.programmaticStreamSerializationAllowed = 1;
                n += 1;
            }
            let cfg = sys::CUlaunchConfig {
                gridDimX: grid.0,
                gridDimY: grid.1,
                gridDimZ: grid.2,
                blockDimX: block,
                blockDimY: 1,
                blockDimZ: 1,
                sharedMemBytes: smem,
                hStream: self.stream,
                attrs: attrs.as_mut_ptr(),
                numAttrs: n as u32,
            };
            unsafe { sys::cuLaunchKernelEx(&cfg, f, ptrs.as_mut_ptr(), std::ptr::null_mut()).result() }
        } else {
            unsafe { result::launch_kernel(f, grid, (block, 1, 1), smem, self.stream, &mut ptrs) }
        };
        drv(r, &format!("launching {name}"))?;
        self.prof_stop(ev)
    }

    /// Tag the following launches for the profile.
    pub fn set_tag(&self, tag: &'static str) {
        if let Ok(mut p) = self.prof.lock() {
            p.tag = tag;
        }
    }

    /// Start (true) or stop collecting per-launch events; stopping returns
    /// (tag, ms) per launch in order.
    pub fn profile(&self, on: bool) -> Result<Vec<(&'static str, f32)>> {
        let evs = {
            let mut p = self.prof.lock().map_err(|_| berr("profile lock poisoned"))?;
            p.on = on;
            std::mem::take(&mut p.events)
        };
        self.sync()?;
        let mut out = Vec::with_capacity(evs.len());
        for (tag, a, b) in evs {
            let ms = unsafe { result::event::elapsed(a, b) };
            unsafe {
                let _ = result::event::destroy(a);
                let _ = result::event::destroy(b);
            }
            out.push((tag, drv(ms, "cuEventElapsedTime")?));
        }
        Ok(out)
    }

    fn prof_start(&self) -> Result<Option<sys::CUevent>> {
        let on = self.prof.lock().map(|p| p.on).unwrap_or(false);
        if !on {
            return Ok(None);
        }
        let e = drv(
            result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT),
            "cuEventCreate",
        )?;
        drv(unsafe { result::event::record(e, self.stream) }, "cuEventRecord")?;
        Ok(Some(e))
    }

    fn prof_stop(&self, start: Option<sys::CUevent>) -> Result<()> {
        let Some(a) = start else { return Ok(()) };
        let b = drv(
            result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT),
            "cuEventCreate",
        )?;
        drv(unsafe { result::event::record(b, self.stream) }, "cuEventRecord")?;
        let mut p = self.prof.lock().map_err(|_| berr("profile lock poisoned"))?;
        let tag = p.tag;
        p.events.push((tag, a, b));
        Ok(())
    }

    pub fn sync(&self) -> Result<()> {
        drv(
            unsafe { result::stream::synchronize(self.stream) },
            "cuStreamSynchronize",
        )
    }

    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<DevBuf> {
        DevBuf::new(self, bytes)
    }

    pub fn upload<T: Copy>(self: &Arc<Self>, data: &[T]) -> Result<DevBuf> {
        let b = DevBuf::new(self, std::mem::size_of_val(data))?;
        b.write(data)?;
        Ok(b)
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            unsafe {
                let _ = result::stream::synchronize(self.stream);
                for p in [self.splitk_sum, self.splitk_cnt, self.tail_ws] {
                    if p != 0 {
                        let _ = result::free_sync(p);
                    }
                }
                let _ = result::module::unload(self.module);
                let _ = result::stream::destroy(self.stream);
            }
        }
    }
}

fn load_module(arch: &str) -> Result<(sys::CUmodule, bool)> {
    let (bin, cached) = nvrtc::cubin(arch)?;
    // SAFETY: `bin` is a CUBIN image produced by NVRTC (or our cache).
    match unsafe { result::module::load_data(bin.as_ptr() as *const c_void) } {
        Ok(m) => Ok((m, cached)),
        Err(e) if cached => {
            // A stale or damaged cache entry: recompile once.
            nvrtc::evict(arch);
            let (bin, _) = nvrtc::cubin(arch)?;
            let m = drv(
                unsafe { result::module::load_data(bin.as_ptr() as *const c_void) },
                "loading kernels",
            )
            .map_err(|e2| berr(format!("{e2} (cached image also failed: {e:?})")))?;
            Ok((m, false))
        }
        Err(e) => Err(berr(format!("loading kernels for {arch}: {e:?}"))),
    }
}

/// Device memory owned by Rust; freed on drop.
pub struct DevBuf {
    gpu: Arc<Gpu>,
    pub ptr: sys::CUdeviceptr,
    pub bytes: usize,
}

// SAFETY: a plain device address; all use goes through the Gpu's stream.
unsafe impl Send for DevBuf {}
unsafe impl Sync for DevBuf {}

impl DevBuf {
    fn new(gpu: &Arc<Gpu>, bytes: usize) -> Result<Self> {
        gpu.bind()?;
        let ptr = drv(
            unsafe { result::malloc_sync(bytes.max(16)) },
            &format!("allocating {bytes} bytes"),
        )?;
        Ok(Self {
            gpu: gpu.clone(),
            ptr,
            bytes,
        })
    }
    pub fn p(&self) -> Arg {
        Arg::P(self.ptr)
    }
    /// Address `off` bytes in.
    pub fn at(&self, off: usize) -> Arg {
        debug_assert!(off <= self.bytes);
        Arg::P(self.ptr + off as u64)
    }
    pub fn write<T: Copy>(&self, data: &[T]) -> Result<()> {
        if std::mem::size_of_val(data) > self.bytes {
            return Err(berr("upload larger than its buffer"));
        }
        self.gpu.bind()?;
        // On our stream, then waited for: a synchronous cuMemcpyHtoD from
        // pageable memory returns once the data is staged, before its DMA
        // lands, and on the legacy stream, which our non-blocking stream does
        // not wait for; a kernel queued next could read the old bytes (an
        // imported KV cache's tail, S20-3).
        drv(
            unsafe { result::memcpy_htod_async(self.ptr, data, self.gpu.stream) },
            "copy to device",
        )?;
        self.gpu.sync()
    }
    /// Queue a copy of `data` on the stream (data must stay alive until sync).
    pub fn write_async<T: Copy>(&self, data: &[T]) -> Result<()> {
        if std::mem::size_of_val(data) > self.bytes {
            return Err(berr("upload larger than its buffer"));
        }
        drv(
            unsafe { result::memcpy_htod_async(self.ptr, data, self.gpu.stream) },
            "async copy to device",
        )
    }
    pub fn read<T: Copy + Default>(&self, n: usize) -> Result<Vec<T>> {
        self.read_at(0, n)
    }
    /// `n` elements from element `at` on.
    pub fn read_at<T: Copy + Default>(&self, at: usize, n: usize) -> Result<Vec<T>> {
        let size = std::mem::size_of::<T>();
        if (at + n) * size > self.bytes {
            return Err(berr("download larger than its buffer"));
        }
        self.gpu.sync()?;
        let mut v = vec![T::default(); n];
        drv(
            unsafe { result::memcpy_dtoh_sync(&mut v, self.ptr + (at * size) as u64) },
            "copy from device",
        )?;
        Ok(v)
    }
    /// [`Self::read`] through page-locked memory (`pin`, at least n elements).
    pub fn read_via<T: Copy + Default>(&self, n: usize, pin: &PinnedHost) -> Result<Vec<T>> {
        let bytes = n * std::mem::size_of::<T>();
        if bytes > self.bytes || bytes > pin.bytes {
            return Err(berr("download larger than its buffer"));
        }
        self.gpu.sync()?;
        // SAFETY: `pin` holds `bytes` page-aligned bytes that nothing else uses
        // while the caller holds the scratch that owns it.
        let dst = unsafe { std::slice::from_raw_parts_mut(pin.ptr as *mut T, n) };
        drv(unsafe { result::memcpy_dtoh_sync(dst, self.ptr) }, "copy from device")?;
        Ok(dst.to_vec())
    }
    /// Queue a copy of the first `bytes` into `pin` behind the work on the
    /// stream, and an event after it: the work queued next can run while
    /// the caller waits for this copy alone ([`PendingRead::wait`]).
    pub fn read_async_into<'a>(&self, bytes: usize, pin: &'a PinnedHost) -> Result<PendingRead<'a>> {
        if bytes > self.bytes || bytes > pin.bytes {
            return Err(berr("download larger than its buffer"));
        }
        // SAFETY: `pin` holds `bytes` page-locked bytes that nothing else
        // uses while the caller holds the scratch that owns it; the event
        // orders the host's reads after the copy.
        let dst = unsafe { std::slice::from_raw_parts_mut(pin.ptr, bytes) };
        drv(
            unsafe { result::memcpy_dtoh_async(dst, self.ptr, self.gpu.stream) },
            "copy from device",
        )?;
        let event = drv(
            result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING),
            "cuEventCreate",
        )?;
        if let Err(e) = drv(
            unsafe { result::event::record(event, self.gpu.stream) },
            "cuEventRecord",
        ) {
            unsafe {
                let _ = result::event::destroy(event);
            }
            return Err(e);
        }
        Ok(PendingRead { pin, bytes, event })
    }
    /// Fill with a byte (used to poison outputs before a kernel writes them).
    pub fn fill(&self, byte: u8) -> Result<()> {
        drv(
            unsafe { result::memset_d8_async(self.ptr, byte, self.bytes, self.gpu.stream) },
            "memset",
        )
    }
}

/// Page-locked host memory for a device-to-host read that happens every
/// decode step (the logits of one token, 513 KB for BitNet): from pageable
/// memory the driver bounces the copy through its own staging buffer.
/// `yinsen run` with sampling on the H100 (S8-14, same call): 598.2 / 597.5
/// tok/s against 598.7 / 555.5 with the pageable read.
pub struct PinnedHost {
    gpu: Arc<Gpu>,
    ptr: *mut u8,
    pub bytes: usize,
}

// SAFETY: host memory owned by this value; reads go through `DevBuf::read_via`
// with the backend's scratch lock held.
unsafe impl Send for PinnedHost {}
unsafe impl Sync for PinnedHost {}

impl PinnedHost {
    pub fn new(gpu: &Arc<Gpu>, bytes: usize) -> Result<Self> {
        gpu.bind()?;
        let ptr = drv(
            unsafe { result::malloc_host(bytes.max(1), 0) },
            "allocating page-locked memory",
        )?;
        Ok(Self {
            gpu: gpu.clone(),
            ptr: ptr as *mut u8,
            bytes,
        })
    }
}

/// A device-to-host copy in flight (`DevBuf::read_async_into`).
pub struct PendingRead<'a> {
    pin: &'a PinnedHost,
    bytes: usize,
    event: sys::CUevent,
}

impl PendingRead<'_> {
    /// Wait for the copy (not for what was queued after it) and return its
    /// bytes as `T`s.
    pub fn wait<T: Copy + Default>(self) -> Result<Vec<T>> {
        drv(unsafe { result::event::synchronize(self.event) }, "cuEventSynchronize")?;
        let n = self.bytes / std::mem::size_of::<T>();
        let mut out = vec![T::default(); n];
        // SAFETY: the copy into `pin` has completed (the event), and `out`
        // holds n * size_of::<T>() <= bytes bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(self.pin.ptr, out.as_mut_ptr() as *mut u8, n * std::mem::size_of::<T>())
        };
        Ok(out)
    }
}

impl Drop for PendingRead<'_> {
    fn drop(&mut self) {
        // Released once complete, if not yet (the driver's contract).
        unsafe {
            let _ = result::event::destroy(self.event);
        }
    }
}

impl Drop for PinnedHost {
    fn drop(&mut self) {
        if self.gpu.bind().is_ok() {
            unsafe {
                let _ = result::free_host(self.ptr as *mut std::ffi::c_void);
            }
        }
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        if self.gpu.bind().is_ok() {
            unsafe {
                let _ = result::stream::synchronize(self.gpu.stream);
                let _ = result::free_sync(self.ptr);
            }
        }
    }
}

/// A ternary matrix uploaded in the GPU layout.
pub struct GpuMatrix {
    pub n_rows: usize,
    pub n_in: usize,
    pub chunks: usize,
    pub w: DevBuf,
    pub scale: DevBuf,
    /// The stage tiles (layout.rs) where the device runs the TMA GEMM (sm_90a).
    pub tiles: Option<DevBuf>,
    /// `tiles` pair gate and up rows (a stacked [gate | up] matrix): the TMA
    /// GEMM then runs only with a gated epilogue.
    pub paired: bool,
}

impl GpuMatrix {
    pub fn upload(gpu: &Arc<Gpu>, mats: &[&TernaryMatrix]) -> Result<Self> {
        Self::from_layout(gpu, &GpuLayout::stack(mats)?)
    }
    pub fn from_layout(gpu: &Arc<Gpu>, l: &GpuLayout) -> Result<Self> {
        Self::build(gpu, l, false)
    }
    /// A stacked [gate | up] matrix (gate rows first, `n_rows` = 2 f): its
    /// stage tiles pair the rows for the fused gated epilogue when f is a
    /// multiple of 64 (else plain tiles).
    pub fn upload_gate_up(gpu: &Arc<Gpu>, gate: &TernaryMatrix, up: &TernaryMatrix) -> Result<Self> {
        let paired = gate.n_out == up.n_out && gate.n_out.is_multiple_of(layout::TILE_ROWS / 2);
        Self::build(gpu, &GpuLayout::stack(&[gate, up])?, paired)
    }
    fn build(gpu: &Arc<Gpu>, l: &GpuLayout, paired: bool) -> Result<Self> {
        Ok(Self {
            n_rows: l.n_rows,
            n_in: l.n_in,
            chunks: l.chunks,
            w: gpu.upload(&l.bytes)?,
            scale: gpu.upload(&l.row_scale)?,
            tiles: match (stage_tiles_wanted(gpu), paired) {
                (true, true) => Some(gpu.upload(&l.stage_tiles_paired())?),
                (true, false) => Some(gpu.upload(&l.stage_tiles())?),
                (false, _) => None,
            },
            paired: paired && stage_tiles_wanted(gpu),
        })
    }
    pub fn kpad(&self) -> usize {
        self.chunks * layout::CHUNK_WEIGHTS
    }
    /// Bytes a pass over the matrix streams (one layout).
    pub fn bytes(&self) -> usize {
        self.w.bytes + self.scale.bytes
    }
    /// Bytes resident on the device (both layouts).
    pub fn resident_bytes(&self) -> usize {
        self.bytes() + self.tiles.as_ref().map_or(0, |t| t.bytes)
    }
}

/// Whether matrices get their stage tiles: on sm_90a (the TMA GEMM), unless
/// `YINSEN_CUDA_GEMM=shape` keeps prefill on mma.sync and saves their memory
/// (the size of the 2-bit weights again).
fn stage_tiles_wanted(gpu: &Gpu) -> bool {
    gpu.arch == "sm_90a" && std::env::var("YINSEN_CUDA_GEMM").map_or(true, |v| v != "shape")
}

/// Which matrix kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatKernel {
    /// dp4a GEMV for 1..=16 tokens.
    Gemv,
    /// int8 tensor-core GEMM (sm_80+), the variant for the token count.
    Mma,
    /// The same with a given tile variant (tests and the bench's sweep).
    MmaWith(MmaVariant),
}

/// One instantiation of `tern_mma_body` (ternary.cu): its tile and launch
/// shape. Keep in step with the `TERN_MMA(...)` lines there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmaVariant {
    pub name: &'static str,
    /// Weight rows x tokens per block.
    pub bm: usize,
    pub bn: usize,
    pub threads: u32,
    /// cp.async pipeline depth (stages of 2 chunks).
    pub stages: usize,
    /// Hopper warpgroup MMA (`tern_wgmma_tma_body`; sm_90a only).
    pub wgmma: bool,
    /// Fed by bulk copies (`tern_wgmma_tma_body`): x must be in the tiled
    /// order of [`tile_x`] (`norm_quant` with `x_ntp`), not row-major.
    pub tiled: bool,
    /// The tiled variants' kernels per epilogue family: `name` (I32, Store),
    /// then Add, gated, StoreRope ("" for the other variants): each kernel
    /// carries only its own epilogue code.
    pub ep_names: [&'static str; 3],
}

/// A `TERN_WGMMA_TMA(NAME, ...)` line's kernel names: NAME and its
/// epilogue twins.
macro_rules! tma_variant {
    ($name:literal, $bn:expr, $stages:expr) => {
        MmaVariant::tma(
            $name,
            [
                concat!($name, "_add"),
                concat!($name, "_gated"),
                concat!($name, "_rope"),
            ],
            $bn,
            $stages,
        )
    };
}

impl MmaVariant {
    pub const ALL: [MmaVariant; 11] = [
        MmaVariant::new("tern_mma_32x16", 2, 1, 1, 2, 8),
        MmaVariant::new("tern_mma_64x16", 4, 1, 1, 2, 8),
        MmaVariant::new("tern_mma_128x16", 8, 1, 1, 2, 6),
        MmaVariant::new("tern_mma_64x32", 4, 1, 1, 4, 6),
        MmaVariant::new("tern_mma_64x64", 4, 1, 1, 8, 4),
        MmaVariant::new("tern_mma_128x128", 4, 2, 2, 8, 4),
        MmaVariant::new("tern_mma_256x64", 8, 1, 2, 8, 4),
        MmaVariant::new("tern_mma_256x128", 4, 2, 4, 8, 4),
        tma_variant!("tern_wgmma_tma_s4", 256, 4),
        tma_variant!("tern_wgmma_tma_s6", 256, 6),
        tma_variant!("tern_wgmma_tma_n128", 128, 6),
    ];

    /// A `TERN_WGMMA_TMA(...)` line: 128 rows x `bn` tokens, 384 threads.
    const fn tma(name: &'static str, ep_names: [&'static str; 3], bn: usize, stages: usize) -> Self {
        Self {
            name,
            ep_names,
            bm: 128,
            bn,
            threads: 384,
            stages,
            wgmma: true,
            tiled: true,
        }
    }

    /// Warps along rows / tokens, m16 / n8 tiles per warp, stages (as in the macro).
    const fn new(name: &'static str, mw: usize, nw: usize, mt: usize, nt: usize, stages: usize) -> Self {
        Self {
            name,
            bm: 16 * mt * mw,
            bn: 8 * nt * nw,
            threads: (32 * mw * nw) as u32,
            stages,
            wgmma: false,
            tiled: false,
            ep_names: [""; 3],
        }
    }

    /// Whether `gpu` can run it (wgmma exists on sm_90a only).
    pub fn available(&self, gpu: &Gpu) -> bool {
        gpu.has_mma() && (!self.wgmma || gpu.arch == "sm_90a")
    }

    /// Dynamic shared memory: per stage 2 chunks of 2-bit rows + int8 token
    /// rows (padded by 16 bytes for ldmatrix; core-matrix order for wgmma).
    pub const fn smem(&self) -> usize {
        let b_row = if self.wgmma { 2 * 64 } else { 2 * 64 + 16 };
        // The tiled kernels align their stages to 1024 bytes in the buffer.
        self.stages * (2 * self.bm * 16 + self.bn * b_row) + if self.tiled { 1024 } else { 0 }
    }

    /// The kernel that runs epilogue `ep` (the tiled variants have one per
    /// epilogue family).
    pub fn kernel(&self, ep: Epilogue) -> &'static str {
        let twin = match ep {
            Epilogue::I32 | Epilogue::Store => return self.name,
            Epilogue::Add => self.ep_names[0],
            Epilogue::GatedRelu2 | Epilogue::GatedSilu => self.ep_names[1],
            Epilogue::StoreRope => self.ep_names[2],
        };
        if twin.is_empty() {
            self.name
        } else {
            twin
        }
    }

    pub fn by_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.name == name)
    }

    /// The default for `nt` tokens and `n_rows` rows on `sms` SMs, from the
    /// bench's GEMM sweep (H200, 2B4T matrices): the 256x64 tile is fastest
    /// (410-440 TOPS) once it makes a block per SM; with fewer, the 64-row
    /// tiles that fill the GPU win (16 tokens: 64x16, 12-25 us per matrix).
    pub fn for_shape(nt: usize, n_rows: usize, sms: usize) -> Self {
        let name = if n_rows.div_ceil(256) * nt.div_ceil(64) >= sms {
            "tern_mma_256x64"
        } else {
            match nt {
                0..=16 => "tern_mma_64x16",
                17..=32 => "tern_mma_64x32",
                _ => "tern_mma_64x64",
            }
        };
        Self::by_name(name).expect("listed variant")
    }
}

/// What the matrix epilogue does with `acc * (ws / sx)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Epilogue {
    /// Raw exact int32 (`out` is i32).
    I32 = 0,
    /// Store the float result.
    Store = 1,
    /// Add the float result into `out` (residual connection).
    Add = 2,
    /// relu2(gate) * up into `out` ([token][f]); TMA GEMM on paired tiles only.
    GatedRelu2 = 3,
    /// silu(gate) * up, likewise.
    GatedSilu = 4,
    /// The q|k|v rows RoPE'd into q and the KV cache, as `rope_kv` does from
    /// stored rows ([`RopeOut`]); TMA GEMM only.
    StoreRope = 5,
}

/// Where [`Epilogue::StoreRope`] writes: rotated q to `qr` (token-major,
/// `n_heads` x `hd` a token), k and v to the caches `kc` / `vc` (kv head,
/// then `cap` positions of `hd`; f16 or f32) at position `pos[0] + t`;
/// `rope` is the (cos, sin) table.
#[derive(Clone, Copy, Debug)]
pub struct RopeOut {
    pub pos: Arg,
    pub rope: Arg,
    pub n_heads: usize,
    pub n_kv: usize,
    pub hd: usize,
    pub cap: usize,
    pub kv_f16: bool,
    pub kc: Arg,
    pub vc: Arg,
    pub qr: Arg,
}

/// Launch `kernel` for `nt` tokens of int8 rows `x` (stride = kpad; or,
/// with `x_ntp` > 0, in the tiled order of [`tile_x`] for `x_ntp` tokens,
/// which the tiled variants need), with per-token scales `sx` and sums
/// `xsum`; output row stride `out_stride`; `rope` the outputs of
/// [`Epilogue::StoreRope`] (Some exactly for that epilogue).
#[allow(clippy::too_many_arguments)]
pub fn launch_matmul(
    gpu: &Gpu,
    m: &GpuMatrix,
    kernel: MatKernel,
    x: Arg,
    x_ntp: usize,
    nt: usize,
    sx: Arg,
    xsum: Arg,
    ep: Epilogue,
    out: Arg,
    out_stride: usize,
    how: Launch,
    rope: Option<&RopeOut>,
) -> Result<()> {
    let (oi, of) = if ep == Epilogue::I32 {
        (out, Arg::P(0))
    } else {
        (Arg::P(0), out)
    };
    let tiled = matches!(kernel, MatKernel::MmaWith(v) if v.tiled);
    let gated = matches!(ep, Epilogue::GatedRelu2 | Epilogue::GatedSilu);
    if gated != (tiled && m.paired) {
        return Err(berr(format!(
            "{kernel:?} with {ep:?}: a gated epilogue runs on the TMA GEMM over paired tiles, nothing else"
        )));
    }
    let roped = ep == Epilogue::StoreRope;
    if roped != rope.is_some()
        || (roped && (!tiled || rope.is_some_and(|r| !r.hd.is_multiple_of(4) || !m.n_rows.is_multiple_of(4))))
    {
        return Err(berr(format!(
            "{kernel:?} with {ep:?}: the RoPE epilogue runs on the TMA GEMM, with its outputs, for head dims a multiple of 4"
        )));
    }
    let w = match (tiled, &m.tiles) {
        (false, _) => m.w.p(),
        (true, Some(t)) => t.p(),
        (true, None) => return Err(berr(format!("{kernel:?}: no stage tiles uploaded"))),
    };
    let args = [
        w,
        Arg::I(m.n_rows as i32),
        Arg::I(m.chunks as i32),
        x,
        Arg::I(nt as i32),
        xsum,
        m.scale.p(),
        sx,
        oi,
        of,
        Arg::I(out_stride as i32),
        Arg::I(ep as i32),
        // The tiled variants' tail-split scratch, else the split-K one.
        Arg::P(if tiled { gpu.tail_ws } else { gpu.splitk_sum }),
        Arg::P(gpu.splitk_cnt),
        // Read by the tiled variants only (the others declare 14 parameters).
        Arg::I(x_ntp as i32),
        // The tiled variants' RoPE outputs (read in mode 5 only).
        rope.map_or(Arg::P(0), |r| r.pos),
        rope.map_or(Arg::P(0), |r| r.rope),
        Arg::I(rope.map_or(0, |r| r.n_heads) as i32),
        Arg::I(rope.map_or(0, |r| r.n_kv) as i32),
        Arg::I(rope.map_or(0, |r| r.hd) as i32),
        Arg::I(rope.map_or(0, |r| r.cap) as i32),
        Arg::I(rope.is_some_and(|r| r.kv_f16) as i32),
        rope.map_or(Arg::P(0), |r| r.kc),
        rope.map_or(Arg::P(0), |r| r.vc),
        rope.map_or(Arg::P(0), |r| r.qr),
    ];
    if tiled != (x_ntp > 0) || (tiled && (!x_ntp.is_multiple_of(TILED_TOKENS) || x_ntp < nt)) {
        return Err(berr(format!(
            "{kernel:?}: x in the wrong order for it (x_ntp {x_ntp}, {nt} tokens)"
        )));
    }
    match kernel {
        MatKernel::Mma | MatKernel::MmaWith(_) => {
            if !gpu.has_mma() {
                return Err(Error::Unsupported(format!(
                    "tensor-core GEMM needs sm_80+, device is {}",
                    gpu.arch
                )));
            }
            let v = match kernel {
                MatKernel::MmaWith(v) => v,
                _ => MmaVariant::for_shape(nt, m.n_rows, gpu.info.sms.max(1) as usize),
            };
            if !v.available(gpu) {
                return Err(Error::Unsupported(format!("{} cannot run on {}", v.name, gpu.arch)));
            }
            let (gx, gy) = (m.n_rows.div_ceil(v.bm), nt.div_ceil(v.bn));
            let mut grid = (gx as u32, gy as u32, splitk(gpu, m, v, nt, gx * gy) as u32);
            let mut args = args.to_vec();
            if tiled {
                let (blocks, tail) = tail_split(gpu.tail_sms(), gx * gy, m.chunks);
                if tail != 0 {
                    grid = (blocks as u32, 1, 1);
                }
                args.push(Arg::I(tail as i32));
            }
            let name = v.kernel(ep);
            gpu.launch_smem(name, grid, v.threads, v.smem() as u32, &args, how)
        }
        MatKernel::Gemv => {
            let name = match nt {
                1 => "tern_gemv_t1",
                2 => "tern_gemv_t2",
                3..=4 => "tern_gemv_t4",
                5..=8 => "tern_gemv_t8",
                9..=16 => "tern_gemv_t16",
                _ => return Err(berr(format!("GEMV takes 1..=16 tokens, got {nt}"))),
            };
            // 4 warps x 4 rows per block.
            gpu.launch_smem(name, (m.n_rows.div_ceil(16) as u32, 1, 1), 128, 0, &args, how)
        }
    }
}

/// The TMA GEMM's tail split for `tiles` tiles of `chunks` input chunks on
/// `sms` SMs (one block each; 0: off): (blocks, `tail` argument), `tail` 0
/// where the grid stays whole. The w = tiles / sms full waves run whole
/// tiles; the r = tiles % sms tiles of a last wave that would leave at
/// least half the SMs idle run as p = sms / r pieces of their stage pairs
/// each (at most 16, at least 2 pairs a piece), so that wave takes ~1/p of
/// a tile's time. o and down at 2048 tokens: 160 tiles on 132 SMs, 28 tiles
/// in 4 pieces.
pub fn tail_split(sms: usize, tiles: usize, chunks: usize) -> (usize, usize) {
    let pairs = chunks.div_ceil(2).div_ceil(2).max(1);
    if sms < 2 || tiles == 0 {
        return (tiles, 0);
    }
    let (w, r) = (tiles / sms, tiles % sms);
    let p = sms.checked_div(r).map_or(1, |p| p.min(16).min(pairs / 2));
    if p < 2 {
        return (tiles, 0);
    }
    (w * sms + r * p, (w * sms) << 8 | p)
}

/// K splits for a tensor-core launch of `tiles` tiles: few tokens leave the
/// GPU mostly idle (a 2560-row matrix makes 40 blocks), so the K range is
/// cut until there are ~4 blocks per SM, keeping >= 4 chunks per split
/// (H200, 16 tokens: down 23 -> 11 us, o 11 -> 9, qkv 11 -> 10).
fn splitk(gpu: &Gpu, m: &GpuMatrix, v: MmaVariant, nt: usize, tiles: usize) -> usize {
    let fits = gpu.splitk_sum != 0 && tiles <= SPLITK_TILES && m.n_rows * nt <= SPLITK_SUM_INTS;
    let sms = gpu.info.sms.max(1) as usize;
    // A grid that already covers the SMs gains nothing (H200 sweep: gate_up,
    // 216 tiles, 11.9 us whole vs 14.3 us in 3 splits).
    if v.wgmma || v.bn > 16 || !fits || tiles >= sms {
        return 1;
    }
    let want = (4 * sms).div_ceil(tiles);
    want.clamp(1, (m.chunks / 4).clamp(1, 16))
}

/// Token capacity granule of a tiled x (the TMA GEMM's token tile).
pub const TILED_TOKENS: usize = 256;

/// Bytes of a tiled x holding `ntp` tokens of `kpad` inputs: an even number
/// of 128-input stages.
pub fn tiled_x_bytes(kpad: usize, ntp: usize) -> usize {
    kpad.div_ceil(256) * 256 * ntp
}

/// Row-major int8 rows `x` (`nt` x `kpad`) in the tiled order the TMA GEMM
/// copies (`q_at` in ops.cu writes the same): stage `k / 128`, then 8-token
/// group, 16-input group, token within the group, input within the 16;
/// `ntp` tokens (a multiple of [`TILED_TOKENS`]), zeros past `nt` and `kpad`.
pub fn tile_x(x: &[i8], nt: usize, kpad: usize, ntp: usize) -> Vec<i8> {
    let mut out = vec![0i8; tiled_x_bytes(kpad, ntp)];
    for t in 0..nt {
        for (i, &v) in x[t * kpad..(t + 1) * kpad].iter().enumerate() {
            out[(i >> 7) * ntp * 128 + (t >> 3) * 1024 + ((i & 127) >> 4) * 128 + (t & 7) * 16 + (i & 15)] = v;
        }
    }
    out
}

/// Exact int32 products `out[t * n_out + o] = sum_i W[o, i] x[t * n_in + i]`
/// (token-major, like `reference::ternary_matmul_i32`) computed on the GPU
/// from the canonical matrix. The output buffer is poisoned before launch.
pub fn ternary_matmul_i32(
    gpu: &Arc<Gpu>,
    w: &TernaryMatrix,
    x: &[i8],
    n_tokens: usize,
    kernel: MatKernel,
) -> Result<Vec<i32>> {
    if n_tokens == 0 || x.len() != n_tokens.saturating_mul(w.n_in) {
        return Err(Error::input(format!(
            "x has {} values, expected {n_tokens} x {}",
            x.len(),
            w.n_in
        )));
    }
    if w.n_in > (1 << 17) || w.n_out == 0 {
        return Err(Error::input(format!(
            "{}x{} is outside the GPU path's shapes",
            w.n_out, w.n_in
        )));
    }
    gpu.bind()?;
    let m = GpuMatrix::upload(gpu, &[w])?;
    let kpad = m.kpad();
    let mut xp = vec![0i8; n_tokens * kpad];
    for t in 0..n_tokens {
        xp[t * kpad..t * kpad + w.n_in].copy_from_slice(&x[t * w.n_in..(t + 1) * w.n_in]);
    }
    let xb = gpu.upload(&xp)?;
    let tiled = matches!(kernel, MatKernel::MmaWith(v) if v.tiled);
    let ntp = if tiled {
        n_tokens.div_ceil(TILED_TOKENS) * TILED_TOKENS
    } else {
        0
    };
    let xt = match tiled {
        true => Some(gpu.upload(&tile_x(&xp, n_tokens, kpad, ntp))?),
        false => None,
    };
    let xsum = gpu.alloc(4 * n_tokens)?;
    let ones = gpu.upload(&vec![1f32; n_tokens])?;
    let out = gpu.alloc(4 * n_tokens * w.n_out)?;
    out.fill(0xA5)?;
    xsum.fill(0x5A)?;
    let k = Arg::I(kpad as i32);
    gpu.launch("row_sums_i8", (n_tokens as u32, 1, 1), 256, &[xb.p(), k, k, xsum.p()])?;
    let group = if kernel == MatKernel::Gemv { 16 } else { n_tokens };
    for t0 in (0..n_tokens).step_by(group) {
        let nt = (n_tokens - t0).min(group);
        let (xo, so, oo) = (xb.at(t0 * kpad), xsum.at(4 * t0), out.at(4 * t0 * w.n_out));
        let xo = xt.as_ref().map_or(xo, DevBuf::p);
        launch_matmul(
            gpu,
            &m,
            kernel,
            xo,
            ntp,
            nt,
            ones.p(),
            so,
            Epilogue::I32,
            oo,
            w.n_out,
            Launch::Plain,
            None,
        )?;
    }
    gpu.sync()?;
    out.read::<i32>(n_tokens * w.n_out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel a source defines outside a macro is in `KERNELS`, the
    /// list the module loads by name: one left out fails only at its first
    /// launch, on a GPU.
    #[test]
    fn every_plain_kernel_is_listed() {
        let mut found = 0;
        for (file, src) in nvrtc::SOURCES {
            let lines: Vec<&str> = src.lines().collect();
            for (i, line) in lines.iter().enumerate() {
                let in_macro = line.trim_end().ends_with('\\') || (i > 0 && lines[i - 1].trim_end().ends_with('\\'));
                let Some(at) = line.find("extern \"C\" __global__") else {
                    continue;
                };
                if in_macro {
                    continue;
                }
                // The name: the identifier before the first '(' after `void`,
                // which may sit on the next line.
                let rest = format!("{} {}", &line[at..], lines.get(i + 1).unwrap_or(&""));
                let mut after = rest[rest.find(" void").expect("a void kernel") + 5..].trim_start();
                if let Some(bounds) = after.strip_prefix("__launch_bounds__(") {
                    after = bounds[bounds.find(')').unwrap() + 1..].trim_start();
                }
                let name = after[..after.find('(').unwrap()].trim();
                assert!(KERNELS.contains(&name), "{file}: kernel {name} is not in KERNELS");
                found += 1;
            }
        }
        assert!(found > 15, "only {found} kernels found: the scan is broken");
    }

    /// The host's tile table (`MmaVariant::ALL`: block shape, threads, shared
    /// memory) must describe what the `TERN_MMA(...)` lines of ternary.cu
    /// instantiate; a drift would launch a kernel with the wrong block size.
    #[test]
    fn mma_variants_match_the_kernel_macros() {
        let src = include_str!("kernels/ternary.cu");
        // The arguments of every `NAME(...)` line of the source.
        let lines = |macro_name: &str| -> Vec<Vec<String>> {
            let open = format!("{macro_name}(");
            src.lines()
                .filter(|l| l.starts_with(&open))
                .map(|l| {
                    l[open.len()..l.rfind(')').unwrap()]
                        .split(',')
                        .map(|a| a.trim().to_string())
                        .collect()
                })
                .collect()
        };
        let num = |a: &String| -> usize { a.parse().unwrap() };
        let mut seen = Vec::new();
        for a in lines("TERN_MMA") {
            assert_eq!(a.len(), 7, "{a:?}");
            seen.push(MmaVariant::new(
                leak(&a[0]),
                num(&a[1]),
                num(&a[2]),
                num(&a[3]),
                num(&a[4]),
                num(&a[5]),
            ));
        }
        let plain = seen.len();
        for a in lines("TERN_WGMMA_TMA") {
            assert_eq!(a.len(), 3, "{a:?}");
            let twin = |s: &str| leak(&format!("{}_{s}", a[0]));
            let names = [twin("add"), twin("gated"), twin("rope")];
            seen.push(MmaVariant::tma(leak(&a[0]), names, num(&a[1]), num(&a[2])));
        }
        for want in &seen {
            assert_eq!(MmaVariant::by_name(want.name), Some(*want));
            assert!(want.smem() <= 227 << 10, "{}: {} B", want.name, want.smem());
            assert!(KERNELS.contains(&want.name), "{} not loaded", want.name);
            for ep in [Epilogue::I32, Epilogue::Add, Epilogue::GatedSilu, Epilogue::StoreRope] {
                let k = want.kernel(ep);
                assert!(KERNELS.contains(&k), "{k} not loaded");
                assert_eq!(k == want.name, !want.tiled || ep == Epilogue::I32, "{k}");
            }
        }
        assert_eq!(seen.len(), MmaVariant::ALL.len());
        assert!(plain >= 4 && seen.len() > plain);
    }

    fn leak(s: &str) -> &'static str {
        Box::leak(s.to_string().into_boxed_str())
    }

    /// The big-call GEMM setting survives its text and numeric forms, and the
    /// host's tiled order puts every input where `q_at` (ops.cu) does.
    #[test]
    fn big_gemm_names_and_tiled_order() {
        use forward::BigGemm;
        for g in [BigGemm::Auto, BigGemm::Shape]
            .into_iter()
            .chain(MmaVariant::ALL.into_iter().map(BigGemm::Variant))
        {
            assert_eq!(BigGemm::parse(g.name()), Some(g));
        }
        assert_eq!(BigGemm::parse("nope"), None);
        let (nt, kpad, ntp) = (19, 192, 256);
        let x: Vec<i8> = (0..nt * kpad).map(|i| (1 + (i % 251) as u8) as i8).collect();
        let t = tile_x(&x, nt, kpad, ntp);
        assert_eq!(t.len(), 256 * ntp);
        // Every input once, the rest zero.
        assert_eq!(t.iter().filter(|&&v| v != 0).count(), nt * kpad);
        let at = |tok: usize, i: usize| {
            t[(i / 128) * ntp * 128 + (tok / 8) * 1024 + (i % 128 / 16) * 128 + (tok % 8) * 16 + i % 16]
        };
        assert_eq!(at(0, 0), x[0]);
        assert_eq!(at(18, 191), x[18 * kpad + 191]);
        assert_eq!(at(9, 130), x[9 * kpad + 130]);
    }

    #[test]
    fn tail_split_cuts_only_a_thin_last_wave() {
        // o and down at 2048 tokens on an H100: 160 tiles, 28 in the last wave, 4 pieces each.
        assert_eq!(tail_split(132, 160, 40), (132 + 28 * 4, 132 << 8 | 4));
        assert_eq!(tail_split(132, 160, 108), (132 + 28 * 4, 132 << 8 | 4));
        // A last wave of 72 tiles (gate_up) or whole waves stay as they are.
        assert_eq!(tail_split(132, 864, 40), (864, 0));
        assert_eq!(tail_split(132, 264, 40), (264, 0));
        // Under one wave: every tile in pieces (full = 0, the tail still non-zero).
        assert_eq!(tail_split(132, 40, 40), (120, 3));
        // At least 2 stage pairs a piece: 8 stages (4 pairs) allow 2 pieces; 2 pairs none.
        assert_eq!(tail_split(132, 10, 16), (20, 2));
        assert_eq!(tail_split(132, 10, 8), (10, 0));
        // Off, or nothing to run.
        assert_eq!(tail_split(0, 160, 40), (160, 0));
        assert_eq!(tail_split(132, 0, 40), (0, 0));
        // Never more pieces than SMs (the scratch holds one tile per SM), at most 16 a tile.
        for sms in 2..140 {
            for tiles in 1..300 {
                let (blocks, tail) = tail_split(sms, tiles, 108);
                if tail != 0 {
                    let (full, p) = (tail >> 8, tail & 255);
                    assert!((2..=16).contains(&p) && full % sms == 0 && (blocks - full) / p <= sms / p);
                    assert_eq!((blocks - full) % p, 0);
                    assert_eq!(full + (blocks - full) / p, tiles);
                    assert!(blocks - full <= sms);
                }
            }
        }
    }

    #[test]
    fn shape_choice_is_a_plain_variant_that_fits() {
        for nt in [1, 2, 15, 16, 17, 32, 33, 64, 65, 512, 2048] {
            for rows in [16, 640, 2560, 3840, 13824] {
                for sms in [1, 132] {
                    let v = MmaVariant::for_shape(nt, rows, sms);
                    assert!(!v.wgmma, "{nt} x {rows}: {}", v.name);
                    assert!(v.smem() <= 227 << 10, "{}: {} B", v.name, v.smem());
                    // Up to 64 tokens one token tile covers them (no idle tile rows
                    // beyond the 16-token granule).
                    if nt <= 64 && v.bn < 256 {
                        assert!(v.bn >= nt.min(16), "{nt}: {}", v.name);
                    }
                }
            }
        }
        // Big calls get the big tile; 16-token calls the 16-token tile.
        assert_eq!(MmaVariant::for_shape(2048, 13824, 132).name, "tern_mma_256x64");
        assert_eq!(MmaVariant::for_shape(16, 2560, 132).bn, 16);
    }
}
