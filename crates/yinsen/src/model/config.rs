//! Model hyper-parameters, independent of the file they came from.

use serde::Serialize;

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// relu(gate)^2 * up — BitNet b1.58 2B4T.
    Relu2,
    /// silu(gate) * up — Llama-style ternary models (1bitLLM, Falcon3).
    Silu,
}

impl Activation {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "relu2" | "relu_squared" | "relu²" | "squared_relu" => Some(Activation::Relu2),
            "silu" | "swish" => Some(Activation::Silu),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ModelConfig {
    /// Architecture as named by the file (`bitnet-b1.58`, `bitnet`, `BitNetForCausalLM`, ...).
    pub arch: String,
    pub hidden: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub max_ctx: usize,
    pub rope_theta: f32,
    pub rms_eps: f32,
    pub activation: Activation,
    /// attn_sub_norm / ffn_sub_norm present (BitNet); absent for Llama-style.
    pub sub_norms: bool,
    pub tied_embeddings: bool,
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
    /// Prepend BOS when tokenizing a prompt.
    pub add_bos: bool,
}

/// Sanity limits: anything past these is a lying file, not a model.
pub const MAX_DIM: usize = 1 << 20;
pub const MAX_LAYERS: usize = 1024;
pub const MAX_VOCAB: usize = 1 << 24;

impl ModelConfig {
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Reject shapes no real model has (zero, huge, inconsistent head split).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::input(format!("invalid model config: {m}")));
        for (name, v, max) in [
            ("hidden size", self.hidden, MAX_DIM),
            ("layer count", self.n_layers, MAX_LAYERS),
            ("head count", self.n_heads, MAX_DIM),
            ("kv head count", self.n_kv_heads, MAX_DIM),
            ("head dim", self.head_dim, MAX_DIM),
            ("ffn size", self.ffn, MAX_DIM),
            ("vocab size", self.vocab, MAX_VOCAB),
            ("context length", self.max_ctx, 1 << 24),
        ] {
            if v == 0 || v > max {
                return bad(format!("{name} = {v} (must be 1..={max})"));
            }
        }
        if self.n_heads % self.n_kv_heads != 0 {
            return bad(format!(
                "{} heads is not a multiple of {} kv heads",
                self.n_heads, self.n_kv_heads
            ));
        }
        if self.head_dim % 2 != 0 {
            return bad(format!("head dim {} is odd (RoPE rotates pairs)", self.head_dim));
        }
        if !(self.rms_eps > 0.0 && self.rms_eps < 1.0) {
            return bad(format!("rms eps {}", self.rms_eps));
        }
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return bad(format!("rope theta {}", self.rope_theta));
        }
        for &t in self.bos.iter().chain(&self.eos) {
            if t as usize >= self.vocab {
                return bad(format!("special token {t} >= vocab {}", self.vocab));
            }
        }
        Ok(())
    }

    /// BitNet-2B4T's shape, which was trained with relu².
    pub fn looks_like_2b4t(&self) -> bool {
        self.hidden == 2560 && self.vocab == 128256
    }
}
