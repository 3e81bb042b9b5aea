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
        *qi = round_half_even_small(v * s).clamp(-128.0, 127.0) as i8;
    }
    s
}

/// Round half to even for |v| < 2^22 with plain f32 adds (which round to
/// nearest-even), so the loop vectorises instead of calling `rintf`.
/// Larger magnitudes (never produced by `x * s`, which is within ±127) fall
/// back to `round_ties_even`.
#[inline]
pub fn round_half_even_small(v: f32) -> f32 {
    const MAGIC: f32 = 12582912.0; // 1.5 * 2^23
    if v.abs() < 4194304.0 {
        (v + MAGIC) - MAGIC
    } else {
        v.round_ties_even()
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_rounding_equals_round_ties_even() {
        let mut v = -300.0f32;
        while v < 300.0 {
            for x in [v, v + 0.5, v - 0.5, v + 0.49999997, f32::from_bits(v.to_bits() + 1)] {
                assert_eq!(round_half_even_small(x), x.round_ties_even(), "{x}");
            }
            v += 0.25;
        }
        assert_eq!(round_half_even_small(1e9), 1e9);
        assert_eq!(round_half_even_small(-2.5), -2.0);
        assert_eq!(round_half_even_small(3.5), 4.0);
    }
}
