//! Timings for `yinsen bench --backend cuda`: CUDA events, medians of
//! several runs, warm-up and kernel compilation excluded.

use serde::Serialize;

use super::forward::{CudaBackend, DecodeLoop};
use crate::error::Result;

#[derive(Clone, Debug, Serialize)]
pub struct CudaBench {
    pub device: String,
    pub arch: String,
    pub kernels_from_cache: bool,
    /// KV-cache element type (`YINSEN_CUDA_KV`): "F32" or "F16".
    pub kv_dtype: String,
    /// Single-sequence greedy decode through the CUDA graph.
    pub decode_tok_s_ctx0: f64,
    pub decode_tok_s_ctx2048: f64,
    /// The engine's greedy loop through `forward_greedy` (a pick read back
    /// per token, the next step queued before it), wall time, ctx 0.
    pub decode_tok_s_ctx0_host_loop: f64,
    /// One forward of 512 / 2048 prompt tokens (ms).
    pub prefill_ms_512: f64,
    pub prefill_ms_2048: f64,
    /// One forward of 16 tokens of one sequence (a stand-in for a batch-16
    /// decode step: same matrix work, attention over one sequence), as `run`
    /// does it: a replay of the captured 16-token graph (back to back, ctx 0),
    /// or un-graphed where step graphs are off (`step16_graph` false).
    pub step16_ms: f64,
    pub step16_graph: bool,
    /// The same through the dp4a GEMV instead of the tensor-core GEMM
    /// (per-kernel body).
    pub step16_gemv_ms: f64,
    /// Whether `step16_ms` ran the persistent multi-token kernel
    /// (mega_multi.cu), and the per-kernel body's graph for comparison.
    pub step16_persistent: bool,
    pub step16_per_kernel_ms: f64,
    /// The 16-token forward without the graph (launch overhead included).
    pub step16_nograph_ms: f64,
    /// The faster 16-token step over the decode step at ctx 0 (issue 4: <= 1.3).
    pub step16_vs_step1: f64,
    /// A batched decode step of 16 sequences (`forward_batch_pick`, greedy
    /// picks; wall time with the host's share, median over steps after the
    /// graph's capture) from ctx 0 and after 2048 cached tokens each.
    pub batch16_ms: f64,
    pub batch16_ms_ctx2048: f64,
    /// The 16-token step (as `run` does it) after 2048 cached tokens, and its
    /// ratio to the decode step at ctx 2048.
    pub step16_ms_ctx2048: f64,
    pub step16_vs_step1_ctx2048: f64,
    /// 1-token forward without the graph (launch overhead included).
    pub step1_nograph_ms: f64,
    /// Decode graph captured without PDL (ctx 0).
    pub decode_tok_s_ctx0_no_pdl: f64,
    /// Whether the decode rows above used the persistent kernel (mega.cu).
    pub persistent_decode: bool,
    /// The per-kernel decode graph (persistent kernel off), ctx 0 and 2048.
    pub decode_tok_s_ctx0_per_kernel: f64,
    pub decode_tok_s_ctx2048_per_kernel: f64,
    /// `YINSEN_CUDA_MEGA_AB=f1,f2,..`: decode tok/s at ctx 0 and 2048 of the
    /// persistent kernel with each variant bit set (A/B runs in one call).
    pub mega_flag_sweep: Vec<(u32, f64, f64)>,
    /// Phases of the persistent decode at ctx 0 and 2048 (block 0's clock).
    pub mega_phases_ctx0: Vec<PhaseTime>,
    pub mega_phases_ctx2048: Vec<PhaseTime>,
    /// Decode at ctx 0 / 2048 with the 8-bit lm_head copy (when a model was given).
    pub decode_tok_s_ctx0_lm_head_q8: Option<f64>,
    pub decode_tok_s_ctx2048_lm_head_q8: Option<f64>,
    /// Whether the decode rows picked through the screened head.
    pub decode_screened: bool,
    /// Decode at ctx 0 / 2048 with the other head pick (the full F16 head
    /// when the rows were screened, else the screened one; a model given).
    pub decode_tok_s_other_pick: Option<(f64, f64)>,
    /// Candidate rows of the last screened pick of the decode rows.
    pub screen_candidates: Option<u32>,
    /// Per-kernel times of one un-graphed decode step at ctx 0 and 2048.
    pub kernels_ctx0: Vec<KernelTime>,
    pub kernels_ctx2048: Vec<KernelTime>,
    /// Per-kernel times of one un-graphed 16-token step at ctx 0 and 2048
    /// (their sum against `step16_ms` is the launch/gap share).
    pub kernels_step16_ctx0: Vec<KernelTime>,
    pub kernels_step16_ctx2048: Vec<KernelTime>,
    /// Per-kernel-group times of the un-graphed 512 / 2048-token forwards.
    pub kernels_prefill_512: Vec<KernelTime>,
    pub kernels_prefill_2048: Vec<KernelTime>,
    /// Every tensor-core variant on layer 0's matrices (only with `YINSEN_CUDA_GEMM_SWEEP=1`).
    pub gemm_sweep: Vec<GemmTime>,
}

/// One tensor-core GEMM timing of the sweep (`YINSEN_CUDA_GEMM_SWEEP=1`).
#[derive(Clone, Debug, Serialize)]
pub struct GemmTime {
    pub matrix: String,
    pub tokens: usize,
    pub variant: String,
    pub us: f64,
    pub tops: f64,
    /// Weight bytes streamed per microsecond x 1e-3 (GB/s).
    pub weight_gb_s: f64,
}

/// One phase of the persistent decode (summed over layers).
#[derive(Clone, Debug, Serialize)]
pub struct PhaseTime {
    pub phase: String,
    /// Block 0's work in the phase.
    pub work_us: f64,
    /// Of which: the input's norm + int8 quantisation, and the int dot
    /// (attention: scores + softmax, and the P V product).
    pub quant_us: f64,
    pub dot_us: f64,
    /// Block 0's wait at the grid barrier after it (with tagged inputs,
    /// MG_TAGGED, the wait for the next phase's input is in its quant_us).
    pub barrier_us: f64,
}

/// One kernel group of a decode step (summed over layers).
#[derive(Clone, Debug, Serialize)]
pub struct KernelTime {
    pub tag: String,
    pub calls: usize,
    /// GPU microseconds per step (CUDA events around each launch).
    pub us: f64,
    /// Bytes the group must read from memory per step.
    pub bytes: usize,
    pub gb_s: f64,
    /// Tera-ops (multiply + add) per second of the matrix work.
    pub tops: f64,
}

fn median(mut v: Vec<f32>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2] as f64
}

/// Decode tok/s at ctx 0 through the engine's greedy loop: `forward_greedy`
/// fed each pick it returned, wall time (median of 5 runs of 128 steps
/// after one warm-up step). Each call reads its pick back, with the next
/// step already queued (`YINSEN_CUDA_GREEDY_AHEAD=0`: not).
fn host_loop_tok_s(b: &CudaBackend) -> Result<f64> {
    use crate::backends::Backend;
    let mut ms = Vec::new();
    for _ in 0..5 {
        let mut cache = b.cuda_cache(140)?;
        let mut tok = b.forward_greedy(&mut cache, 1)?.unwrap_or(1);
        let t = std::time::Instant::now();
        for _ in 0..128 {
            tok = b.forward_greedy(&mut cache, tok)?.unwrap_or(1);
        }
        ms.push(t.elapsed().as_secs_f32() * 1e3 / 128.0);
    }
    Ok(1000.0 / median(ms))
}

/// Decode tok/s at a context of `ctx`: fill the cache to `ctx`, then time
/// `steps` graph replays; median of `reps`.
fn decode_at(b: &CudaBackend, ctx: usize, steps: usize, reps: usize) -> Result<f64> {
    let mut ms = Vec::new();
    for _ in 0..reps {
        let mut cache = b.cuda_cache(ctx + steps + 2)?;
        if ctx > 0 {
            b.time_forward(&mut cache, ctx)?;
            crate::backends::KvCache::truncate(&mut cache, 0);
            set_len(&mut cache, ctx);
        }
        ms.push(b.time_decode(&mut cache, steps)?);
    }
    Ok(1000.0 / median(ms))
}

fn set_len(c: &mut super::forward::CudaCache, n: usize) {
    c.set_len_for_bench(n);
}

fn forward_ms(b: &CudaBackend, nt: usize, reps: usize) -> Result<f64> {
    let mut cache = b.cuda_cache(nt)?;
    b.time_forward(&mut cache, nt)?; // warm-up
    let ms: Result<Vec<f32>> = (0..reps).map(|_| b.time_forward(&mut cache, nt)).collect();
    Ok(median(ms?))
}

/// GPU ms of the `nt`-token step as `run` does it: graph replays (median of
/// `reps` runs of 10 back-to-back replays at ctx 0), else un-graphed.
/// `ctx`: cached tokens before the step (filled by a forward first).
fn step_ms(b: &CudaBackend, nt: usize, ctx: usize, reps: usize) -> Result<(f64, bool)> {
    let mut cache = b.cuda_cache(ctx + nt)?;
    if ctx > 0 {
        b.time_forward(&mut cache, ctx)?;
        set_len(&mut cache, ctx);
    }
    let mut ms = Vec::with_capacity(reps);
    for _ in 0..reps {
        match b.time_step_graph(&mut cache, nt, 10)? {
            Some(t) => ms.push(t),
            None => break,
        }
    }
    if ms.is_empty() {
        b.time_forward(&mut cache, nt)?; // warm-up
        for _ in 0..reps {
            ms.push(b.time_forward(&mut cache, nt)?);
        }
        return Ok((median(ms), false));
    }
    Ok((median(ms), true))
}

/// Wall ms of one batched greedy step of `nseq` sequences after `ctx`
/// cached tokens each: median of `steps` steps after 3 warm-up steps (a
/// graph is captured on a key's second use).
fn batch_ms(b: &CudaBackend, nseq: usize, ctx: usize, steps: usize) -> Result<f64> {
    Ok(batch_ms_gpu(b, nseq, ctx, steps, false)?.0)
}

/// [`batch_ms`], and with `gpu` the GPU ms of a replay of the step's graph
/// (timed while its caches are alive: the graph's table points at them).
fn batch_ms_gpu(b: &CudaBackend, nseq: usize, ctx: usize, steps: usize, gpu: bool) -> Result<(f64, f32)> {
    use crate::backends::{Backend, KvCache};
    let vocab = b.config().vocab as u32;
    let mut caches = (0..nseq)
        .map(|_| {
            let mut c = b.cuda_cache(ctx + steps + 4)?;
            set_len(&mut c, ctx);
            Ok(c)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut ms = Vec::with_capacity(steps);
    for step in 0..steps + 3 {
        let mut refs: Vec<&mut dyn KvCache> = caches.iter_mut().map(|c| c as &mut dyn KvCache).collect();
        let toks: Vec<u32> = (0..nseq as u32).map(|i| (i * 7919 + step as u32) % vocab).collect();
        let t = std::time::Instant::now();
        b.forward_batch_pick(&mut refs, &toks, &vec![(1, true); nseq])?;
        if step >= 3 {
            ms.push(t.elapsed().as_secs_f32() * 1e3);
        }
    }
    let g = match gpu {
        true => b.time_last_batch_graph(10)?.unwrap_or(f32::NAN),
        false => f32::NAN,
    };
    Ok((median(ms), g))
}

/// `step_ms` with the persistent multi-token kernel off (the per-kernel body).
fn per_kernel_step(b: &CudaBackend, nt: usize, ctx: usize, reps: usize) -> Result<f64> {
    let was = b.set_mega_multi(false);
    let r = step_ms(b, nt, ctx, reps);
    b.set_mega_multi(was);
    Ok(r?.0)
}

/// `YINSEN_CUDA_BENCH=step`: the multi-token step rows only (persistent
/// against per-kernel, 2..16 tokens on stderr) and the decode step they
/// are compared with.
fn bench_step_only(b: &CudaBackend) -> Result<CudaBench> {
    let max = crate::backends::Backend::config(b).max_ctx;
    let long = 2048.min(max.saturating_sub(300));
    for nt in [2, 4, 8, 16] {
        let (p, _) = step_ms(b, nt, 0, 10)?;
        let k = per_kernel_step(b, nt, 0, 10)?;
        eprintln!("step {nt:2} tokens ctx 0: persistent {p:.3} ms, per-kernel {k:.3} ms");
    }
    // Where the multi-token kernel stops paying: 16 tokens after ctx keys.
    let was = b.set_mega_multi_ctx(usize::MAX);
    for ctx in [256, 512, 1024, 2048] {
        let p = step_ms(b, 16, ctx, 10).map(|r| r.0);
        let k = per_kernel_step(b, 16, ctx, 10);
        eprintln!(
            "step 16 tokens ctx {ctx}: persistent {:.3} ms, per-kernel {:.3} ms",
            p?, k?
        );
    }
    b.set_mega_multi_ctx(was);
    for (nt, ctx) in [(16, 0), (2, 0), (16, long)] {
        let steps = b.trace_mega_multi(nt, ctx)?;
        let total: f64 = steps.iter().map(|s| s.1).sum();
        eprintln!("trace {nt} tokens ctx {ctx}: {total:.2} us per layer");
        for (name, us) in steps {
            eprintln!("trace {nt} tokens ctx {ctx}: {name:>20} {us:6.2} us");
        }
    }
    let decode_ctx0 = decode_at(b, 0, 128, 5)?;
    let decode_long = decode_at(b, long, 128, 3)?;
    let (step16_ms, step16_graph) = step_ms(b, 16, 0, 20)?;
    let step16_per_kernel_ms = per_kernel_step(b, 16, 0, 20)?;
    let step16_ms_ctx2048 = step_ms(b, 16, long, 10)?.0;
    let k_long = per_kernel_step(b, 16, long, 10)?;
    eprintln!("step 16 tokens ctx {long}: persistent {step16_ms_ctx2048:.3} ms, per-kernel {k_long:.3} ms");
    let mut r = bench_decode_only_rows(b, decode_ctx0, decode_long)?;
    r.step16_ms = step16_ms;
    r.step16_graph = step16_graph;
    r.step16_persistent = b.uses_mega_multi();
    r.step16_per_kernel_ms = step16_per_kernel_ms;
    r.step16_gemv_ms = f64::INFINITY;
    r.step16_vs_step1 = step16_ms.min(step16_per_kernel_ms) * decode_ctx0 / 1000.0;
    r.step16_ms_ctx2048 = step16_ms_ctx2048;
    r.step16_vs_step1_ctx2048 = step16_ms_ctx2048 * decode_long / 1000.0;
    Ok(r)
}

fn flag_sweep(b: &CudaBackend, long: usize) -> Result<Vec<(u32, f64, f64)>> {
    let Ok(list) = std::env::var("YINSEN_CUDA_MEGA_AB") else {
        return Ok(Vec::new());
    };
    if !b.uses_mega() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for f in list.split(',').filter_map(|v| v.trim().parse::<u32>().ok()) {
        let was = b.set_mega_flags(f);
        let r = decode_at(b, 0, 128, 3).and_then(|a| Ok((a, decode_at(b, long, 128, 3)?)));
        b.set_mega_flags(was);
        let (a, l) = r?;
        out.push((f, a, l));
    }
    Ok(out)
}

/// Decode tok/s at ctx 0 and `long` with the 8-bit lm_head (then back to
/// f16), the screened pick off meanwhile.
fn q8_decode(b: &CudaBackend, model: Option<&crate::model::Model>, long: usize) -> Result<(Option<f64>, Option<f64>)> {
    let Some(m) = model else { return Ok((None, None)) };
    let screened = b.set_lm_head_screen(None)?;
    let was = b.set_lm_head_q8(Some(m.lm_head()))?;
    let r = decode_at(b, 0, 128, 3).and_then(|a| Ok((a, decode_at(b, long, 128, 3)?)));
    b.set_lm_head_q8(if was { Some(m.lm_head()) } else { None })?;
    b.set_lm_head_screen(screened.then(|| m.lm_head()))?;
    let (a, l) = r?;
    Ok((Some(a), Some(l)))
}

/// Decode tok/s at ctx 0 and `long` with the other greedy pick (screened
/// <-> full F16 head), then back; None where the screen cannot run.
fn other_pick_decode(b: &CudaBackend, model: Option<&crate::model::Model>, long: usize) -> Result<Option<(f64, f64)>> {
    let Some(m) = model else { return Ok(None) };
    let screened = b.lm_head_screened();
    if b.set_lm_head_screen((!screened).then(|| m.lm_head())).is_err() {
        return Ok(None);
    }
    let r = decode_at(b, 0, 128, 3).and_then(|a| Ok((a, decode_at(b, long, 128, 3)?)));
    b.set_lm_head_screen(screened.then(|| m.lm_head()))?;
    r.map(Some)
}

/// Run every measurement the model's context length allows (`model`: the
/// backend's model, for the 8-bit lm_head rows; None skips them).
pub fn bench(b: &CudaBackend, model: Option<&crate::model::Model>) -> Result<CudaBench> {
    match std::env::var("YINSEN_CUDA_BENCH").as_deref() {
        Ok("decode") => return bench_decode_only(b),
        Ok("step") => return bench_step_only(b),
        Ok("prefill") => return bench_prefill_only(b),
        Ok("batch") => return bench_batch_only(b, true),
        Ok("batch-head") => return bench_batch_only(b, false),
        _ => {}
    }
    let max = crate::backends::Backend::config(b).max_ctx;
    let long = 2048.min(max.saturating_sub(300));
    let (q8_0, q8_long) = q8_decode(b, model, long)?;
    let other_pick = other_pick_decode(b, model, long)?;
    let decode_ctx0 = decode_at(b, 0, 128, 5)?;
    let decode_long = decode_at(b, long, 128, 3)?;
    let screen_candidates = b.screen_last_pick()?.map(|p| p.0);
    let (step16_ms, step16_graph) = step_ms(b, 16, 0, 20)?;
    let step16_ms_ctx2048 = step_ms(b, 16, long, 10)?.0;
    let step16_per_kernel_ms = per_kernel_step(b, 16, 0, 20)?;
    let step16_gemv_ms = {
        let multi = b.set_mega_multi(false);
        let was = b.set_mma_min_tokens(17);
        let r = step_ms(b, 16, 0, 20);
        b.set_mma_min_tokens(was);
        b.set_mega_multi(multi);
        r?.0
    };
    // The device and decode rows as the decode-only record has them; every
    // other row measured here.
    Ok(CudaBench {
        decode_tok_s_ctx0_lm_head_q8: q8_0,
        decode_tok_s_ctx2048_lm_head_q8: q8_long,
        decode_screened: b.lm_head_screened(),
        decode_tok_s_other_pick: other_pick,
        screen_candidates,
        prefill_ms_512: forward_ms(b, 512.min(max), 5)?,
        prefill_ms_2048: forward_ms(b, 2048.min(max), 3)?,
        step16_ms,
        step16_graph,
        step16_gemv_ms,
        step16_persistent: b.uses_mega_multi(),
        step16_per_kernel_ms,
        step16_nograph_ms: forward_ms(b, 16, 20)?,
        step16_vs_step1: step16_ms.min(step16_gemv_ms).min(step16_per_kernel_ms) * decode_ctx0 / 1000.0,
        step16_ms_ctx2048,
        step16_vs_step1_ctx2048: step16_ms_ctx2048 * decode_long / 1000.0,
        batch16_ms: batch_ms(b, 16, 0, 20)?,
        batch16_ms_ctx2048: batch_ms(b, 16, long, 10)?,
        step1_nograph_ms: forward_ms(b, 1, 20)?,
        decode_tok_s_ctx0_no_pdl: {
            let was = b.set_pdl(false);
            let r = decode_at(b, 0, 128, 3);
            b.set_pdl(was);
            r?
        },
        persistent_decode: b.uses_mega(),
        decode_tok_s_ctx0_per_kernel: {
            let was = b.set_mega(false);
            let r = decode_at(b, 0, 128, 3);
            b.set_mega(was);
            r?
        },
        decode_tok_s_ctx2048_per_kernel: {
            let was = b.set_mega(false);
            let r = decode_at(b, long, 128, 3);
            b.set_mega(was);
            r?
        },
        mega_flag_sweep: flag_sweep(b, long)?,
        mega_phases_ctx0: b.trace_mega(0)?,
        mega_phases_ctx2048: b.trace_mega(long)?,
        kernels_ctx0: b.profile_decode(0, 10)?,
        kernels_ctx2048: b.profile_decode(long, 5)?,
        kernels_step16_ctx0: b.profile_step(16, 0, 10)?,
        kernels_step16_ctx2048: b.profile_step(16, long, 5)?,
        kernels_prefill_512: b.profile_forward(512.min(max), 3)?,
        kernels_prefill_2048: b.profile_forward(2048.min(max), 3)?,
        gemm_sweep: if std::env::var("YINSEN_CUDA_GEMM_SWEEP").is_ok_and(|v| v == "1") {
            b.gemm_sweep(&[16, 512, 2048])?
        } else {
            Vec::new()
        },
        ..bench_decode_only_rows(b, decode_ctx0, decode_long)?
    })
}

/// `YINSEN_CUDA_BENCH=batch`: batched steps of 4 and 16 sequences from
/// several contexts through the persistent multi-token kernel and the
/// per-kernel body (printed; `batch-head` leaves these out), the batched
/// picks' head kernels (the full head, the screen with either pass 1), then
/// the decode rows and the batch-16 rows.
fn bench_batch_only(b: &CudaBackend, contexts: bool) -> Result<CudaBench> {
    let max = crate::backends::Backend::config(b).max_ctx;
    let long = 2048.min(max.saturating_sub(300));
    for n in [4, 16].into_iter().filter(|_| contexts) {
        for ctx in [0, 512, 1024, long] {
            // Wall ms per step (host included), then the GPU ms of a replay.
            let was = b.set_mega_multi_batch_keys(usize::MAX);
            let (p, pg) = batch_ms_gpu(b, n, ctx, 10, true)?;
            b.set_mega_multi_batch_keys(0);
            let (k, kg) = batch_ms_gpu(b, n, ctx, 10, true)?;
            b.set_mega_multi_batch_keys(was);
            eprintln!(
                "batch {n:2} sequences ctx {ctx}: persistent {p:.3} ms (GPU {pg:.3}), per-kernel {k:.3} ms (GPU {kg:.3})"
            );
        }
    }
    // The batched picks' heads: the full head's passes, the screen with
    // either pass 1 (un-graphed kernel groups, then graphed wall / GPU ms).
    use crate::backends::cuda::forward::BatchPass1;
    let pass1 = b.set_batch_pass1(BatchPass1::Off);
    for p in [BatchPass1::Off, BatchPass1::Dp4a, BatchPass1::Mma] {
        b.set_batch_pass1(p);
        for (what, k) in [("greedy", None), ("top-40", Some(40))] {
            let groups = b.profile_batch(16, k, 5)?;
            let total: f32 = groups.iter().map(|g| g.1).sum();
            let parts: Vec<String> = groups.iter().map(|(t, ms)| format!("{t} {:.0}", ms * 1e3)).collect();
            eprintln!(
                "batch 16 sequences ctx 0, {what} picks, head {p:?}, un-graphed, GPU us: {:.0} = {}",
                total * 1e3,
                parts.join(", ")
            );
        }
        let (w, g) = batch_ms_gpu(b, 16, 0, 20, true)?;
        eprintln!("batch 16 sequences ctx 0, greedy picks, head {p:?}: {w:.3} ms (GPU {g:.3})");
    }
    b.set_batch_pass1(pass1);
    let decode_ctx0 = decode_at(b, 0, 128, 5)?;
    let decode_long = decode_at(b, long, 128, 3)?;
    let mut r = bench_decode_only_rows(b, decode_ctx0, decode_long)?;
    r.batch16_ms = batch_ms(b, 16, 0, 20)?;
    r.batch16_ms_ctx2048 = batch_ms(b, 16, long, 10)?;
    Ok(r)
}

/// `YINSEN_CUDA_BENCH=decode`: only the persistent decode rows (tok/s, the
/// flag sweep and the phase trace), for quick A/B runs of the decode kernel;
/// every other row is reported as 0 / empty.
fn bench_decode_only(b: &CudaBackend) -> Result<CudaBench> {
    let max = crate::backends::Backend::config(b).max_ctx;
    // `YINSEN_CUDA_BENCH_CTX`: the long-context row's position (A/B runs).
    let long = std::env::var("YINSEN_CUDA_BENCH_CTX")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(2048)
        .min(max.saturating_sub(300));
    // `YINSEN_CUDA_PROFILE_CTX`: the position of these un-graphed launches,
    // the first of the run (a profiler's launch index reaches them).
    let pctx = std::env::var("YINSEN_CUDA_PROFILE_CTX")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0)
        .min(max.saturating_sub(300));
    for (tag, us) in b.profile_mega(pctx, 5)? {
        eprintln!("persistent decode launch {tag}: {us:.1} us (un-graphed, ctx {pctx})");
    }
    // Per A/B flag value, the ctx-0 phase trace (stderr: work, quant, dot,
    // barrier microseconds per layer).
    if let Ok(list) = std::env::var("YINSEN_CUDA_MEGA_AB") {
        for f in list.split(',').filter_map(|v| v.trim().parse::<u32>().ok()) {
            let was = b.set_mega_flags(f);
            let t = b.trace_mega(0);
            b.set_mega_flags(was);
            let per_layer = crate::backends::Backend::config(b).n_layers.max(1) as f64;
            for p in t? {
                eprintln!(
                    "flags {f} trace ctx0 {:>9}: work {:5.2} quant {:5.2} dot {:5.2} barrier {:5.2} us/layer",
                    p.phase,
                    p.work_us / per_layer,
                    p.quant_us / per_layer,
                    p.dot_us / per_layer,
                    p.barrier_us / per_layer
                );
            }
        }
    }
    let (a, l) = (decode_at(b, 0, 128, 5)?, decode_at(b, long, 128, 3)?);
    // The step as the decode rows time it (GPU time of queued replays),
    // with a host round trip per token (wall), and `generate_greedy` (wall).
    for (how, tag) in [
        (DecodeLoop::Replays, "graph replays fed on the device (GPU time)"),
        (DecodeLoop::HostFed, "host feeds each token and reads it back (wall)"),
        (DecodeLoop::Generate, "generate_greedy (wall)"),
    ] {
        let mut ms = Vec::new();
        for _ in 0..5 {
            let mut cache = b.cuda_cache(140)?;
            ms.push(b.time_decode_loop(&mut cache, 128, how)?);
        }
        eprintln!("decode ctx 0, {tag}: {:.1} us per step", median(ms) * 1e3);
    }
    let mut r = bench_decode_only_rows(b, a, l)?;
    r.mega_flag_sweep = flag_sweep(b, long)?;
    r.mega_phases_ctx0 = b.trace_mega(0)?;
    r.mega_phases_ctx2048 = b.trace_mega(long)?;
    Ok(r)
}

/// `YINSEN_CUDA_BENCH=prefill`: only the prefill rows (512 and 2048 tokens)
/// and their per-kernel profiles, plus (stderr) an A/B of the big-call GEMMs
/// in this process: each `BigGemm` named in `YINSEN_CUDA_GEMM_AB`
/// (comma-separated: auto, shape or a variant name; default auto, shape and
/// the TMA kernel with 256- and with 128-token tiles everywhere), alternated twice, with the GEMMs' share of the
/// un-graphed 2048-token profile. `YINSEN_CUDA_GEMM_SWEEP=1` adds the
/// per-matrix sweep at 512 and 2048 tokens.
fn bench_prefill_only(b: &CudaBackend) -> Result<CudaBench> {
    use super::forward::BigGemm;
    let max = crate::backends::Backend::config(b).max_ctx;
    let (short, long) = (512.min(max), 2048.min(max));
    let mut r = bench_decode_only_rows(b, 0.0, 0.0)?;
    r.prefill_ms_512 = forward_ms(b, short, 5)?;
    r.prefill_ms_2048 = forward_ms(b, long, 5)?;
    r.kernels_prefill_512 = b.profile_forward(short, 3)?;
    r.kernels_prefill_2048 = b.profile_forward(long, 3)?;
    if std::env::var("YINSEN_CUDA_GEMM_SWEEP").is_ok_and(|v| v == "1") {
        r.gemm_sweep = b.gemm_sweep(&[short, long])?;
    }
    let arms: Vec<BigGemm> = match std::env::var("YINSEN_CUDA_GEMM_AB") {
        Ok(list) => list.split(',').filter_map(|n| BigGemm::parse(n.trim())).collect(),
        Err(_) => ["auto", "shape", "tern_wgmma_tma_s4", "tern_wgmma_tma_n128"]
            .iter()
            .filter_map(|n| BigGemm::parse(n))
            .collect(),
    };
    const GEMMS: [&str; 4] = ["qkv", "o", "gate_up", "down"];
    for round in 0..2 {
        for &arm in &arms {
            let was = b.set_big_gemm(arm);
            let res = (|| -> Result<(f64, f64, f64)> {
                let a = forward_ms(b, short, 5)?;
                let c = forward_ms(b, long, 5)?;
                let gemm = b
                    .profile_forward(long, 3)?
                    .iter()
                    .filter(|k| GEMMS.contains(&k.tag.as_str()))
                    .map(|k| k.us)
                    .sum::<f64>();
                Ok((a, c, gemm))
            })();
            b.set_big_gemm(was);
            let (a, c, gemm) = res?;
            let name = arm.name();
            eprintln!(
                "prefill A/B round {round} {name}: {short} tokens {a:.2} ms, {long} tokens {c:.2} ms, GEMMs {:.2} ms of the {long}-token profile",
                gemm / 1e3
            );
        }
    }
    // YINSEN_CUDA_TAIL_AB=1: the TMA GEMM's tail split on / off, alternated
    // three times, over prompt lengths and the 2048-token profile's GEMMs.
    if std::env::var("YINSEN_CUDA_TAIL_AB").is_ok_and(|v| v == "1") {
        let g = b.gpu();
        let on = g.info.sms.max(1) as usize;
        for round in 0..3 {
            for sms in [on, 0] {
                let was = g.set_tail_sms(sms);
                let res = (|| -> Result<(Vec<String>, Vec<String>)> {
                    let mut rows = Vec::new();
                    for n in [128, 256, 512, 1024, 2048].into_iter().filter(|&n| n <= max) {
                        rows.push(format!("{n} {:.3} ms", forward_ms(b, n, 5)?));
                    }
                    let prof = b.profile_forward(long, 3)?;
                    let gemms = GEMMS.iter().map(|t| {
                        let us: f64 = prof.iter().filter(|k| k.tag == *t).map(|k| k.us).sum();
                        format!("{t} {us:.0} us")
                    });
                    Ok((rows, gemms.collect()))
                })();
                g.set_tail_sms(was);
                let (rows, gemms) = res?;
                let arm = if sms > 0 { "on" } else { "off" };
                eprintln!(
                    "tail split A/B round {round} {arm}: {}; {long}-token GEMMs: {}",
                    rows.join(", "),
                    gemms.join(", ")
                );
            }
        }
    }
    Ok(r)
}

/// A bench record with the decode rows only (everything else empty).
fn bench_decode_only_rows(b: &CudaBackend, decode_ctx0: f64, decode_long: f64) -> Result<CudaBench> {
    let g = b.gpu();
    Ok(CudaBench {
        device: g.info.name.clone(),
        arch: g.arch.clone(),
        kernels_from_cache: g.from_cache,
        kv_dtype: format!("{:?}", b.kv_dtype()),
        decode_tok_s_ctx0: decode_ctx0,
        decode_tok_s_ctx2048: decode_long,
        decode_tok_s_ctx0_host_loop: host_loop_tok_s(b)?,
        prefill_ms_512: 0.0,
        prefill_ms_2048: 0.0,
        step16_ms: 0.0,
        step16_graph: false,
        step16_gemv_ms: 0.0,
        step16_persistent: false,
        step16_per_kernel_ms: 0.0,
        step16_nograph_ms: 0.0,
        step16_vs_step1: 0.0,
        step16_ms_ctx2048: 0.0,
        step16_vs_step1_ctx2048: 0.0,
        batch16_ms: 0.0,
        batch16_ms_ctx2048: 0.0,
        step1_nograph_ms: 0.0,
        decode_tok_s_ctx0_no_pdl: 0.0,
        persistent_decode: b.uses_mega(),
        decode_tok_s_ctx0_per_kernel: 0.0,
        decode_tok_s_ctx2048_per_kernel: 0.0,
        mega_flag_sweep: Vec::new(),
        mega_phases_ctx0: Vec::new(),
        mega_phases_ctx2048: Vec::new(),
        decode_tok_s_ctx0_lm_head_q8: None,
        decode_tok_s_ctx2048_lm_head_q8: None,
        decode_screened: b.lm_head_screened(),
        decode_tok_s_other_pick: None,
        screen_candidates: b.screen_last_pick()?.map(|p| p.0),
        kernels_ctx0: Vec::new(),
        kernels_ctx2048: Vec::new(),
        kernels_step16_ctx0: Vec::new(),
        kernels_step16_ctx2048: Vec::new(),
        kernels_prefill_512: Vec::new(),
        kernels_prefill_2048: Vec::new(),
        gemm_sweep: Vec::new(),
    })
}
