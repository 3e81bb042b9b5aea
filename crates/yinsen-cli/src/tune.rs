//! `yinsen tune`: sweep paths and kernels, write the profile (and an SVG
//! plot of latency vs tokens with the chosen thresholds).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use plotters::prelude::*;
use yinsen::dispatch::{self, profile::Profile, Capabilities};

#[derive(Args)]
pub struct TuneArgs {
    /// Model to sweep (thresholds depend on its shape) [default:
    /// synthetic:2b4t, or synthetic:125m with --quick].
    #[arg(short, long)]
    pub model: Option<String>,
    /// Small sweep (synthetic:125m unless -m is given, tokens 1..64).
    #[arg(long)]
    pub quick: bool,
    /// Write profile.json and sweep.svg here instead of the cache dir.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(short, long, default_value_t = 0)]
    pub threads: usize,
    /// Stop growing a path's token count once one call takes longer than this
    /// many seconds (default: 30, or 2 with --quick).
    #[arg(long)]
    pub max_call_s: Option<f64>,
    /// Timed repeats per point.
    #[arg(short, long, default_value_t = 3)]
    pub repeats: usize,
}

pub fn cmd_tune(a: TuneArgs) -> Result<()> {
    let spec_name = match (&a.model, a.quick) {
        (Some(m), _) => m.clone(),
        (None, true) => "synthetic:125m".into(),
        (None, false) => "synthetic:2b4t".into(),
    };
    let loaded = yinsen::formats::load(&spec_name, &Default::default())?;
    let model = Arc::new(loaded.model);
    let caps = Capabilities::detect();
    let progress = |s: &str| eprintln!("tune: {s}");
    let spec = dispatch::tune::TuneSpec {
        model_name: &spec_name,
        tokens: dispatch::tune::token_counts(a.quick, model.config.max_ctx),
        reps: if a.quick { 1 } else { a.repeats.max(1) },
        threads: a.threads,
        max_call_s: a.max_call_s.unwrap_or(if a.quick { 2.0 } else { 30.0 }),
        kv_positions: if a.quick { 256 } else { 2048 },
        progress: &progress,
    };
    let (profile, notes) = dispatch::tune::run(&model, &caps, &spec)?;
    for n in &notes {
        eprintln!("tune: {n}");
    }
    let (json, svg) = match &a.out {
        Some(d) => (d.join("profile.json"), d.join("sweep.svg")),
        None => {
            let p = dispatch::profile::default_profile_path(&profile.fingerprint)
                .context("no cache dir: set XDG_CACHE_HOME or HOME, or pass --out")?;
            let svg = p.with_extension("svg");
            (p, svg)
        }
    };
    profile.save(&json)?;
    plot(&profile, &svg)?;
    print_summary(&profile);
    println!("profile: {}\nplot: {}", json.display(), svg.display());
    Ok(())
}

fn print_summary(p: &Profile) {
    println!("| path | tokens | ms | tok/s |");
    println!("|---|---|---|---|");
    for pt in &p.points {
        println!(
            "| {} | {} | {:.3} | {:.1} |",
            pt.path,
            pt.tokens,
            pt.ms,
            pt.tokens as f64 * 1e3 / pt.ms
        );
    }
    println!("cpu kernel policy: {}", p.cpu_policy.describe());
    let rules: Vec<String> = p.path_rules.iter().map(|(t, s)| format!("{s} from {t}")).collect();
    println!("whole-call path: {}", rules.join(", "));
    for m in &p.kv_move {
        println!("KV move at {}", m.describe());
    }
}

/// Latency vs tokens per path (log-log), thresholds as vertical lines.
fn plot(p: &Profile, file: &Path) -> Result<()> {
    let mut paths: Vec<&str> = p.points.iter().map(|x| x.path.as_str()).collect();
    paths.dedup();
    let tmax = p.points.iter().map(|x| x.tokens).max().unwrap_or(1).max(2) as f64;
    let ms = |f: fn(f64, f64) -> f64, init| p.points.iter().map(|x| x.ms).fold(init, f);
    let (lo, hi) = (ms(f64::min, f64::MAX).max(1e-4), ms(f64::max, 0.0).max(1e-3));
    let root = SVGBackend::new(file, (900, 600)).into_drawing_area();
    let err = |e: String| anyhow::anyhow!("drawing {}: {e}", file.display());
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("yinsen tune: {} on {}", p.model, p.cpu_name),
            ("sans-serif", 18),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((1f64..tmax).log_scale(), (lo * 0.8..hi * 1.25).log_scale())
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("tokens per call")
        .y_desc("ms per call")
        .draw()
        .map_err(|e| err(e.to_string()))?;
    for (i, path) in paths.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> = p
            .points
            .iter()
            .filter(|x| x.path == *path)
            .map(|x| (x.tokens as f64, x.ms))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| err(e.to_string()))?
            .label(path.to_string())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart
            .draw_series(pts.iter().map(|&(x, y)| Circle::new((x, y), 3, color.filled())))
            .map_err(|e| err(e.to_string()))?;
    }
    // Chosen thresholds: kernel switches (dashed grey) and path switches (red).
    let thresholds = p.cpu_policy.rules.iter().skip(1).map(|r| (r.0, BLACK.mix(0.4), &r.1));
    let path_t = p.path_rules.iter().skip(1).map(|r| (r.0, RED.mix(0.8), &r.1));
    for (t, color, name) in thresholds.chain(path_t) {
        let x = t as f64;
        chart
            .draw_series(LineSeries::new(
                vec![(x, lo * 0.8), (x, hi * 1.25)],
                color.stroke_width(1),
            ))
            .map_err(|e| err(e.to_string()))?
            .label(format!("{name} from {t} tokens"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}
