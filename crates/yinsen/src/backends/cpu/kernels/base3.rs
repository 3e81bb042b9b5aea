//! The 1.6-bit CPU ternary layout ("base-3 layout"): five weights per byte,
//! for decode, where every weight byte comes from memory once per token.
//!
//! # Spec
//!
//! - Each weight is the code `u = w + 1` in {0, 1, 2}, as in the tile layout.
//! - Rows are grouped in **row blocks** of 16 output rows; inputs in
//!   **chunks** of 20 inputs. `n_out` is padded to `blocks * 16`, `n_in` to
//!   `chunks * 20`; every pad weight has `u = 1` (w = 0).
//! - The matrix is a sequence of 64-byte, 64-byte-aligned **lines**, row block
//!   major: line `b * chunks + c` holds row block `b`, chunk `c`, so a row
//!   block is one contiguous stream of `chunks * 64` bytes.
//! - Inside a line, byte `j = 4 * rr + k` (rr = row within the block, k =
//!   0..4) holds `sum_s u_s * 3^s` (s = 0..5, a value 0..=242), where `u_s` is
//!   the code of input `20c + 4s + k` of row `16b + rr`.
//!
//! Why: 64 bytes hold 320 weights instead of 256 (0.8x the bytes of the
//! 2-bit tile layout), and decode is bound by memory bandwidth (on one core
//! of this class of machine, by what one core's streams keep in flight). A
//! kernel turns a line back into the tile layout's operands: `u_4 = byte /
//! 81` (two compares), and `FIELDS[byte - 81 u_4]` is the tile layout's line
//! byte of planes 0..4 (u_s at bits `2s`): 81 entries, one AVX-512 VBMI
//! `vpermi2b`. Plane s is then the unsigned VPDPBUSD operand for 16 rows x
//! inputs `20c + 4s .. 20c + 4s + 4`; kernels subtract each token's
//! `sum_i x_i`.
//!
//! Overflow: the same bound as the tile layout (`|u * x| <= 256` per
//! product, `n_in <= MAX_N_IN`), so i32 accumulators never wrap.

use super::layout::{Line, LineLayout, LINE, ROWS};
use crate::error::Result;
use crate::model::ternary::CANON_TRITS;
use crate::model::TernaryMatrix;

/// Inputs per chunk (one line holds ROWS x CHUNK codes).
pub const CHUNK: usize = 20;
/// Planes per line (4 inputs each).
pub const PLANES: usize = 5;

/// Byte value of an all-pad group of five codes (u = 1 each).
const PAD_BYTE: u8 = 1 + 3 + 9 + 27 + 81;

/// The base-3 layout's line format (see the module doc).
pub enum Base3 {}

/// Ternary weights in the base-3 layout.
pub type Base3Layout = LineLayout<Base3>;

/// `FIELDS[v]`: codes u_0..u_3 of `v = sum_{s<4} u_s 3^s` as 2-bit fields
/// (u_s at bits 2s); entries past 80 are never indexed and hold pad codes.
pub static FIELDS: Table = Table({
    let mut t = [0x55u8; 256];
    let mut b = 0;
    while b < 81 {
        let (mut v, mut s, mut f) = (b, 0, 0u8);
        while s < 4 {
            f |= ((v % 3) as u8) << (2 * s);
            v /= 3;
            s += 1;
        }
        t[b] = f;
        b += 1;
    }
    t
});

/// A 256-entry byte table, aligned for 64-byte vector loads.
#[repr(C, align(64))]
pub struct Table(pub [u8; 256]);

impl Base3Layout {
    /// Convert canonical weights. Fails on inconsistent or oversized shapes
    /// before allocating.
    pub fn from_canonical(w: &TernaryMatrix) -> Result<Self> {
        Self::build(w, CHUNK, Line([PAD_BYTE; LINE]), |rb, b, blk| fill_block(w, rb, b, blk))
    }

    /// The weight at (r, i), decoded from the layout (for tests).
    pub fn get(&self, r: usize, i: usize) -> i8 {
        let byte = self.lines[(r / ROWS) * self.chunks + i / CHUNK].0[4 * (r % ROWS) + i % 4];
        let s = (i % CHUNK) / 4;
        (byte / 3u8.pow(s as u32) % 3) as i8 - 1
    }
}

/// One row block's lines from the canonical rows (2-bit codes, input i at
/// bits `2 (i % 4)` of byte `i / 4`).
fn fill_block(w: &TernaryMatrix, rb: usize, b: usize, blk: &mut [Line]) {
    let mut u = vec![1u8; blk.len() * CHUNK];
    for rr in 0..ROWS {
        let r = b * ROWS + rr;
        if r >= w.n_out {
            break;
        }
        let row = &w.packed[r * rb..(r + 1) * rb];
        // A canonical byte's four codes at once (the row's last byte may
        // hold fewer than four inputs: the rest of `u` keeps its pad 1s).
        for (dst, &byte) in u[..w.n_in].chunks_mut(4).zip(row) {
            for (d, &t) in dst.iter_mut().zip(&CANON_TRITS[byte as usize]) {
                *d = (t + 1) as u8;
            }
        }
        for (c, line) in blk.iter_mut().enumerate() {
            for k in 0..4 {
                let mut byte = 0u8;
                for s in (0..PLANES).rev() {
                    byte = byte * 3 + u[CHUNK * c + 4 * s + k];
                }
                line.0[4 * rr + k] = byte;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::layout::layout_checks::*;
    use super::*;

    #[test]
    fn layout_roundtrip_odd_shape() {
        let (trits, m) = odd_matrix(47);
        let l = Base3Layout::from_canonical(&m).unwrap();
        assert_eq!((l.blocks, l.chunks), (2, 3));
        assert_eq!(l.resident_bytes(), 2 * 3 * 64);
        assert_holds(&trits, 47, 60, |r, i| l.get(r, i));
    }

    #[test]
    fn fields_invert_the_packing() {
        for b in 0..243usize {
            let (v, top) = (b % 81, b / 81);
            let f = FIELDS.0[v];
            let back: usize = (0..4)
                .map(|s| ((f >> (2 * s)) & 3) as usize * 3usize.pow(s))
                .sum::<usize>()
                + 81 * top;
            assert_eq!(back, b);
            assert!((0..4).all(|s| (f >> (2 * s)) & 3 < 3));
        }
        assert_eq!(FIELDS.0[PAD_BYTE as usize - 81], 0x55);
    }

    #[test]
    fn rejects_lying_shapes() {
        assert_rejects_lying_shapes(Base3Layout::from_canonical);
    }
}
