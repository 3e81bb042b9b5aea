//! Exact greedy and top-k picks from the lm_head while reading an 8-bit
//! copy of it (the "screened" head).
//!
//! A decode step that only needs the greedy token or the k best logits does
//! not need every logit exactly. The 8-bit copy (half the bytes of F16) gives
//! every row's logit `lq` within a bound `B` that is proved, not estimated,
//! per row and token; only the rows whose interval `[lq - B, lq + B]` reaches
//! the k-th largest lower end can be among the k best, and only those are
//! computed from the lm_head itself, by the same row dot the full head runs.
//! The result is the same tokens and logit bits as the full head's.
//!
//! The bound, for row i (E: the head's values, Ê: the 8-bit copy's, h: the
//! hidden state, ĥ: its 8-bit blocks where the copy multiplies int8 x int8):
//!   |Σ E h − Σ Ê ĥ| ≤ Σ |E − Ê| |h| + Σ |Ê| |h − ĥ| ≤ err_i ‖h‖₁ + abs_i δ
//! with `err_i = max |E − Ê|` and `abs_i = Σ max(|E|, |Ê|)` kept per row
//! (two floats per row), and `δ = max |h − ĥ|` per token. Both computed
//! logits carry float rounding of at most `γ Σ |terms|` with `γ = n u` for
//! any summation order (n inputs, u = 2^-24); `ROUND_GAMMA` doubles that.
//! The per-token factors are computed in f64 and inflated by 0.1%; the
//! per-row arithmetic runs in f32 (it is one pass over the vocabulary per
//! token) with margins for its own rounding (`bound32`).

use super::lm_head::{HeadQ8, Q8Act};
use crate::error::Result;
use crate::model::dense::{DenseMatrix, DenseType};

/// The rounding allowance per input for either computed logit (2 u).
const ROUND_GAMMA: f64 = 2.0 / (1u64 << 24) as f64;
/// Inflation of every bound term for the rounding of the terms themselves.
const INFLATE: f64 = 1.001;

/// An 8-bit copy of a dense lm_head plus the per-row constants of the bound.
pub struct HeadScreen {
    q8: HeadQ8,
    /// Per row: `max |E − Ê|` over the row.
    err: Vec<f32>,
    /// Per row: `Σ max(|E|, |Ê|)`.
    abs: Vec<f32>,
}

/// How the picks went so far (for tests and `yinsen bench`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScreenCounts {
    /// Picks decided from the candidates.
    pub screened: u64,
    /// Picks that read the full head (see [`Unscreened`]).
    pub full: u64,
    /// Candidates over the screened picks.
    pub candidates: u64,
}

/// [`ScreenCounts`] updated from any thread.
#[derive(Default)]
pub struct ScreenCounters {
    screened: std::sync::atomic::AtomicU64,
    full: std::sync::atomic::AtomicU64,
    candidates: std::sync::atomic::AtomicU64,
}

impl ScreenCounters {
    pub fn record(&self, candidates: Option<usize>) {
        use std::sync::atomic::Ordering::Relaxed;
        match candidates {
            Some(n) => {
                self.screened.fetch_add(1, Relaxed);
                self.candidates.fetch_add(n as u64, Relaxed);
            }
            None => {
                self.full.fetch_add(1, Relaxed);
            }
        }
    }
    pub fn get(&self) -> ScreenCounts {
        use std::sync::atomic::Ordering::Relaxed;
        ScreenCounts {
            screened: self.screened.load(Relaxed),
            full: self.full.load(Relaxed),
            candidates: self.candidates.load(Relaxed),
        }
    }
}

/// Why a step's pick falls back to the full head.
#[derive(Debug, PartialEq, Eq)]
pub enum Unscreened {
    /// A hidden value, a screened logit or a bound is not finite.
    NotFinite,
    /// More than half the rows are candidates: the full head is cheaper.
    TooMany,
}

impl HeadScreen {
    /// The 8-bit copy of `head` and its bound constants; an error when the
    /// head cannot be screened (already 8-bit, width not a multiple of 32,
    /// or a non-finite value, which the bound cannot cover).
    pub fn build(head: &DenseMatrix) -> Result<Self> {
        Self::build_as(head, super::lm_head::q8_act_fast())
    }

    /// [`HeadScreen::build`] with the copy's form chosen (`act8`: int8 x
    /// int8, else f32 x Q8_0 rows).
    pub fn build_as(head: &DenseMatrix, act8: bool) -> Result<Self> {
        if head.dtype == DenseType::Q8_0 {
            return Err(crate::Error::Unsupported("the lm_head is already 8-bit".into()));
        }
        let (q8, rows) = HeadQ8::quantize_with_error(head, act8)?;
        if let Some(r) = rows.iter().position(|e| e.max_diff.is_nan()) {
            return Err(crate::Error::Unsupported(format!(
                "lm_head row {r} holds a non-finite value: not screened"
            )));
        }
        Ok(Self {
            q8,
            err: rows.iter().map(|e| e.max_diff).collect(),
            abs: rows.iter().map(|e| e.abs_sum).collect(),
        })
    }

    /// The 8-bit copy whose logits feed [`HeadScreen::candidates`].
    pub fn q8(&self) -> &HeadQ8 {
        &self.q8
    }

    pub fn resident_bytes(&self) -> usize {
        self.q8.resident_bytes() + (self.err.len() + self.abs.len()) * 4
    }

    /// The per-token factors of the bound, `bound_i = err_i a + abs_i b`,
    /// rounded up to f32.
    fn factors(&self, h: &[f32], act: Option<&Q8Act>) -> std::result::Result<(f32, f32), Unscreened> {
        let (mut l1, mut hmax) = (0f64, 0f64);
        for &v in h {
            if !v.is_finite() {
                return Err(Unscreened::NotFinite);
            }
            l1 += v.abs() as f64;
            hmax = hmax.max(v.abs() as f64);
        }
        let delta = act.map_or(0.0, |a| a.max_error(h, 0));
        let gamma = ROUND_GAMMA * h.len() as f64;
        let a = INFLATE * INFLATE * l1;
        let b = INFLATE * INFLATE * (delta + gamma * (2.0 * hmax + delta));
        // f64 -> f32 rounds to nearest: one step up keeps them upper bounds.
        let up = |x: f64| (x as f32) * (1.0 + f32::EPSILON);
        let (a, b) = (up(a), up(b));
        match a.is_finite() && b.is_finite() {
            true => Ok((a, b)),
            false => Err(Unscreened::NotFinite),
        }
    }

    /// Row i's bound in f32, widened to cover the rounding of the f32
    /// arithmetic that uses it (three roundings of at most 2^-24 relative to
    /// |lq_i| + bound each).
    #[inline]
    fn bound32(&self, i: usize, lq: f32, a: f32, b: f32) -> f32 {
        (self.err[i] * a + self.abs[i] * b) * (1.0 + 1.0 / (1 << 20) as f32) + lq.abs() * (1.0 / (1 << 21) as f32)
    }

    /// Per row, a bound on |computed head logit − `lq`| for hidden state
    /// `h` (`act`: `h` as the copy quantised it, where it multiplies int8 x
    /// int8; `lq`: the copy's computed logits of `h`).
    pub fn bounds(&self, h: &[f32], act: Option<&Q8Act>, lq: &[f32]) -> std::result::Result<Vec<f32>, Unscreened> {
        assert_eq!(lq.len(), self.err.len());
        let (a, b) = self.factors(h, act)?;
        let out: Vec<f32> = lq.iter().enumerate().map(|(i, &v)| self.bound32(i, v, a, b)).collect();
        match out.iter().chain(lq).all(|v| v.is_finite()) {
            true => Ok(out),
            false => Err(Unscreened::NotFinite),
        }
    }

    /// The rows (ascending) whose computed head logit may rank among the
    /// `k` largest, from [`HeadScreen::bounds`]' arguments and `exact`, the
    /// head's own computed logits of the rows it is given (in their order).
    pub fn candidates(
        &self,
        h: &[f32],
        act: Option<&Q8Act>,
        lq: &[f32],
        k: usize,
        exact: &dyn Fn(&[u32]) -> Vec<f32>,
    ) -> std::result::Result<Vec<u32>, Unscreened> {
        self.candidates_with(h, act, lq, k, |out, f| f(0, out), exact)
    }

    /// [`HeadScreen::candidates`] with the per-row pass run by `par`, which
    /// calls `f(start, chunk)` on chunks of its slice (any split at even
    /// offsets; the CPU backend's spin pool: one pass over the vocabulary
    /// per token is ~0.4 ms on one core).
    ///
    /// The threshold a row's upper end must reach is the k-th largest exact
    /// logit of the `2k + 8` rows with the largest lower ends. It is a lower
    /// bound on the head's k-th largest logit (k of those rows reach it),
    /// whichever rows are taken; taking those with the largest lower ends
    /// makes it tight: it sits near the k-th largest logit itself, where the
    /// k-th largest lower end sat about a bound's width below. A row whose
    /// upper end is below it cannot rank among the k best, nor tie with
    /// them. At k = 40 on 2B4T the candidates went from ~19k rows to ~1.7k,
    /// and for greedy picks from ~2-3k to ~100 (their F16 rows were most of
    /// a top-k pick's bytes).
    pub fn candidates_with(
        &self,
        h: &[f32],
        act: Option<&Q8Act>,
        lq: &[f32],
        k: usize,
        par: impl FnOnce(&mut [f32], &(dyn Fn(usize, &mut [f32]) + Sync)),
        exact: &dyn Fn(&[u32]) -> Vec<f32>,
    ) -> std::result::Result<Vec<u32>, Unscreened> {
        let n = lq.len();
        assert_eq!(n, self.err.len());
        assert!(k >= 1 && k <= n);
        let (a, b) = self.factors(h, act)?;
        BOUNDS.with(|buf| {
            let mut lu = buf.borrow_mut();
            // (lower, upper) end per row, kept between tokens: a fresh
            // vocabulary-sized buffer faults its pages in every token.
            lu.resize(2 * n, 0.0);
            par(&mut lu, &|start, out: &mut [f32]| {
                for (j, p) in out.chunks_exact_mut(2).enumerate() {
                    let i = start / 2 + j;
                    let bi = self.bound32(i, lq[i], a, b);
                    p[0] = lq[i] - bi;
                    p[1] = lq[i] + bi;
                }
            });
            // A probe that a NaN or infinity anywhere turns NaN: 16
            // independent lanes (one serial chain over the vocabulary took
            // ~0.3 ms).
            let mut probe = [0f32; 16];
            let whole = lu.len() / 32 * 32;
            for c in lu[..whole].chunks_exact(32) {
                for j in 0..16 {
                    probe[j] += c[2 * j] * 0.0 + c[2 * j + 1] * 0.0;
                }
            }
            for p in lu[whole..].chunks_exact(2) {
                probe[0] += p[0] * 0.0 + p[1] * 0.0;
            }
            if probe.iter().any(|&p| p != 0.0) {
                return Err(Unscreened::NotFinite);
            }
            // The rows of the kp largest lower ends, then the k-th largest of
            // their exact logits: no row whose upper end is below it can rank
            // among the k largest (its logit is below k of these rows').
            let kp = (2 * k + 8).min(n);
            let lows = lu.iter().step_by(2).enumerate().map(|(i, &l)| (i as u32, l));
            let top: Vec<u32> = if kp <= 512 {
                // Most lower ends fail one comparison with the least kept.
                crate::logits::ranked_pairs(lows, kp).into_iter().map(|p| p.0).collect()
            } else {
                let mut all: Vec<(u32, f32)> = lows.collect();
                all.select_nth_unstable_by(kp - 1, |x, y| y.1.total_cmp(&x.1));
                all[..kp].iter().map(|p| p.0).collect()
            };
            let mut ex = exact(&top);
            assert_eq!(ex.len(), kp, "exact logits of {kp} rows");
            if ex.iter().any(|v| !v.is_finite()) {
                return Err(Unscreened::NotFinite);
            }
            let t = *ex.select_nth_unstable_by(k - 1, |x, y| y.total_cmp(x)).1;
            let cand: Vec<u32> = (0..n).filter(|&i| lu[2 * i + 1] >= t).map(|i| i as u32).collect();
            match cand.len() > n / 2 {
                true => Err(Unscreened::TooMany),
                false => Ok(cand),
            }
        })
    }
}

thread_local! {
    static BOUNDS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::cpu::lm_head;
    use crate::logits::{argmax, ranked, ranked_pairs};
    use crate::model::dense::Storage;
    use crate::model::synthetic::SplitMix64;

    /// A uniform value in [-1, 1).
    fn unif(r: &mut SplitMix64) -> f32 {
        (r.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn f16_head(rows: usize, cols: usize, vals: impl Fn(usize, usize) -> f32) -> DenseMatrix {
        let mut b = Vec::with_capacity(rows * cols * 2);
        for r in 0..rows {
            for c in 0..cols {
                b.extend_from_slice(&half::f16::from_f32(vals(r, c)).to_le_bytes());
            }
        }
        DenseMatrix::new(rows, cols, DenseType::F16, Storage::owned(b)).unwrap()
    }

    /// Every row's logit as the full head computes it.
    fn head_logits(head: &DenseMatrix, h: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; head.rows];
        lm_head::rows_dot(head, 0, h, 1, &mut out, &mut Vec::new());
        out
    }

    fn screened_logits(s: &HeadScreen, h: &[f32]) -> (Vec<f32>, Option<Q8Act>) {
        match s.q8() {
            HeadQ8::Act8(q) => {
                let a = q.quantize(h, 1);
                let mut out = vec![f32::NAN; q.rows];
                q.rows_dot(0, &a, 0, 1, &mut out);
                (out, Some(a))
            }
            HeadQ8::Dense(d) => (head_logits(d, h), None),
        }
    }

    /// Heads: random values, rows with outliers, repeated and near-equal
    /// rows (ties one f16 step apart); hidden states: plain, one huge
    /// element, tiny and large magnitudes.
    fn cases() -> Vec<(DenseMatrix, Vec<Vec<f32>>)> {
        let (rows, cols) = (3000, 256);
        let mut out = Vec::new();
        for seed in 0..3u64 {
            let mut r = SplitMix64(seed + 11);
            let base: Vec<f32> = (0..rows * cols).map(|_| 0.05 * unif(&mut r)).collect();
            let head = f16_head(rows, cols, |i, c| match seed {
                // Every 7th row has an outlier of 40x the rest.
                1 if i % 7 == 0 && c == i % cols => 2.0,
                // Rows 0..64 repeat row 0, rows 64..128 differ from it by a
                // small step in one column (near ties).
                2 if i < 64 => base[c],
                2 if i < 128 => base[c] + if c == i % cols { 1e-3 } else { 0.0 },
                _ => base[i * cols + c],
            });
            let mut hs = Vec::new();
            for (scale, spike) in [(1.0f32, false), (1.0, true), (1e-3, false), (300.0, true)] {
                let mut h: Vec<f32> = (0..cols).map(|_| scale * unif(&mut r)).collect();
                if spike {
                    h[r.next_u64() as usize % cols] = 40.0 * scale;
                }
                hs.push(h);
            }
            out.push((head, hs));
        }
        out
    }

    #[test]
    fn the_bound_holds_on_every_row() {
        for act8 in [true, false] {
            let mut worst = 0f64;
            for (head, hs) in cases() {
                let s = HeadScreen::build_as(&head, act8).unwrap();
                for h in &hs {
                    let exact = head_logits(&head, h);
                    let (lq, act) = screened_logits(&s, h);
                    let b = s.bounds(h, act.as_ref(), &lq).unwrap();
                    for i in 0..head.rows {
                        let d = (exact[i] as f64 - lq[i] as f64).abs();
                        assert!(
                            d <= b[i] as f64,
                            "act8 {act8} row {i}: |{} - {}| > bound {}",
                            exact[i],
                            lq[i],
                            b[i]
                        );
                        worst = worst.max(d / b[i] as f64);
                    }
                }
            }
            // The bound is worst-case, but not vacuous.
            assert!(worst > 0.02, "act8 {act8}: largest error / bound {worst}");
            eprintln!("act8 {act8}: largest error / bound {worst:.3}");
        }
    }

    /// Errors that all point the same way reach the bound: each term of it
    /// is needed (a test that halves either one fails here).
    #[test]
    fn the_bound_is_tight_for_aligned_errors() {
        let cols = 256;
        // h: per block of 32, one element 127 (so dx = 1) and the rest k + 0.49:
        // every code is off by 0.49 in the same direction.
        let h: Vec<f32> = (0..cols)
            .map(|c| if c % 32 == 0 { 127.0 } else { (c % 50) as f32 + 0.49 })
            .collect();
        // Row 0: weights the 8-bit copy holds exactly (err = 0), so only the
        // activation term counts. Row 1: per block one weight 127/128 sets
        // d = 1/128, the rest sit at 0.49 steps above a code (all errors
        // positive; codes below 16 keep 0.49 exact in f16), and h > 0: only
        // the weight term counts.
        let head = f16_head(2, cols, |r, c| match (r, c % 32) {
            (0, _) => 0.25,
            (1, 0) => 127.0 / 128.0,
            (1, _) => ((c % 16) as f32 + 0.49) / 128.0,
            _ => unreachable!(),
        });
        let exact = head_logits(&head, &h);
        // int8 activations: row 0 tests the activation term.
        let s = HeadScreen::build_as(&head, true).unwrap();
        let (lq, act) = screened_logits(&s, &h);
        let b = s.bounds(&h, act.as_ref(), &lq).unwrap();
        let r0 = (exact[0] as f64 - lq[0] as f64).abs() / b[0] as f64;
        // f32 activations: row 1 tests the weight term alone.
        let s = HeadScreen::build_as(&head, false).unwrap();
        let (lq, act) = screened_logits(&s, &h);
        let b = s.bounds(&h, act.as_ref(), &lq).unwrap();
        let r1 = (exact[1] as f64 - lq[1] as f64).abs() / b[1] as f64;
        for r in [r0, r1] {
            assert!(
                r > 0.8 && r <= 1.0,
                "error / bound {r0:.3} (activations), {r1:.3} (weights)"
            );
        }
    }

    #[test]
    fn picks_equal_the_full_heads() {
        let (mut screened, mut tightened) = (0, 0);
        let (mut n_cand, mut n_lower) = (0, 0);
        for act8 in [true, false] {
            for (head, hs) in cases() {
                let s = HeadScreen::build_as(&head, act8).unwrap();
                for h in &hs {
                    let exact = head_logits(&head, h);
                    let exact_of = |rows: &[u32]| -> Vec<f32> { rows.iter().map(|&r| exact[r as usize]).collect() };
                    let (lq, act) = screened_logits(&s, h);
                    for k in [1, 2, 5, 40, 64, 300] {
                        let Ok(cand) = s.candidates(h, act.as_ref(), &lq, k, &exact_of) else {
                            continue;
                        };
                        screened += 1;
                        assert!(cand.len() >= k && cand.windows(2).all(|w| w[0] < w[1]));
                        // The per-row pass split in pieces (as the spin pool runs it).
                        let split = s.candidates_with(
                            h,
                            act.as_ref(),
                            &lq,
                            k,
                            |out, f| {
                                for (ci, c) in out.chunks_mut(34).enumerate() {
                                    f(ci * 34, c);
                                }
                            },
                            &exact_of,
                        );
                        assert_eq!(split.as_ref(), Ok(&cand));
                        // Within the rows the k-th largest lower end alone
                        // would keep (the threshold before exact logits).
                        let b = s.bounds(h, act.as_ref(), &lq).unwrap();
                        let mut lows: Vec<f32> = lq.iter().zip(&b).map(|(l, b)| l - b).collect();
                        let tk = *lows.select_nth_unstable_by(k - 1, |x, y| y.total_cmp(x)).1;
                        let by_lower: Vec<u32> = (0..lq.len() as u32)
                            .filter(|&i| lq[i as usize] + b[i as usize] >= tk)
                            .collect();
                        assert!(cand.iter().all(|r| by_lower.binary_search(r).is_ok()), "k {k}");
                        tightened += (cand.len() < by_lower.len()) as usize;
                        n_cand += cand.len();
                        n_lower += by_lower.len();
                        let got = ranked_pairs(cand.iter().map(|&i| (i, exact[i as usize])), k);
                        assert_eq!(got, ranked(&exact, k), "act8 {act8} k {k}");
                        if k == 1 {
                            assert_eq!(got[0].0, argmax(&exact));
                        }
                    }
                }
            }
        }
        // Most cases are screened (the rest read the full head, correctly).
        assert!(screened >= 100, "only {screened} of 144 picks screened");
        // The exact logits' threshold keeps fewer rows in many picks.
        println!("candidates {n_cand} vs {n_lower} by the k-th lower end; fewer in {tightened} of {screened} picks");
        assert!(
            tightened >= screened / 4 && n_cand < n_lower,
            "{tightened} of {screened} picks tightened"
        );
    }

    #[test]
    fn non_finite_values_are_not_screened() {
        let head = f16_head(64, 64, |r, c| ((r * 7 + c) % 13) as f32 * 0.01 - 0.06);
        let s = HeadScreen::build(&head).unwrap();
        let mut h = vec![0.5f32; 64];
        h[3] = f32::NAN;
        let (lq, act) = screened_logits(&s, &[0.5; 64]);
        let exact = head_logits(&head, &[0.5; 64]);
        let exact_of = |rows: &[u32]| -> Vec<f32> { rows.iter().map(|&r| exact[r as usize]).collect() };
        assert!(s.candidates(&[0.5; 64], act.as_ref(), &lq, 1, &exact_of).is_ok());
        // An exact logit that overflowed: the full head decides.
        let inf = |rows: &[u32]| vec![f32::INFINITY; rows.len()];
        assert_eq!(
            s.candidates(&[0.5; 64], act.as_ref(), &lq, 1, &inf),
            Err(Unscreened::NotFinite)
        );
        assert_eq!(
            s.candidates(&h, act.as_ref(), &lq, 1, &exact_of),
            Err(Unscreened::NotFinite)
        );
        h[3] = f32::INFINITY;
        assert_eq!(
            s.candidates(&h, act.as_ref(), &lq, 1, &exact_of),
            Err(Unscreened::NotFinite)
        );
        let bad = f16_head(8, 64, |r, c| if r == 5 && c == 9 { f32::INFINITY } else { 0.1 });
        let e = HeadScreen::build(&bad)
            .err()
            .expect("an infinite weight is not screened");
        assert!(e.to_string().contains("row 5"), "{e}");
    }
}
