//! `yinsen bench --paths`: the seed's table (prefill 2K, single token,
//! batch 16) with a column per path plus the hybrid, and `--concurrent`:
//! an embedding batch and a decode running at once.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::caps::Capabilities;
use super::hybrid::HybridBackend;
use super::tune::time_forward;
use crate::backends::cpu::CpuBackend;
use crate::backends::cuda::CudaBackend;
use crate::backends::{Backend, Output};
use crate::bench::bench_tokens;
use crate::error::Result;
use crate::model::Model;

/// One cell: milliseconds, or why the path could not run.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cell {
    Ms(f64),
    Na(String),
}

impl Cell {
    pub fn text(&self) -> String {
        match self {
            Cell::Ms(ms) => format!("{ms:.2} ms"),
            Cell::Na(why) => format!("n/a ({why})"),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct PathsRow {
    pub workload: String,
    pub tokens: usize,
    pub cuda: Cell,
    pub cpu_matrix: Cell,
    pub cpu_vector: Cell,
    pub hybrid: Cell,
    /// What the hybrid's plan chose for this workload.
    pub hybrid_plan: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct PathsTable {
    pub model: String,
    pub cpu_matrix_kernel: String,
    pub cpu_vector_kernel: String,
    pub cuda_device: Option<String>,
    pub rows: Vec<PathsRow>,
    pub resident_weight_bytes: Vec<(String, usize)>,
    /// KV cache move (f32 export + import) at the prefill length.
    pub kv_move: Option<super::profile::KvMovePoint>,
}

/// The three workloads: (name, tokens per call, context before the call).
pub fn workloads(max_ctx: usize) -> Vec<(String, usize, usize)> {
    let pre = 2048.min(max_ctx);
    vec![
        (format!("prefill {pre}"), pre, 0),
        ("single token (ctx 128)".into(), 1, 128.min(max_ctx.saturating_sub(1))),
        ("batch 16 tokens".into(), 16.min(max_ctx), 0),
    ]
}

/// Median ms of `n` tokens after `ctx` positions are already cached.
fn time_at(b: &dyn Backend, n: usize, ctx: usize, reps: usize) -> Result<f64> {
    if ctx == 0 {
        return time_forward(b, n, reps);
    }
    let toks = bench_tokens(ctx + n, b.config().vocab);
    let mut ms = Vec::new();
    for rep in 0..=reps.max(1) {
        let mut c = b.new_cache(ctx + n)?;
        b.forward(c.as_mut(), &toks[..ctx], Output::LastLogits)?;
        let t = Instant::now();
        b.forward(c.as_mut(), &toks[ctx..], Output::LastLogits)?;
        if rep > 0 {
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    Ok(ms[ms.len() / 2])
}

fn cell(b: Option<&dyn Backend>, why: &str, n: usize, ctx: usize, reps: usize) -> Cell {
    match b {
        None => Cell::Na(why.into()),
        Some(b) => match time_at(b, n, ctx, reps) {
            Ok(ms) => Cell::Ms(ms),
            Err(e) => Cell::Na(e.to_string()),
        },
    }
}

pub fn run(
    model: &Arc<Model>,
    caps: &Capabilities,
    hybrid: &HybridBackend,
    threads: usize,
    reps: usize,
) -> Result<PathsTable> {
    let (mk, vk) = (
        caps.cpu_matrix_kernel().to_string(),
        caps.cpu_vector_kernel().to_string(),
    );
    let vector = CpuBackend::new(model.clone(), &vk, threads)?;
    let matrix = match mk == vk {
        true => None,
        false => Some(CpuBackend::new(model.clone(), &mk, threads)?),
    };
    let (cuda, cuda_why) = match caps.has_cuda() {
        true => match CudaBackend::new(model, 0) {
            Ok(g) => (Some(g), String::new()),
            Err(e) => (None, e.to_string()),
        },
        false => (None, caps.cuda_reason.clone().unwrap_or_else(|| "no device".into())),
    };
    let mut rows = Vec::new();
    for (name, n, ctx) in workloads(model.config.max_ctx) {
        // Without AMX the matrix column is the vector kernel, measured once.
        let cpu_matrix = match &matrix {
            Some(m) => cell(Some(m), "", n, ctx, reps),
            None => Cell::Na(format!("no AMX ({}); cpu-vector column is the best CPU path", caps.amx)),
        };
        let plan = hybrid.plan_for(n, Output::LastLogits, None, 0);
        rows.push(PathsRow {
            workload: name,
            tokens: n,
            cuda: cell(cuda.as_ref().map(|g| g as &dyn Backend), &cuda_why, n, ctx, reps),
            cpu_matrix,
            cpu_vector: cell(Some(&vector), "", n, ctx, reps),
            hybrid: cell(Some(hybrid), "", n, ctx, reps),
            hybrid_plan: plan.summary(),
        });
    }
    let pos = 2048.min(model.config.max_ctx);
    let kv_move = super::tune::measure_kv_move(&vector, cuda.as_ref().map(|g| g as &dyn Backend), pos).ok();
    let mut resident = vec![(vector.name(), vector.resident_weight_bytes())];
    if let Some(m) = &matrix {
        resident.push((m.name(), m.resident_weight_bytes()));
    }
    if let Some(g) = &cuda {
        resident.push((g.name(), g.resident_weight_bytes()));
    }
    for r in hybrid.residency() {
        resident.push((format!("hybrid {}", r.path.as_str()), r.resident_weight_bytes));
    }
    Ok(PathsTable {
        model: String::new(),
        cpu_matrix_kernel: mk,
        cpu_vector_kernel: vk,
        cuda_device: caps.cuda.first().map(|d| d.name.clone()),
        rows,
        resident_weight_bytes: resident,
        kv_move,
    })
}

/// Throughput of an embedding batch and a decode, alone and at once.
#[derive(Clone, Debug, Serialize)]
pub struct ConcurrentReport {
    pub embed_path: String,
    pub decode_path: String,
    pub embed_tokens: usize,
    pub decode_tokens: usize,
    pub embed_alone_tok_s: f64,
    pub decode_alone_tok_s: f64,
    pub embed_concurrent_tok_s: f64,
    pub decode_concurrent_tok_s: f64,
    /// Tokens of both workloads / wall time, run together.
    pub combined_tok_s: f64,
    /// Both workloads one after the other on their own paths.
    pub sequential_tok_s: f64,
}

fn embed_job(b: &dyn Backend, seqs: usize, len: usize) -> Result<f64> {
    let toks = bench_tokens(len, b.config().vocab);
    let t = Instant::now();
    for _ in 0..seqs {
        let mut c = b.new_cache(len)?;
        b.forward(c.as_mut(), &toks, Output::Hidden)?;
    }
    Ok(t.elapsed().as_secs_f64())
}

fn decode_job(b: &dyn Backend, steps: usize) -> Result<f64> {
    let toks = bench_tokens(steps, b.config().vocab);
    let mut c = b.new_cache(steps)?;
    let t = Instant::now();
    for &tok in &toks {
        b.forward(c.as_mut(), &[tok], Output::LastLogits)?;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Run `seqs` embeddings of `len` tokens on `embed` while `decode` makes
/// `steps` decode steps, then each alone. The backends may be the same
/// hybrid (its plans route the two workloads).
pub fn concurrent(
    embed: &dyn Backend,
    decode: &dyn Backend,
    seqs: usize,
    len: usize,
    steps: usize,
) -> Result<ConcurrentReport> {
    let et = embed_job(embed, seqs, len)?;
    let dt = decode_job(decode, steps)?;
    let t = Instant::now();
    let (e2, d2) = std::thread::scope(|s| {
        let h = s.spawn(|| embed_job(embed, seqs, len));
        let d = decode_job(decode, steps);
        (
            h.join()
                .unwrap_or_else(|_| Err(crate::Error::backend("bench", "embed thread panicked"))),
            d,
        )
    });
    let wall = t.elapsed().as_secs_f64();
    let (e2, d2) = (e2?, d2?);
    let n_embed = seqs * len;
    let plan_path = |b: &dyn Backend, n, out| {
        b.hybrid()
            .map(|h| h.plan_for(n, out, None, 0).projections)
            .unwrap_or_else(|| b.name())
    };
    Ok(ConcurrentReport {
        embed_path: plan_path(embed, len, Output::Hidden),
        decode_path: plan_path(decode, 1, Output::LastLogits),
        embed_tokens: n_embed,
        decode_tokens: steps,
        embed_alone_tok_s: n_embed as f64 / et,
        decode_alone_tok_s: steps as f64 / dt,
        embed_concurrent_tok_s: n_embed as f64 / e2,
        decode_concurrent_tok_s: steps as f64 / d2,
        combined_tok_s: (n_embed + steps) as f64 / wall,
        sequential_tok_s: (n_embed + steps) as f64 / (et + dt),
    })
}
