//! Scalar reference: the oracle every other kernel and backend is tested
//! against. Plain loops over the canonical layout, no tricks.

use crate::model::TernaryMatrix;

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

/// Round half to even with plain f32 adds (which round to nearest-even),
/// so the loop vectorises instead of calling `rintf`. Exact for |v| < 2^22;
/// larger magnitudes saturate at ±2^22 (callers clamp to int8 anyway). No
/// branch: LLVM would otherwise speculate the `round_ties_even` fallback
/// and call `rintf` for every element.
#[inline]
pub fn round_half_even_small(v: f32) -> f32 {
    const MAGIC: f32 = 12582912.0; // 1.5 * 2^23
    let v = v.clamp(-4194304.0, 4194304.0);
    (v + MAGIC) - MAGIC
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
        assert_eq!(round_half_even_small(1e9), 4194304.0);
        assert_eq!(round_half_even_small(-1e9), -4194304.0);
        assert_eq!(round_half_even_small(-2.5), -2.0);
        assert_eq!(round_half_even_small(3.5), 4.0);
    }
}
