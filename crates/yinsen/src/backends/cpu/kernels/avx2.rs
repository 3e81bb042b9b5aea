//! AVX2 kernel over the tile layout (see `layout.rs`), for CPUs without
//! AVX-512 VNNI. Each 64-byte line is two 32-byte halves (rows 0-7 and
//! 8-15); per half the four u8 operands (shift + mask) multiply broadcast
//! activation dwords with `vpmaddubsw`, the four i16 results are added, and
//! one `vpmaddwd` by ones widens to the i32 row sums.
//!
//! Saturation: `vpmaddubsw` adds two products `u * x` with u in {0, 1, 2}
//! and x in -128..=127, so each i16 result is within 2 * 2 * 128 = 512; the
//! sum of the four shifts' results is within 4 * 512 = 2048 < 32767. Nothing
//! saturates, so the result is exact. `vpmaddwd` then adds two such i16 into
//! an i32 (within 4096) and the i32 accumulators are bounded as in layout.rs.

use std::arch::x86_64::*;
use std::sync::Arc;

use super::layout::{token_sums, Line, TileLayout, TiledPacked, CHUNK, ROWS};
use super::{PackedTernary, TernaryKernel};
use crate::error::Result;
use crate::model::TernaryMatrix;

pub struct Avx2;

pub fn detected() -> bool {
    is_x86_feature_detected!("avx2")
}

impl TernaryKernel for Avx2 {
    fn name(&self) -> &'static str {
        "avx2"
    }
    fn prepare(&self, w: &TernaryMatrix) -> Result<Arc<dyn PackedTernary>> {
        Ok(TiledPacked::shared(Arc::new(TileLayout::from_canonical(w)?), gemm))
    }
    fn prepare_tiled(&self, l: &Arc<TileLayout>) -> Option<Arc<dyn PackedTernary>> {
        Some(TiledPacked::shared(l.clone(), gemm))
    }
}

/// Tokens per register tile (2 halves x 4 tokens = 8 accumulators of 16 ymm).
const MAX_NT: usize = 4;

/// Entry from `TiledPacked` (shapes checked there).
fn gemm(l: &TileLayout, x: &[i8], n_tokens: usize, r0: usize, r1: usize, out: &mut [i32]) {
    assert!(detected(), "avx2 kernel used on a CPU without AVX2");
    let mut sums = Vec::new();
    token_sums(x, n_tokens, l.n_in, &mut sums);
    // SAFETY: AVX2 checked above; shapes checked by TiledPacked.
    unsafe { gemm_avx2(l, x, n_tokens, r0, r1, &sums, out) }
}

#[target_feature(enable = "avx2")]
unsafe fn gemm_avx2(l: &TileLayout, x: &[i8], n_tokens: usize, r0: usize, r1: usize, sums: &[i32], out: &mut [i32]) {
    for b in r0 / ROWS..r1.div_ceil(ROWS) {
        let lines = l.block(b);
        let mut t0 = 0;
        while t0 < n_tokens {
            let nt = (n_tokens - t0).min(MAX_NT);
            let mut res = [[0i32; ROWS]; MAX_NT];
            let xt = &x[t0 * l.n_in..];
            match nt {
                1 => tile::<1>(lines, l.n_in, xt, &mut res),
                2 => tile::<2>(lines, l.n_in, xt, &mut res),
                3 => tile::<3>(lines, l.n_in, xt, &mut res),
                _ => tile::<4>(lines, l.n_in, xt, &mut res),
            }
            let rows = (r1 - b * ROWS).min(ROWS);
            for (t, rt) in res.iter().enumerate().take(nt) {
                let corr = sums[t0 + t];
                for (rr, &v) in rt.iter().enumerate().take(rows) {
                    out[(b * ROWS + rr - r0) * n_tokens + t0 + t] = v.wrapping_sub(corr);
                }
            }
            t0 += nt;
        }
    }
}

/// One line against NT tokens (see the module doc for the bounds).
macro_rules! line_step {
    ($acc:ident, $line:expr, $xp:expr, $stride:expr, $nt:expr) => {{
        let m = _mm256_set1_epi8(3);
        let ones = _mm256_set1_epi16(1);
        for h in 0..2 {
            let p = _mm256_load_si256(($line as *const Line as *const u8).add(32 * h) as *const __m256i);
            let ws = [
                _mm256_and_si256(p, m),
                _mm256_and_si256(_mm256_srli_epi16::<2>(p), m),
                _mm256_and_si256(_mm256_srli_epi16::<4>(p), m),
                _mm256_and_si256(_mm256_srli_epi16::<6>(p), m),
            ];
            for t in 0..$nt {
                let xq = $xp.add(t * $stride);
                let xb = |s: usize| _mm256_set1_epi32(std::ptr::read_unaligned(xq.add(4 * s) as *const i32));
                let s01 = _mm256_add_epi16(_mm256_maddubs_epi16(ws[0], xb(0)), _mm256_maddubs_epi16(ws[1], xb(1)));
                let s23 = _mm256_add_epi16(_mm256_maddubs_epi16(ws[2], xb(2)), _mm256_maddubs_epi16(ws[3], xb(3)));
                let s32 = _mm256_madd_epi16(_mm256_add_epi16(s01, s23), ones);
                $acc[t][h] = _mm256_add_epi32($acc[t][h], s32);
            }
        }
    }};
}

#[target_feature(enable = "avx2")]
unsafe fn tile<const NT: usize>(lines: &[Line], n_in: usize, x: &[i8], res: &mut [[i32; ROWS]; MAX_NT]) {
    debug_assert!(x.len() >= NT * n_in);
    let full = n_in / CHUNK;
    let mut acc = [[_mm256_setzero_si256(); 2]; NT];
    let xp = x.as_ptr();
    for (c, line) in lines.iter().enumerate().take(full) {
        line_step!(acc, line, xp.add(c * CHUNK), n_in, NT);
    }
    let rem = n_in - full * CHUNK;
    if rem > 0 {
        let mut tail = [[0i8; CHUNK]; NT];
        for (t, tt) in tail.iter_mut().enumerate() {
            tt[..rem].copy_from_slice(&x[t * n_in + full * CHUNK..t * n_in + n_in]);
        }
        line_step!(acc, &lines[full], tail.as_ptr() as *const i8, CHUNK, NT);
    }
    for t in 0..NT {
        for h in 0..2 {
            _mm256_storeu_si256(res[t][8 * h..].as_mut_ptr() as *mut __m256i, acc[t][h]);
        }
    }
}
