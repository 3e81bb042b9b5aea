//! AMX-INT8 kernel (Sapphire Rapids and later) for calls with many tokens.
//!
//! Tiles (all 16 rows x 64 bytes): C0..C3 = tmm0..3 (i32, 16 tokens x 16
//! output rows each), A = tmm4/tmm5 (int8 activations, 16 tokens x 64
//! inputs, loaded straight from a zero-padded copy of x), B = tmm6 (int8
//! weights, 16 groups of 4 inputs x 16 rows: "VNNI" order).
//!
//! A B tile row is exactly one expanded group of the tile layout (see
//! layout.rs): `(line >> 2s) & 3` gives 16 rows x 4 inputs of u = w + 1; we
//! store `u - 1 = w` (signed) so TDPBSSD gives the exact dot with no
//! correction. Per row block the whole K panel (`n_in_pad * 16` bytes) is
//! expanded once into per-call scratch and reused by every 64-token group;
//! the resident layout stays 2-bit.
//!
//! Tile state: each `gemm` call loads the tile config (LDTILECFG) on its own
//! thread and releases it (TILERELEASE) before returning, so no state
//! survives between calls and any thread may call it.
//!
//! The driver is generic over [`TileOps`] so its index arithmetic can be
//! tested on machines without AMX through a scalar emulation of the same
//! five operations ([`emulated`]).

use std::arch::asm;
use std::fmt;
use std::sync::{Arc, OnceLock};

use super::layout::{check_gemm_args, Line, TileLayout, LINE, ROWS};
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

pub struct Amx;

impl TernaryKernel for Amx {
    fn name(&self) -> &'static str {
        "amx"
    }
    fn prepare(&self, w: &TernaryMatrix) -> Result<Arc<dyn PackedTernary>> {
        Ok(Arc::new(AmxPacked {
            l: Arc::new(TileLayout::from_canonical(w)?),
            emulate: false,
        }))
    }
    fn prepare_tiled(&self, l: &Arc<TileLayout>) -> Option<Arc<dyn PackedTernary>> {
        Some(Arc::new(AmxPacked {
            l: l.clone(),
            emulate: false,
        }))
    }
}

/// Test double: the same driver with scalar tile operations. Named
/// "amx-emu"; not offered by `select`.
pub fn emulated() -> Arc<dyn TernaryKernel> {
    Arc::new(AmxEmu)
}

struct AmxEmu;

impl TernaryKernel for AmxEmu {
    fn name(&self) -> &'static str {
        "amx-emu"
    }
    fn prepare(&self, w: &TernaryMatrix) -> Result<Arc<dyn PackedTernary>> {
        Ok(Arc::new(AmxPacked {
            l: Arc::new(TileLayout::from_canonical(w)?),
            emulate: true,
        }))
    }
}

struct AmxPacked {
    l: Arc<TileLayout>,
    emulate: bool,
}

impl PackedTernary for AmxPacked {
    fn n_out(&self) -> usize {
        self.l.n_out
    }
    fn n_in(&self) -> usize {
        self.l.n_in
    }
    fn resident_bytes(&self) -> usize {
        self.l.resident_bytes()
    }
    fn row_block(&self) -> usize {
        ROWS
    }
    fn gemm(&self, x: &[i8], n_tokens: usize, r0: usize, r1: usize, out: &mut [i32]) {
        check_gemm_args(&self.l, x, n_tokens, r0, r1, out);
        if self.emulate {
            // SAFETY: Emu only touches memory the driver hands it (in bounds).
            unsafe { drive(&mut Emu::default(), &self.l, x, n_tokens, r0, r1, out) };
            return;
        }
        assert_eq!(
            amx_status(),
            AmxStatus::Granted,
            "amx kernel used without AMX permission"
        );
        // SAFETY: AMX permitted (checked); drive configures and releases tiles.
        unsafe { drive_hw(&self.l, x, n_tokens, r0, r1, out) };
    }
}

/// K inputs per A tile row / per tile step.
const KB: usize = 64;
/// Tokens per step (4 C tiles of 16).
const TB: usize = 64;

/// The five tile operations the driver needs (see module doc for tiles).
trait TileOps {
    /// Load the tile configuration.
    unsafe fn begin(&mut self);
    /// C0..C3 = 0.
    unsafe fn zero(&mut self);
    /// B = 16 x 64 bytes at `b` (stride 64); for j in 0..4: A = 16 x 64
    /// bytes at `a + j * 16 * a_stride` (stride `a_stride`), Cj += A . B.
    unsafe fn step(&mut self, a: *const i8, a_stride: usize, b: *const i8);
    /// Store Cj to `c + j * 256` (16 rows of 16 i32, stride 64 bytes).
    unsafe fn store(&mut self, c: *mut i32);
    /// Release tile state.
    unsafe fn end(&mut self);
}

#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn drive_hw(l: &TileLayout, x: &[i8], n_tokens: usize, r0: usize, r1: usize, out: &mut [i32]) {
    drive(&mut Hw, l, x, n_tokens, r0, r1, out)
}

/// Rows r0..r1 of `W x` through `ops`. Scratch: x zero-padded to
/// `[ceil64(n_tokens)][ceil64(n_in)]`, one row block's expanded weights.
#[inline(always)]
unsafe fn drive<T: TileOps>(
    ops: &mut T,
    l: &TileLayout,
    x: &[i8],
    n_tokens: usize,
    r0: usize,
    r1: usize,
    out: &mut [i32],
) {
    if n_tokens == 0 || r0 == r1 {
        return;
    }
    let kp = l.n_in.next_multiple_of(KB);
    let tp = n_tokens.next_multiple_of(TB);
    // Row stride of the padded x: one extra line so the 16 rows of an A tile
    // do not all map to the same L1 sets when kp is a multiple of 2^k.
    let xs = kp + KB;
    let mut xpad = vec![0i8; tp * xs];
    if l.n_in > 0 {
        for (dst, src) in xpad
            .chunks_exact_mut(xs)
            .zip(x[..n_tokens * l.n_in].chunks_exact(l.n_in))
        {
            dst[..l.n_in].copy_from_slice(src);
        }
    }
    // kp / 4 groups of 64 bytes; groups past the layout's chunks stay w = 0.
    let mut panel = vec![Line([0; LINE]); kp / 4];
    let mut cbuf = [[0i32; 256]; 4];
    ops.begin();
    for b in r0 / ROWS..r1.div_ceil(ROWS) {
        expand_block(l.block(b), &mut panel);
        let rows = (r1 - b * ROWS).min(ROWS);
        for tt in (0..tp).step_by(TB) {
            ops.zero();
            for kb in 0..kp / KB {
                let a = xpad.as_ptr().add(tt * xs + kb * KB);
                let bp = panel.as_ptr().add(kb * (KB / 4)) as *const i8;
                ops.step(a, xs, bp);
            }
            ops.store(cbuf.as_mut_ptr() as *mut i32);
            for t in tt..(tt + TB).min(n_tokens) {
                let c = &cbuf[(t - tt) / 16][16 * ((t - tt) % 16)..];
                for (rr, &v) in c.iter().enumerate().take(rows) {
                    out[(b * ROWS + rr - r0) * n_tokens + t] = v;
                }
            }
        }
    }
    ops.end();
}

/// Group `4c + s` of the panel = `((line c >> 2s) & 3) - 1` as int8 (w).
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

/// Real AMX instructions (tmm0-3 = C, tmm4/5 = A, tmm6 = B).
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
    unsafe fn step(&mut self, a: *const i8, a_stride: usize, b: *const i8) {
        let a16 = 16 * a_stride;
        asm!(
            "tileloadd tmm6, [{b} + {s64}*1]",
            "tileloadd tmm4, [{a} + {st}*1]",
            "tdpbssd tmm0, tmm4, tmm6",
            "add {a}, {a16}",
            "tileloadd tmm5, [{a} + {st}*1]",
            "tdpbssd tmm1, tmm5, tmm6",
            "add {a}, {a16}",
            "tileloadd tmm4, [{a} + {st}*1]",
            "tdpbssd tmm2, tmm4, tmm6",
            "add {a}, {a16}",
            "tileloadd tmm5, [{a} + {st}*1]",
            "tdpbssd tmm3, tmm5, tmm6",
            b = in(reg) b,
            s64 = in(reg) 64usize,
            a = inout(reg) a => _,
            st = in(reg) a_stride,
            a16 = in(reg) a16,
            options(nostack),
        );
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
    unsafe fn end(&mut self) {
        asm!("tilerelease", options(nostack, nomem));
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

impl TileOps for Emu {
    unsafe fn begin(&mut self) {}
    unsafe fn zero(&mut self) {
        self.c = [[0; 256]; 4];
    }
    unsafe fn step(&mut self, a: *const i8, a_stride: usize, b: *const i8) {
        for (j, c) in self.c.iter_mut().enumerate() {
            for m in 0..16 {
                let arow = a.add((16 * j + m) * a_stride);
                for n in 0..16 {
                    let mut acc = 0i32;
                    for k in 0..16 {
                        for i in 0..4 {
                            acc += *arow.add(4 * k + i) as i32 * *b.add(64 * k + 4 * n + i) as i32;
                        }
                    }
                    c[16 * m + n] += acc;
                }
            }
        }
    }
    unsafe fn store(&mut self, c: *mut i32) {
        for (j, t) in self.c.iter().enumerate() {
            std::ptr::copy_nonoverlapping(t.as_ptr(), c.add(256 * j), 256);
        }
    }
    unsafe fn end(&mut self) {}
}
