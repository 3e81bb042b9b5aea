//! `yinsen bench --paths` (the seed's per-path table) and
//! `yinsen bench --concurrent` (embedding batch + decode at once).

use anyhow::{Context, Result};
use yinsen::dispatch::{paths, Capabilities};
use yinsen::engine::Engine;

pub fn cmd_paths(engine: &Engine, model_name: &str, threads: usize, reps: usize, json: bool) -> Result<()> {
    let h = engine
        .backend
        .hybrid()
        .context("--paths needs --backend auto (the hybrid dispatcher)")?;
    let caps = Capabilities::detect();
    let mut t = paths::run(&engine.model, &caps, h, threads, reps)?;
    t.model = model_name.to_string();
    if json {
        println!("{}", serde_json::to_string_pretty(&t)?);
        return Ok(());
    }
    println!("model: {}   machine: {}", t.model, caps.cpu_name);
    let cuda = t.cuda_device.clone().unwrap_or_else(|| "cuda".into());
    println!(
        "| workload | {} | cpu-matrix ({}) | cpu-vector ({}) | hybrid |",
        cuda, t.cpu_matrix_kernel, t.cpu_vector_kernel
    );
    println!("|---|---|---|---|---|");
    for r in &t.rows {
        println!(
            "| {} | {} | {} | {} | {} |",
            r.workload,
            r.cuda.text(),
            r.cpu_matrix.text(),
            r.cpu_vector.text(),
            r.hybrid.text()
        );
    }
    println!("hybrid plans:");
    for r in &t.rows {
        println!("  {}: {}", r.workload, r.hybrid_plan);
    }
    println!("resident weights:");
    for (name, b) in &t.resident_weight_bytes {
        println!("  {name}: {:.1} MiB", *b as f64 / (1 << 20) as f64);
    }
    if let Some(m) = &t.kv_move {
        println!("KV move at {}", m.describe());
    }
    Ok(())
}

pub fn cmd_concurrent(engine: &Engine, json: bool, quick: bool) -> Result<()> {
    let b = engine.backend.as_ref();
    let max = engine.model.config.max_ctx;
    let (seqs, len, steps) = if quick {
        (4, 32, 16)
    } else {
        (16, 128.min(max), 64.min(max))
    };
    let r = paths::concurrent(b, b, seqs, len, steps)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "embedding: {seqs} x {len} tokens on {} | decode: {steps} steps on {}",
        r.embed_path, r.decode_path
    );
    println!("| workload | alone tok/s | concurrent tok/s |");
    println!("|---|---|---|");
    println!(
        "| embed | {:.1} | {:.1} |",
        r.embed_alone_tok_s, r.embed_concurrent_tok_s
    );
    println!(
        "| decode | {:.1} | {:.1} |",
        r.decode_alone_tok_s, r.decode_concurrent_tok_s
    );
    println!(
        "combined: {:.1} tok/s concurrent vs {:.1} tok/s one after the other",
        r.combined_tok_s, r.sequential_tok_s
    );
    Ok(())
}
