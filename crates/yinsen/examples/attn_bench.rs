//! Time the prefill attention alone on the 2B4T shape (20 query heads, 5 KV
//! heads, head_dim 128), on the spin pool as the forward runs it:
//! `cargo run --release -p yinsen --example attn_bench -- [threads] [tokens] [reps] [all]`.
//! Prints min and median ms per layer (one call = one layer); `all` adds the
//! AVX2 and scalar kernels. `YINSEN_ATTN_P0=P`: the tokens follow P cached
//! positions (a chunk of a longer prompt, a multi-token step). With 1 token
//! (decode at position P) it also times each decode kernel and the scalar
//! reference as the forward runs them (heads split over the spin pool).
mod common;

use std::time::Instant;

use yinsen::backends::cpu::attention::{self, AttnInput, AttnScratch, Isa};
use yinsen::backends::cpu::decode_attention::{decode_heads_with, decode_kernels};
use yinsen::backends::cpu::spin_pool::{Par, SpinPool};

fn main() {
    let arg = |i: usize| std::env::args().nth(i);
    let threads: usize = arg(1).and_then(|a| a.parse().ok()).unwrap_or(2);
    let n: usize = arg(2).and_then(|a| a.parse().ok()).unwrap_or(512);
    let reps: usize = arg(3).and_then(|a| a.parse().ok()).unwrap_or(15);
    let all = arg(4).is_some_and(|a| a == "all");
    let (s, qd, kvd) = common::shape_2b4t();
    let p0: usize = std::env::var("YINSEN_ATTN_P0")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut values = common::Values::new();
    let mut rnd = |k: usize, a: f32| values.take(k, a);
    // Buffers start `YINSEN_ATTN_SHIFT` floats (default 4, as a 16-byte
    // aligned malloc block gives) past a 64-byte boundary.
    let shift: usize = std::env::var("YINSEN_ATTN_SHIFT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let mut bufs: Vec<Vec<f32>> = Vec::new();
    let mut place = |v: Vec<f32>| {
        let mut b = vec![0f32; v.len() + 32];
        let off = b.as_ptr().align_offset(64) + shift % 16;
        b[off..off + v.len()].copy_from_slice(&v);
        bufs.push(b);
        off
    };
    let offs = [
        place(rnd(n * qd, 3.0)),
        place(rnd((p0 + n) * kvd, 1.0)),
        place(rnd((p0 + n) * kvd, 1.0)),
        place(vec![0f32; n * qd]),
    ];
    let [qb, kb, vb, ob] = &mut bufs[..] else {
        unreachable!()
    };
    let (q, kc, vc) = (
        &qb[offs[0]..offs[0] + n * qd],
        &kb[offs[1]..offs[1] + (p0 + n) * kvd],
        &vb[offs[2]..offs[2] + (p0 + n) * kvd],
    );
    let out = &mut ob[offs[3]..offs[3] + n * qd];
    let input = AttnInput::new(&s, q, kc, vc, p0);
    let mut sc = AttnScratch::default();
    let spin = SpinPool::new(threads).unwrap();
    let isas = Isa::available(128);
    for isa in if all { &isas[..] } else { &isas[..1] } {
        let mut t = Vec::new();
        for _ in 0..reps + 1 {
            let t0 = Instant::now();
            attention::causal_attention_into(*isa, input, n, out, &mut sc, Par::Spin(&spin));
            t.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        t.remove(0);
        t.sort_by(f64::total_cmp);
        let gf = 20.0 * (n * (n + 1) / 2 + n * p0) as f64 * 128.0 * 4.0 / 1e9;
        let chk: f64 = out.iter().map(|&x| x as f64).sum();
        println!(
            "attention {isa:?} {threads} thr n {n}: min {:.3} median {:.3} ms/layer ({:.1} GFLOP/s causal at min) sum {chk:.4}",
            t[0],
            t[t.len() / 2],
            gf / t[0] * 1e3
        );
    }
    if n == 1 {
        for isa in decode_kernels(128) {
            let mut t = Vec::new();
            for _ in 0..reps + 1 {
                let t0 = Instant::now();
                spin.for_ranges(out, 128, |r0, o| decode_heads_with(isa, input, r0 / 128, o));
                t.push(t0.elapsed().as_secs_f64() * 1e3);
            }
            t.remove(0);
            t.sort_by(f64::total_cmp);
            println!(
                "decode attention {isa:?} {threads} thr at {} keys: min {:.4} median {:.4} ms/layer",
                p0 + 1,
                t[0],
                t[t.len() / 2]
            );
        }
    }
}
