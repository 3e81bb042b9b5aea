//! The fixture oracle: every format of tiny-bitnet-a must reproduce the
//! transformers outputs in `expected/` within `expected/tolerances.json`
//! (see shared/fixtures/README.md, "Tolerances").

mod common;

use std::sync::Arc;

use common::{check_greedy, check_logits, read_json, tiny_a, tiny_a_formats, Limits};
use yinsen::backends::cpu::CpuBackend;
use yinsen::backends::{Backend, Output};
use yinsen::engine::sampling::SamplerConfig;
use yinsen::engine::{GenParams, Session};
use yinsen::formats::{self, npy, LoadOptions};

struct Prompt {
    name: String,
    ids: Vec<u32>,
}

fn prompts() -> Vec<Prompt> {
    let v = read_json(tiny_a().join("expected/prompts.json"));
    v["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Prompt {
            name: p["name"].as_str().unwrap().to_string(),
            ids: p["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect(),
        })
        .collect()
}

/// Check one backend against the oracle; returns a line per prompt of measured errors.
pub fn check_backend(label: &str, be: Arc<dyn Backend>) -> Vec<String> {
    let vocab = be.config().vocab;
    let mut report = vec![];
    for p in prompts() {
        let mut cache = be.new_cache(p.ids.len() + 16).unwrap();
        let all = be.forward(cache.as_mut(), &p.ids, Output::AllLogits).unwrap();
        let n = p.ids.len();
        let r = check_logits(label, &p.name, &all, n, vocab, &Limits::of(&p.name));
        let mut s = Session::new(be.clone(), p.ids.len() + 16).unwrap();
        let params = GenParams {
            max_new: 16,
            sampler: SamplerConfig::greedy(),
            stop_ids: vec![],
        };
        let (got, _, _) = s.generate(&p.ids, &params, |_| Ok(true)).unwrap();
        let same = check_greedy(label, &p.name, &got);
        report.push(format!(
            "{label:9} {:9} n={n:3} last max {:.2e} mean {:.2e} all-pos max {:.2e} top1 {:.3} greedy checked {same}/16",
            p.name, r.max, r.mean, r.all_max, r.top1
        ));
    }
    report
}

#[test]
fn every_format_reproduces_transformers_on_every_cpu_kernel() {
    for (label, spec) in tiny_a_formats() {
        let loaded = formats::load(&spec, &LoadOptions::default()).unwrap_or_else(|e| panic!("{label}: {e}"));
        let model = Arc::new(loaded.model);
        for kernel in yinsen::backends::cpu::kernels::available() {
            let be = Arc::new(CpuBackend::new(model.clone(), kernel, 2).unwrap());
            for line in check_backend(&format!("{label}/{kernel}"), be) {
                eprintln!("{line}");
            }
        }
    }
}

/// The optional 8-bit lm_head (issue 3): its logit error against the
/// transformers reference on every prompt, within the fixture tolerance.
#[test]
fn q8_lm_head_error_on_fixtures() {
    use yinsen::backends::cpu::CpuOptions;
    let spec = tiny_a_formats().remove(2).1; // TQ2_0
    let model = Arc::new(formats::load(&spec, &LoadOptions::default()).unwrap().model);
    let be = CpuBackend::with_options(
        model,
        &CpuOptions {
            threads: 2,
            lm_head_q8: true,
            ..CpuOptions::default()
        },
    )
    .unwrap();
    let mut worst = 0f32;
    for p in prompts() {
        let mut c = be.new_cache(p.ids.len()).unwrap();
        let got = be.forward(c.as_mut(), &p.ids, Output::LastLogits).unwrap();
        let want = npy::read(&tiny_a().join(format!("expected/logits_last_{}.npy", p.name)))
            .unwrap()
            .to_f32();
        let max = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        let mean = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).sum::<f32>() / want.len() as f32;
        eprintln!("q8 lm_head {:9} max |dlogit| {max:.2e} mean {mean:.2e}", p.name);
        worst = worst.max(max);
        assert!(
            max <= 0.1 && mean <= 0.01,
            "{}: q8 lm_head error {max} / {mean}",
            p.name
        );
    }
    assert!(worst > 0.0, "q8 lm_head should differ from the f16 one somewhere");
}
