//! Causal GQA attention on the CPU.
//!
//! Prefill uses a tiled, flash-style loop: a task takes one KV head and a
//! block of query tokens (all query heads of that group, 64 query rows),
//! walks the keys in blocks of 64 with an online softmax, and does each block
//! as two small GEMMs: `S = Q . K^T` and `O += P . V`, with a vector exp2.
//! K is transposed once per call (`[kv head][dim][position]`) so the score
//! GEMM broadcasts query elements against 64 contiguous keys.
//! Tasks run longest-first (late query blocks see more keys) from a shared
//! counter, so threads finish together.

use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;

use super::ops;
use super::spin_pool::Par;

/// Shapes for one attention call.
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

const Q_BLOCK: usize = 16;
/// Keys per block; also the width of a score row (four 16-lane vectors).
const K_BLOCK: usize = 64;

/// Instruction set of the block kernels (chosen at run time).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    /// The portable loops compiled with AVX2 + FMA enabled.
    Avx2,
    /// Hand-written AVX-512F kernels (head_dim a multiple of 64).
    Avx512,
}

impl Isa {
    /// Every kernel set usable here for `head_dim`, fastest first.
    pub fn available(head_dim: usize) -> Vec<Isa> {
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") && head_dim.is_multiple_of(64) {
                v.push(Isa::Avx512);
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                v.push(Isa::Avx2);
            }
        }
        let _ = head_dim;
        v.push(Isa::Scalar);
        v
    }
}

/// `q`: `[n][n_heads * hd]` (token t at position p0 + t); `kc`/`vc`:
/// `[p0 + n][n_kv_heads * hd]`. Returns `[n][n_heads * hd]`.
pub fn causal_attention(s: &AttnShape, q: &[f32], kc: &[f32], vc: &[f32], p0: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n * s.n_heads * s.head_dim];
    let mut sc = AttnScratch::default();
    causal_attention_into(
        Isa::available(s.head_dim)[0],
        s,
        q,
        kc,
        vc,
        p0,
        n,
        &mut out,
        &mut sc,
        Par::Rayon,
    );
    out
}

/// Output pointer shared by the tasks; each writes a disjoint set of rows.
struct OutPtr(*mut f32);
unsafe impl Sync for OutPtr {}

/// Buffers of a prefill attention call that a caller keeps across layers, so
/// their pages are faulted in once per forward instead of once per layer.
#[derive(Default)]
pub struct AttnScratch {
    kt: Vec<f32>,
}

impl AttnScratch {
    /// `K^T` of every kv head, `[kv head][dim][stride]`: key p's dim d at
    /// `d * stride + p`, zeros from `tot` to the end of its key block. Tasks
    /// of (kv head, key block) so every thread helps (5 kv heads < 16 cores);
    /// a task's 64 keys x 128 dims (32 KiB) stay in L1 while it transposes.
    fn transpose_keys(&mut self, kc: &[f32], tot: usize, n_kv: usize, hd: usize, stride: usize, par: Par) -> &[f32] {
        let kvd = n_kv * hd;
        let len = n_kv * hd * stride;
        if self.kt.len() < len {
            self.kt.resize(len, 0.0);
        }
        let n_kb = tot.div_ceil(K_BLOCK);
        let op = OutPtr(self.kt.as_mut_ptr());
        par.for_each_index(n_kv * n_kb, |i| {
            let op = &op;
            let (kvh, kb) = (i / n_kb, i % n_kb);
            let base = kvh * hd * stride;
            for p in kb * K_BLOCK..(kb + 1) * K_BLOCK {
                let src = (p < tot).then(|| &kc[p * kvd + kvh * hd..p * kvd + (kvh + 1) * hd]);
                for d in 0..hd {
                    // SAFETY: (kvh, d, p) is unique to this task; p < stride.
                    unsafe { *op.0.add(base + d * stride + p) = src.map_or(0.0, |r| r[d]) };
                }
            }
        });
        &self.kt[..len]
    }
}

/// [`causal_attention`] with a given kernel set (tests compare them) into
/// `out` (`[n][n_heads * hd]`, every element written), its parallel regions
/// on `par`.
#[allow(clippy::too_many_arguments)]
pub fn causal_attention_into(
    isa: Isa,
    s: &AttnShape,
    q: &[f32],
    kc: &[f32],
    vc: &[f32],
    p0: usize,
    n: usize,
    out: &mut [f32],
    scratch: &mut AttnScratch,
    par: Par,
) {
    let (hd, qd, kvd) = (s.head_dim, s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim);
    assert!(isa != Isa::Avx512 || hd.is_multiple_of(64));
    let group = s.n_heads / s.n_kv_heads;
    let tot = p0 + n;
    assert!(q.len() >= n * qd && kc.len() >= tot * kvd && vc.len() >= tot * kvd);
    // K^T per kv head, positions padded with zeros to whole key blocks so
    // every block load is in bounds (padded scores are masked off). One extra
    // cache line per row: a power-of-two pitch (2 KiB at 512 tokens) would put
    // the 128 rows of a key block into 2 L1 sets.
    let stride = tot.next_multiple_of(K_BLOCK) + 16;
    let kt = scratch.transpose_keys(kc, tot, s.n_kv_heads, hd, stride, par);
    // Scores in base 2: exp(x * scale) = exp2(x * scale * log2 e).
    let qscale = std::f32::consts::LOG2_E / (hd as f32).sqrt();
    let n_qb = n.div_ceil(Q_BLOCK);
    let n_tasks = s.n_kv_heads * n_qb;
    let next = AtomicUsize::new(0);
    assert_eq!(out.len(), n * qd);
    let op = OutPtr(out.as_mut_ptr());
    let rows_max = Q_BLOCK * group;
    par.broadcast_claim(|| {
        let op = &op;
        let mut sc = Scratch {
            qs: vec![0f32; rows_max * hd],
            acc: vec![0f32; rows_max * hd],
            s: vec![0f32; rows_max * K_BLOCK],
            m: vec![0f32; rows_max],
            l: vec![0f32; rows_max],
            corr: vec![0f32; rows_max],
            vis: vec![0usize; rows_max],
        };
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n_tasks {
                break;
            }
            // Longest first: the last query block of every head, then the one before.
            let (qb, kvh) = (n_qb - 1 - i / s.n_kv_heads, i % s.n_kv_heads);
            let (t0, t1) = (qb * Q_BLOCK, ((qb + 1) * Q_BLOCK).min(n));
            let rows = (t1 - t0) * group;
            // Row r = (token t0 + r / group, head kvh * group + r % group).
            for r in 0..rows {
                let (t, h) = (t0 + r / group, kvh * group + r % group);
                let src = &q[t * qd + h * hd..t * qd + (h + 1) * hd];
                for (d, &v) in sc.qs[r * hd..(r + 1) * hd].iter_mut().zip(src) {
                    *d = v * qscale;
                }
            }
            let kh = &kt[kvh * hd * stride..(kvh + 1) * hd * stride];
            tile(
                isa,
                &mut sc,
                rows,
                group,
                hd,
                kh,
                stride,
                vc,
                kvd,
                kvh,
                p0 + t0,
                p0 + t1,
            );
            for r in 0..rows {
                let (t, h) = (t0 + r / group, kvh * group + r % group);
                // SAFETY: (t, h) is unique to this task's rows; `out` has n * qd elements.
                let dst = unsafe { std::slice::from_raw_parts_mut(op.0.add(t * qd + h * hd), hd) };
                let inv = 1.0 / sc.l[r];
                for (o, &a) in dst.iter_mut().zip(&sc.acc[r * hd..(r + 1) * hd]) {
                    *o = a * inv;
                }
            }
        }
    });
}

struct Scratch {
    /// Scaled queries `[rows][hd]`.
    qs: Vec<f32>,
    /// Unnormalised outputs `[rows][hd]`.
    acc: Vec<f32>,
    /// Scores, then probabilities, `[rows][K_BLOCK]`.
    s: Vec<f32>,
    /// Running max (base 2) and sum per row.
    m: Vec<f32>,
    l: Vec<f32>,
    /// Rescale factor of each row's accumulator for the current block.
    corr: Vec<f32>,
    /// Visible keys of each row in the current block.
    vis: Vec<usize>,
}

/// One (kv head, query block) tile: queries at positions `pa..pb`.
#[allow(clippy::too_many_arguments)]
fn tile(
    isa: Isa,
    sc: &mut Scratch,
    rows: usize,
    group: usize,
    hd: usize,
    kh: &[f32],
    stride: usize,
    vc: &[f32],
    kvd: usize,
    kvh: usize,
    pa: usize,
    pb: usize,
) {
    sc.acc[..rows * hd].fill(0.0);
    sc.m[..rows].fill(f32::NEG_INFINITY);
    sc.l[..rows].fill(0.0);
    let mut k0 = 0;
    while k0 < pb {
        let k1 = (k0 + K_BLOCK).min(pb);
        // Query at position p sees keys 0..=p; rows are in position order, so
        // the rows that see nothing of this block are a prefix.
        for r in 0..rows {
            sc.vis[r] = (pa + r / group + 1).min(k1).saturating_sub(k0);
        }
        let lo = sc.vis[..rows].iter().take_while(|&&v| v == 0).count();
        let nr = rows - lo;
        let kb = k1 - k0;
        let v = &vc[k0 * kvd + kvh * hd..];
        let blk = Block {
            rows: nr,
            hd,
            kb,
            qs: &sc.qs[lo * hd..],
            kt: &kh[k0..],
            stride,
            v,
            kvd,
        };
        let mut t = Tile {
            s: &mut sc.s[..nr * K_BLOCK],
            m: &mut sc.m[lo..rows],
            l: &mut sc.l[lo..rows],
            corr: &mut sc.corr[lo..rows],
            vis: &sc.vis[lo..rows],
            acc: &mut sc.acc[lo * hd..rows * hd],
        };
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: Avx512 is only chosen when avx512f is detected and hd % 64 == 0.
            Isa::Avx512 => unsafe { x86::block_avx512(&blk, &mut t) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: Avx2 is only chosen when avx2 and fma are detected.
            Isa::Avx2 => unsafe { block_avx2(&blk, &mut t) },
            _ => block_portable(&blk, &mut t),
        }
        k0 = k1;
    }
}

/// The running state of the rows of one block step: scores `s`
/// (`[rows][K_BLOCK]`), online-softmax max `m`, sum `l` and rescale `corr`
/// per row, visible keys per row, and the output accumulators `[rows][hd]`.
struct Tile<'a> {
    s: &'a mut [f32],
    m: &'a mut [f32],
    l: &'a mut [f32],
    corr: &'a mut [f32],
    vis: &'a [usize],
    acc: &'a mut [f32],
}

/// Inputs of one key block for the rows that see any of it.
struct Block<'a> {
    rows: usize,
    hd: usize,
    /// Keys in the block (<= K_BLOCK).
    kb: usize,
    /// `[rows][hd]`, scaled.
    qs: &'a [f32],
    /// `kt[d * stride + j]` = key j of the block, dim d (K_BLOCK readable).
    kt: &'a [f32],
    stride: usize,
    /// `v[j * kvd + d]` = value j of the block, dim d.
    v: &'a [f32],
    kvd: usize,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn block_avx2(b: &Block, t: &mut Tile) {
    block_portable(b, t)
}

/// The block in plain loops (vectorised by the compiler where it can).
#[inline(always)]
fn block_portable(b: &Block, t: &mut Tile) {
    let (s, m, l, corr, vis, acc) = (&mut *t.s, &mut *t.m, &mut *t.l, &mut *t.corr, t.vis, &mut *t.acc);
    let hd = b.hd;
    // S = Q . K^T over all K_BLOCK columns (padding and masked keys included).
    for r in 0..b.rows {
        let mut a = [0f32; K_BLOCK];
        for d in 0..hd {
            let qd = b.qs[r * hd + d];
            let k = &b.kt[d * b.stride..d * b.stride + K_BLOCK];
            for (x, &kj) in a.iter_mut().zip(k) {
                *x += qd * kj;
            }
        }
        s[r * K_BLOCK..(r + 1) * K_BLOCK].copy_from_slice(&a);
    }
    // Online softmax: P = exp2(S - new max) on visible keys, 0 elsewhere.
    for r in 0..b.rows {
        let row = &mut s[r * K_BLOCK..(r + 1) * K_BLOCK];
        let cnt = vis[r];
        let bm = row[..cnt].iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
        let nm = m[r].max(bm);
        let mut sum = 0.0;
        for (j, x) in row.iter_mut().enumerate() {
            let p = if j < cnt { exp2_portable(*x - nm) } else { 0.0 };
            *x = p;
            sum += p;
        }
        corr[r] = exp2_portable(m[r] - nm);
        l[r] = l[r] * corr[r] + sum;
        m[r] = nm;
    }
    // O = O * corr + P . V
    for r in 0..b.rows {
        let a = &mut acc[r * hd..(r + 1) * hd];
        let c = corr[r];
        a.iter_mut().for_each(|x| *x *= c);
        for j in 0..b.kb {
            let p = s[r * K_BLOCK + j];
            let vj = &b.v[j * b.kvd..j * b.kvd + hd];
            for (x, &y) in a.iter_mut().zip(vj) {
                *x += p * y;
            }
        }
    }
}

// exp2 on [-0.5, 0.5]: 2^f = 1 + f * P(f) (Cephes exp2f, rel. error < 2e-7).
const EXP2_P: [f32; 6] = [
    1.535_336_2e-4,
    1.339_887_4e-3,
    9.618_437e-3,
    5.550_332_5e-2,
    2.402_264_8e-1,
    6.931_472e-1,
];

/// `2^x` for `x <= 127` (no NaN input); results below 2^-126 (x < -126.5)
/// come out as 0. Integer ops only, so it vectorises.
#[inline(always)]
pub fn exp2_portable(x: f32) -> f32 {
    let x = x.clamp(-127.0, 127.0);
    let n = (x + 0.5).floor();
    let f = x - n;
    let mut p = EXP2_P[0];
    for &c in &EXP2_P[1..] {
        p = p * f + c;
    }
    let r = 1.0 + f * p;
    // 2^n from the mantissa of n + 127 + 2^23 (an exact integer there);
    // n = -127 gives the bit pattern 0 = 0.0.
    let e = (n + (127.0 + 8_388_608.0)).to_bits() - 0x4b00_0000;
    r * f32::from_bits(e << 23)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Block, Tile, EXP2_P, K_BLOCK};

    /// The block with AVX-512F: 4-row micro-kernels for both GEMMs.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn block_avx512(b: &Block, t: &mut Tile) {
        let (s, m, l, corr, vis, acc) = (&mut *t.s, &mut *t.m, &mut *t.l, &mut *t.corr, t.vis, &mut *t.acc);
        let (rows, hd) = (b.rows, b.hd);
        debug_assert!(hd.is_multiple_of(64) && s.len() >= rows * K_BLOCK && acc.len() >= rows * hd);
        debug_assert!(b.qs.len() >= rows * hd && b.kt.len() >= (hd - 1) * b.stride + K_BLOCK);
        debug_assert!(b.kb == 0 || b.v.len() >= (b.kb - 1) * b.kvd + hd);
        let (qp, kp, sp) = (b.qs.as_ptr(), b.kt.as_ptr(), s.as_mut_ptr());
        // Only the 16-key vectors that hold keys of the block (the last
        // block of a causal tile is often partial); softmax masks the rest.
        match b.kb.div_ceil(16) {
            1 => scores_rows::<1>(qp, rows, hd, kp, b.stride, sp),
            2 => scores_rows::<2>(qp, rows, hd, kp, b.stride, sp),
            3 => scores_rows::<3>(qp, rows, hd, kp, b.stride, sp),
            _ => scores_rows::<4>(qp, rows, hd, kp, b.stride, sp),
        }
        for r in 0..rows {
            softmax_row(sp.add(r * K_BLOCK), vis[r], &mut m[r], &mut l[r], &mut corr[r]);
        }
        let (vp, ap, cp) = (b.v.as_ptr(), acc.as_mut_ptr(), corr.as_ptr());
        for d0 in (0..hd).step_by(64) {
            // 6 rows at a time (24 accumulators), then 4, 2, 1.
            let mut r = 0;
            while r < rows {
                let step = match rows - r {
                    6.. => 6,
                    4 | 5 => 4,
                    2 | 3 => 2,
                    _ => 1,
                };
                let kernel: unsafe fn(*const f32, usize, *const f32, usize, *mut f32, usize, *const f32) = match step {
                    6 => pv::<6>,
                    4 => pv::<4>,
                    2 => pv::<2>,
                    _ => pv::<1>,
                };
                kernel(
                    sp.add(r * K_BLOCK),
                    b.kb,
                    vp.add(d0),
                    b.kvd,
                    ap.add(r * hd + d0),
                    hd,
                    cp.add(r),
                );
                r += step;
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn scores_rows<const C: usize>(
        qp: *const f32,
        rows: usize,
        hd: usize,
        kp: *const f32,
        stride: usize,
        sp: *mut f32,
    ) {
        // 6 rows x 4 key vectors = 24 accumulators: 10 loads per 24 FMAs.
        let mut r = 0;
        while r + 6 <= rows {
            scores::<6, C>(qp.add(r * hd), hd, kp, stride, sp.add(r * K_BLOCK));
            r += 6;
        }
        if r + 4 <= rows {
            scores::<4, C>(qp.add(r * hd), hd, kp, stride, sp.add(r * K_BLOCK));
            r += 4;
        }
        if r + 2 <= rows {
            scores::<2, C>(qp.add(r * hd), hd, kp, stride, sp.add(r * K_BLOCK));
            r += 2;
        }
        if r < rows {
            scores::<1, C>(qp.add(r * hd), hd, kp, stride, sp.add(r * K_BLOCK));
        }
    }

    /// `s[r][0..16 C] = sum_d q[r][d] * kt[d][0..16 C]` for R rows.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn scores<const R: usize, const C: usize>(
        q: *const f32,
        hd: usize,
        kt: *const f32,
        stride: usize,
        s: *mut f32,
    ) {
        let mut a = [[_mm512_setzero_ps(); C]; R];
        for d in 0..hd {
            let k = kt.add(d * stride);
            let kv: [__m512; C] = std::array::from_fn(|c| _mm512_loadu_ps(k.add(16 * c)));
            for (r, ar) in a.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*q.add(r * hd + d));
                for (c, acc) in ar.iter_mut().enumerate() {
                    *acc = _mm512_fmadd_ps(x, kv[c], *acc);
                }
            }
        }
        for (r, ar) in a.iter().enumerate() {
            for (c, acc) in ar.iter().enumerate() {
                _mm512_storeu_ps(s.add(r * K_BLOCK + c * 16), *acc);
            }
        }
    }

    /// Online-softmax step of one row: probabilities in place (0 past `cnt`).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn softmax_row(s: *mut f32, cnt: usize, m: &mut f32, l: &mut f32, corr: &mut f32) {
        let bits: u64 = if cnt >= 64 { u64::MAX } else { (1u64 << cnt) - 1 };
        let mask: [__mmask16; 4] = std::array::from_fn(|c| (bits >> (16 * c)) as __mmask16);
        let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
        let x: [__m512; 4] = std::array::from_fn(|c| _mm512_mask_loadu_ps(ninf, mask[c], s.add(16 * c)));
        let mx = _mm512_max_ps(_mm512_max_ps(x[0], x[1]), _mm512_max_ps(x[2], x[3]));
        let nm = m.max(_mm512_reduce_max_ps(mx));
        let nmv = _mm512_set1_ps(nm);
        let mut sum = _mm512_setzero_ps();
        for c in 0..4 {
            let p = _mm512_maskz_mov_ps(mask[c], exp2(_mm512_sub_ps(x[c], nmv)));
            sum = _mm512_add_ps(sum, p);
            _mm512_storeu_ps(s.add(16 * c), p);
        }
        // m = -inf (first block) gives exp2(-127 clamp) ~ 0: the empty accumulator.
        *corr = _mm512_cvtss_f32(exp2(_mm512_set1_ps(*m - nm)));
        *l = *l * *corr + _mm512_reduce_add_ps(sum);
        *m = nm;
    }

    /// `2^x` per lane, same polynomial as `exp2_portable` (x <= 127; -inf -> ~0).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp2(x: __m512) -> __m512 {
        let x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-127.0)), _mm512_set1_ps(127.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
        let f = _mm512_sub_ps(x, n);
        let mut p = _mm512_set1_ps(EXP2_P[0]);
        for &c in &EXP2_P[1..] {
            p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
        }
        let r = _mm512_fmadd_ps(f, p, _mm512_set1_ps(1.0));
        _mm512_scalef_ps(r, n)
    }

    /// `acc[r][0..64] = acc[r][0..64] * corr[r] + sum_j p[r][j] * v[j][0..64]` for R rows.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn pv<const R: usize>(
        p: *const f32,
        kb: usize,
        v: *const f32,
        kvd: usize,
        acc: *mut f32,
        hd: usize,
        corr: *const f32,
    ) {
        let mut a: [[__m512; 4]; R] = std::array::from_fn(|r| {
            let c = _mm512_set1_ps(*corr.add(r));
            std::array::from_fn(|k| _mm512_mul_ps(_mm512_loadu_ps(acc.add(r * hd + 16 * k)), c))
        });
        for j in 0..kb {
            let vj = v.add(j * kvd);
            let vv = [
                _mm512_loadu_ps(vj),
                _mm512_loadu_ps(vj.add(16)),
                _mm512_loadu_ps(vj.add(32)),
                _mm512_loadu_ps(vj.add(48)),
            ];
            for (r, ar) in a.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*p.add(r * K_BLOCK + j));
                for (c, acc) in ar.iter_mut().enumerate() {
                    *acc = _mm512_fmadd_ps(x, vv[c], *acc);
                }
            }
        }
        for (r, ar) in a.iter().enumerate() {
            for (c, x) in ar.iter().enumerate() {
                _mm512_storeu_ps(acc.add(r * hd + 16 * c), *x);
            }
        }
    }
}

/// Plain per-(token, head) attention: the readable reference the tiled loop
/// is tested against, and the decode path (one query, nothing to tile).
pub fn causal_attention_simple(s: &AttnShape, q: &[f32], kc: &[f32], vc: &[f32], p0: usize, n: usize) -> Vec<f32> {
    let (hd, qd) = (s.head_dim, s.n_heads * s.head_dim);
    let mut out = vec![0f32; n * qd];
    out.par_chunks_mut(hd)
        .enumerate()
        .for_each(|(i, o)| simple_head(s, q, kc, vc, p0, i, o));
    out
}

/// Output `o` (`head_dim` floats) of `causal_attention_simple` for head
/// slot `i` (token `i / n_heads`, head `i % n_heads`).
pub fn simple_head(s: &AttnShape, q: &[f32], kc: &[f32], vc: &[f32], p0: usize, i: usize, o: &mut [f32]) {
    let (hd, qd, kvd) = (s.head_dim, s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim);
    let group = s.n_heads / s.n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let (t, h) = (i / s.n_heads, i % s.n_heads);
    let kvh = h / group;
    let qv = &q[t * qd + h * hd..t * qd + (h + 1) * hd];
    let len = p0 + t + 1;
    let mut scores: Vec<f32> = (0..len)
        .map(|p| ops::dot(qv, &kc[p * kvd + kvh * hd..p * kvd + (kvh + 1) * hd]) * scale)
        .collect();
    ops::softmax(&mut scores);
    o.fill(0.0);
    for (p, &w) in scores.iter().enumerate() {
        ops::axpy(o, w, &vc[p * kvd + kvh * hd..p * kvd + (kvh + 1) * hd]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::synthetic::SplitMix64;

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    /// Every kernel set against the plain reference. Tolerance 5e-6
    /// absolute (measured <= 6.1e-7) on outputs of magnitude <= 1: the sums run in another order
    /// and exp2 is a polynomial (rel. error < 2e-7).
    #[test]
    fn tiled_matches_simple() {
        let mut r = SplitMix64(3);
        // One scratch for every case: stale K^T of a longer call must not leak in.
        let mut scratch = AttnScratch::default();
        // Groups of 1 and 3 with hd 64 reach every row-tile remainder (1..5) of the AVX-512 kernels.
        for (nh, nkv, hd) in [(4, 2, 8), (20, 5, 128), (4, 1, 64), (3, 3, 16), (6, 2, 64), (5, 5, 64)] {
            let s = AttnShape {
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: hd,
            };
            for (p0, n) in [(0, 1), (0, 37), (5, 20), (70, 3), (0, 150), (63, 66)] {
                let tot = p0 + n;
                // Scores of a few units, like real attention (peaked rows).
                let mut rnd = |k: usize, a: f32| (0..k).map(|_| (r.next_f32() * 2.0 - 1.0) * a).collect::<Vec<f32>>();
                let q = rnd(n * nh * hd, 3.0);
                let kc = rnd(tot * nkv * hd, 1.0);
                let vc = rnd(tot * nkv * hd, 1.0);
                let want = causal_attention_simple(&s, &q, &kc, &vc, p0, n);
                for isa in Isa::available(hd) {
                    // NaN until written: a row no task writes shows up here.
                    let mut got = vec![f32::NAN; n * nh * hd];
                    causal_attention_into(isa, &s, &q, &kc, &vc, p0, n, &mut got, &mut scratch, Par::Rayon);
                    let d = max_diff(&got, &want);
                    assert!(d < 5e-6, "{isa:?} heads {nh}/{nkv} hd {hd} p0 {p0} n {n}: {d}");
                }
            }
        }
    }

    #[test]
    fn exp2_is_accurate() {
        // Dense grid over the range softmax uses, plus the clamped ends.
        let xs: Vec<f32> = (0..=200_000)
            .map(|i| -120.0 + i as f32 * 6.2e-4)
            .chain([-126.0, 0.0, 1.0, 20.5])
            .collect();
        let mut worst = 0f64;
        for &x in &xs {
            let want = (x as f64).exp2();
            let got = exp2_portable(x) as f64;
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 2e-7, "portable exp2 rel. error {worst}");
        assert_eq!(exp2_portable(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp2_portable(-200.0), 0.0);
        // exp(x) = exp2(x log2 e): input rounding adds |x| * 2^-24 relative.
        for i in 0..=2000 {
            let x = -20.0 + i as f32 * 0.01;
            let (got, want) = (exp2_portable(x * std::f32::consts::LOG2_E), x.exp());
            assert!(
                ((got - want) / want).abs() < 1e-6 + x.abs() * 1.2e-7,
                "exp({x}): {got} vs {want}"
            );
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") {
            for ch in xs.chunks_exact(16) {
                let mut out = [f32::NAN; 16];
                // SAFETY: avx512f detected above; 16 lanes in and out.
                unsafe {
                    use std::arch::x86_64::*;
                    _mm512_storeu_ps(out.as_mut_ptr(), x86::exp2(_mm512_loadu_ps(ch.as_ptr())));
                }
                for (&x, &g) in ch.iter().zip(&out) {
                    let want = (x as f64).exp2();
                    assert!(((g as f64 - want) / want).abs() < 2e-7, "avx512 exp2({x}) = {g}");
                }
            }
        } else {
            eprintln!("SKIP avx512 exp2: no avx512f");
        }
    }
}
