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
        // Two tokens or more: rows in pairs, each loaded slice of h feeding
        // both rows (one row per pass left the loads, not the FMAs, the
        // limit). Every (row, token) keeps the one-row loop's two chains and
        // their order, so the logits are the same bits.
        let pairs = if N > 1 { out.len() / n / 2 } else { 0 };
        for p in 0..pairs {
            f16_pair::<N>(m, r0 + 2 * p, h, &mut out[2 * p * n..(2 * p + 2) * n]);
        }
        let done = 2 * pairs;
        let out = &mut out[done * n..];
        let r0 = r0 + done;
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

    /// Rows `r0` and `r0 + 1` for N tokens into `out` (`[2][N]`), each
    /// (row, token) as `f16_impl` computes it alone.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f")]
    unsafe fn f16_pair<const N: usize>(m: &DenseMatrix, r0: usize, h: &[f32], out: &mut [f32]) {
        let cols = m.cols;
        let rows = [m.row_raw(r0).as_ptr(), m.row_raw(r0 + 1).as_ptr()];
        let mut acc = [[_mm512_setzero_ps(); N]; 2];
        let mut acc2 = [[_mm512_setzero_ps(); N]; 2];
        let mut c = 0;
        while c + 32 <= cols {
            let w: [[__m512; 2]; 2] = std::array::from_fn(|r| {
                [
                    _mm512_cvtph_ps(_mm256_loadu_si256(rows[r].add(2 * c) as *const __m256i)),
                    _mm512_cvtph_ps(_mm256_loadu_si256(rows[r].add(2 * c + 32) as *const __m256i)),
                ]
            });
            for t in 0..N {
                let hp = h.as_ptr().add(t * cols + c);
                let (h0, h1) = (_mm512_loadu_ps(hp), _mm512_loadu_ps(hp.add(16)));
                for r in 0..2 {
                    acc[r][t] = _mm512_fmadd_ps(w[r][0], h0, acc[r][t]);
                    acc2[r][t] = _mm512_fmadd_ps(w[r][1], h1, acc2[r][t]);
                }
            }
            c += 32;
        }
        if c < cols {
            for r in 0..2 {
                let w0 = _mm512_cvtph_ps(_mm256_loadu_si256(rows[r].add(2 * c) as *const __m256i));
                for t in 0..N {
                    acc[r][t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(h.as_ptr().add(t * cols + c)), acc[r][t]);
                }
            }
        }
        for r in 0..2 {
            for t in 0..N {
                out[r * N + t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][t], acc2[r][t]));
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

    /// [`super::Q8Head::rows_dot`] on AVX-512 VNNI: per group, 8 VPDPBUSD
    /// (two chains) per token from the bias correction, then the scale
    /// (f16 weight scale x activation scale) and one FMA per 16 blocks.
    #[allow(clippy::needless_range_loop)] // t indexes acc and the activations together
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn q8q8_rows<const N: usize>(
        h: &super::Q8Head,
        r0: usize,
        a: &super::Q8Act,
        t0: usize,
        out: &mut [f32],
    ) {
        let g = h.groups;
        let (qp, dp) = (h.q.as_ptr(), h.d.as_ptr());
        let (xp, dxp, cp) = (a.x.as_ptr(), a.dx.as_ptr(), a.corr.as_ptr());
        for (jr, o) in out.chunks_exact_mut(N).enumerate() {
            let r = r0 + jr;
            let mut acc = [_mm512_setzero_ps(); N];
            for gi in 0..g {
                let wl = qp.add((r * g + gi) * 8) as *const __m512i;
                let w: [__m512i; 8] = std::array::from_fn(|k| _mm512_load_si512(wl.add(k)));
                let dw = _mm512_cvtph_ps(_mm256_loadu_si256(dp.add((r * g + gi) * 16) as *const __m256i));
                for t in 0..N {
                    let tg = (t0 + t) * g + gi;
                    let xl = xp.add(tg * 8) as *const __m512i;
                    let mut s0 = _mm512_loadu_si512(cp.add(tg * 16) as *const _);
                    let mut s1 = _mm512_setzero_si512();
                    for k in (0..8).step_by(2) {
                        s0 = _mm512_dpbusd_epi32(s0, w[k], _mm512_load_si512(xl.add(k)));
                        s1 = _mm512_dpbusd_epi32(s1, w[k + 1], _mm512_load_si512(xl.add(k + 1)));
                    }
                    let dot = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
                    let s = _mm512_mul_ps(dw, _mm512_loadu_ps(dxp.add(tg * 16)));
                    acc[t] = _mm512_fmadd_ps(dot, s, acc[t]);
                }
            }
            for t in 0..N {
                o[t] = reduce16(acc[t]);
            }
        }
    }

    /// The pairwise order of `super::reduce16`.
    #[target_feature(enable = "avx512f")]
    unsafe fn reduce16(v: __m512) -> f32 {
        let lo = _mm512_castps512_ps256(v);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        let a = _mm256_add_ps(lo, hi);
        let b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
        let c = _mm_add_ps(b, _mm_movehl_ps(b, b));
        _mm_cvtss_f32(_mm_add_ss(c, _mm_shuffle_ps::<1>(c, c)))
    }
}

/// True when [`Q8Head::rows_dot`] runs its SIMD kernel here (else the
/// scalar one: the backend then keeps the Q8_0 rows with f32 activations).
pub fn q8_act_fast() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::kernels::vnni::detected()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// An 8-bit copy of the lm_head (`--lm-head q8`, and the screened head).
pub enum HeadQ8 {
    /// Int8 activations x int8 weights (VNNI): the decode fast path.
    Act8(Q8Head),
    /// f32 activations x Q8_0 rows (CPUs without VNNI).
    Dense(DenseMatrix),
}

pub use crate::model::dense::RowError;

impl HeadQ8 {
    /// The 8-bit copy of `m` (`act8`: the int8 x int8 form, which this CPU
    /// runs fastest where `q8_act_fast`), and each row's distance from `m`.
    pub fn quantize_with_error(m: &DenseMatrix, act8: bool) -> crate::error::Result<(Self, Vec<RowError>)> {
        if act8 {
            let (q, e) = Q8Head::from_dense(m)?;
            return Ok((HeadQ8::Act8(q), e));
        }
        let d = m.to_q8_0()?;
        let e = RowError::of_rows(m, &d);
        Ok((HeadQ8::Dense(d), e))
    }

    /// The form this CPU runs fastest, from a Q8_0 copy.
    pub fn build_from_q8_0(d: DenseMatrix) -> crate::error::Result<Self> {
        Ok(match q8_act_fast() {
            true => HeadQ8::Act8(Q8Head::from_q8_0(&d)?),
            false => HeadQ8::Dense(d),
        })
    }

    pub fn rows(&self) -> usize {
        match self {
            HeadQ8::Act8(q) => q.rows,
            HeadQ8::Dense(d) => d.rows,
        }
    }

    pub fn resident_bytes(&self) -> usize {
        match self {
            HeadQ8::Act8(q) => q.resident_bytes(),
            HeadQ8::Dense(d) => d.resident_bytes(),
        }
    }
}

/// Input elements per group of a [`Q8Head`] row: 16 blocks of 32, one
/// block per dword lane of a 512-bit register.
pub const Q8_GROUP: usize = 512;

/// A 64-byte, 64-byte-aligned line of 8-bit codes.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub struct Q8Line(pub [u8; 64]);

/// The 8-bit lm_head for int8 activations (`--lm-head q8` with AVX-512 VNNI):
/// the Q8_0 copy's weights and f16 block scales, unchanged in value, in a
/// layout where one VPDPBUSD per 64 bytes does all the work.
///
/// Layout: each row is `groups = ceil(cols / 512)` groups of 16 blocks of 32
/// inputs; a group is 8 lines, and byte `4j + b` of line `k` holds input
/// `32j + 4k + b` of the group (lane j = block j). After the 8 lines of a
/// group, dword lane j holds the exact int32 dot of block j, so the float
/// work (scale, accumulate) is one multiply and one FMA per 512 inputs. The
/// codes are stored biased, `u = w + 128` (unsigned operand of VPDPBUSD); the
/// activation side carries `-128 * sum(x_block)` as the start value, so the
/// int32 dot is exact. Pad inputs (past `cols`) have `w = 0` and scale 0.
pub struct Q8Head {
    pub rows: usize,
    pub cols: usize,
    groups: usize,
    /// `rows * groups * 8` lines.
    q: Vec<Q8Line>,
    /// f16 bits of the block scales, `rows * groups * 16`.
    d: Vec<u16>,
}

/// One or more hidden states quantised for [`Q8Head`]: per block of 32,
/// `dx = max|x| / 127`, `q = round(x / dx)` (as the Q8_0 weights), in the
/// head's group layout.
pub struct Q8Act {
    pub n: usize,
    groups: usize,
    /// `n * groups * 8` lines, signed codes.
    x: Vec<Q8Line>,
    /// `n * groups * 16` block scales.
    dx: Vec<f32>,
    /// `n * groups * 16`: `-128 * sum(q_block)`, the bias correction.
    corr: Vec<i32>,
}

impl Q8Act {
    /// Token `t` alone, as `quantize` of its one state gives it.
    pub fn token(&self, t: usize) -> Q8Act {
        assert!(t < self.n);
        let g = self.groups;
        Q8Act {
            n: 1,
            groups: g,
            x: self.x[t * g * 8..(t + 1) * g * 8].to_vec(),
            dx: self.dx[t * g * 16..(t + 1) * g * 16].to_vec(),
            corr: self.corr[t * g * 16..(t + 1) * g * 16].to_vec(),
        }
    }

    /// `max |h − ĥ|` over token `t` (`h`: the states this was quantised
    /// from, `ĥ = dx * code`), in f64 so the difference itself is exact.
    pub fn max_error(&self, h: &[f32], t: usize) -> f64 {
        let cols = h.len() / self.n;
        let mut m = 0f64;
        for (b, blk) in h[t * cols..(t + 1) * cols].chunks_exact(32).enumerate() {
            let (g, j) = (b / 16, b % 16);
            let dx = self.dx[(t * self.groups + g) * 16 + j] as f64;
            for (e, &v) in blk.iter().enumerate() {
                let c = self.x[(t * self.groups + g) * 8 + e / 4].0[4 * j + e % 4] as i8;
                m = m.max((v as f64 - dx * c as f64).abs());
            }
        }
        m
    }
}

impl Q8Head {
    /// Regroup a Q8_0 matrix (no requantisation: same codes, same scales).
    pub fn from_q8_0(m: &DenseMatrix) -> crate::error::Result<Self> {
        use rayon::prelude::*;
        if m.dtype != DenseType::Q8_0 {
            return Err(crate::error::Error::Unsupported(format!(
                "Q8Head needs a Q8_0 matrix, got {}",
                m.dtype.name()
            )));
        }
        let (rows, cols) = (m.rows, m.cols);
        let groups = cols.div_ceil(Q8_GROUP);
        let lpr = groups * 8;
        // Pad: code w = 0 (u = 128), scale 0.
        let mut q = crate::mem::huge_vec(rows * lpr, Q8Line([0x80; 64]));
        let mut d = crate::mem::huge_vec(rows * groups * 16, 0u16);
        q.par_chunks_mut(lpr)
            .zip(d.par_chunks_mut(groups * 16))
            .enumerate()
            .for_each(|(r, (ql, dl))| {
                for (b, blk) in m.row_raw(r).chunks_exact(34).enumerate() {
                    dl[b] = u16::from_le_bytes([blk[0], blk[1]]);
                    let (g, j) = (b / 16, b % 16);
                    for (e, &c) in blk[2..].iter().enumerate() {
                        ql[g * 8 + e / 4].0[4 * j + e % 4] = c ^ 0x80;
                    }
                }
            });
        Ok(Self {
            rows,
            cols,
            groups,
            q,
            d,
        })
    }

    /// Quantise `m` straight into this layout (the values `to_q8_0` gives:
    /// same codes, same scales), with each row's distance from `m`.
    pub fn from_dense(m: &DenseMatrix) -> crate::error::Result<(Self, Vec<RowError>)> {
        use rayon::prelude::*;
        if !m.cols.is_multiple_of(32) {
            return Err(crate::error::Error::Unsupported(format!(
                "8-bit lm_head copy needs a width divisible by 32, got {}",
                m.cols
            )));
        }
        let (rows, cols) = (m.rows, m.cols);
        let groups = cols.div_ceil(Q8_GROUP);
        let lpr = groups * 8;
        let mut q = crate::mem::huge_vec(rows * lpr, Q8Line([0x80; 64]));
        let mut d = crate::mem::huge_vec(rows * groups * 16, 0u16);
        let err = q
            .par_chunks_mut(lpr)
            .zip(d.par_chunks_mut(groups * 16))
            .enumerate()
            .map_init(
                || vec![0f32; cols],
                |row, (r, (ql, dl))| {
                    m.row_to_f32(r, row);
                    let mut e = RowError::default();
                    for (b, x) in row.chunks_exact(32).enumerate() {
                        let (dh, codes) = crate::model::dense::quantize_q8_0_block(x);
                        dl[b] = dh.to_bits();
                        let (g, j, df) = (b / 16, b % 16, dh.to_f32());
                        for (k, (&c, &v)) in codes.iter().zip(x).enumerate() {
                            ql[g * 8 + k / 4].0[4 * j + k % 4] = c as u8 ^ 0x80;
                            e.add(v, df * c as f32);
                        }
                    }
                    e.finish()
                },
            )
            .collect();
        Ok((
            Self {
                rows,
                cols,
                groups,
                q,
                d,
            },
            err,
        ))
    }

    pub fn resident_bytes(&self) -> usize {
        self.q.len() * 64 + self.d.len() * 2
    }

    /// The stored weight (r, c) and its block scale, decoded (for tests).
    pub fn get(&self, r: usize, c: usize) -> (i8, f32) {
        let (g, j, e) = (c / Q8_GROUP, (c % Q8_GROUP) / 32, c % 32);
        let u = self.q[(r * self.groups + g) * 8 + e / 4].0[4 * j + e % 4];
        let d = self.d[(r * self.groups + g) * 16 + j];
        ((u ^ 0x80) as i8, half::f16::from_bits(d).to_f32())
    }

    /// Quantise `n` hidden states (`h` is `[n][cols]`).
    pub fn quantize(&self, h: &[f32], n: usize) -> Q8Act {
        let (cols, groups) = (self.cols, self.groups);
        assert!(h.len() >= n * cols && cols.is_multiple_of(32));
        let mut a = Q8Act {
            n,
            groups,
            x: vec![Q8Line([0; 64]); n * groups * 8],
            dx: vec![0.0; n * groups * 16],
            corr: vec![0; n * groups * 16],
        };
        for t in 0..n {
            for (b, blk) in h[t * cols..(t + 1) * cols].chunks_exact(32).enumerate() {
                let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
                // A NaN / inf block gives NaN logits (as the f32 paths would).
                let dx = if amax.is_finite() { amax / 127.0 } else { f32::NAN };
                let inv = if dx > 0.0 { 1.0 / dx } else { 0.0 };
                let (g, j) = (b / 16, b % 16);
                let mut sum = 0i32;
                for (e, &v) in blk.iter().enumerate() {
                    let c = (v * inv).round().clamp(-127.0, 127.0) as i8;
                    sum += c as i32;
                    a.x[(t * groups + g) * 8 + e / 4].0[4 * j + e % 4] = c as u8;
                }
                a.dx[(t * groups + g) * 16 + j] = dx;
                a.corr[(t * groups + g) * 16 + j] = -128 * sum;
            }
        }
        a
    }

    /// `out[j * nt + t] = logit of row r0 + j for token t0 + t` (`nt = 1..=4`).
    pub fn rows_dot(&self, r0: usize, a: &Q8Act, t0: usize, nt: usize, out: &mut [f32]) {
        assert!(a.groups == self.groups && (1..=4).contains(&nt) && t0 + nt <= a.n);
        assert!(out.len().is_multiple_of(nt) && r0 + out.len() / nt <= self.rows);
        #[cfg(target_arch = "x86_64")]
        if q8_act_fast() {
            // SAFETY: avx512f/bw/vnni detected; shapes checked above.
            unsafe {
                return match nt {
                    1 => x86::q8q8_rows::<1>(self, r0, a, t0, out),
                    2 => x86::q8q8_rows::<2>(self, r0, a, t0, out),
                    3 => x86::q8q8_rows::<3>(self, r0, a, t0, out),
                    _ => x86::q8q8_rows::<4>(self, r0, a, t0, out),
                };
            }
        }
        self.rows_dot_scalar(r0, a, t0, nt, out)
    }

    /// The same arithmetic, one lane at a time: exact int32 block dots, then
    /// per lane `acc = fma(dot, dw * dx, acc)` over the groups and the same
    /// pairwise reduction of the 16 lanes as the SIMD kernel: same bits.
    pub fn rows_dot_scalar(&self, r0: usize, a: &Q8Act, t0: usize, nt: usize, out: &mut [f32]) {
        let g = self.groups;
        for (jr, o) in out.chunks_exact_mut(nt).enumerate() {
            let r = r0 + jr;
            for (tt, ot) in o.iter_mut().enumerate() {
                let t = t0 + tt;
                let mut acc = [0f32; 16];
                for gi in 0..g {
                    let wl = &self.q[(r * g + gi) * 8..(r * g + gi + 1) * 8];
                    let xl = &a.x[(t * g + gi) * 8..(t * g + gi + 1) * 8];
                    for (j, aj) in acc.iter_mut().enumerate() {
                        let mut dot = a.corr[(t * g + gi) * 16 + j];
                        for (w, x) in wl.iter().zip(xl) {
                            for b in 4 * j..4 * j + 4 {
                                dot += w.0[b] as i32 * x.0[b] as i8 as i32;
                            }
                        }
                        let dw = half::f16::from_bits(self.d[(r * g + gi) * 16 + j]).to_f32();
                        let s = dw * a.dx[(t * g + gi) * 16 + j];
                        *aj = (dot as f32).mul_add(s, *aj);
                    }
                }
                *ot = reduce16(&acc);
            }
        }
    }
}

/// Pairwise sum of 16 lanes in the order of the SIMD kernel's reduction.
fn reduce16(v: &[f32; 16]) -> f32 {
    let a: [f32; 8] = std::array::from_fn(|i| v[i] + v[i + 8]);
    let b: [f32; 4] = std::array::from_fn(|i| a[i] + a[i + 4]);
    let c: [f32; 2] = std::array::from_fn(|i| b[i] + b[i + 2]);
    c[0] + c[1]
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

    /// An F16 row's logit for a token does not depend on how many tokens
    /// or rows a call takes (row pairs, the single-row remainder, a width
    /// that ends in half a 32-column step): batched logits equal one
    /// sequence's step bit for bit.
    #[test]
    fn f16_rows_same_bits_for_any_token_count() {
        let mut r = SplitMix64(17);
        for (rows, cols) in [(9, 80), (8, 96), (5, 2560)] {
            let v: Vec<u8> = (0..rows * cols)
                .flat_map(|_| half::f16::from_f32(r.next_f32() - 0.5).to_le_bytes())
                .collect();
            let m = DenseMatrix::new(rows, cols, DenseType::F16, Storage::owned(v)).unwrap();
            let h: Vec<f32> = (0..4 * cols).map(|_| r.next_f32() * 4.0 - 2.0).collect();
            let one: Vec<Vec<u32>> = (0..4)
                .map(|t| {
                    let mut o = vec![f32::NAN; rows - 1];
                    rows_dot(&m, 1, &h[t * cols..(t + 1) * cols], 1, &mut o, &mut vec![]);
                    o.iter().map(|x| x.to_bits()).collect()
                })
                .collect();
            assert!(one[0].iter().all(|&b| f32::from_bits(b).is_finite() && b != 0));
            for n in 2..=4 {
                let mut o = vec![f32::NAN; (rows - 1) * n];
                rows_dot(&m, 1, &h, n, &mut o, &mut vec![]);
                for (j, row) in o.chunks_exact(n).enumerate() {
                    for (t, x) in row.iter().enumerate() {
                        assert_eq!(
                            x.to_bits(),
                            one[t][j],
                            "{rows}x{cols}, {n} tokens, row {}, token {t}",
                            j + 1
                        );
                    }
                }
            }
        }
    }

    /// The same for the 8-bit head's int8 kernel (token groups of 1-4 at every
    /// offset).
    #[test]
    fn q8_head_rows_same_bits_for_any_token_count() {
        let mut r = SplitMix64(23);
        for cols in [96, 2560] {
            let rows = 9;
            let (_, head) = q8_head(rows, cols, 5 + cols as u64);
            let h: Vec<f32> = (0..4 * cols).map(|_| r.next_f32() * 4.0 - 2.0).collect();
            let a = head.quantize(&h, 4);
            let one: Vec<Vec<u32>> = (0..4)
                .map(|t| {
                    let mut o = vec![f32::NAN; rows - 2];
                    head.rows_dot(2, &a, t, 1, &mut o);
                    o.iter().map(|x| x.to_bits()).collect()
                })
                .collect();
            assert!(one[0].iter().all(|&b| f32::from_bits(b).is_finite() && b != 0));
            for nt in 2..=4 {
                for t0 in 0..=4 - nt {
                    let mut o = vec![f32::NAN; (rows - 2) * nt];
                    head.rows_dot(2, &a, t0, nt, &mut o);
                    for (j, row) in o.chunks_exact(nt).enumerate() {
                        for (t, x) in row.iter().enumerate() {
                            assert_eq!(
                                x.to_bits(),
                                one[t0 + t][j],
                                "{cols} cols, {nt} tokens from {t0}, row {}",
                                j + 2
                            );
                        }
                    }
                }
            }
        }
    }

    fn q8_head(rows: usize, cols: usize, seed: u64) -> (DenseMatrix, Q8Head) {
        let mut r = SplitMix64(seed);
        // Rows of different magnitude, a few outliers, so block scales differ.
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let x = (r.next_f32() - 0.5) * (1.0 + (i / cols % 5) as f32);
                if i % 97 == 0 {
                    x * 20.0
                } else {
                    x
                }
            })
            .collect();
        let f16: Vec<u8> = v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect();
        let q8 = DenseMatrix::new(rows, cols, DenseType::F16, Storage::owned(f16))
            .unwrap()
            .to_q8_0()
            .unwrap();
        let head = Q8Head::from_q8_0(&q8).unwrap();
        (q8, head)
    }

    /// The regrouped head holds exactly the Q8_0 copy's codes and scales.
    #[test]
    fn q8_head_regroups_q8_0_exactly() {
        for cols in [32, 96, 512, 544, 2560] {
            let (q8, head) = q8_head(7, cols, cols as u64);
            for r in 0..7 {
                let raw = q8.row_raw(r);
                for c in 0..cols {
                    let blk = &raw[34 * (c / 32)..34 * (c / 32 + 1)];
                    let d = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                    assert_eq!(head.get(r, c), (blk[2 + c % 32] as i8, d), "({r},{c})");
                }
            }
        }
    }

    /// SIMD (where detected) against the scalar lane-by-lane version: same
    /// bits, for 1-4 tokens, widths with and without pad blocks, a row range
    /// not starting at 0, outputs poisoned first. Also checks the int8 x int8
    /// logit against an f64 evaluation of the same quantised values.
    #[test]
    fn q8_head_simd_matches_scalar_and_f64() {
        let mut r = SplitMix64(77);
        for cols in [32, 96, 544, 2560] {
            let rows = 41;
            let (_, head) = q8_head(rows, cols, 3 + cols as u64);
            let h: Vec<f32> = (0..4 * cols)
                .map(|i| (r.next_f32() - 0.5) * if i % 61 == 0 { 30.0 } else { 3.0 })
                .collect();
            let a = head.quantize(&h, 4);
            for nt in 1..=4 {
                for t0 in 0..=4 - nt {
                    let mut fast = vec![f32::NAN; (rows - 5) * nt];
                    let mut slow = vec![f32::NAN; (rows - 5) * nt];
                    head.rows_dot(5, &a, t0, nt, &mut fast);
                    head.rows_dot_scalar(5, &a, t0, nt, &mut slow);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&fast), bits(&slow), "cols {cols} nt {nt} t0 {t0}");
                    for (j, o) in fast.chunks_exact(nt).enumerate() {
                        for (tt, &got) in o.iter().enumerate() {
                            let t = t0 + tt;
                            let mut want = 0f64;
                            for b in 0..cols / 32 {
                                let (mut dot, mut dw) = (0i64, 0f64);
                                for e in 0..32 {
                                    let c = 32 * b + e;
                                    let (w, d) = head.get(5 + j, c);
                                    dw = d as f64;
                                    let (g, k) = (c / Q8_GROUP, (c % Q8_GROUP) / 32);
                                    let xq = a.x[(t * a.groups + g) * 8 + e / 4].0[4 * k + e % 4] as i8;
                                    dot += w as i64 * xq as i64;
                                }
                                let dx = a.dx[(t * a.groups + b / 16) * 16 + b % 16] as f64;
                                want += dot as f64 * dw * dx;
                            }
                            let tol = 1e-5 * (1.0 + want.abs());
                            assert!(
                                (got as f64 - want).abs() <= tol,
                                "cols {cols} row {j} t {t}: {got} vs {want}"
                            );
                        }
                    }
                    assert!(fast.iter().any(|&v| v != 0.0));
                }
            }
        }
    }

    /// Activation quantisation: codes within 1/2 step of x / dx, the block
    /// maximum at +-127, the correction equal to -128 * sum of codes; a
    /// non-finite block makes the logits NaN instead of a silent number.
    #[test]
    fn q8_act_quantisation_and_nan() {
        let (_, head) = q8_head(3, 544, 9);
        let mut r = SplitMix64(8);
        let mut h: Vec<f32> = (0..544).map(|_| r.next_f32() * 4.0 - 2.0).collect();
        h[64..96].iter_mut().for_each(|v| *v = 0.0);
        let a = head.quantize(&h, 1);
        for b in 0..17 {
            let (g, j) = (b / 16, b % 16);
            let dx = a.dx[g * 16 + j];
            let mut sum = 0;
            let mut top = 0;
            for e in 0..32 {
                let q = a.x[g * 8 + e / 4].0[4 * j + e % 4] as i8;
                sum += q as i32;
                top = top.max((q as i32).abs());
                if dx > 0.0 {
                    assert!((h[32 * b + e] / dx - q as f32).abs() <= 0.5 + 1e-4, "block {b} e {e}");
                } else {
                    assert_eq!(q, 0);
                }
            }
            assert_eq!(a.corr[g * 16 + j], -128 * sum);
            assert_eq!(top, if b == 2 { 0 } else { 127 }, "block {b}");
        }
        h[100] = f32::INFINITY;
        let a = head.quantize(&h, 1);
        let mut out = vec![0f32; 3];
        head.rows_dot(0, &a, 0, 1, &mut out);
        assert!(out.iter().all(|v| v.is_nan()), "{out:?}");
    }
}
