//! Embeddings: a text's last hidden states pooled into one vector, its
//! tokens run as one call (the throughput path, `Output::Hidden`).

use super::Engine;
use crate::backends::Output;
use crate::error::{Error, Result};

/// How a text's per-token hidden states become one vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    /// The mean over tokens.
    Mean,
    /// The last token's (what a causal model has read the whole text at).
    Last,
}

impl Pooling {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "mean" => Ok(Pooling::Mean),
            "last" => Ok(Pooling::Last),
            other => Err(Error::input(format!("unknown pooling '{other}' (mean, last)"))),
        }
    }
}

/// Pool `[n, hidden]` hidden states (n >= 1) into one vector, scaled to unit
/// L2 norm with `normalize` (a zero vector stays zero).
pub fn pool(h: &[f32], hidden: usize, pooling: Pooling, normalize: bool) -> Vec<f32> {
    let n = h.len() / hidden;
    let mut v = match pooling {
        Pooling::Last => h[(n - 1) * hidden..n * hidden].to_vec(),
        Pooling::Mean => {
            let mut m = vec![0f32; hidden];
            for row in h.chunks_exact(hidden) {
                m.iter_mut().zip(row).for_each(|(a, b)| *a += b);
            }
            m.iter_mut().for_each(|a| *a /= n as f32);
            m
        }
    };
    if normalize {
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            v.iter_mut().for_each(|x| *x /= norm);
        }
    }
    v
}

impl Engine {
    /// The embedding of token ids `ids` (as [`Engine::encode_prompt`] gives
    /// them), in a cache of its own.
    pub fn embed(&self, ids: &[u32], pooling: Pooling, normalize: bool) -> Result<Vec<f32>> {
        if ids.is_empty() {
            return Err(Error::input("nothing to embed: the input has no tokens"));
        }
        let max = self.model.config.max_ctx;
        if ids.len() > max {
            return Err(Error::input(format!(
                "the input has {} tokens; the model's context holds {max}",
                ids.len()
            )));
        }
        let mut cache = self.backend.new_cache(ids.len())?;
        let h = self.backend.forward(cache.as_mut(), ids, Output::Hidden)?;
        Ok(pool(&h, self.model.config.hidden, pooling, normalize))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_and_normalises() {
        let h = [1.0, 2.0, 3.0, 6.0];
        assert_eq!(pool(&h, 2, Pooling::Mean, false), vec![2.0, 4.0]);
        assert_eq!(pool(&h, 2, Pooling::Last, false), vec![3.0, 6.0]);
        let v = pool(&h, 2, Pooling::Last, true);
        assert!((v[0] - 3.0 / 45f32.sqrt()).abs() < 1e-7 && (v[1] - 6.0 / 45f32.sqrt()).abs() < 1e-7);
        assert_eq!(pool(&[0.0, 0.0], 2, Pooling::Mean, true), vec![0.0, 0.0]);
        assert!(Pooling::parse("max").is_err());
    }
}
