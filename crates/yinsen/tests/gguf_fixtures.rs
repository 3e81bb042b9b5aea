//! The three fixture GGUFs (TQ2_0, TQ1_0, I2_S; written by gguf-py and an
//! independent I2_S packer) must load to the same model, matching the facts
//! recorded in weights-info.json.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use yinsen::formats::{gguf, LoadOptions, LoadedModel};
use yinsen::model::{Activation, WeightScale};

fn fixtures_dir() -> PathBuf {
    std::env::var_os("YINSEN_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures"))
}

fn gguf_path(kind: &str) -> PathBuf {
    fixtures_dir().join(format!("tiny-bitnet-a/gguf/tiny-bitnet-a-{kind}.gguf"))
}

fn load(kind: &str) -> LoadedModel {
    gguf::load_file(&gguf_path(kind), &LoadOptions::default()).unwrap_or_else(|e| panic!("{kind}: {e}"))
}

const KINDS: [&str; 3] = ["TQ2_0", "TQ1_0", "I2_S"];

fn weights_info() -> serde_json::Map<String, serde_json::Value> {
    let p = fixtures_dir().join("tiny-bitnet-a/weights-info.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// (layer, index into Layer::ternaries) for a GGUF tensor name.
fn locate(gguf_name: &str) -> (usize, usize) {
    let parts: Vec<&str> = gguf_name.split('.').collect();
    let proj = yinsen::formats::gguf::TERNARY;
    (
        parts[1].parse().unwrap(),
        proj.iter().position(|p| *p == parts[2]).unwrap(),
    )
}

#[test]
fn config_matches_fixture() {
    for kind in KINDS {
        let lm = load(kind);
        let c = &lm.model.config;
        assert_eq!(
            (
                c.hidden,
                c.n_layers,
                c.n_heads,
                c.n_kv_heads,
                c.head_dim,
                c.ffn,
                c.vocab
            ),
            (256, 2, 4, 2, 64, 768, 2048),
            "{kind}"
        );
        assert_eq!(c.activation, Activation::Relu2, "{kind}");
        assert!(c.sub_norms && c.tied_embeddings, "{kind}");
        assert_eq!((c.max_ctx, c.rope_theta, c.rms_eps), (1024, 500000.0, 1e-5), "{kind}");
        assert_eq!(c.bos, Some(1792), "{kind}");
        // EOS plus <|eot_id|> (1801) found in the vocabulary.
        assert_eq!(c.eos, vec![1793, 1801], "{kind}");
        assert!(c.add_bos, "{kind}");
        assert!(lm.model.output.is_none());
        assert!(lm.warnings.is_empty(), "{kind}: {:?}", lm.warnings);
        let tmpl = lm.chat_template.as_deref().unwrap_or("");
        assert!(tmpl.contains("<|start_header_id|>"), "{kind}");
        match lm.tokenizer {
            Some(yinsen::engine::tokenizer::TokenizerSpec::Gguf {
                model,
                pre,
                tokens,
                token_types,
                merges,
                bos,
                eos,
                add_bos,
                ..
            }) => {
                assert_eq!((model.as_str(), pre.as_deref()), ("gpt2", Some("llama-bpe")));
                assert_eq!((tokens.len(), token_types.len(), merges.len()), (2048, 2048, 2297));
                assert_eq!(tokens[1792], "<|begin_of_text|>");
                assert_eq!((token_types[0], token_types[1792]), (1, 3));
                assert_eq!((bos, eos, add_bos), (Some(1792), Some(1793), true));
            }
            other => panic!("{kind}: tokenizer {other:?}"),
        }
    }
}

#[test]
fn ternary_tensors_identical_across_formats_and_match_weights_info() {
    let models: Vec<LoadedModel> = KINDS.iter().map(|k| load(k)).collect();
    let info = weights_info();
    assert_eq!(info.len(), 14);
    for (_hf_name, v) in info {
        let name = v["gguf_name"].as_str().unwrap();
        let (l, p) = locate(name);
        let mean_abs = v["mean_abs_master"].as_f64().unwrap() as f32;
        let counts: Vec<u64> = v["count_minus1_0_plus1"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        let shape: Vec<usize> = v["shape_out_in"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        let first = models[0].model.layers[l].ternaries()[p].1;
        for (kind, lm) in KINDS.iter().zip(&models) {
            let m = lm.model.layers[l].ternaries()[p].1;
            assert_eq!(vec![m.n_out, m.n_in], shape, "{kind} {name}");
            assert_eq!(m.scale, WeightScale::PerTensor(mean_abs), "{kind} {name}");
            assert_eq!(m.packed, first.packed, "{kind} {name}: trits differ from TQ2_0");
            let mut c = [0u64; 3];
            for r in 0..m.n_out {
                for i in 0..m.n_in {
                    c[(m.get(r, i) + 1) as usize] += 1;
                }
            }
            assert_eq!(c.to_vec(), counts, "{kind} {name}");
        }
    }
}

#[test]
fn dense_tensors_identical_across_formats() {
    let models: Vec<LoadedModel> = KINDS.iter().map(|k| load(k)).collect();
    let m0 = &models[0].model;
    assert_eq!(m0.embed.dtype, yinsen::model::DenseType::F16);
    // The embedding stays a window into the mapped file.
    assert!(matches!(m0.embed.data, yinsen::model::Storage::Mapped { .. }));
    let (mut a, mut b) = (vec![f32::NAN; 256], vec![f32::NAN; 256]);
    let mut nonzero = 0;
    for lm in &models[1..] {
        let m = &lm.model;
        for r in 0..2048 {
            m0.embed.row_to_f32(r, &mut a);
            m.embed.row_to_f32(r, &mut b);
            assert_eq!(a, b, "embedding row {r}");
            nonzero += a.iter().filter(|x| **x != 0.0).count();
        }
        assert_eq!(m.final_norm, m0.final_norm);
        for (x, y) in m.layers.iter().zip(&m0.layers) {
            assert_eq!(x.attn_norm, y.attn_norm);
            assert_eq!(x.ffn_norm, y.ffn_norm);
            assert_eq!(x.attn_sub_norm, y.attn_sub_norm);
            assert_eq!(x.ffn_sub_norm, y.ffn_sub_norm);
        }
    }
    assert!(nonzero > 100_000, "embedding is mostly zeros?");
    // Norm weights are in [0.5, 1.5] per the fixture README.
    assert!(m0.final_norm.iter().all(|x| (0.5..=1.5).contains(x)));
}

#[test]
fn progress_reports_ternary_bytes() {
    let seen = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(AtomicU64::new(0));
    let (s, c) = (seen.clone(), calls.clone());
    let opts = LoadOptions {
        progress: Some(Box::new(move |done, total| {
            assert!(done <= total);
            s.store(done, Ordering::SeqCst);
            c.fetch_add(1, Ordering::SeqCst);
        })),
        ..Default::default()
    };
    let lm = gguf::load_file(&gguf_path("TQ2_0"), &opts).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 14);
    // 66 bytes per 256 ternary weights.
    let weights: usize = lm
        .model
        .layers
        .iter()
        .flat_map(|l| l.ternaries())
        .map(|(_, m)| m.n_out * m.n_in)
        .sum();
    assert_eq!(seen.load(Ordering::SeqCst), (weights / 256 * 66) as u64);
}

#[test]
fn load_bytes_equals_load_file_and_activation_override() {
    let bytes = std::fs::read(gguf_path("TQ1_0")).unwrap();
    let opts = LoadOptions {
        activation: Some(Activation::Silu),
        ..Default::default()
    };
    let a = gguf::load_bytes(&bytes, &opts).unwrap();
    let b = load("TQ1_0");
    assert_eq!(a.model.config.activation, Activation::Silu);
    assert_eq!(a.model.layers[1].w_down.packed, b.model.layers[1].w_down.packed);
    assert!(matches!(a.model.embed.data, yinsen::model::Storage::Owned(_)));
}

#[test]
fn bitnet_arch_without_hidden_activation_warns() {
    // Rewrite the TQ2_0 fixture's metadata without the key, via the parser + writer.
    let bytes = std::fs::read(gguf_path("TQ2_0")).unwrap();
    let g = gguf::parse(&bytes, std::path::Path::new("fixture")).unwrap();
    let mut w = gguf::testing::Writer::default();
    for (k, v) in &g.metadata {
        if k != "bitnet.hidden_activation" {
            w.kv(k, v.clone());
        }
    }
    for t in &g.tensors {
        w.tensor(&t.name, &t.dims, t.ggml_type, bytes[t.start..t.start + t.size].to_vec());
    }
    let lm = gguf::load_bytes(&w.to_bytes(), &LoadOptions::default()).unwrap();
    assert_eq!(lm.model.config.activation, Activation::Silu);
    assert_eq!(lm.warnings.len(), 1);
    assert!(lm.warnings[0].contains("hidden_activation"), "{:?}", lm.warnings);
    // Same trits as the original file.
    assert_eq!(lm.model.layers[0].wq.packed, load("TQ2_0").model.layers[0].wq.packed);
}
