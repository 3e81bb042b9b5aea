//! The model graph as plain structs: configuration plus weights in canonical
//! form. Backends derive their own layouts from this; nothing here knows them.

pub mod config;
pub mod dense;
pub mod synthetic;
pub mod ternary;

pub use config::{Activation, ModelConfig};
pub use dense::{DenseMatrix, DenseType, Storage};
pub use ternary::{TernaryMatrix, WeightScale};

use crate::error::{Error, Result};

/// One transformer block.
#[derive(Clone, Debug)]
pub struct Layer {
    pub attn_norm: Vec<f32>,
    pub wq: TernaryMatrix,
    pub wk: TernaryMatrix,
    pub wv: TernaryMatrix,
    pub wo: TernaryMatrix,
    /// RMSNorm before o_proj (BitNet only).
    pub attn_sub_norm: Option<Vec<f32>>,
    pub ffn_norm: Vec<f32>,
    pub w_gate: TernaryMatrix,
    pub w_up: TernaryMatrix,
    pub w_down: TernaryMatrix,
    /// RMSNorm before down_proj (BitNet only).
    pub ffn_sub_norm: Option<Vec<f32>>,
}

impl Layer {
    pub fn ternaries(&self) -> [(&'static str, &TernaryMatrix); 7] {
        [
            ("q", &self.wq),
            ("k", &self.wk),
            ("v", &self.wv),
            ("o", &self.wo),
            ("gate", &self.w_gate),
            ("up", &self.w_up),
            ("down", &self.w_down),
        ]
    }
}

#[derive(Clone, Debug)]
pub struct Model {
    pub config: ModelConfig,
    /// `[vocab, hidden]` token embedding (also the lm_head when tied).
    pub embed: DenseMatrix,
    /// Untied lm_head `[vocab, hidden]`.
    pub output: Option<DenseMatrix>,
    pub final_norm: Vec<f32>,
    pub layers: Vec<Layer>,
}

impl Model {
    /// The matrix the logits are computed with.
    pub fn lm_head(&self) -> &DenseMatrix {
        self.output.as_ref().unwrap_or(&self.embed)
    }

    /// Check every tensor against the config, so kernels can trust shapes.
    pub fn validate(&self) -> Result<()> {
        let c = &self.config;
        c.validate()?;
        let e = |m: String| Err(Error::input(format!("model shape mismatch: {m}")));
        if self.embed.rows != c.vocab || self.embed.cols != c.hidden {
            return e(format!(
                "token embedding is {}x{}, config says {}x{}",
                self.embed.rows, self.embed.cols, c.vocab, c.hidden
            ));
        }
        if let Some(o) = &self.output {
            if o.rows != c.vocab || o.cols != c.hidden {
                return e(format!(
                    "lm_head is {}x{}, expected {}x{}",
                    o.rows, o.cols, c.vocab, c.hidden
                ));
            }
        }
        if self.final_norm.len() != c.hidden {
            return e(format!(
                "final norm has {} weights, hidden is {}",
                self.final_norm.len(),
                c.hidden
            ));
        }
        if self.layers.len() != c.n_layers {
            return e(format!(
                "{} layers loaded, config says {}",
                self.layers.len(),
                c.n_layers
            ));
        }
        for (i, l) in self.layers.iter().enumerate() {
            let want = [
                ("q", c.q_dim(), c.hidden),
                ("k", c.kv_dim(), c.hidden),
                ("v", c.kv_dim(), c.hidden),
                ("o", c.hidden, c.q_dim()),
                ("gate", c.ffn, c.hidden),
                ("up", c.ffn, c.hidden),
                ("down", c.hidden, c.ffn),
            ];
            for ((name, m), (_, o, i_)) in l.ternaries().into_iter().zip(want) {
                if m.n_out != o || m.n_in != i_ {
                    return e(format!(
                        "layer {i} {name}_proj is {}x{}, expected {o}x{i_}",
                        m.n_out, m.n_in
                    ));
                }
            }
            for (name, v, n) in [
                ("attn_norm", Some(&l.attn_norm), c.hidden),
                ("ffn_norm", Some(&l.ffn_norm), c.hidden),
                ("attn_sub_norm", l.attn_sub_norm.as_ref(), c.hidden),
                ("ffn_sub_norm", l.ffn_sub_norm.as_ref(), c.ffn),
            ] {
                if let Some(v) = v {
                    if v.len() != n {
                        return e(format!("layer {i} {name} has {} weights, expected {n}", v.len()));
                    }
                }
            }
            if c.sub_norms && (l.attn_sub_norm.is_none() || l.ffn_sub_norm.is_none()) {
                return e(format!("layer {i} lacks its sub-norms"));
            }
        }
        Ok(())
    }

    /// Bytes of weights held (ternary codes + dense tensors + norms).
    pub fn resident_bytes(&self) -> usize {
        let norms = |l: &Layer| {
            4 * (l.attn_norm.len()
                + l.ffn_norm.len()
                + l.attn_sub_norm.as_ref().map_or(0, Vec::len)
                + l.ffn_sub_norm.as_ref().map_or(0, Vec::len))
        };
        self.embed.resident_bytes()
            + self.output.as_ref().map_or(0, DenseMatrix::resident_bytes)
            + self
                .layers
                .iter()
                .map(|l| norms(l) + l.ternaries().iter().map(|(_, m)| m.resident_bytes()).sum::<usize>())
                .sum::<usize>()
    }

    pub fn ternary_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.ternaries().iter().map(|(_, m)| m.packed.len()).sum::<usize>())
            .sum()
    }
}
