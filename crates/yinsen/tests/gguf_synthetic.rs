//! Small GGUFs written by the test writer: formats, architectures, and every
//! kind of broken file the loader must refuse with a message.

mod gguf_support;

use gguf_support::*;
use yinsen::formats::gguf::testing::{TensorSpec, Writer};
use yinsen::formats::gguf::{self, types, Value};
use yinsen::formats::{LoadOptions, LoadedModel};
use yinsen::model::{Activation, TernaryMatrix, WeightScale};
use yinsen::Error;

fn load(w: &Writer) -> yinsen::Result<LoadedModel> {
    gguf::load_bytes(&w.to_bytes(), &LoadOptions::default())
}

/// Loading fails with a Format error naming "<memory>" and containing `needle`.
fn expect_err(bytes: &[u8], needle: &str) {
    match gguf::load_bytes(bytes, &LoadOptions::default()) {
        Ok(_) => panic!("loaded, expected an error containing {needle:?}"),
        Err(e @ Error::Format { .. }) => {
            let s = e.to_string();
            assert!(s.starts_with("<memory>: "), "{s}");
            assert!(s.contains(needle), "expected {needle:?} in: {s}");
        }
        Err(e) => panic!("wrong error kind: {e:?}"),
    }
}

fn ternary_of<'a>(lm: &'a LoadedModel, name: &str) -> &'a TernaryMatrix {
    let l: usize = name.split('.').nth(1).unwrap().parse().unwrap();
    let p = PROJ.iter().position(|p| name.contains(&format!(".{p}."))).unwrap();
    lm.model.layers[l].ternaries()[p].1
}

fn assert_matches_truth(lm: &LoadedModel, truth: &[(String, TernaryMatrix)]) {
    for (name, m) in truth {
        let got = ternary_of(lm, name);
        assert_eq!((got.n_out, got.n_in), (m.n_out, m.n_in), "{name}");
        assert_eq!(got.packed, m.packed, "{name}");
        assert_eq!(got.scale, m.scale, "{name}");
    }
}

#[test]
fn self_packed_i2_s_model_loads_and_matches() {
    let (w, truth) = model_writer("bitnet-b1.58", types::I2_S);
    let lm = load(&w).unwrap();
    assert_matches_truth(&lm, &truth);
    let c = &lm.model.config;
    assert_eq!(
        (c.hidden, c.ffn, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab),
        (256, 512, 4, 2, 64, 16)
    );
    assert_eq!(c.activation, Activation::Relu2);
    assert!(c.sub_norms);
    assert_eq!((c.bos, c.eos.clone(), c.add_bos), (Some(14), vec![15], true));
    // The embedding is the F32 bytes as written.
    let mut row = vec![f32::NAN; HIDDEN];
    lm.model.embed.row_to_f32(3, &mut row);
    let raw = &w.tensors[0].data[3 * HIDDEN * 4..4 * HIDDEN * 4];
    assert_eq!(f32_bytes(&row), raw);
}

#[test]
fn tq_formats_and_bitnet_llama_archs() {
    for t in [types::TQ2_0, types::TQ1_0] {
        let (mut w, truth) = model_writer("bitnet", t);
        w.kv("bitnet.hidden_activation", Value::Str("silu".into()));
        let lm = load(&w).unwrap();
        assert_matches_truth(&lm, &truth);
        assert_eq!(lm.model.config.activation, Activation::Silu);
        assert!(lm.warnings.is_empty());

        // Llama-style: no sub-norm tensors, SiLU.
        let (mut w, truth) = model_writer("llama", t);
        w.tensors.retain(|t| !t.name.contains("sub_norm"));
        let lm = load(&w).unwrap();
        assert_matches_truth(&lm, &truth);
        assert!(!lm.model.config.sub_norms);
        assert!(lm.model.layers[0].attn_sub_norm.is_none());
        assert_eq!(lm.model.config.activation, Activation::Silu);
    }
    // bitnet-25 requires its sub-norms.
    let (mut w, _) = model_writer("bitnet-25", types::TQ2_0);
    w.tensors.retain(|t| t.name != "blk.0.ffn_sub_norm.weight");
    expect_err(&w.to_bytes(), "missing tensor 'blk.0.ffn_sub_norm.weight'");
}

#[test]
fn per_block_scales_and_scale_tensors() {
    let (mut w, _) = model_writer("bitnet-b1.58", types::TQ2_0);
    // Row 0 of attn_q gets d = 0.5, every other block keeps the writer's d.
    let (o, i) = proj_shape("attn_q");
    let m = random_ternary(o, i, 5);
    let mut raw = encode(&m, types::TQ2_0);
    raw[64..66].copy_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
    w.tensor("blk.0.attn_q.weight", &[i as u64, o as u64], types::TQ2_0, raw);
    // attn_k carries a scale tensor of 3.0 (and a uniform d).
    w.tensor("blk.0.attn_k.scale", &[1], types::F32, f32_bytes(&[3.0]));
    let lm = load(&w).unwrap();
    let q = &lm.model.layers[0].wq;
    assert_eq!(q.packed, m.packed);
    let WeightScale::PerBlock { block: 256, scales } = &q.scale else {
        panic!("{:?}", q.scale)
    };
    let s = m.tensor_scale().unwrap();
    assert_eq!(scales[0], 0.5);
    assert!(scales[1..].iter().all(|&x| x == s));
    let k = &lm.model.layers[0].wk;
    let (ko, ki) = proj_shape("attn_k");
    let s_k = random_ternary(ko, ki, 1001).tensor_scale().unwrap();
    assert_eq!(k.scale, WeightScale::PerTensor(s_k * 3.0));
    // A scale tensor with two elements is refused.
    w.tensor("blk.0.attn_k.scale", &[2], types::F32, f32_bytes(&[3.0, 1.0]));
    expect_err(&w.to_bytes(), "blk.0.attn_k.scale");
}

#[test]
fn float_ternary_projections_are_quantized_with_absmean() {
    for (t, to_bytes) in [
        (types::F32, (|v: &[f32]| f32_bytes(v)) as fn(&[f32]) -> Vec<u8>),
        (types::F16, |v| {
            v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect()
        }),
        (types::BF16, |v| {
            v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect()
        }),
    ] {
        let (mut w, _) = model_writer("bitnet-b1.58", types::I2_S);
        let (o, i) = proj_shape("ffn_up");
        let m = random_ternary(o, i, 42);
        // W = t * 0.25 + small jitter of the same sign; mean|W| is known in f64.
        let mut g = yinsen::model::synthetic::SplitMix64(7);
        let v: Vec<f32> = (0..o * i)
            .map(|k| m.get(k / i, k % i) as f32 * (0.25 + g.next_f32() / 64.0))
            .collect();
        let v: Vec<f32> = v.iter().map(|x| half::bf16::from_f32(*x).to_f32()).collect();
        let mean = v.iter().map(|x| x.abs() as f64).sum::<f64>() / v.len() as f64;
        w.tensor("blk.0.ffn_up.weight", &[i as u64, o as u64], t, to_bytes(&v));
        let lm = load(&w).unwrap();
        let got = &lm.model.layers[0].w_up;
        // |W| / mean is about 1.5 for non-zeros: every trit survives.
        assert_eq!(got.packed, m.packed, "type {t}");
        let s = got.tensor_scale().unwrap() as f64;
        assert!((s - mean).abs() <= mean * 1e-6, "type {t}: {s} vs {mean}");
    }
}

#[test]
fn bitnet_without_activation_key_warns() {
    let (w, _) = model_writer("bitnet", types::TQ2_0);
    let lm = load(&w).unwrap();
    assert_eq!(lm.model.config.activation, Activation::Silu);
    assert!(
        lm.warnings.iter().any(|m| m.contains("hidden_activation")),
        "{:?}",
        lm.warnings
    );
    assert!(!lm.warnings.iter().any(|m| m.contains("2B4T")));
    let opts = LoadOptions {
        activation: Some(Activation::Relu2),
        ..Default::default()
    };
    let lm = gguf::load_bytes(&w.to_bytes(), &opts).unwrap();
    assert_eq!(lm.model.config.activation, Activation::Relu2);
    assert!(lm.warnings.is_empty());
}

/// Write `m` in bitnet.cpp's ARM layout: 64-weight blocks of 16 bytes.
fn encode_i2_s_arm(m: &TernaryMatrix, _t: u32) -> Vec<u8> {
    let n = m.n_out * m.n_in;
    let mut out = vec![0u8; n / 4 + 32];
    for k in 0..n {
        let code = (m.get(k / m.n_in, k % m.n_in) + 1) as u8;
        let j = k % 64;
        out[k / 64 * 16 + j % 16] |= code << (6 - 2 * (j / 16));
    }
    out[n / 4..n / 4 + 4].copy_from_slice(&m.tensor_scale().unwrap().to_le_bytes());
    out
}

#[test]
fn i2_s_of_other_layouts_is_refused() {
    // 64-weight blocks: a model whose rows (192) only fit 64-weight blocks.
    let shape = Shape {
        hidden: 192,
        ffn: 320,
        heads: 3,
        kv_heads: 1,
    };
    let (w, _) = model_writer_shaped("bitnet-b1.58", types::I2_S, &shape, encode_i2_s_arm);
    expect_err(&w.to_bytes(), "ARM");
    // Missing the 32-byte scale tail.
    let (mut w, _) = model_writer("bitnet-b1.58", types::I2_S);
    let t = w.tensor_mut("blk.0.attn_v.weight");
    t.data.truncate(t.data.len() - 32);
    expect_err(&w.to_bytes(), "blk.0.attn_v.weight' has type 36 but spans");
    // Twice the size (e.g. a one-byte-per-weight type 36 of upstream ggml).
    let (mut w, _) = model_writer("bitnet-b1.58", types::I2_S);
    let t = w.tensor_mut("blk.0.attn_v.weight");
    t.data.extend(vec![0x55; t.data.len()]);
    expect_err(&w.to_bytes(), "not the x86 I2_S layout");
    // Code 3 never occurs in I2_S.
    let (mut w, _) = model_writer("bitnet-b1.58", types::I2_S);
    w.tensor_mut("blk.0.ffn_down.weight").data[5] = 0xFF;
    expect_err(&w.to_bytes(), "code 3");
    // Type 36 on a non-ternary tensor is not I2_S.
    let (mut w, _) = model_writer("bitnet-b1.58", types::I2_S);
    w.tensor_mut("output_norm.weight").ggml_type = types::I2_S;
    expect_err(&w.to_bytes(), "output_norm.weight");
}

#[test]
fn header_errors() {
    let (w, _) = model_writer("bitnet-b1.58", types::I2_S);
    let good = w.to_bytes();
    let mut b = good.clone();
    b[..4].copy_from_slice(b"GGML");
    expect_err(&b, "not a GGUF file");
    for (v, needle) in [
        (1u32, "version 1"),
        (4, "version 4"),
        (3u32.swap_bytes(), "big-endian"),
        (0, "unsupported GGUF version 0"),
    ] {
        let mut b = good.clone();
        b[4..8].copy_from_slice(&v.to_le_bytes());
        expect_err(&b, needle);
    }
    expect_err(b"GG", "too short");
    let (mut w, _) = model_writer("gpt2", types::I2_S);
    w.kv("general.architecture", Value::Str("gpt2".into()));
    expect_err(&w.to_bytes(), "unsupported architecture 'gpt2'");
    let (mut w, _) = model_writer("bitnet-b1.58", types::I2_S);
    w.kv("general.alignment", Value::U32(48));
    expect_err(&w.to_bytes(), "power of two");
}

#[test]
fn metadata_errors() {
    let (w, _) = model_writer("bitnet-b1.58", types::I2_S);
    // Duplicate key.
    let mut d = Writer {
        kv: w.kv.clone(),
        ..Default::default()
    };
    d.kv.push(("general.architecture".into(), Value::Str("llama".into())));
    expect_err(&d.to_bytes(), "duplicate metadata key 'general.architecture'");
    // Non-UTF-8 string value names its key.
    let mut b = Writer {
        kv: vec![("general.name".into(), Value::Str("ab".into()))],
        ..Default::default()
    }
    .to_bytes();
    let pos = b.windows(2).position(|w| w == b"ab").unwrap();
    b[pos] = 0xFF;
    expect_err(&b, "key 'general.name' is not valid UTF-8");
    // Arrays nested too deep.
    let mut v = Value::Array(vec![Value::U8(1)]);
    for _ in 0..20 {
        v = Value::Array(vec![v]);
    }
    expect_err(
        &Writer {
            kv: vec![("deep".into(), v)],
            ..Default::default()
        }
        .to_bytes(),
        "nested",
    );
    // Missing required key.
    let mut m = Writer {
        kv: w.kv.clone(),
        ..Default::default()
    };
    m.kv.retain(|(k, _)| k != "bitnet-b1.58.block_count");
    expect_err(&m.to_bytes(), "missing metadata key 'bitnet-b1.58.block_count'");
}

/// Hand-made header with one key whose array claims `count` elements.
fn lying_array(elem_type: u32, count: u64) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes()); // tensors
    b.extend(1u64.to_le_bytes()); // keys
    b.extend(3u64.to_le_bytes());
    b.extend(b"arr");
    b.extend(9u32.to_le_bytes());
    b.extend(elem_type.to_le_bytes());
    b.extend(count.to_le_bytes());
    b.extend([0u8; 64]);
    b
}

#[test]
fn lying_counts_do_not_allocate() {
    for (t, n) in [
        (0u32, 1u64 << 40),
        (8, 1 << 61),
        (9, u64::MAX),
        (12, u64::MAX / 8 + 1),
        (0, 65),
    ] {
        expect_err(&lying_array(t, n), "cannot fit");
    }
    expect_err(&lying_array(77, 1), "unknown array element type 77");
    // An honest but absurd u8 array (2^24 + 1 elements present) is refused
    // rather than expanded into 32-byte values.
    let n = (1u64 << 24) + 1;
    let mut b = lying_array(0, n);
    b.resize(b.len() + n as usize, 0);
    expect_err(&b, "metadata array elements in all");
    // A tensor count of 2^62.
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend((1u64 << 62).to_le_bytes());
    b.extend(0u64.to_le_bytes());
    expect_err(&b, "tensor count");
    // A string length of 2^63.
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.extend((1u64 << 63).to_le_bytes());
    b.extend([0u8; 32]);
    expect_err(&b, "metadata key #0 length");
}

fn with_tensor(f: impl FnOnce(&mut Writer)) -> Vec<u8> {
    let (mut w, _) = model_writer("bitnet-b1.58", types::I2_S);
    f(&mut w);
    w.to_bytes()
}

#[test]
fn tensor_table_errors() {
    expect_err(
        &with_tensor(|w| w.tensor_mut("blk.0.attn_q.weight").offset_override = Some(1 << 40)),
        "past the end",
    );
    expect_err(
        &with_tensor(|w| w.tensor_mut("blk.0.attn_q.weight").offset_override = Some(8)),
        "not a multiple of the alignment",
    );
    expect_err(
        &with_tensor(|w| w.tensor_mut("blk.0.ffn_up.weight").offset_override = Some(0)),
        "overlaps",
    );
    expect_err(
        &with_tensor(|w| w.tensor_mut("output_norm.weight").dims = vec![1 << 40, 1 << 40]),
        "element count overflows",
    );
    // 2^62 F32 elements: a count that fits, a byte size (2^64) that does not.
    // (Found by the fuzzer: the size wrapped to 0 in release builds.)
    expect_err(
        &with_tensor(|w| {
            let t = w.tensor_mut("output_norm.weight");
            t.ggml_type = types::F32;
            t.dims = vec![1 << 31, 1 << 31];
        }),
        "too large",
    );
    expect_err(
        &with_tensor(|w| w.tensor_mut("output_norm.weight").dims = vec![1; 5]),
        "5 dims",
    );
    expect_err(
        &with_tensor(|w| w.tensor_mut("output_norm.weight").ggml_type = 99),
        "unknown ggml type id 99",
    );
    // Claims more bytes than the file holds.
    expect_err(
        &with_tensor(|w| w.tensor_mut("blk.0.ffn_down.weight").ggml_type = types::F32),
        "runs past the end",
    );
    expect_err(
        &with_tensor(|w| w.tensors.retain(|t| t.name != "blk.0.ffn_up.weight")),
        "missing tensor 'blk.0.ffn_up.weight'",
    );
    expect_err(
        &with_tensor(|w| w.tensors.retain(|t| t.name != "token_embd.weight")),
        "missing tensor 'token_embd.weight'",
    );
    expect_err(
        &with_tensor(|w| {
            let t = &w.tensors[1];
            let dup = TensorSpec {
                name: t.name.clone(),
                dims: t.dims.clone(),
                ggml_type: t.ggml_type,
                data: t.data.clone(),
                offset_override: None,
            };
            w.tensors.push(dup);
        }),
        "duplicate tensor name 'output_norm.weight'",
    );
    // Metadata says ffn 1024, tensors are 512 wide.
    expect_err(
        &with_tensor(|w| {
            w.kv("bitnet-b1.58.feed_forward_length", Value::U32(1024));
        }),
        "metadata implies",
    );
    // Vocabulary of 16 tokens, embedding of 17 rows.
    expect_err(
        &with_tensor(|w| {
            let t = w.tensor_mut("token_embd.weight");
            t.dims[1] = 17;
            t.data.extend(vec![0; HIDDEN * 4]);
        }),
        "token_embd.weight",
    );
    // Absurd config is refused before any tensor is touched.
    expect_err(
        &with_tensor(|w| {
            w.kv("bitnet-b1.58.block_count", Value::U64(1 << 40));
        }),
        "layer count",
    );
    // A ternary projection in an unsupported type.
    expect_err(
        &with_tensor(|w| {
            let (o, i) = proj_shape("attn_q");
            w.tensor(
                "blk.0.attn_q.weight",
                &[i as u64, o as u64],
                8,
                vec![0; o * i / 32 * 34],
            );
        }),
        "ternary tensor 'blk.0.attn_q.weight' has type Q8_0",
    );
}

#[test]
fn every_truncation_is_an_error() {
    // Smallest shape I2_S allows, so that every length is affordable.
    let b = smallest_i2_s_model();
    assert!(b.len() < 40_000, "{}", b.len());
    gguf::load_bytes(&b, &LoadOptions::default()).unwrap();
    for n in 0..b.len() {
        assert!(
            gguf::load_bytes(&b[..n], &LoadOptions::default()).is_err(),
            "prefix of {n} bytes loaded"
        );
    }
}

/// A SentencePiece ("llama") vocabulary in a model file: pieces, scores and
/// types come through the loader into a tokenizer that merges by score and
/// falls back to byte pieces; scores of the wrong count or kind and a
/// non-bool `add_space_prefix` are format errors naming the key.
#[test]
fn sentencepiece_vocabulary_from_gguf() {
    use yinsen::engine::tokenizer::Tokenizer;
    let (mut w, _) = model_writer("bitnet-b1.58", types::I2_S);
    // 0 <unk>, 1 <s>, 2 </s>, 3..=5 ▁ a b, 6 ▁a, 7 ab, 8 ▁ab, 9 <0x21>, then fillers.
    let mut pieces: Vec<(String, f32, i32)> = vec![
        ("<unk>".into(), 0.0, 2),
        ("<s>".into(), 0.0, 3),
        ("</s>".into(), 0.0, 3),
        ("▁".into(), -1.0, 1),
        ("a".into(), -1.0, 1),
        ("b".into(), -1.0, 1),
        ("▁a".into(), -2.0, 1),
        ("ab".into(), -3.0, 1),
        ("▁ab".into(), -4.0, 1),
        ("<0x21>".into(), 0.0, 6),
    ];
    while pieces.len() < VOCAB {
        pieces.push((format!("<pad{}>", pieces.len()), 0.0, 5));
    }
    let arr = |f: &dyn Fn(&(String, f32, i32)) -> Value| Value::Array(pieces.iter().map(f).collect());
    w.kv("tokenizer.ggml.model", Value::Str("llama".into()))
        .kv("tokenizer.ggml.tokens", arr(&|p| Value::Str(p.0.clone())))
        .kv("tokenizer.ggml.scores", arr(&|p| Value::F32(p.1)))
        .kv("tokenizer.ggml.token_type", arr(&|p| Value::I32(p.2)))
        .kv("tokenizer.ggml.bos_token_id", Value::U32(1))
        .kv("tokenizer.ggml.eos_token_id", Value::U32(2));
    w.kv.retain(|(k, _)| k != "tokenizer.ggml.merges");
    let lm = load(&w).unwrap();
    let tok = Tokenizer::from_spec(lm.tokenizer.as_ref().expect("tokenizer")).unwrap();
    assert_eq!(tok.encode("ab!", false).unwrap(), vec![8, 9]);
    assert_eq!(tok.encode("bab", false).unwrap(), vec![3, 5, 7]);
    // Decoding drops the prefix space (after a skipped BOS too), not later ones.
    assert_eq!(tok.decode(&[1, 8, 9, 2], true).unwrap(), "ab!");
    assert_eq!(tok.decode(&[8, 8], true).unwrap(), "ab ab");
    assert_eq!(tok.decode(&[1, 8], false).unwrap(), "<s> ab");
    assert!(tok.is_eos(2));
    // No chat template and no Llama-3 header tokens: --chat is refused.
    let path = std::env::temp_dir().join(format!("yinsen-spm-{}.gguf", std::process::id()));
    std::fs::write(&path, w.to_bytes()).unwrap();
    let engine = yinsen::engine::Engine::load(
        path.to_str().unwrap(),
        yinsen::engine::EngineOptions {
            backend: "cpu".into(),
            ..Default::default()
        },
    )
    .unwrap();
    std::fs::remove_file(&path).ok();
    assert_eq!(engine.encode_prompt("ab").unwrap(), vec![1, 8]);
    let e = engine.chat_prompt(None, "ab").unwrap_err().to_string();
    assert!(e.contains("no chat template"), "{e}");
    // Without the space prefix.
    w.kv("tokenizer.ggml.add_space_prefix", Value::Bool(false));
    let tok = Tokenizer::from_spec(load(&w).unwrap().tokenizer.as_ref().unwrap()).unwrap();
    assert_eq!(tok.encode("ab", false).unwrap(), vec![7]);
    for (key, v, needle) in [
        (
            "tokenizer.ggml.scores",
            Value::Array(vec![Value::F32(0.0)]),
            "tokenizer.ggml.scores has 1 entries",
        ),
        (
            "tokenizer.ggml.scores",
            Value::F32(0.0),
            "tokenizer.ggml.scores is not an array",
        ),
        (
            "tokenizer.ggml.scores",
            Value::Array(vec![Value::Str("x".into()); VOCAB]),
            "tokenizer.ggml.scores holds non-numbers",
        ),
        (
            "tokenizer.ggml.add_space_prefix",
            Value::U8(1),
            "add_space_prefix is not a bool",
        ),
    ] {
        let kept = w.kv.clone();
        w.kv(key, v);
        expect_err(&w.to_bytes(), needle);
        w.kv = kept;
    }
}
