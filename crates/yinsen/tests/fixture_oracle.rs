//! The fixture oracle: every format of tiny-bitnet-a must reproduce the
//! transformers outputs in `expected/` within `expected/tolerances.json`
//! (see shared/fixtures/README.md, "Tolerances").

mod common;

use std::sync::Arc;

use common::{read_json, tiny_a, tiny_a_formats};
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

fn argmax(v: &[f32]) -> usize {
    (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b })
}

fn top5(v: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    idx.truncate(5);
    idx
}

/// Check one backend against the oracle; returns a line per prompt of measured errors.
pub fn check_backend(label: &str, be: Arc<dyn Backend>) -> Vec<String> {
    let tol = read_json(tiny_a().join("expected/tolerances.json"));
    let top5_ref = read_json(tiny_a().join("expected/top5.json"));
    let greedy = read_json(tiny_a().join("expected/greedy.json"));
    let vocab = be.config().vocab;
    let mut report = vec![];
    for p in prompts() {
        let t = &tol["prompts"][&p.name];
        let mut cache = be.new_cache(p.ids.len() + 16).unwrap();
        let all = be.forward(cache.as_mut(), &p.ids, Output::AllLogits).unwrap();
        let n = p.ids.len();
        assert_eq!(all.len(), n * vocab);
        let last = &all[(n - 1) * vocab..];
        let want = npy::read(&tiny_a().join(format!("expected/logits_last_{}.npy", p.name)))
            .unwrap()
            .to_f32();
        let diffs: Vec<f32> = last.iter().zip(&want).map(|(a, b)| (a - b).abs()).collect();
        let max = diffs.iter().cloned().fold(0.0, f32::max);
        let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
        let (tmax, tmean) = (
            t["max_abs_logit"].as_f64().unwrap() as f32,
            t["mean_abs_logit"].as_f64().unwrap() as f32,
        );
        assert!(max <= tmax, "{label} {}: max |dlogit| {max} > {tmax}", p.name);
        assert!(mean <= tmean, "{label} {}: mean |dlogit| {mean} > {tmean}", p.name);
        // All positions where the reference is recorded.
        let mut all_max = max;
        if let Ok(a) = npy::read(&tiny_a().join(format!("expected/logits_all_{}.npy", p.name))) {
            let a = a.to_f32();
            assert_eq!(a.len(), all.len());
            all_max = all.iter().zip(&a).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
            assert!(all_max <= tmax, "{label} {}: all-position max {all_max}", p.name);
        }
        // Top-1 agreement per position.
        let refs = top5_ref[&p.name].as_array().unwrap();
        assert_eq!(refs.len(), n);
        let mut agree = 0;
        for (pos, r) in refs.iter().enumerate() {
            let ids: Vec<usize> = r["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect();
            let lg: Vec<f64> = r["logits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            let row = &all[pos * vocab..(pos + 1) * vocab];
            let ours = argmax(row);
            if ours == ids[0] {
                agree += 1;
            } else {
                assert!(
                    lg[0] - lg[1] < 0.05,
                    "{label} {} pos {pos}: top-1 {ours} vs {} with margin {}",
                    p.name,
                    ids[0],
                    lg[0] - lg[1]
                );
            }
            if t["top5_ids_identical_all_positions"].as_bool().unwrap() {
                assert_eq!(top5(row), ids, "{label} {} pos {pos}: top-5", p.name);
            }
        }
        let frac = agree as f64 / n as f64;
        assert!(
            frac >= t["top1_agree_all_positions_min"].as_f64().unwrap(),
            "{label} {}: top-1 agreement {frac}",
            p.name
        );
        // Greedy continuation, identical until the first near-tie.
        let g = &greedy[&p.name];
        let want_ids: Vec<u32> = g["generated_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let margins: Vec<f64> = g["top1_minus_top2_margin"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let mut s = Session::new(be.clone(), p.ids.len() + 16).unwrap();
        let params = GenParams {
            max_new: want_ids.len(),
            sampler: SamplerConfig::greedy(),
            stop_ids: vec![],
        };
        let (got, _, _) = s.generate(&p.ids, &params, |_| Ok(true)).unwrap();
        let mut same = 0;
        for (i, (&a, &b)) in got.iter().zip(&want_ids).enumerate() {
            if margins[i] < 0.05 {
                break;
            }
            assert_eq!(a, b, "{label} {}: greedy step {i}", p.name);
            same += 1;
        }
        report.push(format!(
            "{label:9} {:9} n={n:3} last max {max:.2e} mean {mean:.2e} all-pos max {all_max:.2e} top1 {:.3} greedy checked {same}/16",
            p.name, frac
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
