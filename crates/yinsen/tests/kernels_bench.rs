//! Single-thread kernel throughput (ignored by default; needs optimisation):
//! `CARGO_PROFILE_DEV_OPT_LEVEL=3 cargo test -p yinsen --test kernels_bench -- --ignored --nocapture`
//! (or `--release`). GEMV is reported as GB/s of resident weight bytes,
//! both "hot" (one matrix, cache resident) and "cold" (rotating over copies
//! totalling more than the L3, so weights stream from DRAM as in decode).
//! GEMM as int8 GOPS (2 ops per multiply-add).

use std::time::Instant;

use yinsen::backends::cpu::kernels::{self, PackedTernary};
use yinsen::model::{TernaryMatrix, WeightScale};

fn matrix(n_out: usize, n_in: usize, seed: u64) -> TernaryMatrix {
    let trits: Vec<i8> = (0..n_out * n_in)
        .map(|i| ((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15 ^ seed) >> 61) as i8 % 3 - 1)
        .collect();
    TernaryMatrix::from_trits(n_out, n_in, &trits, WeightScale::PerTensor(1.0)).unwrap()
}

/// This thread's CPU seconds: on a shared, oversubscribed machine wall time
/// mostly measures other processes.
fn cpu_now() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// CPU seconds per call, best of a few timed batches.
fn time<F: FnMut()>(mut f: F, min_s: f64) -> f64 {
    f();
    let mut best = f64::MAX;
    for _ in 0..3 {
        let (mut n, t0, w0) = (0u32, cpu_now(), Instant::now());
        while cpu_now() - t0 < min_s / 3.0 && w0.elapsed().as_secs_f64() < 10.0 * min_s {
            f();
            n += 1;
        }
        best = best.min((cpu_now() - t0) / n as f64);
    }
    best
}

#[test]
#[ignore]
fn bench_kernels() {
    let shapes = [(6912usize, 2560usize), (2560, 6912)];
    let mut names = kernels::available();
    names.retain(|n| *n != "scalar");
    for name in names {
        let k = kernels::select(name).unwrap();
        for (n_out, n_in) in shapes {
            let m = matrix(n_out, n_in, 1);
            let p = k.prepare(&m).unwrap();
            let bytes = p.resident_bytes() as f64;
            // Cold: enough copies to exceed a 32 MB L3 several times.
            let copies = (160e6 / bytes).ceil() as usize;
            let cold: Vec<_> = (0..copies).map(|_| k.prepare(&m).unwrap()).collect();
            let x: Vec<i8> = (0..512 * n_in).map(|i| (i * 37 % 255) as i8).collect();
            let mut out = vec![0i32; n_out * 512];
            let hot = time(|| p.gemm(&x[..n_in], 1, 0, n_out, &mut out[..n_out]), 0.6);
            let mut i = 0;
            let cold_t = time(
                || {
                    cold[i % copies].gemm(&x[..n_in], 1, 0, n_out, &mut out[..n_out]);
                    i += 1;
                },
                0.9,
            );
            println!(
                "{name:6} {n_out}x{n_in} gemv: hot {:6.1} GB/s, cold {:6.1} GB/s ({:.3} ms/call)",
                bytes / hot / 1e9,
                bytes / cold_t / 1e9,
                cold_t * 1e3
            );
            drop(cold);
            for nt in [4usize, 16, 64, 512] {
                let t = time(|| gemm(p.as_ref(), &x, nt, &mut out), 0.6);
                let ops = 2.0 * (n_out * n_in * nt) as f64;
                println!(
                    "{name:6} {n_out}x{n_in} gemm n_tokens={nt:3}: {:7.1} GOPS",
                    ops / t / 1e9
                );
            }
        }
    }
}

fn gemm(p: &dyn PackedTernary, x: &[i8], nt: usize, out: &mut [i32]) {
    let n_out = p.n_out();
    p.gemm(&x[..nt * p.n_in()], nt, 0, n_out, &mut out[..n_out * nt]);
}
