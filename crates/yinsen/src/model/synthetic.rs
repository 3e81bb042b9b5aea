//! `synthetic:<shape>`: deterministic random ternary models generated in
//! memory, for benchmarks and demos where no file is at hand.
//!
//! The generator is a hand-rolled SplitMix64 rather than a crate so the
//! weights stay bit-identical across dependency upgrades (benchmarks and
//! tests compare runs made months apart).

use rayon::prelude::*;

use super::{Activation, DenseMatrix, DenseType, Layer, Model, ModelConfig, Storage, TernaryMatrix, WeightScale};
use crate::error::{Error, Result};

/// SplitMix64: tiny, fast, statistically fine for weights.
#[derive(Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    #[inline]
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

fn seed_of(name: &str) -> u64 {
    // FNV-1a: stable across platforms and releases.
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// The shapes `synthetic:` knows. Returns the config (with no tokenizer ids
/// beyond a byte-level BOS/EOS convention).
pub fn shape(name: &str) -> Option<ModelConfig> {
    // (hidden, layers, heads, kv heads, ffn, vocab, ctx, activation, sub_norms)
    let (hidden, n_layers, n_heads, n_kv_heads, ffn, vocab, max_ctx, activation, sub_norms) = match name {
        // microsoft/bitnet-b1.58-2B-4T, exactly.
        "2b4t" => (2560, 30, 20, 5, 6912, 128256, 4096, Activation::Relu2, true),
        // 1bitLLM/bitnet_b1_58-large (Llama-style).
        "700m" => (1536, 24, 16, 16, 4096, 32002, 2048, Activation::Silu, false),
        "125m" => (768, 12, 12, 12, 2048, 32000, 2048, Activation::Relu2, true),
        // 2B4T's layer shape (20 query heads over 5 KV heads, head dim 128),
        // two layers and a small vocabulary: the kernels' group-of-4
        // attention on a model tests can afford.
        "2b4t-2l" => (2560, 2, 20, 5, 6912, 4096, 4096, Activation::Relu2, true),
        // The fixture model's shape.
        "tiny" => (256, 2, 4, 2, 768, 2048, 1024, Activation::Relu2, true),
        _ => return None,
    };
    Some(ModelConfig {
        arch: format!("synthetic:{name}"),
        hidden,
        n_layers,
        n_heads,
        n_kv_heads,
        head_dim: hidden / n_heads,
        ffn,
        vocab,
        max_ctx,
        rope_theta: 500000.0,
        rms_eps: 1e-5,
        activation,
        sub_norms,
        tied_embeddings: true,
        bos: Some(vocab as u32 - 2),
        eos: vec![vocab as u32 - 1],
        add_bos: true,
    })
}

pub const SHAPES: [&str; 5] = ["2b4t", "700m", "125m", "2b4t-2l", "tiny"];

/// Random ternary matrix: 25% zeros, the rest +-1 evenly, and a
/// per-tensor scale of 2^-e (e in 5..=7), as absmean ternarisation gives.
pub fn random_ternary(n_out: usize, n_in: usize, seed: u64) -> Result<TernaryMatrix> {
    let e = 5 + (seed % 3) as i32;
    let mut m = TernaryMatrix::zeros(n_out, n_in, WeightScale::PerTensor(2f32.powi(-e)))?;
    let rb = m.row_bytes();
    // 4 random bits per weight: 0..=3 -> 0, 4..=9 -> +1, 10..=15 -> -1.
    const CODE: [u8; 16] = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2];
    m.packed.par_chunks_mut(rb).enumerate().for_each(|(r, row)| {
        let mut rng = SplitMix64(seed ^ (r as u64).wrapping_mul(0xA24B_AED4_963E_E407));
        for (b, byte) in row.iter_mut().enumerate() {
            let bits = rng.next_u64();
            let mut v = 0u8;
            for k in 0..4 {
                if b * 4 + k < n_in {
                    v |= CODE[((bits >> (4 * k)) & 15) as usize] << (2 * k);
                }
            }
            *byte = v;
        }
    });
    Ok(m)
}

/// Build `synthetic:<name>` in memory.
pub fn build(name: &str) -> Result<Model> {
    let config = shape(name).ok_or_else(|| {
        Error::input(format!(
            "unknown synthetic shape '{name}' (known: {})",
            SHAPES.join(", ")
        ))
    })?;
    let c = &config;
    let base = seed_of(name);
    let t = |what: &str, l: usize, o: usize, i: usize| random_ternary(o, i, base ^ seed_of(&format!("{l}.{what}")));
    let norm = |n: usize, s: u64| -> Vec<f32> {
        let mut r = SplitMix64(base ^ s);
        (0..n).map(|_| 0.5 + r.next_f32()).collect()
    };
    let mut layers = Vec::with_capacity(c.n_layers);
    for l in 0..c.n_layers {
        let s = (l as u64 + 1) << 8;
        layers.push(Layer {
            attn_norm: norm(c.hidden, s + 1),
            wq: t("q", l, c.q_dim(), c.hidden)?,
            wk: t("k", l, c.kv_dim(), c.hidden)?,
            wv: t("v", l, c.kv_dim(), c.hidden)?,
            wo: t("o", l, c.hidden, c.q_dim())?,
            attn_sub_norm: c.sub_norms.then(|| norm(c.hidden, s + 2)),
            ffn_norm: norm(c.hidden, s + 3),
            w_gate: t("gate", l, c.ffn, c.hidden)?,
            w_up: t("up", l, c.ffn, c.hidden)?,
            w_down: t("down", l, c.hidden, c.ffn)?,
            ffn_sub_norm: c.sub_norms.then(|| norm(c.ffn, s + 4)),
        });
    }
    // F16 embedding, uniform with std ~0.02 (like a trained embedding's scale).
    let n = c.vocab * c.hidden;
    let mut emb = crate::mem::huge_vec(n * 2, 0u8);
    let table: Vec<[u8; 2]> = (0..1024)
        .map(|k| half::f16::from_f32((k as f32 - 511.5) * (0.0346 / 512.0)).to_le_bytes())
        .collect();
    emb.par_chunks_mut(2 * c.hidden).enumerate().for_each(|(r, row)| {
        let mut rng = SplitMix64(base ^ 0xE3B0_C442 ^ (r as u64).wrapping_mul(0x9E37_79B9));
        for px in row.chunks_exact_mut(2) {
            px.copy_from_slice(&table[(rng.next_u64() >> 54) as usize]);
        }
    });
    let embed = DenseMatrix::new(c.vocab, c.hidden, DenseType::F16, Storage::owned(emb))?;
    let model = Model {
        final_norm: norm(c.hidden, 7),
        config,
        embed,
        output: None,
        layers,
    };
    model.validate()?;
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_is_deterministic_and_ternary() {
        let a = build("tiny").unwrap();
        let b = build("tiny").unwrap();
        assert_eq!(a.layers[1].w_down.packed, b.layers[1].w_down.packed);
        let m = &a.layers[0].wq;
        let (mut z, mut p, mut n) = (0, 0, 0);
        for r in 0..m.n_out {
            for c in 0..m.n_in {
                match m.get(r, c) {
                    0 => z += 1,
                    1 => p += 1,
                    _ => n += 1,
                }
            }
        }
        let tot = (z + p + n) as f64;
        assert!((z as f64 / tot - 0.25).abs() < 0.02, "zeros {z}");
        assert!((p as f64 / tot - n as f64 / tot).abs() < 0.02);
        // No reserved codes.
        assert!(m.packed.iter().all(|b| (0..4).all(|k| (b >> (2 * k)) & 3 != 3)));
    }

    #[test]
    fn unknown_shape_is_an_error() {
        assert!(build("nope").is_err());
    }
}
