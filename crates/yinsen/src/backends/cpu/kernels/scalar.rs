//! Portable scalar kernel over the canonical layout: byte-at-a-time decode
//! through a 256-entry table of four trits (`CANON_TRITS`). Slow but exact; the fallback
//! everywhere and the baseline for the SIMD kernels.

use std::sync::Arc;

use super::{PackedTernary, TernaryKernel};
use crate::error::Result;
use crate::model::ternary::CANON_TRITS;
use crate::model::TernaryMatrix;

pub struct Scalar;

struct ScalarPacked {
    w: TernaryMatrix,
}

impl TernaryKernel for Scalar {
    fn name(&self) -> &'static str {
        "scalar"
    }
    fn prepare(&self, w: &TernaryMatrix) -> Result<Arc<dyn PackedTernary>> {
        Ok(Arc::new(ScalarPacked { w: w.clone() }))
    }
}

impl PackedTernary for ScalarPacked {
    fn n_out(&self) -> usize {
        self.w.n_out
    }
    fn n_in(&self) -> usize {
        self.w.n_in
    }
    fn resident_bytes(&self) -> usize {
        self.w.packed.len()
    }
    fn row_block(&self) -> usize {
        1
    }
    fn gemm(&self, x: &[i8], n_tokens: usize, r0: usize, r1: usize, out: &mut [i32]) {
        let n_in = self.w.n_in;
        debug_assert_eq!(out.len(), (r1 - r0) * n_tokens);
        for r in r0..r1 {
            let row = self.w.row(r);
            for t in 0..n_tokens {
                let xt = &x[t * n_in..(t + 1) * n_in];
                let mut acc = 0i32;
                for (b, &byte) in row.iter().enumerate() {
                    let w4 = &CANON_TRITS[byte as usize];
                    let base = 4 * b;
                    for k in 0..4.min(n_in - base) {
                        acc += w4[k] as i32 * xt[base + k] as i32;
                    }
                }
                out[(r - r0) * n_tokens + t] = acc;
            }
        }
    }
}
