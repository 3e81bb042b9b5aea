//! AVX-512 VNNI kernel over the 1.6-bit base-3 layout (see `base3.rs`).
//!
//! The same register tiles as `vnni.rs` (16 output rows in dword lanes x
//! NT tokens), with one more step per 64-byte line: two compares and one
//! table lookup (`vpermi2b`, AVX-512 VBMI) turn the line's 64 base-3 bytes
//! into the 2-bit fields of planes 0..3 and the codes of plane 4. The five planes are then VPDPBUSD operands, each against a dword
//! broadcast of 4 activation bytes; the token's activation sum is
//! subtracted once at the end (u = w + 1).
//!
//! Decode streams 0.8x the bytes of the 2-bit layout for ~10 more vector
//! instructions per 320 weights, which the memory-bound GEMV hides.

use std::arch::x86_64::*;
use std::sync::Arc;

use super::base3::{Base3Layout, CHUNK, FIELDS};
use super::layout::{token_sums, Line, TiledPacked, ROWS};
use super::vnni::{
    fold_acc, for_each_block_pair, for_each_tile, gemm_body, padded_tail, planes, tile_body, IN_PLACE_MAX_N_IN, MAX_NT,
};
use super::{PackedTernary, TernaryKernel};
use crate::error::Result;
use crate::model::TernaryMatrix;

pub struct Vnni3;

/// True when this CPU (and OS) can run the kernel: AVX-512 VNNI and VBMI.
pub fn detected() -> bool {
    super::vnni::detected() && is_x86_feature_detected!("avx512vbmi")
}

impl TernaryKernel for Vnni3 {
    fn name(&self) -> &'static str {
        "vnni3"
    }
    fn prepare(&self, w: &TernaryMatrix) -> Result<Arc<dyn PackedTernary>> {
        Ok(TiledPacked::shared(Arc::new(Base3Layout::from_canonical(w)?), gemm))
    }
}

/// Entry from `TiledPacked` (shapes checked there).
fn gemm(l: &Base3Layout, x: &[i8], n_tokens: usize, r0: usize, r1: usize, out: &mut [i32]) {
    assert!(detected(), "vnni3 kernel used on a CPU without AVX-512 VNNI + VBMI");
    let mut sums = Vec::new();
    token_sums(x, n_tokens, l.n_in, &mut sums);
    // SAFETY: features checked above; shapes checked by TiledPacked.
    unsafe { gemm_vnni3(l, x, n_tokens, r0, r1, &sums, out) }
}

/// The first 128 entries of `FIELDS` as 2 zmm.
struct Luts {
    fields: [__m512i; 2],
}

impl Luts {
    #[target_feature(enable = "avx512f")]
    unsafe fn load() -> Self {
        let part = |t: &[u8; 256], i: usize| _mm512_load_si512(t.as_ptr().add(64 * i) as *const _);
        Luts {
            fields: std::array::from_fn(|i| part(&FIELDS.0, i)),
        }
    }
}

/// The 2-bit fields of planes 0..4 (`FIELDS[b]`) and the codes of plane 4
/// (`b / 81`) of every byte `b` of `p`: `u4 = [b >= 81] + [b >= 162]` by two
/// compares, then `v = b - 81 u4` (< 81) indexes the first 128 entries of
/// `FIELDS` with a single `vpermi2b`. (Two `vpermi2b` and a blend over all
/// 256 entries, or a third `vpermi2b` for `u4`, measured slower on Zen 4:
/// the byte permutes are the costly part of the decode.)
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
unsafe fn decode(l: &Luts, p: __m512i) -> (__m512i, __m512i) {
    let (one, c81) = (_mm512_set1_epi8(1), _mm512_set1_epi8(81));
    let k1 = _mm512_cmpge_epu8_mask(p, c81);
    let k2 = _mm512_cmpge_epu8_mask(p, _mm512_set1_epi8(162u8 as i8));
    let v = _mm512_mask_sub_epi8(p, k1, p, c81);
    let v = _mm512_mask_sub_epi8(v, k2, v, c81);
    let u1 = _mm512_maskz_mov_epi8(k1, one);
    let top = _mm512_mask_add_epi8(u1, k2, u1, one);
    (_mm512_permutex2var_epi8(l.fields[0], v, l.fields[1]), top)
}

/// Rows r0..r1 (r0 % 16 == 0), row-major out (see `vnni::gemm_body`).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi")]
unsafe fn gemm_vnni3(l: &Base3Layout, x: &[i8], n_tokens: usize, r0: usize, r1: usize, sums: &[i32], out: &mut [i32]) {
    let luts = Luts::load();
    gemm_body!(l, x, n_tokens, r0, r1, sums, out, 5, &luts)
}

/// [`tile`] for one token over two row blocks at once (in-place masks).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi")]
unsafe fn tile_pair(luts: &Luts, la: &[Line], lb: &[Line], n_in: usize, x: &[i8]) -> ([i32; ROWS], [i32; ROWS]) {
    let full = n_in / CHUNK;
    let mut aa = [[_mm512_setzero_si512(); 5]; 1];
    let mut ab = [[_mm512_setzero_si512(); 5]; 1];
    let xp = x.as_ptr();
    for c in 0..full {
        line_step::<1, 5, true>(luts, &mut aa, &la[c], xp.add(c * CHUNK), n_in);
        line_step::<1, 5, true>(luts, &mut ab, &lb[c], xp.add(c * CHUNK), n_in);
    }
    let rem = n_in - full * CHUNK;
    if rem > 0 {
        let tail = padded_tail::<1, CHUNK>(x, n_in);
        line_step::<1, 5, true>(luts, &mut aa, &la[full], tail.as_ptr() as *const i8, CHUNK);
        line_step::<1, 5, true>(luts, &mut ab, &lb[full], tail.as_ptr() as *const i8, CHUNK);
    }
    (fold_acc::<true>(&mut aa[0]), fold_acc::<true>(&mut ab[0]))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi")]
unsafe fn tile_dispatch(
    luts: &Luts,
    nt: usize,
    lines: &[Line],
    n_in: usize,
    x: &[i8],
    res: &mut [[i32; ROWS]; MAX_NT],
) {
    let m = n_in <= IN_PLACE_MAX_N_IN;
    match nt {
        1 if m => tile::<1, 5, true>(luts, lines, n_in, x, res),
        2 if m => tile::<2, 5, true>(luts, lines, n_in, x, res),
        1 => tile::<1, 5, false>(luts, lines, n_in, x, res),
        2 => tile::<2, 5, false>(luts, lines, n_in, x, res),
        3 => tile::<3, 3, false>(luts, lines, n_in, x, res),
        4 => tile::<4, 3, false>(luts, lines, n_in, x, res),
        5 => tile::<5, 2, false>(luts, lines, n_in, x, res),
        6 => tile::<6, 2, false>(luts, lines, n_in, x, res),
        7 => tile::<7, 2, false>(luts, lines, n_in, x, res),
        8 => tile::<8, 2, false>(luts, lines, n_in, x, res),
        9 => tile::<9, 1, false>(luts, lines, n_in, x, res),
        10 => tile::<10, 1, false>(luts, lines, n_in, x, res),
        11 => tile::<11, 1, false>(luts, lines, n_in, x, res),
        12 => tile::<12, 1, false>(luts, lines, n_in, x, res),
        13 => tile::<13, 1, false>(luts, lines, n_in, x, res),
        14 => tile::<14, 1, false>(luts, lines, n_in, x, res),
        15 => tile::<15, 1, false>(luts, lines, n_in, x, res),
        _ => tile::<16, 1, false>(luts, lines, n_in, x, res),
    }
}

/// One line against NT tokens into A accumulators per token: `xp` points at
/// the line's first input of token 0, `stride` bytes between tokens.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi")]
unsafe fn line_step<const NT: usize, const A: usize, const M: bool>(
    luts: &Luts,
    acc: &mut [[__m512i; A]; NT],
    line: &Line,
    xp: *const i8,
    stride: usize,
) {
    let p = _mm512_load_si512(line as *const Line as *const _);
    let (f, top) = decode(luts, p);
    let [w0, w1, w2, w3] = planes::<M>(f);
    let ws = [w0, w1, w2, w3, top];
    for (t, at) in acc.iter_mut().enumerate() {
        let xq = xp.add(t * stride);
        for (s, &w) in ws.iter().enumerate() {
            let xb = _mm512_set1_epi32(std::ptr::read_unaligned(xq.add(4 * s) as *const i32));
            at[s % A] = _mm512_dpbusd_epi32(at[s % A], w, xb);
        }
    }
}

/// 16 rows x NT tokens over the whole input (see `vnni::tile_body`).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi")]
unsafe fn tile<const NT: usize, const A: usize, const M: bool>(
    luts: &Luts,
    lines: &[Line],
    n_in: usize,
    x: &[i8],
    res: &mut [[i32; ROWS]; MAX_NT],
) {
    tile_body!(lines, n_in, x, res, |acc, line, xp, stride| line_step::<NT, A, M>(
        luts, &mut acc, line, xp, stride
    ));
}
