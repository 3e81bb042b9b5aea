//! How many F16 candidate rows a screened pick would keep with a narrower
//! copy of the lm_head: 8-bit blocks (today's screen) or 4-bit blocks, and a
//! per-row or per-block form of the proved bound. A feasibility probe, not
//! the pick itself: logits and bounds in f64 (no rounding allowances), on
//! the final hidden states of decode steps of the 2B4T shape.
//! `cargo run --release -p yinsen --example screen_bits_probe -- [steps]`
//!
//! Bound forms for row i (E: head values, Ê: the copy's, h: hidden state,
//! blocks b of 32 inputs, s_b the block's scale):
//! - row:   max_j |E_ij − Ê_ij| · ‖h‖₁ (today's `err_i a` term)
//! - block: Σ_b max_{j∈b} |E_ij − Ê_ij| · ‖h_b‖₁ (≤ the row form; each
//!   block's max error is at most s_b / 2, which the copy stores anyway)
//!
//! Candidates: rows whose upper end lq + B reaches the k-th largest exact
//! logit of the 2k + 8 rows with the largest lower ends (head_screen.rs).
use std::sync::Arc;

use yinsen::backends::cpu::{CpuBackend, CpuOptions};
use yinsen::backends::{Backend, Output};

const BLOCK: usize = 32;

struct Copy {
    name: &'static str,
    bytes_per_row: usize,
    lq: Vec<f64>,
    bound_row: Vec<f64>,
    bound_block: Vec<f64>,
}

fn quantise(e: &[f32], qmax: f32, out: &mut [f32], err: &mut [f32]) {
    for (b, (blk, o)) in e.chunks(BLOCK).zip(out.chunks_mut(BLOCK)).enumerate() {
        let m = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
        let s = if m > 0.0 { m / qmax } else { 1.0 };
        let mut me = 0f32;
        for (v, q) in blk.iter().zip(o.iter_mut()) {
            *q = (v / s).round().clamp(-qmax, qmax) * s;
            me = me.max((v - *q).abs());
        }
        err[b] = me;
    }
}

fn candidates(exact: &[f64], c: &Copy, k: usize, block: bool) -> usize {
    let b = if block { &c.bound_block } else { &c.bound_row };
    let mut lows: Vec<(usize, f64)> = c.lq.iter().zip(b).map(|(l, e)| l - e).enumerate().collect();
    let kp = 2 * k + 8;
    lows.select_nth_unstable_by(kp - 1, |x, y| y.1.total_cmp(&x.1));
    let mut ex: Vec<f64> = lows[..kp].iter().map(|p| exact[p.0]).collect();
    ex.sort_by(|x, y| y.total_cmp(x));
    let t = ex[k - 1];
    c.lq.iter().zip(b).filter(|(l, e)| *l + *e >= t).count()
}

fn main() {
    let steps: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(6);
    let model = Arc::new(yinsen::model::synthetic::build("2b4t").expect("synthetic 2b4t"));
    let head = model.lm_head();
    let (vocab, hidden) = (head.rows, head.cols);
    let b = CpuBackend::with_options(model.clone(), &CpuOptions::default()).expect("cpu backend");
    let mut cache = b.new_cache(256).expect("cache");
    let ids: Vec<u32> = (0..8).map(|i| i * 977 + 5).collect();
    b.forward(cache.as_mut(), &ids, Output::LastLogits).expect("prompt");
    let mut totals = std::collections::BTreeMap::<String, usize>::new();
    let mut row = vec![0f32; hidden];
    let mut q = vec![0f32; hidden];
    let mut err = vec![0f32; hidden / BLOCK];
    for step in 0..steps {
        let h = b
            .forward(cache.as_mut(), &[100 + 31 * step as u32], Output::Hidden)
            .expect("step");
        let h: Vec<f64> = h.iter().map(|&v| v as f64).collect();
        let l1: f64 = h.iter().map(|v| v.abs()).sum();
        let l1b: Vec<f64> = h.chunks(BLOCK).map(|c| c.iter().map(|v| v.abs()).sum()).collect();
        let mut exact = vec![0f64; vocab];
        let mut copies: Vec<Copy> = [("8-bit", 127f32, BLOCK + 2), ("4-bit", 7f32, BLOCK / 2 + 2)]
            .iter()
            .map(|&(name, _, bpb)| Copy {
                name,
                bytes_per_row: hidden / BLOCK * bpb,
                lq: vec![0.0; vocab],
                bound_row: vec![0.0; vocab],
                bound_block: vec![0.0; vocab],
            })
            .collect();
        for (r, ex) in exact.iter_mut().enumerate() {
            head.row_to_f32(r, &mut row);
            *ex = row.iter().zip(&h).map(|(&e, x)| e as f64 * x).sum();
            for (c, qmax) in copies.iter_mut().zip([127f32, 7f32]) {
                quantise(&row, qmax, &mut q, &mut err);
                c.lq[r] = q.iter().zip(&h).map(|(&e, x)| e as f64 * x).sum();
                let emax = err.iter().fold(0f32, |a, &v| a.max(v)) as f64;
                c.bound_row[r] = emax * l1;
                c.bound_block[r] = err.iter().zip(&l1b).map(|(&e, s)| e as f64 * s).sum();
            }
        }
        for c in &copies {
            for k in [1usize, 40] {
                for block in [false, true] {
                    let n = candidates(&exact, c, k, block);
                    let key = format!(
                        "{} k={k:>2} {} bound ({} B/row)",
                        c.name,
                        if block { "block" } else { "row  " },
                        c.bytes_per_row
                    );
                    *totals.entry(key.clone()).or_default() += n;
                    println!("step {step}: {key}: {n} candidates");
                }
            }
        }
    }
    println!("\nmean over {steps} steps (vocab {vocab}, F16 row {} B):", 2 * hidden);
    for (key, n) in &totals {
        let per = *n as f64 / steps as f64;
        let bytes_row: usize = key
            .split('(')
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let mb = (vocab * bytes_row) as f64 / 1e6 + per * (2 * hidden) as f64 / 1e6;
        println!("{key}: {per:.0} candidates, {mb:.0} MB per pick (copy + candidate F16 rows)");
    }
}
