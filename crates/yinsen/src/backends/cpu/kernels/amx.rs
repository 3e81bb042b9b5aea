//! AMX-INT8 kernel (Sapphire Rapids and later) for calls with many tokens.
//!
//! Tiles (all 16 rows x 64 bytes): C0..C3 = tmm0..3 (i32, 16 tokens x 16
//! output rows each), A0/A1 = tmm4/tmm5 (int8 activations, 16 tokens x 64
//! inputs), B0/B1 = tmm6/tmm7 (int8 weights of two row blocks, 16 groups of 4
//! inputs x 16 rows: "VNNI" order). Register blocking 2 x 2: per K step two A
//! and two B loads feed four TDPBSSD (C_{2i+j} += A_i . B_j).
//!
//! A B tile row is exactly one expanded group of the tile layout (see
//! layout.rs): `(line >> 2s) & 3` gives 16 rows x 4 inputs of u = w + 1; we
//! store `u - 1 = w` (signed) so TDPBSSD gives the exact dot with no
//! correction. The row range is cut into super-blocks whose expanded weights
//! (`n_in_pad * 16` bytes per row block) fit a per-thread L2-sized scratch;
//! each is expanded once per call and reused by every 32-token pair of A
//! tiles. The resident layout stays 2-bit.
//!
//! Activations: when `n_in` is a multiple of 64, whole 32-token pairs are
//! loaded straight from `x` (tile stride `n_in`); only the last partial pair
//! (or everything, for other `n_in`) goes through a zero-padded copy.
//!
//! Tile state: each `gemm` call loads the tile config (LDTILECFG) on its own
//! thread and releases it (TILERELEASE) before returning, so no state
//! survives between calls and any thread may call it.
//!
//! The driver is generic over [`TileOps`] so its index arithmetic can be
//! tested on machines without AMX through a scalar emulation of the same
//! operations ([`emulated`]).

use std::arch::asm;
use std::cell::RefCell;
use std::fmt;
use std::sync::{Arc, OnceLock};

use super::layout::{Codes, Line, TileLayout, TiledPacked, LINE, ROWS};
use super::{PackedTernary, TernaryKernel};
use crate::error::Result;
use crate::model::TernaryMatrix;

/// Whether AMX-INT8 can be used by this process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AmxStatus {
    /// The CPU has no AMX-TILE/AMX-INT8.
    Unsupported,
    /// The CPU has it but the OS did not enable it / refused permission.
    Denied(String),
    Granted,
}

impl fmt::Display for AmxStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AmxStatus::Unsupported => write!(f, "CPU has no AMX-INT8"),
            AmxStatus::Denied(why) => write!(f, "AMX present but not usable: {why}"),
            AmxStatus::Granted => write!(f, "AMX-INT8 granted"),
        }
    }
}

/// Detects AMX once per process and, on Linux, asks the kernel for
/// permission to use the tile data state.
pub fn amx_status() -> AmxStatus {
    static STATUS: OnceLock<AmxStatus> = OnceLock::new();
    STATUS.get_or_init(detect).clone()
}

fn detect() -> AmxStatus {
    let l7 = std::arch::x86_64::__cpuid_count(7, 0);
    let (tile, int8) = (l7.edx >> 24 & 1 == 1, l7.edx >> 25 & 1 == 1);
    if !(tile && int8) {
        return AmxStatus::Unsupported;
    }
    let l1 = std::arch::x86_64::__cpuid(1);
    if l1.ecx >> 27 & 1 == 0 {
        return AmxStatus::Denied("OS has not enabled XSAVE (OSXSAVE clear)".into());
    }
    // XCR0 bits 17 (XTILECFG) and 18 (XTILEDATA): the OS manages tile state.
    let xcr0 = xgetbv0();
    if xcr0 >> 17 & 3 != 3 {
        return AmxStatus::Denied(format!("OS does not manage AMX state (XCR0 = {xcr0:#x})"));
    }
    request_permission()
}

fn xgetbv0() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: only called after checking OSXSAVE, which makes XGETBV legal.
    unsafe { asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (hi as u64) << 32 | lo as u64
}

#[cfg(target_os = "linux")]
fn request_permission() -> AmxStatus {
    const ARCH_GET_XCOMP_PERM: libc::c_long = 0x1022;
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these codes only reads/writes the given u64.
    let rc = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        return AmxStatus::Denied(format!("arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) failed: {err}"));
    }
    let mut mask: u64 = 0;
    // SAFETY: the kernel writes one u64 through the pointer.
    let rc = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &mut mask as *mut u64) };
    if rc != 0 || mask >> XFEATURE_XTILEDATA & 1 == 0 {
        return AmxStatus::Denied(format!("XTILEDATA not in permitted features (mask {mask:#x})"));
    }
    AmxStatus::Granted
}

#[cfg(not(target_os = "linux"))]
fn request_permission() -> AmxStatus {
    AmxStatus::Denied("AMX permission request is only implemented on Linux".into())
}

/// The AMX kernel; `KS` > 0 cuts the K loop into slices of `KS` steps (a
/// test double, see [`sliced`]). `HW` false runs the same driver with scalar
/// tile operations (the `emulated` test doubles).
pub struct Amx<const KS: usize = 0, const HW: bool = true>;

impl<const KS: usize, const HW: bool> TernaryKernel for Amx<KS, HW> {
    fn name(&self) -> &'static str {
        match (HW, KS == 0) {
            (true, true) => "amx",
            (true, false) => "amx-k3",
            (false, true) => "amx-emu",
            (false, false) => "amx-emu-k3",
        }
    }
    fn prepare(&self, w: &TernaryMatrix) -> Result<Arc<dyn PackedTernary>> {
        Ok(Self::packed(Arc::new(TileLayout::from_canonical(w)?)))
    }
    fn prepare_tiled(&self, l: &Arc<TileLayout>) -> Option<Arc<dyn PackedTernary>> {
        Some(Self::packed(l.clone()))
    }
}

impl<const KS: usize, const HW: bool> Amx<KS, HW> {
    fn packed(l: Arc<TileLayout>) -> Arc<dyn PackedTernary> {
        TiledPacked::shared_tm(l, gemm::<HW, KS, false>, gemm::<HW, KS, true>)
    }
}

/// Test double: real AMX with the K loop cut into slices of 3 steps (C
/// tiles parked between slices), the path `YINSEN_AMX_KSLICE` selects.
/// Named "amx-k3"; not offered by `select`.
pub fn sliced() -> Arc<dyn TernaryKernel> {
    Arc::new(Amx::<3>)
}

/// Test double: the same driver with scalar tile operations. Named
/// "amx-emu"; not offered by `select`.
pub fn emulated() -> Arc<dyn TernaryKernel> {
    Arc::new(Amx::<0, false>)
}

/// [`emulated`] with the K loop in slices of 3 steps ("amx-emu-k3").
pub fn emulated_sliced() -> Arc<dyn TernaryKernel> {
    Arc::new(Amx::<3, false>)
}

/// Entry from `TiledPacked` (shapes checked there): real AMX tiles with
/// `HW`, else their scalar emulation (tests on machines without AMX); K
/// slices of `KS` steps (0: [`k_slice`]), token-major output with `TM`.
fn gemm<const HW: bool, const KS: usize, const TM: bool>(
    l: &TileLayout,
    x: &[i8],
    n_tokens: usize,
    r0: usize,
    r1: usize,
    out: &mut [i32],
) {
    let ks = ks_or_default(KS);
    let c = Call {
        l,
        x,
        n_tokens,
        r0,
        r1,
        out,
        tm: TM,
        ks,
    };
    if HW {
        assert_eq!(
            amx_status(),
            AmxStatus::Granted,
            "amx kernel used without AMX permission"
        );
        // SAFETY: AMX permitted (checked); drive configures and releases tiles.
        unsafe { drive_hw(c) };
    } else {
        // SAFETY: Emu only touches memory the driver hands it (in bounds).
        unsafe { drive(&mut Emu::default(), c) };
    }
}

/// K inputs per A tile row / per K step.
const KB: usize = 64;
/// Tokens per A tile (rows of a C tile).
const TT: usize = 16;
/// Tokens per step: two A tiles.
const TP: usize = 2 * TT;
/// Bytes of one expanded K step of one row block (a B tile).
const B_STEP: usize = 16 * LINE;
/// Target size of a super-block's expanded weights: they and one token
/// pair's activations (`32 * n_in` bytes) stay in L2 while every token pair
/// passes over them.
const PANEL_BYTES: usize = 512 << 10;
/// `PANEL_BYTES`, or `YINSEN_AMX_PANEL_KB` KiB (for measurements).
fn panel_bytes() -> usize {
    static P: OnceLock<usize> = OnceLock::new();
    *P.get_or_init(|| {
        std::env::var("YINSEN_AMX_PANEL_KB")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&k| k > 0)
            .map_or(PANEL_BYTES, |k| k << 10)
    })
}

/// K steps per slice of the driver's K loop: whole K (the default), or
/// `YINSEN_AMX_KSLICE` steps (0 = whole K). Slices of 8 steps kept a token
/// pair's A slice (16 KB) in L1 across the row pairs, but the C tiles are
/// then parked in memory and reloaded around every slice, and on the device
/// a tile stored and reloaded costs more than A tiles from L2: the 2x2 loop
/// ran at 587 against 1667 GOPS on one core of a slow host, and the layer's
/// matmuls took 4.02-4.64 ms with whole K against 4.92-4.95 ms with slices
/// of 8 (16 threads, inputs on 64-byte lines; docs/performance.md, S19).
fn k_slice() -> usize {
    static K: OnceLock<usize> = OnceLock::new();
    *K.get_or_init(|| {
        match std::env::var("YINSEN_AMX_KSLICE")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
        {
            Some(k) if k > 0 => k,
            _ => usize::MAX,
        }
    })
}

/// `ks`, or [`k_slice`] for 0.
fn ks_or_default(ks: usize) -> usize {
    if ks == 0 {
        k_slice()
    } else {
        ks
    }
}

/// Token pairs that run each K slice together for a super-block of `npairs`
/// row pairs over `kp` inputs, so a slice of B stays in L1 across the group:
/// 1 (the A-reuse order) unless `YINSEN_AMX_TGROUP` = N, which applies to
/// super-blocks of at most `YINSEN_AMX_TGROUP_PAIRS` (2) row pairs with K
/// at most 4096. On the device (docs/performance.md, CPU prefill), 4 or 16
/// for every matmul made down (K = 6912, A beyond L2) slower, 52 -> 66-78
/// ms; limited to K <= 4096, no difference above the host's noise.
fn t_group(npairs: usize, kp: usize) -> usize {
    static G: OnceLock<(Option<usize>, usize)> = OnceLock::new();
    let (g, maxp) = *G.get_or_init(|| {
        let get = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok());
        (
            get("YINSEN_AMX_TGROUP").map(|g| g.max(1)),
            get("YINSEN_AMX_TGROUP_PAIRS").unwrap_or(2),
        )
    });
    match g {
        Some(g) if npairs <= maxp && kp <= 4096 => g,
        _ => 1,
    }
}

/// Scratch kept per thread between calls; more is freed after the call.
const KEEP_LINES: usize = (1 << 20) / LINE;

/// The tile operations the driver needs (see module doc for tiles).
trait TileOps {
    /// Load the tile configuration.
    unsafe fn begin(&mut self);
    /// C0..C3 = 0.
    unsafe fn zero(&mut self);
    /// `nk` K steps: at step k, A_i = 16 x 64 bytes at `a[i] + 64 k` (stride
    /// `sa[i]`), B_j = 16 x 64 bytes at `b + j * b_next + 1024 k` (stride 64),
    /// and C_{2i+j} += A_i . B_j for i < 2, j < nb (nb is 1 or 2).
    unsafe fn run(&mut self, a: [*const i8; 2], sa: [usize; 2], b: *const i8, b_next: usize, nk: usize, nb: usize);
    /// Store Cq to `c + q * 256` (16 rows of 16 i32, stride 64 bytes).
    unsafe fn store(&mut self, c: *mut i32);
    /// Load Cq from `c + q * 256` (the inverse of `store`).
    unsafe fn load(&mut self, c: *const i32);
    /// Store tile Cq alone: 16 rows of 16 i32 at `c`, row stride `stride` bytes.
    unsafe fn store_one(&mut self, q: usize, c: *mut i32, stride: usize);
    /// Release tile state.
    unsafe fn end(&mut self);
    /// Write the transpose of C tile `c` (token x row) to `dst` (row x
    /// token, row stride `stride` i32): rows `< vr`, tokens `< vt` only.
    unsafe fn scatter(&self, c: &[i32; 256], dst: *mut i32, stride: usize, vr: usize, vt: usize) {
        scatter_scalar(c, dst, stride, vr, vt)
    }
}

unsafe fn scatter_scalar(c: &[i32; 256], dst: *mut i32, stride: usize, vr: usize, vt: usize) {
    for n in 0..vr {
        for m in 0..vt {
            *dst.add(n * stride + m) = c[16 * m + n];
        }
    }
}

/// 16 x 16 i32 transpose (4 shuffle stages) and masked row stores.
#[target_feature(enable = "avx512f")]
unsafe fn scatter_avx512(c: &[i32; 256], dst: *mut i32, stride: usize, vr: usize, vt: usize) {
    use std::arch::x86_64::*;
    let r: [__m512i; 16] = std::array::from_fn(|i| _mm512_loadu_si512(c.as_ptr().add(16 * i) as *const _));
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    // u[4g + k], 128-bit lane L: column 4L + k of rows 4g..4g+4.
    let mut u = [_mm512_setzero_si512(); 16];
    for g in 0..4 {
        u[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
        u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
    }
    let mask: __mmask16 = if vt >= 16 { 0xffff } else { (1u16 << vt) - 1 };
    for k in 0..4 {
        let v_even = _mm512_shuffle_i32x4::<0x88>(u[k], u[4 + k]);
        let v_odd = _mm512_shuffle_i32x4::<0xDD>(u[k], u[4 + k]);
        let w_even = _mm512_shuffle_i32x4::<0x88>(u[8 + k], u[12 + k]);
        let w_odd = _mm512_shuffle_i32x4::<0xDD>(u[8 + k], u[12 + k]);
        let cols = [
            (k, _mm512_shuffle_i32x4::<0x88>(v_even, w_even)),
            (4 + k, _mm512_shuffle_i32x4::<0x88>(v_odd, w_odd)),
            (8 + k, _mm512_shuffle_i32x4::<0xDD>(v_even, w_even)),
            (12 + k, _mm512_shuffle_i32x4::<0xDD>(v_odd, w_odd)),
        ];
        for (n, col) in cols {
            if n < vr {
                _mm512_mask_storeu_epi32(dst.add(n * stride), mask, col);
            }
        }
    }
}

/// One driver call: rows r0..r1 of `W x` for `n_tokens` tokens of `x` into
/// `out` (token-major with `tm`), K in slices of `ks` steps (one argument
/// for the `#[target_feature]` wrapper and the driver alike).
struct Call<'a> {
    l: &'a TileLayout,
    x: &'a [i8],
    n_tokens: usize,
    r0: usize,
    r1: usize,
    out: &'a mut [i32],
    tm: bool,
    ks: usize,
}

#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn drive_hw(c: Call) {
    drive(&mut Hw, c)
}

thread_local! {
    /// Per-thread expanded-weight panel, reused across calls.
    static PANEL: RefCell<Vec<Line>> = const { RefCell::new(Vec::new()) };
}

/// The [`Call`] through `ops` (see module doc for the blocking):
/// row-major `out[(r - r0) * n_tokens + t]`, or with `tm` token-major
/// `out[t * (r1 - r0) + r - r0]`, which is a C tile's own order: whole
/// tiles are stored straight into `out` (no transpose).
#[inline(always)]
unsafe fn drive<T: TileOps>(ops: &mut T, c: Call) {
    let (l, x, n_tokens, r0, r1, out, tm, ks) = (c.l, c.x, c.n_tokens, c.r0, c.r1, c.out, c.tm, c.ks);
    if n_tokens == 0 || r0 == r1 {
        return;
    }
    if l.n_in == 0 {
        out.fill(0);
        return;
    }
    let kp = l.n_in.next_multiple_of(KB);
    // Tokens read in place: whole pairs, when an A row is whole K steps.
    let direct = if l.n_in.is_multiple_of(KB) {
        n_tokens / TP * TP
    } else {
        0
    };
    // Padded copy of the rest; one extra line per row so the 16 rows of an A
    // tile do not all map to the same L1 sets when kp is a multiple of 2^k.
    let xs = kp + KB;
    let rest = n_tokens - direct;
    let mut xpad = Codes::zeroed(rest.next_multiple_of(TP) * xs);
    for (dst, src) in xpad
        .chunks_exact_mut(xs)
        .zip(x[direct * l.n_in..n_tokens * l.n_in].chunks_exact(l.n_in))
    {
        dst[..l.n_in].copy_from_slice(src);
    }
    let a_at = |t: usize| -> (*const i8, usize) {
        if t < direct {
            (x.as_ptr().add(t * l.n_in), l.n_in)
        } else {
            (xpad.as_ptr().add((t - direct) * xs), xs)
        }
    };
    let blk = kp / 4; // expanded lines per row block
    let (b0, b1) = (r0 / ROWS, r1.div_ceil(ROWS));
    let sb = ((panel_bytes() / (blk * LINE)).max(2) & !1).min(b1 - b0);
    let mut panel = PANEL.with(|p| std::mem::take(&mut *p.borrow_mut()));
    panel.resize(sb * blk, Line([0; LINE]));
    let nk = kp / KB;
    let ks = ks.clamp(1, nk);
    let mut cacc: Vec<CTiles> = Vec::new();
    let op = out.as_mut_ptr();
    // Token-major row pitch (i32) of `out`.
    let ldo = r1 - r0;
    ops.begin();
    for s0 in (b0..b1).step_by(sb) {
        let s1 = (s0 + sb).min(b1);
        for b in s0..s1 {
            expand_block(l.block(b), &mut panel[(b - s0) * blk..(b - s0 + 1) * blk]);
        }
        let npairs = (s1 - s0).div_ceil(2);
        let ntp = n_tokens.div_ceil(TP);
        // Token pairs per group: the group's pairs run slice by slice
        // together, so a slice of B (npairs x 16 KB) is reused by every
        // token pair of the group (one group = the order A-reuse-only).
        let g = t_group(npairs, kp).clamp(1, ntp);
        // One row pair and one token pair per slice: no other row pair
        // reuses the A slice, so slicing K would only park and reload the
        // C tiles. Whole K keeps them in the tile registers (device: layer
        // matmuls 6.2 -> 5.9 ms median over five same-call pairs, S8-1/S8-2).
        let ks = if npairs == 1 && g == 1 { nk } else { ks };
        cacc.resize_with(npairs * g, || CTiles([[0; 256]; 4]));
        for tg0 in (0..ntp).step_by(g) {
            let tg1 = (tg0 + g).min(ntp);
            // K in slices of `ks` steps, every row pair per slice: the two A
            // tiles' slice stays in L1 across the pairs; C tiles are parked
            // in `cacc` between slices.
            for k0 in (0..nk).step_by(ks) {
                let kn = ks.min(nk - k0);
                let last = k0 + kn >= nk;
                for tp in tg0..tg1 {
                    let t0 = tp * TP;
                    let ((a0, sa0), (a1, sa1)) = (a_at(t0), a_at(t0 + TT));
                    for (pi, bp) in (s0..s1).step_by(2).enumerate() {
                        let nb = (s1 - bp).min(2);
                        let bptr = (panel.as_ptr().add((bp - s0) * blk) as *const i8).add(k0 * B_STEP);
                        let c = cacc[(tp - tg0) * npairs + pi].0.as_mut_ptr() as *mut i32;
                        if k0 == 0 {
                            ops.zero();
                        } else {
                            ops.load(c);
                        }
                        ops.run([a0.add(KB * k0), a1.add(KB * k0)], [sa0, sa1], bptr, blk * LINE, kn, nb);
                        // Token-major, last slice, every tile whole: straight to `out`.
                        let whole = t0 + TP <= n_tokens && (bp + nb) * ROWS <= r1;
                        if tm && last && whole {
                            for i in 0..2 {
                                for j in 0..nb {
                                    let dst = op.add((t0 + TT * i) * ldo + (bp + j) * ROWS - r0);
                                    ops.store_one(2 * i + j, dst, ldo * 4);
                                }
                            }
                        } else {
                            ops.store(c);
                        }
                    }
                }
            }
            for tp in tg0..tg1 {
                let t0 = tp * TP;
                let cg = &cacc[(tp - tg0) * npairs..(tp - tg0 + 1) * npairs];
                if tm {
                    // Tiles cut by the token or row end: their valid part, row by row.
                    let lt = (n_tokens - t0).min(TP);
                    for (pi, bp) in (s0..s1).step_by(2).enumerate() {
                        let nb = (s1 - bp).min(2);
                        if t0 + TP <= n_tokens && (bp + nb) * ROWS <= r1 {
                            continue;
                        }
                        for i in 0..2 {
                            for j in 0..nb {
                                let row = (bp + j) * ROWS;
                                let vr = (r1 - row).min(ROWS);
                                let c = &cg[pi].0[2 * i + j];
                                for m in 0..TT.min(lt.saturating_sub(TT * i)) {
                                    let dst = op.add((t0 + TT * i + m) * ldo + row - r0);
                                    std::ptr::copy_nonoverlapping(c.as_ptr().add(16 * m), dst, vr);
                                }
                            }
                        }
                    }
                    continue;
                }
                for (pi, bp) in (s0..s1).step_by(2).enumerate() {
                    let nb = (s1 - bp).min(2);
                    for i in 0..2 {
                        let t = t0 + TT * i;
                        for j in 0..nb {
                            let row = (bp + j) * ROWS;
                            if t < n_tokens && row < r1 {
                                let dst = op.add((row - r0) * n_tokens + t);
                                ops.scatter(
                                    &cg[pi].0[2 * i + j],
                                    dst,
                                    n_tokens,
                                    (r1 - row).min(ROWS),
                                    (n_tokens - t).min(TT),
                                );
                            }
                        }
                    }
                }
            }
        }
    }
    ops.end();
    if panel.capacity() <= KEEP_LINES {
        PANEL.with(|p| *p.borrow_mut() = panel);
    }
}

#[repr(C, align(64))]
struct CTiles([[i32; 256]; 4]);

/// Group `4c + s` of the panel = `((line c >> 2s) & 3) - 1` as int8 (w);
/// groups past the layout's chunks (K padding to 64) are w = 0.
#[inline(always)]
fn expand_block(lines: &[Line], panel: &mut [Line]) {
    for (c, line) in lines.iter().enumerate() {
        for s in 0..4 {
            let g = &mut panel[4 * c + s].0;
            for (o, &byte) in g.iter_mut().zip(line.0.iter()) {
                *o = (((byte >> (2 * s)) & 3) as i8 - 1) as u8;
            }
        }
    }
    for g in &mut panel[4 * lines.len()..] {
        g.0 = [0; LINE];
    }
}

/// 64-byte LDTILECFG operand: palette 1, tiles 0..8 all 16 rows x 64 bytes.
#[repr(C, align(64))]
struct TileCfg([u8; 64]);

const TILE_CFG: TileCfg = {
    let mut c = [0u8; 64];
    c[0] = 1; // palette_id
    let mut i = 0;
    while i < 8 {
        c[16 + 2 * i] = 64; // colsb[i] (u16 LE)
        c[48 + i] = 16; // rows[i]
        i += 1;
    }
    TileCfg(c)
};

/// Real AMX instructions (tmm0-3 = C, tmm4/5 = A, tmm6/7 = B).
struct Hw;

impl TileOps for Hw {
    unsafe fn begin(&mut self) {
        asm!("ldtilecfg [{}]", in(reg) &TILE_CFG as *const TileCfg, options(nostack));
    }
    unsafe fn zero(&mut self) {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack)
        );
    }
    unsafe fn run(&mut self, a: [*const i8; 2], sa: [usize; 2], b: *const i8, b_next: usize, nk: usize, nb: usize) {
        if nk == 0 {
            return;
        }
        if nb == 2 {
            asm!(
                "2:",
                "tileloadd tmm4, [{a0} + {sa0}*1]",
                "tileloadd tmm6, [{b0} + {s64}*1]",
                "tdpbssd tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {s64}*1]",
                "tdpbssd tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {sa1}*1]",
                "tdpbssd tmm2, tmm5, tmm6",
                "tdpbssd tmm3, tmm5, tmm7",
                "add {a0}, 64",
                "add {a1}, 64",
                "add {b0}, {bstep}",
                "add {b1}, {bstep}",
                "dec {n}",
                "jnz 2b",
                a0 = inout(reg) a[0] => _,
                a1 = inout(reg) a[1] => _,
                sa0 = in(reg) sa[0],
                sa1 = in(reg) sa[1],
                b0 = inout(reg) b => _,
                b1 = inout(reg) b.add(b_next) => _,
                s64 = in(reg) 64usize,
                bstep = const B_STEP,
                n = inout(reg) nk => _,
                options(nostack),
            );
        } else {
            asm!(
                "2:",
                "tileloadd tmm6, [{b0} + {s64}*1]",
                "tileloadd tmm4, [{a0} + {sa0}*1]",
                "tdpbssd tmm0, tmm4, tmm6",
                "tileloadd tmm5, [{a1} + {sa1}*1]",
                "tdpbssd tmm2, tmm5, tmm6",
                "add {a0}, 64",
                "add {a1}, 64",
                "add {b0}, {bstep}",
                "dec {n}",
                "jnz 2b",
                a0 = inout(reg) a[0] => _,
                a1 = inout(reg) a[1] => _,
                sa0 = in(reg) sa[0],
                sa1 = in(reg) sa[1],
                b0 = inout(reg) b => _,
                s64 = in(reg) 64usize,
                bstep = const B_STEP,
                n = inout(reg) nk => _,
                options(nostack),
            );
        }
    }
    unsafe fn store(&mut self, c: *mut i32) {
        asm!(
            "tilestored [{c} + {s64}*1], tmm0",
            "tilestored [{c} + {s64}*1 + 1024], tmm1",
            "tilestored [{c} + {s64}*1 + 2048], tmm2",
            "tilestored [{c} + {s64}*1 + 3072], tmm3",
            c = in(reg) c,
            s64 = in(reg) 64usize,
            options(nostack),
        );
    }
    unsafe fn load(&mut self, c: *const i32) {
        asm!(
            "tileloadd tmm0, [{c} + {s64}*1]",
            "tileloadd tmm1, [{c} + {s64}*1 + 1024]",
            "tileloadd tmm2, [{c} + {s64}*1 + 2048]",
            "tileloadd tmm3, [{c} + {s64}*1 + 3072]",
            c = in(reg) c,
            s64 = in(reg) 64usize,
            options(nostack),
        );
    }
    unsafe fn store_one(&mut self, q: usize, c: *mut i32, stride: usize) {
        match q {
            0 => asm!("tilestored [{c} + {s}*1], tmm0", c = in(reg) c, s = in(reg) stride, options(nostack)),
            1 => asm!("tilestored [{c} + {s}*1], tmm1", c = in(reg) c, s = in(reg) stride, options(nostack)),
            2 => asm!("tilestored [{c} + {s}*1], tmm2", c = in(reg) c, s = in(reg) stride, options(nostack)),
            _ => asm!("tilestored [{c} + {s}*1], tmm3", c = in(reg) c, s = in(reg) stride, options(nostack)),
        }
    }
    unsafe fn end(&mut self) {
        asm!("tilerelease", options(nostack, nomem));
    }
    unsafe fn scatter(&self, c: &[i32; 256], dst: *mut i32, stride: usize, vr: usize, vt: usize) {
        scatter_avx512(c, dst, stride, vr, vt)
    }
}

/// Scalar model of the same operations (TDPBSSD semantics:
/// `C[m][n] += sum_{k<16, i<4} A[m][4k + i] * B[k][4n + i]`, signed x signed).
struct Emu {
    c: [[i32; 256]; 4],
}

impl Default for Emu {
    fn default() -> Self {
        Emu { c: [[0; 256]; 4] }
    }
}

impl Emu {
    unsafe fn dp(&mut self, q: usize, a: *const i8, sa: usize, b: *const i8) {
        for m in 0..16 {
            let arow = a.add(m * sa);
            for n in 0..16 {
                let mut acc = 0i32;
                for k in 0..16 {
                    for i in 0..4 {
                        acc += *arow.add(4 * k + i) as i32 * *b.add(64 * k + 4 * n + i) as i32;
                    }
                }
                self.c[q][16 * m + n] += acc;
            }
        }
    }
}

impl TileOps for Emu {
    unsafe fn begin(&mut self) {}
    unsafe fn zero(&mut self) {
        self.c = [[0; 256]; 4];
    }
    unsafe fn run(&mut self, a: [*const i8; 2], sa: [usize; 2], b: *const i8, b_next: usize, nk: usize, nb: usize) {
        for k in 0..nk {
            for i in 0..2 {
                for j in 0..nb {
                    self.dp(2 * i + j, a[i].add(KB * k), sa[i], b.add(j * b_next + B_STEP * k));
                }
            }
        }
    }
    unsafe fn store(&mut self, c: *mut i32) {
        for (j, t) in self.c.iter().enumerate() {
            std::ptr::copy_nonoverlapping(t.as_ptr(), c.add(256 * j), 256);
        }
    }
    unsafe fn load(&mut self, c: *const i32) {
        for (j, t) in self.c.iter_mut().enumerate() {
            std::ptr::copy_nonoverlapping(c.add(256 * j), t.as_mut_ptr(), 256);
        }
    }
    unsafe fn store_one(&mut self, q: usize, c: *mut i32, stride: usize) {
        for m in 0..16 {
            let row = (c as *mut u8).add(m * stride) as *mut i32;
            std::ptr::copy_nonoverlapping(self.c[q].as_ptr().add(16 * m), row, 16);
        }
    }
    unsafe fn end(&mut self) {}
}

/// Micro-benchmarks of the tile loop, for the device study of where the
/// AMX GEMM loses against the unit's peak (`kernels_bench`'s
/// `bench_amx_micro`). Each variant runs the 2 x 2 loop of [`Hw::run`] on
/// this thread for about `secs` seconds and returns int8 GOPS (2 ops per
/// multiply-add); `None` without AMX permission.
#[doc(hidden)]
pub mod micro {
    use super::*;

    /// The variants, in the order the bench prints them: `l1` A and B in
    /// L1 (16 KB each), `l2b` B streamed from a 512 KB panel (L2) with A's
    /// K slice in L1, `l2ab` whole K per (token pair, row pair): A (32 x
    /// 2560 bytes) and B both from L2; `-mis`: A and B 16 bytes off a line,
    /// `-amis`: A only (as a plain Vec<i8> input is); `-park`: the C tiles
    /// stored and reloaded around each 8-step slice. (A variant with B
    /// prefetched two steps ahead gained nothing, S19-2, and is gone.)
    pub const VARIANTS: [&str; 10] = [
        "expand",
        "peak",
        "l1",
        "l1-mis",
        "l2b",
        "l2b-amis",
        "l2b-park",
        "l2b-amis-park",
        "l2ab",
        "l2ab-amis",
    ];

    pub fn run(variant: &str, secs: f64) -> Option<f64> {
        if amx_status() != AmxStatus::Granted {
            return None;
        }
        if variant == "expand" {
            // SAFETY: every AMX CPU has AVX-512 F and BW (as drive_hw assumes).
            return Some(unsafe { expand_gbs(secs) });
        }
        let has = |w: &str| variant.split('-').any(|p| p == w);
        let (a_off, b_off) = match () {
            _ if has("mis") => (16, 16),
            _ if has("amis") => (16, 0),
            _ => (0, 0),
        };
        let whole_k = has("l2ab");
        // K steps per run, A row stride, B bytes per row block, row pairs.
        let (nk, sa, pairs) = match () {
            _ if whole_k => (40, 2560, 6),
            _ if has("l1") => (8, 512, 1),
            _ => (8, 512, 32),
        };
        let rb = nk * B_STEP;
        let lines = |bytes: usize| vec![Line([0; LINE]); bytes / LINE + 2];
        let mut a_buf = lines(32 * sa);
        let mut b_buf = lines(pairs * 2 * rb);
        for (i, l) in a_buf.iter_mut().enumerate() {
            l.0 = std::array::from_fn(|j| ((i * 64 + j) * 37 % 251) as u8);
        }
        for (i, l) in b_buf.iter_mut().enumerate() {
            l.0 = std::array::from_fn(|j| ((i * 64 + j) % 3) as i8 as u8 - 1);
        }
        let mut c = CTiles([[0; 256]; 4]);
        let cp = c.0.as_mut_ptr() as *mut i32;
        let t0 = std::time::Instant::now();
        let mut steps = 0u64;
        // SAFETY: AMX permitted; every pointer stays inside the buffers
        // (each has two spare lines for the offsets).
        unsafe {
            let a = (a_buf.as_ptr() as *const i8).add(a_off);
            let b = (b_buf.as_ptr() as *const i8).add(b_off);
            Hw.begin();
            Hw.zero();
            while t0.elapsed().as_secs_f64() < secs {
                for s in 0..pairs {
                    let bp = b.add(s * 2 * rb);
                    let park = has("park");
                    if park {
                        Hw.load(cp);
                    }
                    if variant == "peak" {
                        peak(64);
                    } else {
                        Hw.run([a, a.add(16 * sa)], [sa, sa], bp, rb, nk, 2);
                    }
                    if park {
                        Hw.store(cp);
                    }
                }
                steps += pairs as u64 * if variant == "peak" { 64 } else { nk as u64 };
            }
            Hw.store(cp);
            Hw.end();
        }
        std::hint::black_box(&c);
        // 4 TDPBSSD of 16 x 16 x 64 multiply-adds per step.
        Some(steps as f64 * 4.0 * 16384.0 * 2.0 / t0.elapsed().as_secs_f64() / 1e9)
    }

    /// GB/s of expanded panel written by [`expand_block`] (512 KB panels
    /// from 128 KB of 2-bit lines), in "GOPS" units of the caller (1e9/s).
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn expand_gbs(secs: f64) -> f64 {
        let src: Vec<Line> = (0..2048)
            .map(|i| Line(std::array::from_fn(|j| (i * 64 + j) as u8 | 0x55)))
            .collect();
        let mut panel = vec![Line([0; LINE]); 4 * src.len()];
        let t0 = std::time::Instant::now();
        let mut n = 0u64;
        while t0.elapsed().as_secs_f64() < secs {
            for b in 0..8 {
                expand_block(&src[b * 256..(b + 1) * 256], &mut panel[b * 1024..(b + 1) * 1024]);
            }
            std::hint::black_box(&mut panel);
            n += (panel.len() * LINE) as u64;
        }
        n as f64 / t0.elapsed().as_secs_f64() / 1e9
    }

    /// `n` steps of four independent TDPBSSD on loaded tiles (no loads).
    unsafe fn peak(n: usize) {
        asm!(
            "2:",
            "tdpbssd tmm0, tmm4, tmm6",
            "tdpbssd tmm1, tmm4, tmm7",
            "tdpbssd tmm2, tmm5, tmm6",
            "tdpbssd tmm3, tmm5, tmm7",
            "dec {n}",
            "jnz 2b",
            n = inout(reg) n => _,
            options(nostack),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn avx512_scatter_matches_scalar() {
        if !is_x86_feature_detected!("avx512f") {
            let _ = std::io::Write::write_fmt(&mut std::io::stderr(), format_args!("SKIP: no AVX-512\n")); // uncaptured: visible in CI logs
            return;
        }
        let c: [i32; 256] = std::array::from_fn(|i| (i as i32 * 7919) ^ 0x5a5a);
        let stride = 37;
        for (vr, vt) in [(16, 16), (3, 16), (16, 5), (1, 1), (7, 9)] {
            let mut want = vec![i32::MIN + 7; 16 * stride];
            let mut got = want.clone();
            // SAFETY: 16 rows of `stride >= 16` i32 fit in both buffers.
            unsafe {
                scatter_scalar(&c, want.as_mut_ptr(), stride, vr, vt);
                scatter_avx512(&c, got.as_mut_ptr(), stride, vr, vt);
            }
            assert_eq!(got, want, "vr {vr} vt {vt}");
            assert_eq!(
                want[stride + 2],
                if vr > 1 && vt > 2 { c[16 * 2 + 1] } else { i32::MIN + 7 }
            );
        }
    }
}
