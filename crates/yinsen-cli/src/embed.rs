//! `yinsen embed`: one vector per input, batched through the throughput
//! path (`Output::Hidden`), as JSON.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use yinsen::engine::{Engine, Pooling};

#[derive(Args)]
pub struct EmbedArgs {
    /// mean or last.
    #[arg(long, default_value = "mean")]
    pub pooling: String,
    /// Scale each vector to unit L2 norm.
    #[arg(long)]
    pub normalize: bool,
    /// Texts to embed (repeatable).
    #[arg(short, long, conflicts_with = "file")]
    pub prompt: Vec<String>,
    /// One text per line.
    #[arg(long)]
    pub file: Option<PathBuf>,
}

fn inputs(a: &EmbedArgs) -> Result<Vec<String>> {
    if let Some(f) = &a.file {
        let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        return Ok(text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(String::from)
            .collect());
    }
    if a.prompt.is_empty() {
        bail!("give texts with -p TEXT (repeatable) or --file F");
    }
    Ok(a.prompt.clone())
}

pub fn cmd_embed(engine: &Engine, a: &EmbedArgs) -> Result<()> {
    let texts = inputs(a)?;
    let pooling = Pooling::parse(&a.pooling)?;
    let b = &engine.backend;
    let mut out = Vec::with_capacity(texts.len());
    let t = std::time::Instant::now();
    let mut n_tok = 0;
    for text in &texts {
        let ids = engine.encode_prompt(text)?;
        n_tok += ids.len();
        let embedding = engine
            .embed(&ids, pooling, a.normalize)
            .with_context(|| format!("input {text:?}"))?;
        out.push(serde_json::json!({
            "text": text,
            "tokens": ids.len(),
            "embedding": embedding,
        }));
    }
    let plan = b.hybrid().and_then(|h| h.last_plan()).map(|p| p.summary());
    let v = serde_json::json!({
        "model": engine.model.config.arch,
        "backend": b.name(),
        "plan": plan,
        "pooling": a.pooling,
        "normalized": a.normalize,
        "dim": engine.model.config.hidden,
        "tokens_per_s": n_tok as f64 / t.elapsed().as_secs_f64(),
        "data": out,
    });
    println!("{v}");
    Ok(())
}
