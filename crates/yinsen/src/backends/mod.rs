//! Compute backends. Each owns its weight layout and kernels behind the
//! [`Backend`] trait; nothing outside a backend knows its layout.
//!
//! - `cpu`: the CPU matrix path (scalar reference, AVX2, AVX-512 VNNI, AMX).
//! - `cuda`: the GPU path (NVRTC-compiled kernels, CUDA loaded at run time).

pub mod cpu;
pub mod cuda;

use std::any::Any;

use crate::error::Result;
use crate::model::ModelConfig;

/// What a forward call returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// Logits of the last token: `[vocab]`.
    LastLogits,
    /// Logits of every token of the call: `[n_tokens, vocab]`.
    AllLogits,
    /// Final-norm hidden states of every token (for embeddings): `[n_tokens, hidden]`.
    Hidden,
}

/// A sequence's attention cache, owned by the backend that runs attention.
pub trait KvCache: Send {
    /// Positions already filled.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn capacity(&self) -> usize;
    /// Forget positions `n..` (start over with 0).
    fn truncate(&mut self, n: usize);
    fn resident_bytes(&self) -> usize;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// A batched step's shape: one token for each of at least one sequence.
pub fn check_batch(n_caches: usize, n_tokens: usize) -> Result<()> {
    if n_caches != n_tokens || n_tokens == 0 {
        return Err(crate::Error::input(format!(
            "a batched step takes one token per sequence: {n_tokens} tokens for {n_caches} sequences"
        )));
    }
    Ok(())
}

/// Whether `picks` can be a batched step's picks: one per token, each k in
/// 1..=vocab (else a backend offers none and the caller takes the logits).
pub fn picks_offered(picks: &[(usize, bool)], n_tokens: usize, vocab: usize) -> bool {
    picks.len() == n_tokens && picks.iter().all(|&(k, _)| k >= 1 && k <= vocab)
}

/// A batched step's caches as the backend's own cache type `C`, each
/// checked: its one token, room for it.
pub fn batch_caches<'c, C: KvCache + 'static>(
    config: &ModelConfig,
    caches: &'c mut [&mut dyn KvCache],
    tokens: &[u32],
    backend: &str,
) -> Result<Vec<&'c mut C>> {
    check_batch(caches.len(), tokens.len())?;
    let mut out = Vec::with_capacity(caches.len());
    for (c, &t) in caches.iter_mut().zip(tokens) {
        let cache = c
            .as_any_mut()
            .downcast_mut::<C>()
            .ok_or_else(|| crate::Error::backend(backend, "KV cache belongs to another backend"))?;
        cpu::forward::check_forward_args(config, cache.len(), cache.capacity(), &[t])?;
        out.push(cache);
    }
    Ok(out)
}

/// Per sequence of a batched step, its pick: (token, logit) pairs, ranked.
pub type BatchPicks = Vec<Vec<(u32, f32)>>;

/// One compute path able to run the whole model.
pub trait Backend: Send + Sync {
    /// e.g. "cpu/vnni", "cuda:0".
    fn name(&self) -> String;
    fn config(&self) -> &ModelConfig;
    /// A cache for one sequence of up to `capacity` positions.
    fn new_cache(&self, capacity: usize) -> Result<Box<dyn KvCache>>;
    /// Run `tokens` at positions `cache.len()..`, appending to the cache.
    fn forward(&self, cache: &mut dyn KvCache, tokens: &[u32], output: Output) -> Result<Vec<f32>>;
    /// Run one token and return the greedy next token (the largest logit,
    /// the lowest index on ties) without handing out the logits, where the
    /// backend picks it itself (CUDA: on the device, so a decode step moves
    /// 4 bytes to the host instead of the vocabulary's logits). None: not
    /// offered here (nothing ran); call `forward` and sample.
    fn forward_greedy(&self, _cache: &mut dyn KvCache, _token: u32) -> Result<Option<u32>> {
        Ok(None)
    }
    /// Run one token and return the `k` largest next-token logits as
    /// (token, logit), ranked as `engine::sampling::ranked` ranks them, where
    /// the backend selects them itself (CUDA: on the device, k pairs to the
    /// host instead of the vocabulary's logits). None: not offered for this
    /// k (nothing ran); call `forward`.
    fn forward_top_k(&self, _cache: &mut dyn KvCache, _token: u32, _k: usize) -> Result<Option<Vec<(u32, f32)>>> {
        Ok(None)
    }
    /// One decode step of several sequences: `tokens[i]` appended to
    /// `caches[i]`; returns each sequence's next-token logits, `[i][vocab]`
    /// in one vector. The same logits as one `forward` per sequence; the
    /// default runs exactly that, a backend may run the batch as one call.
    fn forward_batch(&self, caches: &mut [&mut dyn KvCache], tokens: &[u32]) -> Result<Vec<f32>> {
        check_batch(caches.len(), tokens.len())?;
        let mut out = Vec::with_capacity(tokens.len() * self.config().vocab);
        for (c, &t) in caches.iter_mut().zip(tokens) {
            out.extend(self.forward(&mut **c, &[t], Output::LastLogits)?);
        }
        Ok(out)
    }
    /// [`Self::forward_batch`] where each sequence wants a pick, not its
    /// logits: `picks[i] = (k, greedy)`, and sequence i gets what
    /// `forward_greedy` (k = 1, greedy: the token, its logit NaN where the
    /// backend gives only the token) or `forward_top_k` (k) would return for
    /// it alone. None: not offered (nothing ran); call `forward_batch`. The
    /// default picks one sequence after another (CUDA: each on the device).
    fn forward_batch_pick(
        &self,
        caches: &mut [&mut dyn KvCache],
        tokens: &[u32],
        picks: &[(usize, bool)],
    ) -> Result<Option<BatchPicks>> {
        check_batch(caches.len(), tokens.len())?;
        if picks.len() != tokens.len() {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(tokens.len());
        for (i, (c, (&t, &(k, greedy)))) in caches.iter_mut().zip(tokens.iter().zip(picks)).enumerate() {
            let pick = match greedy {
                true => self.forward_greedy(&mut **c, t)?.map(|tok| vec![(tok, f32::NAN)]),
                false => self.forward_top_k(&mut **c, t, k)?,
            };
            out.push(match pick {
                Some(p) => p,
                // Not offered: nothing ran yet, or this sequence's logits
                // ranked here (the same pick by the trait's contract).
                None if i == 0 => return Ok(None),
                None => {
                    let l = self.forward(&mut **c, &[t], Output::LastLogits)?;
                    match greedy {
                        true => {
                            let tok = crate::logits::argmax(&l);
                            vec![(tok, l[tok as usize])]
                        }
                        false => crate::logits::ranked(&l, k),
                    }
                }
            });
        }
        Ok(Some(out))
    }
    /// Weight bytes this backend keeps resident in its own layout.
    fn resident_weight_bytes(&self) -> usize;
    /// Ternary weight bytes one decode step (one token) reads, where the
    /// backend knows them (its decode layout may be smaller than 2 bits).
    fn decode_ternary_bytes(&self) -> Option<usize> {
        None
    }
    /// Copy a cache made by this backend out as f32 (to move a sequence to
    /// another path).
    fn export_kv(&self, _cache: &mut dyn KvCache) -> Result<KvSnapshot> {
        Err(crate::Error::Unsupported(format!("{}: KV export", self.name())))
    }
    /// A new cache of `capacity` positions holding `snap`'s positions.
    fn import_kv(&self, _snap: &KvSnapshot, _capacity: usize) -> Result<Box<dyn KvCache>> {
        Err(crate::Error::Unsupported(format!("{}: KV import", self.name())))
    }
    /// The dispatcher behind this backend, if it is one (for plan reports).
    fn hybrid(&self) -> Option<&crate::dispatch::HybridBackend> {
        None
    }
}

/// A sequence's keys and values in a path-neutral form: per layer,
/// `[position][kv_dim]` f32, RoPE already applied to K.
#[derive(Clone, Debug, PartialEq)]
pub struct KvSnapshot {
    pub len: usize,
    pub kv_dim: usize,
    pub k: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

impl KvSnapshot {
    /// Check the snapshot fits `c` and `capacity` before anyone allocates.
    pub fn validate(&self, c: &ModelConfig, capacity: usize) -> Result<()> {
        let bad = |m: String| Err(crate::Error::input(format!("KV import: {m}")));
        if self.kv_dim != c.kv_dim() || self.k.len() != c.n_layers || self.v.len() != c.n_layers {
            return bad(format!(
                "snapshot has {} layers x {} kv dims, model has {} x {}",
                self.k.len(),
                self.kv_dim,
                c.n_layers,
                c.kv_dim()
            ));
        }
        if self.len > capacity.min(c.max_ctx) {
            return bad(format!("{} positions exceed a capacity of {capacity}", self.len));
        }
        let want = self.len.checked_mul(self.kv_dim);
        if self.k.iter().chain(&self.v).any(|l| Some(l.len()) != want) {
            return bad("layer lengths disagree with len x kv_dim".into());
        }
        Ok(())
    }

    pub fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(|l| l.len() * 4).sum()
    }
}
