//! Ternary x int8 -> int32 kernels for the CPU path, one file per family,
//! chosen at run time by feature detection. Every kernel owns its weight
//! layout (derived from the canonical form in `prepare`) and must produce
//! int32 results bit-equal to [`super::reference::ternary_matmul_i32`].

pub mod scalar;

use std::sync::Arc;

use crate::error::Result;
use crate::model::TernaryMatrix;

/// A kernel family (scalar, avx2, vnni, amx).
pub trait TernaryKernel: Send + Sync {
    fn name(&self) -> &'static str;
    /// Convert canonical weights into this kernel's layout.
    fn prepare(&self, w: &TernaryMatrix) -> Result<Arc<dyn PackedTernary>>;
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
}

/// Names accepted by `--kernel`.
pub const KERNEL_NAMES: [&str; 5] = ["auto", "amx", "vnni", "avx2", "scalar"];

/// The kernel for `name` ("auto" = fastest available), or an error saying
/// why it cannot run here.
pub fn select(name: &str) -> Result<Arc<dyn TernaryKernel>> {
    match name {
        "auto" | "scalar" => Ok(Arc::new(scalar::Scalar)),
        other => Err(crate::Error::Unsupported(format!(
            "kernel '{other}' is not available on this machine/build (known: {})",
            KERNEL_NAMES.join(", ")
        ))),
    }
}

/// Kernels that can run on this machine, best first.
pub fn available() -> Vec<&'static str> {
    vec!["scalar"]
}

/// AMX state for `yinsen info`.
pub fn amx_status_text() -> String {
    "unknown (AMX kernel not built yet)".into()
}
