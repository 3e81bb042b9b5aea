//! BitLinear on the CPU: per-token int8 activations times prepared ternary
//! weights, exact int32 accumulation, then the two float scales.
//! Several projections that share one input (q/k/v, gate/up) are fused into
//! one matrix so one pass over the rows serves them all.

use std::sync::Arc;

use rayon::prelude::*;

use super::kernels::policy::KernelPolicy;
use super::kernels::PackedTernary;
use super::reference;
use crate::error::Result;
use crate::model::{TernaryMatrix, WeightScale};

/// Per-token int8 activations of a BitLinear input, `[n_tokens][n_in]`.
pub struct QuantizedInput {
    pub q: Vec<i8>,
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
        Self::per_token(x, w.len(), |xt, qt| rms_quantize(xt, w, eps, qt))
    }

    /// Run `quantize(token, codes) -> scale` over every token in parallel.
    fn per_token(x: &[f32], n_in: usize, quantize: impl Fn(&[f32], &mut [i8]) -> f32 + Sync) -> Self {
        let n = x.len() / n_in;
        let mut q = vec![0i8; x.len()];
        let mut s = vec![0f32; n];
        if n == 1 {
            // Decode: a fork-join would cost more than quantising one token.
            s[0] = quantize(x, &mut q);
            return Self { q, s, n_in };
        }
        q.par_chunks_mut(n_in)
            .zip(s.par_iter_mut())
            .enumerate()
            .with_min_len(8)
            .for_each(|(t, (qt, st))| *st = quantize(&x[t * n_in..(t + 1) * n_in], qt));
        Self { q, s, n_in }
    }

    pub fn n_tokens(&self) -> usize {
        self.s.len()
    }
}

/// One token: `y = x * r * w` (as `ops::rms_norm`), then BitNet int8
/// quantisation of `y`, recomputing `y` instead of storing it.
pub fn rms_quantize(x: &[f32], w: &[f32], eps: f32, q: &mut [i8]) -> f32 {
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
        let s = x.s[0];
        out.par_chunks_mut(rows).enumerate().for_each(|(ci, o)| {
            let (r0, r1) = (ci * rows, ci * rows + o.len());
            let mut acc = vec![0i32; o.len()];
            packed.gemm(&x.q, 1, r0, r1, &mut acc);
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
        true
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
}
