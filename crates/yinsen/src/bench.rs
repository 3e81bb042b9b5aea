//! `yinsen bench`: llama-bench-style prompt (pp) and decode (tg) throughput,
//! medians over repeats with warm-up excluded, plus decode weight bandwidth
//! against the machine's measured memory bandwidth.

use std::time::Instant;

use serde::Serialize;

use crate::backends::{Backend, Output};
use crate::error::Result;
use crate::model::Model;

#[derive(Clone, Debug, Serialize)]
pub struct BenchRecord {
    pub model: String,
    pub backend: String,
    pub kernel: String,
    pub n_threads: usize,
    pub n_prompt: usize,
    pub n_gen: usize,
    /// Mean tokens/s over the samples (llama-bench's field).
    pub avg_ts: f64,
    pub stddev_ts: f64,
    pub median_ts: f64,
    pub samples_ts: Vec<f64>,
    /// Decode only: bytes of weights read per token x tokens/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weights_gb_per_s: Option<f64>,
    /// Decode rows that pick on the backend instead of returning the logits
    /// ("greedy", "top-40"): what `yinsen run` does per token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pick: Option<String>,
    /// Batched decode rows: sequences stepped together (`forward_batch`);
    /// avg_ts counts the tokens of all of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n_seqs: Option<usize>,
}

/// The top-k of the pick rows: the CLI's default sampling.
const PICK_TOP_K: usize = 40;

pub struct BenchSpec<'a> {
    pub model_name: &'a str,
    pub kernel: &'a str,
    pub threads: usize,
    pub prompts: &'a [usize],
    pub gens: &'a [usize],
    pub repeats: usize,
    /// Batched decode: sequence counts, each row `gens` steps of them all.
    pub batches: &'a [usize],
    /// The CPU path reads an 8-bit lm_head copy (for the GB/s figure).
    pub lm_head_q8: bool,
    /// Called before each measurement with a short description.
    pub progress: &'a dyn Fn(&str),
}

/// Deterministic "random" prompt tokens below the vocabulary size.
pub fn bench_tokens(n: usize, vocab: usize) -> Vec<u32> {
    let mut r = crate::model::synthetic::SplitMix64(42);
    (0..n).map(|_| (r.next_u64() % vocab as u64) as u32).collect()
}

fn stats(samples: &[f64]) -> (f64, f64, f64) {
    let n = samples.len() as f64;
    let mean = samples.iter().sum::<f64>() / n;
    let var = if samples.len() > 1 {
        samples.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let med = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    (mean, var.sqrt(), med)
}

/// Bytes one decode step reads: every ternary weight plus the lm_head (its
/// 8-bit Q8_0 copy when `lm_head_q8`: 34 bytes per 32 values).
pub fn decode_bytes_per_token(model: &Model, lm_head_q8: bool) -> usize {
    let head = model.lm_head();
    let head_bytes = if lm_head_q8 {
        head.rows * head.cols / 32 * 34
    } else {
        head.resident_bytes()
    };
    model.ternary_bytes() + head_bytes
}

pub fn run(backend: &dyn Backend, model: &Model, spec: &BenchSpec) -> Result<Vec<BenchRecord>> {
    let vocab = model.config.vocab;
    let mut out = Vec::new();
    let rec = |n_prompt, n_gen, samples: Vec<f64>, gbs: Option<f64>| {
        let (avg, sd, med) = stats(&samples);
        BenchRecord {
            model: spec.model_name.to_string(),
            backend: backend.name(),
            kernel: spec.kernel.to_string(),
            n_threads: spec.threads,
            n_prompt,
            n_gen,
            avg_ts: avg,
            stddev_ts: sd,
            median_ts: med,
            samples_ts: samples,
            weights_gb_per_s: gbs,
            pick: None,
            n_seqs: None,
        }
    };
    for &np in spec.prompts {
        let toks = bench_tokens(np, vocab);
        let mut samples = Vec::new();
        for rep in 0..=spec.repeats {
            (spec.progress)(&format!(
                "pp{np} run {rep}/{}{}",
                spec.repeats,
                if rep == 0 { " (warm-up)" } else { "" }
            ));
            let mut cache = backend.new_cache(np)?;
            let t = Instant::now();
            backend.forward(cache.as_mut(), &toks, Output::LastLogits)?;
            let dt = t.elapsed().as_secs_f64();
            if rep > 0 {
                samples.push(np as f64 / dt);
            }
        }
        out.push(rec(np, 0, samples, None));
    }
    for &ng in spec.gens {
        let toks = bench_tokens(ng + 1, vocab);
        let mut samples = Vec::new();
        for rep in 0..=spec.repeats {
            (spec.progress)(&format!(
                "tg{ng} run {rep}/{}{}",
                spec.repeats,
                if rep == 0 { " (warm-up)" } else { "" }
            ));
            let mut cache = backend.new_cache(ng + 1)?;
            let t = Instant::now();
            for &tok in &toks[..ng] {
                backend.forward(cache.as_mut(), &[tok], Output::LastLogits)?;
            }
            let dt = t.elapsed().as_secs_f64();
            if rep > 0 {
                samples.push(ng as f64 / dt);
            }
        }
        // The backend's own decode layout where it reports one (vnni3 reads
        // 1.6 bits per ternary weight).
        let per_tok = match backend.decode_ternary_bytes() {
            Some(t) => decode_bytes_per_token(model, spec.lm_head_q8) - model.ternary_bytes() + t,
            None => decode_bytes_per_token(model, spec.lm_head_q8),
        } as f64;
        let med = stats(&samples).2;
        out.push(rec(0, ng, samples, Some(per_tok * med / 1e9)));
        // The same steps picking on the backend, where it offers that.
        for (name, k) in [("greedy", 1), ("top-40", PICK_TOP_K)] {
            let step = |cache: &mut dyn crate::backends::KvCache, tok| -> Result<bool> {
                Ok(match k {
                    1 => backend.forward_greedy(cache, tok)?.is_some(),
                    _ => backend.forward_top_k(cache, tok, k)?.is_some(),
                })
            };
            let mut samples = Vec::new();
            for rep in 0..=spec.repeats {
                (spec.progress)(&format!("tg{ng} {name} run {rep}/{}", spec.repeats));
                let mut cache = backend.new_cache(ng + 1)?;
                let t = Instant::now();
                for &tok in &toks[..ng] {
                    if !step(cache.as_mut(), tok)? {
                        break;
                    }
                }
                let dt = t.elapsed().as_secs_f64();
                if cache.len() < ng {
                    samples.clear();
                    break; // not offered
                }
                if rep > 0 {
                    samples.push(ng as f64 / dt);
                }
            }
            if !samples.is_empty() {
                let mut r = rec(0, ng, samples, None);
                r.pick = Some(name.into());
                out.push(r);
            }
        }
    }
    // Batched decode: `b` sequences, each after one distinct token, stepped
    // together `ng` times: every sequence's logits returned, then each one's
    // greedy pick and top-40 pick where the backend offers batched picks.
    for &b in spec.batches {
        for &ng in spec.gens {
            let toks = bench_tokens(b * (ng + 1), vocab);
            for pick in [None, Some((1, true)), Some((PICK_TOP_K, false))] {
                let mut samples = Vec::new();
                for rep in 0..=spec.repeats {
                    (spec.progress)(&format!("tg{ng} x {b} sequences run {rep}/{}", spec.repeats));
                    let mut caches = (0..b).map(|_| backend.new_cache(ng + 1)).collect::<Result<Vec<_>>>()?;
                    let t = Instant::now();
                    for step in 0..ng {
                        let mut refs: Vec<&mut dyn crate::backends::KvCache> = caches
                            .iter_mut()
                            .map(|c| c.as_mut() as &mut dyn crate::backends::KvCache)
                            .collect();
                        let toks = &toks[step * b..(step + 1) * b];
                        match pick {
                            None => drop(backend.forward_batch(&mut refs, toks)?),
                            Some(p) => {
                                if backend.forward_batch_pick(&mut refs, toks, &vec![p; b])?.is_none() {
                                    break;
                                }
                            }
                        }
                    }
                    let dt = t.elapsed().as_secs_f64();
                    if caches[0].len() < ng {
                        samples.clear();
                        break; // not offered
                    }
                    if rep > 0 {
                        samples.push((b * ng) as f64 / dt);
                    }
                }
                if !samples.is_empty() {
                    let mut r = rec(0, ng, samples, None);
                    r.n_seqs = Some(b);
                    r.pick = pick.map(|(k, greedy)| match greedy {
                        true => "greedy".to_string(),
                        false => format!("top-{k}"),
                    });
                    out.push(r);
                }
            }
        }
    }
    Ok(out)
}

/// Streaming read bandwidth with `threads` threads over a 1 GiB buffer (GB/s).
pub fn memory_bandwidth(threads: usize) -> f64 {
    use rayon::prelude::*;
    let n = (1usize << 30) / 8;
    let buf: Vec<u64> = (0..n as u64).collect();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads.max(1)).build();
    let Ok(pool) = pool else { return 0.0 };
    let mut best = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        let s: u64 = pool.install(|| {
            buf.par_chunks(n / (threads.max(1) * 4))
                .map(|c| c.iter().fold(0u64, |a, &b| a ^ b))
                .reduce(|| 0, |a, b| a ^ b)
        });
        std::hint::black_box(s);
        best = best.max((n * 8) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// Resident set size of this process in bytes (Linux), if known.
pub fn resident_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
