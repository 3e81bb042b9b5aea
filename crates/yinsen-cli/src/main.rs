//! `yinsen`: the command-line surface. Everything here goes through the
//! library's public API (`yinsen::engine::Engine` and friends).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use yinsen::backends::Output;
use yinsen::engine::sampling::SamplerConfig;
use yinsen::engine::{Engine, EngineOptions, GenParams};
use yinsen::model::Activation;

mod embed;
mod paths;
mod tune;

#[derive(Parser)]
#[command(
    name = "yinsen",
    version,
    about = "Inference engine for ternary (1.58-bit) language models"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show CPU features, threads and CUDA devices.
    Info {
        #[arg(long)]
        json: bool,
    },
    /// Generate text from a prompt.
    Run(RunArgs),
    /// Write logits of a prompt to a .npy file.
    Logits(LogitsArgs),
    /// Print the token ids `run` would feed the model, as JSON.
    Tokenize {
        #[command(flatten)]
        m: ModelArgs,
        #[arg(short, long)]
        prompt: String,
    },
    /// Print the text of comma-separated token ids.
    Detokenize {
        #[command(flatten)]
        m: ModelArgs,
        #[arg(long, value_delimiter = ',')]
        tokens: Vec<u32>,
    },
    /// Measure prompt and decode throughput (llama-bench style).
    Bench(BenchArgs),
    /// Sweep paths and CPU kernels over token counts; write this machine's profile.
    Tune(tune::TuneArgs),
    /// Serve an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions).
    Serve(ServeArgs),
    /// Embed texts (one pooled hidden-state vector per input, JSON).
    Embed {
        #[command(flatten)]
        m: ModelArgs,
        #[command(flatten)]
        e: embed::EmbedArgs,
    },
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// A .gguf file, a Hugging Face directory, or synthetic:<2b4t|700m|125m|tiny>.
    #[arg(short, long)]
    model: String,
    /// Compute path: cpu, cuda or auto.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// CPU kernel: auto, amx, vnni3 (1.6-bit base-3 layout), vnni, avx2, scalar.
    #[arg(long, default_value = "auto")]
    kernel: String,
    /// CPU threads (default: physical cores).
    #[arg(short, long, default_value_t = 0)]
    threads: usize,
    /// Override the FFN activation (relu2 or silu), e.g. for `bitnet` GGUFs.
    #[arg(long)]
    activation: Option<String>,
    /// lm_head precision: "auto" (the file's dtype; the CPU path also keeps
    /// an 8-bit copy to pick greedy and top-k tokens exactly as the full head
    /// would, reading about half its bytes; CUDA picks greedy tokens the same
    /// way), "native" (the file's dtype only;
    /// f16 on CUDA) or "q8" (logits from an 8-bit Q8_0 copy: half the bytes
    /// per decode step, small logit error; on CUDA it serves the one-token
    /// decode step, prefill logits stay f16).
    #[arg(long, default_value = "auto")]
    lm_head: String,
    /// Hybrid weights: "dual" (every path's layout resident) or "lazy"
    /// (built on first use, idle ones dropped over --weights-budget).
    #[arg(long, default_value = "dual")]
    weights: String,
    /// Lazy mode: resident weight bytes allowed across paths.
    #[arg(long)]
    weights_budget: Option<usize>,
    /// Print each forward call's plan (which path runs which stage).
    #[arg(long)]
    explain: bool,
    /// Tuning profile: "auto" (this machine's, if tuned), "off", or a file.
    #[arg(long, default_value = "auto")]
    profile: String,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Context per request, prompt + completion (0 = the model's).
    #[arg(long, default_value_t = 0)]
    ctx: usize,
    /// Completion tokens when a request gives no max_tokens.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Requests that may wait while the engine is full (more get 503).
    #[arg(long, default_value_t = 16)]
    max_queue: usize,
    /// Requests decoded together in one batched step each token (1: one at
    /// a time). Pays on the CPU path (16 sequences: 3x the tokens/s of one
    /// on a 16-core Xeon); CUDA steps a batch one sequence at a time, each
    /// picking its token on the device, so it gains nothing there.
    #[arg(long, default_value_t = 1)]
    batch: usize,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    m: ModelArgs,
    #[arg(short, long, conflicts_with = "prompt_file")]
    prompt: Option<String>,
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// Tokens to generate.
    #[arg(short = 'n', long, default_value_t = 128)]
    n_predict: usize,
    /// Temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    temp: f32,
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    #[arg(long, default_value_t = 0x5EED)]
    seed: u64,
    /// Wrap the prompt in the model's chat template.
    #[arg(long)]
    chat: bool,
    #[arg(long)]
    system: Option<String>,
    /// Stop when this text appears (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Context size (default: the model's).
    #[arg(long, default_value_t = 0)]
    ctx: usize,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    m: ModelArgs,
    #[arg(short, long, conflicts_with = "tokens")]
    prompt: Option<String>,
    #[arg(long, value_delimiter = ',')]
    tokens: Option<Vec<u32>>,
    #[arg(long)]
    out: PathBuf,
    /// All positions instead of the last.
    #[arg(long)]
    all: bool,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// Prompt lengths (comma-separated).
    #[arg(short = 'p', long, value_delimiter = ',', default_value = "512")]
    n_prompt: Vec<usize>,
    /// Decode lengths (comma-separated).
    #[arg(short = 'n', long, value_delimiter = ',', default_value = "128")]
    n_gen: Vec<usize>,
    /// Measured repeats per test (one extra warm-up run is excluded).
    #[arg(short, long, default_value_t = 3)]
    repeats: usize,
    /// Batched decode rows: this many sequences stepped together for each
    /// -n length (comma-separated counts).
    #[arg(long, value_delimiter = ',')]
    batch: Vec<usize>,
    #[arg(long)]
    json: bool,
    /// Skip the memory-bandwidth measurement.
    #[arg(long)]
    no_bandwidth: bool,
    /// The seed's table: prefill 2K, single token, batch 16 per path + hybrid.
    #[arg(long)]
    paths: bool,
    /// An embedding batch and a decode at once vs one after the other.
    #[arg(long)]
    concurrent: bool,
}

fn progress_bar() -> Option<Box<dyn Fn(u64, u64) + Send + Sync>> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let pb = indicatif::ProgressBar::new(0);
    pb.set_style(
        indicatif::ProgressStyle::with_template("loading {bar:40} {bytes}/{total_bytes} {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    Some(Box::new(move |done, total| {
        pb.set_length(total);
        pb.set_position(done);
        if done >= total {
            pb.finish_and_clear();
        }
    }))
}

fn load(m: &ModelArgs) -> Result<Engine> {
    let activation = match &m.activation {
        None => None,
        Some(a) => Some(Activation::parse(a).with_context(|| format!("unknown activation '{a}' (relu2, silu)"))?),
    };
    let (lm_head_q8, lm_head_screen) = match m.lm_head.as_str() {
        "auto" => (false, true),
        "native" => (false, false),
        "q8" => (true, false),
        other => bail!("unknown --lm-head '{other}' (auto, native, q8)"),
    };
    let weights = match (m.weights.as_str(), m.weights_budget) {
        ("dual", None) => yinsen::dispatch::WeightMode::Dual,
        ("dual", Some(_)) => bail!("--weights-budget needs --weights lazy"),
        ("lazy", budget) => yinsen::dispatch::WeightMode::Lazy { budget },
        (other, _) => bail!("unknown --weights '{other}' (dual, lazy)"),
    };
    let profile = match m.profile.as_str() {
        "auto" => yinsen::dispatch::ProfileChoice::Auto,
        "off" => yinsen::dispatch::ProfileChoice::Off,
        f => yinsen::dispatch::ProfileChoice::File(f.into()),
    };
    if (lm_head_q8 || lm_head_screen) && std::env::var_os("YINSEN_CUDA_LM_HEAD").is_none() {
        // The CUDA backend reads its lm_head choice when it is built (inside
        // Engine::load); set before any worker thread exists. `auto`: greedy
        // picks through the screened head there too.
        std::env::set_var("YINSEN_CUDA_LM_HEAD", if lm_head_q8 { "q8" } else { "screen" });
    }
    let engine = Engine::load(
        &m.model,
        EngineOptions {
            backend: m.backend.clone(),
            cpu: yinsen::backends::cpu::CpuOptions {
                kernel: m.kernel.clone(),
                threads: m.threads,
                lm_head_q8,
                lm_head_screen,
                policy: None,
            },
            activation,
            progress: progress_bar(),
            dispatch: yinsen::dispatch::DispatchOptions {
                weights,
                profile,
                explain: m.explain,
            },
        },
    )?;
    for w in &engine.warnings {
        eprintln!("warning: {w}");
    }
    if let Some(h) = engine.backend.hybrid() {
        for n in h.notes.lock().map(|n| n.clone()).unwrap_or_default() {
            eprintln!("note: {n}");
        }
    } else if m.explain {
        eprintln!("[plan] every call on {} (forced by --backend)", engine.backend.name());
    }
    Ok(engine)
}

fn read_prompt(prompt: &Option<String>, file: &Option<PathBuf>) -> Result<String> {
    match (prompt, file) {
        (Some(p), _) => Ok(p.clone()),
        (None, Some(f)) => {
            let bytes = std::fs::read(f).with_context(|| format!("reading prompt file {}", f.display()))?;
            String::from_utf8(bytes).map_err(|e| {
                anyhow::anyhow!(
                    "prompt file {} is not valid UTF-8 (invalid byte at offset {})",
                    f.display(),
                    e.utf8_error().valid_up_to()
                )
            })
        }
        (None, None) => bail!("give a prompt with -p TEXT or --prompt-file FILE"),
    }
}

fn cmd_run(a: RunArgs) -> Result<()> {
    let engine = load(&a.m)?;
    let text = read_prompt(&a.prompt, &a.prompt_file)?;
    let prompt = if a.chat {
        engine.chat_prompt(a.system.as_deref(), &text)?
    } else {
        engine.encode_prompt(&text)?
    };
    let mut session = engine.session(a.ctx)?;
    let params = GenParams {
        max_new: a.n_predict,
        sampler: SamplerConfig {
            temperature: a.temp,
            top_k: a.top_k,
            top_p: a.top_p,
            min_p: a.min_p,
            repeat_penalty: a.repeat_penalty,
            repeat_last_n: 64,
            seed: a.seed,
        },
        stop_ids: engine.tokenizer.eos_ids().to_vec(),
    };
    let mut decoder = engine.tokenizer.stream(false);
    let mut text_out = String::new();
    let mut stdout = std::io::stdout().lock();
    let json = a.json;
    let stops = a.stop.clone();
    let (tokens, reason, timings) = session.generate(&prompt, &params, |tok| {
        let piece = decoder.push(tok)?;
        text_out.push_str(&piece);
        let hit = stops.iter().find_map(|s| text_out.find(s.as_str()));
        let emit_upto = hit.unwrap_or(text_out.len());
        if !json {
            // Print only what is now known not to be part of a stop string.
            let printed = text_out.len() - piece.len();
            if emit_upto > printed {
                let _ = stdout.write_all(&text_out.as_bytes()[printed..emit_upto]);
                let _ = stdout.flush();
            }
        }
        if let Some(i) = hit {
            text_out.truncate(i);
            return Ok(false);
        }
        Ok(true)
    })?;
    if hit_none(&stops, &text_out) {
        let rest = decoder.finish()?;
        if !json {
            let _ = stdout.write_all(rest.as_bytes());
        }
        text_out.push_str(&rest);
    }
    if json {
        let v = serde_json::json!({
            "prompt_tokens": prompt,
            "tokens": tokens,
            "text": text_out,
            "stop_reason": reason,
            "backend": engine.backend.name(),
            "timings": timings,
        });
        writeln!(stdout, "{v}")?;
    } else {
        writeln!(stdout)?;
        eprintln!(
            "[{} prompt tokens: {:.1} tok/s | {} generated: {:.1} tok/s | {} | stop: {:?}]",
            timings.n_prompt,
            timings.prompt_tokens_per_s,
            timings.n_gen,
            timings.gen_tokens_per_s,
            engine.backend.name(),
            reason
        );
    }
    Ok(())
}

fn cmd_serve(a: ServeArgs) -> Result<()> {
    let engine = std::sync::Arc::new(load(&a.m)?);
    let model_id = std::path::Path::new(&a.m.model)
        .file_name()
        .map_or(a.m.model.clone(), |f| f.to_string_lossy().into_owned());
    let opts = yinsen_server::ServerOptions {
        model_id,
        ctx: a.ctx,
        default_max_tokens: a.max_tokens,
        max_queue: a.max_queue,
        batch: a.batch,
        ..Default::default()
    };
    let cpu_batch = engine
        .backend
        .hybrid()
        .and_then(|h| h.planner.default_rules_cpu_batch(a.batch));
    if let Some(n) = cpu_batch {
        eprintln!(
            "yinsen: note: steps of {n} or more sequences run on the CPU matrix path (the default rules, no \
             tuned profile); `yinsen tune` measures this machine, `--backend cuda` keeps every step on the GPU"
        );
    }
    let app = yinsen_server::router(engine.clone(), opts);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let addr = format!("{}:{}", a.host, a.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        eprintln!(
            "yinsen: serving {} on http://{} ({}); Ctrl-C stops",
            a.m.model,
            listener.local_addr()?,
            engine.backend.name()
        );
        axum_serve(listener, app).await
    })
}

async fn axum_serve(listener: tokio::net::TcpListener, app: yinsen_server::Router) -> Result<()> {
    yinsen_server::serve(listener, app, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}

fn hit_none(stops: &[String], text: &str) -> bool {
    !stops.iter().any(|s| text.contains(s.as_str()))
}

fn cmd_logits(a: LogitsArgs) -> Result<()> {
    let engine = load(&a.m)?;
    let tokens = match (&a.prompt, &a.tokens) {
        (Some(p), _) => engine.encode_prompt(p)?,
        (None, Some(t)) => t.clone(),
        (None, None) => bail!("give -p TEXT or --tokens 1,2,3"),
    };
    let mut s = engine.session(0)?;
    let out = if a.all { Output::AllLogits } else { Output::LastLogits };
    let logits = s.feed(&tokens, out)?;
    let vocab = engine.model.config.vocab;
    let shape: Vec<usize> = if a.all { vec![tokens.len(), vocab] } else { vec![vocab] };
    yinsen::formats::npy::write_f32(&a.out, &shape, &logits)?;
    eprintln!("wrote {} logits {:?} to {}", logits.len(), shape, a.out.display());
    Ok(())
}

fn cmd_info(json: bool) -> Result<()> {
    let info = yinsen::sysinfo::machine_info();
    if json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        print!("{}", info.to_text());
    }
    Ok(())
}

fn cmd_bench(a: BenchArgs) -> Result<()> {
    let engine = load(&a.m)?;
    let threads = if a.m.threads == 0 {
        yinsen::backends::cpu::forward::default_threads()
    } else {
        a.m.threads
    };
    if a.paths {
        paths::cmd_paths(&engine, &a.m.model, threads, a.repeats.max(1), a.json)?;
    }
    if a.concurrent {
        paths::cmd_concurrent(&engine, a.json, false)?;
    }
    if a.paths || a.concurrent {
        return Ok(());
    }
    let quiet = a.json || !std::io::stderr().is_terminal();
    let progress = |s: &str| {
        if !quiet {
            eprint!("\r\x1b[2K{s}");
        }
    };
    let records = yinsen::bench::run(
        engine.backend.as_ref(),
        &engine.model,
        &yinsen::bench::BenchSpec {
            model_name: &a.m.model,
            kernel: &a.m.kernel,
            threads,
            prompts: &a.n_prompt.iter().copied().filter(|&n| n > 0).collect::<Vec<_>>(),
            gens: &a.n_gen.iter().copied().filter(|&n| n > 0).collect::<Vec<_>>(),
            repeats: a.repeats.max(1),
            batches: &a.batch.iter().copied().filter(|&n| n > 0).collect::<Vec<_>>(),
            // Both paths decode from the 8-bit copy (CUDA: one-token steps).
            lm_head_q8: a.m.lm_head == "q8",
            progress: &progress,
        },
    )?;
    if !quiet {
        eprint!("\r\x1b[2K");
    }
    let bw = (!a.no_bandwidth).then(|| yinsen::bench::memory_bandwidth(threads));
    let rss = yinsen::bench::resident_bytes();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&records)?);
        return Ok(());
    }
    let cpu = yinsen::sysinfo::cpu_info();
    println!("machine: {} ({} threads used)", cpu.name, threads);
    println!(
        "load {:.2} s, backend layout transform {:.2} s ({:.0} MB of ternary weights -> {:.0} MB resident in {})",
        engine.load_s,
        engine.prepare_s,
        engine.model.ternary_bytes() as f64 / 1e6,
        engine.backend.resident_weight_bytes() as f64 / 1e6,
        engine.backend.name()
    );
    println!("| model | backend | threads | test | t/s (median) | mean ± sd |");
    println!("|---|---|---|---|---|---|");
    for r in &records {
        let test = if let Some(b) = r.n_seqs {
            match &r.pick {
                Some(p) => format!("tg{} x {b} sequences ({p} pick)", r.n_gen),
                None => format!("tg{} x {b} sequences", r.n_gen),
            }
        } else if let Some(p) = &r.pick {
            format!("tg{} ({p} pick)", r.n_gen)
        } else if r.n_gen > 0 {
            format!("tg{}", r.n_gen)
        } else {
            format!("pp{}", r.n_prompt)
        };
        println!(
            "| {} | {} | {} | {} | {:.2} | {:.2} ± {:.2} |",
            r.model, r.backend, r.n_threads, test, r.median_ts, r.avg_ts, r.stddev_ts
        );
    }
    for r in records.iter().filter(|r| r.weights_gb_per_s.is_some()) {
        let gbs = r.weights_gb_per_s.unwrap_or(0.0);
        match bw {
            Some(bw) if bw > 0.0 => println!(
                "tg{}: {:.1} GB/s of weights streamed ({:.0}% of measured {:.1} GB/s memory read bandwidth)",
                r.n_gen,
                gbs,
                100.0 * gbs / bw,
                bw
            ),
            _ => println!("tg{}: {:.1} GB/s of weights streamed", r.n_gen, gbs),
        }
    }
    if let Some(rss) = rss {
        println!("resident memory: {:.1} MiB", rss as f64 / (1 << 20) as f64);
    }
    if let Some(h) = engine.backend.hybrid() {
        report_hybrid(h);
    }
    if a.m.backend == "cuda" {
        print_cuda_bench(&engine)?;
    }
    Ok(())
}

/// Plans, path use, KV moves and resident weights of the hybrid.
fn report_hybrid(h: &yinsen::dispatch::HybridBackend) {
    use yinsen::backends::Output;
    println!("dispatch ({:?} weights):", h.mode());
    for (what, n) in [("decode", 1), ("batch 16", 16), ("prefill 512", 512)] {
        println!("  {what}: {}", h.plan_for(n, Output::LastLogits, None, 0).summary());
    }
    let s = h.stats();
    println!(
        "  calls: cpu {}, cuda {}; KV moves {} ({:.1} MiB, {:.2} ms)",
        s.cpu_calls,
        s.cuda_calls,
        s.kv_moves,
        s.kv_moved_bytes as f64 / (1 << 20) as f64,
        s.kv_move_ms
    );
    for r in h.residency() {
        println!(
            "  resident {}: {:.1} MiB ({})",
            r.path.as_str(),
            r.resident_weight_bytes as f64 / (1 << 20) as f64,
            r.backend.as_deref().unwrap_or("not built")
        );
    }
}

/// Issue-4 timings (CUDA events, medians, warm-up and compilation excluded).
fn print_cuda_bench(engine: &Engine) -> Result<()> {
    let cb = yinsen::backends::cuda::CudaBackend::new(&engine.model, 0)?;
    let r = yinsen::backends::cuda::bench::bench(&cb, Some(&engine.model))?;
    let m = &engine.model;
    let gb = yinsen::bench::decode_bytes_per_token(m, false) as f64 / 1e9;
    println!("cuda: {} ({})", r.device, r.arch);
    println!("| test | value | derived |");
    println!("|---|---|---|");
    match r.decode_screened {
        // The screened pick reads the 8-bit head plus a varying set of F16 rows.
        true => println!(
            "| decode ctx 0 | {:.0} tok/s | greedy pick through the screened head (the F16 head's token) |",
            r.decode_tok_s_ctx0
        ),
        false => println!(
            "| decode ctx 0 | {:.0} tok/s | {:.0} GB/s of weights |",
            r.decode_tok_s_ctx0,
            gb * r.decode_tok_s_ctx0
        ),
    }
    println!("| decode ctx 2048 | {:.0} tok/s | |", r.decode_tok_s_ctx2048);
    println!(
        "| decode ctx 0, host round trip per token | {:.0} tok/s | the engine's greedy loop (each pick read back, the next step queued before it) |",
        r.decode_tok_s_ctx0_host_loop
    );
    println!(
        "| decode path | {} | per-kernel graph: {:.0} / {:.0} tok/s (ctx 0 / 2048) |",
        if r.persistent_decode {
            "persistent kernel"
        } else {
            "per-kernel graph"
        },
        r.decode_tok_s_ctx0_per_kernel,
        r.decode_tok_s_ctx2048_per_kernel
    );
    if let (Some(a), Some(l)) = (r.decode_tok_s_ctx0_lm_head_q8, r.decode_tok_s_ctx2048_lm_head_q8) {
        println!("| decode, 8-bit lm_head | {a:.0} / {l:.0} tok/s | ctx 0 / 2048 |");
    }
    if let Some((a, l)) = r.decode_tok_s_other_pick {
        let other = match r.decode_screened {
            true => "full F16 head's argmax",
            false => "screened pick (the F16 head's token)",
        };
        println!("| decode, {other} | {a:.0} / {l:.0} tok/s | ctx 0 / 2048 |");
    }
    if let Some(n) = r.screen_candidates {
        println!(
            "| screened pick, candidate rows | {n} of {} | the last decode step's F16 rows |",
            m.config.vocab
        );
    }
    let ops = 2.0 * m.ternary_bytes() as f64 * 4.0 / 1e12; // TOP per token (2 ops per ternary MAC)
    println!(
        "| prefill 512 | {:.2} ms | {:.0} TOPS ternary |",
        r.prefill_ms_512,
        ops * 512.0 / (r.prefill_ms_512 / 1e3)
    );
    println!(
        "| prefill 2048 | {:.2} ms | {:.0} TOPS ternary |",
        r.prefill_ms_2048,
        ops * 2048.0 / (r.prefill_ms_2048 / 1e3)
    );
    let step1 = 1000.0 / r.decode_tok_s_ctx0;
    println!(
        "| 16-token step{} | {:.2} ms | {:.2}x the 1-token step ({:.3} ms); {} {:.2} / per-kernel tensor-core {:.2} / GEMV {:.2} ms |",
        if r.step16_graph { " (graph)" } else { "" },
        r.step16_ms.min(r.step16_gemv_ms).min(r.step16_per_kernel_ms),
        r.step16_vs_step1,
        step1,
        if r.step16_persistent { "persistent" } else { "default" },
        r.step16_ms,
        r.step16_per_kernel_ms,
        r.step16_gemv_ms
    );
    println!(
        "| 16-token step, ctx 2048 | {:.2} ms | {:.2}x the 1-token step at ctx 2048 |",
        r.step16_ms_ctx2048, r.step16_vs_step1_ctx2048
    );
    println!(
        "| batch-16 decode step | {:.2} ms | 16 sequences, greedy picks, wall: {:.2}x the 1-token step ({:.0} tok/s); after 2048 tokens each {:.2} ms = {:.2}x |",
        r.batch16_ms,
        r.batch16_ms / step1,
        16e3 / r.batch16_ms,
        r.batch16_ms_ctx2048,
        r.batch16_ms_ctx2048 * r.decode_tok_s_ctx2048 / 1000.0
    );
    println!(
        "| 16-token step, no graph | {:.2} ms | {:.2}x the 1-token step |",
        r.step16_nograph_ms,
        r.step16_nograph_ms / step1
    );
    for (ctx, ks) in [(0, &r.kernels_step16_ctx0), (2048, &r.kernels_step16_ctx2048)] {
        let sum: f64 = ks.iter().map(|k| k.us).sum();
        let parts: Vec<String> = ks.iter().map(|k| format!("{} {:.0}", k.tag, k.us)).collect();
        println!(
            "| 16-token step kernels, ctx {ctx} | {:.2} ms summed | {} us |",
            sum / 1e3,
            parts.join(", ")
        );
    }
    for (what, rows) in [
        ("prefill 512", &r.kernels_prefill_512),
        ("prefill 2048", &r.kernels_prefill_2048),
    ] {
        for k in rows.iter().filter(|k| k.calls > 0) {
            println!(
                "| {what}: {} | {:.0} us ({} calls) | {:.0} TOPS |",
                k.tag, k.us, k.calls, k.tops
            );
        }
    }
    for t in &r.gemm_sweep {
        println!(
            "| gemm {} x {} tokens: {} | {:.1} us | {:.0} TOPS, {:.0} GB/s of weights |",
            t.matrix, t.tokens, t.variant, t.us, t.tops, t.weight_gb_s
        );
    }
    for (f, a, l) in &r.mega_flag_sweep {
        println!("| persistent variant flags {f} | {a:.0} / {l:.0} tok/s | ctx 0 / 2048 |");
    }
    for (ctx, phases) in [(0, &r.mega_phases_ctx0), (2048, &r.mega_phases_ctx2048)] {
        for p in phases.iter() {
            println!(
                "| persistent ctx {ctx}: {} | {:.0} us work (norm+quant {:.0}, dot {:.0}) | {:.0} us at the barrier after it |",
                p.phase, p.work_us, p.quant_us, p.dot_us, p.barrier_us
            );
        }
    }
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

/// Keep large activation buffers on the heap instead of fresh mmaps: the
/// forward pass allocates multi-MB buffers per layer, and glibc's default
/// mmap threshold makes each one a new mapping to page-fault and zero.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator parameters; called before any threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

fn main() {
    tune_allocator();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Info { json } => cmd_info(json),
        Cmd::Run(a) => cmd_run(a),
        Cmd::Serve(a) => cmd_serve(a),
        Cmd::Logits(a) => cmd_logits(a),
        Cmd::Tokenize { m, prompt } => load(&m)
            .and_then(|e| Ok(e.encode_prompt(&prompt)?))
            .map(|ids| println!("{}", serde_json::to_string(&ids).unwrap_or_default())),
        Cmd::Detokenize { m, tokens } => load(&m)
            .and_then(|e| Ok(e.tokenizer.decode(&tokens, false)?))
            .map(|t| println!("{t}")),
        Cmd::Bench(a) => cmd_bench(a),
        Cmd::Tune(a) => tune::cmd_tune(a),
        Cmd::Embed { m, e } => load(&m).and_then(|eng| embed::cmd_embed(&eng, &e)),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
