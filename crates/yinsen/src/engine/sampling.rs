//! Token sampling: greedy, temperature, top-k, top-p, min-p, repetition
//! penalty, seeded. Filters apply in llama.cpp's order: penalty, top-k,
//! temperature, top-p, min-p, then a draw.

pub use crate::logits::{argmax, ranked};
use crate::model::synthetic::SplitMix64;

#[derive(Clone, Debug)]
pub struct SamplerConfig {
    /// <= 0 means greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1.0 = off.
    pub top_p: f32,
    /// 0.0 = off.
    pub min_p: f32,
    /// 1.0 = off; > 1 discourages tokens seen in the last `repeat_last_n`.
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0x5EED,
        }
    }
}

impl SamplerConfig {
    /// Whether the repetition penalty changes any logit.
    pub fn penalises_repeats(&self) -> bool {
        self.repeat_penalty != 1.0 && self.repeat_penalty > 0.0
    }

    /// Plain argmax of the logits: no temperature and no repetition penalty.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 && !self.penalises_repeats()
    }

    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }
}

pub struct Sampler {
    cfg: SamplerConfig,
    rng: SplitMix64,
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Self {
        let rng = SplitMix64(cfg.seed);
        Self { cfg, rng }
    }

    /// Pick the next token from `logits` given the tokens so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let c = &self.cfg;
        let mut l = std::borrow::Cow::Borrowed(logits);
        if c.penalises_repeats() {
            let l = l.to_mut();
            let start = history.len().saturating_sub(c.repeat_last_n);
            let mut seen = std::collections::HashSet::new();
            for &t in &history[start..] {
                if seen.insert(t) {
                    if let Some(v) = l.get_mut(t as usize) {
                        *v = if *v > 0.0 {
                            *v / c.repeat_penalty
                        } else {
                            *v * c.repeat_penalty
                        };
                    }
                }
            }
        }
        if c.temperature <= 0.0 {
            return argmax(&l);
        }
        let cand = ranked(&l, c.top_k);
        self.sample_ranked(cand)
    }

    /// Whether [`Self::sample_ranked`] may take a backend's top-k list in
    /// place of the logits: a temperature, no repetition penalty, and a
    /// top-k of 1..=`max_k`.
    pub fn takes_top_k(&self, max_k: usize) -> Option<usize> {
        let c = &self.cfg;
        (c.temperature > 0.0 && !c.penalises_repeats() && (1..=max_k).contains(&c.top_k)).then_some(c.top_k)
    }

    /// The draw of [`Self::sample`] from candidates already ranked and cut
    /// to the top-k ([`ranked`]'s list: for the same logits, the same token).
    pub fn sample_ranked(&mut self, cand: Vec<(u32, f32)>) -> u32 {
        let c = &self.cfg;
        if cand.is_empty() {
            return 0;
        }
        // Softmax with temperature over the survivors.
        let m = cand[0].1;
        let mut p: Vec<f32> = cand.iter().map(|&(_, v)| ((v - m) / c.temperature).exp()).collect();
        let sum: f32 = p.iter().sum();
        p.iter_mut().for_each(|x| *x /= sum);
        let mut keep = p.len();
        if c.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, &pi) in p.iter().enumerate() {
                acc += pi;
                if acc >= c.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if c.min_p > 0.0 {
            let thr = c.min_p * p[0];
            keep = keep.min(p.iter().take_while(|&&x| x >= thr).count().max(1));
        }
        let total: f32 = p[..keep].iter().sum();
        let mut r = self.rng.next_f32() * total;
        for i in 0..keep {
            r -= p[i];
            if r <= 0.0 {
                return cand[i].0;
            }
        }
        cand[keep - 1].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The partial selection ranks exactly as sorting everything and cutting
    /// (ties included), so sampling is unchanged.
    #[test]
    fn top_k_selection_equals_a_full_sort() {
        let mut r = SplitMix64(99);
        for (n, k) in [
            (1usize, 1usize),
            (5, 3),
            (100, 40),
            (128_256, 40),
            (1000, 999),
            (1000, 1000),
            (7, 0),
        ] {
            // Coarse values so ties occur; one NaN and infinities where room.
            let mut l: Vec<f32> = (0..n).map(|_| (r.next_f32() * 64.0).floor() - 32.0).collect();
            if n > 10 {
                l[3] = f32::NAN;
                l[5] = f32::INFINITY;
                l[8] = f32::NEG_INFINITY;
            }
            let mut want: Vec<(u32, f32)> = l.iter().enumerate().map(|(i, &v)| (i as u32, v)).collect();
            want.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            if k > 0 {
                want.truncate(k);
            }
            let got = ranked(&l, k);
            assert_eq!(got.len(), want.len(), "n {n} k {k}");
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.0 == b.0 && a.1.to_bits() == b.1.to_bits()),
                "n {n} k {k}"
            );
        }
    }

    #[test]
    fn greedy_takes_argmax_lowest_on_ties() {
        let mut s = Sampler::new(SamplerConfig::greedy());
        assert_eq!(s.sample(&[0.1, 0.9, 0.9, -1.0], &[]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_even_when_hot() {
        let mut s = Sampler::new(SamplerConfig {
            temperature: 5.0,
            top_k: 1,
            ..SamplerConfig::default()
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&[0.0, 3.0, 2.9, 1.0], &[]), 1);
        }
    }

    #[test]
    fn repetition_penalty_can_change_choice() {
        let mut s = Sampler::new(SamplerConfig {
            repeat_penalty: 2.0,
            ..SamplerConfig::greedy()
        });
        assert_eq!(s.sample(&[1.0, 0.8], &[0]), 1);
        assert_eq!(s.sample(&[1.0, 0.8], &[]), 0);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_follows_probabilities() {
        let cfg = SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            ..SamplerConfig::default()
        };
        let logits = [0.0f32, (3.0f32).ln()]; // p = 0.25, 0.75
        let draw = |seed| {
            let mut s = Sampler::new(SamplerConfig { seed, ..cfg.clone() });
            (0..4000).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        let a = draw(7);
        assert_eq!(a, draw(7));
        assert_ne!(a, draw(8));
        let ones = a.iter().filter(|&&t| t == 1).count() as f64 / a.len() as f64;
        assert!((ones - 0.75).abs() < 0.03, "{ones}");
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        let logits = [5.0f32, 4.9, -10.0, -10.0];
        for cfg in [
            SamplerConfig {
                top_p: 0.9,
                min_p: 0.0,
                top_k: 0,
                temperature: 1.0,
                ..SamplerConfig::default()
            },
            SamplerConfig {
                top_p: 1.0,
                min_p: 0.1,
                top_k: 0,
                temperature: 1.0,
                ..SamplerConfig::default()
            },
        ] {
            let mut s = Sampler::new(cfg);
            for _ in 0..500 {
                assert!(s.sample(&logits, &[]) < 2);
            }
        }
    }
}
