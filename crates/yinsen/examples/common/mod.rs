//! What the attention examples share: the 2B4T attention shape and a small
//! deterministic generator of uniform test values.

use yinsen::backends::cpu::attention::AttnShape;

/// 20 query heads, 5 KV heads, head_dim 128: q rows of 2560, K/V rows of 640.
pub fn shape_2b4t() -> (AttnShape, usize, usize) {
    let s = AttnShape {
        n_heads: 20,
        n_kv_heads: 5,
        head_dim: 128,
    };
    (s, 2560, 640)
}

/// Uniform values in [-a, a) from a 64-bit LCG (seed 1).
pub struct Values(u64);

impl Values {
    pub fn new() -> Self {
        Values(1)
    }

    pub fn take(&mut self, k: usize, a: f32) -> Vec<f32> {
        (0..k)
            .map(|_| {
                self.0 = self
                    .0
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a
            })
            .collect()
    }
}
