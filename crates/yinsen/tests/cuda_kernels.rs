//! CUDA backend tests. Without a GPU they print `SKIP cuda: <reason>` and
//! pass; with YINSEN_DEVICE=1 a missing GPU is a failure.

use yinsen::backends::cpu::reference::ternary_matmul_i32;
use yinsen::backends::cuda::{self, Gpu, MatKernel};
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
        kernels.push(MatKernel::Mma);
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
