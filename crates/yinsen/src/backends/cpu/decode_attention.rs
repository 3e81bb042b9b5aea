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
//! The AVX-512 and AVX2 kernels keep the reference's arithmetic:
//! - a score is `ops::dot` (16 lane accumulators, `acc[k] += q[k] * k[k]`
//!   over the 16-wide chunks in order, mul then add, then the lanes summed
//!   from lane 0 to 15) times the scale: AVX-512 takes 16 keys'
//!   accumulators at once, then one 16x16 transpose and 15 vector adds sum
//!   each key's lanes in that same order; AVX2 takes 8 keys, the chunks'
//!   low halves (lanes 0-7) and then their high halves, each transposed 8x8
//!   and added onto one running sum;
//! - the softmax is `ops::softmax` itself (scalar, libm's `exp`);
//! - `o += w_p v_p` is `ops::axpy` (mul then add per element), keys in
//!   order (AVX-512: two heads of a group per pass over V).
//!
//! The heads of one KV head are done together, so its K rows are read from
//! L1 by each of them in turn (32 keys at a time) instead of from memory.

use super::attention::{simple_head, AttnInput, Isa};

/// Query heads `h0..h0 + out.len() / head_dim` of one new token into `out`
/// (`[head][head_dim]`, fully overwritten): `input.q` is the token's
/// `[n_heads * head_dim]` at position `input.p0`, the caches hold `p0 + 1`
/// rows (the token's own last). Runs the fastest kernel usable here
/// ([`decode_kernels`]).
pub fn decode_heads(input: AttnInput, h0: usize, out: &mut [f32]) {
    decode_heads_with(decode_kernels(input.shape.head_dim)[0], input, h0, out);
}

/// The kernels [`decode_heads_with`] can run here for `head_dim`, fastest
/// first; the scalar reference always (last). The SIMD kernels take head
/// dims that are multiples of 16 (the reference's dot sums 16-wide chunks).
pub fn decode_kernels(head_dim: usize) -> Vec<Isa> {
    let mut v = Vec::new();
    #[cfg(target_arch = "x86_64")]
    if head_dim.is_multiple_of(16) && head_dim > 0 {
        if is_x86_feature_detected!("avx512f") {
            v.push(Isa::Avx512);
        }
        if is_x86_feature_detected!("avx2") {
            v.push(Isa::Avx2);
        }
    }
    let _ = head_dim;
    v.push(Isa::Scalar);
    v
}

/// [`decode_heads`] by kernel `isa` (one of [`decode_kernels`]; panics on
/// another). Every kernel gives the same bits.
pub fn decode_heads_with(isa: Isa, input: AttnInput, h0: usize, out: &mut [f32]) {
    let (s, q, kc, vc, p0) = input.parts();
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
    assert!(
        decode_kernels(hd).contains(&isa),
        "decode attention: {isa:?} cannot run here"
    );
    // SAFETY (both kernels): the CPU features were detected by
    // `decode_kernels`; the shapes are checked above.
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::heads::<x86::Avx512>(s, q, kc, vc, p0 + 1, h0, h1, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::heads::<x86::Avx2>(s, q, kc, vc, p0 + 1, h0, h1, out) },
        _ => decode_heads_reference(input, h0, out),
    }
}

/// [`decode_heads`] by the scalar reference, head by head.
pub fn decode_heads_reference(input: AttnInput, h0: usize, out: &mut [f32]) {
    let (s, q, kc, vc, p0) = input.parts();
    for (k, o) in out.chunks_exact_mut(s.head_dim).enumerate() {
        simple_head(s, q, kc, vc, p0, h0 + k, o);
    }
}

#[cfg(target_arch = "x86_64")]
// Parallel arrays of vectors indexed together read plainer as index loops.
#[allow(clippy::needless_range_loop)]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::attention::{x86::transpose16, AttnShape};
    use super::super::ops;

    /// Keys per block of the scores pass (a multiple of both kernels' 16 and
    /// 8 keys, so only the last block is short).
    const KEY_BLOCK: usize = 32;

    /// One instruction set's two passes; [`heads`] runs them per head.
    pub trait Kernel {
        /// `st[p] = dot(q, k_p) * scale` for keys `0..len` (`k_p` at
        /// `k + p kvd`), summed as `ops::dot` sums.
        unsafe fn scores(q: *const f32, k: *const f32, kvd: usize, hd: usize, len: usize, scale: f32, st: *mut f32);
        /// `o = sum_p w0[p] v_p` (and the same of `w1` into `o + hd` when
        /// not null), as `ops::axpy` from zero, keys in order.
        unsafe fn values(w: WeightedValues);
    }

    pub struct Avx512;
    pub struct Avx2;

    impl Kernel for Avx512 {
        unsafe fn scores(q: *const f32, k: *const f32, kvd: usize, hd: usize, len: usize, scale: f32, st: *mut f32) {
            scores_of(q, k, kvd, hd, len, scale, st)
        }
        unsafe fn values(w: WeightedValues) {
            w.run()
        }
    }

    impl Kernel for Avx2 {
        unsafe fn scores(q: *const f32, k: *const f32, kvd: usize, hd: usize, len: usize, scale: f32, st: *mut f32) {
            avx2::scores_of(q, k, kvd, hd, len, scale, st)
        }
        unsafe fn values(w: WeightedValues) {
            avx2::values(&w)
        }
    }

    /// Heads `h0..h1` over `len` cached keys into `out`, a run of heads of
    /// one KV head at a time. The caller has checked the CPU features of K.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn heads<K: Kernel>(
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
            // Key blocks outer, heads inner: a block's K rows (16 KB at head
            // dim 128) stay in L1 while every head of the group reads them.
            for pb in (0..len).step_by(KEY_BLOCK) {
                let nb = (len - pb).min(KEY_BLOCK);
                for (j, h) in (a..b).enumerate() {
                    let st = scores.as_mut_ptr().add(j * lp + pb);
                    K::scores(q.as_ptr().add(h * hd), k.add(pb * kvd), kvd, hd, nb, scale, st);
                }
            }
            for j in 0..b - a {
                ops::softmax(&mut scores[j * lp..j * lp + len]);
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
                K::values(wv);
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
    pub struct WeightedValues {
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

    /// The same two passes on 8-lane vectors (AVX2 machines without
    /// AVX-512): `ops::dot`'s 16 lane accumulators as a low and a high half.
    mod avx2 {
        use std::arch::x86_64::*;

        use super::super::super::attention::x86::interleave_row_pairs;
        use super::WeightedValues;

        /// In-register 8x8 transpose: `r[i]` lane j becomes `r[j]` lane i.
        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn transpose8(r: &mut [__m256; 8]) {
            let t = interleave_row_pairs(r, |a, b| _mm256_unpacklo_ps(a, b), |a, b| _mm256_unpackhi_ps(a, b));
            // t[2i] / t[2i + 1]: rows 2i, 2i + 1 interleaved (lo / hi pairs).
            let u: [__m256; 8] = std::array::from_fn(|i| {
                let (g, k) = (i / 4, i % 4);
                let (a, b) = (t[4 * g + (k & 1)], t[4 * g + 2 + (k & 1)]);
                if k < 2 {
                    _mm256_shuffle_ps::<0x44>(a, b)
                } else {
                    _mm256_shuffle_ps::<0xEE>(a, b)
                }
            });
            // u[4g + k] holds columns (k, k + 4) of rows 4g..4g + 3 in its two
            // 128-bit halves, k in 0, 2, 1, 3 order (see above).
            let col = [0usize, 2, 1, 3];
            for (k, &c) in col.iter().enumerate() {
                r[c] = _mm256_permute2f128_ps::<0x20>(u[k], u[4 + k]);
                r[c + 4] = _mm256_permute2f128_ps::<0x31>(u[k], u[4 + k]);
            }
        }

        /// Keys 8 at a time: the low halves of the 16-wide chunks (lanes 0-7
        /// of `ops::dot`'s accumulators) then the high halves, each
        /// transposed and summed in lane order onto the same running sum.
        #[target_feature(enable = "avx2")]
        pub unsafe fn scores_of(
            q: *const f32,
            k: *const f32,
            kvd: usize,
            hd: usize,
            len: usize,
            scale: f32,
            st: *mut f32,
        ) {
            let sc = _mm256_set1_ps(scale);
            for p0 in (0..len).step_by(8) {
                let nk = (len - p0).min(8);
                let rows: [*const f32; 8] = std::array::from_fn(|i| k.add((p0 + i.min(nk - 1)) * kvd));
                let mut sum = _mm256_setzero_ps();
                for half in [0, 8] {
                    let mut acc = [_mm256_setzero_ps(); 8];
                    for c in (half..hd).step_by(16) {
                        let qc = _mm256_loadu_ps(q.add(c));
                        for i in 0..8 {
                            acc[i] = _mm256_add_ps(acc[i], _mm256_mul_ps(qc, _mm256_loadu_ps(rows[i].add(c))));
                        }
                    }
                    transpose8(&mut acc);
                    let first = if half == 0 { 1 } else { 0 };
                    if half == 0 {
                        sum = acc[0];
                    }
                    for r in &acc[first..] {
                        sum = _mm256_add_ps(sum, *r);
                    }
                }
                let mut tmp = [0f32; 8];
                _mm256_storeu_ps(tmp.as_mut_ptr(), _mm256_mul_ps(sum, sc));
                std::ptr::copy_nonoverlapping(tmp.as_ptr(), st.add(p0), nk);
            }
        }

        /// One head's output per pass (then the second's), 64 dims at a time.
        #[target_feature(enable = "avx2")]
        pub unsafe fn values(w: &WeightedValues) {
            for (wr, o) in [(w.w0, w.o), (w.w1, w.o.add(w.hd))] {
                if wr.is_null() {
                    continue;
                }
                for d0 in (0..w.hd).step_by(64) {
                    match (w.hd - d0) / 8 {
                        2 => block::<2>(wr, w, d0, o),
                        4 => block::<4>(wr, w, d0, o),
                        6 => block::<6>(wr, w, d0, o),
                        _ => block::<8>(wr, w, d0, o),
                    }
                }
            }
        }

        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn block<const NV: usize>(wr: *const f32, w: &WeightedValues, d0: usize, o: *mut f32) {
            let v = w.v.add(d0);
            let mut a = [_mm256_setzero_ps(); NV];
            for p in 0..w.len {
                let (vr, b) = (v.add(p * w.kvd), _mm256_set1_ps(*wr.add(p)));
                for i in 0..NV {
                    a[i] = _mm256_add_ps(a[i], _mm256_mul_ps(b, _mm256_loadu_ps(vr.add(8 * i))));
                }
            }
            for i in 0..NV {
                _mm256_storeu_ps(o.add(d0 + 8 * i), a[i]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::attention::tests::random_case;
    use super::*;
    use crate::model::synthetic::SplitMix64;

    /// Every kernel usable here, on every head range of every shape, gives
    /// the reference's bits, over key counts that reach each remainder of the
    /// 8- and 16-key blocks. Outputs start as NaN, so a head a kernel skips
    /// fails.
    #[test]
    fn decode_heads_match_the_reference_bit_for_bit() {
        let mut r = SplitMix64(11);
        let mut ran = Vec::new();
        for (nh, nkv, hd) in [(20, 5, 128), (4, 2, 64), (6, 3, 16), (8, 1, 32), (3, 3, 8), (4, 4, 144)] {
            for p0 in [0, 1, 6, 7, 8, 9, 14, 15, 16, 17, 40, 300] {
                let (s, q, kc, vc) = random_case(&mut r, (nh, nkv, hd), p0, 1);
                let mut want = vec![f32::NAN; nh * hd];
                let input = AttnInput::new(&s, &q, &kc, &vc, p0);
                decode_heads_reference(input, 0, &mut want);
                assert!(want.iter().all(|v| v.is_finite()));
                for isa in decode_kernels(hd) {
                    if !ran.contains(&isa) {
                        ran.push(isa);
                    }
                    // Whole, then ranges that start and end inside a group.
                    for (a, b) in [(0, nh), (1, nh), (0, nh - 1), (nh / 2, nh), (nh - 1, nh)] {
                        if a >= b {
                            continue;
                        }
                        let mut got = vec![f32::NAN; (b - a) * hd];
                        decode_heads_with(isa, input, a, &mut got);
                        let same = got
                            .iter()
                            .zip(&want[a * hd..b * hd])
                            .all(|(x, y)| x.to_bits() == y.to_bits());
                        assert!(
                            same,
                            "{isa:?} heads {nh}/{nkv} hd {hd} p0 {p0} range {a}..{b}: not the reference's bits"
                        );
                    }
                }
            }
        }
        for isa in [Isa::Avx512, Isa::Avx2] {
            if !ran.contains(&isa) {
                println!("SKIP (bit-equality of the {isa:?} decode attention): not available on this CPU");
            }
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
