//! CUDA backend tests. Without a GPU they print `SKIP cuda: <reason>` and
//! pass; with YINSEN_DEVICE=1 a missing GPU is a failure.

mod common;

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
            common::skip_cuda(&e.to_string());
            None
        }
    }
}

/// The GPU if it has mma.sync (sm_80+), or None after printing why not;
/// `why` says what the test needs it for.
fn mma_gpu(why: &str) -> Option<std::sync::Arc<Gpu>> {
    let g = gpu()?;
    if !g.has_mma() {
        common::skip_cuda(&format!("no mma.sync (sm_80+): {why}"));
        return None;
    }
    Some(g)
}

/// Every attention output within `tol * (1 + |want|)` of the f64 reference
/// (`[token][head][hd]`); returns the largest such relative error.
fn assert_attention_close(got: &[f32], want: &[f64], tol: f64, q_dim: usize, hd: usize, what: &str) -> f64 {
    let mut worst = 0f64;
    for (i, (&gv, &w)) in got.iter().zip(want).enumerate() {
        let rel = (gv as f64 - w).abs() / (1.0 + w.abs());
        assert!(
            rel <= tol,
            "{what}: out[{i}] (token {}, head {}) = {gv} want {w}",
            i / q_dim,
            i % q_dim / hd
        );
        worst = worst.max(rel);
    }
    worst
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
            common::skip_cuda(&why.to_string());
        }
    }
}

/// NVRTC's version and the program source where NVRTC loads; else a
/// printed SKIP and None (an error under YINSEN_DEVICE=1).
fn nvrtc_program() -> Option<((i32, i32), String)> {
    if let Err(e) = cuda::nvrtc_available() {
        assert!(!device_required(), "YINSEN_DEVICE=1 but {e}");
        common::skip_cuda(&e.to_string());
        return None;
    }
    let v = cuda::nvrtc::version().unwrap();
    println!("NVRTC {}.{}", v.0, v.1);
    Some((v, cuda::nvrtc::program_source()))
}

/// Compiles every kernel with NVRTC for the archs we ship, so compile errors
/// show up on machines without a GPU (point YINSEN_CUDA_LIB_DIR or
/// LD_LIBRARY_PATH at a libnvrtc; CI fetches one).
#[test]
fn nvrtc_compiles_all_kernels() {
    let Some((_, src)) = nvrtc_program() else {
        return;
    };
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

/// Spill stores (bytes) per kernel in ptxas's `-v` log.
fn spill_stores(log: &str) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    let mut name: Option<String> = None;
    for line in log.lines() {
        if let Some((_, n)) = line.split_once("Function properties for ") {
            name = Some(n.trim().to_string());
        } else if let (Some(n), Some(i)) = (&name, line.find(" bytes spill stores")) {
            let bytes = line[..i].rsplit(' ').next().and_then(|v| v.parse().ok());
            out.push((n.clone(), bytes.unwrap_or(usize::MAX)));
            name = None;
        }
    }
    out
}

/// Hardware barriers reserved per kernel in ptxas's `-v` log ("used N
/// barriers" after its "Compiling entry function" line).
fn barriers_used(log: &str) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    let mut name: Option<String> = None;
    for line in log.lines() {
        if let Some((_, rest)) = line.split_once("Compiling entry function '") {
            name = rest.split('\'').next().map(str::to_string);
        } else if let (Some(n), Some(i)) = (&name, line.find(" barriers")) {
            let used = line[..i].rsplit(' ').next().and_then(|v| v.parse().ok());
            out.push((n.clone(), used.unwrap_or(usize::MAX)));
            name = None;
        }
    }
    out
}

/// The hot kernels stay within their measured spills on sm_90a (the
/// device's arch): at their register limits ptxas's allocation flips with
/// small source changes, and a spill there cost the persistent decode ~9%
/// (session 18). Runs wherever NVRTC loads (CI fetches the device's 13.0),
/// no GPU needed. The ceilings are NVRTC 13.0's spills (the device's
/// compiler, S19-13); 13.5 spilled none of these but `mega_multi_f32`'s 4
/// bytes at 1024 threads (session 19), which 512 threads removed.
#[test]
fn nvrtc_hot_kernels_do_not_spill() {
    let Some((v, src)) = nvrtc_program() else {
        return;
    };
    let (_, log) = cuda::nvrtc::compile_with(&src, "sm_90a", &["-Xptxas", "-v"]).unwrap();
    let spills = spill_stores(&log);
    assert!(
        spills.len() >= cuda::KERNELS.len(),
        "{} kernels in the log",
        spills.len()
    );
    // (name prefix, most spill-store bytes allowed): what NVRTC 13.0 spills
    // now (the persistent decode: 32-36 before session 20, 4 in session 20,
    // 0 in sessions 21-22; mega_f32 4 from session 23's split merge to
    // session 27, 0 since at 512 threads a block and 128 registers).
    let ceilings = [
        ("mega_f16", 0),
        ("mega_f32", 0),
        // The multi-token kernel: 4 bytes (f16) at 1024 threads, 0 at 512
        // (session 28).
        ("mega_multi_f16", 0),
        ("mega_multi_f32", 0),
        ("tern_wgmma_tma_", 0),
        ("flash_tcx_", 0),
        ("flash_tcx16_", 0),
        ("flash_tcxv_", 0),
        // flash_wg3_d128: 44 bytes at 168 registers (three warpgroups), and
        // still the faster from ~1024 tokens (S26-6).
        ("flash_wg_", 0),
        ("flash_wg3_d64", 0),
        ("flash_wg3_d128", 44),
        ("kv_tile_f32", 0),
        ("norm_quant_w8", 0),
        ("lm_head_dec", 0),
        ("lm_head_screen_q8_tma", 0),
        ("lm_head_screen_q8_mma_cp", 0),
        ("lm_head_pick_f16_batch", 0),
    ];
    let mut over = Vec::new();
    for (prefix, most) in ceilings {
        let hits: Vec<_> = spills.iter().filter(|(n, _)| n.starts_with(prefix)).collect();
        assert!(!hits.is_empty(), "{prefix}: not in the ptxas log");
        over.extend(
            hits.into_iter()
                .filter(|(_, b)| *b > most)
                .map(|(n, b)| format!("{n} spills {b} bytes (at most {most})")),
        );
    }
    assert!(over.is_empty(), "NVRTC {v:?}: {over:?}");
    // Named barriers with a register id reserve all 16 of a block's, and an
    // SM has 64: that capped the grouped quantiser at 4 blocks an SM, half
    // its occupancy (ncu, S29-4). Its one-token-a-block variants (8 and 16
    // warps) use barriers 0 and 1 only.
    let bars = barriers_used(&log);
    let quantisers: Vec<_> = bars
        .iter()
        .filter(|(n, _)| n.starts_with("norm_quant_w8") || n.starts_with("norm_quant_w16"))
        .collect();
    assert!(
        quantisers.len() >= 5,
        "{} grouped quantisers in the log",
        quantisers.len()
    );
    for (n, b) in quantisers {
        assert!(*b <= 2, "{n} reserves {b} barriers (at most 2)");
    }
}

#[test]
fn nvrtc_reports_compile_errors() {
    if cuda::nvrtc_available().is_err() {
        common::skip_cuda("no NVRTC");
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

/// The TMA GEMM's tail split (sm_90a): the grid planned for a few SMs so
/// that small shapes cut their last wave's tiles into pieces along K, each
/// piece's int32 sums parked and added by the last one. Every output must
/// equal the reference (outputs poisoned before each launch): a piece that
/// skipped its stages, a sum added twice or a lost piece shows.
#[test]
fn matmul_exact_tail_split() {
    let Some(g) = gpu() else { return };
    let tma: Vec<_> = cuda::MmaVariant::ALL
        .into_iter()
        .filter(|v| v.tiled && v.available(&g))
        .collect();
    if tma.is_empty() {
        println!("SKIP matmul_exact_tail_split: no TMA GEMM on {} (sm_90a only)", g.arch);
        return;
    }
    // (rows, inputs, tokens): 640 rows = 5 row tiles, 2560 inputs = 10 stage
    // pairs, 6912 = 27, 1000 = 4 (odd chunk count); 300 tokens = 2 / 3 token tiles.
    let shapes = [(640, 2560, 300), (700, 6912, 256), (129, 1000, 257), (1280, 2560, 128)];
    let before = g.tail_sms();
    let mut split_runs = 0;
    for (i, &(o, n, nt)) in shapes.iter().enumerate() {
        let w = random_ternary(o, n, 300 + i as u64).unwrap();
        let x = random_x(nt * n, 17 + i as u64);
        let want = ternary_matmul_i32(&w, &x, nt);
        for sms in [3usize, 4, 7, 8, 32] {
            for &v in &tma {
                let tiles = o.div_ceil(v.bm) * nt.div_ceil(v.bn);
                let (_, tail) = cuda::tail_split(sms, tiles, n.div_ceil(64));
                split_runs += (tail != 0) as usize;
                g.set_tail_sms(sms);
                let got = cuda::ternary_matmul_i32(&g, &w, &x, nt, MatKernel::MmaWith(v));
                g.set_tail_sms(before);
                let got = got.unwrap();
                if let Some(j) = (0..want.len()).find(|&j| got[j] != want[j]) {
                    panic!(
                        "{} {o}x{n} nt={nt} planned for {sms} SMs (tail {tail:#x}): out[{j}] = {} want {}",
                        v.name, got[j], want[j]
                    );
                }
            }
        }
    }
    assert!(split_runs >= 20, "only {split_runs} launches took the tail split");
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
    let mut worst: std::collections::BTreeMap<String, f64> = Default::default();
    for case in AttnCase::all(
        &g,
        7,
        cap,
        &[
            (64usize, 4usize, 2usize, 300usize, 0usize),
            (64, 6, 2, 37, 100),
            (128, 3, 3, 130, 64),
            (8, 2, 1, 65, 5),
            (96, 6, 2, 1, 200),
            (256, 2, 1, 70, 129),
            // The 2b4t shape's head dim and group of 4, mid-tile start, partial last tile.
            (128, 8, 2, 200, 37),
            (64, 4, 1, 129, 250),
        ],
    ) {
        let (hd, n_heads, n_kv, nt, p0) = case.shape;
        let (q_dim, out) = (case.dims[0], &case.out);
        for f16 in [false, true] {
            // f64 reference over the (rounded) cache.
            let want = case.want(f16);
            let (_kb, _vb, args) = case.kv_args(&g, f16);
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
                    // Split with K/V staged raw by cp.async (f32 cache, hd <= 128).
                    if !wide && !f16 {
                        let smem = flash_tc_smem(hd, true, kv);
                        kernels.push(("flash_tcs_d128_f32".into(), FLASH_TC_THREADS, smem, 5e-5));
                    }
                }
            }
            for (name, threads, smem, tol) in kernels {
                assert!(
                    g.allow_dynamic_smem(&name, smem).unwrap(),
                    "{name}: {smem} bytes of smem"
                );
                let got = poisoned_run(out, nt * q_dim, || {
                    flash_launch(&g, &name, threads, smem, nt, n_heads, hd, &args, 1, Arg::P(0))
                });
                let e = worst.entry(name.clone()).or_default();
                let what = format!("{name} hd {hd} heads {n_heads}/{n_kv} nt {nt} p0 {p0}");
                *e = e.max(assert_attention_close(&got, &want, tol, q_dim, hd, &what));
            }
        }
    }
    for (name, e) in &worst {
        println!("{name}: max |err| / (1 + |want|) = {e:.2e}");
    }
    // The tensor-core kernels ran where the device has them (sm_80+).
    assert_eq!(worst.keys().any(|k| k.starts_with("flash_tc")), g.has_mma());
}

/// One flash.cu launch: `args` is the common argument list (through
/// out_stride); the tensor-core kernels also take the key split count and
/// the partials buffer, and with n_ks > 1 are followed by flash_tc_merge.
/// Random q (`nq` values in [-1, 1]) and a K / V cache `[n_kv][cap][hd]`
/// (amplitudes 3 and 2) whose rows at or past `n_keys` are NaN: a kernel
/// that reads past the causal range poisons its output.
fn attn_inputs(
    seed: u64,
    nq: usize,
    n_kv: usize,
    cap: usize,
    hd: usize,
    n_keys: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut r = SplitMix64(seed);
    let mut rnd = |n: usize, amp: f32| -> Vec<f32> {
        (0..n)
            .map(|_| ((r.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp)
            .collect()
    };
    let q = rnd(nq, 1.0);
    let mut k = rnd(n_kv * cap * hd, 3.0);
    let mut v = rnd(n_kv * cap * hd, 2.0);
    for h in 0..n_kv {
        for p in n_keys..cap {
            k[(h * cap + p) * hd..][..hd].fill(f32::NAN);
            v[(h * cap + p) * hd..][..hd].fill(f32::NAN);
        }
    }
    (q, k, v)
}

/// `out` poisoned (0xff bytes: NaN), then `launch`, then its first `n` f32
/// read back: an element the kernel did not write stays NaN.
fn poisoned_run(out: &cuda::DevBuf, n: usize, launch: impl FnOnce()) -> Vec<f32> {
    out.fill(0xff).unwrap();
    launch();
    out.read::<f32>(n).unwrap()
}

/// Largest |a - b| / (1 + |b|) over two kernels' outputs; a NaN on either
/// side counts as infinitely far.
fn max_rel_diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| ((x - y).abs() / (1.0 + y.abs())) as f64)
        .fold(0f64, |m, e| if e.is_nan() { f64::INFINITY } else { m.max(e) })
}

/// Milliseconds per call of `f` (GPU work): one warm-up call, then 20.
fn time_ms(g: &std::sync::Arc<Gpu>, f: &dyn Fn()) -> f64 {
    f();
    g.sync().unwrap();
    let reps = 20;
    let t = std::time::Instant::now();
    for _ in 0..reps {
        f();
    }
    g.sync().unwrap();
    t.elapsed().as_secs_f64() * 1e3 / reps as f64
}

/// K and V caches on the device, as f16 bits or f32.
fn upload_kv(g: &std::sync::Arc<Gpu>, k: &[f32], v: &[f32], f16: bool) -> (cuda::DevBuf, cuda::DevBuf) {
    if f16 {
        let h = |x: &[f32]| {
            x.iter()
                .map(|&x| half::f16::from_f32(x).to_bits())
                .collect::<Vec<u16>>()
        };
        (g.upload(&h(k)).unwrap(), g.upload(&h(v)).unwrap())
    } else {
        (g.upload(k).unwrap(), g.upload(v).unwrap())
    }
}

/// One attention case of shape `(hd, n_heads, n_kv, nt, p0)`: the inputs of
/// `attn_inputs` (cache of `cap` rows, NaN past p0 + nt) and q, the position
/// and an output buffer on the device.
struct AttnCase {
    /// (hd, n_heads, n_kv, nt, p0)
    shape: (usize, usize, usize, usize, usize),
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// [q_dim, nt, n_heads, n_kv, hd, cap], as `flash_args` takes them.
    dims: [usize; 6],
    p0: usize,
    scale: f32,
    qb: cuda::DevBuf,
    pos: cuda::DevBuf,
    out: cuda::DevBuf,
}

impl AttnCase {
    fn new(g: &std::sync::Arc<Gpu>, seed: u64, shape: (usize, usize, usize, usize, usize), cap: usize) -> Self {
        let (hd, n_heads, n_kv, nt, p0) = shape;
        let q_dim = n_heads * hd;
        let (q, k, v) = attn_inputs(seed, nt * q_dim, n_kv, cap, hd, p0 + nt);
        Self {
            shape,
            qb: g.upload(&q).unwrap(),
            pos: g.upload(&[p0 as i32]).unwrap(),
            out: g.alloc(4 * nt * q_dim).unwrap(),
            q,
            k,
            v,
            dims: [q_dim, nt, n_heads, n_kv, hd, cap],
            p0,
            scale: 1.0 / (hd as f32).sqrt(),
        }
    }

    /// The cases of `shapes` in order, with seeds seed0 + 1, seed0 + 2, ...
    fn all<'a>(
        g: &'a std::sync::Arc<Gpu>,
        seed0: u64,
        cap: usize,
        shapes: &'a [(usize, usize, usize, usize, usize)],
    ) -> impl Iterator<Item = Self> + 'a {
        (1..)
            .zip(shapes)
            .map(move |(i, &shape)| Self::new(g, seed0 + i, shape, cap))
    }

    /// The f64 reference over the cache as stored (f16-rounded where `f16`).
    fn want(&self, f16: bool) -> Vec<f64> {
        let [_, nt, n_heads, n_kv, hd, cap] = self.dims;
        let round = |x: f32| if f16 { half::f16::from_f32(x).to_f32() } else { x };
        attention_f64(
            &self.q, &self.k, &self.v, round, nt, self.p0, n_heads, n_kv, hd, cap, self.scale,
        )
    }

    /// K and V on the device (f16 bits where `f16`) and the flash kernels'
    /// arguments over them.
    fn kv_args(&self, g: &std::sync::Arc<Gpu>, f16: bool) -> (cuda::DevBuf, cuda::DevBuf, [cuda::Arg; 13]) {
        let (kb, vb) = upload_kv(g, &self.k, &self.v, f16);
        let args = flash_args(&self.qb, &kb, &vb, &self.pos, &self.out, self.dims, self.scale);
        (kb, vb, args)
    }
}

/// The flash kernels' arguments: q rows (stride q_dim), K and V cache,
/// positions, output; dims = [q_dim, nt, n_heads, n_kv, hd, cap].
fn flash_args(
    q: &cuda::DevBuf,
    k: &cuda::DevBuf,
    v: &cuda::DevBuf,
    pos: &cuda::DevBuf,
    out: &cuda::DevBuf,
    dims: [usize; 6],
    scale: f32,
) -> [cuda::Arg; 13] {
    let [q_dim, nt, n_heads, n_kv, hd, cap] = dims.map(|d| cuda::Arg::I(d as i32));
    [
        q.p(),
        q_dim,
        k.p(),
        v.p(),
        pos.p(),
        nt,
        n_heads,
        n_kv,
        hd,
        cap,
        cuda::Arg::F(scale),
        out.p(),
        q_dim,
    ]
}

#[allow(clippy::too_many_arguments)]
fn flash_launch(
    g: &Gpu,
    name: &str,
    threads: u32,
    smem: usize,
    nt: usize,
    n_heads: usize,
    hd: usize,
    args: &[yinsen::backends::cuda::Arg],
    n_ks: usize,
    part: yinsen::backends::cuda::Arg,
) {
    use yinsen::backends::cuda::Arg;
    let tc = name.starts_with("flash_tc");
    let mut a = args.to_vec();
    if tc {
        a.extend([Arg::I(n_ks as i32), part]);
    } else {
        assert_eq!(n_ks, 1, "{name}: no key split");
    }
    let grid = ((nt.div_ceil(64) * n_ks) as u32, n_heads as u32, 1);
    g.launch_smem(name, grid, threads, smem as u32, &a, Launch::Plain)
        .unwrap();
    if n_ks > 1 {
        merge_launch(g, "flash_tc_merge", args, part, [nt, n_heads, hd, n_ks], None);
    }
}

/// The merge of n_ks > 1 key-split partials (`flash_tc_merge`, or
/// `flash_tcx_merge` with its query block `bq`): part, pos, nt, n_heads, hd,
/// n_ks, out, out_stride [, bq]; `args` is the common list of `flash_args`.
fn merge_launch(
    g: &Gpu,
    name: &str,
    args: &[yinsen::backends::cuda::Arg],
    part: yinsen::backends::cuda::Arg,
    [nt, n_heads, hd, n_ks]: [usize; 4],
    bq: Option<usize>,
) {
    use yinsen::backends::cuda::Arg;
    let mut m = vec![
        part,
        args[4],
        Arg::I(nt as i32),
        Arg::I(n_heads as i32),
        Arg::I(hd as i32),
        Arg::I(n_ks as i32),
        args[11],
        args[12],
    ];
    m.extend(bq.map(|b| Arg::I(b as i32)));
    g.launch_smem(name, (nt as u32, n_heads as u32, 1), 128, 0, &m, Launch::Plain)
        .unwrap();
}

/// The tensor-core flash kernel with its key range split over n_ks blocks
/// (flash-decoding for few queries after a long context) against an f64
/// reference: nt in {1, 5, 16, 64} queries after p0 in {0, 100, 2100} cached
/// keys, GQA (8 query heads on 2 KV heads, hd 128; 4 on 1, hd 64), both
/// caches, split and plain f16, n_ks 1 (the un-split path), 2, 3, 7 and 33
/// (more splits than key tiles: empty splits, rows wholly masked in a
/// split). Cache rows past p0 + nt are NaN, output and partials poisoned
/// with NaN. Tolerances as flash_attention_matches_reference (split 5e-5,
/// tc16 1e-2), and the split results within 2e-5 of the un-split ones
/// (merge order, exp2 of the per-split maxima).
#[test]
fn flash_key_split_matches_reference() {
    use yinsen::backends::cuda::{flash_tc_smem, KvDtype, FLASH_TC_THREADS};
    let Some(g) = mma_gpu("the tensor-core flash kernels") else {
        return;
    };
    let cap = 2200usize;
    let mut seed = 70u64;
    let mut splits_seen = 0usize;
    for &(hd, n_heads, n_kv) in &[(128usize, 8usize, 2usize), (64, 4, 1)] {
        for p0 in [0usize, 100, 2100] {
            for nt in [1usize, 5, 16, 64] {
                let n_keys = p0 + nt;
                seed += 1;
                let case = AttnCase::new(&g, seed, (hd, n_heads, n_kv, nt, p0), cap);
                let (q_dim, out) = (case.dims[0], &case.out);
                let part = g.alloc(4 * nt * n_heads * 33 * (hd + 2)).unwrap();
                for kv in [KvDtype::F32, KvDtype::F16] {
                    let f16 = kv == KvDtype::F16;
                    let want = case.want(f16);
                    let (_kb, _vb, args) = case.kv_args(&g, f16);
                    let mut names = vec![
                        (kv.flash_tc(hd > 128, true), true, 5e-5),
                        (kv.flash_tc(hd > 128, false), false, 1e-2),
                    ];
                    if !f16 {
                        names.push(("flash_tcs_d128_f32", true, 5e-5));
                    }
                    for (name, split, tol) in names {
                        let smem = flash_tc_smem(hd, split, kv);
                        assert!(g.allow_dynamic_smem(name, smem).unwrap());
                        let mut base: Vec<f32> = Vec::new();
                        for n_ks in [1usize, 2, 3, 7, 33] {
                            part.fill(0xff).unwrap();
                            let got = poisoned_run(out, nt * q_dim, || {
                                flash_launch(&g, name, FLASH_TC_THREADS, smem, nt, n_heads, hd, &args, n_ks, part.p())
                            });
                            let what = format!("{name} hd {hd} nt {nt} p0 {p0} n_ks {n_ks}");
                            assert_attention_close(&got, &want, tol, q_dim, hd, &what);
                            if n_ks == 1 {
                                base = got;
                            } else {
                                let d = max_rel_diff(&got, &base);
                                // Split modes agree to f32 rounding; plain f16 (tc16)
                                // rounds P after a different per-split max, so its
                                // split and un-split results differ at its own
                                // accuracy (`tol`, ~1e-2 relative to the reference).
                                let same = if tol < 1e-3 { 2e-5 } else { tol };
                                assert!(d <= same, "{what}: {d} from the un-split result");
                                // Splits in use: ceil(kmax / chunk) with chunk whole 64-key tiles.
                                let chunk = (n_keys.div_ceil(n_ks)).div_ceil(64) * 64;
                                splits_seen = splits_seen.max(n_keys.div_ceil(chunk));
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(splits_seen >= 7, "the key split never used 7 splits ({splits_seen})");
}

/// Causal GQA attention in f64 over the cache rounded by `round`:
/// [nt][n_heads * hd] for queries at p0.. (see flash_attention_matches_reference).
#[allow(clippy::too_many_arguments)]
fn attention_f64(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    round: impl Fn(f32) -> f32,
    nt: usize,
    p0: usize,
    n_heads: usize,
    n_kv: usize,
    hd: usize,
    cap: usize,
    scale: f32,
) -> Vec<f64> {
    let q_dim = n_heads * hd;
    let mut want = vec![0f64; nt * q_dim];
    for t in 0..nt {
        for h in 0..n_heads {
            let kvh = h / (n_heads / n_kv);
            let qv = &q[t * q_dim + h * hd..][..hd];
            let sc: Vec<f64> = (0..=p0 + t)
                .map(|j| {
                    let kk = &k[(kvh * cap + j) * hd..][..hd];
                    qv.iter()
                        .zip(kk)
                        .map(|(&a, &b)| a as f64 * round(b) as f64)
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let m = sc.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = sc.iter().map(|s| (s - m).exp()).collect();
            let l: f64 = e.iter().sum();
            for (j, &w) in e.iter().enumerate() {
                let vv = &v[(kvh * cap + j) * hd..][..hd];
                for d in 0..hd {
                    want[t * q_dim + h * hd + d] += w * round(vv[d]) as f64 / l;
                }
            }
        }
    }
    want
}

/// The prefill attention kernels at the 2b4t shape (20 query heads on 5 KV
/// heads, hd 128), device runs only (YINSEN_DEVICE=1), both caches, two
/// cases: 2048 tokens from an empty cache (a 2048-token prefill) and 16
/// tokens after 2048 cached keys (a batched decode step). The tensor-core
/// kernels (un-split and with the key split the backend picks) against the
/// f32 kernel (split 1e-4, tc16 1e-2, relative to 1 + |want|: the f64 checks
/// above at 2x their limits, for the longer sums), then the time of one
/// launch (x 30 layers = that call's attention).
#[test]
fn flash_attention_2b4t_timing() {
    use yinsen::backends::cuda::{flash_tc_smem, KvDtype, FLASH_TC_THREADS};
    if !common::device_only("flash_attention_2b4t_timing") {
        return;
    }
    let Some(g) = gpu() else { return };
    let (n_heads, n_kv, hd, cap) = (20usize, 5usize, 128usize, 2064usize);
    let q_dim = n_heads * hd;
    // Every cache row holds a key (none NaN).
    let (q, k, v) = attn_inputs(99, 2048 * q_dim, n_kv, cap, hd, cap);
    let qb = g.upload(&q).unwrap();
    let out = g.alloc(4 * 2048 * q_dim).unwrap();
    let part = g.alloc(4 * 16 * n_heads * 64 * (hd + 2)).unwrap();
    let scale = 1.0 / (hd as f32).sqrt();
    for kv in [KvDtype::F32, KvDtype::F16] {
        let (kb, vb) = upload_kv(&g, &k, &v, kv == KvDtype::F16);
        let f32_name = match kv {
            KvDtype::F32 => "flash_attn_d128_f32",
            KvDtype::F16 => "flash_attn_d128_f16",
        };
        for (nt, p0) in [(2048usize, 0usize), (16, 2048)] {
            let pos = g.upload(&[p0 as i32]).unwrap();
            // The backend's choice (CudaBackend::key_splits): two blocks per SM.
            let auto = (2 * g.info.sms.max(1) as usize)
                .div_ceil(nt.div_ceil(64) * n_heads)
                .min(64);
            let mut kernels = vec![(
                f32_name,
                256u32,
                4 * 64 * ((hd + 4) + (hd + 4).max(68) + hd),
                0.0,
                1usize,
            )];
            if g.has_mma() {
                let mut names = vec![
                    (kv.flash_tc(false, true), true, 1e-4),
                    (kv.flash_tc(false, false), false, 1e-2),
                ];
                if kv == KvDtype::F32 {
                    names.push(("flash_tcs_d128_f32", true, 1e-4));
                }
                for (name, split, tol) in names {
                    let smem = flash_tc_smem(hd, split, kv);
                    kernels.push((name, FLASH_TC_THREADS, smem, tol, 1));
                    if auto > 1 {
                        kernels.push((name, FLASH_TC_THREADS, smem, tol, auto));
                    }
                }
            }
            let mut want: Vec<f32> = Vec::new();
            for (name, threads, smem, tol, n_ks) in kernels {
                assert!(
                    g.allow_dynamic_smem(name, smem).unwrap(),
                    "{name}: {smem} bytes of smem"
                );
                let args = flash_args(&qb, &kb, &vb, &pos, &out, [q_dim, nt, n_heads, n_kv, hd, cap], scale);
                let launch = || flash_launch(&g, name, threads, smem, nt, n_heads, hd, &args, n_ks, part.p());
                let got = poisoned_run(&out, nt * q_dim, launch);
                if want.is_empty() {
                    assert!(got.iter().all(|x| x.is_finite()), "{name}: non-finite output");
                    want = got;
                } else {
                    let err = max_rel_diff(&got, &want);
                    println!("{name} nt {nt} p0 {p0} n_ks {n_ks}: max |err| / (1 + |f32 kernel|) = {err:.2e}");
                    assert!(err <= tol, "{name} nt {nt} p0 {p0} n_ks {n_ks}: {err} > {tol}");
                }
                let ms = time_ms(&g, &launch);
                let occ = g.occupancy(name, threads, smem).unwrap();
                println!(
                    "{name} nt {nt} after {p0} keys, n_ks {n_ks}: {ms:.4} ms per launch, x30 layers {:.2} ms ({occ} blocks/SM)",
                    30.0 * ms
                );
            }
        }
    }
}

/// The arguments of the kernels that fill the f16 side buffer
/// (`kv_split_f32`, `kv_half_f32`, `kv_tile_f32`): the f32 K and V caches and
/// the first position ([k, v, pos]), then [nt, n_kv, hd, cap, scap], then the buffer.
fn kv_side_args(kvp: [cuda::Arg; 3], dims: [usize; 5], kvs: &cuda::DevBuf) -> [cuda::Arg; 9] {
    use yinsen::backends::cuda::Arg;
    let [nt, n_kv, hd, cap, scap] = dims.map(|d| Arg::I(d as i32));
    [kvp[0], kvp[1], kvp[2], nt, n_kv, hd, cap, scap, kvs.p()]
}

/// kv_split_f32 (or kv_half_f32) + one `flash_tcx*` launch (+
/// flash_tcx_merge for n_ks > 1) over an f32 cache; `kvs` is the f16 side
/// buffer ([n_kv][scap][4][hd] split, [n_kv][scap][2][hd] plain).
#[allow(clippy::too_many_arguments)]
fn tcx_launch(
    g: &Gpu,
    t: cuda::TcxKernel,
    args: &[cuda::Arg; 13],
    kvs: &cuda::DevBuf,
    scap: usize,
    dims: [usize; 6],
    n_ks: usize,
    part: cuda::Arg,
) {
    use yinsen::backends::cuda::Arg;
    let [q_dim, nt, n_heads, n_kv, hd, cap] = dims;
    let split = kv_side_args([args[2], args[3], args[4]], [nt, n_kv, hd, cap, scap], kvs);
    g.launch_smem(t.kv_kernel(), (16, 2 * n_kv as u32, 1), 256, 0, &split, Launch::Plain)
        .unwrap();
    let bq = t.bq();
    let blocks = nt.div_ceil(bq) * n_ks * (n_heads / t.hpb);
    let a = [
        args[0],
        Arg::I(q_dim as i32),
        kvs.p(),
        args[4],
        Arg::I(nt as i32),
        Arg::I(n_heads as i32),
        Arg::I(n_kv as i32),
        Arg::I(scap as i32),
        args[10],
        args[11],
        args[12],
        Arg::I(n_ks as i32),
        part,
    ];
    g.launch_smem(
        t.name,
        (blocks as u32, 1, 1),
        t.threads(),
        t.smem() as u32,
        &a,
        Launch::Plain,
    )
    .unwrap();
    if n_ks > 1 {
        merge_launch(g, "flash_tcx_merge", args, part, [nt, n_heads, hd, n_ks], Some(bq));
    }
}

/// The `flash_tcx_*` (split), `flash_tcx16_*` (plain) and `flash_tcxv_*`
/// (P V split) variants whose heads per block divide the group, for head dim `hd`.
/// `flash_wg_*` (wgmma) only where the image is sm_90a.
fn tcx_kernels(g: &Gpu, hd: usize, group: usize) -> Vec<cuda::TcxKernel> {
    use yinsen::backends::cuda::{flash_tcx_prec, TcxPrec, TCX_VARIANTS};
    let all: Vec<_> = [TcxPrec::Split, TcxPrec::Plain, TcxPrec::SplitPv]
        .iter()
        .flat_map(|&p| TCX_VARIANTS.iter().filter_map(move |v| flash_tcx_prec(hd, v, p)))
        .filter(|t| group.is_multiple_of(t.hpb))
        .collect();
    if g.arch != "sm_90a" && all.iter().any(|t| t.wg) {
        println!("flash_wg_*: skipped, needs sm_90a (this GPU: {})", g.arch);
    }
    all.into_iter().filter(|t| !t.wg || g.arch == "sm_90a").collect()
}

/// `kv_tile_f32` writes `flash_wg_*`'s tile images exactly: per (KV head,
/// 64-key tile) K hi in K-major core matrices (key j, dim d at ((j / 8)
/// (hd / 8) + d / 8) 64 + (j % 8) 8 + d % 8), then V hi and V lo transposed
/// (at 64 hd and 128 hd + ((d / 8) 8 + j / 8) 64 + (d % 8) 8 + j % 8), each
/// value the f16 of the cache's f32 (hi) and of its residual (lo), keys past
/// p0 + nt zeros (their cache rows are NaN), and nothing past the last tile
/// written (the buffer is poisoned with 0xff first). Head dims 128 and 64,
/// a grid smaller than the work (the kernel strides).
#[test]
fn kv_tile_writes_the_tile_images() {
    use half::f16;
    use yinsen::backends::cuda::flash_tcx_scap;
    let Some(g) = mma_gpu("kv_tile_f32 is empty there") else {
        return;
    };
    let mut rng = SplitMix64(0x7e1e);
    for &(n_kv, hd, p0, nt) in &[(2usize, 128usize, 37usize, 200usize), (3, 64, 0, 129)] {
        let cap = 300usize;
        let scap = flash_tcx_scap(cap);
        let kmax = p0 + nt;
        let mut cache = |_: ()| -> Vec<f32> {
            (0..n_kv * cap * hd)
                .map(|i| {
                    if (i / hd) % cap >= kmax {
                        f32::NAN
                    } else {
                        ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 6.0
                    }
                })
                .collect()
        };
        let (k, v) = (cache(()), cache(()));
        let (kb, vb) = (g.upload(&k).unwrap(), g.upload(&v).unwrap());
        let pos = g.upload(&[p0 as i32]).unwrap();
        let halves = n_kv * scap * 4 * hd;
        let kvs = g.alloc(2 * halves).unwrap();
        kvs.fill(0xff).unwrap();
        let args = kv_side_args([kb.p(), vb.p(), pos.p()], [nt, n_kv, hd, cap, scap], &kvs);
        g.launch_smem("kv_tile_f32", (7, 2 * n_kv as u32, 1), 256, 0, &args, Launch::Plain)
            .unwrap();
        g.sync().unwrap();
        let got = kvs.read::<u16>(halves).unwrap();
        let tile = 3 * 64 * hd;
        let ntile = kmax.div_ceil(64);
        let hi_lo = |x: f32| {
            let hi = f16::from_f32(x);
            (hi.to_bits(), f16::from_f32(x - hi.to_f32()).to_bits())
        };
        let mut checked = 0usize;
        for h in 0..n_kv {
            let img = h * (scap / 64) * tile;
            for t in 0..scap / 64 {
                for jj in 0..64 {
                    let j = t * 64 + jj;
                    for d in 0..hd {
                        let at_k = img + t * tile + ((jj / 8) * (hd / 8) + d / 8) * 64 + (jj % 8) * 8 + d % 8;
                        let at_v = img + t * tile + 64 * hd + ((d / 8) * 8 + jj / 8) * 64 + (d % 8) * 8 + jj % 8;
                        let what = format!("hd {hd} kv head {h} key {j} dim {d}");
                        if t >= ntile {
                            let untouched = [got[at_k], got[at_v], got[at_v + 64 * hd]];
                            assert_eq!(untouched, [0xffff; 3], "{what}: past the last tile, written");
                            continue;
                        }
                        let (kx, vx) = if j < kmax {
                            (k[(h * cap + j) * hd + d], v[(h * cap + j) * hd + d])
                        } else {
                            (0.0, 0.0)
                        };
                        assert_eq!(got[at_k], hi_lo(kx).0, "{what}: K {kx}");
                        let (vh, vl) = hi_lo(vx);
                        assert_eq!(got[at_v], vh, "{what}: V hi of {vx}");
                        assert_eq!(got[at_v + 64 * hd], vl, "{what}: V lo of {vx}");
                        checked += 1;
                    }
                }
            }
        }
        assert_eq!(checked, n_kv * ntile * 64 * hd);
        println!("kv_tile_f32 hd {hd}: {checked} (key, dim) entries of {ntile} tiles a KV head exact");
    }
}

/// `kv_split_f32` + `flash_tcx_*` (K/V split into hi/lo f16 once, 8 warps
/// per block over 1, 2 or 4 query heads of a KV group) against the f64
/// reference (split precision: 5e-5, as flash_attention_matches_reference)
/// and against `flash_tc_d128_f32` (the same arithmetic: with one key split
/// within 1e-6, normally bit-identical), head dims 64 and 128, groups 1, 3
/// and 4, partial query tiles, p0 inside a key tile and after 2100 keys,
/// key splits 1, 2, 3 and 7 (within 2e-5 of the un-split result). Cache
/// rows past p0 + nt are NaN and the side buffer is poisoned with NaN
/// first (a row read past the keys shows), outputs and partials too.
/// kv_half_f32 + `flash_tcx16_*` (plain f16) the same way, to 1e-2 of the
/// reference as tc16, and within 1e-2 of the split result (key splits:
/// 2e-5 of their un-split result); `flash_tcxv_*` (P V split, Q K plain)
/// to tc16's 1e-2 too.
#[test]
fn flash_tcx_matches_reference() {
    use yinsen::backends::cuda::{flash_tc_smem, flash_tcx_scap, KvDtype, FLASH_TC_THREADS};
    let Some(g) = mma_gpu("the tensor-core flash kernels") else {
        return;
    };
    let cap = 2200usize;
    let scap = flash_tcx_scap(cap);
    let mut ran = 0usize;
    let mut identical = 0usize;
    for case in AttnCase::all(
        &g,
        170,
        cap,
        &[
            (128usize, 8usize, 2usize, 200usize, 37usize),
            (128, 20, 5, 300, 0),
            (128, 3, 3, 130, 64),
            (128, 8, 2, 64, 2100),
            (64, 4, 1, 129, 250),
            (64, 6, 2, 300, 0),
            (64, 4, 2, 97, 1000),
        ],
    ) {
        let (hd, n_heads, n_kv, nt, p0) = case.shape;
        let (q_dim, out, dims) = (case.dims[0], &case.out, case.dims);
        let want = case.want(false);
        let (_kb, _vb, args) = case.kv_args(&g, false);
        let part = g.alloc(4 * nt * n_heads * 7 * (hd + 2)).unwrap();
        let kvs = g.alloc(2 * n_kv * scap * 4 * hd).unwrap();
        // The old split kernel, un-split, as the bit-level reference.
        let old = KvDtype::F32.flash_tc(false, true);
        let smem = flash_tc_smem(hd, true, KvDtype::F32);
        assert!(g.allow_dynamic_smem(old, smem).unwrap());
        let tc = poisoned_run(out, nt * q_dim, || {
            flash_launch(&g, old, FLASH_TC_THREADS, smem, nt, n_heads, hd, &args, 1, Arg::P(0))
        });
        use yinsen::backends::cuda::Arg;
        let group = n_heads / n_kv;
        for t in tcx_kernels(&g, hd, group) {
            let name = t.name;
            if !g.allow_dynamic_smem(name, t.smem()).unwrap() {
                println!("{name}: {} bytes of smem not available here", t.smem());
                continue;
            }
            // Plain f16 rounds each split's P against its own running max, so
            // key splits move its results by f16 rounding, not f32's. Q K in
            // plain f16 (with P V split too) is held to the same limits.
            let (tol, tol_tc, tol_ks) = if t.qk_split {
                (5e-5, 1e-6, 2e-5)
            } else {
                (1e-2, 1e-2, 1e-2)
            };
            let mut base: Vec<f32> = Vec::new();
            for n_ks in [1usize, 2, 3, 7] {
                kvs.fill(0xff).unwrap(); // NaN until split
                part.fill(0xff).unwrap();
                let got = poisoned_run(out, nt * q_dim, || {
                    tcx_launch(&g, t, &args, &kvs, scap, dims, n_ks, part.p())
                });
                let what = format!("{name} hd {hd} heads {n_heads}/{n_kv} nt {nt} p0 {p0} n_ks {n_ks}");
                let e = assert_attention_close(&got, &want, tol, q_dim, hd, &what);
                if n_ks == 1 {
                    let d = max_rel_diff(&got, &tc);
                    println!("{what}: err {e:.2e}, vs flash_tc_d128_f32 {d:.2e}");
                    assert!(d <= tol_tc, "{what}: {d} from flash_tc_d128_f32");
                    identical += (t.qk_split && t.pv_split && got == tc) as usize;
                    base = got;
                } else {
                    let d = max_rel_diff(&got, &base);
                    assert!(d <= tol_ks, "{what}: {d} from the un-split result");
                }
                ran += 1;
            }
        }
    }
    println!("flash_tcx: {ran} launches checked, {identical} un-split results bit-identical to flash_tc_d128_f32");
    assert!(ran >= 3 * 7 * 4);
}

/// `flash_tcx_*` against `flash_tc_d128_f32` at the 2b4t shape (20 heads on
/// 5 KV heads, hd 128, f32 cache), device runs only: 2048 tokens from an
/// empty cache, 512 tokens (with the key split the backend picks) and 64
/// tokens after 2048 keys; results within 1e-6 of the old kernel
/// (un-split) or 2e-5 (split), then the time per launch (kv_split_f32
/// included) next to the old kernel's, A/B in the same process.
#[test]
fn flash_tcx_2b4t_timing() {
    use yinsen::backends::cuda::{flash_tc_smem, flash_tcx_scap, Arg, KvDtype, FLASH_TC_THREADS};
    if !common::device_only("flash_tcx_2b4t_timing") {
        return;
    }
    let Some(g) = gpu() else { return };
    let (n_heads, n_kv, hd, cap) = (20usize, 5usize, 128usize, 4096usize);
    let scap = flash_tcx_scap(cap);
    let q_dim = n_heads * hd;
    // Every cache row holds a key (none NaN).
    let (q, k, v) = attn_inputs(991, 2048 * q_dim, n_kv, cap, hd, cap);
    let qb = g.upload(&q).unwrap();
    let (kb, vb) = (g.upload(&k).unwrap(), g.upload(&v).unwrap());
    let out = g.alloc(4 * 2048 * q_dim).unwrap();
    let part = g.alloc(4 * 2048 * n_heads * 8 * (hd + 2)).unwrap();
    let kvs = g.alloc(2 * n_kv * scap * 4 * hd).unwrap();
    let scale = 1.0 / (hd as f32).sqrt();
    let sms = g.info.sms.max(1) as usize;
    let time = |f: &dyn Fn()| time_ms(&g, f);
    let mut table = Vec::new();
    for (nt, p0) in [(2048usize, 0usize), (512, 0), (64, 2048)] {
        let pos = g.upload(&[p0 as i32]).unwrap();
        let dims = [q_dim, nt, n_heads, n_kv, hd, cap];
        let args = flash_args(&qb, &kb, &vb, &pos, &out, dims, scale);
        let old = KvDtype::F32.flash_tc(false, true);
        let smem = flash_tc_smem(hd, true, KvDtype::F32);
        assert!(g.allow_dynamic_smem(old, smem).unwrap());
        let old_ks = (2 * sms).div_ceil(nt.div_ceil(64) * n_heads).min(64);
        let want = poisoned_run(&out, nt * q_dim, || {
            flash_launch(&g, old, FLASH_TC_THREADS, smem, nt, n_heads, hd, &args, 1, Arg::P(0))
        });
        assert!(want.iter().all(|x| x.is_finite()));
        let t_old = time(&|| flash_launch(&g, old, FLASH_TC_THREADS, smem, nt, n_heads, hd, &args, 1, Arg::P(0)));
        let t_old_ks = time(&|| {
            flash_launch(
                &g,
                old,
                FLASH_TC_THREADS,
                smem,
                nt,
                n_heads,
                hd,
                &args,
                old_ks,
                part.p(),
            )
        });
        table.push(format!(
            "nt {nt} p0 {p0}: {old} n_ks 1 {t_old:.4} ms, n_ks {old_ks} {t_old_ks:.4} ms"
        ));
        // kv_split_f32 alone.
        let split = kv_side_args([args[2], args[3], args[4]], [nt, n_kv, hd, cap, scap], &kvs);
        let gx = (cap * hd / 4).div_ceil(2048).clamp(1, 64) as u32;
        let t_split = time(&|| {
            g.launch_smem("kv_split_f32", (gx, 2 * n_kv as u32, 1), 256, 0, &split, Launch::Plain)
                .unwrap()
        });
        let t_tile = time(&|| {
            g.launch_smem("kv_tile_f32", (gx, 2 * n_kv as u32, 1), 256, 0, &split, Launch::Plain)
                .unwrap()
        });
        table.push(format!(
            "nt {nt} p0 {p0}: kv_split_f32 {t_split:.4} ms, kv_tile_f32 {t_tile:.4} ms"
        ));
        let group = n_heads / n_kv;
        for t in tcx_kernels(&g, hd, group) {
            let name = t.name;
            if !g.allow_dynamic_smem(name, t.smem()).unwrap() {
                continue;
            }
            // CudaBackend::tcx_splits: about one block per SM where the
            // un-split grid leaves over half of them idle.
            let blocks = nt.div_ceil(t.bq()) * (n_heads / t.hpb);
            let slots = sms * (8 / t.warps).max(1);
            let auto = if 2 * blocks <= slots { slots / blocks } else { 1 };
            let mut splits = vec![1usize, 2];
            if auto > 2 {
                splits.push(auto);
            }
            for n_ks in splits {
                let run = || tcx_launch(&g, t, &args, &kvs, scap, dims, n_ks, part.p());
                let got = poisoned_run(&out, nt * q_dim, run);
                let d = max_rel_diff(&got, &want);
                let tol = match (t.qk_split, n_ks) {
                    (true, 1) => 1e-6,
                    (true, _) => 2e-5,
                    _ => 1e-2, // Q K in plain f16 (tc16's limit)
                };
                assert!(d <= tol, "{name} nt {nt} p0 {p0} n_ks {n_ks}: {d} from {old}");
                let ms = time(&run);
                let occ = g.occupancy(name, t.threads(), t.smem()).unwrap();
                table.push(format!(
                    "nt {nt} p0 {p0}: {name} n_ks {n_ks} {ms:.4} ms incl. split (x30 {:.2} ms; {occ} blocks/SM; diff {d:.1e})",
                    30.0 * ms
                ));
            }
        }
    }
    for l in &table {
        println!("TIMING {l}");
    }
}

/// Where the quantisers put code i of token t (ops.cu's q_at): row-major, or
/// with x_ntp > 0 the TMA GEMM's stage-tiled order.
fn q_at(t: usize, i: usize, kpad: usize, x_ntp: usize) -> usize {
    if x_ntp == 0 {
        return t * kpad + i;
    }
    (i >> 7) * x_ntp * 128 + (t >> 3) * 1024 + ((i & 127) >> 4) * 128 + (t & 7) * 16 + (i & 15)
}

/// The grouped quantisers (`norm_quant_w*`, calls of 64+ tokens; every one that holds the row)
/// against the block-per-token `norm_quant` on the same rows: plain and
/// gated (relu2, SiLU) inputs, with and without a norm, row-major and
/// stage-tiled codes, token counts that leave a block part-full. Every
/// scale within 2e-6 (the sum of squares runs in another order), every code
/// equal but for rare +-1 rounding edges, each token's code sum exact, the
/// padding written (buffers poisoned first).
#[test]
fn norm_quant_groups_match_block_kernel() {
    use yinsen::backends::cuda::Arg;
    let Some(g) = gpu() else { return };
    let mut rng = SplitMix64(0x6e71);
    let mut checked = 0usize;
    // (n, gate, do_norm, tokens, tiled, kpad)
    for &(n, gate, norm, nt, tiled, kpad) in &[
        (2560usize, 0i32, 1i32, 67usize, true, 2560usize),
        (2560, 0, 0, 130, false, 2560),
        (6912, 1, 1, 70, true, 6912),
        (6912, 2, 1, 64, false, 6912),
        (100, 0, 1, 65, false, 128),
        (3072, 1, 1, 99, true, 3072),
    ] {
        let stride = if gate != 0 { 2 * n } else { n };
        let mut x = vec![0f32; nt * stride];
        for (t, row) in x.chunks_mut(stride).enumerate() {
            let scale = 0.05 + (t % 13) as f32 * 0.7;
            for v in row.iter_mut() {
                *v = ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale;
            }
            if t % 5 == 0 {
                row[t % n] = 40.0 * scale; // an outlier sets the token's scale
            }
        }
        let w: Vec<f32> = (0..n).map(|i| 0.5 + (i % 7) as f32 * 0.25).collect();
        let xb = g.upload(&x).unwrap();
        let wb = g.upload(&w).unwrap();
        let x_ntp = if tiled { nt.div_ceil(256) * 256 } else { 0 };
        let qbytes = if tiled {
            kpad.div_ceil(256) * 256 * x_ntp
        } else {
            nt * kpad
        };
        let q = g.alloc(qbytes).unwrap();
        let sx = g.alloc(4 * nt).unwrap();
        let xsum = g.alloc(4 * nt).unwrap();
        let run = |name: &str, grid: usize, threads: u32, tail: &[Arg]| {
            q.fill(0x55).unwrap();
            sx.fill(0xff).unwrap();
            xsum.fill(0x55).unwrap();
            let mut args = vec![
                xb.p(),
                Arg::I(n as i32),
                Arg::I(stride as i32),
                Arg::I(gate),
                wb.p(),
                Arg::I(norm),
                Arg::F(1e-5),
                q.p(),
                Arg::I(kpad as i32),
                sx.p(),
                xsum.p(),
            ];
            args.extend_from_slice(tail);
            g.launch_smem(name, (grid as u32, 1, 1), threads, 0, &args, Launch::Plain)
                .unwrap();
            g.sync().unwrap();
            (
                q.read::<i8>(qbytes).unwrap(),
                sx.read::<f32>(nt).unwrap(),
                xsum.read::<i32>(nt).unwrap(),
            )
        };
        let threads = n.div_ceil(8).next_power_of_two().clamp(128, 1024) as u32;
        let (q0, s0, x0) = run("norm_quant", nt, threads, &[Arg::P(0), Arg::I(0), Arg::I(x_ntp as i32)]);
        for (warps, r, name) in yinsen::backends::cuda::NQ_GROUPS {
            if n > 128 * warps * r {
                continue;
            }
            let tpb = (8 / warps).max(1);
            let (q1, s1, x1) = run(
                name,
                nt.div_ceil(tpb),
                (32 * warps * tpb) as u32,
                &[Arg::I(nt as i32), Arg::I(x_ntp as i32)],
            );
            let what = format!("{name} n {n} gate {gate} norm {norm} nt {nt} tiled {tiled}");
            for t in 0..nt {
                let rel = ((s1[t] - s0[t]) / s0[t]).abs();
                assert!(rel <= 2e-6, "{what}: token {t} scale {} vs {}", s1[t], s0[t]);
                let codes: i32 = (0..n).map(|i| q1[q_at(t, i, kpad, x_ntp)] as i32).sum();
                assert_eq!(x1[t], codes, "{what}: token {t} code sum");
                for i in n..kpad {
                    assert_eq!(q1[q_at(t, i, kpad, x_ntp)], 0, "{what}: token {t} padding {i}");
                }
            }
            let mut flips = 0usize;
            for (i, (&a, &b)) in q1.iter().zip(&q0).enumerate() {
                let d = (a as i32 - b as i32).abs();
                assert!(d <= 1, "{what}: byte {i}: {a} vs {b}");
                flips += d as usize;
            }
            assert!(flips * 10_000 <= nt * n, "{what}: {flips} codes off by one");
            assert_ne!(
                x1,
                x0.iter().map(|_| 0x5555_5555).collect::<Vec<i32>>(),
                "{what}: sums unwritten"
            );
            println!("{what}: {flips} of {} codes off by one", nt * n);
            checked += 1;
        }
    }
    assert!(checked >= 12, "{checked} variant cases");
}

/// The GEMM epilogues' division (`div_rcp` / `div_by` in common.cuh) gives
/// IEEE division's bits: 2^20 random pairs with exponents across and past
/// its fast range [2^-40, 2^40], pairs of the sizes the epilogues divide
/// (weight scale / token scale), and the values that take `__fdiv_rn`
/// (zeros, denormals, the range edges, huge, inf, NaN), both ways round.
#[test]
fn fast_division_matches_ieee() {
    use yinsen::backends::cuda::Arg;
    let Some(g) = gpu() else { return };
    let mut r = SplitMix64(0xd1_u64 + 7);
    let mut rand_f = |lo: i32, hi: i32| {
        let bits = r.next_u64();
        let e = (lo + (bits % (hi - lo + 1) as u64) as i32 + 127) as u32;
        f32::from_bits(((bits >> 32) as u32 & 0x8000_0000) | (e << 23) | ((bits >> 8) as u32 & 0x7f_ffff))
    };
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for i in 0..(1 << 20) {
        let (x, y) = match i % 3 {
            0 => (rand_f(-46, 46), rand_f(-46, 46)),
            1 => (rand_f(-12, 3), rand_f(-14, 0)),
            _ => (rand_f(-40, 40), rand_f(-40, 40)),
        };
        a.push(x);
        b.push(y);
    }
    let edge = [
        0.0f32,
        -0.0,
        f32::from_bits(1),
        f32::MIN_POSITIVE,
        (-40f32).exp2(),
        (-40f32).exp2() * (1.0 - f32::EPSILON / 2.0),
        40f32.exp2(),
        40f32.exp2() * (1.0 + f32::EPSILON),
        1.0,
        3.0,
        -7.5e-3,
        f32::MAX,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
    ];
    for &x in &edge {
        for &y in &edge {
            a.push(x);
            b.push(y);
        }
    }
    let n = a.len();
    let (da, db, dq) = (g.upload(&a).unwrap(), g.upload(&b).unwrap(), g.alloc(4 * n).unwrap());
    dq.write(&vec![f32::from_bits(0x7fc0_dead); n]).unwrap(); // poisoned
    let args = [da.p(), db.p(), Arg::I(n as i32), dq.p()];
    g.launch_smem(
        "fdiv_check",
        (n.div_ceil(256) as u32, 1, 1),
        256,
        0,
        &args,
        Launch::Plain,
    )
    .unwrap();
    let q = dq.read::<f32>(n).unwrap();
    for i in 0..n {
        let want = a[i] / b[i];
        let same =
            q[i].to_bits() == want.to_bits() || (q[i].is_nan() && want.is_nan() && q[i].to_bits() != 0x7fc0_dead);
        assert!(
            same,
            "{} / {}: got {:e} ({:#x}), IEEE {:e}",
            a[i],
            b[i],
            q[i],
            q[i].to_bits(),
            want
        );
    }
}

/// The streamed 8-bit head passes (`lm_head_screen_q8_tma`,
/// `lm_head_dec_q8_tma`: rows by bulk copies through a ring of stages) give
/// the register-fed kernels' bits on the same inputs: every row's logit,
/// the screen's keys, bound factors and normed x, the largest per-warp lower
/// end, and the greedy pick. Vocabularies that end in a partial octet (its
/// scales and bounds read from global memory), grids that make each block
/// wrap its ring many times, rings of 2-4 stages; outputs poisoned first.
#[test]
fn lm_head_streamed_matches_register_kernels() {
    use half::f16;
    use yinsen::backends::cuda::{head_tma_smem, Arg};
    let Some(g) = gpu() else { return };
    if g.arch != "sm_90a" {
        common::skip_cuda(&format!("the streamed head needs bulk copies (sm_90a), not {}", g.arch));
        return;
    }
    let mut rng = SplitMix64(0x7e4d);
    let mut cases = 0usize;
    for &(vocab, hidden) in &[(1003usize, 2560usize), (4096, 2560), (517, 320), (64, 96)] {
        let q: Vec<i8> = (0..vocab * hidden)
            .map(|_| (((rng.next_u64() >> 33) % 255) as i32 - 127) as i8)
            .collect();
        let d: Vec<u16> = (0..vocab * hidden / 32)
            .map(|_| f16::from_f32(1e-3 + (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 0.02).to_bits())
            .collect();
        let unit = |r: &mut SplitMix64| (r.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        let x: Vec<f32> = (0..hidden).map(|_| (unit(&mut rng) - 0.5) * 6.0).collect();
        let nw: Vec<f32> = (0..hidden).map(|_| 0.5 + unit(&mut rng)).collect();
        let err: Vec<f32> = (0..vocab).map(|_| 1e-3 * unit(&mut rng)).collect();
        let abs: Vec<f32> = (0..vocab).map(|_| 10.0 + 50.0 * unit(&mut rng)).collect();
        let (qb, db, xb, nwb) = (
            g.upload(&q).unwrap(),
            g.upload(&d).unwrap(),
            g.upload(&x).unwrap(),
            g.upload(&nw).unwrap(),
        );
        let (errb, absb) = (g.upload(&err).unwrap(), g.upload(&abs).unwrap());
        let lq = g.alloc(4 * vocab).unwrap();
        let fac = g.alloc(8).unwrap();
        let keys = g.alloc(16).unwrap();
        let xs = g.alloc(4 * hidden).unwrap();
        let wmax = g.alloc(8 * 8 * 64).unwrap();
        let best = g.alloc(8).unwrap();
        // `plain` on 8 blocks, or `tma` at (grid, ring) with its ring as
        // the last argument.
        let launch = |plain: &str, tma: &str, mut a: Vec<Arg>, how: Option<(u32, usize)>| {
            match how {
                Some((grid, ring)) => {
                    let smem = head_tma_smem(hidden, ring);
                    assert!(g.allow_dynamic_smem(tma, smem).unwrap());
                    a.push(Arg::I(ring as i32));
                    g.launch_smem(tma, (grid, 1, 1), 256, smem as u32, &a, Launch::Plain)
                }
                None => g.launch_smem(plain, (8, 1, 1), 256, 0, &a, Launch::Plain),
            }
            .unwrap();
            g.sync().unwrap();
        };
        // (lq bits, keys, fac bits, xs bits, largest wmax entry), then
        // (logits bits, best) of the plain 8-bit head.
        let run = |how: Option<(u32, usize)>| {
            lq.fill(0xff).unwrap();
            fac.fill(0xff).unwrap();
            xs.fill(0xff).unwrap();
            keys.fill(0).unwrap();
            wmax.fill(0).unwrap();
            let head = [
                qb.p(),
                db.p(),
                Arg::I(vocab as i32),
                Arg::I(hidden as i32),
                xb.p(),
                nwb.p(),
                Arg::F(1e-5),
                lq.p(),
            ];
            let mut a = head.to_vec();
            a.extend([errb.p(), absb.p(), fac.p(), keys.p(), xs.p(), wmax.p()]);
            launch("lm_head_screen_q8", "lm_head_screen_q8_tma", a, how);
            let screen = (
                lq.read::<u32>(vocab).unwrap(),
                keys.read::<u32>(2).unwrap(),
                fac.read::<u32>(2).unwrap(),
                xs.read::<u32>(hidden).unwrap(),
                wmax.read::<u64>(8 * 64).unwrap().into_iter().max().unwrap(),
            );
            lq.fill(0xff).unwrap();
            best.fill(0).unwrap();
            let mut a = head.to_vec();
            a.push(best.p());
            launch("lm_head_dec_q8", "lm_head_dec_q8_tma", a, how);
            (screen, lq.read::<u32>(vocab).unwrap(), best.read::<u64>(1).unwrap()[0])
        };
        let want = run(None);
        assert!(
            want.0 .0.iter().all(|&b| b != u32::MAX),
            "register kernel left rows unwritten"
        );
        assert!(
            want.1.iter().all(|&b| b != u32::MAX),
            "register 8-bit head left rows unwritten"
        );
        assert_ne!(want.2, 0, "no pick");
        let octets = vocab.div_ceil(8) as u32;
        for &(grid, ring) in &[(1u32, 2usize), (3, 4), (7, 3), (octets.min(64), 4)] {
            let got = run(Some((grid, ring)));
            let what = format!("vocab {vocab} hidden {hidden} grid {grid} ring {ring}");
            assert_eq!(got.0 .0, want.0 .0, "{what}: screen logits");
            assert_eq!(got.0 .1, want.0 .1, "{what}: keys");
            assert_eq!(got.0 .2, want.0 .2, "{what}: bound factors");
            assert_eq!(got.0 .3, want.0 .3, "{what}: normed x");
            assert_eq!(got.0 .4 >> 32, want.0 .4 >> 32, "{what}: largest lower end");
            assert_eq!(got.1, want.1, "{what}: 8-bit head logits");
            assert_eq!(got.2, want.2, "{what}: greedy pick");
            cases += 1;
        }
    }
    assert_eq!(cases, 16);
}
