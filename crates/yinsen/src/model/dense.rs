//! Dense (non-ternary) matrices: the token embedding and an untied lm_head.
//! Kept in their file dtype (often memory-mapped) and decoded a row at a time;
//! never expanded whole to f32.

use std::sync::Arc;

use half::{bf16, f16};

use crate::error::{Error, Result};

/// Bytes that are either owned or a window into a memory-mapped file.
#[derive(Clone, Debug)]
pub enum Storage {
    Owned(Arc<Vec<u8>>),
    Mapped {
        map: Arc<memmap2::Mmap>,
        offset: usize,
        len: usize,
    },
}

impl Storage {
    pub fn owned(v: Vec<u8>) -> Self {
        Storage::Owned(Arc::new(v))
    }
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Storage::Owned(v) => v,
            Storage::Mapped { map, offset, len } => &map[*offset..*offset + *len],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenseType {
    F32,
    F16,
    BF16,
    /// ggml Q8_0: blocks of 32 = f16 d + 32 x i8.
    Q8_0,
    /// ggml Q6_K: super-blocks of 256 = ql[128] qh[64] scales[16] f16 d (210 bytes).
    Q6K,
}

impl DenseType {
    /// (elements per block, bytes per block)
    pub fn block(&self) -> (usize, usize) {
        match self {
            DenseType::F32 => (1, 4),
            DenseType::F16 | DenseType::BF16 => (1, 2),
            DenseType::Q8_0 => (32, 34),
            DenseType::Q6K => (256, 210),
        }
    }
    pub fn name(&self) -> &'static str {
        match self {
            DenseType::F32 => "F32",
            DenseType::F16 => "F16",
            DenseType::BF16 => "BF16",
            DenseType::Q8_0 => "Q8_0",
            DenseType::Q6K => "Q6_K",
        }
    }
    /// Bytes of one row of `cols` elements, or None if cols does not fit the block.
    pub fn row_bytes(&self, cols: usize) -> Option<usize> {
        let (be, bb) = self.block();
        if !cols.is_multiple_of(be) {
            return None;
        }
        (cols / be).checked_mul(bb)
    }
}

#[derive(Clone, Debug)]
pub struct DenseMatrix {
    pub rows: usize,
    pub cols: usize,
    pub dtype: DenseType,
    pub data: Storage,
}

impl DenseMatrix {
    /// Checks that `data` holds exactly `rows x cols` elements of `dtype`.
    pub fn new(rows: usize, cols: usize, dtype: DenseType, data: Storage) -> Result<Self> {
        let need = dtype
            .row_bytes(cols)
            .and_then(|rb| rb.checked_mul(rows))
            .ok_or_else(|| {
                Error::input(format!(
                    "{} matrix {rows}x{cols}: width does not fit its block size or size overflows",
                    dtype.name()
                ))
            })?;
        if data.as_slice().len() != need {
            return Err(Error::input(format!(
                "{} matrix {rows}x{cols} needs {need} bytes, got {}",
                dtype.name(),
                data.as_slice().len()
            )));
        }
        Ok(Self {
            rows,
            cols,
            dtype,
            data,
        })
    }

    pub fn from_f32(rows: usize, cols: usize, v: &[f32]) -> Result<Self> {
        Self::new(
            rows,
            cols,
            DenseType::F32,
            Storage::owned(bytemuck::cast_slice(v).to_vec()),
        )
    }

    pub fn row_bytes(&self) -> usize {
        self.dtype.row_bytes(self.cols).unwrap_or(0)
    }

    pub fn row_raw(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.data.as_slice()[r * rb..(r + 1) * rb]
    }

    /// Decode row `r` into `out` (len = cols).
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        decode_row(self.dtype, self.row_raw(r), out);
    }

    pub fn resident_bytes(&self) -> usize {
        self.data.as_slice().len()
    }

    /// An 8-bit (ggml Q8_0) copy, halving the bytes an F16 lm_head reads per
    /// decode step: per 32 values `d = max|x| / 127`, `q = round(x / d)`.
    pub fn to_q8_0(&self) -> Result<DenseMatrix> {
        use rayon::prelude::*;
        if !self.cols.is_multiple_of(32) {
            return Err(Error::Unsupported(format!(
                "Q8_0 copy needs a width divisible by 32, got {}",
                self.cols
            )));
        }
        let rb = DenseType::Q8_0.row_bytes(self.cols).unwrap_or(0);
        let mut out = crate::mem::huge_vec(rb * self.rows, 0u8);
        out.par_chunks_mut(rb).enumerate().for_each(|(r, dst)| {
            let mut row = vec![0f32; self.cols];
            self.row_to_f32(r, &mut row);
            for (blk, x) in dst.chunks_exact_mut(34).zip(row.chunks_exact(32)) {
                let (dh, codes) = quantize_q8_0_block(x);
                blk[..2].copy_from_slice(&dh.to_le_bytes());
                for (q, c) in blk[2..].iter_mut().zip(codes) {
                    *q = c as u8;
                }
            }
        });
        DenseMatrix::new(self.rows, self.cols, DenseType::Q8_0, Storage::owned(out))
    }
}

/// One ggml Q8_0 block of 32 values: `d = max|x| / 127` (stored as f16),
/// `q = round(x / d)` clamped to ±127.
pub fn quantize_q8_0_block(x: &[f32]) -> (f16, [i8; 32]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [0i8; 32];
    for (c, &v) in q.iter_mut().zip(x) {
        *c = (v * inv).round().clamp(-127.0, 127.0) as i8;
    }
    (f16::from_f32(d), q)
}

/// Decode one row of raw bytes of `dtype` into f32.
pub fn decode_row(dtype: DenseType, raw: &[u8], out: &mut [f32]) {
    match dtype {
        DenseType::F32 => {
            for (o, c) in out.iter_mut().zip(raw.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DenseType::F16 => {
            use half::slice::HalfFloatSliceExt;
            // The mapped row may be unaligned for u16; copy via chunks when so.
            match bytemuck::try_cast_slice::<u8, f16>(raw) {
                Ok(h) => h.convert_to_f32_slice(out),
                Err(_) => {
                    for (o, c) in out.iter_mut().zip(raw.chunks_exact(2)) {
                        *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
                    }
                }
            }
        }
        DenseType::BF16 => {
            for (o, c) in out.iter_mut().zip(raw.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        DenseType::Q8_0 => {
            for (ob, blk) in out.chunks_exact_mut(32).zip(raw.chunks_exact(34)) {
                let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                for (o, &q) in ob.iter_mut().zip(&blk[2..34]) {
                    *o = d * (q as i8) as f32;
                }
            }
        }
        DenseType::Q6K => {
            for (ob, blk) in out.chunks_exact_mut(256).zip(raw.chunks_exact(210)) {
                decode_q6k_block(blk, ob);
            }
        }
    }
}

/// ggml Q6_K super-block (256 weights): ql[128] low 4 bits, qh[64] high 2 bits,
/// scales[16] i8 (one per 16 weights), then f16 d. Value = d * scale * (q - 32).
fn decode_q6k_block(blk: &[u8], out: &mut [f32]) {
    let ql = &blk[0..128];
    let qh = &blk[128..192];
    let sc = &blk[192..208];
    let d = f16::from_le_bytes([blk[208], blk[209]]).to_f32();
    for half_i in 0..2 {
        let ql = &ql[64 * half_i..];
        let qh = &qh[32 * half_i..];
        let sc = &sc[8 * half_i..];
        let y = &mut out[128 * half_i..];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

/// How far an 8-bit row is from its source row (the screened heads' bound
/// constants, CPU and CUDA): `max |E − Ê|` and an upper
/// bound of `Σ max(|E|, |Ê|)`; `max_diff` is NaN when either side holds a
/// non-finite value.
#[derive(Clone, Copy, Debug, Default)]
pub struct RowError {
    pub max_diff: f32,
    pub abs_sum: f32,
}

impl RowError {
    pub fn add(&mut self, exact: f32, approx: f32) {
        // Branch-free (a pass over the whole head); a non-finite value makes
        // the sum non-finite, and `finish` turns that into NaN.
        self.max_diff = self.max_diff.max((exact - approx).abs());
        self.abs_sum += exact.abs().max(approx.abs()) + (exact - approx).abs();
    }

    /// NaN unless every value added was finite.
    pub fn finish(mut self) -> Self {
        if !self.abs_sum.is_finite() {
            self.max_diff = f32::NAN;
        }
        self
    }

    /// Every row of `src` against the same row of `q` (equal shapes).
    pub fn of_rows(src: &DenseMatrix, q: &DenseMatrix) -> Vec<RowError> {
        use rayon::prelude::*;
        let cols = src.cols;
        (0..src.rows)
            .into_par_iter()
            .map_init(
                || (vec![0f32; cols], vec![0f32; cols]),
                |(a, b), r| {
                    src.row_to_f32(r, a);
                    q.row_to_f32(r, b);
                    let mut e = RowError::default();
                    a.iter().zip(b.iter()).for_each(|(&x, &y)| e.add(x, y));
                    e.finish()
                },
            )
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_decodes() {
        let mut raw = f16::from_f32(0.5).to_le_bytes().to_vec();
        raw.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let m = DenseMatrix::new(1, 32, DenseType::Q8_0, Storage::owned(raw)).unwrap();
        let mut out = vec![f32::NAN; 32];
        m.row_to_f32(0, &mut out);
        for (i, v) in out.iter().enumerate() {
            assert_eq!(*v, 0.5 * (i as f32 - 16.0));
        }
    }

    #[test]
    fn q8_0_copy_is_close() {
        let v: Vec<f32> = (0..2 * 64).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
        let m = DenseMatrix::from_f32(2, 64, &v).unwrap();
        let q = m.to_q8_0().unwrap();
        assert_eq!(q.resident_bytes(), 2 * 2 * 34);
        let mut out = vec![f32::NAN; 64];
        for r in 0..2 {
            q.row_to_f32(r, &mut out);
            for (a, b) in out.iter().zip(&v[r * 64..]) {
                assert!((a - b).abs() <= 0.65 * 0.013 * 50.0 / 127.0 + 1e-3, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn wrong_size_is_an_error() {
        assert!(DenseMatrix::new(2, 32, DenseType::F16, Storage::owned(vec![0; 10])).is_err());
        assert!(DenseMatrix::new(2, 33, DenseType::Q8_0, Storage::owned(vec![0; 68])).is_err());
        assert!(DenseMatrix::new(usize::MAX, 32, DenseType::F32, Storage::owned(vec![])).is_err());
    }
}
