//! CUDA backend tests. Without a GPU they print `SKIP cuda: <reason>` and
//! pass; with YINSEN_DEVICE=1 a missing GPU is a failure.

use yinsen::backends::cpu::reference::ternary_matmul_i32;
use yinsen::backends::cuda::{self, Gpu, Launch, MatKernel};
use yinsen::model::synthetic::{random_ternary, SplitMix64};
use yinsen::model::{TernaryMatrix, WeightScale};

fn device_required() -> bool {
    std::env::var("YINSEN_DEVICE").is_ok_and(|v| v == "1")
}

/// The GPU, or None (after printing why) when absent and not required.
fn gpu() -> Option<std::sync::Arc<Gpu>> {
    match Gpu::new(0) {
        Ok(g) => Some(g),
        Err(e) if device_required() => panic!("YINSEN_DEVICE=1 but no GPU: {e}"),
        Err(e) => {
            let _ = std::io::Write::write_fmt(&mut std::io::stderr(), format_args!("SKIP cuda: {e}\n")); // uncaptured: visible in CI logs
            None
        }
    }
}

#[test]
fn probe_reports_status() {
    match cuda::probe() {
        cuda::CudaStatus::Available { devices } => {
            assert!(!devices.is_empty());
            for d in &devices {
                println!(
                    "cuda device: {} sm_{}{} {} MiB",
                    d.name,
                    d.sm.0,
                    d.sm.1,
                    d.mem_bytes >> 20
                );
                assert!(d.mem_bytes > 0 && d.sm.0 >= 3);
            }
        }
        cuda::CudaStatus::Unavailable(why) => {
            assert!(!device_required(), "YINSEN_DEVICE=1 but probe says: {why}");
            assert!(why.contains("no CUDA device"), "reason should say so: {why}");
            let _ = std::io::Write::write_fmt(&mut std::io::stderr(), format_args!("SKIP cuda: {why}\n"));
            // uncaptured: visible in CI logs
        }
    }
}

/// Compiles every kernel with NVRTC for the archs we ship, so compile errors
/// show up on machines without a GPU (point YINSEN_CUDA_LIB_DIR or
/// LD_LIBRARY_PATH at a libnvrtc).
#[test]
fn nvrtc_compiles_all_kernels() {
    if let Err(e) = cuda::nvrtc_available() {
        assert!(!device_required(), "YINSEN_DEVICE=1 but {e}");
        let _ = std::io::Write::write_fmt(&mut std::io::stderr(), format_args!("SKIP cuda: {e}\n")); // uncaptured: visible in CI logs
        return;
    }
    let v = cuda::nvrtc::version().unwrap();
    println!("NVRTC {}.{}", v.0, v.1);
    let src = cuda::nvrtc::program_source();
    for arch in ["sm_90a", "sm_80", "sm_75"] {
        let bin = cuda::nvrtc::compile(&src, arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        assert!(bin.len() > 1000, "{arch}: {} bytes", bin.len());
        // Every kernel the host launches is in the image (names are kept verbatim in the ELF).
        for name in cuda::KERNELS {
            assert!(
                bin.windows(name.len()).any(|w| w == name.as_bytes()),
                "{arch}: {name} missing"
            );
        }
    }
}

#[test]
fn nvrtc_reports_compile_errors() {
    if cuda::nvrtc_available().is_err() {
        let _ = std::io::Write::write_fmt(&mut std::io::stderr(), format_args!("SKIP cuda: no NVRTC\n")); // uncaptured: visible in CI logs
        return;
    }
    let e = cuda::nvrtc::compile("extern \"C\" __global__ void k() { undefined_thing(); }", "sm_80").unwrap_err();
    assert!(e.to_string().contains("undefined_thing"), "{e}");
}

fn random_x(n: usize, seed: u64) -> Vec<i8> {
    let mut r = SplitMix64(seed);
    (0..n).map(|_| (r.next_u64() >> 56) as u8 as i8).collect()
}

fn check(g: &std::sync::Arc<Gpu>, w: &TernaryMatrix, x: &[i8], nt: usize, what: &str) {
    let want = ternary_matmul_i32(w, x, nt);
    let mut kernels = vec![MatKernel::Gemv];
    if g.has_mma() {
        // The default choice for nt, then every tile variant.
        kernels.push(MatKernel::Mma);
        let usable = cuda::MmaVariant::ALL.into_iter().filter(|v| v.available(g));
        kernels.extend(usable.map(MatKernel::MmaWith));
    }
    for k in kernels {
        let got = cuda::ternary_matmul_i32(g, w, x, nt, k).unwrap();
        if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
            panic!(
                "{what} {k:?} {}x{} nt={nt}: out[{i}] = {} want {}",
                w.n_out, w.n_in, got[i], want[i]
            );
        }
    }
}

#[test]
fn matmul_exact_random_shapes() {
    let Some(g) = gpu() else { return };
    let shapes = [
        (1, 1, 1),
        (7, 5, 1),
        (33, 63, 3),
        (16, 64, 16),
        (130, 257, 17),
        (129, 640, 5),
        (300, 1000, 70),
        (2560, 2560, 1),
        (256, 6912, 9),
        (77, 200, 130),
        // Every tensor-core variant (16 / 32 / 64 / 128-token tiles), odd chunk
        // counts (the 2-chunk pipeline stages' tail), row and token edges.
        (100, 300, 33),
        (64, 640, 64),
        (200, 2560, 128),
        (384, 2560, 300),
        (129, 6912, 24),
    ];
    for (i, &(o, n, nt)) in shapes.iter().enumerate() {
        let w = random_ternary(o, n, 100 + i as u64).unwrap();
        let x = random_x(nt * n, 7 + i as u64);
        check(&g, &w, &x, nt, "random");
    }
}

#[test]
fn matmul_exact_edges() {
    let Some(g) = gpu() else { return };
    // All +1 / all -1 rows against all -128 / all 127 inputs: the extremes.
    let n = 4099;
    let mut trits = vec![1i8; n];
    trits.extend(vec![-1i8; n]);
    trits.extend((0..n).map(|i| [1i8, -1, 0][i % 3]));
    let w = TernaryMatrix::from_trits(3, n, &trits, WeightScale::PerTensor(1.0)).unwrap();
    let mut x = vec![-128i8; n];
    x.extend(vec![127i8; n]);
    x.extend((0..n).map(|i| if i % 2 == 0 { -128 } else { 127 }));
    check(&g, &w, &x, 3, "edges");
}

#[test]
fn matmul_exact_exhaustive_trits() {
    let Some(g) = gpu() else { return };
    // Every ternary row of length 5 (3^5 rows), with the reserved code 11
    // sprinkled in canonical bytes (must read as 0).
    let n = 5;
    let rows = 243;
    let mut trits = Vec::with_capacity(rows * n);
    for r in 0..rows {
        let mut v = r;
        for _ in 0..n {
            trits.push((v % 3) as i8 - 1);
            v /= 3;
        }
    }
    let mut w = TernaryMatrix::from_trits(rows, n, &trits, WeightScale::PerTensor(1.0)).unwrap();
    for r in (0..rows).step_by(7) {
        let b = r * w.row_bytes();
        for k in 0..4 {
            if (w.packed[b] >> (2 * k)) & 3 == 0 {
                w.packed[b] |= 3 << (2 * k);
                break;
            }
        }
    }
    let x: Vec<i8> = [-128i8, 127, -1, 3, 100, 127, -128, 5, 0, -77].to_vec();
    check(&g, &w, &x, 2, "exhaustive");
}

/// flash.cu against an f64 reference: causal GQA attention of `nt` query
/// rows at positions p0.. over a cache whose rows past p0 + nt are NaN (so a
/// key read past the causal range shows), both cache types and both
/// instantiations, head dims 8..256, group sizes 1, 3 and 4, partial query
/// tiles and p0 inside a key tile; output poisoned with NaN before each run.
///
/// Tolerances, |got - want| <= tol (1 + |want|): the f32 kernel 2e-5. The
/// tensor-core kernel (sm_80+, head dims multiple of 16): split mode 5e-5
/// (hi + lo f16 parts carry ~22 of f32's 24 bits, and mma's f32
/// accumulation truncates), 10x below what plain f16 inputs give, so a lost
/// lo part fails; plain f16 (tc16) 1e-2: Q, P (and an f32 cache's K, V)
/// rounded to f16 (unit roundoff 2^-11) perturb scores of magnitude ~1-8 by
/// ~1e-3..8e-3, a wrong fragment layout gives O(1) errors.
#[test]
fn flash_attention_matches_reference() {
    use yinsen::backends::cuda::{flash_tc_smem, Arg, KvDtype, FLASH_TC_THREADS};
    let Some(g) = gpu() else { return };
    let cap = 400usize;
    let mut seed = 7u64;
    let mut worst: std::collections::BTreeMap<String, f64> = Default::default();
    for &(hd, n_heads, n_kv, nt, p0) in &[
        (64usize, 4usize, 2usize, 300usize, 0usize),
        (64, 6, 2, 37, 100),
        (128, 3, 3, 130, 64),
        (8, 2, 1, 65, 5),
        (96, 6, 2, 1, 200),
        (256, 2, 1, 70, 129),
        // The 2b4t shape's head dim and group of 4, mid-tile start, partial last tile.
        (128, 8, 2, 200, 37),
        (64, 4, 1, 129, 250),
    ] {
        let n_keys = p0 + nt;
        let q_dim = n_heads * hd;
        seed += 1;
        let mut r = SplitMix64(seed);
        let mut rnd = |n: usize, amp: f32| -> Vec<f32> {
            (0..n)
                .map(|_| ((r.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp)
                .collect()
        };
        let q = rnd(nt * q_dim, 1.0);
        // Cache [kv_head][cap][hd]; rows at or past n_keys are NaN.
        let mut k = rnd(n_kv * cap * hd, 3.0);
        let mut v = rnd(n_kv * cap * hd, 2.0);
        for h in 0..n_kv {
            for p in n_keys..cap {
                for d in 0..hd {
                    k[(h * cap + p) * hd + d] = f32::NAN;
                    v[(h * cap + p) * hd + d] = f32::NAN;
                }
            }
        }
        let scale = 1.0 / (hd as f32).sqrt();
        for f16 in [false, true] {
            let round = |x: f32| if f16 { half::f16::from_f32(x).to_f32() } else { x };
            let (kr, vr): (Vec<f32>, Vec<f32>) = (
                k.iter().map(|&x| round(x)).collect(),
                v.iter().map(|&x| round(x)).collect(),
            );
            // f64 reference over the (rounded) cache.
            let mut want = vec![0f64; nt * q_dim];
            for t in 0..nt {
                for h in 0..n_heads {
                    let kvh = h / (n_heads / n_kv);
                    let qv = &q[t * q_dim + h * hd..][..hd];
                    let sc: Vec<f64> = (0..=p0 + t)
                        .map(|j| {
                            let kk = &kr[(kvh * cap + j) * hd..][..hd];
                            qv.iter().zip(kk).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() * scale as f64
                        })
                        .collect();
                    let m = sc.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = sc.iter().map(|s| (s - m).exp()).collect();
                    let l: f64 = e.iter().sum();
                    for d in 0..hd {
                        want[t * q_dim + h * hd + d] = e
                            .iter()
                            .enumerate()
                            .map(|(j, &w)| w * vr[(kvh * cap + j) * hd + d] as f64)
                            .sum::<f64>()
                            / l;
                    }
                }
            }
            let (kb, vb) = if f16 {
                let h = |x: &[f32]| {
                    x.iter()
                        .map(|&x| half::f16::from_f32(x).to_bits())
                        .collect::<Vec<u16>>()
                };
                (g.upload(&h(&k)).unwrap(), g.upload(&h(&v)).unwrap())
            } else {
                (g.upload(&k).unwrap(), g.upload(&v).unwrap())
            };
            let qb = g.upload(&q).unwrap();
            let pos = g.upload(&[p0 as i32]).unwrap();
            let out = g.alloc(4 * nt * q_dim).unwrap();
            let kv = if f16 { KvDtype::F16 } else { KvDtype::F32 };
            // (kernel, threads, smem, tolerance)
            let mut kernels: Vec<(String, u32, usize, f64)> = Vec::new();
            for wide in [false, true] {
                if !wide && hd > 128 {
                    continue;
                }
                let name = format!(
                    "flash_attn_{}_{}",
                    if wide { "d256" } else { "d128" },
                    if f16 { "f16" } else { "f32" }
                );
                kernels.push((name, 256, 4 * 64 * ((hd + 4) + (hd + 4).max(68) + hd), 2e-5));
                if g.has_mma() && hd % 16 == 0 {
                    for (split, tol) in [(true, 5e-5), (false, 1e-2)] {
                        let name = kv.flash_tc(wide, split).to_string();
                        kernels.push((name, FLASH_TC_THREADS, flash_tc_smem(hd, split, kv), tol));
                    }
                }
            }
            for (name, threads, smem, tol) in kernels {
                assert!(
                    g.allow_dynamic_smem(&name, smem).unwrap(),
                    "{name}: {smem} bytes of smem"
                );
                out.fill(0xff).unwrap(); // NaN until written
                g.launch_smem(
                    &name,
                    (nt.div_ceil(64) as u32, n_heads as u32, 1),
                    threads,
                    smem as u32,
                    &[
                        qb.p(),
                        Arg::I(q_dim as i32),
                        kb.p(),
                        vb.p(),
                        pos.p(),
                        Arg::I(nt as i32),
                        Arg::I(n_heads as i32),
                        Arg::I(n_kv as i32),
                        Arg::I(hd as i32),
                        Arg::I(cap as i32),
                        Arg::F(scale),
                        out.p(),
                        Arg::I(q_dim as i32),
                    ],
                    Launch::Plain,
                )
                .unwrap();
                let got = out.read::<f32>(nt * q_dim).unwrap();
                let e = worst.entry(name.clone()).or_default();
                for (i, (&gv, &w)) in got.iter().zip(&want).enumerate() {
                    *e = e.max((gv as f64 - w).abs() / (1.0 + w.abs()));
                    assert!(
                        (gv as f64 - w).abs() <= tol * (1.0 + w.abs()),
                        "{name} hd {hd} heads {n_heads}/{n_kv} nt {nt} p0 {p0}: out[{i}] (token {}, head {}) = {gv} want {w}",
                        i / q_dim,
                        i % q_dim / hd
                    );
                }
            }
        }
    }
    for (name, e) in &worst {
        println!("{name}: max |err| / (1 + |want|) = {e:.2e}");
    }
    // The tensor-core kernels ran where the device has them (sm_80+).
    assert_eq!(worst.keys().any(|k| k.starts_with("flash_tc")), g.has_mma());
}

/// The prefill attention kernels at the 2b4t shape (2048 tokens from an
/// empty cache, 20 query heads on 5 KV heads, hd 128), device runs only
/// (YINSEN_DEVICE=1): the tensor-core kernels against the f32 kernel over
/// 2048 keys (split 1e-4, tc16 1e-2, relative to 1 + |want|: the f64 checks
/// above at 2x their limits, for the longer sums), then the time of one
/// launch (x 30 layers = a 2048-token prefill's attention), both caches.
#[test]
fn flash_attention_2b4t_timing() {
    use yinsen::backends::cuda::{flash_tc_smem, Arg, KvDtype, FLASH_TC_THREADS};
    if std::env::var("YINSEN_DEVICE").is_err() {
        let _ = std::io::Write::write_fmt(
            &mut std::io::stderr(),
            format_args!("SKIP cuda: flash_attention_2b4t_timing runs only with YINSEN_DEVICE=1\n"),
        ); // uncaptured: visible in CI logs
        return;
    }
    let Some(g) = gpu() else { return };
    let (nt, n_heads, n_kv, hd) = (2048usize, 20usize, 5usize, 128usize);
    let q_dim = n_heads * hd;
    let mut r = SplitMix64(99);
    let mut rnd = |n: usize, amp: f32| -> Vec<f32> {
        (0..n)
            .map(|_| ((r.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp)
            .collect()
    };
    let q = rnd(nt * q_dim, 1.0);
    let k = rnd(n_kv * nt * hd, 3.0);
    let v = rnd(n_kv * nt * hd, 2.0);
    let qb = g.upload(&q).unwrap();
    let pos = g.upload(&[0i32]).unwrap();
    let out = g.alloc(4 * nt * q_dim).unwrap();
    let scale = 1.0 / (hd as f32).sqrt();
    for kv in [KvDtype::F32, KvDtype::F16] {
        let (kb, vb) = match kv {
            KvDtype::F32 => (g.upload(&k).unwrap(), g.upload(&v).unwrap()),
            KvDtype::F16 => {
                let h = |x: &[f32]| {
                    x.iter()
                        .map(|&x| half::f16::from_f32(x).to_bits())
                        .collect::<Vec<u16>>()
                };
                (g.upload(&h(&k)).unwrap(), g.upload(&h(&v)).unwrap())
            }
        };
        let f32_name = match kv {
            KvDtype::F32 => "flash_attn_d128_f32",
            KvDtype::F16 => "flash_attn_d128_f16",
        };
        let mut kernels = vec![(f32_name, 256u32, 4 * 64 * ((hd + 4) + (hd + 4).max(68) + hd), 0.0)];
        if g.has_mma() {
            kernels.push((
                kv.flash_tc(false, true),
                FLASH_TC_THREADS,
                flash_tc_smem(hd, true, kv),
                1e-4,
            ));
            kernels.push((
                kv.flash_tc(false, false),
                FLASH_TC_THREADS,
                flash_tc_smem(hd, false, kv),
                1e-2,
            ));
        }
        let mut want: Vec<f32> = Vec::new();
        for (name, threads, smem, tol) in kernels {
            assert!(
                g.allow_dynamic_smem(name, smem).unwrap(),
                "{name}: {smem} bytes of smem"
            );
            let launch = || {
                g.launch_smem(
                    name,
                    (nt.div_ceil(64) as u32, n_heads as u32, 1),
                    threads,
                    smem as u32,
                    &[
                        qb.p(),
                        Arg::I(q_dim as i32),
                        kb.p(),
                        vb.p(),
                        pos.p(),
                        Arg::I(nt as i32),
                        Arg::I(n_heads as i32),
                        Arg::I(n_kv as i32),
                        Arg::I(hd as i32),
                        Arg::I(nt as i32),
                        Arg::F(scale),
                        out.p(),
                        Arg::I(q_dim as i32),
                    ],
                    Launch::Plain,
                )
                .unwrap()
            };
            out.fill(0xff).unwrap(); // NaN until written
            launch();
            let got = out.read::<f32>(nt * q_dim).unwrap();
            if want.is_empty() {
                assert!(got.iter().all(|x| x.is_finite()), "{name}: non-finite output");
                want = got;
            } else {
                let err = got
                    .iter()
                    .zip(&want)
                    .map(|(&a, &b)| ((a - b).abs() / (1.0 + b.abs())) as f64)
                    .fold(0f64, |m, e| if e.is_nan() { f64::INFINITY } else { m.max(e) });
                println!("{name}: max |err| / (1 + |f32 kernel|) = {err:.2e}");
                assert!(err <= tol, "{name}: {err} > {tol}");
            }
            let reps = 20;
            launch();
            g.sync().unwrap();
            let t = std::time::Instant::now();
            for _ in 0..reps {
                launch();
            }
            g.sync().unwrap();
            let ms = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
            let occ = g.occupancy(name, threads, smem).unwrap();
            println!(
                "{name}: {ms:.3} ms per launch, x30 layers {:.2} ms ({occ} blocks/SM)",
                30.0 * ms
            );
        }
    }
}
