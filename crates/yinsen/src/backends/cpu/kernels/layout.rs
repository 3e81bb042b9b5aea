//! The CPU ternary layout ("tile layout") shared by the AVX2, VNNI and AMX
//! kernels, derived once from the canonical packed form.
//!
//! # Spec
//!
//! - Each weight is stored as the 2-bit code `u = w + 1` in {0, 1, 2}.
//! - Rows are grouped in **row blocks** of 16 output rows; inputs in
//!   **chunks** of 16 inputs. `n_out` is padded to `blocks * 16`, `n_in` to
//!   `chunks * 16`; every pad weight has `u = 1` (w = 0), so it adds nothing
//!   to the exact dot product whatever the activation.
//! - The matrix is a sequence of 64-byte, 64-byte-aligned **lines**, row block
//!   major: line `b * chunks + c` holds row block `b`, chunk `c`. A row
//!   block's weights are therefore one contiguous stream of `chunks * 64`
//!   bytes, and the whole matrix one stream of `blocks * chunks * 64` bytes
//!   (`n_out_pad * n_in_pad / 4`: 2 bits per weight, nothing expanded).
//! - Inside a line, byte `j = 4 * rr + k` (rr = row within the block 0..16,
//!   k = 0..4) holds, at bits `2s..2s+2` (s = 0..4), the code of input
//!   `16c + 4s + k` of row `16b + rr`.
//!
//! Why: `(line >> 2s) & 0x03` (one VPSRLW + one VPANDD on the whole 64-byte
//! line; the mask discards bits shifted in from the neighbouring byte) is
//! exactly the unsigned VPDPBUSD operand for 16 rows x 4 consecutive inputs
//! `16c + 4s .. 16c + 4s + 4`, row `rr` in dword lane `rr`. Broadcasting those
//! 4 activation bytes to all lanes and accumulating gives
//! `sum_i u_i * x_i = dot(w, x) + sum_i x_i`; kernels subtract the token's
//! `sum_i x_i` (over the real `n_in` inputs only) once at the end. The same
//! 64-byte group is also one row of an AMX B tile (K/4 rows x 16 columns of 4
//! bytes) and two AVX2 `vpmaddubsw` operands (rows 0-7, rows 8-15).
//!
//! Overflow: `|u * x| <= 2 * 128 = 256`, so every partial sum of the `n_in_pad`
//! products is at most `256 * n_in_pad` in magnitude; `prepare` rejects
//! `n_in > MAX_N_IN = 2^22`, so `256 * n_in_pad <= 2^30 + 2^12 < 2^31` and the
//! i32 accumulators never wrap. `|sum x| <= 128 * n_in < 2^31` as well, and the
//! final difference is the exact dot, `|dot| <= 128 * n_in`.

use crate::error::{Error, Result};
use crate::model::TernaryMatrix;

/// Output rows per row block.
pub const ROWS: usize = 16;
/// Inputs per chunk (one 64-byte line holds ROWS x CHUNK codes).
pub const CHUNK: usize = 16;
/// Bytes per line.
pub const LINE: usize = 64;
/// Largest accepted `n_in` (keeps every i32 accumulator exact, see above).
pub const MAX_N_IN: usize = 1 << 22;

#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub struct Line(pub [u8; LINE]);

/// int8 codes in 64-byte aligned storage. A plain `Vec<i8>` of a few MB
/// starts 16 bytes past a page, so every 64-byte row an AMX tile load reads
/// of a token (`n_in` a multiple of 64) straddled two cache lines.
#[derive(Default, Clone)]
pub struct Codes {
    lines: Vec<Line>,
    len: usize,
}

impl Codes {
    /// `len` zero codes.
    pub fn zeroed(len: usize) -> Self {
        let mut c = Self::default();
        c.resize(len);
        c
    }

    /// Sets the length to `len`; codes past the old length are zero.
    pub fn resize(&mut self, len: usize) {
        if len > self.len {
            // Zero the old tail line's unused bytes, then grow with zero lines.
            let lines = self.lines.len().min(len.div_ceil(LINE));
            lines_bytes_mut(&mut self.lines[..lines])[self.len..].fill(0);
        }
        self.lines.resize(len.div_ceil(LINE), Line([0; LINE]));
        self.len = len;
    }
}

/// The bytes of `lines`.
fn lines_bytes_mut(lines: &mut [Line]) -> &mut [u8] {
    // SAFETY: Line is 64 plain bytes (repr C), so the lines are
    // contiguous bytes.
    unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut u8, lines.len() * LINE) }
}

impl std::ops::Deref for Codes {
    type Target = [i8];
    fn deref(&self) -> &[i8] {
        // SAFETY: `len` <= 64 x lines (resize keeps it so); i8 and u8 share a layout.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const i8, self.len) }
    }
}

impl std::ops::DerefMut for Codes {
    fn deref_mut(&mut self) -> &mut [i8] {
        // SAFETY: as Deref.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut i8, self.len) }
    }
}

/// Equal codes (the storage past `len` does not count).
impl PartialEq for Codes {
    fn eq(&self, other: &Self) -> bool {
        self[..] == other[..]
    }
}

impl std::fmt::Debug for Codes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// Ternary weights as 64-byte lines: row blocks of 16 rows, each a run of
/// `chunks` lines over consecutive inputs. `F` says how a line codes its
/// weights: [`TwoBit`] (the tile layout, this file) or `Base3` (base3.rs).
pub struct LineLayout<F> {
    pub n_out: usize,
    pub n_in: usize,
    /// Row blocks (`ceil(n_out / 16)`).
    pub blocks: usize,
    /// Chunks per row block (`ceil(n_in / inputs per line)`).
    pub chunks: usize,
    pub lines: Vec<Line>,
    format: std::marker::PhantomData<F>,
}

/// The 2-bit tile layout's line format (see the module doc).
pub enum TwoBit {}

/// Ternary weights in the tile layout.
pub type TileLayout = LineLayout<TwoBit>;

impl<F> LineLayout<F> {
    /// Lines for `w` with `chunk` inputs per line, all `pad` first, then
    /// each row block's written by `fill(row_bytes, block, lines)` (blocks in
    /// parallel). Fails on inconsistent or oversized shapes before
    /// allocating.
    pub(super) fn build(
        w: &TernaryMatrix,
        chunk: usize,
        pad: Line,
        fill: impl Fn(usize, usize, &mut [Line]) + Sync,
    ) -> Result<Self> {
        use rayon::prelude::*;
        let LineShape {
            row_bytes,
            blocks,
            chunks,
            n_lines,
        } = LineShape::check(w, chunk)?;
        let mut lines = crate::mem::huge_vec(n_lines, pad);
        if chunks > 0 {
            lines
                .par_chunks_mut(chunks)
                .enumerate()
                .for_each(|(b, blk)| fill(row_bytes, b, blk));
        }
        Ok(Self {
            n_out: w.n_out,
            n_in: w.n_in,
            blocks,
            chunks,
            lines,
            format: std::marker::PhantomData,
        })
    }

    pub fn resident_bytes(&self) -> usize {
        self.lines.len() * LINE
    }

    /// The `chunks` lines of row block `b`.
    pub fn block(&self, b: usize) -> &[Line] {
        &self.lines[b * self.chunks..(b + 1) * self.chunks]
    }
}

/// Canonical 2-bit code -> u = w + 1 (00 -> 1, 01 -> 2, 10 -> 0, 11 -> 1).
const fn canon_to_u(c: u8) -> u8 {
    (crate::model::ternary::decode_code(c) + 1) as u8
}

/// A canonical byte (4 codes) -> the same 4 positions as u codes.
const CANON_U: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let mut k = 0;
        let mut v = 0u8;
        while k < 4 {
            v |= canon_to_u((b >> (2 * k)) as u8) << (2 * k);
            k += 1;
        }
        t[b] = v;
        b += 1;
    }
    t
};

/// Shape of a line layout (16-row blocks x chunks of `chunk` inputs, one
/// 64-byte line each) for a canonical matrix, checked before allocating.
struct LineShape {
    /// Canonical bytes per row.
    pub row_bytes: usize,
    pub blocks: usize,
    pub chunks: usize,
    pub n_lines: usize,
}

impl LineShape {
    /// Fails on a packed length that does not match the shape, on `n_in`
    /// past [`MAX_N_IN`] (int32 accumulators could wrap) and on sizes whose
    /// byte counts overflow.
    fn check(w: &TernaryMatrix, chunk: usize) -> Result<Self> {
        let rb = TernaryMatrix::row_bytes_for(w.n_in);
        let expect = w.n_out.checked_mul(rb);
        if expect != Some(w.packed.len()) {
            return Err(Error::input(format!(
                "ternary matrix {}x{}: {} packed bytes, expected {}",
                w.n_out,
                w.n_in,
                w.packed.len(),
                expect.map_or("an overflowing size".into(), |e| e.to_string())
            )));
        }
        if w.n_in > MAX_N_IN {
            return Err(Error::input(format!(
                "ternary matrix {}x{}: n_in above {MAX_N_IN} could overflow int32 accumulators",
                w.n_out, w.n_in
            )));
        }
        let blocks = w.n_out.div_ceil(ROWS);
        let chunks = w.n_in.div_ceil(chunk);
        let n_lines = blocks
            .checked_mul(chunks)
            .filter(|n| n.checked_mul(LINE).is_some())
            .ok_or_else(|| Error::input(format!("ternary matrix {}x{} is too large", w.n_out, w.n_in)))?;
        Ok(Self {
            row_bytes: rb,
            blocks,
            chunks,
            n_lines,
        })
    }
}

/// All-pad line: every code u = 1.
const PAD_LINE: Line = Line([0x55; LINE]);

impl TileLayout {
    /// Convert canonical weights. Fails on inconsistent or oversized shapes
    /// before allocating.
    pub fn from_canonical(w: &TernaryMatrix) -> Result<Self> {
        Self::build(w, CHUNK, PAD_LINE, |rb, b, blk| fill_block(w, rb, b, blk))
    }

    /// The weight at (r, i), decoded from the layout (for tests).
    pub fn get(&self, r: usize, i: usize) -> i8 {
        let line = &self.lines[(r / ROWS) * self.chunks + i / CHUNK].0;
        let (s, k) = ((i % CHUNK) / 4, i % 4);
        let u = (line[4 * (r % ROWS) + k] >> (2 * s)) & 3;
        u as i8 - 1
    }
}

/// Transpose one row block's canonical bytes into its lines. Canonical byte
/// `4c + s` of a row holds inputs `16c + 4s + k` at bits `2k`; the layout wants
/// them in byte `k` at bits `2s`: a 4x4 transpose of 2-bit fields.
fn fill_block(w: &TernaryMatrix, rb: usize, b: usize, blk: &mut [Line]) {
    for rr in 0..ROWS {
        let r = b * ROWS + rr;
        if r >= w.n_out {
            break;
        }
        let row = &w.packed[r * rb..(r + 1) * rb];
        for (c, line) in blk.iter_mut().enumerate() {
            // Missing canonical bytes (past the row end) are all-pad (u = 1).
            let mut src = [0x55u8; 4];
            for (s, v) in src.iter_mut().enumerate() {
                if let Some(&byte) = row.get(4 * c + s) {
                    *v = CANON_U[byte as usize];
                }
            }
            for k in 0..4 {
                let mut v = 0u8;
                for (s, &sb) in src.iter().enumerate() {
                    v |= ((sb >> (2 * k)) & 3) << (2 * s);
                }
                line.0[4 * rr + k] = v;
            }
        }
    }
}

/// A kernel's multiply over a line layout: shapes are already checked.
pub type TiledGemm<F = TwoBit> = fn(&LineLayout<F>, &[i8], usize, usize, usize, &mut [i32]);

/// A line-layout matrix bound to one kernel's multiply: the `PackedTernary`
/// plumbing the avx2, vnni, amx (tile layout) and vnni3 (base-3 layout)
/// kernels share. Several of these can share one `Arc` of a layout (see
/// `policy.rs`).
pub struct TiledPacked<F = TwoBit> {
    l: std::sync::Arc<LineLayout<F>>,
    gemm: TiledGemm<F>,
    /// The same multiply with token-major output, where the kernel has one.
    gemm_tm: Option<TiledGemm<F>>,
}

impl<F: Send + Sync + 'static> TiledPacked<F> {
    pub fn shared(l: std::sync::Arc<LineLayout<F>>, gemm: TiledGemm<F>) -> std::sync::Arc<dyn super::PackedTernary> {
        std::sync::Arc::new(Self { l, gemm, gemm_tm: None })
    }

    /// [`Self::shared`] for a kernel that also writes token-major output.
    pub fn shared_tm(
        l: std::sync::Arc<LineLayout<F>>,
        gemm: TiledGemm<F>,
        gemm_tm: TiledGemm<F>,
    ) -> std::sync::Arc<dyn super::PackedTernary> {
        std::sync::Arc::new(Self {
            l,
            gemm,
            gemm_tm: Some(gemm_tm),
        })
    }
}

impl<F: Send + Sync + 'static> super::PackedTernary for TiledPacked<F> {
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
        check_gemm_args(self.l.n_out, self.l.n_in, x, n_tokens, r0, r1, out);
        (self.gemm)(&self.l, x, n_tokens, r0, r1, out)
    }
    fn token_major(&self, _n_tokens: usize) -> bool {
        self.gemm_tm.is_some()
    }
    fn gemm_tokens(&self, x: &[i8], n_tokens: usize, r0: usize, r1: usize, out: &mut [i32]) -> bool {
        let Some(g) = self.gemm_tm else {
            return false;
        };
        check_gemm_args(self.l.n_out, self.l.n_in, x, n_tokens, r0, r1, out);
        g(&self.l, x, n_tokens, r0, r1, out);
        true
    }
}

/// `sum_i x[t * n_in + i]` for each token (the correction for u = w + 1).
pub fn token_sums(x: &[i8], n_tokens: usize, n_in: usize, sums: &mut Vec<i32>) {
    sums.clear();
    if n_in == 0 {
        sums.resize(n_tokens, 0);
        return;
    }
    sums.extend(
        x[..n_tokens * n_in]
            .chunks_exact(n_in)
            .map(|t| t.iter().map(|&v| v as i32).sum::<i32>()),
    );
}

/// Contract checks shared by the kernels' `gemm` (caller bugs, not input
/// errors: the unsafe inner loops rely on them).
pub fn check_gemm_args(n_out: usize, n_in: usize, x: &[i8], n_tokens: usize, r0: usize, r1: usize, out: &[i32]) {
    assert!(r0 <= r1 && r1 <= n_out, "gemm rows {r0}..{r1} outside 0..{n_out}");
    assert!(r0.is_multiple_of(ROWS), "gemm r0 = {r0} is not a multiple of {ROWS}");
    assert!(
        x.len() >= n_tokens * n_in,
        "gemm x has {} values, need {}",
        x.len(),
        n_tokens * n_in
    );
    assert_eq!(out.len(), (r1 - r0) * n_tokens, "gemm out length");
}

/// Checks every line layout's tests share.
#[cfg(test)]
pub(super) mod layout_checks {
    use crate::error::Result;
    use crate::model::{TernaryMatrix, WeightScale};

    /// A 19-row matrix (two row blocks, the second partial) of `n_in`
    /// inputs with all three trit values, and its trits.
    pub fn odd_matrix(n_in: usize) -> (Vec<i8>, TernaryMatrix) {
        let trits: Vec<i8> = (0..19 * n_in).map(|i| ((i * 7 + i / 5) % 3) as i8 - 1).collect();
        let m = TernaryMatrix::from_trits(19, n_in, &trits, WeightScale::PerTensor(1.0)).unwrap();
        (trits, m)
    }

    /// `get(r, i)` over both row blocks and `cols` (>= n_in) inputs is
    /// the matrix's trit, 0 in the padding.
    pub fn assert_holds(trits: &[i8], n_in: usize, cols: usize, get: impl Fn(usize, usize) -> i8) {
        for r in 0..32 {
            for i in 0..cols {
                let want = if r < 19 && i < n_in { trits[r * n_in + i] } else { 0 };
                assert_eq!(get(r, i), want, "({r},{i})");
            }
        }
    }

    /// `build` refuses a truncated matrix and one whose size overflows.
    pub fn assert_rejects_lying_shapes<T>(build: impl Fn(&TernaryMatrix) -> Result<T>) {
        let mut m = TernaryMatrix::zeros(3, 9, WeightScale::PerTensor(1.0)).unwrap();
        m.packed.pop();
        assert!(build(&m).is_err());
        let m = TernaryMatrix {
            n_out: usize::MAX / 2,
            n_in: 8,
            packed: vec![],
            scale: WeightScale::PerTensor(1.0),
        };
        assert!(build(&m).is_err());
    }
}

#[cfg(test)]
mod tests {
    use super::layout_checks::*;
    use super::*;

    #[test]
    fn layout_roundtrip_odd_shape() {
        let (trits, m) = odd_matrix(37);
        let l = TileLayout::from_canonical(&m).unwrap();
        assert_eq!((l.blocks, l.chunks), (2, 3));
        assert_holds(&trits, 37, 48, |r, i| l.get(r, i));
    }

    #[test]
    fn rejects_lying_shapes() {
        assert_rejects_lying_shapes(TileLayout::from_canonical);
    }

    #[test]
    fn codes_are_line_aligned_and_zero_where_they_grow() {
        let mut c = Codes::zeroed(100);
        assert_eq!(c.as_ptr() as usize % LINE, 0);
        assert_eq!(c.len(), 100);
        for (i, v) in c.iter_mut().enumerate() {
            *v = i as i8 - 50;
        }
        // Shrink inside a line, then grow past it: the old codes beyond the
        // short length come back as zeros, those before it unchanged.
        c.resize(70);
        c.resize(300);
        assert_eq!(c.as_ptr() as usize % LINE, 0);
        assert_eq!(c.len(), 300);
        assert!(c[..70].iter().enumerate().all(|(i, &v)| v == i as i8 - 50));
        assert!(c[70..].iter().all(|&v| v == 0));
        assert_eq!(c, {
            let mut d = Codes::zeroed(300);
            d[..70].copy_from_slice(&c[..70]);
            d
        });
        c.resize(0);
        assert!(c.is_empty());
    }
}
