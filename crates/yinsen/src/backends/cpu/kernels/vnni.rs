//! AVX-512 VNNI kernel over the tile layout (see `layout.rs`).
//!
//! One register tile is 16 output rows (dword lanes) x NT tokens (NT zmm
//! accumulators, NT <= 16). Per 64-byte line the four u8 operands are
//! expanded once (shift + mask) and reused for every token of the tile;
//! each `vpdpbusd` takes its 4 activation bytes as a dword broadcast.
//! For NT <= 4 (decode / GEMV) every token gets 4 accumulators, one per
//! shift, so the dependency chains are short and the loop streams the
//! weights at memory speed.

use std::arch::x86_64::*;
use std::sync::Arc;

use super::layout::{token_sums, Line, TileLayout, TiledPacked, CHUNK, ROWS};
use super::{PackedTernary, TernaryKernel};
use crate::error::Result;
use crate::model::TernaryMatrix;

pub struct Vnni;

/// True when this CPU (and OS) can run the VNNI kernel.
pub fn detected() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
}

impl TernaryKernel for Vnni {
    fn name(&self) -> &'static str {
        "vnni"
    }
    fn prepare(&self, w: &TernaryMatrix) -> Result<Arc<dyn PackedTernary>> {
        Ok(TiledPacked::shared(Arc::new(TileLayout::from_canonical(w)?), gemm))
    }
    fn prepare_tiled(&self, l: &Arc<TileLayout>) -> Option<Arc<dyn PackedTernary>> {
        Some(TiledPacked::shared(l.clone(), gemm))
    }
}

/// Largest `n_in` for the in-place field masks of tiles with one
/// accumulator per plane: a plane-3 product is at most `64 * 2 * 128 =
/// 2^14`, an accumulator sums `n_in / 4` of them, so `2^14 * 2^19 / 4 < 2^31`.
pub(super) const IN_PLACE_MAX_N_IN: usize = 1 << 19;

/// Most tokens one register tile holds.
pub(super) const MAX_NT: usize = 16;

/// Entry from `TiledPacked` (shapes checked there).
fn gemm(l: &TileLayout, x: &[i8], n_tokens: usize, r0: usize, r1: usize, out: &mut [i32]) {
    assert!(detected(), "vnni kernel used on a CPU without AVX-512 VNNI");
    let mut sums = Vec::new();
    token_sums(x, n_tokens, l.n_in, &mut sums);
    // SAFETY: features checked above; shapes checked by TiledPacked.
    unsafe { gemm_vnni(l, x, n_tokens, r0, r1, &sums, out) }
}

/// Tokens per group: a group's activations (`64 * n_in` bytes) stay in L2
/// while every row block of the range passes over them.
const TOKEN_GROUP: usize = 4 * MAX_NT;

/// The body of both VNNI kernels' `gemm` (rows r0..r1, r0 % 16 == 0,
/// row-major out): one token in row-block pairs through the caller's
/// `tile_pair` / `tile::<1, $a, true>`, more through [`for_each_tile`] and its
/// `tile_dispatch`; `$pre` are those functions' leading arguments (vnni3's
/// lookup tables). The caller has checked the CPU features; x holds
/// n_tokens rows of n_in values.
macro_rules! gemm_body {
    ($l:expr, $x:expr, $n_tokens:expr, $r0:expr, $r1:expr, $sums:expr, $out:expr, $a:literal $(, $pre:expr)*) => {{
        let (l, x, n_tokens, sums): (_, &[i8], usize, &[i32]) = ($l, $x, $n_tokens, $sums);
        if n_tokens == 1 && l.n_in <= IN_PLACE_MAX_N_IN {
            // SAFETY (closures): see above.
            return for_each_block_pair(
                $r0,
                $r1,
                sums[0],
                $out,
                |ba, bb| unsafe { tile_pair($($pre,)* l.block(ba), l.block(bb), l.n_in, x) },
                |b| unsafe {
                    let mut res = [[0i32; ROWS]; MAX_NT];
                    tile::<1, $a, true>($($pre,)* l.block(b), l.n_in, x, &mut res);
                    res[0]
                },
            );
        }
        for_each_tile(n_tokens, $r0, $r1, sums, $out, |b, t0, nt, res| {
            // SAFETY: see above.
            unsafe { tile_dispatch($($pre,)* nt, l.block(b), l.n_in, &x[t0 * l.n_in..], res) }
        });
    }};
}
pub(super) use gemm_body;

/// Rows r0..r1 (r0 % 16 == 0) of the tile layout (see [`gemm_body`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn gemm_vnni(l: &TileLayout, x: &[i8], n_tokens: usize, r0: usize, r1: usize, sums: &[i32], out: &mut [i32]) {
    gemm_body!(l, x, n_tokens, r0, r1, sums, out, 4)
}

/// One token (decode) over rows r0..r1: row blocks in pairs `(b, b + half)`
/// of the range, each pair streamed together by `pair`, so a thread keeps
/// two independent memory streams in flight (one core's single stream stops
/// well below the memory bandwidth: cold GEMV -5-12%); `single` takes the
/// odd block. Subtracts the token's activation sum (u = w + 1).
pub(super) fn for_each_block_pair(
    r0: usize,
    r1: usize,
    sum: i32,
    out: &mut [i32],
    mut pair: impl FnMut(usize, usize) -> ([i32; ROWS], [i32; ROWS]),
    mut single: impl FnMut(usize) -> [i32; ROWS],
) {
    let (b0, b1) = (r0 / ROWS, r1.div_ceil(ROWS));
    let half = (b1 - b0).div_ceil(2);
    let mut put = |b: usize, r: &[i32; ROWS]| {
        for (rr, &v) in r.iter().enumerate().take((r1 - b * ROWS).min(ROWS)) {
            out[b * ROWS + rr - r0] = v.wrapping_sub(sum);
        }
    };
    for ba in b0..b0 + half {
        let bb = ba + half;
        if bb < b1 {
            let (ra, rb) = pair(ba, bb);
            put(ba, &ra);
            put(bb, &rb);
        } else {
            put(ba, &single(ba));
        }
    }
}

/// One token's accumulators summed into its 16 row results (with `M`, the
/// in-place planes scaled back first).
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn fold_acc<const M: bool>(acc: &mut [__m512i]) -> [i32; ROWS] {
    if M {
        unscale_planes(acc);
    }
    let s = acc[1..].iter().fold(acc[0], |s, &v| _mm512_add_epi32(s, v));
    let mut r = [0i32; ROWS];
    _mm512_storeu_si512(r.as_mut_ptr() as *mut _, s);
    r
}

/// The last, partial chunk (`C` inputs per line) of each of NT tokens'
/// inputs, zero-padded, so no byte past a token's `n_in` inputs is read.
pub(super) fn padded_tail<const NT: usize, const C: usize>(x: &[i8], n_in: usize) -> [[i8; C]; NT] {
    let full = n_in / C * C;
    let mut tail = [[0i8; C]; NT];
    for (t, tt) in tail.iter_mut().enumerate() {
        tt[..n_in - full].copy_from_slice(&x[t * n_in + full..(t + 1) * n_in]);
    }
    tail
}

/// The body of both VNNI kernels' `tile`: 16 rows x NT tokens over the
/// whole input, `res[t][rr] = sum_i u * x`. `$step` adds one line's
/// products into `$acc` (NT x A accumulators) for inputs at `$xp`, `$stride`
/// bytes between tokens. Full chunks read x in place; the partial last chunk
/// reads a zero-padded copy, so no byte past a token's `n_in` inputs is
/// touched. A macro, not a function taking a closure: the step expands
/// inside the caller's `#[target_feature]` body.
macro_rules! tile_body {
    // NT, A, M (the caller's const parameters) and CHUNK resolve where it expands.
    ($lines:expr, $n_in:expr, $x:expr, $res:expr, |$acc:ident, $line:ident, $xp:ident, $stride:ident| $step:expr) => {{
        let (lines, n_in, x): (&[Line], usize, &[i8]) = ($lines, $n_in, $x);
        debug_assert!(x.len() >= NT * n_in);
        let full = n_in / CHUNK;
        let mut $acc = [[_mm512_setzero_si512(); A]; NT];
        let x0 = x.as_ptr();
        for (c, $line) in lines.iter().enumerate().take(full) {
            let ($xp, $stride) = (x0.add(c * CHUNK), n_in);
            $step;
        }
        if n_in > full * CHUNK {
            let tail = padded_tail::<NT, CHUNK>(x, n_in);
            let ($line, $xp, $stride) = (&lines[full], tail.as_ptr() as *const i8, CHUNK);
            $step;
        }
        for (at, r) in $acc.iter_mut().zip($res.iter_mut()) {
            *r = fold_acc::<M>(at);
        }
    }};
}
pub(super) use tile_body;

/// The blocked loop of both VNNI kernels, row-major out: token groups
/// outer, then row blocks, so a block's lines stay in L1 while the group's
/// tiles of up to `MAX_NT` tokens pass over them. `tile(b, t0, nt, res)`
/// fills `res[t][rr] = sum_i u * x` of row block `b` for tokens `t0..t0 +
/// nt`; the loop subtracts each token's activation sum (u = w + 1).
pub(super) fn for_each_tile(
    n_tokens: usize,
    r0: usize,
    r1: usize,
    sums: &[i32],
    out: &mut [i32],
    mut tile: impl FnMut(usize, usize, usize, &mut [[i32; ROWS]; MAX_NT]),
) {
    for g0 in (0..n_tokens).step_by(TOKEN_GROUP) {
        let g1 = (g0 + TOKEN_GROUP).min(n_tokens);
        for b in r0 / ROWS..r1.div_ceil(ROWS) {
            let rows = (r1 - b * ROWS).min(ROWS);
            let mut t0 = g0;
            while t0 < g1 {
                let nt = (g1 - t0).min(MAX_NT);
                let mut res = [[0i32; ROWS]; MAX_NT];
                tile(b, t0, nt, &mut res);
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
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile_dispatch(nt: usize, lines: &[Line], n_in: usize, x: &[i8], res: &mut [[i32; ROWS]; MAX_NT]) {
    let m = n_in <= IN_PLACE_MAX_N_IN;
    match nt {
        1 if m => tile::<1, 4, true>(lines, n_in, x, res),
        2 if m => tile::<2, 4, true>(lines, n_in, x, res),
        3 if m => tile::<3, 4, true>(lines, n_in, x, res),
        4 if m => tile::<4, 4, true>(lines, n_in, x, res),
        1 => tile::<1, 4, false>(lines, n_in, x, res),
        2 => tile::<2, 4, false>(lines, n_in, x, res),
        3 => tile::<3, 4, false>(lines, n_in, x, res),
        4 => tile::<4, 4, false>(lines, n_in, x, res),
        5 => tile::<5, 2, false>(lines, n_in, x, res),
        6 => tile::<6, 2, false>(lines, n_in, x, res),
        7 => tile::<7, 2, false>(lines, n_in, x, res),
        8 => tile::<8, 2, false>(lines, n_in, x, res),
        9 => tile::<9, 1, false>(lines, n_in, x, res),
        10 => tile::<10, 1, false>(lines, n_in, x, res),
        11 => tile::<11, 1, false>(lines, n_in, x, res),
        12 => tile::<12, 1, false>(lines, n_in, x, res),
        13 => tile::<13, 1, false>(lines, n_in, x, res),
        14 => tile::<14, 1, false>(lines, n_in, x, res),
        15 => tile::<15, 1, false>(lines, n_in, x, res),
        _ => tile::<16, 1, false>(lines, n_in, x, res),
    }
}

/// The four 2-bit fields of each byte of `f` as VPDPBUSD operands: plane
/// s = `(f >> 2s) & 3`, or with `M` masked in place, `f & (3 << 2s)` = 4^s
/// times it (one op each; the accumulators are scaled back by
/// [`unscale_planes`]).
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn planes<const M: bool>(f: __m512i) -> [__m512i; 4] {
    let m = _mm512_set1_epi8(3);
    if M {
        [
            _mm512_and_si512(f, m),
            _mm512_and_si512(f, _mm512_set1_epi8(0x0c)),
            _mm512_and_si512(f, _mm512_set1_epi8(0x30)),
            _mm512_and_si512(f, _mm512_set1_epi8(0xc0u8 as i8)),
        ]
    } else {
        [
            _mm512_and_si512(f, m),
            _mm512_and_si512(_mm512_srli_epi16::<2>(f), m),
            _mm512_and_si512(_mm512_srli_epi16::<4>(f), m),
            _mm512_and_si512(_mm512_srli_epi16::<6>(f), m),
        ]
    }
}

/// Accumulators 1..4 of in-place planes hold 4^s times plane s's exact sum
/// (all terms multiples of 4^s, so the arithmetic shift is exact).
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn unscale_planes(acc: &mut [__m512i]) {
    acc[1] = _mm512_srai_epi32::<2>(acc[1]);
    acc[2] = _mm512_srai_epi32::<4>(acc[2]);
    acc[3] = _mm512_srai_epi32::<6>(acc[3]);
}

/// One line against NT tokens: `xp` points at the line's first input of
/// token 0, `stride` bytes between tokens.
macro_rules! line_step {
    ($acc:ident, $line:expr, $xp:expr, $stride:expr, $nt:expr, $a:expr, $m:expr) => {{
        let p = _mm512_load_si512($line as *const Line as *const _);
        let ws = planes::<$m>(p);
        for t in 0..$nt {
            let xq = $xp.add(t * $stride);
            for (s, &w) in ws.iter().enumerate() {
                let xb = _mm512_set1_epi32(std::ptr::read_unaligned(xq.add(4 * s) as *const i32));
                $acc[t][s % $a] = _mm512_dpbusd_epi32($acc[t][s % $a], w, xb);
            }
        }
    }};
}

/// 16 rows x NT tokens over the whole input (see [`tile_body`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile<const NT: usize, const A: usize, const M: bool>(
    lines: &[Line],
    n_in: usize,
    x: &[i8],
    res: &mut [[i32; ROWS]; MAX_NT],
) {
    tile_body!(lines, n_in, x, res, |acc, line, xp, stride| line_step!(
        acc, line, xp, stride, NT, A, M
    ));
}

/// [`tile`] for one token over two row blocks at once (in-place masks).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile_pair(la: &[Line], lb: &[Line], n_in: usize, x: &[i8]) -> ([i32; ROWS], [i32; ROWS]) {
    let full = n_in / CHUNK;
    let mut aa = [[_mm512_setzero_si512(); 4]; 1];
    let mut ab = [[_mm512_setzero_si512(); 4]; 1];
    let xp = x.as_ptr();
    for c in 0..full {
        line_step!(aa, &la[c], xp.add(c * CHUNK), n_in, 1, 4, true);
        line_step!(ab, &lb[c], xp.add(c * CHUNK), n_in, 1, 4, true);
    }
    let rem = n_in - full * CHUNK;
    if rem > 0 {
        let tail = padded_tail::<1, CHUNK>(x, n_in);
        line_step!(aa, &la[full], tail.as_ptr() as *const i8, CHUNK, 1, 4, true);
        line_step!(ab, &lb[full], tail.as_ptr() as *const i8, CHUNK, 1, 4, true);
    }
    (fold_acc::<true>(&mut aa[0]), fold_acc::<true>(&mut ab[0]))
}
