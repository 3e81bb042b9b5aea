//! Canonical packed ternary matrices: the one form every file format is
//! converted into and every backend layout is derived from.
//!
//! Layout spec (see formats.md, "Canonical in-memory trit code"):
//! - 2 bits per weight, least-significant pair first: `00` = 0, `01` = +1,
//!   `10` = -1, `11` reserved (decodes as 0, never written).
//! - Row-major, `n_out` rows of `n_in` weights. Row stride is
//!   `row_bytes() = ceil(n_in / 4)` bytes; pad weights at the end of a row are
//!   code `00` (zero), so they never change a dot product.
//! - Weight `(r, c)` lives in byte `r * row_bytes + c / 4` at bit `2 * (c % 4)`.

use crate::error::{Error, Result};

/// Encode one trit (-1, 0, +1) as its 2-bit canonical code.
#[inline]
pub const fn encode_trit(t: i8) -> u8 {
    match t {
        1 => 0b01,
        -1 => 0b10,
        _ => 0b00,
    }
}

/// Decode a 2-bit canonical code branch-free: `(c & 1) - (c >> 1)`,
/// with the reserved `11` mapping to 0.
#[inline]
pub const fn decode_code(c: u8) -> i8 {
    // 11 gives 1 - 1 = 0, so the reserved code needs no special case.
    let c = c & 3;
    (c & 1) as i8 - (c >> 1) as i8
}

/// The four trits of a canonical byte (input k at bits `2k`), for every byte.
pub const CANON_TRITS: [[i8; 4]; 256] = {
    let mut t = [[0i8; 4]; 256];
    let mut b = 0;
    while b < 256 {
        let mut k = 0;
        while k < 4 {
            t[b][k] = decode_code((b >> (2 * k)) as u8);
            k += 1;
        }
        b += 1;
    }
    t
};

/// How the float scale applies to the exact integer dot product.
#[derive(Clone, Debug, PartialEq)]
pub enum WeightScale {
    /// `y = (W_tern . xq) * scale / s_x` — the BitNet case.
    PerTensor(f32),
    /// One scale per `block` consecutive weights of a row (GGUF TQ blocks whose
    /// `d` differ). Row `r`, block `b` uses `scales[r * blocks_per_row + b]`.
    /// Only the scalar reference computes with this; fast paths need PerTensor.
    PerBlock { block: usize, scales: Vec<f32> },
}

#[derive(Clone, Debug)]
pub struct TernaryMatrix {
    pub n_out: usize,
    pub n_in: usize,
    /// `n_out * row_bytes()` bytes of canonical codes.
    pub packed: Vec<u8>,
    pub scale: WeightScale,
}

impl TernaryMatrix {
    pub fn row_bytes_for(n_in: usize) -> usize {
        n_in.div_ceil(4)
    }
    pub fn row_bytes(&self) -> usize {
        Self::row_bytes_for(self.n_in)
    }

    /// An all-zero matrix of the given shape, to be filled with `set`.
    /// Fails (instead of aborting) when the size overflows or is absurd.
    pub fn zeros(n_out: usize, n_in: usize, scale: WeightScale) -> Result<Self> {
        let bytes = n_out
            .checked_mul(Self::row_bytes_for(n_in))
            .filter(|&b| b <= (1usize << 40))
            .ok_or_else(|| Error::input(format!("ternary matrix {n_out}x{n_in} is too large")))?;
        Ok(Self {
            n_out,
            n_in,
            packed: vec![0u8; bytes],
            scale,
        })
    }

    /// Build from one trit per weight, row-major `[n_out][n_in]`.
    pub fn from_trits(n_out: usize, n_in: usize, trits: &[i8], scale: WeightScale) -> Result<Self> {
        if trits.len() != n_out * n_in {
            return Err(Error::input(format!(
                "from_trits: {} values for a {n_out}x{n_in} matrix",
                trits.len()
            )));
        }
        let mut m = Self::zeros(n_out, n_in, scale)?;
        for r in 0..n_out {
            for c in 0..n_in {
                m.set(r, c, trits[r * n_in + c]);
            }
        }
        Ok(m)
    }

    #[inline]
    pub fn set(&mut self, r: usize, c: usize, t: i8) {
        let idx = r * self.row_bytes() + c / 4;
        let sh = 2 * (c % 4);
        self.packed[idx] = (self.packed[idx] & !(3 << sh)) | (encode_trit(t) << sh);
    }

    #[inline]
    pub fn get(&self, r: usize, c: usize) -> i8 {
        let b = self.packed[r * self.row_bytes() + c / 4];
        decode_code(b >> (2 * (c % 4)))
    }

    pub fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.packed[r * rb..(r + 1) * rb]
    }

    /// Per-tensor scale, or None when scales vary per block.
    pub fn tensor_scale(&self) -> Option<f32> {
        match self.scale {
            WeightScale::PerTensor(s) => Some(s),
            WeightScale::PerBlock { .. } => None,
        }
    }

    /// Bytes resident for this matrix (codes + scales).
    pub fn resident_bytes(&self) -> usize {
        self.packed.len()
            + match &self.scale {
                WeightScale::PerTensor(_) => 4,
                WeightScale::PerBlock { scales, .. } => scales.len() * 4,
            }
    }

    /// Collapse per-block scales into one when every block that holds a
    /// non-zero weight has the same scale; zero the codes of blocks whose
    /// scale is 0 (they contribute nothing either way).
    pub fn normalize_scales(&mut self) {
        let WeightScale::PerBlock { block, scales } = &self.scale else {
            return;
        };
        let (block, scales) = (*block, scales.clone());
        let bpr = self.n_in.div_ceil(block);
        let mut common: Option<f32> = None;
        let mut uniform = true;
        for r in 0..self.n_out {
            for b in 0..bpr {
                let s = scales[r * bpr + b];
                let (c0, c1) = (b * block, ((b + 1) * block).min(self.n_in));
                if s == 0.0 {
                    for c in c0..c1 {
                        self.set(r, c, 0);
                    }
                    continue;
                }
                let nonzero = (c0..c1).any(|c| self.get(r, c) != 0);
                if !nonzero {
                    continue;
                }
                match common {
                    None => common = Some(s),
                    Some(x) if x == s => {}
                    Some(_) => uniform = false,
                }
            }
        }
        if uniform {
            self.scale = WeightScale::PerTensor(common.unwrap_or(0.0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_spec() {
        assert_eq!(decode_code(0b00), 0);
        assert_eq!(decode_code(0b01), 1);
        assert_eq!(decode_code(0b10), -1);
        assert_eq!(decode_code(0b11), 0);
        for t in [-1i8, 0, 1] {
            assert_eq!(decode_code(encode_trit(t)), t);
        }
        // Reference values from formats.md.
        let m = TernaryMatrix::from_trits(1, 4, &[1, 1, 1, 1], WeightScale::PerTensor(1.0)).unwrap();
        assert_eq!(m.packed, vec![0x55]);
        let m = TernaryMatrix::from_trits(1, 4, &[-1; 4], WeightScale::PerTensor(1.0)).unwrap();
        assert_eq!(m.packed, vec![0xAA]);
    }

    #[test]
    fn set_get_roundtrip_odd_width() {
        let trits: Vec<i8> = (0..3 * 7).map(|i| ((i * 7 + 3) % 3) as i8 - 1).collect();
        let m = TernaryMatrix::from_trits(3, 7, &trits, WeightScale::PerTensor(1.0)).unwrap();
        assert_eq!(m.row_bytes(), 2);
        for r in 0..3 {
            for c in 0..7 {
                assert_eq!(m.get(r, c), trits[r * 7 + c]);
            }
            // pad weight (c = 7) is zero
            assert_eq!(m.row(r)[1] >> 6, 0);
        }
    }

    #[test]
    fn per_block_scales_collapse() {
        let mut m = TernaryMatrix::from_trits(
            1,
            8,
            &[1, -1, 0, 1, 1, 1, 1, 1],
            WeightScale::PerBlock {
                block: 4,
                scales: vec![0.5, 0.0],
            },
        )
        .unwrap();
        m.normalize_scales();
        assert_eq!(m.scale, WeightScale::PerTensor(0.5));
        assert_eq!((4..8).map(|c| m.get(0, c)).collect::<Vec<_>>(), vec![0; 4]);
    }
}
