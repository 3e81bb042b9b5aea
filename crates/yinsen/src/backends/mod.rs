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

/// One compute path able to run the whole model.
pub trait Backend: Send + Sync {
    /// e.g. "cpu/vnni", "cuda:0".
    fn name(&self) -> String;
    fn config(&self) -> &ModelConfig;
    /// A cache for one sequence of up to `capacity` positions.
    fn new_cache(&self, capacity: usize) -> Result<Box<dyn KvCache>>;
    /// Run `tokens` at positions `cache.len()..`, appending to the cache.
    fn forward(&self, cache: &mut dyn KvCache, tokens: &[u32], output: Output) -> Result<Vec<f32>>;
    /// Weight bytes this backend keeps resident in its own layout.
    fn resident_weight_bytes(&self) -> usize;
}
