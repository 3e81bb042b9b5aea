//! `yinsen tune`: time full forwards per path and CPU kernel over token
//! counts, find the crossovers, and build a [`Profile`].

use std::sync::Arc;
use std::time::Instant;

use super::caps::Capabilities;
use super::profile::{crossover_rules, KvMovePoint, Profile, SweepPoint, PROFILE_VERSION};
use crate::backends::cpu::kernels::policy::KernelPolicy;
use crate::backends::cpu::CpuBackend;
use crate::backends::cuda::CudaBackend;
use crate::backends::{Backend, Output};
use crate::bench::bench_tokens;
use crate::error::Result;
use crate::model::Model;

pub struct TuneSpec<'a> {
    pub model_name: &'a str,
    /// Token counts per call, ascending.
    pub tokens: Vec<usize>,
    /// Timed repeats per point (plus one warm-up).
    pub reps: usize,
    pub threads: usize,
    /// Stop growing a path's token count once one call takes longer than this.
    pub max_call_s: f64,
    /// Cache positions for the KV move measurement.
    pub kv_positions: usize,
    pub progress: &'a dyn Fn(&str),
}

/// Powers of two 1..=4096 (quick: 1..=64 by 4x), capped at the context.
pub fn token_counts(quick: bool, max_ctx: usize) -> Vec<usize> {
    let v: Vec<usize> = if quick {
        vec![1, 4, 16, 64]
    } else {
        (0..=12).map(|e| 1 << e).collect()
    };
    v.into_iter().filter(|&t| t <= max_ctx).collect()
}

/// Kernels worth sweeping: all runnable, minus scalar when a SIMD one exists.
pub fn sweep_kernels(caps: &Capabilities) -> Vec<String> {
    let v: Vec<String> = caps.cpu_kernels.iter().filter(|k| *k != "scalar").cloned().collect();
    if v.is_empty() {
        vec!["scalar".into()]
    } else {
        v
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median ms of one `n`-token forward into an empty cache.
pub fn time_forward(b: &dyn Backend, n: usize, reps: usize) -> Result<f64> {
    let toks = bench_tokens(n, b.config().vocab);
    let mut ms = Vec::new();
    for rep in 0..=reps.max(1) {
        let mut c = b.new_cache(n)?;
        let t = Instant::now();
        b.forward(c.as_mut(), &toks, Output::LastLogits)?;
        if rep > 0 {
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(median(ms))
}

fn sweep(path: &str, b: &dyn Backend, spec: &TuneSpec, out: &mut Vec<SweepPoint>) -> Result<()> {
    for &n in &spec.tokens {
        (spec.progress)(&format!("{path}: {n} token(s)"));
        let ms = time_forward(b, n, spec.reps)?;
        out.push(SweepPoint {
            path: path.to_string(),
            tokens: n,
            ms,
        });
        if ms > spec.max_call_s * 1e3 {
            (spec.progress)(&format!("{path}: {ms:.0} ms per call, stopping at {n} tokens"));
            break;
        }
    }
    Ok(())
}

fn ms_of<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    let t = Instant::now();
    let r = f()?;
    Ok((r, t.elapsed().as_secs_f64() * 1e3))
}

/// Export/import cost of a cache of `positions` positions on each path.
pub fn measure_kv_move(cpu: &dyn Backend, cuda: Option<&dyn Backend>, positions: usize) -> Result<KvMovePoint> {
    let toks = bench_tokens(positions, cpu.config().vocab);
    let mut c = cpu.new_cache(positions)?;
    cpu.forward(c.as_mut(), &toks, Output::Hidden)?;
    let (snap, export_cpu_ms) = ms_of(|| cpu.export_kv(c.as_mut()))?;
    let (_, import_cpu_ms) = ms_of(|| cpu.import_kv(&snap, positions))?;
    let (mut export_cuda_ms, mut import_cuda_ms) = (None, None);
    if let Some(g) = cuda {
        let (mut gc, ms) = ms_of(|| g.import_kv(&snap, positions))?;
        import_cuda_ms = Some(ms);
        export_cuda_ms = Some(ms_of(|| g.export_kv(gc.as_mut()))?.1);
    }
    Ok(KvMovePoint {
        positions,
        bytes: snap.bytes(),
        export_cpu_ms,
        import_cpu_ms,
        export_cuda_ms,
        import_cuda_ms,
    })
}

/// Sweep every path and kernel and derive the profile.
pub fn run(model: &Arc<Model>, caps: &Capabilities, spec: &TuneSpec) -> Result<(Profile, Vec<String>)> {
    let mut notes = Vec::new();
    let mut points = Vec::new();
    let kernels = sweep_kernels(caps);
    let mut last_cpu = None;
    for k in &kernels {
        let b = CpuBackend::new(model.clone(), k, spec.threads)?;
        sweep(&format!("cpu/{k}"), &b, spec, &mut points)?;
        last_cpu = Some(b);
    }
    let cuda = match caps.has_cuda() {
        true => match CudaBackend::new(model, 0) {
            Ok(g) => Some(g),
            Err(e) => {
                notes.push(format!("cuda: not swept ({e})"));
                None
            }
        },
        false => {
            notes.push(format!(
                "cuda: n/a ({})",
                caps.cuda_reason.as_deref().unwrap_or("no device")
            ));
            None
        }
    };
    if let Some(g) = &cuda {
        sweep("cuda", g, spec, &mut points)?;
    }
    let cpu_names: Vec<String> = kernels.iter().map(|k| format!("cpu/{k}")).collect();
    let cpu_rules = crossover_rules(&points, &cpu_names)
        .into_iter()
        .map(|(t, p)| (t, p.trim_start_matches("cpu/").to_string()))
        .collect();
    let cpu_policy = KernelPolicy { rules: cpu_rules };
    // Whole-call choice: CPU (best kernel) against CUDA at each token count.
    let mut best: Vec<SweepPoint> = Vec::new();
    for p in &points {
        let path = if p.path == "cuda" { "cuda" } else { "cpu" };
        match best.iter_mut().find(|b| b.tokens == p.tokens && b.path == path) {
            Some(b) => b.ms = b.ms.min(p.ms),
            None => best.push(SweepPoint {
                path: path.into(),
                tokens: p.tokens,
                ms: p.ms,
            }),
        }
    }
    let mut path_rules = crossover_rules(&best, &["cpu".into(), "cuda".into()]);
    if path_rules.is_empty() {
        path_rules.push((1, "cpu".into()));
    }
    let mut kv_move = Vec::new();
    if let Some(cpu) = &last_cpu {
        let pos = spec.kv_positions.min(model.config.max_ctx).max(1);
        (spec.progress)(&format!("KV move: {pos} positions"));
        kv_move.push(measure_kv_move(cpu, cuda.as_ref().map(|g| g as &dyn Backend), pos)?);
    }
    let profile = Profile {
        version: PROFILE_VERSION,
        fingerprint: caps.fingerprint(),
        cpu_name: caps.cpu_name.clone(),
        cuda_devices: caps.cuda.iter().map(|d| d.name.clone()).collect(),
        model: spec.model_name.to_string(),
        threads: last_cpu.as_ref().map_or(spec.threads, |b| b.threads()),
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        cpu_policy,
        path_rules,
        points,
        kv_move,
    };
    profile.validate("(tuned)")?;
    Ok((profile, notes))
}
