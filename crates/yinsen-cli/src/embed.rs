//! `yinsen embed`: one vector per input, batched through the throughput
//! path (`Output::Hidden`), as JSON.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use yinsen::backends::Output;
use yinsen::engine::Engine;

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

/// Pool `[n, hidden]` hidden states into one vector.
pub fn pool(h: &[f32], hidden: usize, pooling: &str, normalize: bool) -> Result<Vec<f32>> {
    let n = h.len() / hidden;
    let mut v = match pooling {
        "last" => h[(n - 1) * hidden..].to_vec(),
        "mean" => {
            let mut m = vec![0f32; hidden];
            for row in h.chunks_exact(hidden) {
                m.iter_mut().zip(row).for_each(|(a, b)| *a += b);
            }
            m.iter_mut().for_each(|a| *a /= n as f32);
            m
        }
        other => bail!("unknown --pooling '{other}' (mean, last)"),
    };
    if normalize {
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            v.iter_mut().for_each(|x| *x /= norm);
        }
    }
    Ok(v)
}

pub fn cmd_embed(engine: &Engine, a: &EmbedArgs) -> Result<()> {
    let texts = inputs(a)?;
    pool(&[0.0], 1, &a.pooling, false)?; // reject a bad --pooling before any work
    let hidden = engine.model.config.hidden;
    let b = &engine.backend;
    let mut out = Vec::with_capacity(texts.len());
    let t = std::time::Instant::now();
    let mut n_tok = 0;
    for text in &texts {
        let ids = engine.encode_prompt(text)?;
        if ids.is_empty() {
            bail!("input {:?} has no tokens", text);
        }
        n_tok += ids.len();
        // Each input is one call of all its tokens: the throughput path.
        let mut cache = b.new_cache(ids.len())?;
        let h = b.forward(cache.as_mut(), &ids, Output::Hidden)?;
        out.push(serde_json::json!({
            "text": text,
            "tokens": ids.len(),
            "embedding": pool(&h, hidden, &a.pooling, a.normalize)?,
        }));
    }
    let plan = b.hybrid().and_then(|h| h.last_plan()).map(|p| p.summary());
    let v = serde_json::json!({
        "model": engine.model.config.arch,
        "backend": b.name(),
        "plan": plan,
        "pooling": a.pooling,
        "normalized": a.normalize,
        "dim": hidden,
        "tokens_per_s": n_tok as f64 / t.elapsed().as_secs_f64(),
        "data": out,
    });
    println!("{v}");
    Ok(())
}
