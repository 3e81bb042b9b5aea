//! The CPU's screened head picks (greedy and top-k) on the 2B4T shape: time
//! per decode token and F16 candidate rows per pick.
//! `cargo run --release -p yinsen --example pick_probe -- [threads] [k]`
use std::sync::Arc;
use std::time::Instant;

use yinsen::backends::cpu::{CpuBackend, CpuOptions};
use yinsen::backends::{Backend, Output};

fn main() {
    let arg = |i: usize, d: usize| std::env::args().nth(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let (threads, k) = (arg(1, 2), arg(2, 40));
    let model = Arc::new(yinsen::model::synthetic::build("2b4t").expect("synthetic 2b4t"));
    let opts = CpuOptions {
        threads,
        lm_head_screen: true,
        ..Default::default()
    };
    let b = CpuBackend::with_options(model, &opts).expect("cpu backend");
    let mut c = b.new_cache(256).expect("cache");
    let ids: Vec<u32> = (0..8).map(|i| i * 977 + 5).collect();
    b.forward(c.as_mut(), &ids, Output::LastLogits).expect("prompt");
    for kk in [1, k, 1, k] {
        let before = b.screen_counts().expect("screened head");
        let t = Instant::now();
        for i in 0..16u32 {
            b.forward_top_k(c.as_mut(), 100 + i * 31, kk).expect("pick");
        }
        let ms = t.elapsed().as_secs_f64() * 1e3 / 16.0;
        let after = b.screen_counts().expect("screened head");
        println!(
            "k {kk}: {ms:.2} ms per token, {:.0} candidate rows per pick, {} full-head picks",
            (after.candidates - before.candidates) as f64 / 16.0,
            after.full - before.full
        );
    }
}
