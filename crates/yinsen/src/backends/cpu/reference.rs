//! Scalar reference: the oracle every other kernel and backend is tested
//! against. Plain loops over the canonical layout, no tricks.

use crate::model::{TernaryMatrix, WeightScale};

/// Exact `out[t * n_out + o] = sum_i W[o, i] * x[t * n_in + i]` (token-major).
pub fn ternary_matmul_i32(w: &TernaryMatrix, x: &[i8], n_tokens: usize) -> Vec<i32> {
    assert_eq!(x.len(), n_tokens * w.n_in);
    let mut out = vec![0i32; n_tokens * w.n_out];
    for t in 0..n_tokens {
        let xt = &x[t * w.n_in..(t + 1) * w.n_in];
        for o in 0..w.n_out {
            out[t * w.n_out + o] = (0..w.n_in).map(|i| w.get(o, i) as i32 * xt[i] as i32).sum();
        }
    }
    out
}

/// BitNet activation quantisation of one token, as transformers trains it:
/// `s = 127 / max(max|x|, 1e-5)`, `q = clamp(round_half_even(x * s), -128, 127)`.
/// Returns `s`.
pub fn quantize_token(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let s = 127.0 / amax.max(1e-5);
    for (qi, &v) in q.iter_mut().zip(x) {
        *qi = (v * s).round_ties_even().clamp(-128.0, 127.0) as i8;
    }
    s
}

/// Float result of a BitLinear for one token given its exact integer dot
/// products: `y = acc * w_scale / s` (per-tensor) or the per-block sum.
pub fn bitlinear_reference(w: &TernaryMatrix, x: &[f32]) -> Vec<f32> {
    let mut q = vec![0i8; w.n_in];
    let s = quantize_token(x, &mut q);
    match &w.scale {
        WeightScale::PerTensor(ws) => ternary_matmul_i32(w, &q, 1)
            .into_iter()
            .map(|a| a as f32 * (ws / s))
            .collect(),
        WeightScale::PerBlock { block, scales } => {
            let bpr = w.n_in.div_ceil(*block);
            (0..w.n_out)
                .map(|o| {
                    (0..bpr)
                        .map(|b| {
                            let acc: i32 = (b * block..((b + 1) * block).min(w.n_in))
                                .map(|i| w.get(o, i) as i32 * q[i] as i32)
                                .sum();
                            acc as f32 * scales[o * bpr + b]
                        })
                        .sum::<f32>()
                        / s
                })
                .collect()
        }
    }
}
