//! Attention of one new token (decode) over the f32 KV cache, per query head,
//! with the same float operations in the same order as the scalar reference
//! [`simple_head`]: its outputs are bit-identical, whichever kernel runs.
//!
//! Why a kernel of its own: the reference's dot and axpy loops compile to
//! 128-bit SSE without FMA in the portable build, and each head reads its
//! K / V rows on its own. On the 2B4T shape that was ~25 us a layer at 64
//! keys and ~250 us at 512 (2 threads here), several percent of a decode
//! step by 100 keys and the larger part of it past ~1000.
//!
//! The AVX-512 kernel keeps the reference's arithmetic:
//! - a score is `ops::dot` (16 lane accumulators, `acc[k] += q[k] * k[k]`
//!   over the 16-wide chunks in order, mul then add, then the lanes summed
//!   from lane 0 to 15) times the scale: 16 keys' accumulators at once, then
//!   one 16x16 transpose and 15 vector adds sum each key's lanes in that
//!   same order;
//! - the softmax is `ops::softmax` itself (scalar, libm's `exp`);
//! - `o += w_p v_p` is `ops::axpy` (mul then add per element), keys in
//!   order, two heads of a group per pass over V.
//!
//! The heads of one KV head are done together, so its K rows are read from
//! L1 by each of them in turn (16 keys at a time) instead of from memory.

use super::attention::{simple_head, AttnShape};

/// Query heads `h0..h0 + out.len() / head_dim` of one new token at position
/// `p0` (the cache holds `p0 + 1` rows, the token's own last) into `out`
/// (`[head][head_dim]`, fully overwritten). `q`: the token's
/// `[n_heads * head_dim]`; `kc` / `vc`: `[p0 + 1][n_kv_heads * head_dim]`.
pub fn decode_heads(s: &AttnShape, q: &[f32], kc: &[f32], vc: &[f32], p0: usize, h0: usize, out: &mut [f32]) {
    let hd = s.head_dim;
    assert!(out.len().is_multiple_of(hd), "decode attention: output not whole heads");
    let h1 = h0 + out.len() / hd;
    let kvd = s.n_kv_heads * hd;
    assert!(
        h1 <= s.n_heads && q.len() >= s.n_heads * hd,
        "decode attention: heads out of range"
    );
    assert!(
        kc.len() >= (p0 + 1) * kvd && vc.len() >= (p0 + 1) * kvd,
        "decode attention: cache too short"
    );
    #[cfg(target_arch = "x86_64")]
    if x86::usable(hd) {
        // SAFETY: avx512f detected by `usable`; the shapes are checked above.
        unsafe { x86::heads(s, q, kc, vc, p0 + 1, h0, h1, out) };
        return;
    }
    decode_heads_reference(s, q, kc, vc, p0, h0, out);
}

/// [`decode_heads`] by the scalar reference, head by head.
pub fn decode_heads_reference(s: &AttnShape, q: &[f32], kc: &[f32], vc: &[f32], p0: usize, h0: usize, out: &mut [f32]) {
    for (k, o) in out.chunks_exact_mut(s.head_dim).enumerate() {
        simple_head(s, q, kc, vc, p0, h0 + k, o);
    }
}

/// Whether [`decode_heads`] runs the AVX-512 kernel for `head_dim` here.
pub fn decode_simd(head_dim: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        x86::usable(head_dim)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = head_dim;
        false
    }
}

#[cfg(target_arch = "x86_64")]
// Parallel arrays of vectors indexed together read plainer as index loops.
#[allow(clippy::needless_range_loop)]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::attention::{x86::transpose16, AttnShape};
    use super::super::ops;

    pub fn usable(hd: usize) -> bool {
        hd.is_multiple_of(16) && hd > 0 && is_x86_feature_detected!("avx512f")
    }

    /// Heads `h0..h1` over `len` cached keys into `out`, a run of heads of
    /// one KV head at a time.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn heads(
        s: &AttnShape,
        q: &[f32],
        kc: &[f32],
        vc: &[f32],
        len: usize,
        h0: usize,
        h1: usize,
        out: &mut [f32],
    ) {
        let (hd, kvd) = (s.head_dim, s.n_kv_heads * s.head_dim);
        let group = s.n_heads / s.n_kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let lp = len.next_multiple_of(16);
        let mut scores = vec![0f32; group.min(h1 - h0) * lp];
        let mut a = h0;
        while a < h1 {
            let kvh = a / group;
            let b = h1.min((kvh + 1) * group);
            let (k, v) = (kc.as_ptr().add(kvh * hd), vc.as_ptr().add(kvh * hd));
            for (j, h) in (a..b).enumerate() {
                let sj = &mut scores[j * lp..j * lp + len];
                scores_of(q.as_ptr().add(h * hd), k, kvd, hd, len, scale, sj.as_mut_ptr());
                ops::softmax(sj);
            }
            let o = out.as_mut_ptr().add((a - h0) * hd);
            let mut j = 0;
            while j < b - a {
                let pair = j + 1 < b - a;
                let w1 = if pair {
                    scores.as_ptr().add((j + 1) * lp)
                } else {
                    std::ptr::null()
                };
                let wv = WeightedValues {
                    w0: scores.as_ptr().add(j * lp),
                    w1,
                    v,
                    kvd,
                    hd,
                    len,
                    o: o.add(j * hd),
                };
                wv.run();
                j += 2;
            }
            a = b;
        }
    }

    /// `st[p] = dot(q, k_p) * scale` for keys `0..len` (`k_p` at `k + p kvd`),
    /// as `ops::dot` sums: 16 keys at a time (a short last block repeats
    /// its last key in the unused lanes, which are not stored).
    #[target_feature(enable = "avx512f")]
    unsafe fn scores_of(q: *const f32, k: *const f32, kvd: usize, hd: usize, len: usize, scale: f32, st: *mut f32) {
        let sc = _mm512_set1_ps(scale);
        for p0 in (0..len).step_by(16) {
            let nk = (len - p0).min(16);
            let rows: [*const f32; 16] = std::array::from_fn(|i| k.add((p0 + i.min(nk - 1)) * kvd));
            let mut acc = [_mm512_setzero_ps(); 16];
            for c in (0..hd).step_by(16) {
                let qc = _mm512_loadu_ps(q.add(c));
                for i in 0..16 {
                    acc[i] = _mm512_add_ps(acc[i], _mm512_mul_ps(qc, _mm512_loadu_ps(rows[i].add(c))));
                }
            }
            // r[i] lane j = key j's lane i: summing r[0], r[1], .. in order
            // adds each key's lanes from 0 to 15, as `ops::dot` does.
            transpose16(&mut acc);
            let mut sum = acc[0];
            for r in &acc[1..] {
                sum = _mm512_add_ps(sum, *r);
            }
            let m: __mmask16 = if nk == 16 { 0xffff } else { (1u16 << nk) - 1 };
            _mm512_mask_storeu_ps(st.add(p0), m, _mm512_mul_ps(sum, sc));
        }
    }

    /// `o0 = sum_p w0[p] v_p` (and `o1 = sum_p w1[p] v_p` at `o + hd` when
    /// `w1` is not null), `ops::axpy` per key in order from zero: mul then
    /// add per element. `v_p` at `v + p kvd`, keys `0..len`.
    struct WeightedValues {
        w0: *const f32,
        w1: *const f32,
        v: *const f32,
        kvd: usize,
        hd: usize,
        len: usize,
        o: *mut f32,
    }

    impl WeightedValues {
        /// 128 dims of each head's output at a time (the accumulators stay in
        /// registers).
        #[target_feature(enable = "avx512f")]
        unsafe fn run(&self) {
            for d0 in (0..self.hd).step_by(128) {
                match (self.hd - d0) / 16 {
                    1 => self.block::<1>(d0),
                    2 => self.block::<2>(d0),
                    3 => self.block::<3>(d0),
                    4 => self.block::<4>(d0),
                    5 => self.block::<5>(d0),
                    6 => self.block::<6>(d0),
                    7 => self.block::<7>(d0),
                    _ => self.block::<8>(d0),
                }
            }
        }

        /// Dims `d0..d0 + 16 NV`.
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn block<const NV: usize>(&self, d0: usize) {
            let Self {
                w0, w1, kvd, hd, len, ..
            } = *self;
            let (v, o) = (self.v.add(d0), self.o.add(d0));
            let mut a0 = [_mm512_setzero_ps(); NV];
            let mut a1 = [_mm512_setzero_ps(); NV];
            if w1.is_null() {
                for p in 0..len {
                    let (vr, b0) = (v.add(p * kvd), _mm512_set1_ps(*w0.add(p)));
                    for i in 0..NV {
                        a0[i] = _mm512_add_ps(a0[i], _mm512_mul_ps(b0, _mm512_loadu_ps(vr.add(16 * i))));
                    }
                }
            } else {
                for p in 0..len {
                    let vr = v.add(p * kvd);
                    let (b0, b1) = (_mm512_set1_ps(*w0.add(p)), _mm512_set1_ps(*w1.add(p)));
                    for i in 0..NV {
                        let x = _mm512_loadu_ps(vr.add(16 * i));
                        a0[i] = _mm512_add_ps(a0[i], _mm512_mul_ps(b0, x));
                        a1[i] = _mm512_add_ps(a1[i], _mm512_mul_ps(b1, x));
                    }
                }
            }
            for i in 0..NV {
                _mm512_storeu_ps(o.add(16 * i), a0[i]);
                if !w1.is_null() {
                    _mm512_storeu_ps(o.add(hd + 16 * i), a1[i]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::synthetic::SplitMix64;

    /// Every head range of every shape gives the reference's bits, over key
    /// counts that reach each remainder of the 16-key blocks. Outputs start
    /// as NaN, so a head the kernel skips fails.
    #[test]
    fn decode_heads_match_the_reference_bit_for_bit() {
        let mut r = SplitMix64(11);
        let mut checked_simd = false;
        for (nh, nkv, hd) in [(20, 5, 128), (4, 2, 64), (6, 3, 16), (8, 1, 32), (3, 3, 8), (4, 4, 144)] {
            let s = AttnShape {
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: hd,
            };
            checked_simd |= decode_simd(hd);
            for p0 in [0, 1, 14, 15, 16, 17, 40, 300] {
                let tot = p0 + 1;
                let mut rnd = |k: usize, a: f32| (0..k).map(|_| (r.next_f32() * 2.0 - 1.0) * a).collect::<Vec<f32>>();
                let q = rnd(nh * hd, 3.0);
                let kc = rnd(tot * nkv * hd, 1.0);
                let vc = rnd(tot * nkv * hd, 1.0);
                let mut want = vec![f32::NAN; nh * hd];
                decode_heads_reference(&s, &q, &kc, &vc, p0, 0, &mut want);
                assert!(want.iter().all(|v| v.is_finite()));
                // Whole, then ranges that start and end inside a group.
                for (a, b) in [(0, nh), (1, nh), (0, nh - 1), (nh / 2, nh), (nh - 1, nh)] {
                    if a >= b {
                        continue;
                    }
                    let mut got = vec![f32::NAN; (b - a) * hd];
                    decode_heads(&s, &q, &kc, &vc, p0, a, &mut got);
                    let same = got
                        .iter()
                        .zip(&want[a * hd..b * hd])
                        .all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(
                        same,
                        "heads {nh}/{nkv} hd {hd} p0 {p0} range {a}..{b}: not the reference's bits"
                    );
                }
            }
        }
        if !checked_simd {
            println!("SKIP (bit-equality of the AVX-512 decode attention): no avx512f on this CPU; the reference ran");
        }
    }

    /// The check above can tell summation orders apart: on such inputs a
    /// dot whose lanes are summed pairwise (another valid order) differs in
    /// its last bits from `ops::dot`'s for most vectors.
    #[test]
    fn bit_equality_tells_summation_orders_apart() {
        let mut r = SplitMix64(5);
        let mut differ = 0;
        for _ in 0..64 {
            let a: Vec<f32> = (0..128).map(|_| r.next_f32() * 2.0 - 1.0).collect();
            let b: Vec<f32> = (0..128).map(|_| r.next_f32() * 2.0 - 1.0).collect();
            let mut lanes = [0f32; 16];
            for (x, y) in a.chunks_exact(16).zip(b.chunks_exact(16)) {
                for k in 0..16 {
                    lanes[k] += x[k] * y[k];
                }
            }
            let mut w = 16;
            while w > 1 {
                w /= 2;
                for k in 0..w {
                    lanes[k] += lanes[k + w];
                }
            }
            differ += usize::from(lanes[0].to_bits() != crate::backends::cpu::ops::dot(&a, &b).to_bits());
        }
        assert!(
            differ > 8,
            "pairwise and sequential lane sums differed on only {differ} of 64 dots"
        );
    }
}
