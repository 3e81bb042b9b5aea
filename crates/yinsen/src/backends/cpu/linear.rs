//! BitLinear on the CPU: per-token int8 activations times prepared ternary
//! weights, exact int32 accumulation, then the two float scales.
//! Several projections that share one input (q/k/v, gate/up) are fused into
//! one matrix so one pass over the rows serves them all.

use std::sync::Arc;

use rayon::prelude::*;

use super::kernels::layout::Codes;
use super::kernels::policy::KernelPolicy;
use super::kernels::PackedTernary;
use super::ops;
use super::reference;
use super::spin_pool::{Par, SendPtr, SpinPool};
use crate::error::Result;
use crate::model::{Activation, TernaryMatrix, WeightScale};

/// What the multi-token epilogue does with `y = acc * w_scale / s_t`.
#[derive(Clone, Copy, Debug)]
pub enum Epilogue {
    /// `out = y` (as [`Linear::forward`]).
    Store,
    /// `out += y`: the residual add fused in.
    Add,
    /// For a gate/up fusion (two parts of `f` rows): `out[t][r] =
    /// act(gate_r) * up_r`, `out` is `[n][f]`.
    Gated(Activation),
}

/// Output pointer shared by the epilogue tasks; each writes its own rows.
struct OutPtr(*mut f32);
unsafe impl Sync for OutPtr {}

/// Per-token int8 activations of a BitLinear input, `[n_tokens][n_in]`.
#[derive(Default)]
pub struct QuantizedInput {
    /// 64-byte aligned (see [`Codes`]).
    pub q: Codes,
    /// `s = 127 / max|x|` per token.
    pub s: Vec<f32>,
    pub n_in: usize,
}

impl QuantizedInput {
    /// Quantise every token of `x` (`[n][n_in]`), tokens in parallel.
    pub fn new(x: &[f32], n_in: usize) -> Self {
        Self::per_token(x, n_in, reference::quantize_token)
    }

    /// RMSNorm and quantisation fused, per token and in parallel: the norm's
    /// float output is never stored (only the BitLinear reads it). Bit-equal
    /// to `ops::rms_norm` followed by `reference::quantize_token`.
    pub fn from_rms_norm(x: &[f32], w: &[f32], eps: f32) -> Self {
        let mut me = Self {
            q: Codes::default(),
            s: Vec::new(),
            n_in: w.len(),
        };
        me.refill_rms_norm(x, w, eps);
        me
    }

    /// [`Self::from_rms_norm`] into this input's buffers: a forward reuses
    /// one input for its 4 x layers calls instead of a fresh 1-4 MB buffer
    /// per call (fresh pages fault in, freed ones go back to the OS).
    pub fn refill_rms_norm(&mut self, x: &[f32], w: &[f32], eps: f32) {
        self.refill_rms_norm_on(x, w, eps, Par::Rayon)
    }

    /// [`Self::refill_rms_norm`] with its parallel region on `par`.
    pub fn refill_rms_norm_on(&mut self, x: &[f32], w: &[f32], eps: f32, par: Par) {
        self.refill_tokens(x, w.len(), par, |xs, qs, ss| rms_quantize_tokens(xs, w, eps, qs, ss));
    }

    /// [`Self::new`] into this input's buffers.
    pub fn refill(&mut self, x: &[f32], n_in: usize) {
        self.refill_on(x, n_in, Par::Rayon)
    }

    /// [`Self::refill`] with its parallel region on `par`.
    pub fn refill_on(&mut self, x: &[f32], n_in: usize, par: Par) {
        self.refill_tokens(x, n_in, par, |xs, qs, ss| {
            for ((xt, qt), st) in xs.chunks_exact(n_in).zip(qs.chunks_exact_mut(n_in)).zip(ss) {
                *st = reference::quantize_token(xt, qt);
            }
        });
    }

    /// Run `quantize(token, codes) -> scale` over every token in parallel.
    fn per_token(x: &[f32], n_in: usize, quantize: impl Fn(&[f32], &mut [i8]) -> f32 + Sync) -> Self {
        let mut me = Self {
            q: Codes::default(),
            s: Vec::new(),
            n_in,
        };
        me.refill_tokens(x, n_in, Par::Rayon, |xs, qs, ss| {
            for ((xt, qt), st) in xs.chunks_exact(n_in).zip(qs.chunks_exact_mut(n_in)).zip(ss) {
                *st = quantize(xt, qt);
            }
        });
        me
    }

    /// Fill `q` / `s` from `x` (`[n][n_in]`) with `quantize(tokens, codes,
    /// scales)` over runs of whole tokens, runs in parallel for many tokens.
    fn refill_tokens(
        &mut self,
        x: &[f32],
        n_in: usize,
        par: Par,
        quantize: impl Fn(&[f32], &mut [i8], &mut [f32]) + Sync + Send,
    ) {
        let n = x.len() / n_in;
        self.n_in = n_in;
        self.s.clear();
        self.s.resize(n, 0.0);
        // Every code is overwritten below; only growth is zero-filled.
        self.q.resize(x.len());
        if n == 1 {
            // Decode: a fork-join would cost more than quantising one token.
            quantize(x, &mut self.q, &mut self.s);
            return;
        }
        // Runs of 8 tokens: enough tasks for 16 threads at 128+ tokens.
        const RUN: usize = 8;
        let (qp, sp) = (SendPtr(self.q.as_mut_ptr()), SendPtr(self.s.as_mut_ptr()));
        par.for_each_index(n.div_ceil(RUN), |i| {
            let (t0, t1) = (i * RUN, ((i + 1) * RUN).min(n));
            // SAFETY: run i alone writes tokens t0..t1 of `q` and `s`, which
            // hold n * n_in codes and n scales.
            let (qs, ss) = unsafe {
                (
                    std::slice::from_raw_parts_mut(qp.get().add(t0 * n_in), (t1 - t0) * n_in),
                    std::slice::from_raw_parts_mut(sp.get().add(t0), t1 - t0),
                )
            };
            quantize(&x[t0 * n_in..t1 * n_in], qs, ss);
        });
    }

    pub fn n_tokens(&self) -> usize {
        self.s.len()
    }
}

/// [`rms_quantize`] of every token of `x` (`[n][w.len()]`) into `q` and
/// `s`, bit-equal to it token by token. The AVX-512 version runs the
/// sum-of-squares chains of 4 tokens together: that sum's fixed 16-lane order
/// (as `ops::dot`) is one serial add chain per token, latency-bound alone.
pub fn rms_quantize_tokens(x: &[f32], w: &[f32], eps: f32, q: &mut [i8], s: &mut [f32]) {
    let d = w.len();
    debug_assert!(x.len() == s.len() * d && q.len() == x.len());
    #[cfg(target_arch = "x86_64")]
    if avx512_ok() && d >= 16 {
        let mut t = 0;
        while t < s.len() {
            let k = (s.len() - t).min(4);
            let xs = &x[t * d..(t + k) * d];
            // SAFETY: avx512f and avx512bw detected.
            let ss = unsafe { sum_squares4_avx512(xs, d, k) };
            for j in 0..k {
                let (xt, qt) = (&xs[j * d..(j + 1) * d], &mut q[(t + j) * d..(t + j + 1) * d]);
                // SAFETY: as above.
                s[t + j] = unsafe { quantize_scaled_avx512(xt, w, ss[j], eps, qt) };
            }
            t += k;
        }
        return;
    }
    for ((xt, qt), st) in x.chunks_exact(d).zip(q.chunks_exact_mut(d)).zip(s.iter_mut()) {
        *st = rms_quantize(xt, w, eps, qt);
    }
}

/// `ops::dot(x_j, x_j)` of `k <= 4` consecutive tokens of length `d`, bit
/// for bit: per token 16 lanes of `acc += x * x` (multiply, then add),
/// lanes summed in order from 0.0, then the tail elements in order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn sum_squares4_avx512(x: &[f32], d: usize, k: usize) -> [f32; 4] {
    use std::arch::x86_64::*;
    assert!(k <= 4 && x.len() >= k * d);
    let full = d / 16 * 16;
    let mut acc = [_mm512_setzero_ps(); 4];
    let p = x.as_ptr();
    for i in (0..full).step_by(16) {
        for (j, a) in acc.iter_mut().enumerate().take(k) {
            // SAFETY: token j < k, i + 16 <= d.
            let v = unsafe { _mm512_loadu_ps(p.add(j * d + i)) };
            *a = _mm512_add_ps(*a, _mm512_mul_ps(v, v));
        }
    }
    std::array::from_fn(|j| {
        if j >= k {
            return 0.0;
        }
        let mut lanes = [0f32; 16];
        // SAFETY: 16 floats into a 16-float array.
        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), acc[j]) };
        let mut s: f32 = lanes.iter().sum();
        for &v in &x[j * d + full..(j + 1) * d] {
            s += v * v;
        }
        s
    })
}

/// One token: `y = x * r * w` (as `ops::rms_norm`), then BitNet int8
/// quantisation of `y`, recomputing `y` instead of storing it. AVX-512 where
/// detected (bit-equal to [`rms_quantize_scalar`]: the max is exact in any
/// order, every other step is element-wise).
pub fn rms_quantize(x: &[f32], w: &[f32], eps: f32, q: &mut [i8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx512_ok() {
        // SAFETY: avx512f and avx512bw detected.
        return unsafe { rms_quantize_avx512(x, w, eps, q) };
    }
    rms_quantize_scalar(x, w, eps, q)
}

#[cfg(target_arch = "x86_64")]
fn avx512_ok() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw"))
}

/// AVX-512 version: the same float operations in the same order per
/// element (products `(x * r) * w`, then `* s`), round-half-even by
/// `roundscale` (equal to the magic-number rounding after the int8 clamp),
/// NaN codes 0 as `as i8` gives; the tail through masked loads and stores.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
fn rms_quantize_avx512(x: &[f32], w: &[f32], eps: f32, q: &mut [i8]) -> f32 {
    quantize_scaled_avx512(x, w, super::ops::dot(x, x), eps, q)
}

/// The steps of [`rms_quantize_avx512`] after the sum of squares `ss`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
fn quantize_scaled_avx512(x: &[f32], w: &[f32], ss: f32, eps: f32, q: &mut [i8]) -> f32 {
    use std::arch::x86_64::*;
    let d = x.len();
    assert!(w.len() >= d && q.len() >= d);
    let ss = ss / d as f32;
    let r = 1.0 / (ss + eps).sqrt();
    let rv = _mm512_set1_ps(r);
    let mask = |i: usize| -> __mmask16 {
        if i + 16 <= d {
            0xffff
        } else {
            ((1u32 << (d - i)) - 1) as __mmask16
        }
    };
    let (xp, wp, qp) = (x.as_ptr(), w.as_ptr(), q.as_mut_ptr());
    // SAFETY: every access is masked to the first d elements of x, w, q.
    let y = |i: usize| unsafe {
        let m = mask(i);
        let xv = _mm512_maskz_loadu_ps(m, xp.add(i));
        let wv = _mm512_maskz_loadu_ps(m, wp.add(i));
        _mm512_mul_ps(_mm512_mul_ps(xv, rv), wv)
    };
    // max(m, NaN) keeps m, as the scalar fold does. Four accumulators: max is
    // exact in any order, and one chain would be latency-bound.
    let ord_max = |m: __m512, a: __m512| _mm512_mask_max_ps(m, _mm512_cmp_ps_mask::<_CMP_ORD_Q>(a, a), m, a);
    let mut mx = [_mm512_setzero_ps(); 4];
    let full = d / 64 * 64;
    for i in (0..full).step_by(64) {
        for (k, m) in mx.iter_mut().enumerate() {
            *m = ord_max(*m, _mm512_abs_ps(y(i + 16 * k)));
        }
    }
    for i in (full..d).step_by(16) {
        mx[0] = ord_max(mx[0], _mm512_abs_ps(y(i)));
    }
    let m2 = _mm512_max_ps(_mm512_max_ps(mx[0], mx[1]), _mm512_max_ps(mx[2], mx[3]));
    let amax = _mm512_reduce_max_ps(m2);
    let s = 127.0 / amax.max(1e-5);
    let sv = _mm512_set1_ps(s);
    // Codes of 16 elements as int32 in [-128, 127] (NaN -> 0).
    let codes = |i: usize| {
        let v = _mm512_mul_ps(y(i), sv);
        let v = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
        let ord = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(v, v);
        let v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-128.0)), _mm512_set1_ps(127.0));
        _mm512_maskz_cvttps_epi32(ord, v)
    };
    // 64 codes per store: two saturating packs (exact, values are in range)
    // interleave 128-bit lanes; one dword permute restores the order.
    let perm = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    for i in (0..full).step_by(64) {
        let ab = _mm512_packs_epi32(codes(i), codes(i + 16));
        let cd = _mm512_packs_epi32(codes(i + 32), codes(i + 48));
        let b = _mm512_permutexvar_epi32(perm, _mm512_packs_epi16(ab, cd));
        // SAFETY: i + 64 <= d.
        unsafe { _mm512_storeu_si512(qp.add(i) as *mut _, b) };
    }
    for i in (full..d).step_by(16) {
        // SAFETY: masked store of the first d codes.
        unsafe { _mm512_mask_cvtsepi32_storeu_epi8(qp.add(i) as *mut _, mask(i), codes(i)) };
    }
    s
}

/// The plain sequential version: the reference the fast one is tested against.
pub fn rms_quantize_scalar(x: &[f32], w: &[f32], eps: f32, q: &mut [i8]) -> f32 {
    let ss = super::ops::dot(x, x) / x.len() as f32;
    let r = 1.0 / (ss + eps).sqrt();
    let amax = x.iter().zip(w).fold(0f32, |m, (&xi, &wi)| m.max((xi * r * wi).abs()));
    let s = 127.0 / amax.max(1e-5);
    for ((qi, &xi), &wi) in q.iter_mut().zip(x).zip(w) {
        *qi = reference::round_half_even_small(xi * r * wi * s).clamp(-128.0, 127.0) as i8;
    }
    s
}

enum Weights {
    /// Fast path: a kernel's packed layout; `parts` gives (rows, scale) in order.
    Packed {
        packed: Arc<dyn PackedTernary>,
        parts: Vec<(usize, f32)>,
    },
    /// Per-block scales (rare GGUF files): scalar reference per block.
    PerBlock(Vec<TernaryMatrix>),
}

/// Row ranges per thread for one-token calls: more than one lets a thread
/// that starts late (woken from sleep) be covered by the others.
const DECODE_CHUNKS_PER_THREAD: usize = 2;

/// Row chunks per spin-pool thread of a one-token matmul (and lm_head):
/// 1 = one fixed contiguous range per thread; more = chunks claimed from a
/// shared counter. 4 by default: equal to 1 on the 16-core device Xeon,
/// +10-20% here, where the 2 cores are shared and a static half can lag.
/// `YINSEN_SPIN_CHUNKS` for tuning runs.
pub fn spin_chunks_per_thread() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| env_count("YINSEN_SPIN_CHUNKS").unwrap_or(4))
}

/// A tuning count from the environment: `name` parsed, if in 1..=64.
fn env_count(name: &str) -> Option<usize> {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| (1..=64).contains(&n))
}

/// Row-chunk tasks per thread of a many-token matmul: 4 up to 4 threads (2
/// threads here: 4 beat a 512 KiB cap by 4%), 8 from 8 threads (16-thread
/// Xeon, AMX pp512: 1 -> 981, 2 -> 1196, 4 -> 1261, 8 -> 1406, 16 -> 1417
/// tok/s: finer tasks balance the cores), or `YINSEN_CPU_TASKS_PER_THREAD`.
fn multi_tasks_per_thread(threads: usize) -> usize {
    static N: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let env = *N.get_or_init(|| env_count("YINSEN_CPU_TASKS_PER_THREAD"));
    env.unwrap_or(if threads >= 8 { 8 } else { 4 })
}

/// Token ranges of a many-token matmul on a token-major kernel: 1 (all
/// tokens per task) by default, or `YINSEN_CPU_TOKEN_SPLIT`.
fn token_split() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| env_count("YINSEN_CPU_TOKEN_SPLIT").unwrap_or(1))
}

/// One token, rows `r0..r0 + o.len()` (r0 a multiple of the row block):
/// exact GEMV into a per-thread accumulator (reused, no allocation per
/// call), then `acc * (w_scale / s)` per fused part.
fn one_token_rows(packed: &dyn PackedTernary, parts: &[(usize, f32)], x: &QuantizedInput, r0: usize, o: &mut [f32]) {
    thread_local! {
        static ACC: std::cell::RefCell<Vec<i32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let r1 = r0 + o.len();
    let s = x.s[0];
    ACC.with_borrow_mut(|acc| {
        acc.clear();
        acc.resize(o.len(), 0);
        packed.gemm(&x.q, 1, r0, r1, acc);
        let mut p0 = 0;
        for &(prows, ws) in parts {
            let (a, b) = (p0.max(r0), (p0 + prows).min(r1));
            let f = ws / s;
            for r in a..b {
                o[r - r0] = acc[r - r0] as f32 * f;
            }
            p0 += prows;
        }
    });
}

/// The multi-token epilogue over TOKEN-major accumulators of rows r0..r1
/// (`ag[t * rows + r - r0]`; `au` the up rows of a gated pair) of the
/// tokens whose scales are `scales` (output row `t` = `orow(t)`): per token
/// one contiguous run, the same float operations per element as the
/// row-major epilogue of [`Linear::forward_multi`] (so the same bits), in
/// loops the compiler vectorises.
#[allow(clippy::too_many_arguments)]
fn epilogue_token_major<'o>(
    epi: Epilogue,
    parts: &[(usize, f32)],
    scales: &[f32],
    r0: usize,
    r1: usize,
    ag: &[i32],
    au: &[i32],
    orow: impl Fn(usize) -> &'o mut [f32],
) {
    let rows = r1 - r0;
    for (t, &st) in scales.iter().enumerate() {
        let o = orow(t);
        let a = &ag[t * rows..(t + 1) * rows];
        match epi {
            Epilogue::Gated(act) => {
                let (fg, fu) = (parts[0].1 / st, parts[1].1 / st);
                let u = &au[t * rows..(t + 1) * rows];
                match act {
                    Activation::Relu2 => {
                        for ((o, &g), &u) in o.iter_mut().zip(a).zip(u) {
                            *o = ops::relu2_one(g as f32 * fg, u as f32 * fu);
                        }
                    }
                    Activation::Silu => {
                        for ((o, &g), &u) in o.iter_mut().zip(a).zip(u) {
                            *o = ops::silu_one(g as f32 * fg, u as f32 * fu);
                        }
                    }
                }
            }
            Epilogue::Store | Epilogue::Add => {
                let mut p0 = 0;
                for &(prow, ws) in parts {
                    let (pa, pb) = (p0.max(r0), (p0 + prow).min(r1));
                    p0 += prow;
                    if pa >= pb {
                        continue;
                    }
                    let f = ws / st;
                    let (o, a) = (&mut o[pa - r0..pb - r0], &a[pa - r0..pb - r0]);
                    if matches!(epi, Epilogue::Add) {
                        for (o, &v) in o.iter_mut().zip(a) {
                            *o += v as f32 * f;
                        }
                    } else {
                        for (o, &v) in o.iter_mut().zip(a) {
                            *o = v as f32 * f;
                        }
                    }
                }
            }
        }
    }
}

pub struct Linear {
    weights: Weights,
    pub n_out: usize,
    pub n_in: usize,
}

impl Linear {
    /// Fuse `mats` (same n_in) into one prepared matrix for `kernel`.
    pub fn prepare(kernel: &KernelPolicy, mats: &[&TernaryMatrix]) -> Result<Self> {
        let n_in = mats[0].n_in;
        let n_out = mats.iter().map(|m| m.n_out).sum();
        assert!(mats.iter().all(|m| m.n_in == n_in), "fused matrices must share n_in");
        if mats.iter().any(|m| m.tensor_scale().is_none()) {
            return Ok(Self {
                weights: Weights::PerBlock(mats.iter().map(|m| (*m).clone()).collect()),
                n_out,
                n_in,
            });
        }
        let parts = mats.iter().map(|m| (m.n_out, m.tensor_scale().unwrap())).collect();
        let packed = if mats.len() == 1 {
            kernel.prepare(mats[0])?
        } else {
            let mut packed = Vec::with_capacity(mats.iter().map(|m| m.packed.len()).sum());
            for m in mats {
                packed.extend_from_slice(&m.packed);
            }
            kernel.prepare(&TernaryMatrix {
                n_out,
                n_in,
                packed,
                scale: WeightScale::PerTensor(1.0),
            })?
        };
        Ok(Self {
            weights: Weights::Packed { packed, parts },
            n_out,
            n_in,
        })
    }

    pub fn resident_bytes(&self) -> usize {
        match &self.weights {
            Weights::Packed { packed, .. } => packed.resident_bytes(),
            Weights::PerBlock(m) => m.iter().map(|m| m.resident_bytes()).sum(),
        }
    }

    /// Weight bytes one call of `n_tokens` tokens reads.
    pub fn bytes_for(&self, n_tokens: usize) -> usize {
        match &self.weights {
            Weights::Packed { packed, .. } => packed.bytes_for(n_tokens),
            Weights::PerBlock(m) => m.iter().map(|m| m.resident_bytes()).sum(),
        }
    }

    /// Decode (one token): one parallel region over contiguous row ranges
    /// that also applies the scales, so there is no shared i32 buffer and no
    /// second fork-join for the epilogue. Bit-equal to the general path
    /// (same `ws / s` factor, same multiply). False if not applicable.
    fn forward_one(&self, x: &QuantizedInput, out: &mut [f32], threads: usize) -> bool {
        let Weights::Packed { packed, parts } = &self.weights else {
            return false;
        };
        let rb = packed.row_block().max(1);
        let chunks = (threads * DECODE_CHUNKS_PER_THREAD).max(1);
        let rows = self.n_out.div_ceil(chunks).div_ceil(rb) * rb;
        out.par_chunks_mut(rows)
            .enumerate()
            .for_each(|(ci, o)| one_token_rows(&**packed, parts, x, ci * rows, o));
        true
    }

    /// Decode on the spin pool: thread `tid` computes one contiguous,
    /// row-block aligned range of rows and applies their scales. Bit-equal
    /// to [`Self::forward`] (same per-row operations). Falls back to
    /// `forward` for many tokens and per-block weights.
    pub fn forward_spin(&self, x: &QuantizedInput, out: &mut [f32], pool: &SpinPool) {
        self.forward_spin_chunks(x, out, pool, spin_chunks_per_thread())
    }

    /// [`Self::forward_spin`] with `per` row chunks per thread (1 = fixed ranges).
    pub fn forward_spin_chunks(&self, x: &QuantizedInput, out: &mut [f32], pool: &SpinPool, per: usize) {
        debug_assert_eq!(x.n_in, self.n_in);
        debug_assert_eq!(out.len(), x.n_tokens() * self.n_out);
        match &self.weights {
            Weights::Packed { packed, parts } if x.n_tokens() == 1 => {
                let rb = packed.row_block().max(1);
                if per <= 1 {
                    pool.for_ranges(out, rb, |r0, o| one_token_rows(&**packed, parts, x, r0, o));
                } else {
                    let chunk = super::spin_pool::split_len(self.n_out, pool.threads() * per, rb);
                    pool.for_chunks(out, chunk, |r0, o| one_token_rows(&**packed, parts, x, r0, o));
                }
            }
            _ => self.forward(x, out, pool.threads()),
        }
    }

    /// `out[t * n_out + r]` (token-major) for every token of `x`.
    /// Output rows are split across the current rayon pool.
    pub fn forward(&self, x: &QuantizedInput, out: &mut [f32], threads: usize) {
        let n = x.n_tokens();
        debug_assert_eq!(x.n_in, self.n_in);
        debug_assert_eq!(out.len(), n * self.n_out);
        if n == 1 && self.forward_one(x, out, threads) {
            return;
        }
        match &self.weights {
            Weights::Packed { packed, parts } => {
                let mut acc = vec![0i32; self.n_out * n];
                let rb = packed.row_block().max(1);
                let chunks = (threads * 4).max(1);
                let rows = self.n_out.div_ceil(chunks).div_ceil(rb) * rb;
                acc.par_chunks_mut(rows * n).enumerate().for_each(|(ci, ch)| {
                    let r0 = ci * rows;
                    packed.gemm(&x.q, n, r0, r0 + ch.len() / n, ch);
                });
                // Epilogue: exact int -> float with the two scales, transposing
                // the row-major accumulators to token-major, 16 tokens per task:
                // each accumulator cache line is read once, and the factor
                // `w_scale / s_t` is divided once per (part, token), not per element.
                const TB: usize = 16;
                let n_out = self.n_out;
                out.par_chunks_mut(TB * n_out).enumerate().for_each(|(bi, ob)| {
                    let t0 = bi * TB;
                    let nt = ob.len() / n_out;
                    let mut r0 = 0;
                    for &(rows, ws) in parts {
                        let f: [f32; TB] = std::array::from_fn(|j| if j < nt { ws / x.s[t0 + j] } else { 0.0 });
                        for r in r0..r0 + rows {
                            let a = &acc[r * n + t0..r * n + t0 + nt];
                            for (j, (&v, &fj)) in a.iter().zip(&f).enumerate() {
                                ob[j * n_out + r] = v as f32 * fj;
                            }
                        }
                        r0 += rows;
                    }
                });
            }
            Weights::PerBlock(mats) => {
                // Reference semantics, one token at a time; slow but exact.
                let mut r0 = 0;
                for m in mats {
                    for t in 0..n {
                        let xq = &x.q[t * self.n_in..(t + 1) * self.n_in];
                        let WeightScale::PerBlock { block, scales } = &m.scale else {
                            // PerTensor parts of a mixed fusion.
                            let ws = m.tensor_scale().unwrap_or(0.0);
                            for r in 0..m.n_out {
                                let acc: i32 = (0..m.n_in).map(|i| m.get(r, i) as i32 * xq[i] as i32).sum();
                                out[t * self.n_out + r0 + r] = acc as f32 * ws / x.s[t];
                            }
                            continue;
                        };
                        let bpr = m.n_in.div_ceil(*block);
                        for r in 0..m.n_out {
                            let mut y = 0f32;
                            for b in 0..bpr {
                                let acc: i32 = (b * block..((b + 1) * block).min(m.n_in))
                                    .map(|i| m.get(r, i) as i32 * xq[i] as i32)
                                    .sum();
                                y += acc as f32 * scales[r * bpr + b];
                            }
                            out[t * self.n_out + r0 + r] = y / x.s[t];
                        }
                    }
                    r0 += m.n_out;
                }
            }
        }
    }

    /// Many tokens: one task per chunk of output rows runs the GEMM into its
    /// own accumulator and then applies `epi` to its rows of
    /// `out`, so no full-size accumulator is written and read back, and the
    /// gated activation / residual add need no extra pass. Bit-equal to
    /// [`Self::forward`] followed by the same float operations.
    pub fn forward_multi(&self, x: &QuantizedInput, out: &mut [f32], epi: Epilogue, threads: usize) {
        self.forward_multi_on(x, out, epi, threads, Par::Rayon)
    }

    /// [`Self::forward_multi`] with its parallel region on `par`.
    pub fn forward_multi_on(&self, x: &QuantizedInput, out: &mut [f32], epi: Epilogue, threads: usize, par: Par) {
        self.forward_multi_split(x, out, epi, threads, par, token_split())
    }

    /// [`Self::forward_multi_on`] with the tokens in up to `split` ranges
    /// where the kernel is token-major.
    fn forward_multi_split(
        &self,
        x: &QuantizedInput,
        out: &mut [f32],
        epi: Epilogue,
        threads: usize,
        par: Par,
        split: usize,
    ) {
        let n = x.n_tokens();
        debug_assert_eq!(x.n_in, self.n_in);
        let (packed, parts) = match &self.weights {
            Weights::Packed { packed, parts } => (packed, parts),
            Weights::PerBlock(_) => return self.forward_multi_unfused(x, out, epi, threads),
        };
        let rb = packed.row_block().max(1);
        let (n_rows, gated) = match epi {
            Epilogue::Gated(_) => {
                let f = self.n_out / 2;
                if parts.len() != 2 || parts[0].0 != f || parts[1].0 != f || !f.is_multiple_of(rb) {
                    return self.forward_multi_unfused(x, out, epi, threads);
                }
                (f, true)
            }
            _ => (self.n_out, false),
        };
        let out_cols = n_rows;
        assert_eq!(out.len(), n * out_cols);
        // 4 tasks per thread, as `forward`: capping a task's accumulator at
        // L2 size (more, smaller GEMM calls) measured 4% slower here.
        let pairs = if gated { 2 } else { 1 };
        // Token-major kernels (AMX) may also split the tokens into `n_tr`
        // ranges of `tr` (tasks of more rows over fewer tokens: the
        // activations a task streams shrink, the weights it reuses grow).
        let mut tr = n.div_ceil(split).next_multiple_of(32).min(n);
        if split <= 1 || tr >= n || !(0..n.div_ceil(tr)).all(|i| packed.token_major(tr.min(n - i * tr))) {
            tr = n;
        }
        let n_tr = n.div_ceil(tr);
        let tasks = (threads * multi_tasks_per_thread(threads)).div_ceil(n_tr);
        let chunk = n_rows.div_ceil(tasks).div_ceil(rb) * rb;
        let op = OutPtr(out.as_mut_ptr());
        let n_chunks = n_rows.div_ceil(chunk);
        thread_local! {
            /// Each thread's accumulator, kept across calls (no fresh pages per region).
            static ACC: std::cell::RefCell<Vec<i32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let next = std::sync::atomic::AtomicUsize::new(0);
        par.broadcast_claim(|| {
            // Taken out (not borrowed): a nested region on this thread gets its own.
            let mut acc = ACC.with(|a| std::mem::take(&mut *a.borrow_mut()));
            loop {
                let ci = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if ci >= n_chunks * n_tr {
                    break;
                }
                let acc = &mut acc;
                let op = &op;
                if n_tr > 1 {
                    // Token range ci / n_chunks, row chunk ci % n_chunks.
                    let (ta, c) = (ci / n_chunks * tr, ci % n_chunks);
                    let (tb, r0) = ((ta + tr).min(n), c * chunk);
                    let (r1, nt) = ((r0 + chunk).min(n_rows), tb - ta);
                    let rows = r1 - r0;
                    acc.resize(acc.len().max(rows * nt * pairs), 0);
                    let (ag, au) = acc[..rows * nt * pairs].split_at_mut(rows * nt);
                    let xs = &x.q[ta * self.n_in..tb * self.n_in];
                    assert!(packed.gemm_tokens(xs, nt, r0, r1, ag));
                    if gated {
                        assert!(packed.gemm_tokens(xs, nt, n_rows + r0, n_rows + r1, au));
                    }
                    // SAFETY: this task alone writes columns r0..r1 of token rows ta..tb.
                    let orow =
                        |t: usize| unsafe { std::slice::from_raw_parts_mut(op.0.add((ta + t) * out_cols + r0), rows) };
                    epilogue_token_major(epi, parts, &x.s[ta..tb], r0, r1, ag, au, orow);
                    continue;
                }
                let (r0, r1) = (ci * chunk, ((ci + 1) * chunk).min(n_rows));
                let rows = r1 - r0;
                // Every element is overwritten by the GEMM: only growth is zeroed.
                acc.resize(acc.len().max(rows * n * pairs), 0);
                let (ag, au) = acc[..rows * n * pairs].split_at_mut(rows * n);
                if packed.gemm_tokens(&x.q, n, r0, r1, ag) {
                    if gated {
                        assert!(packed.gemm_tokens(&x.q, n, n_rows + r0, n_rows + r1, au));
                    }
                    // SAFETY: this task alone writes columns r0..r1 of every token row.
                    let orow = |t: usize| unsafe { std::slice::from_raw_parts_mut(op.0.add(t * out_cols + r0), rows) };
                    epilogue_token_major(epi, parts, &x.s[..n], r0, r1, ag, au, orow);
                    continue;
                }
                packed.gemm(&x.q, n, r0, r1, ag);
                if gated {
                    packed.gemm(&x.q, n, n_rows + r0, n_rows + r1, au);
                }
                let (ag, au) = (&*ag, &*au);
                // 16 tokens at a time: each accumulator cache line is read once,
                // and `w_scale / s_t` is divided once per (part, token).
                const TB: usize = 16;
                for t0 in (0..n).step_by(TB) {
                    let nt = (n - t0).min(TB);
                    let fac =
                        |ws: f32| -> [f32; TB] { std::array::from_fn(|j| if j < nt { ws / x.s[t0 + j] } else { 0.0 }) };
                    // SAFETY: this task alone writes columns r0..r1 of every token row.
                    let orow =
                        |j: usize| unsafe { std::slice::from_raw_parts_mut(op.0.add((t0 + j) * out_cols + r0), rows) };
                    match epi {
                        Epilogue::Gated(a) => {
                            let (fg, fu) = (fac(parts[0].1), fac(parts[1].1));
                            for j in 0..nt {
                                let o = orow(j);
                                for (rr, o) in o.iter_mut().enumerate() {
                                    let g = ag[rr * n + t0 + j] as f32 * fg[j];
                                    let u = au[rr * n + t0 + j] as f32 * fu[j];
                                    *o = match a {
                                        Activation::Relu2 => ops::relu2_one(g, u),
                                        Activation::Silu => ops::silu_one(g, u),
                                    };
                                }
                            }
                        }
                        Epilogue::Store | Epilogue::Add => {
                            let add = matches!(epi, Epilogue::Add);
                            let mut p0 = 0;
                            for &(prow, ws) in parts {
                                let (a, b) = (p0.max(r0), (p0 + prow).min(r1));
                                p0 += prow;
                                if a >= b {
                                    continue;
                                }
                                let f = fac(ws);
                                for j in 0..nt {
                                    let o = &mut orow(j)[a - r0..b - r0];
                                    for (k, o) in o.iter_mut().enumerate() {
                                        let y = ag[(a - r0 + k) * n + t0 + j] as f32 * f[j];
                                        if add {
                                            *o += y;
                                        } else {
                                            *o = y;
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            ACC.with(|a| *a.borrow_mut() = acc);
        });
    }

    /// [`Self::forward_multi`] as separate passes (per-block weights, odd shapes).
    fn forward_multi_unfused(&self, x: &QuantizedInput, out: &mut [f32], epi: Epilogue, threads: usize) {
        let n = x.n_tokens();
        match epi {
            Epilogue::Store => self.forward(x, out, threads),
            Epilogue::Add => {
                let mut y = vec![0f32; n * self.n_out];
                self.forward(x, &mut y, threads);
                out.iter_mut().zip(&y).for_each(|(o, y)| *o += y);
            }
            Epilogue::Gated(a) => {
                let f = self.n_out / 2;
                let mut gu = vec![0f32; n * 2 * f];
                self.forward(x, &mut gu, threads);
                out.par_chunks_mut(f).enumerate().with_min_len(8).for_each(|(t, o)| {
                    let (g, u) = gu[t * 2 * f..(t + 1) * 2 * f].split_at(f);
                    match a {
                        Activation::Relu2 => ops::relu2_mul(g, u, o),
                        Activation::Silu => ops::silu_mul(g, u, o),
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::synthetic::SplitMix64;

    #[test]
    fn fused_rms_quantize_is_bit_equal_to_the_two_steps() {
        let mut r = SplitMix64(11);
        let (n, d) = (5, 77);
        let x: Vec<f32> = (0..n * d).map(|_| (r.next_f32() - 0.5) * 8.0).collect();
        let w: Vec<f32> = (0..d).map(|_| 0.5 + r.next_f32()).collect();
        let fused = QuantizedInput::from_rms_norm(&x, &w, 1e-5);
        let mut y = vec![0f32; n * d];
        for t in 0..n {
            super::super::ops::rms_norm(&x[t * d..(t + 1) * d], &w, 1e-5, &mut y[t * d..(t + 1) * d]);
        }
        let two = QuantizedInput::new(&y, d);
        assert_eq!(fused.q, two.q);
        assert_eq!(fused.s, two.s);
        assert!(fused.q.iter().any(|&v| v == 127 || v == -127));
    }

    /// The one-token path against the general path (token 0 of a 3-token
    /// call) and against the scalar reference, for every kernel here, fused
    /// parts with different scales and a row count that is no multiple of 16.
    #[test]
    fn decode_path_is_bit_equal_to_general_path() {
        use crate::model::synthetic::random_ternary;
        let (n_in, rows) = (200, [37usize, 19, 64]);
        let mut mats: Vec<TernaryMatrix> = rows
            .iter()
            .enumerate()
            .map(|(k, &r)| random_ternary(r, n_in, 40 + k as u64).unwrap())
            .collect();
        for (k, m) in mats.iter_mut().enumerate() {
            m.scale = WeightScale::PerTensor(0.75 + 0.5 * k as f32);
        }
        let refs: Vec<&TernaryMatrix> = mats.iter().collect();
        let n_out: usize = rows.iter().sum();
        let mut r = SplitMix64(9);
        let x: Vec<f32> = (0..3 * n_in).map(|_| (r.next_f32() - 0.5) * 6.0).collect();
        let x3 = QuantizedInput::new(&x, n_in);
        let x1 = QuantizedInput::new(&x[..n_in], n_in);
        assert_eq!(x1.q[..], x3.q[..n_in]);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let spins: Vec<SpinPool> = [1, 2, 5].into_iter().map(|n| SpinPool::new(n).unwrap()).collect();
        for name in super::super::kernels::available() {
            let lin = Linear::prepare(&KernelPolicy::single(name).unwrap(), &refs).unwrap();
            for threads in [1, 3] {
                let mut one = vec![f32::NAN; n_out];
                let mut gen = vec![f32::NAN; 3 * n_out];
                pool.install(|| {
                    lin.forward(&x1, &mut one, threads);
                    lin.forward(&x3, &mut gen, threads);
                });
                assert_eq!(one[..], gen[..n_out], "{name}, {threads} threads");
                // The spin-pool decode path (1, 2, 5 threads; 5 leaves some
                // threads with fewer rows or none) gives the same bits.
                for sp in &spins {
                    for per in [1, 2, 4] {
                        let mut spun = vec![f32::NAN; n_out];
                        lin.forward_spin_chunks(&x1, &mut spun, sp, per);
                        let t = sp.threads();
                        assert_eq!(bits(&spun), bits(&gen[..n_out]), "{name}, spin {t} per {per}");
                        let mut spun3 = vec![f32::NAN; 3 * n_out];
                        lin.forward_spin_chunks(&x3, &mut spun3, sp, per);
                        assert_eq!(bits(&spun3), bits(&gen), "{name}, spin {t} per {per} 3 tokens");
                    }
                }
                let mut r0 = 0;
                for m in &mats {
                    let f = m.tensor_scale().unwrap() / x1.s[0];
                    for i in 0..m.n_out {
                        let acc: i32 = (0..n_in).map(|c| m.get(i, c) as i32 * x1.q[c] as i32).sum();
                        assert_eq!(one[r0 + i], acc as f32 * f, "{name} row {}", r0 + i);
                    }
                    r0 += m.n_out;
                }
                assert!(one.iter().any(|&v| v != 0.0));
            }
        }
    }

    fn rand_mat(r: &mut SplitMix64, n_out: usize, n_in: usize, scale: f32) -> TernaryMatrix {
        let trits: Vec<i8> = (0..n_out * n_in).map(|_| (r.next_u64() % 3) as i8 - 1).collect();
        TernaryMatrix::from_trits(n_out, n_in, &trits, WeightScale::PerTensor(scale)).unwrap()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// The fused multi-token epilogues give exactly the bits of `forward`
    /// followed by the separate float pass, for every kernel here, token
    /// counts around the 16-token epilogue block, several chunkings, and a
    /// gate/up size that is not a multiple of the row block (fallback path).
    #[test]
    fn forward_multi_is_bit_equal_to_forward_then_op() {
        let mut r = SplitMix64(5);
        for kname in crate::backends::cpu::kernels::available() {
            let kp = KernelPolicy::single(kname).unwrap();
            for (n_in, f, n) in [(96, 48, 37), (64, 32, 2), (160, 80, 130), (64, 40, 17)] {
                let x: Vec<f32> = (0..n * n_in).map(|_| (r.next_f32() - 0.5) * 4.0).collect();
                let xq = QuantizedInput::new(&x, n_in);
                let (g, u) = (rand_mat(&mut r, f, n_in, 0.7), rand_mat(&mut r, f, n_in, 1.3));
                let gu = Linear::prepare(&kp, &[&g, &u]).unwrap();
                let (q, k, v) = (
                    rand_mat(&mut r, 48, n_in, 0.5),
                    rand_mat(&mut r, 16, n_in, 0.9),
                    rand_mat(&mut r, 32, n_in, 1.1),
                );
                let qkv = Linear::prepare(&kp, &[&q, &k, &v]).unwrap();
                for threads in [1, 2, 7] {
                    let mut y = vec![f32::NAN; n * 2 * f];
                    gu.forward(&xq, &mut y, threads);
                    for act in [Activation::Relu2, Activation::Silu] {
                        let mut want = vec![f32::NAN; n * f];
                        for t in 0..n {
                            let (yg, yu) = y[t * 2 * f..(t + 1) * 2 * f].split_at(f);
                            let o = &mut want[t * f..(t + 1) * f];
                            match act {
                                Activation::Relu2 => ops::relu2_mul(yg, yu, o),
                                Activation::Silu => ops::silu_mul(yg, yu, o),
                            }
                        }
                        let mut got = vec![f32::NAN; n * f];
                        gu.forward_multi(&xq, &mut got, Epilogue::Gated(act), threads);
                        assert_eq!(
                            bits(&got),
                            bits(&want),
                            "{kname} gated {act:?} n {n} f {f} thr {threads}"
                        );
                        assert!(want.iter().any(|&v| v != 0.0));
                    }
                    let mut want = vec![f32::NAN; n * 96];
                    qkv.forward(&xq, &mut want, threads);
                    let mut got = vec![f32::NAN; n * 96];
                    qkv.forward_multi(&xq, &mut got, Epilogue::Store, threads);
                    assert_eq!(bits(&got), bits(&want), "{kname} store n {n} thr {threads}");
                    let base: Vec<f32> = (0..n * 96).map(|_| r.next_f32() - 0.5).collect();
                    let mut got = base.clone();
                    qkv.forward_multi(&xq, &mut got, Epilogue::Add, threads);
                    let want: Vec<f32> = base.iter().zip(&want).map(|(b, y)| b + y).collect();
                    assert_eq!(bits(&got), bits(&want), "{kname} add n {n} thr {threads}");
                }
            }
        }
    }

    /// The AMX driver's token-major path (scalar emulation here, real AMX
    /// where granted) through `forward_multi`: the same bits as its
    /// row-major `forward` followed by the separate float pass, for every
    /// epilogue, whole and cut tiles (tokens and rows), both A paths.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn forward_multi_token_major_amx_is_bit_equal() {
        use super::super::kernels::{amx, TernaryKernel};
        let mut r = SplitMix64(31);
        let mut ks: Vec<std::sync::Arc<dyn TernaryKernel>> = vec![amx::emulated()];
        if amx::amx_status() == amx::AmxStatus::Granted {
            ks.push(std::sync::Arc::new(amx::Amx::<0>));
        }
        let fuse = |k: &dyn TernaryKernel, mats: &[&TernaryMatrix]| {
            let n_in = mats[0].n_in;
            let n_out = mats.iter().map(|m| m.n_out).sum();
            let mut packed = Vec::new();
            for m in mats {
                packed.extend_from_slice(&m.packed);
            }
            let fused = TernaryMatrix {
                n_out,
                n_in,
                packed,
                scale: WeightScale::PerTensor(1.0),
            };
            let packed = k.prepare(&fused).unwrap();
            let parts = mats.iter().map(|m| (m.n_out, m.tensor_scale().unwrap())).collect();
            Linear {
                weights: Weights::Packed { packed, parts },
                n_out,
                n_in,
            }
        };
        let pool = SpinPool::new(3).unwrap();
        for k in &ks {
            for (n_in, f, n) in [
                (128, 64, 37),
                (96, 48, 33),
                (64, 32, 2),
                (192, 80, 64),
                (64, 48, 17),
                (64, 32, 100),
            ] {
                let x: Vec<f32> = (0..n * n_in).map(|_| (r.next_f32() - 0.5) * 4.0).collect();
                let xq = QuantizedInput::new(&x, n_in);
                let (g, u) = (rand_mat(&mut r, f, n_in, 0.7), rand_mat(&mut r, f, n_in, 1.3));
                let gu = fuse(k.as_ref(), &[&g, &u]);
                let (q, kk, v) = (
                    rand_mat(&mut r, 48, n_in, 0.5),
                    rand_mat(&mut r, 16, n_in, 0.9),
                    rand_mat(&mut r, 37, n_in, 1.1),
                );
                let qkv = fuse(k.as_ref(), &[&q, &kk, &v]);
                let no = qkv.n_out;
                for (threads, split) in [(1, 1), (3, 1), (3, 2), (2, 3)] {
                    for par in [Par::Rayon, Par::Spin(&pool)] {
                        let mut y = vec![f32::NAN; n * 2 * f];
                        gu.forward(&xq, &mut y, threads);
                        let mut want = vec![f32::NAN; n * f];
                        for t in 0..n {
                            let (yg, yu) = y[t * 2 * f..(t + 1) * 2 * f].split_at(f);
                            ops::relu2_mul(yg, yu, &mut want[t * f..(t + 1) * f]);
                        }
                        let mut got = vec![f32::NAN; n * f];
                        let epi = Epilogue::Gated(Activation::Relu2);
                        gu.forward_multi_split(&xq, &mut got, epi, threads, par, split);
                        assert_eq!(bits(&got), bits(&want), "{} gated n {n} f {f} split {split}", k.name());
                        assert!(want.iter().any(|&v| v != 0.0));
                        let mut want = vec![f32::NAN; n * no];
                        qkv.forward(&xq, &mut want, threads);
                        let mut got = vec![f32::NAN; n * no];
                        qkv.forward_multi_split(&xq, &mut got, Epilogue::Store, threads, par, split);
                        assert_eq!(bits(&got), bits(&want), "{} store n {n} split {split}", k.name());
                        let base: Vec<f32> = (0..n * no).map(|_| r.next_f32() - 0.5).collect();
                        let mut got = base.clone();
                        qkv.forward_multi_split(&xq, &mut got, Epilogue::Add, threads, par, split);
                        let want: Vec<f32> = base.iter().zip(&want).map(|(b, y)| b + y).collect();
                        assert_eq!(bits(&got), bits(&want), "{} add n {n} split {split}", k.name());
                    }
                }
            }
        }
    }

    /// The multi-token version (4 sum-of-squares chains at once, 64-code
    /// stores) against the sequential one token by token: 1..=9 tokens, widths
    /// with and without a 16 / 64 tail, a zero token, NaN, inf, an outlier and
    /// ties; codes and scales poisoned first.
    #[test]
    fn rms_quantize_tokens_is_bit_equal_to_scalar() {
        let mut r = SplitMix64(23);
        for d in [16, 77, 130, 2560, 2563, 6912] {
            let w: Vec<f32> = (0..d).map(|_| 0.25 + r.next_f32() * 2.0).collect();
            for n in [1, 3, 4, 5, 9] {
                let mut x: Vec<f32> = (0..n * d).map(|_| (r.next_f32() - 0.5) * 6.0).collect();
                if n >= 3 {
                    x[d..2 * d].iter_mut().for_each(|v| *v = 0.0);
                    x[2 * d + d / 2] = f32::NAN;
                }
                if n >= 5 {
                    x[3 * d + 1] = 300.0;
                    x[4 * d + d - 1] = f32::INFINITY;
                    x[..d].iter_mut().for_each(|v| *v = (*v * 4.0).round() * 0.5);
                }
                let (mut q, mut s) = (vec![99i8; n * d], vec![f32::NAN; n]);
                rms_quantize_tokens(&x, &w, 1e-5, &mut q, &mut s);
                for t in 0..n {
                    let mut qt = vec![-99i8; d];
                    let st = rms_quantize_scalar(&x[t * d..(t + 1) * d], &w, 1e-5, &mut qt);
                    assert_eq!(s[t].to_bits(), st.to_bits(), "d {d} n {n} token {t}");
                    assert_eq!(q[t * d..(t + 1) * d], qt[..], "d {d} n {n} token {t}");
                }
            }
        }
    }

    /// One `QuantizedInput` refilled with other widths and token counts (as
    /// the forward does) equals a fresh one each time: nothing stale survives.
    #[test]
    fn refilled_input_equals_fresh() {
        let mut r = SplitMix64(29);
        let mut buf = QuantizedInput::default();
        for (n, d, norm) in [
            (37, 96, true),
            (5, 200, false),
            (1, 64, true),
            (20, 150, true),
            (9, 96, false),
        ] {
            let x: Vec<f32> = (0..n * d).map(|_| (r.next_f32() - 0.5) * 5.0).collect();
            let w: Vec<f32> = (0..d).map(|_| 0.5 + r.next_f32()).collect();
            let fresh = if norm {
                buf.refill_rms_norm(&x, &w, 1e-5);
                let mut want = QuantizedInput {
                    q: Codes::zeroed(n * d),
                    s: vec![0.0; n],
                    n_in: d,
                };
                for t in 0..n {
                    let (xt, qt) = (&x[t * d..(t + 1) * d], &mut want.q[t * d..(t + 1) * d]);
                    want.s[t] = rms_quantize_scalar(xt, &w, 1e-5, qt);
                }
                want
            } else {
                buf.refill(&x, d);
                QuantizedInput::new(&x, d)
            };
            assert_eq!((buf.n_in, buf.n_tokens()), (d, n));
            assert_eq!(buf.q, fresh.q, "n {n} d {d}");
            assert_eq!(bits(&buf.s), bits(&fresh.s), "n {n} d {d}");
            assert!(buf.q.iter().any(|&v| v != 0));
        }
    }

    /// Fast rms_quantize (AVX-512 build where detected, lanes otherwise)
    /// against the sequential one: same codes and scale bits, odd lengths,
    /// ties at .5 after scaling, a zero token, an outlier, NaN and inf.
    #[test]
    fn rms_quantize_fast_is_bit_equal_to_scalar() {
        let mut r = SplitMix64(17);
        for d in [1, 15, 16, 77, 2560, 2563, 6912] {
            let w: Vec<f32> = (0..d).map(|_| 0.25 + r.next_f32() * 2.0).collect();
            for case in 0..6 {
                let mut x: Vec<f32> = (0..d).map(|_| (r.next_f32() - 0.5) * 6.0).collect();
                match case {
                    1 => x.iter_mut().for_each(|v| *v = 0.0),
                    2 => x[d / 2] = 300.0,
                    3 => x.iter_mut().for_each(|v| *v = (*v * 4.0).round() * 0.5),
                    4 => x[d - 1] = f32::NAN,
                    5 => x[0] = f32::INFINITY,
                    _ => {}
                }
                let (mut qa, mut qb) = (vec![99i8; d], vec![-99i8; d]);
                let sa = rms_quantize(&x, &w, 1e-5, &mut qa);
                let sb = rms_quantize_scalar(&x, &w, 1e-5, &mut qb);
                assert_eq!(sa.to_bits(), sb.to_bits(), "d {d} case {case}");
                assert_eq!(qa, qb, "d {d} case {case}");
            }
        }
    }
}
