//! Causal GQA attention on the CPU.
//!
//! Prefill uses a tiled, flash-style loop: a task takes one KV head and a
//! block of query tokens (all query heads of that group), walks the keys in
//! blocks with an online softmax, and so reads each K/V block once per
//! query block instead of once per query — long prompts stay in cache.

use rayon::prelude::*;

use super::ops;

/// Shapes for one attention call.
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

const Q_BLOCK: usize = 16;
const K_BLOCK: usize = 64;

/// `q`: `[n][n_heads * hd]` (token t at position p0 + t); `kc`/`vc`:
/// `[p0 + n][n_kv_heads * hd]`. Returns `[n][n_heads * hd]`.
pub fn causal_attention(s: &AttnShape, q: &[f32], kc: &[f32], vc: &[f32], p0: usize, n: usize) -> Vec<f32> {
    let (hd, qd, kvd) = (s.head_dim, s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim);
    let group = s.n_heads / s.n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let n_qb = n.div_ceil(Q_BLOCK);
    // One task per (kv head, query block); each returns its output tile.
    let tiles: Vec<(usize, usize, Vec<f32>)> = (0..s.n_kv_heads * n_qb)
        .into_par_iter()
        .map(|task| {
            let (kvh, qb) = (task / n_qb, task % n_qb);
            let (t0, t1) = (qb * Q_BLOCK, ((qb + 1) * Q_BLOCK).min(n));
            let rows = (t1 - t0) * group; // query vectors in this tile
            let mut acc = vec![0f32; rows * hd];
            let mut m = vec![f32::NEG_INFINITY; rows];
            let mut l = vec![0f32; rows];
            let mut sc = vec![0f32; K_BLOCK];
            let kend = p0 + t1; // keys any query of the tile may see
            let mut k0 = 0;
            while k0 < kend {
                let k1 = (k0 + K_BLOCK).min(kend);
                for t in t0..t1 {
                    let visible = (p0 + t + 1).min(k1);
                    if visible <= k0 {
                        continue;
                    }
                    for g in 0..group {
                        let h = kvh * group + g;
                        let qv = &q[t * qd + h * hd..t * qd + (h + 1) * hd];
                        let r = (t - t0) * group + g;
                        let cnt = visible - k0;
                        let mut bm = f32::NEG_INFINITY;
                        for (j, p) in (k0..visible).enumerate() {
                            let v = ops::dot(qv, &kc[p * kvd + kvh * hd..p * kvd + (kvh + 1) * hd]) * scale;
                            sc[j] = v;
                            bm = bm.max(v);
                        }
                        let new_m = m[r].max(bm);
                        let corr = (m[r] - new_m).exp();
                        let a = &mut acc[r * hd..(r + 1) * hd];
                        if corr != 1.0 {
                            a.iter_mut().for_each(|x| *x *= corr);
                        }
                        let mut sum = 0.0;
                        for (j, p) in (k0..visible).enumerate() {
                            let w = (sc[j] - new_m).exp();
                            sum += w;
                            ops::axpy(a, w, &vc[p * kvd + kvh * hd..p * kvd + (kvh + 1) * hd]);
                        }
                        debug_assert!(cnt > 0);
                        l[r] = l[r] * corr + sum;
                        m[r] = new_m;
                    }
                }
                k0 = k1;
            }
            for r in 0..rows {
                let inv = 1.0 / l[r];
                acc[r * hd..(r + 1) * hd].iter_mut().for_each(|x| *x *= inv);
            }
            (kvh, t0, acc)
        })
        .collect();
    let mut out = vec![0f32; n * qd];
    for (kvh, t0, acc) in tiles {
        for (r, a) in acc.chunks_exact(hd).enumerate() {
            let (t, g) = (t0 + r / group, r % group);
            let h = kvh * group + g;
            out[t * qd + h * hd..t * qd + (h + 1) * hd].copy_from_slice(a);
        }
    }
    out
}

/// Plain per-(token, head) attention: the readable reference the tiled loop
/// is tested against, and the decode path (one query, nothing to tile).
pub fn causal_attention_simple(s: &AttnShape, q: &[f32], kc: &[f32], vc: &[f32], p0: usize, n: usize) -> Vec<f32> {
    let (hd, qd, kvd) = (s.head_dim, s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim);
    let group = s.n_heads / s.n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0f32; n * qd];
    out.par_chunks_mut(hd).enumerate().for_each(|(i, o)| {
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
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::synthetic::SplitMix64;

    #[test]
    fn tiled_matches_simple() {
        let s = AttnShape {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
        };
        let mut r = SplitMix64(3);
        for (p0, n) in [(0, 1), (0, 37), (5, 20), (70, 3), (0, 150)] {
            let tot = p0 + n;
            let mut rnd = |k: usize| (0..k).map(|_| r.next_f32() * 2.0 - 1.0).collect::<Vec<f32>>();
            let q = rnd(n * 32);
            let kc = rnd(tot * 16);
            let vc = rnd(tot * 16);
            let a = causal_attention(&s, &q, &kc, &vc, p0, n);
            let b = causal_attention_simple(&s, &q, &kc, &vc, p0, n);
            let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
            assert!(d < 1e-5, "p0 {p0} n {n}: {d}");
        }
    }
}
