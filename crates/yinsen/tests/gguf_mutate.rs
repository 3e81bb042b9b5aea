//! Stable stand-in for fuzzing: mutate valid GGUF images (bit flips, lying
//! integers, truncations, splices) with a fixed seed and require that the
//! loader returns Ok or Err without panicking.

mod gguf_support;

use std::path::PathBuf;

use gguf_support::*;
use yinsen::formats::gguf::{self};
use yinsen::formats::LoadOptions;
use yinsen::model::synthetic::SplitMix64;

fn fixtures_dir() -> PathBuf {
    std::env::var_os("YINSEN_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures"))
}

const INTERESTING: [u64; 8] = [0, 1, 0x7F, 0xFF, 0xFFFF_FFFF, 1 << 32, 1 << 62, u64::MAX];

/// One random mutation, positions drawn from `0..hot` most of the time (the
/// header, where structure lives) and from the whole image otherwise.
fn mutate(b: &mut Vec<u8>, g: &mut SplitMix64, hot: usize) {
    let pos = |g: &mut SplitMix64, len: usize| {
        let lim = if !g.next_u64().is_multiple_of(4) {
            hot.min(len)
        } else {
            len
        };
        (g.next_u64() % lim.max(1) as u64) as usize
    };
    match g.next_u64() % 6 {
        0 => {
            for _ in 0..1 + g.next_u64() % 4 {
                let p = pos(g, b.len());
                b[p] ^= 1 << (g.next_u64() % 8);
            }
        }
        1 => {
            let p = pos(g, b.len());
            let v = INTERESTING[(g.next_u64() % 8) as usize].to_le_bytes();
            let w = [1, 2, 4, 8][(g.next_u64() % 4) as usize];
            let end = (p + w).min(b.len());
            b[p..end].copy_from_slice(&v[..end - p]);
        }
        2 => {
            let n = pos(g, b.len());
            b.truncate(n);
        }
        3 => {
            // Copy a chunk over another place.
            let (src, dst) = (pos(g, b.len()), pos(g, b.len()));
            let n = (g.next_u64() % 64) as usize;
            let chunk: Vec<u8> = b[src..(src + n).min(b.len())].to_vec();
            let end = (dst + chunk.len()).min(b.len());
            b[dst..end].copy_from_slice(&chunk[..end - dst]);
        }
        4 => {
            // Insert random bytes (shifts everything after).
            let p = pos(g, b.len());
            let ins: Vec<u8> = (0..1 + g.next_u64() % 16).map(|_| g.next_u64() as u8).collect();
            b.splice(p..p, ins);
        }
        _ => {
            // Delete a range.
            let p = pos(g, b.len());
            let n = (g.next_u64() % 32) as usize;
            b.drain(p..(p + n).min(b.len()));
        }
    }
}

fn run(seed_image: &[u8], hot: usize, iters: usize, seed: u64) -> (usize, usize) {
    let mut g = SplitMix64(seed);
    let (mut ok, mut err) = (0, 0);
    for _ in 0..iters {
        let mut b = seed_image.to_vec();
        for _ in 0..1 + g.next_u64() % 3 {
            if !b.is_empty() {
                mutate(&mut b, &mut g, hot);
            }
        }
        match gguf::load_bytes(&b, &LoadOptions::default()) {
            Ok(_) => ok += 1,
            Err(e) => {
                assert!(e.to_string().starts_with("<memory>: "), "{e}");
                err += 1;
            }
        }
    }
    (ok, err)
}

#[test]
fn mutated_synthetic_models_never_panic() {
    let b = smallest_i2_s_model();
    // `YINSEN_FUZZ_SEED_DIR=fuzz/corpus/gguf` saves this image as a fuzz seed.
    if let Some(dir) = std::env::var_os("YINSEN_FUZZ_SEED_DIR") {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(PathBuf::from(dir).join("tiny-i2s.gguf"), &b).unwrap();
    }
    let hot = gguf::parse(&b, "x".as_ref()).unwrap().data_start;
    let (ok, err) = run(&b, hot, 5000, 0x5EED);
    // Both outcomes must occur, or the mutator is not exercising anything.
    eprintln!("synthetic: ok {ok}, err {err}");
    assert!(ok > 50 && err > 500, "ok {ok}, err {err}");
}

#[test]
fn mutated_fixture_files_never_panic() {
    for kind in ["TQ2_0", "TQ1_0", "I2_S"] {
        let p = fixtures_dir().join(format!("tiny-bitnet-a/gguf/tiny-bitnet-a-{kind}.gguf"));
        let b = std::fs::read(p).unwrap();
        let hot = gguf::parse(&b, "x".as_ref()).unwrap().data_start;
        let (ok, err) = run(&b, hot, 500, 0xF1 + kind.len() as u64);
        eprintln!("{kind}: ok {ok}, err {err}");
        assert!(err > 30, "{kind}: ok {ok}, err {err}");
    }
}
