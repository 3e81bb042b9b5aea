//! Decoders from GGUF ternary block formats (TQ2_0, TQ1_0, I2_S) into the
//! canonical packed form, and encoders used by tests.
//!
//! Errors are plain messages: the caller knows the file and tensor and
//! wraps them into a [`crate::Error`].

use half::f16;
use rayon::prelude::*;

use crate::model::ternary::encode_trit;
use crate::model::{TernaryMatrix, WeightScale};

/// Weights per TQ super-block.
pub const QK_K: usize = 256;
/// `qs[64]` + f16 `d`.
pub const TQ2_0_BYTES: usize = 66;
/// `qs[48]` + `qh[4]` + f16 `d`.
pub const TQ1_0_BYTES: usize = 54;
/// Weights per I2_S block (x86 layout) and its packed bytes.
pub const I2S_BLOCK: usize = 128;
/// Bytes after the packed codes: one f32 scale + 28 padding bytes.
pub const I2S_TAIL: usize = 32;

type Msg = String;

/// Signature shared by the three decoders.
pub type DecodeFn = fn(&[u8], usize, usize) -> Result<TernaryMatrix, Msg>;

/// Bytes an I2_S tensor of `n` weights takes, or None on overflow.
pub fn i2_s_bytes(n: usize) -> Option<usize> {
    (n / 4).checked_add(I2S_TAIL)
}

/// Pack one row of trits into canonical codes (`out.len() == ceil(n/4)`).
fn pack_row(trits: &[i8], out: &mut [u8]) {
    for (o, q) in out.iter_mut().zip(trits.chunks(4)) {
        *o = q
            .iter()
            .enumerate()
            .fold(0u8, |b, (i, &t)| b | (encode_trit(t) << (2 * i)));
    }
}

/// Shared driver for the 256-weight TQ formats: checks sizes, reads every
/// block's `d`, and decodes rows in parallel.
fn decode_tq(
    raw: &[u8],
    n_out: usize,
    n_in: usize,
    block_bytes: usize,
    decode_block: fn(&[u8], &mut [i8]) -> Result<(), Msg>,
) -> Result<TernaryMatrix, Msg> {
    if n_in == 0 || !n_in.is_multiple_of(QK_K) {
        return Err(format!("row length {n_in} is not a positive multiple of {QK_K}"));
    }
    let bpr = n_in / QK_K;
    let need = n_out
        .checked_mul(bpr)
        .and_then(|b| b.checked_mul(block_bytes))
        .ok_or_else(|| format!("{n_out}x{n_in} overflows"))?;
    if raw.len() != need {
        return Err(format!("{} bytes, expected {need} for {n_out}x{n_in}", raw.len()));
    }
    // f16 d sits in the last two bytes of every block.
    let scales: Vec<f32> = raw
        .chunks_exact(block_bytes)
        .map(|b| f16::from_le_bytes([b[block_bytes - 2], b[block_bytes - 1]]).to_f32())
        .collect();
    if let Some(s) = scales.iter().find(|s| !s.is_finite()) {
        return Err(format!("block scale {s} is not finite"));
    }
    let mut m =
        TernaryMatrix::zeros(n_out, n_in, WeightScale::PerBlock { block: QK_K, scales }).map_err(|e| e.to_string())?;
    let rb = m.row_bytes();
    let row_raw = bpr * block_bytes;
    m.packed
        .par_chunks_mut(rb)
        .zip(raw.par_chunks(row_raw))
        .try_for_each_init(
            || vec![0i8; n_in],
            |buf, (out, src)| {
                for (blk, t) in src.chunks_exact(block_bytes).zip(buf.chunks_exact_mut(QK_K)) {
                    decode_block(blk, t)?;
                }
                pack_row(buf, out);
                Ok::<(), Msg>(())
            },
        )?;
    Ok(m)
}

fn tq2_0_block(b: &[u8], t: &mut [i8]) -> Result<(), Msg> {
    // Flag code 3 once per block instead of branching per weight.
    let mut bad = false;
    for (j, tj) in t.iter_mut().enumerate() {
        let q = (b[32 * (j / 128) + j % 32] >> (2 * ((j % 128) / 32))) & 3;
        bad |= q == 3;
        *tj = q as i8 - 1;
    }
    block_ok(bad)
}

fn block_ok(bad: bool) -> Result<(), Msg> {
    match bad {
        true => Err("stored code 3 is not a ternary value".into()),
        false => Ok(()),
    }
}

const POW3: [u8; 5] = [1, 3, 9, 27, 81];

/// Trit `k` (most significant first) of a base-3 byte stored as ceil(v*256/243).
#[inline]
fn tq1_trit(b: u8, k: usize) -> u8 {
    ((b.wrapping_mul(POW3[k]) as u16 * 3) >> 8) as u8
}

fn tq1_0_block(b: &[u8], t: &mut [i8]) -> Result<(), Msg> {
    let (qs, qh) = (&b[..48], &b[48..52]);
    let mut bad = false;
    for (j, tj) in t.iter_mut().enumerate() {
        let q = match j {
            0..=159 => tq1_trit(qs[j % 32], j / 32),
            160..=239 => tq1_trit(qs[32 + (j - 160) % 16], (j - 160) / 16),
            _ => tq1_trit(qh[(j - 240) % 4], (j - 240) / 4),
        };
        bad |= q > 2;
        *tj = q as i8 - 1;
    }
    block_ok(bad)
}

/// TQ2_0 (ggml type 35) to canonical, with per-block scales `d`.
pub fn decode_tq2_0(raw: &[u8], n_out: usize, n_in: usize) -> Result<TernaryMatrix, Msg> {
    decode_tq(raw, n_out, n_in, TQ2_0_BYTES, tq2_0_block)
}

/// TQ1_0 (ggml type 34) to canonical, with per-block scales `d`.
pub fn decode_tq1_0(raw: &[u8], n_out: usize, n_in: usize) -> Result<TernaryMatrix, Msg> {
    decode_tq(raw, n_out, n_in, TQ1_0_BYTES, tq1_0_block)
}

/// The scale of block `b` of row `r` (block size 256) for encoding.
fn block_scale(m: &TernaryMatrix, r: usize, b: usize) -> Result<f32, Msg> {
    match &m.scale {
        WeightScale::PerTensor(s) => Ok(*s),
        WeightScale::PerBlock { block: QK_K, scales } => scales
            .get(r * (m.n_in / QK_K) + b)
            .copied()
            .ok_or_else(|| "too few block scales".to_string()),
        WeightScale::PerBlock { block, .. } => Err(format!("cannot encode {block}-weight scale blocks")),
    }
}

fn encode_tq(m: &TernaryMatrix, block_bytes: usize, enc: fn(&[i8; QK_K], &mut [u8])) -> Result<Vec<u8>, Msg> {
    if m.n_in == 0 || !m.n_in.is_multiple_of(QK_K) {
        return Err(format!("row length {} is not a positive multiple of {QK_K}", m.n_in));
    }
    let mut out = Vec::with_capacity(m.n_out * m.n_in / QK_K * block_bytes);
    let mut t = [0i8; QK_K];
    for r in 0..m.n_out {
        for b in 0..m.n_in / QK_K {
            for (j, tj) in t.iter_mut().enumerate() {
                *tj = m.get(r, b * QK_K + j);
            }
            let mut blk = vec![0u8; block_bytes];
            enc(&t, &mut blk);
            let d = f16::from_f32(block_scale(m, r, b)?).to_le_bytes();
            blk[block_bytes - 2..].copy_from_slice(&d);
            out.extend_from_slice(&blk);
        }
    }
    Ok(out)
}

/// Canonical to TQ2_0; `d` is the tensor scale (or each block's) as f16.
pub fn encode_tq2_0(m: &TernaryMatrix) -> Result<Vec<u8>, Msg> {
    encode_tq(m, TQ2_0_BYTES, |t, blk| {
        for (j, &tj) in t.iter().enumerate() {
            blk[32 * (j / 128) + j % 32] |= ((tj + 1) as u8) << (2 * ((j % 128) / 32));
        }
    })
}

/// Base-3 digits (most significant first) to ggml's ceil(v * 256 / 243) byte.
fn tq1_byte(trits: impl Iterator<Item = i8>) -> u8 {
    let v = trits.fold(0u16, |v, t| v * 3 + (t + 1) as u16);
    (v * 256).div_ceil(243) as u8
}

/// Canonical to TQ1_0 (the inverse of the layout in formats.md).
pub fn encode_tq1_0(m: &TernaryMatrix) -> Result<Vec<u8>, Msg> {
    encode_tq(m, TQ1_0_BYTES, |t, blk| {
        for m_ in 0..32 {
            blk[m_] = tq1_byte((0..5).map(|n| t[m_ + 32 * n]));
        }
        for m_ in 0..16 {
            blk[32 + m_] = tq1_byte((0..5).map(|n| t[160 + m_ + 16 * n]));
        }
        for m_ in 0..4 {
            // 4 trits, then a zero-value fifth digit so the first is most significant.
            blk[48 + m_] = tq1_byte((0..4).map(|n| t[240 + m_ + 4 * n]).chain([-1]));
        }
    })
}

/// bitnet.cpp I2_S (x86 layout, 128-weight blocks) to canonical.
/// `raw` is exactly `n_out*n_in/4 + 32` bytes.
pub fn decode_i2_s(raw: &[u8], n_out: usize, n_in: usize) -> Result<TernaryMatrix, Msg> {
    if n_in == 0 || !n_in.is_multiple_of(I2S_BLOCK) {
        return Err(format!(
            "row length {n_in} is not a positive multiple of {I2S_BLOCK}: not the x86 I2_S layout \
             (64-weight-block ARM files are not supported)"
        ));
    }
    let n = n_out
        .checked_mul(n_in)
        .ok_or_else(|| format!("{n_out}x{n_in} overflows"))?;
    let need = i2_s_bytes(n).ok_or("size overflows")?;
    if raw.len() != need {
        return Err(format!(
            "{} bytes, expected {need} (n/4 codes + 32) for {n_out}x{n_in}",
            raw.len()
        ));
    }
    let sb = &raw[n / 4..n / 4 + 4];
    let scale = f32::from_le_bytes([sb[0], sb[1], sb[2], sb[3]]);
    if !scale.is_finite() {
        return Err(format!("tensor scale {scale} is not finite"));
    }
    let mut m = TernaryMatrix::zeros(n_out, n_in, WeightScale::PerTensor(scale)).map_err(|e| e.to_string())?;
    let rb = m.row_bytes();
    m.packed
        .par_chunks_mut(rb)
        .zip(raw[..n / 4].par_chunks(n_in / 4))
        .try_for_each_init(
            || vec![0i8; n_in],
            |buf, (out, src)| {
                let mut bad = false;
                for (blk, t) in src.chunks_exact(32).zip(buf.chunks_exact_mut(I2S_BLOCK)) {
                    for (j, tj) in t.iter_mut().enumerate() {
                        let q = (blk[j % 32] >> (6 - 2 * (j / 32))) & 3;
                        bad |= q == 3;
                        *tj = q as i8 - 1;
                    }
                }
                block_ok(bad)?;
                pack_row(buf, out);
                Ok::<(), Msg>(())
            },
        )?;
    Ok(m)
}

/// Canonical (per-tensor scale) to I2_S, x86 layout, zero padding.
pub fn encode_i2_s(m: &TernaryMatrix) -> Result<Vec<u8>, Msg> {
    let WeightScale::PerTensor(scale) = m.scale else {
        return Err("I2_S holds one scale per tensor".into());
    };
    if m.n_in == 0 || !m.n_in.is_multiple_of(I2S_BLOCK) {
        return Err(format!("row length {} is not a multiple of {I2S_BLOCK}", m.n_in));
    }
    let n = m.n_out * m.n_in;
    let mut out = vec![0u8; n / 4 + I2S_TAIL];
    for i in 0..n {
        let (r, c) = (i / m.n_in, i % m.n_in);
        let code = (m.get(r, c) + 1) as u8;
        let j = i % I2S_BLOCK;
        out[(i / I2S_BLOCK) * 32 + j % 32] |= code << (6 - 2 * (j / 32));
    }
    out[n / 4..n / 4 + 4].copy_from_slice(&scale.to_le_bytes());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::synthetic::SplitMix64;

    fn random_trits(n: usize, seed: u64) -> Vec<i8> {
        let mut g = SplitMix64(seed);
        (0..n).map(|_| (g.next_u64() % 3) as i8 - 1).collect()
    }

    fn matrix(n_out: usize, n_in: usize, seed: u64, scale: f32) -> TernaryMatrix {
        TernaryMatrix::from_trits(
            n_out,
            n_in,
            &random_trits(n_out * n_in, seed),
            WeightScale::PerTensor(scale),
        )
        .unwrap()
    }

    fn assert_same_trits(a: &TernaryMatrix, b: &TernaryMatrix) {
        assert_eq!((a.n_out, a.n_in), (b.n_out, b.n_in));
        assert_eq!(a.packed, b.packed);
    }

    #[test]
    fn tq2_0_round_trip_odd_blocks() {
        // 3 rows x 3 blocks: odd counts in both directions.
        let m = matrix(3, 768, 1, 0.25);
        let raw = encode_tq2_0(&m).unwrap();
        assert_eq!(raw.len(), 9 * TQ2_0_BYTES);
        let mut d = decode_tq2_0(&raw, 3, 768).unwrap();
        assert_same_trits(&m, &d);
        d.normalize_scales();
        assert_eq!(d.scale, WeightScale::PerTensor(0.25));
    }

    #[test]
    fn tq1_0_round_trip_odd_blocks() {
        let m = matrix(5, 256, 2, 0.5);
        let raw = encode_tq1_0(&m).unwrap();
        assert_eq!(raw.len(), 5 * TQ1_0_BYTES);
        assert_same_trits(&m, &decode_tq1_0(&raw, 5, 256).unwrap());
        // Every 5-trit digit combination round-trips through the byte trick.
        let m = matrix(7, 1280, 3, 1.0);
        assert_same_trits(&m, &decode_tq1_0(&encode_tq1_0(&m).unwrap(), 7, 1280).unwrap());
    }

    #[test]
    fn i2_s_round_trip_odd_blocks() {
        let m = matrix(3, 384, 4, 0.0078125);
        let raw = encode_i2_s(&m).unwrap();
        assert_eq!(raw.len(), 3 * 384 / 4 + 32);
        let d = decode_i2_s(&raw, 3, 384).unwrap();
        assert_same_trits(&m, &d);
        assert_eq!(d.scale, WeightScale::PerTensor(0.0078125));
    }

    /// One 256-weight row with trit `t` at `pos` and zeros elsewhere.
    fn one_hot(pos: usize, t: i8, n: usize) -> TernaryMatrix {
        let mut v = vec![0i8; n];
        v[pos] = t;
        TernaryMatrix::from_trits(1, n, &v, WeightScale::PerTensor(1.0)).unwrap()
    }

    #[test]
    fn tq2_0_reference_bytes() {
        // From the spec: q = trit + 1, LOW bits first, byte m holds m + 32n.
        let all_plus = TernaryMatrix::from_trits(1, 256, &[1; 256], WeightScale::PerTensor(1.0)).unwrap();
        let raw = encode_tq2_0(&all_plus).unwrap();
        assert!(raw[..64].iter().all(|&b| b == 0xAA));
        assert_eq!(&raw[64..], &[0x00, 0x3C]); // f16 1.0
        let raw = encode_tq2_0(&one_hot(1, 1, 256)).unwrap();
        assert_eq!((raw[1], raw[0], raw[2]), (0x56, 0x55, 0x55));
        let raw = encode_tq2_0(&one_hot(32, 1, 256)).unwrap();
        assert_eq!((raw[0], raw[1]), (0x59, 0x55));
        let raw = encode_tq2_0(&one_hot(128, -1, 256)).unwrap();
        assert_eq!((raw[32], raw[0]), (0x54, 0x55));
        // Decode a hand-made block: byte 0 = 0b00_01_10_00 -> j0 -1, j32 +1, j64 0, j96 -1.
        let mut blk = vec![0x55u8; 66];
        blk[0] = 0b0001_1000;
        let d = decode_tq2_0(&blk, 1, 256).unwrap();
        assert_eq!(
            [d.get(0, 0), d.get(0, 32), d.get(0, 64), d.get(0, 96), d.get(0, 1)],
            [-1, 1, 0, -1, 0]
        );
    }

    #[test]
    fn tq1_0_reference_bytes() {
        // All-zero trits: q = 1 each; 11111_3 = 121 -> ceil(121*256/243) = 128;
        // qh: 1111_3 * 3 = 120 -> 127.
        let zeros = TernaryMatrix::zeros(1, 256, WeightScale::PerTensor(1.0)).unwrap();
        let raw = encode_tq1_0(&zeros).unwrap();
        assert!(raw[..48].iter().all(|&b| b == 128));
        assert!(raw[48..52].iter().all(|&b| b == 127));
        // All +1: 22222_3 = 242 -> 255; qh 2222_3 * 3 = 240 -> 253.
        let plus = TernaryMatrix::from_trits(1, 256, &[1; 256], WeightScale::PerTensor(1.0)).unwrap();
        let raw = encode_tq1_0(&plus).unwrap();
        assert!(raw[..48].iter().all(|&b| b == 255));
        assert!(raw[48..52].iter().all(|&b| b == 253));
        // Weight 32 is trit 1 of qs[0]: -1 there gives 10111_3 = 94 -> ceil(94*256/243) = 100.
        let raw = encode_tq1_0(&one_hot(32, -1, 256)).unwrap();
        assert_eq!((raw[0], raw[1]), (100, 128));
        let d = decode_tq1_0(&raw, 1, 256).unwrap();
        assert_eq!((d.get(0, 32), d.get(0, 0), d.get(0, 64)), (-1, 0, 0));
    }

    #[test]
    fn i2_s_reference_bytes() {
        // Codes 0 = -1, 1 = 0, 2 = +1; weight j -> byte j % 32, shift 6 - 2*(j/32).
        let raw = encode_i2_s(&one_hot(0, -1, 128)).unwrap();
        assert_eq!((raw[0], raw[1]), (0x15, 0x55));
        let raw = encode_i2_s(&one_hot(32, -1, 128)).unwrap();
        assert_eq!(raw[0], 0x45);
        let raw = encode_i2_s(&one_hot(127, 1, 128)).unwrap();
        assert_eq!((raw[31], raw[30]), (0x56, 0x55));
        assert_eq!(&raw[32..36], &1.0f32.to_le_bytes());
        assert!(raw[36..].iter().all(|&b| b == 0));
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(decode_tq2_0(&[0; 66], 1, 128).is_err());
        assert!(decode_tq2_0(&[0; 65], 1, 256).is_err());
        assert!(decode_tq2_0(&[0; 66], usize::MAX, 256).is_err());
        // Code 3 is not a trit.
        let mut blk = [0xFF; 66];
        blk[64..].copy_from_slice(&[0x00, 0x3C]);
        let e = decode_tq2_0(&blk, 1, 256).unwrap_err();
        assert!(e.contains("code 3"), "{e}");
        // A NaN block scale (f16 0xFFFF) is refused too.
        let e = decode_tq2_0(&[0x55; 66].map(|b| b | 0xAA), 1, 256).unwrap_err();
        assert!(e.contains("not finite"), "{e}");
        assert!(decode_tq1_0(&[0; 53], 1, 256).is_err());
        // 64-weight rows (ARM block size) are rejected by name.
        let e = decode_i2_s(&[0x55; 16 + 32], 1, 64).unwrap_err();
        assert!(e.contains("ARM"), "{e}");
        assert!(decode_i2_s(&[0x55; 32 + 31], 1, 128).is_err());
        let mut raw = vec![0x55; 64];
        raw[32..36].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(decode_i2_s(&raw, 1, 128).is_err());
    }
}
