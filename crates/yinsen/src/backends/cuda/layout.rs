//! The GPU weight layout, derived from the canonical [`TernaryMatrix`] at upload.
//!
//! Spec ("offset-code chunks"):
//! - Rows of `n_in` weights are padded to `chunks = ceil(n_in / 64)` chunks of
//!   16 bytes (64 weights); rows are consecutive, so row `r` chunk `c` is the
//!   16 bytes at `(r * chunks + c) * 16` — one aligned `uint4` load.
//! - A chunk is 4 little-endian u32 words; word `m` holds the weights
//!   `64c + 16m + 4j + k` (j, k in 0..4) at bits `8k + 2j`, as the code
//!   `w + 1` (0 = -1, 1 = 0, 2 = +1). Pad weights are code 1 (zero); the
//!   canonical reserved code `11` becomes 1 too.
//! - So `(word >> 2j) & 0x03030303` is an int8x4 matching x bytes
//!   `64c + 16m + 4j .. +4` (one dp4a, and the same words expand to int8
//!   tiles for the tensor cores), and the exact product is
//!   `sum (w+1) x - sum x`, with `sum x` computed once per token.
//! - Matrices that share an input (q|k|v, gate|up) are stacked row-wise
//!   into one, with one f32 scale per row.
//!
//! Stage tiles (a second copy for the Hopper TMA GEMM, [`GpuLayout::stage_tiles`]):
//! - The same 16-byte chunks regrouped so that what one block of that GEMM
//!   reads per pipeline stage — 128 rows x 2 chunks — is 4096 contiguous
//!   bytes, one bulk copy: block `b` (rows 128 b ..), stage `s` (chunks 2 s,
//!   2 s + 1) at `(b * stages + s) * 4096`, row `r` of the block at `r * 32`.
//! - `stages` = [`tile_stages`] (even); pad rows and chunks are zero bytes.
//! - A stacked [gate | up] matrix may instead pair its rows per block
//!   ([`GpuLayout::stage_tiles_paired`]) for the fused gated epilogue.
//!   They only ever meet zero activations (inputs past the matrix) or feed
//!   outputs that are never stored (rows past it).

use crate::error::{Error, Result};
use crate::model::{TernaryMatrix, WeightScale};

/// Rows of one or more stacked matrices in the GPU layout (host side).
#[derive(Clone, Debug)]
pub struct GpuLayout {
    pub n_rows: usize,
    pub n_in: usize,
    pub chunks: usize,
    pub bytes: Vec<u8>,
    pub row_scale: Vec<f32>,
}

pub const CHUNK_WEIGHTS: usize = 64;

impl GpuLayout {
    /// Padded input length (multiple of 64): the stride of int8 activations.
    pub fn kpad(&self) -> usize {
        self.chunks * CHUNK_WEIGHTS
    }

    /// Stack `mats` (same `n_in`) row-wise. Per-block scales are unsupported here.
    pub fn stack(mats: &[&TernaryMatrix]) -> Result<Self> {
        let n_in = mats.first().map_or(0, |m| m.n_in);
        if n_in == 0 || mats.iter().any(|m| m.n_in != n_in) {
            return Err(Error::input(
                "GPU layout: stacked matrices need one non-zero input width",
            ));
        }
        let n_rows = mats
            .iter()
            .try_fold(0usize, |a, m| a.checked_add(m.n_out))
            .ok_or_else(|| Error::input("GPU layout: row count overflows"))?;
        let chunks = n_in.div_ceil(CHUNK_WEIGHTS);
        let total = n_rows
            .checked_mul(chunks * 16)
            .filter(|&b| b <= (1usize << 40))
            .ok_or_else(|| Error::input(format!("GPU layout: {n_rows}x{n_in} is too large")))?;
        let mut bytes = vec![0u8; total];
        let mut row_scale = Vec::with_capacity(n_rows);
        let mut r0 = 0;
        for m in mats {
            let ws = match m.scale {
                WeightScale::PerTensor(s) => s,
                WeightScale::PerBlock { .. } => {
                    return Err(Error::Unsupported(
                        "the CUDA backend needs per-tensor weight scales (this model has per-block scales)".into(),
                    ))
                }
            };
            for r in 0..m.n_out {
                encode_row(m, r, &mut bytes[(r0 + r) * chunks * 16..(r0 + r + 1) * chunks * 16]);
            }
            row_scale.extend(std::iter::repeat_n(ws, m.n_out));
            r0 += m.n_out;
        }
        Ok(Self {
            n_rows,
            n_in,
            chunks,
            bytes,
            row_scale,
        })
    }
}

/// Rows per block of the stage tiles.
pub const TILE_ROWS: usize = 128;

/// Pipeline stages (2 chunks each, an even count) over `chunks` chunks.
pub fn tile_stages(chunks: usize) -> usize {
    (chunks.div_ceil(2) + 1) & !1
}

impl GpuLayout {
    /// The rows as stage tiles (see the module doc).
    pub fn stage_tiles(&self) -> Vec<u8> {
        self.stage_tiles_in(&(0..self.n_rows).map(Some).collect::<Vec<_>>())
    }

    /// Stage tiles of a stacked [gate | up] matrix (even `n_rows` = 2 f) for
    /// the fused gated epilogue: block `b` holds gate rows 64 b .. 64 b + 63
    /// in its rows 0..64 and the matching up rows in 64..128, so the block
    /// that computes a gate value also has its up value.
    pub fn stage_tiles_paired(&self) -> Vec<u8> {
        let (f, half) = (self.n_rows / 2, TILE_ROWS / 2);
        let order: Vec<Option<usize>> = (0..f.div_ceil(half) * TILE_ROWS)
            .map(|i| {
                let p = (i / TILE_ROWS) * half + i % half;
                (p < f).then_some(p + if i % TILE_ROWS >= half { f } else { 0 })
            })
            .collect();
        self.stage_tiles_in(&order)
    }

    /// Stage tiles whose tile row `i` is row `order[i]` (None: zero padding).
    fn stage_tiles_in(&self, order: &[Option<usize>]) -> Vec<u8> {
        let (stages, rb) = (tile_stages(self.chunks), order.len().div_ceil(TILE_ROWS));
        let mut out = vec![0u8; rb * stages * TILE_ROWS * 32];
        for (i, src) in order.iter().enumerate() {
            let Some(r) = *src else { continue };
            let (b, rr) = (i / TILE_ROWS, i % TILE_ROWS);
            for c in 0..self.chunks {
                let o = ((b * stages + c / 2) * TILE_ROWS + rr) * 32 + (c % 2) * 16;
                let k = (r * self.chunks + c) * 16;
                out[o..o + 16].copy_from_slice(&self.bytes[k..k + 16]);
            }
        }
        out
    }

    /// The same rows reordered: new row `i` is old row `order[i]`.
    pub fn permute_rows(&self, order: &[usize]) -> Result<Self> {
        if order.len() != self.n_rows || order.iter().any(|&r| r >= self.n_rows) {
            return Err(Error::input("GPU layout: bad row permutation"));
        }
        let rb = self.chunks * 16;
        let mut bytes = Vec::with_capacity(self.bytes.len());
        for &r in order {
            bytes.extend_from_slice(&self.bytes[r * rb..(r + 1) * rb]);
        }
        Ok(Self {
            bytes,
            row_scale: order.iter().map(|&r| self.row_scale[r]).collect(),
            ..self.clone()
        })
    }
}

/// Row order of a stacked q|k|v matrix that puts the two halves of every
/// RoPE pair side by side: in each q and k head, rows 2j and 2j + 1 are dims
/// j and j + hd/2. The v rows keep their order.
pub fn rope_pair_order(n_heads: usize, n_kv: usize, hd: usize) -> Vec<usize> {
    let half = hd / 2;
    let mut order = Vec::with_capacity((n_heads + 2 * n_kv) * hd);
    for h in 0..n_heads + n_kv {
        for j in 0..half {
            order.push(h * hd + j);
            order.push(h * hd + j + half);
        }
    }
    order.extend((n_heads + n_kv) * hd..(n_heads + 2 * n_kv) * hd);
    order
}

/// Encode canonical row `r` of `m` into `out` (chunks * 16 bytes).
fn encode_row(m: &TernaryMatrix, r: usize, out: &mut [u8]) {
    let row = m.row(r);
    for (c, chunk) in out.chunks_exact_mut(16).enumerate() {
        for mw in 0..4 {
            let mut word = 0u32;
            for j in 0..4 {
                for k in 0..4 {
                    let i = c * 64 + mw * 16 + j * 4 + k;
                    let w = if i < m.n_in {
                        crate::model::ternary::decode_code(row[i / 4] >> (2 * (i % 4)))
                    } else {
                        0
                    };
                    word |= ((w + 1) as u32) << (8 * k + 2 * j);
                }
            }
            chunk[4 * mw..4 * mw + 4].copy_from_slice(&word.to_le_bytes());
        }
    }
}

/// Host model of the GPU dot product over one layout row (for tests of the
/// layout itself, independent of any kernel).
pub fn host_dot(l: &GpuLayout, r: usize, x: &[i8]) -> i32 {
    let row = &l.bytes[r * l.chunks * 16..(r + 1) * l.chunks * 16];
    let mut acc = 0i32;
    let mut xsum = 0i32;
    for (c, chunk) in row.chunks_exact(16).enumerate() {
        for mw in 0..4 {
            let word = u32::from_le_bytes(chunk[4 * mw..4 * mw + 4].try_into().unwrap());
            for j in 0..4 {
                let e = (word >> (2 * j)) & 0x0303_0303;
                for k in 0..4 {
                    let i = c * 64 + mw * 16 + j * 4 + k;
                    let xv = x.get(i).copied().unwrap_or(0) as i32;
                    acc += ((e >> (8 * k)) & 0xff) as i32 * xv;
                }
            }
        }
    }
    for &v in x {
        xsum += v as i32;
    }
    acc - xsum
}

#[cfg(test)]
mod tests {
    #[test]
    fn stage_tiles_hold_every_chunk_once() {
        // 130 rows (a second, short block), 3 chunks (a half stage).
        let l = GpuLayout {
            n_rows: 130,
            n_in: 150,
            chunks: 3,
            bytes: (0..130 * 3 * 16).map(|i| (i % 253) as u8 + 1).collect(),
            row_scale: vec![1.0; 130],
        };
        let t = l.stage_tiles();
        assert_eq!(tile_stages(3), 2);
        assert_eq!(t.len(), 2 * 2 * TILE_ROWS * 32);
        assert_eq!(t.iter().filter(|&&v| v != 0).count(), l.bytes.len());
        // Row 129 (block 1, row 1), chunk 2 (stage 1, first half).
        let o = ((2 + 1) * TILE_ROWS + 1) * 32;
        assert_eq!(&t[o..o + 16], &l.bytes[(129 * 3 + 2) * 16..(129 * 3 + 3) * 16]);
        // Paired (f = 65): block 1 row 0 is gate row 64, row 64 its up row 129.
        let p = l.stage_tiles_paired();
        assert_eq!(p.len(), t.len());
        assert_eq!(p.iter().filter(|&&v| v != 0).count(), l.bytes.len());
        let at = |b: usize, rr: usize, c: usize| ((b * 2 + c / 2) * TILE_ROWS + rr) * 32 + (c % 2) * 16;
        assert_eq!(
            &p[at(1, 0, 1)..at(1, 0, 1) + 16],
            &l.bytes[(64 * 3 + 1) * 16..(64 * 3 + 2) * 16]
        );
        assert_eq!(
            &p[at(1, 64, 2)..at(1, 64, 2) + 16],
            &l.bytes[(129 * 3 + 2) * 16..(129 * 3 + 3) * 16]
        );
        assert_eq!(
            &p[at(0, 70, 0)..at(0, 70, 0) + 16],
            &l.bytes[(71 * 3) * 16..(71 * 3 + 1) * 16]
        );
    }

    use super::*;
    use crate::backends::cpu::reference::ternary_matmul_i32;
    use crate::model::synthetic::{random_ternary, SplitMix64};

    #[test]
    fn layout_dot_matches_reference() {
        for (o, i, seed) in [(5, 7, 1u64), (3, 64, 2), (9, 130, 3), (4, 1, 4)] {
            let mut m = random_ternary(o, i, seed).unwrap();
            // A reserved code must read as zero.
            m.packed[0] |= 3;
            let l = GpuLayout::stack(&[&m]).unwrap();
            let mut rng = SplitMix64(seed);
            let x: Vec<i8> = (0..i).map(|_| (rng.next_u64() & 0xff) as u8 as i8).collect();
            let want = ternary_matmul_i32(&m, &x, 1);
            for (r, w) in want.iter().enumerate() {
                assert_eq!(host_dot(&l, r, &x), *w, "{o}x{i} row {r}");
            }
        }
    }

    #[test]
    fn rope_pair_order_is_a_permutation_of_pairs() {
        let o = rope_pair_order(2, 1, 4);
        assert_eq!(o, vec![0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 13, 14, 15]);
        let m = random_ternary(16, 70, 9).unwrap();
        let l = GpuLayout::stack(&[&m]).unwrap();
        let p = l.permute_rows(&o).unwrap();
        let x: Vec<i8> = (0..70).map(|i| (i * 37 % 251) as u8 as i8).collect();
        for (i, &r) in o.iter().enumerate() {
            assert_eq!(host_dot(&p, i, &x), host_dot(&l, r, &x));
        }
        assert!(l.permute_rows(&o[1..]).is_err());
    }

    #[test]
    fn per_block_scale_is_unsupported() {
        let m = TernaryMatrix::from_trits(
            1,
            4,
            &[1, 0, -1, 1],
            WeightScale::PerBlock {
                block: 4,
                scales: vec![1.0],
            },
        )
        .unwrap();
        assert!(matches!(GpuLayout::stack(&[&m]), Err(Error::Unsupported(_))));
    }
}
