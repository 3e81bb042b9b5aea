//! Ternary x int8 -> int32 kernels for the CPU path, one file per family,
//! chosen at run time by feature detection. Every kernel owns its weight
//! layout (derived from the canonical form in `prepare`) and must produce
//! int32 results bit-equal to [`super::reference::ternary_matmul_i32`].

#[cfg(target_arch = "x86_64")]
pub mod amx;
#[cfg(target_arch = "x86_64")]
pub mod avx2;
pub mod base3;
pub mod layout;
pub mod policy;
pub mod scalar;
#[cfg(target_arch = "x86_64")]
pub mod vnni;
#[cfg(target_arch = "x86_64")]
pub mod vnni3;

use std::sync::Arc;

use crate::error::Result;
use crate::model::TernaryMatrix;

/// A kernel family (scalar, avx2, vnni, amx).
pub trait TernaryKernel: Send + Sync {
    fn name(&self) -> &'static str;
    /// Convert canonical weights into this kernel's layout.
    fn prepare(&self, w: &TernaryMatrix) -> Result<Arc<dyn PackedTernary>>;
    /// Kernels over the shared tile layout wrap an existing one (no copy),
    /// so several kernels can serve one matrix without duplicating it.
    fn prepare_tiled(&self, _l: &Arc<layout::TileLayout>) -> Option<Arc<dyn PackedTernary>> {
        None
    }
}

/// Weights in a kernel's own layout, ready to multiply.
pub trait PackedTernary: Send + Sync {
    fn n_out(&self) -> usize;
    fn n_in(&self) -> usize;
    fn resident_bytes(&self) -> usize;
    /// Work is split across threads in multiples of this many output rows.
    fn row_block(&self) -> usize;
    /// For output rows `r0..r1` (r0 a multiple of `row_block`), write the
    /// exact products ROW-major: `out[(r - r0) * n_tokens + t] =
    /// sum_i W[r, i] * x[t * n_in + i]`. `out.len() == (r1 - r0) * n_tokens`.
    fn gemm(&self, x: &[i8], n_tokens: usize, r0: usize, r1: usize, out: &mut [i32]);
    /// [`Self::gemm`] with TOKEN-major output, `out[t * (r1 - r0) + r - r0]`,
    /// for kernels whose tiles come out in that order (AMX); false (nothing
    /// written) where the kernel has no such variant.
    fn gemm_tokens(&self, _x: &[i8], _n_tokens: usize, _r0: usize, _r1: usize, _out: &mut [i32]) -> bool {
        false
    }
    /// Weight bytes a call of `n_tokens` tokens reads (a policy holding
    /// several layouts reads only the one its kernel for that call uses).
    fn bytes_for(&self, _n_tokens: usize) -> usize {
        self.resident_bytes()
    }
    /// Whether [`Self::gemm_tokens`] runs for calls of `n_tokens` tokens.
    fn token_major(&self, _n_tokens: usize) -> bool {
        false
    }
}

/// Names accepted by `--kernel`.
pub const KERNEL_NAMES: [&str; 6] = ["auto", "amx", "vnni3", "vnni", "avx2", "scalar"];

/// The kernel for `name` ("auto" = fastest available), or an error saying
/// why it cannot run here.
///
/// "auto" picks vnni3 > vnni > avx2 > scalar; AMX is only used when asked for by
/// name (or by a dispatcher via [`best_for_tokens`]), since it pays off only
/// for many tokens per call.
pub fn select(name: &str) -> Result<Arc<dyn TernaryKernel>> {
    let name = if name == "auto" { available()[0] } else { name };
    match name {
        "scalar" => Ok(Arc::new(scalar::Scalar)),
        #[cfg(target_arch = "x86_64")]
        "vnni3" if vnni3::detected() => Ok(Arc::new(vnni3::Vnni3)),
        #[cfg(target_arch = "x86_64")]
        "vnni" if vnni::detected() => Ok(Arc::new(vnni::Vnni)),
        #[cfg(target_arch = "x86_64")]
        "avx2" if avx2::detected() => Ok(Arc::new(avx2::Avx2)),
        #[cfg(target_arch = "x86_64")]
        "amx" => match amx::amx_status() {
            amx::AmxStatus::Granted => Ok(Arc::new(amx::Amx::<0>)),
            st => Err(crate::Error::Unsupported(format!("kernel 'amx': {st}"))),
        },
        other if KERNEL_NAMES.contains(&other) => Err(crate::Error::Unsupported(format!(
            "kernel '{other}' needs CPU features this machine lacks (available: {})",
            available().join(", ")
        ))),
        other => Err(crate::Error::Unsupported(format!(
            "unknown kernel '{other}' (known: {})",
            KERNEL_NAMES.join(", ")
        ))),
    }
}

/// Kernels that can run here, fastest first for a typical call; "amx"
/// (when granted) comes last because it only wins for large token counts.
pub fn available() -> Vec<&'static str> {
    let mut v = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        // The 1.6-bit layout first: decode reads 0.8x the bytes of the 2-bit
        // one (docs/performance.md, session 6).
        if vnni3::detected() {
            v.push("vnni3");
        }
        if vnni::detected() {
            v.push("vnni");
        }
        if avx2::detected() {
            v.push("avx2");
        }
    }
    v.push("scalar");
    #[cfg(target_arch = "x86_64")]
    if amx::amx_status() == amx::AmxStatus::Granted {
        v.push("amx");
    }
    v
}

/// Token count from which AMX beats VNNI (a tile is 16 tokens; below a few
/// tiles the per-call tile setup and padding dominate).
pub const AMX_MIN_TOKENS: usize = 16;

/// The kernel name a dispatcher should use for calls of `n_tokens` tokens
/// (the rules of [`policy::KernelPolicy::auto`]).
pub fn best_for_tokens(n_tokens: usize) -> &'static str {
    let avail = available();
    if n_tokens >= AMX_MIN_TOKENS && avail.contains(&"amx") {
        "amx"
    } else if n_tokens >= 2 && avail[0] == "vnni3" && avail.contains(&"vnni") {
        "vnni"
    } else {
        avail[0]
    }
}

/// AMX state for `yinsen info`: "granted", or why it is not usable.
pub fn amx_status_text() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        amx::amx_status().to_string()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        "unsupported (not x86-64)".to_string()
    }
}
