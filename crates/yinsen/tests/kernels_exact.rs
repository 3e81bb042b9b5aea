//! Every CPU kernel available here (and AMX on the device host, env
//! YINSEN_DEVICE=1) against the scalar reference, bit for bit, on the same
//! canonical bytes.

use std::sync::Arc;

use yinsen::backends::cpu::kernels::{self, PackedTernary, TernaryKernel};
use yinsen::backends::cpu::reference::ternary_matmul_i32;
use yinsen::model::{TernaryMatrix, WeightScale};

const POISON: i32 = i32::MIN + 7;

/// Deterministic splitmix64.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn device_run() -> bool {
    std::env::var("YINSEN_DEVICE").is_ok_and(|v| v == "1")
}

/// All kernels to check: every available one, the AMX driver's scalar
/// emulation, and real AMX where granted (required on the device host).
fn kernels_under_test() -> Vec<Arc<dyn TernaryKernel>> {
    let mut v: Vec<Arc<dyn TernaryKernel>> = kernels::available()
        .into_iter()
        .map(|n| kernels::select(n).unwrap_or_else(|e| panic!("available kernel {n} not selectable: {e}")))
        .collect();
    #[cfg(target_arch = "x86_64")]
    {
        v.push(kernels::amx::emulated());
        // The K-sliced driver (C tiles parked between slices), which the
        // default whole-K loop no longer runs.
        v.push(kernels::amx::emulated_sliced());
        let st = kernels::amx::amx_status();
        if st == kernels::amx::AmxStatus::Granted {
            v.push(kernels::amx::sliced());
        }
        if device_run() {
            assert_eq!(
                st,
                kernels::amx::AmxStatus::Granted,
                "YINSEN_DEVICE=1 but AMX is not usable"
            );
        }
        if st != kernels::amx::AmxStatus::Granted {
            let _ = std::io::Write::write_fmt(&mut std::io::stderr(), format_args!("SKIP amx: {st}\n"));
            // uncaptured: visible in CI logs
        }
    }
    assert!(v.iter().any(|k| k.name() == "scalar"));
    v
}

fn random_matrix(rng: &mut Rng, n_out: usize, n_in: usize) -> TernaryMatrix {
    // Density varies per matrix so sparse and dense rows both occur.
    let zero_pct = rng.below(90);
    let trits: Vec<i8> = (0..n_out * n_in)
        .map(|_| {
            if rng.below(100) < zero_pct {
                0
            } else if rng.below(2) == 0 {
                1
            } else {
                -1
            }
        })
        .collect();
    assert!(
        n_out * n_in < 8 || trits.iter().any(|&t| t != 0),
        "test data must not be all zero"
    );
    TernaryMatrix::from_trits(n_out, n_in, &trits, WeightScale::PerTensor(1.0)).unwrap()
}

fn random_x(rng: &mut Rng, n: usize) -> Vec<i8> {
    (0..n)
        .map(|_| match rng.below(16) {
            0 => -128,
            1 => 127,
            _ => rng.next() as i8,
        })
        .collect()
}

/// Row ranges as callers use them: the whole matrix, and splits into
/// pieces of a multiple of `row_block` with a partial last piece.
fn row_ranges(n_out: usize, rb: usize) -> Vec<(usize, usize)> {
    let mut v = vec![(0, n_out)];
    let blocks = n_out.div_ceil(rb);
    for pieces in [2, 3] {
        let step = rb * blocks.div_ceil(pieces).max(1);
        let mut r = 0;
        let mut split = vec![];
        while r < n_out {
            split.push((r, (r + step).min(n_out)));
            r += step;
        }
        if split.len() > 1 {
            v.extend(split);
        }
    }
    v
}

/// Check `p` on `x` against the token-major reference `want`.
fn check(name: &str, p: &dyn PackedTernary, x: &[i8], n_tokens: usize, want: &[i32]) {
    let (n_out, n_in) = (p.n_out(), p.n_in());
    for (r0, r1) in row_ranges(n_out, p.row_block()) {
        let mut out = vec![POISON; (r1 - r0) * n_tokens];
        p.gemm(x, n_tokens, r0, r1, &mut out);
        for r in r0..r1 {
            for t in 0..n_tokens {
                let got = out[(r - r0) * n_tokens + t];
                let exp = want[t * n_out + r];
                assert_eq!(
                    got, exp,
                    "{name}: {n_out}x{n_in}, {n_tokens} tokens, rows {r0}..{r1}: row {r} token {t}"
                );
            }
        }
        // The token-major variant, where the kernel has one.
        let mut tm = vec![POISON; (r1 - r0) * n_tokens];
        if p.gemm_tokens(x, n_tokens, r0, r1, &mut tm) {
            for t in 0..n_tokens {
                for r in r0..r1 {
                    assert_eq!(
                        tm[t * (r1 - r0) + r - r0],
                        want[t * n_out + r],
                        "{name} token-major: {n_out}x{n_in}, {n_tokens} tokens, rows {r0}..{r1}: row {r} token {t}"
                    );
                }
            }
        }
    }
}

fn check_all(ks: &[Arc<dyn TernaryKernel>], m: &TernaryMatrix, x: &[i8], n_tokens: usize) {
    let want = ternary_matmul_i32(m, x, n_tokens);
    for k in ks {
        let p = k.prepare(m).unwrap();
        check(k.name(), p.as_ref(), x, n_tokens, &want);
    }
}

const SIZES: [usize; 11] = [1, 3, 15, 16, 17, 31, 64, 255, 256, 257, 2560];

#[test]
fn random_shapes_match_reference() {
    let ks = kernels_under_test();
    let mut rng = Rng(0x5eed);
    for &n_out in &SIZES {
        for &n_in in &SIZES {
            let m = random_matrix(&mut rng, n_out, n_in);
            let small = n_out * n_in <= 64 * 257;
            let tokens: Vec<usize> = if small {
                (1..=20).chain([33]).collect()
            } else if n_out * n_in <= 2560 * 257 {
                vec![1, 4, 16, 17, 33]
            } else {
                vec![1, 5, 18]
            };
            for nt in tokens {
                let x = random_x(&mut rng, nt * n_in);
                check_all(&ks, &m, &x, nt);
            }
        }
    }
}

/// Shapes that reach every AMX driver path: activations read in place
/// (n_in a multiple of 64) plus a padded tail pair, several super-blocks of
/// expanded weights, an odd last row block, and a partial last row block.
#[test]
fn blocked_paths_match_reference() {
    let ks = kernels_under_test();
    let mut rng = Rng(0xb10c);
    for (n_out, n_in, tokens) in [
        (213usize, 2560usize, [64usize, 70]),
        (40, 6912, [32, 33]),
        (50, 192, [96, 31]),
    ] {
        let m = random_matrix(&mut rng, n_out, n_in);
        for nt in tokens {
            let x = random_x(&mut rng, nt * n_in);
            check_all(&ks, &m, &x, nt);
        }
    }
}

/// Every weight pattern of a row of 5 against x_j = 3^j: each of the 243
/// rows has a distinct exact sum, computed here independently.
#[test]
fn exhaustive_powers_of_three() {
    let ks = kernels_under_test();
    for n_in in [4usize, 5] {
        let n_out = 3usize.pow(n_in as u32);
        let mut trits = vec![0i8; n_out * n_in];
        for r in 0..n_out {
            let mut v = r;
            for j in 0..n_in {
                trits[r * n_in + j] = (v % 3) as i8 - 1;
                v /= 3;
            }
        }
        let m = TernaryMatrix::from_trits(n_out, n_in, &trits, WeightScale::PerTensor(1.0)).unwrap();
        // Token 0: 3^j; token 1: -3^j; token 2: 3^j shifted by one position.
        let pow: Vec<i8> = (0..n_in).map(|j| 3i8.pow(j as u32)).collect();
        let mut x = pow.clone();
        x.extend(pow.iter().map(|v| -v));
        x.extend((0..n_in).map(|j| pow[(j + 1) % n_in]));
        let n_tokens = 3;
        let mut want = vec![0i32; n_tokens * n_out];
        for t in 0..n_tokens {
            for r in 0..n_out {
                want[t * n_out + r] = (0..n_in)
                    .map(|j| trits[r * n_in + j] as i32 * x[t * n_in + j] as i32)
                    .sum();
            }
        }
        let distinct: std::collections::HashSet<i32> = want[..n_out].iter().copied().collect();
        assert_eq!(distinct.len(), n_out, "3^j sums must be distinct");
        for k in &ks {
            let p = k.prepare(&m).unwrap();
            check(k.name(), p.as_ref(), &x, n_tokens, &want);
        }
    }
}

/// The 243 rows of five weights of `exhaustive_powers_of_three`, against
/// x_j = 3^j, at every offset of a 20-input window (past one 16-input tile
/// chunk and one 20-input base-3 chunk): every code position of every
/// layout decodes a distinct weight. The inputs outside the window have zero
/// weights but non-zero activations, so a misplaced code shows too.
#[test]
fn exhaustive_powers_of_three_at_every_offset() {
    let ks = kernels_under_test();
    let n_out = 243;
    for o in 0..=21usize {
        let n_in = o + 5;
        let mut trits = vec![0i8; n_out * n_in];
        for r in 0..n_out {
            let mut v = r;
            for j in 0..5 {
                trits[r * n_in + o + j] = (v % 3) as i8 - 1;
                v /= 3;
            }
        }
        let m = TernaryMatrix::from_trits(n_out, n_in, &trits, WeightScale::PerTensor(1.0)).unwrap();
        let other = |i: usize| if i.is_multiple_of(2) { 37 } else { -91 };
        let x: Vec<i8> = (0..2 * n_in)
            .map(|i| {
                let (t, j) = (i / n_in, i % n_in);
                match (j >= o, t) {
                    (true, 0) => 3i8.pow((j - o) as u32),
                    (true, _) => -(3i8.pow((j - o) as u32)),
                    (false, _) => other(i),
                }
            })
            .collect();
        let want = ternary_matmul_i32(&m, &x, 2);
        let distinct: std::collections::HashSet<i32> = want[..n_out].iter().copied().collect();
        assert_eq!(distinct.len(), n_out, "offset {o}: 3^j sums must be distinct");
        for k in &ks {
            let p = k.prepare(&m).unwrap();
            check(&format!("{} offset {o}", k.name()), p.as_ref(), &x, 2, &want);
        }
    }
}

/// Inputs past the in-place-mask bound of the one-token tiles take the
/// shift path: all-(+1) and all-(-1) rows against x = 127 stay exact.
#[test]
fn very_wide_rows_stay_exact() {
    let ks = kernels_under_test();
    let (n_out, n_in) = (17usize, (1usize << 19) + 7);
    let trits: Vec<i8> = (0..n_out * n_in)
        .map(|i| match (i / n_in) % 3 {
            0 => 1,
            1 => -1,
            _ => [1, 0, -1, 1][i % 4],
        })
        .collect();
    let m = TernaryMatrix::from_trits(n_out, n_in, &trits, WeightScale::PerTensor(1.0)).unwrap();
    let x: Vec<i8> = (0..n_in).map(|i| if i % 5 == 0 { -128 } else { 127 }).collect();
    let want = ternary_matmul_i32(&m, &x, 1);
    assert!(want[0] > 1 << 25, "the all-(+1) row's sum is large: {}", want[0]);
    for k in &ks {
        let p = k.prepare(&m).unwrap();
        check(k.name(), p.as_ref(), &x, 1, &want);
    }
}

/// Largest magnitudes: x = -128 / 127 everywhere with all-(+1) / all-(-1) rows.
#[test]
fn edge_values() {
    let ks = kernels_under_test();
    for n_in in [17usize, 2560, 6913] {
        let n_out = 33;
        let trits: Vec<i8> = (0..n_out * n_in)
            .map(|i| match (i / n_in) % 3 {
                0 => 1,
                1 => -1,
                _ => [1, -1, 0][i % 3],
            })
            .collect();
        let m = TernaryMatrix::from_trits(n_out, n_in, &trits, WeightScale::PerTensor(1.0)).unwrap();
        let mut x = vec![-128i8; n_in];
        x.extend(vec![127i8; n_in]);
        x.extend((0..n_in).map(|i| if i % 2 == 0 { -128 } else { 127 }));
        let want = ternary_matmul_i32(&m, &x, 3);
        assert_eq!(want[0], -128 * n_in as i32);
        assert_eq!(want[n_out + 1], -127 * n_in as i32);
        for k in &ks {
            let p = k.prepare(&m).unwrap();
            check(k.name(), p.as_ref(), &x, 3, &want);
        }
    }
}

/// The layouts keep 2 bits per weight: nothing is stored expanded.
#[test]
fn resident_bytes_stay_packed() {
    let mut rng = Rng(7);
    for k in kernels_under_test() {
        for (n_out, n_in) in [(2560usize, 6912usize), (6912, 2560), (17, 257), (1, 1)] {
            let m = random_matrix(&mut rng, n_out, n_in);
            let p = k.prepare(&m).unwrap();
            let padded = n_out.next_multiple_of(16) * n_in.next_multiple_of(16) / 4;
            assert!(
                p.resident_bytes() <= padded.max(m.packed.len()) + 64,
                "{}: {}x{} keeps {} bytes (packed {})",
                k.name(),
                n_out,
                n_in,
                p.resident_bytes(),
                m.packed.len()
            );
        }
    }
}

/// Several threads call gemm on one prepared matrix, each on its own rows.
#[test]
fn concurrent_row_ranges() {
    let mut rng = Rng(11);
    let (n_out, n_in, n_tokens) = (300, 333, 7);
    let m = random_matrix(&mut rng, n_out, n_in);
    let x = random_x(&mut rng, n_tokens * n_in);
    let want = ternary_matmul_i32(&m, &x, n_tokens);
    for k in kernels_under_test() {
        let p = k.prepare(&m).unwrap();
        let rb = p.row_block();
        let step = rb * 3;
        std::thread::scope(|s| {
            for r0 in (0..n_out).step_by(step) {
                let (p, x, want) = (&p, &x, &want);
                let name = k.name();
                s.spawn(move || {
                    let r1 = (r0 + step).min(n_out);
                    let mut out = vec![POISON; (r1 - r0) * n_tokens];
                    p.gemm(x, n_tokens, r0, r1, &mut out);
                    for r in r0..r1 {
                        for t in 0..n_tokens {
                            assert_eq!(
                                out[(r - r0) * n_tokens + t],
                                want[t * n_out + r],
                                "{name} row {r} token {t}"
                            );
                        }
                    }
                });
            }
        });
    }
}

#[test]
fn select_names() {
    assert!(kernels::select("auto").is_ok());
    assert!(kernels::select("scalar").is_ok());
    assert!(kernels::select("nope").is_err());
    let avail = kernels::available();
    assert_eq!(kernels::select("auto").unwrap().name(), avail[0]);
    for name in kernels::KERNEL_NAMES {
        let ok = kernels::select(name).is_ok();
        assert_eq!(ok, name == "auto" || avail.contains(&name), "{name}");
    }
    if device_run() {
        assert!(avail.contains(&"amx"), "YINSEN_DEVICE=1 but amx not available");
    }
}

#[test]
fn bad_shapes_are_errors() {
    for k in kernels_under_test() {
        let mut m = TernaryMatrix::zeros(5, 9, WeightScale::PerTensor(1.0)).unwrap();
        m.packed.truncate(7);
        if k.name() != "scalar" {
            assert!(k.prepare(&m).is_err(), "{}: truncated packed accepted", k.name());
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        let m = TernaryMatrix::zeros(1, (1 << 22) + 1, WeightScale::PerTensor(1.0)).unwrap();
        assert!(
            kernels::amx::emulated().prepare(&m).is_err(),
            "n_in above the exact-i32 bound accepted"
        );
    }
}
