//! Dot products of hidden states with dense matrix rows (the lm_head), read
//! straight from the file's dtype: AVX-512 kernels for F16 and Q8_0 (the
//! decode-critical cases), and the portable decode-then-dot path for the
//! rest, which is also the reference the SIMD kernels are tested against.

use super::ops;
use crate::model::dense::{DenseMatrix, DenseType};

/// `out[j * n + t] = dot(row r0 + j, h[t])` for rows `r0..r0 + out.len() / n`.
pub fn rows_dot(m: &DenseMatrix, r0: usize, h: &[f32], n: usize, out: &mut [f32], scratch: &mut Vec<f32>) {
    #[cfg(target_arch = "x86_64")]
    if simd_ok() && n <= 4 {
        match m.dtype {
            DenseType::F16 => return x86::rows_dot_f16(m, r0, h, n, out),
            DenseType::Q8_0 => return x86::rows_dot_q8_0(m, r0, h, n, out),
            _ => {}
        }
    }
    rows_dot_portable(m, r0, h, n, out, scratch)
}

/// Reference: decode each row to f32, then dot.
pub fn rows_dot_portable(m: &DenseMatrix, r0: usize, h: &[f32], n: usize, out: &mut [f32], scratch: &mut Vec<f32>) {
    let cols = m.cols;
    scratch.resize(cols, 0.0);
    for (j, o) in out.chunks_exact_mut(n).enumerate() {
        m.row_to_f32(r0 + j, scratch);
        for (t, ot) in o.iter_mut().enumerate() {
            *ot = ops::dot(scratch, &h[t * cols..(t + 1) * cols]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn simd_ok() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw"))
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use crate::model::dense::DenseMatrix;

    pub fn rows_dot_f16(m: &DenseMatrix, r0: usize, h: &[f32], n: usize, out: &mut [f32]) {
        assert!(m.cols.is_multiple_of(16) && h.len() >= n * m.cols);
        // SAFETY: avx512f checked by the caller (simd_ok); every load stays
        // inside a row of `cols` halves (cols % 16 == 0) or inside `h`.
        unsafe {
            match n {
                1 => f16_impl::<1>(m, r0, h, out),
                2 => f16_impl::<2>(m, r0, h, out),
                3 => f16_impl::<3>(m, r0, h, out),
                _ => f16_impl::<4>(m, r0, h, out),
            }
        }
    }

    #[allow(clippy::needless_range_loop)] // t indexes acc, acc2 and h together
    #[target_feature(enable = "avx512f")]
    // N is a constant so the token loops unroll and the accumulators stay in
    // registers (an indexed array over a runtime n spilled to the stack).
    unsafe fn f16_impl<const N: usize>(m: &DenseMatrix, r0: usize, h: &[f32], out: &mut [f32]) {
        let n = N;
        let cols = m.cols;
        for (j, o) in out.chunks_exact_mut(n).enumerate() {
            let row = m.row_raw(r0 + j).as_ptr();
            let mut acc = [_mm512_setzero_ps(); N];
            let mut acc2 = [_mm512_setzero_ps(); N];
            let mut c = 0;
            // Two independent chains per token hide FMA latency.
            while c + 32 <= cols {
                let w0 = _mm512_cvtph_ps(_mm256_loadu_si256(row.add(2 * c) as *const __m256i));
                let w1 = _mm512_cvtph_ps(_mm256_loadu_si256(row.add(2 * c + 32) as *const __m256i));
                for t in 0..n {
                    let hp = h.as_ptr().add(t * cols + c);
                    acc[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(hp), acc[t]);
                    acc2[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(hp.add(16)), acc2[t]);
                }
                c += 32;
            }
            if c < cols {
                let w0 = _mm512_cvtph_ps(_mm256_loadu_si256(row.add(2 * c) as *const __m256i));
                for t in 0..n {
                    acc[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(h.as_ptr().add(t * cols + c)), acc[t]);
                }
            }
            for (t, ot) in o.iter_mut().enumerate() {
                *ot = _mm512_reduce_add_ps(_mm512_add_ps(acc[t], acc2[t]));
            }
        }
    }

    pub fn rows_dot_q8_0(m: &DenseMatrix, r0: usize, h: &[f32], n: usize, out: &mut [f32]) {
        assert!(m.cols.is_multiple_of(32) && h.len() >= n * m.cols);
        // SAFETY: avx512f/bw checked by the caller; a Q8_0 row is cols/32
        // blocks of 34 bytes, and every load stays inside its block.
        unsafe {
            match n {
                1 => q8_impl::<1>(m, r0, h, out),
                2 => q8_impl::<2>(m, r0, h, out),
                3 => q8_impl::<3>(m, r0, h, out),
                _ => q8_impl::<4>(m, r0, h, out),
            }
        }
    }

    #[allow(clippy::needless_range_loop)] // t indexes acc and h together
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn q8_impl<const N: usize>(m: &DenseMatrix, r0: usize, h: &[f32], out: &mut [f32]) {
        let n = N;
        let cols = m.cols;
        for (j, o) in out.chunks_exact_mut(n).enumerate() {
            let row = m.row_raw(r0 + j);
            let mut acc = [_mm512_setzero_ps(); N];
            for (b, blk) in row.chunks_exact(34).enumerate() {
                let d = _mm512_set1_ps(half::f16::from_le_bytes([blk[0], blk[1]]).to_f32());
                let q = blk.as_ptr().add(2);
                let q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q as *const __m128i)));
                let q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q.add(16) as *const __m128i)));
                let (w0, w1) = (_mm512_mul_ps(q0, d), _mm512_mul_ps(q1, d));
                for t in 0..n {
                    let hp = h.as_ptr().add(t * cols + 32 * b);
                    acc[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(hp), acc[t]);
                    acc[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(hp.add(16)), acc[t]);
                }
            }
            for (t, ot) in o.iter_mut().enumerate() {
                *ot = _mm512_reduce_add_ps(acc[t]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::dense::Storage;
    use crate::model::synthetic::SplitMix64;

    #[test]
    fn simd_rows_match_portable() {
        let (rows, cols) = (37, 96);
        let mut r = SplitMix64(5);
        let v: Vec<f32> = (0..rows * cols).map(|_| r.next_f32() - 0.5).collect();
        let f16: Vec<u8> = v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect();
        let m16 = DenseMatrix::new(rows, cols, DenseType::F16, Storage::owned(f16)).unwrap();
        let q8 = m16.to_q8_0().unwrap();
        for m in [&m16, &q8] {
            for n in 1..=4 {
                let h: Vec<f32> = (0..n * cols).map(|_| r.next_f32() * 4.0 - 2.0).collect();
                let mut a = vec![f32::NAN; (rows - 3) * n];
                let mut b = vec![f32::NAN; (rows - 3) * n];
                let mut s = vec![];
                rows_dot(m, 3, &h, n, &mut a, &mut s);
                rows_dot_portable(m, 3, &h, n, &mut b, &mut s);
                for (x, y) in a.iter().zip(&b) {
                    assert!(
                        (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                        "{:?} n={n}: {x} vs {y}",
                        m.dtype
                    );
                }
            }
        }
    }
}
