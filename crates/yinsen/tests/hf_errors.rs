//! The HF loader on hand-made inputs: exact conversions of small tensors,
//! every documented error, directory layouts, and a mutation run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use half::bf16;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Value};
use yinsen::formats::{hf, LoadOptions, LoadedModel};
use yinsen::model::{Activation, Storage, WeightScale};
use yinsen::Error;

/// Deterministic xorshift so failures reproduce.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

type Tensors = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

/// A small model: hidden 8, ffn 16, 1 layer, 2 heads x 4, 1 kv head, vocab 16.
struct Tiny {
    cfg: Value,
    t: Tensors,
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect()
}

impl Tiny {
    fn new(packed: bool) -> Self {
        let cfg = json!({
            "architectures": ["BitNetForCausalLM"],
            "hidden_act": "relu2",
            "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 16,
            "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "rope_scaling": null, "tie_word_embeddings": true,
            "bos_token_id": 14, "eos_token_id": 15,
            "quantization_config": {"quant_method": "bitnet", "linear_class": "bitlinear",
                                     "quantization_mode": if packed { "offline" } else { "online" }},
        });
        let mut me = Tiny { cfg, t: Tensors::new() };
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let emb: Vec<f32> = (0..16 * 8).map(|i| (i as f32 - 60.0) / 64.0).collect();
        me.put("model.embed_tokens.weight", Dtype::BF16, &[16, 8], bf16_bytes(&emb));
        me.put("model.norm.weight", Dtype::F32, &[8], f32_bytes(&[1.5; 8]));
        let p = "model.layers.0";
        for n in ["input_layernorm", "post_attention_layernorm", "self_attn.attn_sub_norm"] {
            me.put(&format!("{p}.{n}.weight"), Dtype::BF16, &[8], bf16_bytes(&[0.75; 8]));
        }
        me.put(
            &format!("{p}.mlp.ffn_sub_norm.weight"),
            Dtype::F32,
            &[16],
            f32_bytes(&[1.25; 16]),
        );
        for (name, o, i) in linears() {
            let full = format!("{p}.{name}");
            if packed {
                let codes: Vec<u8> = (0..o / 4 * i)
                    .map(|_| (0..4).map(|k| (rng.below(3) as u8) << (2 * k)).sum())
                    .collect();
                me.put(&format!("{full}.weight"), Dtype::U8, &[o / 4, i], codes);
                me.put(&format!("{full}.weight_scale"), Dtype::BF16, &[1], bf16_bytes(&[4.0]));
            } else {
                let w: Vec<f32> = (0..o * i).map(|_| (rng.below(17) as f32 - 8.0) / 32.0).collect();
                me.put(&format!("{full}.weight"), Dtype::F32, &[o, i], f32_bytes(&w));
            }
        }
        me
    }

    fn put(&mut self, name: &str, dt: Dtype, shape: &[usize], data: Vec<u8>) {
        self.t.insert(name.to_string(), (dt, shape.to_vec(), data));
    }

    fn st_bytes(t: &Tensors) -> Vec<u8> {
        let views: Vec<(String, TensorView)> = t
            .iter()
            .map(|(n, (dt, s, d))| (n.clone(), TensorView::new(*dt, s.clone(), d).unwrap()))
            .collect();
        safetensors::serialize(views, None).unwrap()
    }

    fn bytes(&self) -> (Vec<u8>, Vec<u8>) {
        (serde_json::to_vec(&self.cfg).unwrap(), Self::st_bytes(&self.t))
    }

    fn load(&self) -> yinsen::Result<LoadedModel> {
        let (c, s) = self.bytes();
        hf::load_parts(&c, &[&s], &LoadOptions::default())
    }

    fn err(&self) -> String {
        match self.load() {
            Ok(_) => panic!("loaded a bad model"),
            Err(e) => e.to_string(),
        }
    }

    fn write_dir(&self, dir: &Path) {
        let (c, s) = self.bytes();
        std::fs::write(dir.join("config.json"), c).unwrap();
        std::fs::write(dir.join("model.safetensors"), s).unwrap();
    }
}

const Q: &str = "model.layers.0.self_attn.q_proj";

fn linears() -> [(&'static str, usize, usize); 7] {
    [
        ("self_attn.q_proj", 8, 8),
        ("self_attn.k_proj", 4, 8),
        ("self_attn.v_proj", 4, 8),
        ("self_attn.o_proj", 8, 8),
        ("mlp.gate_proj", 16, 8),
        ("mlp.up_proj", 16, 8),
        ("mlp.down_proj", 8, 16),
    ]
}

fn temp_dir() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "yinsen-hf-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn assert_contains(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error {msg:?} lacks {p:?}");
    }
}

// ------------------------------------------------------------ conversions

#[test]
fn packed_layout_and_scale_direction() {
    let tiny = Tiny::new(true);
    let m = tiny.load().unwrap().model;
    let l = &m.layers[0];
    for ((name, o, i), (_, w)) in linears().into_iter().zip(l.ternaries()) {
        let (_, _, p) = &tiny.t[&format!("model.layers.0.{name}.weight")];
        let r4 = o / 4;
        for row in 0..o {
            for c in 0..i {
                let want = ((p[(row % r4) * i + c] >> (2 * (row / r4))) & 3) as i8 - 1;
                assert_eq!(w.get(row, c), want, "{name} [{row},{c}]");
            }
        }
        // bitlinear divides by weight_scale 4.0.
        assert_eq!(w.scale, WeightScale::PerTensor(0.25));
    }
    let mut auto = Tiny::new(true);
    auto.cfg["quantization_config"]["linear_class"] = json!("autobitlinear");
    let m = auto.load().unwrap().model;
    assert_eq!(m.layers[0].wq.scale, WeightScale::PerTensor(4.0));
    assert_eq!(m.final_norm, vec![1.5; 8]);
    assert_eq!(m.layers[0].ffn_sub_norm.as_deref(), Some(&[1.25f32; 16][..]));
}

#[test]
fn master_quantization_rounds_half_to_even() {
    let mut tiny = Tiny::new(false);
    // mean|W| = 0.5 exactly -> scale 2: +-0.25 -> +-0.5 -> 0 (tie to even;
    // half-away-from-zero would give +-1), 0.75 -> 1.5 -> 2 -> clamp 1,
    // 0.625 -> 1.25 -> 1, -0.875 -> -1.75 -> -2 -> clamp -1.
    let pattern = [0.25f32, 0.75, -0.75, 0.25, 0.25, -0.25, 0.625, -0.875];
    let w: Vec<f32> = pattern.iter().cycle().take(64).copied().collect();
    let mean = w.iter().map(|v| v.abs()).sum::<f32>() / 64.0;
    assert_eq!(mean, 0.5);
    tiny.put(&format!("{Q}.weight"), Dtype::F32, &[8, 8], f32_bytes(&w));
    let m = tiny.load().unwrap().model;
    let want = [0i8, 1, -1, 0, 0, 0, 1, -1];
    for r in 0..8 {
        for (c, &t) in want.iter().enumerate() {
            assert_eq!(m.layers[0].wq.get(r, c), t, "[{r},{c}]");
        }
    }
    assert_eq!(m.layers[0].wq.scale, WeightScale::PerTensor(0.5));

    // An all-zero tensor uses the 1e-5 floor and yields all-zero trits.
    tiny.put(&format!("{Q}.weight"), Dtype::BF16, &[8, 8], vec![0; 128]);
    let m = tiny.load().unwrap().model;
    assert!(m.layers[0].wq.packed.iter().all(|&b| b == 0));
    assert_eq!(m.layers[0].wq.scale, WeightScale::PerTensor(1.0 / (1.0f32 / 1e-5)));
}

#[test]
fn config_variants() {
    let mut t = Tiny::new(true);
    t.cfg["eos_token_id"] = json!([15, 13]);
    t.cfg["rope_theta"] = Value::Null;
    t.cfg["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 1234.0});
    t.cfg["rope_scaling"] = json!({"type": "linear", "factor": 1.0});
    t.cfg["head_dim"] = json!(4);
    t.cfg["hidden_act"] = json!("silu");
    let c = t.load().unwrap().model.config;
    assert_eq!(c.eos, vec![15, 13]);
    assert_eq!(c.rope_theta, 1234.0);
    assert_eq!(c.activation, Activation::Silu);

    // Llama-style: SiLU, no sub-norms, untied by default -> lm_head needed.
    let mut t = Tiny::new(true);
    t.cfg["architectures"] = json!(["LlamaForCausalLM"]);
    t.cfg.as_object_mut().unwrap().remove("hidden_act");
    t.cfg.as_object_mut().unwrap().remove("tie_word_embeddings");
    t.t.retain(|k, _| !k.contains("sub_norm"));
    assert_contains(&t.err(), &["missing tensor 'lm_head.weight'"]);
    t.put("lm_head.weight", Dtype::F16, &[16, 8], vec![0x3c; 256]);
    let m = t.load().unwrap().model;
    assert_eq!(m.config.activation, Activation::Silu);
    assert!(!m.config.sub_norms && !m.config.tied_embeddings);
    assert!(m.layers[0].attn_sub_norm.is_none());
    let mut row = vec![f32::NAN; 8];
    m.output.as_ref().unwrap().row_to_f32(3, &mut row);
    assert_eq!(row, vec![half::f16::from_bits(0x3c3c).to_f32(); 8]);
}

// ------------------------------------------------------------ errors

#[test]
fn config_errors() {
    let cases: Vec<(&str, Value, &[&str])> = vec![
        (
            "hidden_size",
            json!(1u64 << 40),
            &["config.json", "hidden_size", "out of range"],
        ),
        ("hidden_size", json!(0), &["hidden_size", "out of range"]),
        ("vocab_size", json!((1u64 << 24) + 1), &["vocab_size"]),
        ("num_hidden_layers", json!(u64::MAX), &["num_hidden_layers"]),
        ("hidden_size", json!(-8), &["malformed JSON"]),
        ("num_key_value_heads", json!(3), &["not a multiple of 3 kv heads"]),
        ("eos_token_id", json!(16), &["special token 16"]),
        ("eos_token_id", json!("x"), &["eos_token_id", "not a token id"]),
        ("rms_norm_eps", json!(0.0), &["rms eps"]),
        ("rope_theta", json!(1e300), &["rope theta"]),
        (
            "architectures",
            json!(["GPT2LMHeadModel"]),
            &["unsupported", "GPT2LMHeadModel"],
        ),
        ("hidden_act", json!("gelu"), &["unsupported", "gelu"]),
        (
            "rope_scaling",
            json!({"rope_type": "llama3", "factor": 8.0}),
            &["unsupported", "llama3"],
        ),
        (
            "rope_scaling",
            json!({"type": "linear", "factor": 2.0}),
            &["unsupported", "rope_scaling"],
        ),
        ("rope_scaling", json!(3), &["rope_scaling"]),
        (
            "quantization_config",
            json!({"quant_method": "gptq"}),
            &["unsupported", "gptq"],
        ),
        (
            "quantization_config",
            json!({"linear_class": "foo"}),
            &["unsupported", "foo"],
        ),
        ("attention_bias", json!(true), &["unsupported", "bias"]),
    ];
    for (key, val, want) in cases {
        let mut t = Tiny::new(true);
        t.cfg[key] = val.clone();
        let e = t.err();
        assert_contains(&e, want);
        assert!(e.contains("config.json"), "{key}={val}: {e}");
    }
    let mut t = Tiny::new(true);
    t.cfg.as_object_mut().unwrap().remove("hidden_size");
    assert_contains(&t.err(), &["missing 'hidden_size'"]);
    let (_, s) = t.bytes();
    for bad in [&b"{"[..], b"[]", b"", b"\xff\xfe"] {
        let e = hf::load_parts(bad, &[&s], &LoadOptions::default()).err().unwrap();
        assert_contains(&e.to_string(), &["config.json", "malformed JSON"]);
    }
    // Unsupported RoPE is the Unsupported variant, not a format error.
    let mut t = Tiny::new(true);
    t.cfg["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
    assert!(matches!(t.load(), Err(Error::Unsupported(_))));
}

#[test]
fn tensor_errors() {
    type Edit = Box<dyn Fn(&mut Tiny)>;
    let cases: Vec<(Edit, &[&str])> = vec![
        (
            Box::new(|t| {
                t.t.remove(&format!("{Q}.weight"));
            }),
            &["missing tensor 'model.layers.0.self_attn.q_proj.weight'"],
        ),
        (
            Box::new(|t| t.put(&format!("{Q}.weight"), Dtype::I32, &[2, 8], vec![0; 64])),
            &["q_proj.weight", "dtype I32"],
        ),
        (
            Box::new(|t| t.put(&format!("{Q}.weight"), Dtype::U8, &[2, 7], vec![0x55; 14])),
            &["q_proj.weight", "[2, 7]", "[2, 8]"],
        ),
        (
            Box::new(|t| t.put(&format!("{Q}.weight"), Dtype::F32, &[8, 7], vec![0; 224])),
            &["q_proj.weight", "shape [8, 7]"],
        ),
        (
            Box::new(|t| t.put(&format!("{Q}.weight_scale"), Dtype::BF16, &[1], bf16_bytes(&[0.0]))),
            &["weight_scale", "finite positive"],
        ),
        (
            Box::new(|t| t.put(&format!("{Q}.weight_scale"), Dtype::F32, &[1], f32_bytes(&[f32::NAN]))),
            &["weight_scale", "NaN"],
        ),
        (
            Box::new(|t| t.put(&format!("{Q}.weight_scale"), Dtype::F16, &[], vec![0x00, 0x7c])),
            &["weight_scale", "inf"],
        ),
        (
            Box::new(|t| t.put(&format!("{Q}.weight_scale"), Dtype::F32, &[2], f32_bytes(&[1.0, 1.0]))),
            &["weight_scale", "one value"],
        ),
        (
            Box::new(|t| t.put(&format!("{Q}.weight_scale"), Dtype::I8, &[1], vec![1])),
            &["weight_scale", "dtype I8"],
        ),
        (
            Box::new(|t| {
                t.t.remove(&format!("{Q}.weight_scale"));
            }),
            &["missing tensor", "q_proj.weight_scale"],
        ),
        (
            Box::new(|t| t.put(&format!("{Q}.weight"), Dtype::U8, &[2, 8], vec![0xC0; 16])),
            &["q_proj.weight", "code 3"],
        ),
        (
            Box::new(|t| t.put("model.embed_tokens.weight", Dtype::BF16, &[15, 8], vec![0; 240])),
            &["embed_tokens", "[15, 8]", "[16, 8]"],
        ),
        (
            Box::new(|t| t.put("model.norm.weight", Dtype::F32, &[8], f32_bytes(&[f32::INFINITY; 8]))),
            &["model.norm.weight", "NaN or infinite"],
        ),
        (
            Box::new(|t| {
                t.t.remove("model.layers.0.mlp.ffn_sub_norm.weight");
            }),
            &["missing tensor", "ffn_sub_norm"],
        ),
        (
            // k/v are 4 rows (kv heads 1 x head_dim 2 = 2 here): not packable by 4.
            Box::new(|t| {
                t.cfg["num_attention_heads"] = json!(4);
                t.cfg["head_dim"] = json!(2);
            }),
            &["k_proj.weight", "not a multiple of 4"],
        ),
    ];
    for (i, (edit, want)) in cases.into_iter().enumerate() {
        let mut t = Tiny::new(true);
        edit(&mut t);
        let e = t.err();
        assert_contains(&e, want);
        assert!(e.contains("safetensors"), "case {i}: {e}");
    }
    // Master weights with NaN.
    let mut t = Tiny::new(false);
    t.put(&format!("{Q}.weight"), Dtype::F32, &[8, 8], f32_bytes(&[f32::NAN; 64]));
    assert_contains(&t.err(), &["q_proj.weight", "NaN"]);
}

/// Headers that lie about offsets or sizes, and truncated files.
#[test]
fn lying_safetensors() {
    let (c, good) = Tiny::new(true).bytes();
    let hand = |header: &str, data: usize| {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header.as_bytes());
        b.extend(std::iter::repeat_n(1u8, data));
        b
    };
    let bad = [
        hand(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,800]}}"#, 8),
        hand(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#, 12),
        hand(
            r#"{"a":{"dtype":"F32","shape":[4611686018427387904,8],"data_offsets":[0,8]}}"#,
            8,
        ),
        hand(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}"#, 8),
        hand(r#"{"a":{"dtype":"Q9","shape":[2],"data_offsets":[0,8]}}"#, 8),
        {
            let mut b = good.clone();
            b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
            b
        },
        good[..good.len() - 1].to_vec(),
        good[..100].to_vec(),
        good[..3].to_vec(),
    ];
    for (i, b) in bad.iter().enumerate() {
        let e = hf::load_parts(&c, &[b], &LoadOptions::default())
            .err()
            .unwrap()
            .to_string();
        assert_contains(&e, &["safetensors[0]", "invalid safetensors"]);
        assert!(!e.is_empty(), "case {i}");
    }
}

// ------------------------------------------------------------ directories

#[test]
fn directory_errors() {
    let d = temp_dir();
    let e = hf::load_dir(&d, &LoadOptions::default()).err().unwrap().to_string();
    assert_contains(&e, &["missing config.json", &d.display().to_string()]);
    let (c, s) = Tiny::new(true).bytes();
    std::fs::write(d.join("config.json"), &c).unwrap();
    let e = hf::load_dir(&d, &LoadOptions::default()).err().unwrap().to_string();
    assert_contains(&e, &["no model.safetensors"]);
    std::fs::write(d.join("model.safetensors"), &s[..s.len() / 2]).unwrap();
    let e = hf::load_dir(&d, &LoadOptions::default()).err().unwrap().to_string();
    assert_contains(&e, &["model.safetensors", "invalid safetensors"]);
    std::fs::write(d.join("model.safetensors"), b"abc").unwrap();
    let e = hf::load_dir(&d, &LoadOptions::default()).err().unwrap().to_string();
    assert_contains(&e, &["model.safetensors", "too short"]);
    std::fs::write(d.join("config.json"), b"{\"hidden_size\": 8,").unwrap();
    let e = hf::load_dir(&d, &LoadOptions::default()).err().unwrap().to_string();
    assert_contains(&e, &["config.json", "malformed JSON"]);
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn directory_loads_mapped_with_progress_and_warnings() {
    let d = temp_dir();
    let tiny = Tiny::new(true);
    tiny.write_dir(&d);
    let calls = Arc::new(Mutex::new(Vec::new()));
    let c2 = calls.clone();
    let opts = LoadOptions {
        progress: Some(Box::new(move |a, b| c2.lock().unwrap().push((a, b)))),
        ..Default::default()
    };
    let l = hf::load_dir(&d, &opts).unwrap();
    assert!(matches!(l.model.embed.data, Storage::Mapped { .. }));
    let mut row = vec![f32::NAN; 8];
    l.model.embed.row_to_f32(2, &mut row);
    let want: Vec<f32> = (16..24).map(|i| (i as f32 - 60.0) / 64.0).collect();
    assert_eq!(row, want);
    assert!(l.tokenizer.is_none());
    assert!(
        l.warnings.iter().any(|w| w.contains("tokenizer.json")),
        "{:?}",
        l.warnings
    );
    let calls = calls.lock().unwrap();
    let total = std::fs::metadata(d.join("model.safetensors")).unwrap().len();
    assert!(calls.len() > 10);
    assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0));
    assert_eq!(*calls.last().unwrap(), (total, total));

    // Chat template as a list: "default" is taken.
    std::fs::write(d.join("tokenizer.json"), b"{}").unwrap();
    let tc = json!({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]});
    std::fs::write(d.join("tokenizer_config.json"), tc.to_string()).unwrap();
    let l = hf::load_dir(&d, &LoadOptions::default()).unwrap();
    assert_eq!(l.chat_template.as_deref(), Some("D"));
    assert!(l.tokenizer.is_some() && l.warnings.is_empty(), "{:?}", l.warnings);
    std::fs::remove_dir_all(&d).ok();
}

fn split_shards(tiny: &Tiny) -> (Tensors, Tensors) {
    let mut a = Tensors::new();
    let mut b = Tensors::new();
    for (i, (k, v)) in tiny.t.iter().enumerate() {
        if i % 2 == 0 { &mut a } else { &mut b }.insert(k.clone(), v.clone());
    }
    (a, b)
}

#[test]
fn sharded_directories() {
    let tiny = Tiny::new(true);
    let whole = tiny.load().unwrap().model;
    let (a, b) = split_shards(&tiny);
    let (c, _) = tiny.bytes();

    // Without an index: every *.safetensors, sorted.
    let d = temp_dir();
    std::fs::write(d.join("config.json"), &c).unwrap();
    std::fs::write(d.join("model-00001-of-00002.safetensors"), Tiny::st_bytes(&a)).unwrap();
    std::fs::write(d.join("model-00002-of-00002.safetensors"), Tiny::st_bytes(&b)).unwrap();
    let m = hf::load_dir(&d, &LoadOptions::default()).unwrap().model;
    assert_eq!(m.layers[0].w_down.packed, whole.layers[0].w_down.packed);
    assert_eq!(m.layers[0].wq.packed, whole.layers[0].wq.packed);

    // With an index naming both.
    let map: BTreeMap<&String, &str> = a
        .keys()
        .map(|k| (k, "model-00001-of-00002.safetensors"))
        .chain(b.keys().map(|k| (k, "model-00002-of-00002.safetensors")))
        .collect();
    std::fs::write(
        d.join("model.safetensors.index.json"),
        json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    let m = hf::load_dir(&d, &LoadOptions::default()).unwrap().model;
    assert_eq!(m.layers[0].wk.packed, whole.layers[0].wk.packed);

    // Index pointing at a missing shard, or outside the directory.
    for (file, want) in [
        ("missing.safetensors", "missing"),
        ("../x.safetensors", "plain file name"),
    ] {
        let idx = json!({"weight_map": {"model.norm.weight": file}});
        std::fs::write(d.join("model.safetensors.index.json"), idx.to_string()).unwrap();
        let e = hf::load_dir(&d, &LoadOptions::default()).err().unwrap().to_string();
        assert_contains(&e, &["model.safetensors.index.json", want]);
    }
    std::fs::remove_dir_all(&d).ok();

    // The same tensor in two shards.
    let (c, s) = tiny.bytes();
    let e = hf::load_parts(&c, &[&s, &s], &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert_contains(&e, &["also appears in"]);
}

// ------------------------------------------------------------ mutation

/// Bit flips, byte sets, truncations and config value swaps must give Ok or
/// Err, never a panic. Deterministic; a few thousand loads.
#[test]
fn mutations_never_panic() {
    let start = std::time::Instant::now();
    let mut rng = Rng(0xD1CE_5EED_1234_5678);
    let interesting = [
        json!(0),
        json!(1),
        json!(3),
        json!(-1),
        json!(1u64 << 31),
        json!(u64::MAX),
        json!(1e300),
        json!(null),
        json!("relu2"),
        json!([]),
        json!({}),
    ];
    let mut outcomes = [0usize; 2];
    for packed in [true, false] {
        let tiny = Tiny::new(packed);
        let (c, s) = tiny.bytes();
        let keys: Vec<String> = tiny.cfg.as_object().unwrap().keys().cloned().collect();
        for it in 0..1500 {
            let (mut c2, mut s2) = (c.clone(), s.clone());
            match it % 5 {
                0 => {
                    for _ in 0..1 + rng.below(4) {
                        let i = rng.below(s2.len());
                        s2[i] ^= 1 << rng.below(8);
                    }
                }
                1 => {
                    // Flips inside the header hit the JSON and the offsets.
                    let hl = (u64::from_le_bytes(s2[..8].try_into().unwrap()) as usize + 8).min(s2.len());
                    let i = rng.below(hl);
                    s2[i] = rng.next() as u8;
                }
                2 => s2.truncate(rng.below(s2.len())),
                3 => {
                    let mut v = tiny.cfg.clone();
                    let k = &keys[rng.below(keys.len())];
                    v[k] = interesting[rng.below(interesting.len())].clone();
                    c2 = serde_json::to_vec(&v).unwrap();
                }
                _ => {
                    let i = rng.below(c2.len());
                    if rng.below(2) == 0 {
                        c2[i] ^= 1 << rng.below(8);
                    } else {
                        c2.truncate(i);
                    }
                }
            }
            let r = std::panic::catch_unwind(|| hf::load_parts(&c2, &[&s2], &LoadOptions::default()).is_ok());
            match r {
                Ok(ok) => outcomes[ok as usize] += 1,
                Err(_) => panic!("panic at iteration {it} (packed {packed})"),
            }
        }
    }
    // Both outcomes must occur, or the mutations are not reaching anything.
    assert!(outcomes[0] > 100 && outcomes[1] > 50, "{outcomes:?}");
    assert!(start.elapsed().as_secs() < 10, "{:?}", start.elapsed());
}

/// Seeds for `cargo fuzz run hf_config`: config.json, 0xFF, safetensors.
/// Run with `YINSEN_FUZZ_SEEDS=<dir> cargo test --test hf_errors -- --ignored`.
#[test]
#[ignore]
fn write_fuzz_seeds() {
    let dir = PathBuf::from(std::env::var_os("YINSEN_FUZZ_SEEDS").expect("YINSEN_FUZZ_SEEDS"));
    std::fs::create_dir_all(&dir).unwrap();
    for packed in [true, false] {
        let (mut c, s) = Tiny::new(packed).bytes();
        c.push(0xFF);
        c.extend_from_slice(&s);
        assert!(hf::load_parts(&c[..c.len() - s.len() - 1], &[&s], &LoadOptions::default()).is_ok());
        std::fs::write(
            dir.join(format!("tiny-{}", if packed { "packed" } else { "master" })),
            c,
        )
        .unwrap();
    }
}

/// Load time at 2B4T layer shapes (hidden 2560, ffn 6912, 20/5 heads), one
/// layer, packed and bf16 master. `cargo test --release --test hf_errors -- --ignored bench --nocapture`
#[test]
#[ignore]
fn bench_2b4t_layer() {
    let (h, f, q, kv) = (2560usize, 6912usize, 2560usize, 640usize);
    for packed in [true, false] {
        let mut t = Tiny::new(packed);
        t.cfg["hidden_size"] = json!(h);
        t.cfg["intermediate_size"] = json!(f);
        t.cfg["num_attention_heads"] = json!(20);
        t.cfg["num_key_value_heads"] = json!(5);
        t.t.clear();
        let mut rng = Rng(7);
        t.put("model.embed_tokens.weight", Dtype::BF16, &[16, h], vec![0x3c; 32 * h]);
        for (n, len) in [
            ("model.norm.weight", h),
            ("model.layers.0.input_layernorm.weight", h),
            ("model.layers.0.post_attention_layernorm.weight", h),
            ("model.layers.0.self_attn.attn_sub_norm.weight", h),
            ("model.layers.0.mlp.ffn_sub_norm.weight", f),
        ] {
            t.put(n, Dtype::F32, &[len], f32_bytes(&vec![1.0; len]));
        }
        let mut weights = 0usize;
        for (name, o, i) in [
            ("self_attn.q_proj", q, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, q),
            ("mlp.gate_proj", f, h),
            ("mlp.up_proj", f, h),
            ("mlp.down_proj", h, f),
        ] {
            let full = format!("model.layers.0.{name}");
            weights += o * i;
            if packed {
                let codes = (0..o / 4 * i).map(|_| (rng.next() as u8) & 0x95).collect();
                t.put(&format!("{full}.weight"), Dtype::U8, &[o / 4, i], codes);
                t.put(&format!("{full}.weight_scale"), Dtype::BF16, &[1], bf16_bytes(&[40.0]));
            } else {
                let w = (0..o * i).flat_map(|_| bf16::from_f32((rng.below(64) as f32 - 32.0) / 1024.0).to_le_bytes());
                t.put(&format!("{full}.weight"), Dtype::BF16, &[o, i], w.collect());
            }
        }
        let (c, s) = t.bytes();
        let start = std::time::Instant::now();
        let m = hf::load_parts(&c, &[&s], &LoadOptions::default()).unwrap();
        let dt = start.elapsed().as_secs_f64();
        assert!(m.model.layers[0].w_up.packed.iter().any(|&b| b != 0));
        println!(
            "{}: {weights} weights in {:.1} ms = {:.0} Mweights/s",
            if packed { "packed U8" } else { "bf16 master" },
            dt * 1e3,
            weights as f64 / dt / 1e6
        );
    }
}
