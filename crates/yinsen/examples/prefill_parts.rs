//! Time the non-matmul parts of a 2B4T prefill layer at 512 tokens:
//! `cargo run --release -p yinsen --example prefill_parts [threads]`.
//! Prints the best of several calls (ms per layer; x30 for a forward).
mod common;

use std::time::Instant;

use yinsen::backends::cpu::attention::{self, AttnInput, AttnScratch, Isa};
use yinsen::backends::cpu::linear::QuantizedInput;
use yinsen::backends::cpu::spin_pool::{Par, SendPtr, SpinPool};

fn best(mut f: impl FnMut(), reps: usize) -> f64 {
    let mut b = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        f();
        b = b.min(t.elapsed().as_secs_f64() * 1e3);
    }
    b
}

fn main() {
    let threads: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2);
    let n: usize = std::env::args().nth(2).and_then(|a| a.parse().ok()).unwrap_or(512);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let (s, qd, kvd) = common::shape_2b4t();
    let mut values = common::Values::new();
    let mut rnd = |k: usize, a: f32| values.take(k, a);
    let q = rnd(n * qd, 3.0);
    let kc = rnd(n * kvd, 1.0);
    let vc = rnd(n * kvd, 1.0);
    let x = rnd(n * 6912, 2.0);
    let w = rnd(6912, 1.0);
    let mut out = vec![0f32; n * qd];
    let mut sc = AttnScratch::default();
    pool.install(|| {
        for isa in Isa::available(128) {
            let ms = best(
                || {
                    let input = AttnInput::new(&s, &q, &kc, &vc, 0);
                    attention::causal_attention_into(isa, input, n, &mut out, &mut sc, Par::Rayon)
                },
                10,
            );
            let gf = 20.0 * (n * (n + 1) / 2) as f64 * 128.0 * 4.0 / 1e9;
            println!(
                "attention {isa:?} {threads} thr n {n}: {ms:.3} ms/layer ({:.1} GFLOP/s causal)",
                gf / ms * 1e3
            );
        }
        for d in [2560, 6912] {
            let ms = best(|| drop(QuantizedInput::from_rms_norm(&x[..n * d], &w[..d], 1e-5)), 20);
            println!("norm_quant d {d}: {ms:.3} ms/call");
        }
    });
    // As the forward runs it: a reused input, the spin pool, and the input
    // freshly written by every thread in column stripes (as a matmul
    // epilogue leaves it) or not.
    let spin = SpinPool::new(threads).unwrap();
    let mut xm = x.clone();
    let mut nq = QuantizedInput::default();
    for d in [2560, 6912] {
        for (name, par) in [("rayon", Par::Rayon), ("spin", Par::Spin(&spin))] {
            pool.install(|| {
                let hot = best(|| nq.refill_rms_norm_on(&xm[..n * d], &w[..d], 1e-5, par), 20);
                let mut cold = f64::MAX;
                let mut stripe = f64::MAX;
                for rep in 0..20 {
                    let xp = SendPtr(xm.as_mut_ptr());
                    let cols = d.div_ceil(threads * 8).next_multiple_of(16);
                    let t = Instant::now();
                    spin.for_each_index(d.div_ceil(cols), |c| {
                        for tk in 0..n {
                            for j in c * cols..((c + 1) * cols).min(d) {
                                // SAFETY: column stripe c is this task's alone.
                                unsafe { *xp.get().add(tk * d + j) += 1e-3 * rep as f32 };
                            }
                        }
                    });
                    stripe = stripe.min(t.elapsed().as_secs_f64() * 1e3);
                    let t = Instant::now();
                    nq.refill_rms_norm_on(&xm[..n * d], &w[..d], 1e-5, par);
                    cold = cold.min(t.elapsed().as_secs_f64() * 1e3);
                }
                println!(
                    "norm_quant d {d} {name}: reused {hot:.3} ms, after striped writes {cold:.3} ms (stripe pass {stripe:.3} ms)"
                );
            });
        }
    }
    // An empty region: the fork-join cost alone.
    for (name, par) in [("rayon", Par::Rayon), ("spin", Par::Spin(&spin))] {
        pool.install(|| {
            let ms = best(|| par.for_each_index(threads * 4, |_| std::hint::black_box(())), 200);
            println!("empty region {name}: {:.1} us", ms * 1e3);
        });
    }
}
