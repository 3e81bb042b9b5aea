//! What a one-token matmul costs on the spin pool apart from its bytes:
//! empty fork-joins (the ways decode uses the pool) and the 2B4T one-token
//! matmuls with their weights hot (one copy, called again and again, so it
//! sits in the cores' L2 / the L3) or cold (`copies` copies cycled).
//! `cargo run --release -p yinsen --example pool_bench -- [threads] [reps] [copies]`
//! Prints the median microseconds per call of batches of `reps` calls.
use std::time::Instant;

use yinsen::backends::cpu::kernels::policy::KernelPolicy;
use yinsen::backends::cpu::linear::{Linear, QuantizedInput};
use yinsen::backends::cpu::spin_pool::{split_len, SpinPool};
use yinsen::model::synthetic::random_ternary;

/// Median over 9 batches of `reps` calls of `f`, in microseconds per call
/// (one batch of warm-up first).
fn time_us(reps: usize, mut f: impl FnMut(usize)) -> f64 {
    let mut batches = Vec::new();
    for b in 0..10 {
        let t0 = Instant::now();
        for i in 0..reps {
            f(i);
        }
        if b > 0 {
            batches.push(t0.elapsed().as_secs_f64() * 1e6 / reps as f64);
        }
    }
    batches.sort_by(f64::total_cmp);
    batches[batches.len() / 2]
}

fn main() {
    let arg = |i: usize, d: usize| std::env::args().nth(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let (threads, reps, copies) = (arg(1, 2), arg(2, 200), arg(3, 1).max(1));
    let pool = SpinPool::new(threads).expect("spin pool");
    let mut out = vec![0f32; 3840];
    let chunk = split_len(out.len(), threads * 4, 16);
    println!("threads {threads}, reps {reps}, copies {copies}");
    println!(
        "empty for_chunks ({} chunks): {:.2} us",
        out.len().div_ceil(chunk),
        time_us(reps, |_| pool
            .for_chunks(&mut out, chunk, |_, o| std::hint::black_box(o).fill(0.0)))
    );
    println!(
        "empty for_ranges ({threads} ranges): {:.2} us",
        time_us(reps, |_| pool
            .for_ranges(&mut out, 16, |_, o| std::hint::black_box(o).fill(0.0)))
    );
    println!(
        "empty run: {:.2} us",
        time_us(reps, |_| pool.run(|t, _| _ = std::hint::black_box(t)))
    );
    let policy = KernelPolicy::auto();
    for (name, n_out, n_in) in [
        ("qkv", 3840, 2560),
        ("o", 2560, 2560),
        ("gate_up", 13824, 2560),
        ("down", 2560, 6912),
    ] {
        let lins: Vec<Linear> = (0..copies)
            .map(|c| {
                let w = random_ternary(n_out, n_in, 7 + c as u64).expect("matrix");
                Linear::prepare(&policy, &[&w]).expect("prepare")
            })
            .collect();
        let x: Vec<f32> = (0..n_in).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        let q = QuantizedInput::new(&x, n_in);
        let mut y = vec![0f32; n_out];
        let us = time_us(reps, |i| lins[i % copies].forward_spin(&q, &mut y, &pool));
        let bytes = n_out * n_in.div_ceil(320) * 64;
        println!(
            "{name} {n_out}x{n_in} ({:.2} MB at 1.6 bits): {us:.2} us per call = {:.1} GB/s",
            bytes as f64 / 1e6,
            bytes as f64 / us / 1e3
        );
    }
}
