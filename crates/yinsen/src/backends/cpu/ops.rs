//! Float operations of the CPU forward pass, one token (row) at a time.
//! Written so LLVM vectorises them (fixed-width independent accumulators).

/// Dot product with 16 independent lanes so it vectorises without
/// `-ffast-math`-style reassociation.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..16 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `y += a * x`
#[inline]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// RMSNorm as transformers computes it in f32:
/// `x * rsqrt(mean(x^2) + eps) * w`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ss = dot(x, x) / x.len() as f32;
    let r = 1.0 / (ss + eps).sqrt();
    for ((o, &xi), &wi) in out.iter_mut().zip(x).zip(w) {
        *o = xi * r * wi;
    }
}

/// NEOX ("rotate half") RoPE on one head vector at position `pos`, using a
/// precomputed table of inverse frequencies `inv_freq[i] = base^(-2i/d)`.
pub fn rope_neox(x: &mut [f32], pos: usize, inv_freq: &[f32]) {
    let half = x.len() / 2;
    for i in 0..half {
        let ang = pos as f32 * inv_freq[i];
        let (s, c) = ang.sin_cos();
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * c - b * s;
        x[i + half] = a * s + b * c;
    }
}

/// `(sin, cos)` of every rotation angle for positions `p0..p0 + n`,
/// `[n][head_dim / 2]`: computed once per call and shared by all layers
/// and heads (the per-element `sin_cos` dominated prefill otherwise).
pub fn rope_table(p0: usize, n: usize, inv_freq: &[f32]) -> Vec<(f32, f32)> {
    rope_table_at(p0..p0 + n, inv_freq)
}

/// The `(sin, cos)` rows of the given positions, in order.
pub fn rope_table_at(positions: impl IntoIterator<Item = usize>, inv_freq: &[f32]) -> Vec<(f32, f32)> {
    positions
        .into_iter()
        .flat_map(|pos| inv_freq.iter().map(move |&f| (pos as f32 * f).sin_cos()))
        .collect()
}

/// NEOX RoPE with a precomputed `(sin, cos)` row for the token's position.
pub fn rope_neox_table(x: &mut [f32], sc: &[(f32, f32)]) {
    let half = x.len() / 2;
    for (i, &(s, c)) in sc.iter().enumerate().take(half) {
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * c - b * s;
        x[i + half] = a * s + b * c;
    }
}

/// Inverse RoPE frequencies as transformers builds them (f32).
pub fn rope_inv_freq(head_dim: usize, theta: f32) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
        .collect()
}

/// relu(g)^2 * u of one element (shared by the fused epilogue, so both
/// paths round identically).
#[inline(always)]
pub fn relu2_one(g: f32, u: f32) -> f32 {
    let r = g.max(0.0);
    r * r * u
}

/// silu(g) * u of one element.
#[inline(always)]
pub fn silu_one(g: f32, u: f32) -> f32 {
    g / (1.0 + (-g).exp()) * u
}

/// relu(g)^2 * u
pub fn relu2_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
    for ((o, &gi), &ui) in out.iter_mut().zip(g).zip(u) {
        *o = relu2_one(gi, ui);
    }
}

/// silu(g) * u
pub fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
    for ((o, &gi), &ui) in out.iter_mut().zip(g).zip(u) {
        *o = silu_one(gi, ui);
    }
}

/// In-place softmax.
pub fn softmax(x: &mut [f32]) {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_naive_on_odd_length() {
        let a: Vec<f32> = (0..37).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..37).map(|i| 1.0 - i as f32 * 0.25).collect();
        let naive: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        assert!((dot(&a, &b) as f64 - naive).abs() < 1e-3);
    }

    #[test]
    fn rope_rotates_pairs_of_halves() {
        let inv = rope_inv_freq(4, 10000.0);
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        rope_neox(&mut x, 0, &inv);
        assert_eq!(x, vec![1.0, 2.0, 3.0, 4.0]);
        rope_neox(&mut x, 1, &inv);
        // pair (0,2) rotated by 1 rad, pair (1,3) by 0.01 rad
        assert!((x[0] - (1.0 * 1f32.cos() - 3.0 * 1f32.sin())).abs() < 1e-6);
        assert!((x[2] - (1.0 * 1f32.sin() + 3.0 * 1f32.cos())).abs() < 1e-6);
        assert!((x[1] - (2.0 * 0.01f32.cos() - 4.0 * 0.01f32.sin())).abs() < 1e-6);
    }

    #[test]
    fn rope_table_equals_direct() {
        let inv = rope_inv_freq(8, 500000.0);
        let t = rope_table(3, 2, &inv);
        for (k, pos) in [3usize, 4].iter().enumerate() {
            let mut a: Vec<f32> = (0..8).map(|i| i as f32 - 3.5).collect();
            let mut b = a.clone();
            rope_neox(&mut a, *pos, &inv);
            rope_neox_table(&mut b, &t[k * 4..(k + 1) * 4]);
            assert_eq!(a, b);
        }
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut x = vec![1.0, 2.0, 3.0, -1.0];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(x[2] > x[1] && x[1] > x[0] && x[0] > x[3]);
    }
}
