//! Time the prefill attention alone on the 2B4T shape (20 query heads, 5 KV
//! heads, head_dim 128), on the spin pool as the forward runs it:
//! `cargo run --release -p yinsen --example attn_bench -- [threads] [tokens] [reps] [all]`.
//! Prints min and median ms per layer (one call = one layer); `all` adds the
//! AVX2 and scalar kernels.
use std::time::Instant;

use yinsen::backends::cpu::attention::{self, AttnScratch, AttnShape, Isa};
use yinsen::backends::cpu::spin_pool::{Par, SpinPool};

fn main() {
    let arg = |i: usize| std::env::args().nth(i);
    let threads: usize = arg(1).and_then(|a| a.parse().ok()).unwrap_or(2);
    let n: usize = arg(2).and_then(|a| a.parse().ok()).unwrap_or(512);
    let reps: usize = arg(3).and_then(|a| a.parse().ok()).unwrap_or(15);
    let all = arg(4).is_some_and(|a| a == "all");
    let s = AttnShape {
        n_heads: 20,
        n_kv_heads: 5,
        head_dim: 128,
    };
    let (qd, kvd) = (2560, 640);
    let mut st = 1u64;
    let mut rnd = |k: usize, a: f32| {
        (0..k)
            .map(|_| {
                st = st.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((st >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a
            })
            .collect::<Vec<f32>>()
    };
    let q = rnd(n * qd, 3.0);
    let kc = rnd(n * kvd, 1.0);
    let vc = rnd(n * kvd, 1.0);
    let mut out = vec![0f32; n * qd];
    let mut sc = AttnScratch::default();
    let spin = SpinPool::new(threads).unwrap();
    let isas = Isa::available(128);
    for isa in if all { &isas[..] } else { &isas[..1] } {
        let mut t = Vec::new();
        for _ in 0..reps + 1 {
            let t0 = Instant::now();
            attention::causal_attention_into(*isa, &s, &q, &kc, &vc, 0, n, &mut out, &mut sc, Par::Spin(&spin));
            t.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        t.remove(0);
        t.sort_by(f64::total_cmp);
        let gf = 20.0 * (n * (n + 1) / 2) as f64 * 128.0 * 4.0 / 1e9;
        let chk: f64 = out.iter().map(|&x| x as f64).sum();
        println!(
            "attention {isa:?} {threads} thr n {n}: min {:.3} median {:.3} ms/layer ({:.1} GFLOP/s causal at min) sum {chk:.4}",
            t[0],
            t[t.len() / 2],
            gf / t[0] * 1e3
        );
    }
}
