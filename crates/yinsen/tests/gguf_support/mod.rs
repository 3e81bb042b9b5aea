//! Builds small, valid GGUF models in memory for the gguf_* tests.
#![allow(dead_code)]

use yinsen::formats::gguf::testing::Writer;
use yinsen::formats::gguf::{types, Value};
use yinsen::formats::quants;
use yinsen::model::synthetic::SplitMix64;
use yinsen::model::{TernaryMatrix, WeightScale};

pub const HIDDEN: usize = 256;
pub const FFN: usize = 512;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const HEAD_DIM: usize = 64;
pub const VOCAB: usize = 16;
pub const LAYERS: usize = 1;

/// Ternary projection names in `Layer` order (the reader's own list).
pub const PROJ: [&str; 7] = yinsen::formats::gguf::TERNARY;

#[derive(Clone, Copy)]
pub struct Shape {
    pub hidden: usize,
    pub ffn: usize,
    pub heads: usize,
    pub kv_heads: usize,
}

pub const SHAPE: Shape = Shape {
    hidden: HIDDEN,
    ffn: FFN,
    heads: HEADS,
    kv_heads: KV_HEADS,
};

/// (n_out, n_in) of each projection (head_dim 64).
pub fn proj_shape_of(s: &Shape, p: &str) -> (usize, usize) {
    let hd = 64;
    match p {
        "attn_q" => (s.heads * hd, s.hidden),
        "attn_k" | "attn_v" => (s.kv_heads * hd, s.hidden),
        "attn_output" => (s.hidden, s.heads * hd),
        "ffn_gate" | "ffn_up" => (s.ffn, s.hidden),
        _ => (s.hidden, s.ffn),
    }
}

pub fn proj_shape(p: &str) -> (usize, usize) {
    proj_shape_of(&SHAPE, p)
}

/// Random trits (about a third each) with a power-of-two scale.
pub fn random_ternary(n_out: usize, n_in: usize, seed: u64) -> TernaryMatrix {
    let mut g = SplitMix64(seed);
    let trits: Vec<i8> = (0..n_out * n_in).map(|_| (g.next_u64() % 3) as i8 - 1).collect();
    let scale = 2f32.powi(-5 - (seed % 3) as i32);
    TernaryMatrix::from_trits(n_out, n_in, &trits, WeightScale::PerTensor(scale)).unwrap()
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn norm(n: usize, seed: u64) -> Vec<u8> {
    let mut g = SplitMix64(seed);
    f32_bytes(&(0..n).map(|_| 0.5 + g.next_f32()).collect::<Vec<_>>())
}

/// Encode `m` in ggml type `t` (TQ2_0, TQ1_0 or I2_S).
pub fn encode(m: &TernaryMatrix, t: u32) -> Vec<u8> {
    match t {
        types::TQ2_0 => quants::encode_tq2_0(m).unwrap(),
        types::TQ1_0 => quants::encode_tq1_0(m).unwrap(),
        types::I2_S => quants::encode_i2_s(m).unwrap(),
        _ => panic!("not a ternary type"),
    }
}

/// A complete small model with ternary tensors of type `t`; also returns the
/// matrices written, keyed by tensor name, as the ground truth.
pub fn model_writer(arch: &str, t: u32) -> (Writer, Vec<(String, TernaryMatrix)>) {
    model_writer_shaped(arch, t, &SHAPE, encode)
}

/// The smallest model I2_S allows (128-wide rows), a few tens of KB: cheap
/// enough to truncate at every length or mutate thousands of times.
pub fn smallest_i2_s_model() -> Vec<u8> {
    let shape = Shape {
        hidden: 128,
        ffn: 128,
        heads: 2,
        kv_heads: 1,
    };
    model_writer_shaped("bitnet-b1.58", types::I2_S, &shape, encode)
        .0
        .to_bytes()
}

/// As [`model_writer`] with another shape and ternary encoder.
pub fn model_writer_shaped(
    arch: &str,
    t: u32,
    s: &Shape,
    enc: fn(&TernaryMatrix, u32) -> Vec<u8>,
) -> (Writer, Vec<(String, TernaryMatrix)>) {
    let (hidden, ffn) = (s.hidden, s.ffn);
    let mut w = Writer::default();
    let k = |s: &str| format!("{arch}.{s}");
    w.kv("general.architecture", Value::Str(arch.into()))
        .kv(&k("embedding_length"), Value::U32(hidden as u32))
        .kv(&k("block_count"), Value::U32(LAYERS as u32))
        .kv(&k("feed_forward_length"), Value::U32(ffn as u32))
        .kv(&k("attention.head_count"), Value::U32(s.heads as u32))
        .kv(&k("attention.head_count_kv"), Value::U32(s.kv_heads as u32))
        .kv(&k("attention.layer_norm_rms_epsilon"), Value::F32(1e-5))
        .kv(&k("rope.freq_base"), Value::F32(500000.0))
        .kv(&k("context_length"), Value::U32(512))
        .kv("tokenizer.ggml.model", Value::Str("gpt2".into()))
        .kv(
            "tokenizer.ggml.tokens",
            Value::Array((0..VOCAB).map(|i| Value::Str(format!("t{i}"))).collect()),
        )
        .kv("tokenizer.ggml.token_type", Value::Array(vec![Value::I32(1); VOCAB]))
        .kv("tokenizer.ggml.merges", Value::Array(vec![Value::Str("t 1".into())]))
        .kv("tokenizer.ggml.bos_token_id", Value::U32(14))
        .kv("tokenizer.ggml.eos_token_id", Value::U32(15));
    let mut g = SplitMix64(99);
    let embed: Vec<f32> = (0..VOCAB * hidden).map(|_| g.next_f32() - 0.5).collect();
    w.tensor(
        "token_embd.weight",
        &[hidden as u64, VOCAB as u64],
        types::F32,
        f32_bytes(&embed),
    );
    w.tensor("output_norm.weight", &[hidden as u64], types::F32, norm(hidden, 1));
    let mut truth = Vec::new();
    for l in 0..LAYERS {
        for (i, n) in ["attn_norm", "ffn_norm", "attn_sub_norm"].iter().enumerate() {
            w.tensor(
                &format!("blk.{l}.{n}.weight"),
                &[hidden as u64],
                types::F32,
                norm(hidden, (l * 10 + i) as u64),
            );
        }
        w.tensor(
            &format!("blk.{l}.ffn_sub_norm.weight"),
            &[ffn as u64],
            types::F32,
            norm(ffn, 77 + l as u64),
        );
        for (i, p) in PROJ.iter().enumerate() {
            let (o, n_in) = proj_shape_of(s, p);
            let m = random_ternary(o, n_in, (l * 7 + i) as u64 + 1000);
            let name = format!("blk.{l}.{p}.weight");
            w.tensor(&name, &[n_in as u64, o as u64], t, enc(&m, t));
            truth.push((name, m));
        }
    }
    (w, truth)
}
