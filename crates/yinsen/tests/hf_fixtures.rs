//! The HF loader against the oracle fixtures (tiny-bitnet-a): both folders
//! hold the same model, and what we load agrees with what transformers saw.

use std::path::PathBuf;

use serde_json::Value;
use yinsen::backends::cpu::reference::ternary_matmul_i32;
use yinsen::engine::tokenizer::TokenizerSpec;
use yinsen::formats::{hf, npy, LoadOptions, LoadedModel};
use yinsen::model::{Activation, Model};

fn fixtures_dir() -> PathBuf {
    std::env::var_os("YINSEN_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures"))
}

fn model_dir() -> PathBuf {
    fixtures_dir().join("tiny-bitnet-a")
}

fn load(sub: &str) -> LoadedModel {
    let dir = model_dir().join(sub);
    hf::load_dir(&dir, &LoadOptions::default()).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn json(path: PathBuf) -> Value {
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

fn npy_f32(name: &str) -> (Vec<usize>, Vec<f32>) {
    let a = npy::read(&model_dir().join("expected/intermediates/short_en").join(name)).unwrap();
    (a.shape.clone(), a.as_f32().expect("f32 array").to_vec())
}

const PROJ: [(&str, &str); 7] = [
    ("q", "self_attn.q_proj"),
    ("k", "self_attn.k_proj"),
    ("v", "self_attn.v_proj"),
    ("o", "self_attn.o_proj"),
    ("gate", "mlp.gate_proj"),
    ("up", "mlp.up_proj"),
    ("down", "mlp.down_proj"),
];

#[test]
fn config_fields() {
    for sub in ["hf-packed", "hf-master"] {
        let l = load(sub);
        let c = &l.model.config;
        assert_eq!(c.arch, "BitNetForCausalLM");
        assert_eq!((c.hidden, c.ffn, c.n_layers), (256, 768, 2));
        assert_eq!((c.n_heads, c.n_kv_heads, c.head_dim), (4, 2, 64));
        assert_eq!((c.vocab, c.max_ctx), (2048, 1024));
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.rms_eps, 1e-5);
        assert_eq!(c.activation, Activation::Relu2);
        assert!(c.sub_norms && c.tied_embeddings && c.add_bos);
        assert_eq!((c.bos, c.eos.clone()), (Some(1792), vec![1793]));
        assert!(l.model.output.is_none());
        match &l.tokenizer {
            Some(TokenizerSpec::HfJson {
                path,
                bos,
                eos,
                add_bos,
            }) => {
                assert!(path.ends_with("tokenizer.json") && path.is_file());
                assert_eq!((*bos, eos.clone(), *add_bos), (Some(1792), vec![1793], true));
            }
            other => panic!("tokenizer spec {other:?}"),
        }
        let t = l.chat_template.as_deref().expect("chat template");
        assert!(t.contains("<|start_header_id|>"), "{t}");
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
    }
}

#[test]
fn activation_override() {
    let opts = LoadOptions {
        activation: Some(Activation::Silu),
        ..Default::default()
    };
    let l = hf::load_dir(&model_dir().join("hf-packed"), &opts).unwrap();
    assert_eq!(l.model.config.activation, Activation::Silu);
}

fn count_trits(m: &yinsen::model::TernaryMatrix) -> [u64; 3] {
    let mut n = [0u64; 3];
    for r in 0..m.n_out {
        for c in 0..m.n_in {
            n[(m.get(r, c) + 1) as usize] += 1;
        }
    }
    n
}

/// Packed (scale divided, offline) and master (quantized here) must be the
/// same trits and the same effective scale = mean|W| from weights-info.json.
#[test]
fn packed_and_master_are_the_same_model() {
    let info = json(model_dir().join("weights-info.json"));
    let (packed, master) = (load("hf-packed").model, load("hf-master").model);
    let mut checked = 0;
    for (i, (lp, lm)) in packed.layers.iter().zip(&master.layers).enumerate() {
        for (((name, mp), (_, mm)), (_, hf_name)) in lp.ternaries().into_iter().zip(lm.ternaries()).zip(PROJ) {
            let key = format!("model.layers.{i}.{hf_name}.weight");
            let e = &info[&key];
            let shape: Vec<usize> = serde_json::from_value(e["shape_out_in"].clone()).unwrap();
            assert_eq!(vec![mp.n_out, mp.n_in], shape, "{key}");
            assert_eq!(mp.packed, mm.packed, "layer {i} {name}: trits differ");
            let mean = e["mean_abs_master"].as_f64().unwrap() as f32;
            assert_eq!(mp.tensor_scale(), Some(mean), "{key} packed scale");
            assert_eq!(mm.tensor_scale(), Some(mean), "{key} master scale");
            assert_eq!(e["hf_weight_scale"].as_f64().unwrap() as f32, 1.0 / mean);
            let want: Vec<u64> = serde_json::from_value(e["count_minus1_0_plus1"].clone()).unwrap();
            assert_eq!(count_trits(mp).to_vec(), want, "{key} counts");
            checked += 1;
        }
    }
    assert_eq!(checked, 14);
}

fn prompt_ids(name: &str) -> Vec<usize> {
    let p = json(model_dir().join("expected/prompts.json"));
    let entry = p["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap();
    serde_json::from_value(entry["ids"].clone()).unwrap()
}

#[test]
fn embedding_rows_match_oracle() {
    let ids = prompt_ids("short_en");
    let (shape, want) = npy_f32("embed.npy");
    assert_eq!(shape, vec![ids.len(), 256]);
    assert!(want.iter().any(|&v| v != 0.0));
    for sub in ["hf-packed", "hf-master"] {
        let m = load(sub).model;
        let mut row = vec![f32::NAN; 256];
        for (t, &id) in ids.iter().enumerate() {
            row.fill(f32::NAN);
            m.embed.row_to_f32(id, &mut row);
            assert_eq!(&row[..], &want[t * 256..(t + 1) * 256], "{sub} token {t} (id {id})");
        }
    }
}

/// rms_norm(embed) * input_layernorm must give transformers' attn_norm_out:
/// catches a wrong or missing norm vector.
#[test]
fn input_norm_matches_oracle() {
    let m: Model = load("hf-packed").model;
    let (_, x) = npy_f32("embed.npy");
    let (_, want) = npy_f32("l0.attn_norm_out.npy");
    for (xt, wt) in x.chunks(256).zip(want.chunks(256)) {
        let ms = xt.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / 256.0;
        let inv = 1.0 / (ms + 1e-5).sqrt();
        for ((&xv, &g), &w) in xt.iter().zip(&m.layers[0].attn_norm).zip(wt) {
            let got = xv as f64 * inv * g as f64;
            assert!((got - w as f64).abs() <= 1e-5 * (1.0 + w.abs() as f64), "{got} vs {w}");
        }
    }
}

/// With transformers' own int8 codes and scales, the loaded q/k/v/o/gate/up/
/// down reproduce its projection outputs: pins packing order and scale direction.
#[test]
fn projections_match_oracle() {
    for sub in ["hf-packed", "hf-master"] {
        let m = load(sub).model;
        for (li, l) in m.layers.iter().enumerate() {
            for (name, input) in [
                ("q", "qkv_in"),
                ("k", "qkv_in"),
                ("v", "qkv_in"),
                ("o", "o_in"),
                ("gate", "gate_up_in"),
                ("up", "gate_up_in"),
                ("down", "down_in"),
            ] {
                let w = l.ternaries().into_iter().find(|(n, _)| *n == name).unwrap().1;
                let codes =
                    npy::read(&model_dir().join(format!("expected/intermediates/short_en/l{li}.{input}.int8.npy")))
                        .unwrap();
                let xq = codes.as_i8().expect("int8 codes");
                let (_, s) = npy_f32(&format!("l{li}.{input}.scale.npy"));
                let (_, want) = npy_f32(&format!("l{li}.{name}_proj_out.npy"));
                let n_tok = s.len();
                let acc = ternary_matmul_i32(w, xq, n_tok);
                let ws = w.tensor_scale().unwrap();
                // transformers sums in f32 (order unknown): compare against the
                // tensor's magnitude; a packing or scale bug is off by O(1) or 2^14.
                let peak = want.iter().fold(0f64, |m, &v| m.max(v.abs() as f64));
                assert!(peak > 0.0);
                let mut worst = 0f64;
                for t in 0..n_tok {
                    for o in 0..w.n_out {
                        let got = acc[t * w.n_out + o] as f64 * ws as f64 / s[t] as f64;
                        let e = want[t * w.n_out + o] as f64;
                        worst = worst.max((got - e).abs() / peak);
                    }
                }
                assert!(worst < 1e-5, "{sub} l{li} {name}_proj: err {worst} of peak");
            }
        }
    }
}
