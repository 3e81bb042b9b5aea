//! A session: one sequence's KV cache on a backend, and the generation loop.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::sampling::{Sampler, SamplerConfig};
use crate::backends::{Backend, KvCache, Output};
use crate::error::{Error, Result};

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
        while out.len() < params.max_new {
            let tok = sampler.sample(&logits, &self.tokens);
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
