//! A session: one sequence's KV cache on a backend, and the generation loop.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::sampling::{Sampler, SamplerConfig};
use crate::backends::{Backend, KvCache, Output};
use crate::error::{Error, Result};

/// The largest top-k a backend is asked to rank itself (CUDA: TK_MAX in ops.cu).
pub const TOP_K_MAX: usize = 64;

pub struct Session {
    backend: Arc<dyn Backend>,
    cache: Box<dyn KvCache>,
    tokens: Vec<u32>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Timings {
    pub n_prompt: usize,
    pub n_gen: usize,
    pub prompt_ms: f64,
    pub gen_ms: f64,
    pub prompt_tokens_per_s: f64,
    pub gen_tokens_per_s: f64,
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// Reached `max_new` tokens.
    Length,
    /// Sampled an end-of-generation token.
    Eos,
    /// The caller's callback asked to stop (stop string matched).
    Callback,
    /// The context is full.
    Context,
}

pub struct GenParams {
    pub max_new: usize,
    pub sampler: SamplerConfig,
    /// Token ids that end generation (not emitted).
    pub stop_ids: Vec<u32>,
}

impl Session {
    pub fn new(backend: Arc<dyn Backend>, capacity: usize) -> Result<Self> {
        let cache = backend.new_cache(capacity)?;
        Ok(Self {
            backend,
            cache,
            tokens: Vec::new(),
        })
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }
    pub fn capacity(&self) -> usize {
        self.cache.capacity()
    }
    pub fn reset(&mut self) {
        self.cache.truncate(0);
        self.tokens.clear();
    }

    /// Append `tokens` and return the requested output.
    pub fn feed(&mut self, tokens: &[u32], output: Output) -> Result<Vec<f32>> {
        let out = self.backend.forward(self.cache.as_mut(), tokens, output)?;
        self.tokens.extend_from_slice(tokens);
        Ok(out)
    }

    /// Run `prompt` then sample up to `max_new` tokens, calling `on_token`
    /// with each new token; it returns false to stop.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        params: &GenParams,
        mut on_token: impl FnMut(u32) -> Result<bool>,
    ) -> Result<(Vec<u32>, StopReason, Timings)> {
        if prompt.is_empty() {
            return Err(Error::input("empty prompt: nothing to condition on"));
        }
        if self.tokens.len() + prompt.len() > self.capacity() {
            return Err(Error::input(format!(
                "prompt of {} tokens does not fit the context of {} tokens",
                self.tokens.len() + prompt.len(),
                self.capacity()
            )));
        }
        let mut sampler = Sampler::new(params.sampler.clone());
        let t0 = Instant::now();
        let mut logits = self.feed(prompt, Output::LastLogits)?;
        let prompt_ms = t0.elapsed().as_secs_f64() * 1e3;
        let t1 = Instant::now();
        let mut out = Vec::new();
        let mut reason = StopReason::Length;
        // Plain greedy needs no logits on the host: where the backend picks
        // the next token itself (CUDA), a step returns that token.
        // Or, sampling from a top-k without a repetition penalty, where the
        // backend ranks the top-k itself, a step returns those k.
        let greedy = params.sampler.is_greedy();
        let top_k = sampler.takes_top_k(TOP_K_MAX);
        let mut picked: Option<u32> = None;
        let mut ranked: Option<Vec<(u32, f32)>> = None;
        while out.len() < params.max_new {
            let tok = match (picked.take(), ranked.take()) {
                (Some(t), _) => t,
                (None, Some(cand)) => sampler.sample_ranked(cand),
                (None, None) => sampler.sample(&logits, &self.tokens),
            };
            if params.stop_ids.contains(&tok) {
                reason = StopReason::Eos;
                break;
            }
            out.push(tok);
            if !on_token(tok)? {
                reason = StopReason::Callback;
                break;
            }
            if out.len() == params.max_new {
                break;
            }
            if self.tokens.len() >= self.capacity() {
                reason = StopReason::Context;
                break;
            }
            if greedy {
                if let Some(next) = self.backend.forward_greedy(self.cache.as_mut(), tok)? {
                    self.tokens.push(tok);
                    picked = Some(next);
                    continue;
                }
            } else if let Some(k) = top_k {
                if let Some(cand) = self.backend.forward_top_k(self.cache.as_mut(), tok, k)? {
                    self.tokens.push(tok);
                    ranked = Some(cand);
                    continue;
                }
            }
            logits = self.feed(&[tok], Output::LastLogits)?;
        }
        let gen_ms = t1.elapsed().as_secs_f64() * 1e3;
        let timings = Timings {
            n_prompt: prompt.len(),
            n_gen: out.len(),
            prompt_ms,
            gen_ms,
            prompt_tokens_per_s: prompt.len() as f64 / (prompt_ms / 1e3).max(1e-9),
            gen_tokens_per_s: out.len() as f64 / (gen_ms / 1e3).max(1e-9),
        };
        Ok((out, reason, timings))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::backends::cpu::CpuBackend;
    use crate::model::{synthetic, ModelConfig};

    /// The CPU backend with its screened head (greedy and top-k picks from
    /// the 8-bit copy plus the candidate rows), counting the picks.
    struct Picker {
        inner: CpuBackend,
        calls: AtomicUsize,
        top_k_calls: AtomicUsize,
        /// Every pick so far (never reset).
        picks: AtomicUsize,
    }

    impl Backend for Picker {
        fn name(&self) -> String {
            "picker".into()
        }
        fn config(&self) -> &ModelConfig {
            self.inner.config()
        }
        fn new_cache(&self, capacity: usize) -> Result<Box<dyn KvCache>> {
            self.inner.new_cache(capacity)
        }
        fn forward(&self, cache: &mut dyn KvCache, tokens: &[u32], output: Output) -> Result<Vec<f32>> {
            self.inner.forward(cache, tokens, output)
        }
        fn forward_greedy(&self, cache: &mut dyn KvCache, token: u32) -> Result<Option<u32>> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            self.picks.fetch_add(1, Ordering::Relaxed);
            let t = self.inner.forward_greedy(cache, token)?;
            assert!(t.is_some(), "the screened head picks");
            Ok(t)
        }
        fn forward_top_k(&self, cache: &mut dyn KvCache, token: u32, k: usize) -> Result<Option<Vec<(u32, f32)>>> {
            self.top_k_calls.fetch_add(1, Ordering::Relaxed);
            self.picks.fetch_add(1, Ordering::Relaxed);
            let r = self.inner.forward_top_k(cache, token, k)?;
            assert!(r.is_some(), "the screened head ranks");
            Ok(r)
        }
        fn resident_weight_bytes(&self) -> usize {
            self.inner.resident_weight_bytes()
        }
    }

    fn run(be: Arc<dyn Backend>, sampler: SamplerConfig, stop_ids: Vec<u32>) -> (Vec<u32>, StopReason, Vec<u32>) {
        let mut s = Session::new(be, 64).unwrap();
        let params = GenParams {
            max_new: 12,
            sampler,
            stop_ids,
        };
        let (out, reason, _) = s.generate(&[5, 77, 300, 9], &params, |_| Ok(true)).unwrap();
        (out, reason, s.tokens().to_vec())
    }

    #[test]
    fn decode_steps_use_the_backends_own_pick_or_ranking() {
        let m = Arc::new(synthetic::build("tiny").unwrap());
        let plain: Arc<dyn Backend> = Arc::new(CpuBackend::new(m.clone(), "scalar", 1).unwrap());
        let screened = crate::backends::cpu::CpuOptions {
            kernel: "scalar".into(),
            threads: 1,
            lm_head_screen: true,
            ..Default::default()
        };
        let picker = Arc::new(Picker {
            inner: CpuBackend::with_options(m, &screened).unwrap(),
            calls: AtomicUsize::new(0),
            top_k_calls: AtomicUsize::new(0),
            picks: AtomicUsize::new(0),
        });
        let want = run(plain.clone(), SamplerConfig::greedy(), vec![]);
        assert_eq!(want.0.len(), 12);
        assert!(want.0.iter().any(|&t| t != want.0[0]), "degenerate continuation");
        let got = run(picker.clone(), SamplerConfig::greedy(), vec![]);
        assert_eq!(got, want);
        // The first token comes from the prompt's logits; the last is not fed.
        assert_eq!(picker.calls.swap(0, Ordering::Relaxed), 11);
        // A stop id in the middle ends both the same way.
        let stop = vec![want.0[6]];
        let first = want.0.iter().position(|&t| t == want.0[6]).unwrap();
        let got = run(picker.clone(), SamplerConfig::greedy(), stop.clone());
        assert_eq!(got, run(plain.clone(), SamplerConfig::greedy(), stop));
        assert_eq!((got.0.len(), got.1), (first, StopReason::Eos));
        // Sampling from a top-k takes the backend's ranked list: the same
        // draws (same seed) as from the logits.
        picker.calls.store(0, Ordering::Relaxed);
        let warm = SamplerConfig {
            temperature: 0.7,
            ..SamplerConfig::default()
        };
        let want = run(plain.clone(), warm.clone(), vec![]);
        assert_eq!(run(picker.clone(), warm, vec![]), want);
        assert_eq!(picker.top_k_calls.swap(0, Ordering::Relaxed), 11);
        let hot = SamplerConfig {
            temperature: 1.5,
            top_k: 7,
            top_p: 1.0,
            min_p: 0.0,
            ..SamplerConfig::default()
        };
        let want = run(plain.clone(), hot.clone(), vec![]);
        assert!(want.0.iter().any(|&t| t != want.0[0]), "degenerate draws");
        assert_eq!(run(picker.clone(), hot, vec![]), want);
        assert_eq!(picker.top_k_calls.swap(0, Ordering::Relaxed), 11);
        // A repetition penalty, or no top-k, needs the logits.
        let penalised = SamplerConfig {
            repeat_penalty: 1.3,
            ..SamplerConfig::greedy()
        };
        let no_k = SamplerConfig {
            top_k: 0,
            ..SamplerConfig::default()
        };
        for cfg in [penalised, no_k] {
            assert_eq!(
                run(picker.clone(), cfg.clone(), vec![]),
                run(plain.clone(), cfg, vec![])
            );
        }
        assert_eq!(picker.calls.load(Ordering::Relaxed), 0);
        assert_eq!(picker.top_k_calls.load(Ordering::Relaxed), 0);
        // The picks came from the candidates, not the full head.
        let c = picker.inner.screen_counts().expect("screened head");
        assert_eq!((c.screened + c.full) as usize, picker.picks.load(Ordering::Relaxed));
        assert!(c.screened >= 30 && c.candidates < c.screened * 2048 / 4, "{c:?}");
        // A plain backend offers no pick (the session uses the logits).
        let mut cache = plain.new_cache(8).unwrap();
        assert_eq!(plain.forward_greedy(cache.as_mut(), 5).unwrap(), None);
        assert_eq!(cache.len(), 0);
    }
}
