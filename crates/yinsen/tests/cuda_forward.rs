//! The CUDA forward against the CPU backend (synthetic:tiny) and against the
//! transformers oracle fixtures. Without a GPU: `SKIP cuda: <reason>`; with
//! YINSEN_DEVICE=1 a missing GPU fails.

mod common;

use std::sync::Arc;

use common::{check_greedy, check_logits, json_ids, read_json, tiny_a, Limits};
use yinsen::backends::cpu::CpuBackend;
use yinsen::backends::cuda::forward::{BatchPass1, BigGemm};
use yinsen::backends::cuda::{CudaBackend, FlashMode, KvDtype};
use yinsen::backends::{Backend, Output};
use yinsen::engine::sampling::{ranked, SamplerConfig};
use yinsen::engine::session::{GenParams, Session};
use yinsen::formats::{self, LoadOptions};
use yinsen::model::{synthetic, Model};

fn cuda(model: &Model) -> Option<CudaBackend> {
    cuda_kv(model, KvDtype::F32)
}

fn cuda_kv(model: &Model, kv: KvDtype) -> Option<CudaBackend> {
    match CudaBackend::with_kv_dtype(model, 0, kv) {
        Ok(b) => Some(b),
        Err(e) if std::env::var("YINSEN_DEVICE").is_ok_and(|v| v == "1") => panic!("YINSEN_DEVICE=1: {e}"),
        Err(e) => {
            common::skip_cuda(&e.to_string());
            None
        }
    }
}

/// Whether a test of an optional GPU path (`what`) can go on: on the device
/// (YINSEN_DEVICE=1) the path must be in use; elsewhere its absence is a
/// printed SKIP.
fn path_in_use(used: bool, what: &str) -> bool {
    if std::env::var("YINSEN_DEVICE").is_ok_and(|v| v == "1") {
        assert!(used, "{what} is not in use on the device");
    } else if !used {
        common::skip_cuda(&format!("{what} is unavailable on this device"));
    }
    used
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn mean_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32
}

fn argmax(v: &[f32]) -> usize {
    (0..v.len()).fold(0, |m, i| if v[i] > v[m] { i } else { m })
}

/// Nine tokens spread over the vocabulary.
fn spread_prompt(model: &Model) -> Vec<u32> {
    let vocab = model.config.vocab as u32;
    (0..9).map(|i| (i * 7919 + 5) % vocab).collect()
}

/// A new cache of `cap` positions that has run `prompt`.
fn prompted(gpu: &CudaBackend, prompt: &[u32], cap: usize) -> Box<dyn yinsen::backends::KvCache> {
    let mut c = gpu.new_cache(cap).unwrap();
    gpu.forward(c.as_mut(), prompt, Output::LastLogits).unwrap();
    c
}

/// A fixed token stream (not the argmax: the same tokens on every backend).
fn fixed_stream(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 13) % vocab) as u32).collect()
}

/// `prompt` into a new cache of `cap` positions, then one decode step per
/// token of `stream`: every step's logits.
fn decode_stream(b: &dyn Backend, cap: usize, prompt: &[u32], stream: &[u32]) -> Vec<Vec<f32>> {
    let mut c = b.new_cache(cap).unwrap();
    b.forward(c.as_mut(), prompt, Output::LastLogits).unwrap();
    stream
        .iter()
        .map(|&t| b.forward(c.as_mut(), &[t], Output::LastLogits).unwrap())
        .collect()
}

fn prompt(n: usize, vocab: usize) -> Vec<u32> {
    let mut r = synthetic::SplitMix64(99);
    (0..n).map(|_| (r.next_u64() % vocab as u64) as u32).collect()
}

/// Random ternary models are "flip prone" (see the fixtures' tolerances.json):
/// a legit fp32 engine and another one differ in a few int8 roundings, which
/// moves logits by up to ~0.04. So: max |d| <= 0.1, mean |d| <= 0.01, and the
/// same top-1 wherever the CPU's top-1 leads its top-2 by >= 0.05.
fn close(got: &[f32], want: &[f32], vocab: usize, what: &str) -> (f32, f32) {
    let d = max_abs(got, want);
    let mean = got.iter().zip(want).map(|(x, y)| (x - y).abs()).sum::<f32>() / got.len() as f32;
    assert!(got.iter().all(|v| v.is_finite()), "{what}: non-finite logits");
    assert!(d <= 0.1 && mean <= 0.01, "{what}: max |dlogit| {d}, mean {mean}");
    for (t, (g, c)) in got.chunks(vocab).zip(want.chunks(vocab)).enumerate() {
        let top = argmax(c);
        let second = (0..vocab).filter(|&i| i != top).fold(f32::MIN, |m, i| m.max(c[i]));
        if c[top] - second >= 0.05 {
            assert_eq!(
                argmax(g),
                top,
                "{what}: top-1 at token {t} (margin {})",
                c[top] - second
            );
        }
    }
    (d, mean)
}

/// `close`, then how many of the tokens agree to 1e-3 (printed): (mean
/// |dlogit|, tokens within 1e-3, tokens).
fn close_tokens(got: &[f32], want: &[f32], vocab: usize, what: &str) -> (f32, usize, usize) {
    let (d, mean) = close(got, want, vocab, what);
    let tokens = want.len() / vocab;
    let tight = got
        .chunks(vocab)
        .zip(want.chunks(vocab))
        .filter(|(a, b)| max_abs(a, b) <= 1e-3)
        .count();
    println!("{what}: max |dlogit| {d:.3e} mean {mean:.3e}, {tight}/{tokens} tokens within 1e-3");
    (mean, tight, tokens)
}

fn margin(c: &[f32]) -> f32 {
    let top = argmax(c);
    c[top] - (0..c.len()).filter(|&i| i != top).fold(f32::MIN, |m, i| m.max(c[i]))
}

#[test]
fn tiny_matches_cpu_backend() {
    tiny_matches_cpu(KvDtype::F32);
}

/// The same through the f16 cache (within the same flip-prone limits).
#[test]
fn tiny_matches_cpu_backend_f16_cache() {
    tiny_matches_cpu(KvDtype::F16);
}

fn tiny_matches_cpu(kv: KvDtype) {
    let model = synthetic::build("tiny").unwrap();
    let Some(gpu) = cuda_kv(&model, kv) else { return };
    let cpu = CpuBackend::new(Arc::new(model.clone()), "auto", 2).unwrap();
    let vocab = model.config.vocab;
    // 300 tokens: several attention splits; prefill through both matrix kernels.
    let ids = prompt(300, vocab);
    let mut cc = cpu.new_cache(400).unwrap();
    let want_all = cpu.forward(cc.as_mut(), &ids, Output::AllLogits).unwrap();
    let mut per_kernel = vec![];
    // The tensor-core GEMMs as chosen, the TMA-fed one forced (its tiled
    // activations; the shape's choice where the device lacks it), the GEMV.
    // The TMA GEMM RoPEs and writes the cache in its epilogue; once more
    // with `rope_kv` doing that from its stored rows.
    let tma = BigGemm::parse("tern_wgmma_tma_s4").unwrap();
    let runs = [
        (2, BigGemm::Auto, true),
        (2, tma, true),
        (usize::MAX, BigGemm::Auto, true),
        (2, tma, false),
    ];
    for (mma_min, big, fused_rope) in runs {
        gpu.set_mma_min_tokens(mma_min);
        gpu.set_big_gemm(big);
        gpu.set_fused_rope(fused_rope);
        let mut gc = gpu.new_cache(400).unwrap();
        let got = gpu.forward(gc.as_mut(), &ids, Output::AllLogits).unwrap();
        let what = format!("prefill (mma from {mma_min}, {}, fused rope {fused_rope})", big.name());
        let (d, mean) = close(&got, &want_all, vocab, &what);
        println!("{what}: max |dlogit| {d:.3e} mean {mean:.3e}");
        per_kernel.push(got);
    }
    // The matrix kernels are exact, so GPU prefill is deterministic across them.
    assert_eq!(per_kernel[0], per_kernel[1], "tensor-core and TMA-fed prefill differ");
    assert_eq!(per_kernel[0], per_kernel[2], "GEMV and tensor-core prefill differ");
    assert_eq!(
        per_kernel[1], per_kernel[3],
        "RoPE in the TMA epilogue and rope_kv differ"
    );
    // A second prefill call after 150 cached tokens (positions from 150),
    // through the TMA GEMM's RoPE and through the tensor-core GEMM's rope_kv.
    let mut second = vec![];
    for big in [tma, BigGemm::Auto] {
        gpu.set_fused_rope(true);
        gpu.set_big_gemm(big);
        let mut gc = gpu.new_cache(400).unwrap();
        gpu.forward(gc.as_mut(), &ids[..150], Output::LastLogits).unwrap();
        second.push(gpu.forward(gc.as_mut(), &ids[150..], Output::AllLogits).unwrap());
    }
    assert_eq!(
        second[0], second[1],
        "prefill after cached tokens: TMA RoPE epilogue and rope_kv differ"
    );
    gpu.set_mma_min_tokens(2);
    gpu.set_big_gemm(BigGemm::Auto);
    // Decode 40 tokens (graph path) vs CPU, feeding both the CPU's token.
    let mut gc = gpu.new_cache(400).unwrap();
    let g_last = gpu.forward(gc.as_mut(), &ids[..100], Output::LastLogits).unwrap();
    let mut cc = cpu.new_cache(400).unwrap();
    let c_last = cpu.forward(cc.as_mut(), &ids[..100], Output::LastLogits).unwrap();
    close(&g_last, &c_last, vocab, "prefill 100 last");
    // GPU last logits equal its own all-logits row (same kernels, same data).
    assert!(max_abs(&g_last, &per_kernel[0][99 * vocab..100 * vocab]) < 1e-5);
    let mut tok = argmax(&c_last) as u32;
    let mut worst = 0f32;
    for step in 0..40 {
        let g = gpu.forward(gc.as_mut(), &[tok], Output::LastLogits).unwrap();
        let c = cpu.forward(cc.as_mut(), &[tok], Output::LastLogits).unwrap();
        worst = worst.max(close(&g, &c, vocab, &format!("decode step {step}")).0);
        tok = argmax(&c) as u32;
    }
    println!("decode 40 steps: max |dlogit| {worst:.3e}");
    // Greedy on the device (token fed back there) vs CPU greedy, identical
    // until the CPU's first near-tie.
    let mut gc2 = gpu.new_cache(400).unwrap();
    let mut cc2 = cpu.new_cache(400).unwrap();
    let l = gpu.forward(gc2.as_mut(), &ids[..10], Output::LastLogits).unwrap();
    let first = argmax(&l) as u32;
    let got = gpu.generate_greedy(gc2.as_mut(), first, 12).unwrap();
    let mut c = cpu.forward(cc2.as_mut(), &ids[..10], Output::LastLogits).unwrap();
    let mut t = argmax(&c) as u32;
    if margin(&c) >= 0.05 {
        assert_eq!(t, first);
        for (i, &g) in got.iter().enumerate() {
            c = cpu.forward(cc2.as_mut(), &[t], Output::LastLogits).unwrap();
            if margin(&c) < 0.05 {
                break;
            }
            t = argmax(&c) as u32;
            assert_eq!(g, t, "device greedy step {i}");
        }
    }
    // Hidden output and errors.
    let mut gc3 = gpu.new_cache(64).unwrap();
    let h = gpu.forward(gc3.as_mut(), &ids[..5], Output::Hidden).unwrap();
    assert_eq!(h.len(), 5 * model.config.hidden);
    gc3.truncate(0);
    assert!(gpu.forward(gc3.as_mut(), &ids[..65], Output::LastLogits).is_err());
    assert!(gpu.forward(gc3.as_mut(), &[vocab as u32], Output::LastLogits).is_err());
}

/// The flash prefill tests' model and prompts: tiny, 237 tokens (the
/// 100 + 137 calls) and 300 tokens (one call).
fn flash_prefill_inputs() -> (Model, Vec<u32>, Vec<u32>) {
    let model = synthetic::build("tiny").unwrap();
    let vocab = model.config.vocab;
    let (ids, long) = (prompt(237, vocab), prompt(300, vocab));
    (model, ids, long)
}

/// All logits of three prefills with attention `mode`: `long` in one call
/// (fresh cache), and `ids` as 100 tokens then the rest after them.
fn flash_prefills(gpu: &CudaBackend, mode: FlashMode, long: &[u32], ids: &[u32]) -> Vec<Vec<f32>> {
    gpu.set_flash(mode);
    let mut c = gpu.new_cache(400).unwrap();
    let a = gpu.forward(c.as_mut(), long, Output::AllLogits).unwrap();
    let mut c = gpu.new_cache(400).unwrap();
    let b = gpu.forward(c.as_mut(), &ids[..100], Output::AllLogits).unwrap();
    let d = gpu.forward(c.as_mut(), &ids[100..], Output::AllLogits).unwrap();
    vec![a, b, d]
}

/// Prefill through flash.cu (f32 kernel narrow and wide, tensor-core kernel
/// split and plain f16) against the split-K attention, both cache types, on
/// tiny (4 query heads on 2 KV heads, hd 64): 300 tokens from an empty cache
/// (a partial last query tile), then 100 + 137 tokens (the second call
/// starts at p0 = 100, mid key tile). The f32 and split kernels differ from
/// split-K only in float summation order / ~2^-22 input rounding
/// (tests/cuda_kernels.rs holds them to 2e-5 / 5e-5 of an f64 reference), so
/// most tokens agree to 1e-3; but int8 codes downstream may flip (random
/// ternary models are flip prone, see `close`), moving a token's logits by up
/// to ~0.04, hence the flip-prone limits plus "most tokens within 1e-3".
/// Plain f16 (Tc16, and Tcx16: `flash_tcx16_*` for the calls of 64+ tokens
/// on the f32 cache) rounds Q, K, V and P to f16 and is held to the
/// flip-prone limits only. TcxPv (`flash_tcxv_*`, `flash_wg_*` on sm_90a,
/// Auto's choice for 64+ tokens: Q K in plain f16, P V split) too, and its mean |dlogit| on each
/// F32-cache prefill must stay under 3/4 of Tcx16's (S24-5: 2.6e-3 against
/// 5.2e-3 on the 300 tokens; a P V that lost its lo part would match Tcx16).
/// The P V split kernel of tiny's head dim (64) Auto runs: `flash_wg_d64`
/// (wgmma) on sm_90a, a `flash_tcxv_d64_*` elsewhere.
fn is_pv_kernel(gpu: &CudaBackend, name: &str) -> bool {
    if gpu.gpu().arch == "sm_90a" {
        name == "flash_wg_d64"
    } else {
        name.starts_with("flash_tcxv_d64_")
    }
}

#[test]
fn flash_prefill_matches_split_k() {
    let (model, ids, long) = flash_prefill_inputs();
    let vocab = model.config.vocab;
    for kv in [KvDtype::F32, KvDtype::F16] {
        let Some(gpu) = cuda_kv(&model, kv) else { return };
        if std::env::var("YINSEN_DEVICE").is_ok_and(|v| v == "1") {
            assert!(gpu.uses_flash(), "flash prefill unavailable on the device");
        }
        // The default on sm_80+ is the split tensor-core kernel.
        let tc = gpu.gpu().has_mma();
        let auto = gpu.flash_kernel_name().unwrap_or("none");
        assert_eq!(auto.starts_with("flash_tc_d128_"), tc, "{kv:?}: Auto runs {auto}");
        let run = |mode: FlashMode| flash_prefills(&gpu, mode, &long, &ids);
        let want = run(FlashMode::Off);
        let mut plain_means = Vec::new();
        for mode in [
            FlashMode::F32,
            FlashMode::Wide,
            FlashMode::Tc,
            FlashMode::Tc16,
            FlashMode::TcStaged,
            FlashMode::Tcx16,
            FlashMode::TcxPv,
        ] {
            gpu.set_flash(mode);
            if !gpu.uses_flash() {
                assert!(!tc, "{kv:?} {mode:?} unavailable on an sm_80+ device");
                continue;
            }
            if kv == KvDtype::F32 && tc {
                let name = gpu.attention_kernel_name(100).unwrap_or("none");
                match mode {
                    FlashMode::Tcx16 => assert!(name.starts_with("flash_tcx16_d64_"), "Tcx16 runs {name}"),
                    FlashMode::TcxPv => assert!(is_pv_kernel(&gpu, name), "TcxPv runs {name}"),
                    _ => {}
                }
            }
            let got = run(mode);
            for (case_i, (case, (g, w))) in ["300 from 0", "100 from 0", "137 from 100"]
                .iter()
                .zip(got.iter().zip(&want))
                .enumerate()
            {
                let what = format!("{kv:?} {mode:?} prefill {case}");
                let (mean, tight, tokens) = close_tokens(g, w, vocab, &what);
                let tcx = kv == KvDtype::F32 && tc;
                match mode {
                    FlashMode::Tcx16 if tcx => plain_means.push(mean),
                    FlashMode::TcxPv if tcx => {
                        let plain = plain_means[plain_means.len() - 3 + case_i];
                        assert!(
                            mean <= 0.75 * plain,
                            "{what}: mean |dlogit| {mean}, plain f16's {plain}"
                        );
                        continue;
                    }
                    _ => {}
                }
                if matches!(mode, FlashMode::Tc16 | FlashMode::Tcx16 | FlashMode::TcxPv) {
                    continue; // `close`'s flip-prone limits only
                }
                assert!(mean <= 1e-3, "{what}: mean |dlogit| {mean}");
                assert!(2 * tight >= tokens, "{what}: only {tight}/{tokens} tokens within 1e-3");
            }
        }
        gpu.set_flash(FlashMode::Auto);
    }
}

/// The tensor-core flash attention with its key range split over blocks
/// (CudaBackend::key_splits; automatic, forced 3 and 16) against the
/// un-split kernel (forced 1), both caches, on tiny (4 query heads on 2 KV
/// heads, hd 64): an 800-token prefill, then 5, 16 and 64 tokens twice (the
/// batched steps the split is for), all logits, each split call from the
/// un-split run's cache before it. The split only reorders float sums
/// (kernel level: within 2e-5 of the un-split result), so most tokens agree
/// to 1e-3; int8 codes may still flip downstream, hence the flip-prone
/// limits of `close`.
#[test]
fn flash_key_split_matches_unsplit() {
    let model = synthetic::build("tiny").unwrap();
    let vocab = model.config.vocab;
    let ids = prompt(800 + 2 * (5 + 16 + 64), vocab);
    for (kv, mode) in [
        (KvDtype::F32, FlashMode::Tc),
        (KvDtype::F32, FlashMode::TcStaged),
        (KvDtype::F16, FlashMode::Tc),
    ] {
        let Some(gpu) = cuda_kv(&model, kv) else { return };
        gpu.set_flash(mode);
        if !gpu.uses_flash() {
            assert!(!gpu.gpu().has_mma(), "{kv:?}: {mode:?} unavailable on an sm_80+ device");
            return;
        }
        assert!(
            gpu.key_splits(16) > 1,
            "tiny's 4 heads leave SMs idle: expected a key split"
        );
        // Every call of a split variant starts from the un-split run's cache
        // before that call (exported and imported): tiny is flip-prone, and
        // one int8 code flipped by a reordered sum would otherwise carry into
        // every later call's cache and logits.
        // tiny's max_ctx is 1024: 800 + 2 x (5 + 16 + 64) = 970 tokens.
        let calls = [800usize, 5, 16, 64, 5, 16, 64];
        gpu.set_key_splits(1);
        let mut c = gpu.new_cache(1000).unwrap();
        let (mut at, mut want, mut before) = (0, Vec::new(), Vec::new());
        for nt in calls {
            before.push(gpu.export_kv(c.as_mut()).unwrap());
            want.push(gpu.forward(c.as_mut(), &ids[at..at + nt], Output::AllLogits).unwrap());
            at += nt;
        }
        for n_ks in [0usize, 3, 16] {
            let mut at = calls[0];
            for (i, &nt) in calls.iter().enumerate().skip(1) {
                let mut c = gpu.import_kv(&before[i], 1000).unwrap();
                gpu.set_key_splits(n_ks);
                let got = gpu.forward(c.as_mut(), &ids[at..at + nt], Output::AllLogits).unwrap();
                gpu.set_key_splits(1);
                at += nt;
                let what = format!("{kv:?} {mode:?} n_ks {n_ks} call {i}");
                let (mean, tight, tokens) = close_tokens(&got, &want[i], vocab, &what);
                assert!(mean <= 1e-3, "{what}: mean |dlogit| {mean}");
                assert!(2 * tight >= tokens, "{what}: only {tight}/{tokens} tokens within 1e-3");
            }
        }
        gpu.set_key_splits(0);
        gpu.set_flash(FlashMode::Auto);
    }
}

/// A call right after `import_kv` sees the whole imported cache. The import
/// once copied with a synchronous cuMemcpyHtoD from pageable memory, which
/// returns before its DMA lands, on the legacy stream that the backend's
/// non-blocking stream does not wait for: the next call's kernels could read
/// the cache's last bytes before they arrived (S20-2: a 5-token call after an
/// import, mean |dlogit| 0.385). Every repeat must give the first one's
/// logits; the cache holds the whole context, so the copy has a long tail.
#[test]
fn call_after_import_sees_the_whole_cache() {
    let model = synthetic::build("tiny").unwrap();
    let Some(gpu) = cuda(&model) else { return };
    let vocab = model.config.vocab;
    let cap = model.config.max_ctx;
    let ids = prompt(cap, vocab);
    let mut c = gpu.new_cache(cap).unwrap();
    let keep = cap - 16;
    gpu.forward(c.as_mut(), &ids[..keep], Output::LastLogits).unwrap();
    let snap = gpu.export_kv(c.as_mut()).unwrap();
    let want = gpu
        .forward(c.as_mut(), &ids[keep..keep + 5], Output::AllLogits)
        .unwrap();
    assert!(want.iter().all(|v| v.is_finite()));
    for round in 0..20 {
        let mut c = gpu.import_kv(&snap, cap).unwrap();
        let got = gpu
            .forward(c.as_mut(), &ids[keep..keep + 5], Output::AllLogits)
            .unwrap();
        let d = max_abs(&got, &want);
        assert!(
            d <= 1e-4,
            "round {round}: max |dlogit| {d} against the first call after the import"
        );
    }
}

/// The oracle checks of tests/fixture_oracle.rs for one prompt, with greedy
/// decoding on the device (`generate_greedy`). The f32 cache is held to the
/// fixture's tolerances.json limits exactly; the f16 cache to the flip-prone
/// limits at least (rounding V to f16, rel. 5e-4, flips int8 activation
/// codes: 1.8e-2 on bos_only).
fn check_prompt(gpu: &Arc<CudaBackend>, p: &serde_json::Value, kv: KvDtype) {
    let name = p["name"].as_str().unwrap();
    let ids = json_ids(&p["ids"]);
    let (n, vocab) = (ids.len(), gpu.config().vocab);
    let lim = match kv {
        KvDtype::F32 => Limits::of(name),
        KvDtype::F16 => Limits::of(name).flip_prone(),
    };
    let what = format!("{kv:?} cache");
    let mut cache = gpu.new_cache(n + 20).unwrap();
    let all = gpu.forward(cache.as_mut(), &ids, Output::AllLogits).unwrap();
    let r = check_logits(&what, name, &all, n, vocab, &lim);
    println!("{what} {name}: n={n} max |dlogit| {:.3e} mean {:.3e}", r.max, r.mean);
    let first = argmax(&all[(n - 1) * vocab..]) as u32;
    let mut got = vec![first];
    got.extend(gpu.generate_greedy(cache.as_mut(), first, 15).unwrap());
    check_greedy(&what, name, &got);
    // The engine's greedy loop: each step's token picked on the device
    // (`forward_greedy`), the same tokens.
    let mut s = Session::new(gpu.clone(), n + 20).unwrap();
    let params = GenParams {
        max_new: got.len(),
        sampler: SamplerConfig::greedy(),
        stop_ids: vec![],
    };
    let (via_session, _, _) = s.generate(&ids, &params, |_| Ok(true)).unwrap();
    assert_eq!(
        via_session, got,
        "{what} {name}: session (forward_greedy) vs generate_greedy"
    );
}

#[test]
fn fixture_logits_match_transformers() {
    let (label, spec) = common::tiny_a_formats().remove(2); // TQ2_0
    let loaded = formats::load(&spec, &LoadOptions::default()).unwrap();
    println!("fixture format: {label}");
    let prompts = read_json(tiny_a().join("expected/prompts.json"));
    for kv in [KvDtype::F32, KvDtype::F16] {
        let Some(gpu) = cuda_kv(&loaded.model, kv) else { return };
        let gpu = Arc::new(gpu);
        assert_eq!(gpu.kv_dtype(), kv);
        for p in prompts["prompts"].as_array().unwrap() {
            check_prompt(&gpu, p, kv);
        }
    }
}

/// The f16 cache holds half the bytes of the f32 one, and a backend refuses
/// a cache of the other element type.
#[test]
fn kv_dtype_bytes_and_mismatch() {
    let model = synthetic::build("tiny").unwrap();
    let Some(g32) = cuda_kv(&model, KvDtype::F32) else {
        return;
    };
    let Some(g16) = cuda_kv(&model, KvDtype::F16) else {
        return;
    };
    let (c32, mut c16) = (g32.new_cache(100).unwrap(), g16.new_cache(100).unwrap());
    let c = &model.config;
    let elems = 2 * c.n_layers * c.n_kv_heads * 100 * c.head_dim;
    assert_eq!(c32.resident_bytes(), 4 * elems);
    assert_eq!(c16.resident_bytes(), 2 * elems);
    let e = g32.forward(c16.as_mut(), &[1], Output::LastLogits).unwrap_err();
    assert!(e.to_string().contains("F16"), "{e}");
}

#[test]
fn bench_runs_on_tiny() {
    let model = synthetic::build("tiny").unwrap();
    let Some(gpu) = cuda(&model) else { return };
    let r = yinsen::backends::cuda::bench::bench(&gpu, Some(&model)).unwrap();
    println!("bench tiny: {}", serde_json::to_string(&r).unwrap());
    assert!(r.decode_tok_s_ctx0 > 0.0 && r.prefill_ms_512 > 0.0);
}

/// The real shape (synthetic weights): decode / prefill timings on the device.
#[test]
fn bench_2b4t_on_device() {
    if !common::device_only("bench_2b4t") {
        return;
    }
    let t = std::time::Instant::now();
    let model = synthetic::build("2b4t").unwrap();
    let build_s = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let Some(gpu) = cuda(&model) else { return };
    println!(
        "2b4t: build {build_s:.1}s, upload+compile {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let r = yinsen::backends::cuda::bench::bench(&gpu, Some(&model)).unwrap();
    println!("bench 2b4t: {}", serde_json::to_string(&r).unwrap());
}

/// A sequence moved between paths mid-inference (the dispatcher's KV move)
/// continues exactly as if it had stayed: CUDA prefill -> CPU decode and
/// CPU prefill -> CUDA decode, against an all-CPU run.
#[test]
fn kv_moves_between_cuda_and_cpu() {
    let model = std::sync::Arc::new(yinsen::model::synthetic::build("tiny").unwrap());
    let Some(gpu) = cuda(&model) else { return };
    let cpu = yinsen::backends::cpu::CpuBackend::new(model.clone(), "auto", 2).unwrap();
    let toks = prompt(24, model.config.vocab);
    let (pre, rest) = toks.split_at(20);
    let mut c = cpu.new_cache(64).unwrap();
    cpu.forward(c.as_mut(), pre, Output::LastLogits).unwrap();
    let want = cpu.forward(c.as_mut(), rest, Output::LastLogits).unwrap();

    // CUDA prefill, move to CPU, CPU continues.
    let mut g = gpu.new_cache(64).unwrap();
    gpu.forward(g.as_mut(), pre, Output::LastLogits).unwrap();
    let snap = gpu.export_kv(g.as_mut()).unwrap();
    assert_eq!(snap.len, 20);
    let mut moved = cpu.import_kv(&snap, 64).unwrap();
    let got = cpu.forward(moved.as_mut(), rest, Output::LastLogits).unwrap();
    let d1 = max_abs(&got, &want);

    // CPU prefill, move to CUDA, CUDA continues.
    let mut c2 = cpu.new_cache(64).unwrap();
    cpu.forward(c2.as_mut(), pre, Output::LastLogits).unwrap();
    let snap = cpu.export_kv(c2.as_mut()).unwrap();
    let mut moved = gpu.import_kv(&snap, 64).unwrap();
    assert_eq!(moved.len(), 20);
    let got = gpu.forward(moved.as_mut(), rest, Output::LastLogits).unwrap();
    let d2 = max_abs(&got, &want);
    println!("kv move: cuda->cpu max |dlogit| {d1:.2e}, cpu->cuda {d2:.2e}");
    assert!(d1 < 0.1 && d2 < 0.1, "{d1} {d2}");
}

/// The persistent one-launch decode (mega.cu) against the per-kernel decode
/// graph and the CPU backend on the same weights and token stream. The
/// norms reduce in another order, so int8 codes may flip: on tiny the two
/// GPU paths must agree to the flip-prone limits; on every shape the
/// persistent path must be about as close to the CPU as the per-kernel one
/// (mean and max |dlogit| at most 2x + a small floor). 80 steps cross the
/// 64-key attention chunk, so the multi-chunk merge runs too. Shapes: tiny
/// (2 query heads per KV head) and 125m (12 layers, no grouping).
#[test]
fn mega_decode_matches_per_kernel_decode() {
    for shape in ["tiny", "125m"] {
        let model = synthetic::build(shape).unwrap();
        let Some(gpu) = cuda(&model) else { return };
        if !path_in_use(gpu.uses_mega(), &format!("{shape}: the persistent decode")) {
            return;
        }
        let vocab = model.config.vocab;
        let ids = prompt(10, vocab);
        let stream = fixed_stream(80, vocab);
        let decode = |b: &dyn Backend| decode_stream(b, 200, &ids, &stream);
        let cpu = CpuBackend::new(Arc::new(model.clone()), "auto", 4).unwrap();
        let want = decode(&cpu);
        gpu.set_mega(true);
        let mega = decode(&gpu);
        gpu.set_mega(false);
        let kern = decode(&gpu);
        gpu.set_mega(true);
        let err = |got: &[Vec<f32>]| -> (f32, f32) {
            let all: Vec<f32> = got.concat();
            let w: Vec<f32> = want.concat();
            let mean = all.iter().zip(&w).map(|(a, b)| (a - b).abs()).sum::<f32>() / w.len() as f32;
            assert!(all.iter().all(|v| v.is_finite()), "{shape}: non-finite logits");
            (max_abs(&all, &w), mean)
        };
        let (m_max, m_mean) = err(&mega);
        let (k_max, k_mean) = err(&kern);
        println!(
            "{shape}: 80 decode steps vs CPU: persistent max {m_max:.3e} mean {m_mean:.3e}; per-kernel max {k_max:.3e} mean {k_mean:.3e}"
        );
        assert!(
            m_mean <= 2.0 * k_mean + 2e-3 && m_max <= 2.0 * k_max + 2e-2,
            "{shape}: persistent decode is further from the CPU than the per-kernel decode"
        );
        if shape == "tiny" {
            for (i, (m, k)) in mega.iter().zip(&kern).enumerate() {
                close(m, k, vocab, &format!("{shape} persistent vs per-kernel step {i}"));
            }
        }
    }
}

/// The persistent decode after a long context, where its attention items
/// hold more keys than the K staging takes, so the scores read K from global
/// memory: on 125m (head_dim 64, 11 blocks per KV head on 132 SMs) items
/// take ceil(keys / 11) keys, and K and V of more than 128 keys overflow the
/// 64 KB staging buffer, so 1500 keys (137 per item) take that path. Every
/// step close to the per-kernel decode's (125m's flip-prone bounds, as in
/// `mega_multi_matches_per_kernel_step`). (800 keys did not reach it: a
/// kernel reading K one row off passed, S20-8.) 2b4t-2l (2B4T's heads: 26
/// chunks per KV head, so no head split and a group of 4 query heads an
/// item, the only test shape that has one) after 2000 keys: 77 keys an item,
/// whose K and V overflow the staging together.
#[test]
fn mega_decode_after_a_long_context() {
    for (shape, n) in [("125m", 1500), ("2b4t-2l", 2000)] {
        let model = synthetic::build(shape).unwrap();
        let Some(gpu) = cuda(&model) else { return };
        if !path_in_use(gpu.uses_mega(), &format!("{shape}: the persistent decode")) {
            return;
        }
        let vocab = model.config.vocab;
        let ids = prompt(n, vocab);
        let stream = fixed_stream(6, vocab);
        let decode = |mega: bool| {
            gpu.set_mega(mega);
            decode_stream(&gpu, n + 100, &ids, &stream)
        };
        let kern = decode(false);
        let mega = decode(true);
        for (i, (m, k)) in mega.iter().zip(&kern).enumerate() {
            assert!(m.iter().all(|v| v.is_finite()), "{shape} step {i}: non-finite logits");
            let d = max_abs(m, k);
            let mean = m.iter().zip(k).map(|(a, b)| (a - b).abs()).sum::<f32>() / m.len() as f32;
            println!("{shape} after {n} tokens, step {i}: persistent vs per-kernel max {d:.3e} mean {mean:.3e}");
            assert!(
                d <= 0.25 && mean <= 0.02,
                "{shape} step {i}: max |dlogit| {d}, mean {mean}"
            );
        }
    }
}

/// The persistent multi-token step (mega_multi.cu) against the per-kernel
/// multi-token body and the CPU: every token's logits of calls of 2..=16
/// tokens (odd counts, one and two n8 tiles), 74 positions in all, so the
/// attention crosses a 64-key chunk and merges. Each call starts from the
/// CPU's cache (exported and imported), so an int8 rounding flip in one
/// call does not carry into the next. On tiny every call must be close to
/// the CPU (the flip-prone bounds of `close`). 125m (12 layers, no
/// grouping) flips more: one int8 flip inside a call moves the call's later
/// tokens by up to ~0.11 (runs S6-5 to S6-7, after a change of the CPU's
/// attention float order), so there every token stays within 0.25 and the
/// mean over the sequence within 0.02. Everywhere, the persistent body is on
/// average no further from the CPU than the per-kernel one (2x + a small
/// floor). KV caches f32 and f16.
#[test]
fn mega_multi_matches_per_kernel_step() {
    for (shape, kv) in [("tiny", KvDtype::F32), ("tiny", KvDtype::F16), ("125m", KvDtype::F32)] {
        let model = synthetic::build(shape).unwrap();
        let Some(gpu) = cuda_kv(&model, kv) else { return };
        if !path_in_use(
            gpu.uses_mega_multi(),
            &format!("{shape}: the persistent multi-token step"),
        ) {
            return;
        }
        let vocab = model.config.vocab;
        let ids = prompt(74, vocab);
        let calls = [10, 2, 5, 8, 9, 16, 3, 16, 5];
        assert_eq!(calls.iter().sum::<usize>(), ids.len());
        let cpu = CpuBackend::new(Arc::new(model.clone()), "auto", 4).unwrap();
        let mut cc = cpu.new_cache(128).unwrap();
        let (mut at, mut sum_m, mut sum_k) = (0, 0f32, 0f32);
        for n in calls {
            let toks = &ids[at..at + n];
            let snap = cpu.export_kv(cc.as_mut()).unwrap();
            let on_gpu = |multi: bool| {
                gpu.set_mega_multi(multi);
                let mut c = gpu.import_kv(&snap, 128).unwrap();
                gpu.forward(c.as_mut(), toks, Output::AllLogits).unwrap()
            };
            let (multi, kern) = (on_gpu(true), on_gpu(false));
            gpu.set_mega_multi(true);
            let want = cpu.forward(cc.as_mut(), toks, Output::AllLogits).unwrap();
            let what = format!("{shape} {kv:?}: call of {n} at {at}");
            let check = |got: &[f32], body: &str| {
                let what = format!("{what}, {body} vs CPU");
                if shape == "tiny" {
                    return close(got, &want, vocab, &what);
                }
                assert!(got.iter().all(|v| v.is_finite()), "{what}: non-finite logits");
                let (d, mean) = (max_abs(got, &want), mean_abs(got, &want));
                assert!(d <= 0.25, "{what}: max |dlogit| {d} (mean {mean})");
                (d, mean)
            };
            let (m_max, m_mean) = check(&multi, "persistent");
            let (k_max, k_mean) = check(&kern, "per-kernel");
            println!(
                "{what}: persistent max {m_max:.3e} mean {m_mean:.3e}; per-kernel max {k_max:.3e} mean {k_mean:.3e}"
            );
            sum_m += m_mean * n as f32;
            sum_k += k_mean * n as f32;
            at += n;
        }
        let (m_mean, k_mean) = (sum_m / at as f32, sum_k / at as f32);
        let bound = if shape == "tiny" { 0.01 } else { 0.02 };
        assert!(
            m_mean <= bound && k_mean <= bound,
            "{shape} {kv:?}: mean |dlogit| vs CPU over the sequence: persistent {m_mean:.3e}, per-kernel {k_mean:.3e}"
        );
        assert!(
            m_mean <= 2.0 * k_mean + 2e-3,
            "{shape} {kv:?}: the persistent multi-token step (mean {m_mean:.3e}) is further from the CPU than the per-kernel one ({k_mean:.3e})"
        );
    }
}

/// The 8-bit lm_head on the GPU decode step against the CPU with the same
/// Q8_0 copy (same weight bytes; the CPU also quantises the hidden state per
/// 32-block where VNNI runs, ~1e-2 in the logits, inside the flip-prone
/// limits), and against the GPU's own f16 lm_head (a real change in
/// the logits, bounded like the CPU's `q8_lm_head_error_on_fixtures`).
#[test]
fn q8_lm_head_decode_matches_cpu_q8() {
    use yinsen::backends::cpu::CpuOptions;
    let model = synthetic::build("tiny").unwrap();
    let Some(gpu) = cuda(&model) else { return };
    let vocab = model.config.vocab;
    let cpu = CpuBackend::with_options(
        Arc::new(model.clone()),
        &CpuOptions {
            threads: 2,
            lm_head_q8: true,
            ..CpuOptions::default()
        },
    )
    .unwrap();
    let ids = prompt(12, vocab);
    let stream = fixed_stream(30, vocab);
    let decode = |b: &dyn Backend| decode_stream(b, 64, &ids, &stream);
    let f16 = decode(&gpu);
    assert!(!gpu.set_lm_head_q8(Some(model.lm_head())).unwrap());
    let q8 = decode(&gpu);
    let want = decode(&cpu);
    gpu.set_lm_head_q8(None).unwrap();
    let mut worst = (0f32, 0f32);
    for (i, ((g, c), f)) in q8.iter().zip(&want).zip(&f16).enumerate() {
        let (d, _) = close(g, c, vocab, &format!("q8 lm_head step {i} vs CPU q8"));
        worst.0 = worst.0.max(d);
        let dq = max_abs(g, f);
        let mean = g.iter().zip(f).map(|(a, b)| (a - b).abs()).sum::<f32>() / vocab as f32;
        assert!(dq <= 0.1 && mean <= 0.01, "step {i}: q8 vs f16 lm_head {dq} / {mean}");
        worst.1 = worst.1.max(dq);
    }
    println!(
        "q8 lm_head decode: vs CPU q8 max {:.3e}; vs f16 lm_head max {:.3e}",
        worst.0, worst.1
    );
    assert!(worst.1 > 0.0, "the 8-bit lm_head should change the logits somewhere");
}

/// Two backends (two streams) running the persistent decode at the same
/// time: its grid barriers need every block resident, which the cooperative
/// launch guarantees; a partial-residency deadlock would trip the watchdog.
#[test]
fn two_backends_decode_concurrently() {
    let model = Arc::new(synthetic::build("125m").unwrap());
    if cuda(&model).is_none() {
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    for seed in 0..2u64 {
        let (model, tx) = (model.clone(), tx.clone());
        std::thread::spawn(move || {
            let gpu = CudaBackend::new(&model, 0).unwrap();
            let mut c = gpu.new_cache(256).unwrap();
            let vocab = model.config.vocab as u64;
            let mut last = Vec::new();
            for i in 0..200u64 {
                let tok = ((i * 7919 + 13 + seed * 101) % vocab) as u32;
                last = gpu.forward(c.as_mut(), &[tok], Output::LastLogits).unwrap();
            }
            tx.send(last.iter().all(|v| v.is_finite())).unwrap();
        });
    }
    for _ in 0..2 {
        let ok = rx
            .recv_timeout(std::time::Duration::from_secs(120))
            .expect("concurrent persistent decodes did not finish (deadlock?)");
        assert!(ok, "non-finite logits");
    }
}

fn step_graphs(c: &mut dyn yinsen::backends::KvCache) -> usize {
    c.as_any_mut()
        .downcast_mut::<yinsen::backends::cuda::CudaCache>()
        .expect("a CUDA cache")
        .step_graph_count()
}

/// Calls of 2..=16 tokens replay a captured graph per (token count, output,
/// attention kernel, split bucket), captured on a key's second use: logits
/// are bit-equal to the un-graphed launches of the same kernels (flash and
/// split-K attention, f32 and f16 caches) at position 0, after a prefill, on
/// first use (un-graphed), capture and replays, after the split-K count
/// crosses a bucket (65 and 129 keys), all logits over two head launches,
/// and after the graph list evicts; graphed logits also stay close to the CPU's.
#[test]
fn step_graph_matches_ungraphed() {
    let model = synthetic::build("tiny").unwrap();
    let vocab = model.config.vocab;
    let cpu = CpuBackend::new(Arc::new(model.clone()), "auto", 2).unwrap();
    let (l, a) = (Output::LastLogits, Output::AllLogits);
    let mut calls: Vec<(usize, Output)> = Vec::new();
    for (nt, out, times) in [
        (2, l, 3),
        (5, a, 3),
        (16, l, 3),
        (5, l, 3),
        (16, l, 4),
        (2, a, 2),
        (12, a, 2),
        (16, a, 2),
    ] {
        calls.extend(std::iter::repeat_n((nt, out), times));
    }
    // Eight more token counts, each captured (more graphs than a cache keeps), then 2 again.
    for nt in 2..=9 {
        calls.extend([(nt, l), (nt, l)]);
    }
    calls.push((2, l));
    let total: usize = calls.iter().map(|c| c.0).sum();
    for (kv, flash) in [
        (KvDtype::F32, FlashMode::Auto),
        (KvDtype::F32, FlashMode::Off),
        (KvDtype::F16, FlashMode::Auto),
    ] {
        let Some(gpu) = cuda_kv(&model, kv) else { return };
        gpu.set_flash(flash);
        let flash_on = gpu.uses_flash();
        for prefill in [0usize, 70] {
            let ids = prompt(prefill + total, vocab);
            let what = format!("{kv:?} cache, flash {flash_on}, after {prefill} tokens");
            let (mut g, mut u) = (gpu.new_cache(400).unwrap(), gpu.new_cache(400).unwrap());
            let mut cc = cpu.new_cache(400).unwrap();
            if prefill > 0 {
                let p = &ids[..prefill];
                let gl = gpu.forward(g.as_mut(), p, l).unwrap();
                assert_eq!(gl, gpu.forward(u.as_mut(), p, l).unwrap(), "{what}: prefill");
                cpu.forward(cc.as_mut(), p, l).unwrap();
            }
            let mut at = prefill;
            // What the cache should hold, least recently used first: graphs,
            // and keys used once (split bucket only for split-K).
            let (mut graphs, mut seen): (Vec<(usize, bool, usize)>, Vec<_>) = (Vec::new(), Vec::new());
            let (mut replays, mut widest) = (0, 0);
            for (i, &(nt, out)) in calls.iter().enumerate() {
                let t = &ids[at..at + nt];
                gpu.set_step_graphs(true);
                let got = gpu.forward(g.as_mut(), t, out).unwrap();
                gpu.set_step_graphs(false);
                let want = gpu.forward(u.as_mut(), t, out).unwrap();
                let c = cpu.forward(cc.as_mut(), t, out).unwrap();
                let rows = if out == a { nt } else { 1 };
                assert_eq!(
                    (got.len(), want.len()),
                    (rows * vocab, rows * vocab),
                    "{what}: call {i}"
                );
                let same = got.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{what}: call {i} ({nt} tokens at {at}): graph != un-graphed");
                close(&got, &c, vocab, &format!("{what}: call {i} vs CPU"));
                let splits = if flash_on {
                    0
                } else {
                    (at + nt).div_ceil(64).next_power_of_two()
                };
                let key = (nt, out == a, splits);
                if let Some(k) = graphs.iter().position(|k| *k == key) {
                    graphs.remove(k);
                    graphs.push(key);
                    replays += 1;
                } else if let Some(k) = seen.iter().position(|k| *k == key) {
                    seen.remove(k);
                    if graphs.len() == 8 {
                        graphs.remove(0);
                    }
                    graphs.push(key);
                    widest = widest.max(splits);
                } else {
                    if seen.len() == 8 {
                        seen.remove(0);
                    }
                    seen.push(key);
                }
                assert_eq!(step_graphs(g.as_mut()), graphs.len(), "{what}: graphs after call {i}");
                assert_eq!(step_graphs(u.as_mut()), 0, "{what}: graphs with step graphs off");
                at += nt;
            }
            assert_eq!(g.len(), at);
            println!("{what}: {} calls, {replays} replays", calls.len());
            assert!(replays >= 4, "{what}: only {replays} replays");
            // A split-K graph past the first bucket (a recapture), and a full list.
            assert!(flash_on || widest > 1, "{what}: no split crossing");
            assert_eq!(graphs.len(), 8, "{what}: eviction not exercised");
        }
    }
}

/// `flash_wg3_d64` (three warpgroups a block: Auto's P V split kernel for
/// calls of TCX_SHORT_NT+ tokens on sm_90a) against `flash_wg_d64` (two, the
/// shorter calls') on tiny: 300 tokens, then 100 + 137. With one key split
/// each query row runs the same tiles in the same order, only in another
/// block, so the logits are bit-identical.
#[test]
fn wg3_prefill_matches_wg() {
    let (model, ids, long) = flash_prefill_inputs();
    let Some(gpu) = cuda(&model) else { return };
    if gpu.gpu().arch != "sm_90a" {
        common::skip_cuda(&format!("flash_wg*: needs sm_90a, this GPU is {}", gpu.gpu().arch));
        return;
    }
    gpu.set_key_splits(1);
    gpu.set_flash(FlashMode::TcxPv);
    let two = gpu.attention_kernel_name(300);
    let want = flash_prefills(&gpu, FlashMode::TcxPv, &long, &ids);
    let short_nt = gpu.set_tcx_short_tokens(0);
    let three = gpu.attention_kernel_name(300);
    let got = flash_prefills(&gpu, FlashMode::TcxPv, &long, &ids);
    gpu.set_tcx_short_tokens(short_nt);
    gpu.set_key_splits(0);
    gpu.set_flash(FlashMode::Auto);
    assert_eq!(two, Some("flash_wg_d64"));
    assert_eq!(three, Some("flash_wg3_d64"));
    for (case, (g, w)) in ["300 from 0", "100 from 0", "137 from 100"]
        .iter()
        .zip(got.iter().zip(&want))
    {
        assert!(g.iter().all(|x| x.is_finite()), "{case}: non-finite logits");
        let d = max_abs(g, w);
        assert!(g == w, "{case}: flash_wg3_d64 vs flash_wg_d64: max |dlogit| {d}");
    }
}

/// Prefill through `kv_split_f32` + `flash_tcx_*` (FlashMode::Tcx; Auto takes
/// its `flash_tcxv_*` twin, `flash_wg_*` on sm_90a, for calls of TCX_MIN_NT tokens or more) against the old split
/// kernel (FlashMode::Tc) on tiny (4 query heads on 2 KV heads, hd 64: the
/// default d64 instantiation): 300 tokens from an empty cache, then 100 + 137
/// tokens (p0 = 100, mid key tile). With one key split forced the two run
/// the same arithmetic, so the logits agree to 1e-4 (normally bit for bit);
/// with the automatic key splits (different counts: the new kernel's grid
/// differs) within `close_tokens`' limits as flash_prefill_matches_split_k.
/// Calls under TCX_MIN_NT tokens take the old kernel.
#[test]
fn tcx_prefill_matches_tc() {
    use yinsen::backends::cuda::TCX_MIN_NT;
    let (model, ids, long) = flash_prefill_inputs();
    let vocab = model.config.vocab;
    let Some(gpu) = cuda(&model) else { return };
    gpu.set_flash(FlashMode::Tcx);
    let name = gpu.attention_kernel_name(300).unwrap_or("none");
    if !path_in_use(name.starts_with("flash_tcx_"), "flash_tcx") {
        gpu.set_flash(FlashMode::Auto);
        return;
    }
    assert!(name.starts_with("flash_tcx_d64_"), "{name}");
    assert!(!gpu
        .attention_kernel_name(TCX_MIN_NT - 1)
        .unwrap_or("")
        .starts_with("flash_tcx_"));
    gpu.set_flash(FlashMode::TcxPv);
    let pv = gpu.attention_kernel_name(300);
    gpu.set_flash(FlashMode::Auto);
    assert_eq!(gpu.attention_kernel_name(300), pv, "Auto runs flash_tcxv");
    assert!(pv.is_some_and(|n| is_pv_kernel(&gpu, n)), "{pv:?}");
    let run = |mode: FlashMode| flash_prefills(&gpu, mode, &long, &ids);
    // Both variants: the short-call one (w4 under 1024 tokens, every call
    // here) and, with no call short, the long-call one (h1).
    let short_nt = gpu.set_tcx_short_tokens(0);
    gpu.set_flash(FlashMode::Tcx);
    let long_name = gpu.attention_kernel_name(300);
    gpu.set_tcx_short_tokens(short_nt);
    let short_name = gpu.attention_kernel_name(300);
    gpu.set_flash(FlashMode::Auto);
    assert_ne!(long_name, short_name, "one flash_tcx variant for every call");
    for (short, n_ks) in [(short_nt, 1usize), (short_nt, 0), (0, 1), (0, 0)] {
        gpu.set_tcx_short_tokens(short);
        gpu.set_key_splits(n_ks);
        let want = run(FlashMode::Tc);
        let got = run(FlashMode::Tcx);
        let kernel = if short == 0 { long_name } else { short_name };
        for (case, (g, w)) in ["300 from 0", "100 from 0", "137 from 100"]
            .iter()
            .zip(got.iter().zip(&want))
        {
            let what = format!("Tcx ({kernel:?}) vs Tc, key splits {n_ks}, prefill {case}");
            if n_ks == 1 {
                let d = max_abs(g, w);
                println!("{what}: max |dlogit| {d:.3e} (bit-identical: {})", g == w);
                assert!(d <= 1e-4, "{what}: max |dlogit| {d}");
            } else {
                let (mean, tight, tokens) = close_tokens(g, w, vocab, &what);
                assert!(mean <= 1e-3, "{what}: mean |dlogit| {mean}");
                assert!(2 * tight >= tokens, "{what}: only {tight}/{tokens} tokens within 1e-3");
            }
        }
    }
    gpu.set_key_splits(0);
    gpu.set_tcx_short_tokens(short_nt);
    gpu.set_flash(FlashMode::Auto);
}

/// `forward_top_k` ranks on the device as the host sampler ranks the logits
/// (`ranked`): the same tokens and logit bits, step after step, for k from 1
/// to the largest offered, over a vocabulary of 16 selection blocks (125m);
/// through the full head's logits and through the screened top-k (8-bit
/// head, floor, the F16 rows that can reach it), which must not fall back
/// to the full head and must leave out most rows.
#[test]
fn top_k_on_the_device_matches_the_host_ranking() {
    let model = synthetic::build("125m").unwrap();
    let Some(gpu) = cuda(&model) else { return };
    let vocab = model.config.vocab as u32;
    let prompt = spread_prompt(&model);
    for screen in [false, true] {
        gpu.set_lm_head_screen(screen.then(|| model.lm_head())).unwrap();
        for k in [1usize, 5, 40, 64] {
            let (mut a, mut b) = (prompted(&gpu, &prompt, 64), prompted(&gpu, &prompt, 64));
            let mut tok = 7u32;
            for step in 0..6 {
                let logits = gpu.forward(a.as_mut(), &[tok], Output::LastLogits).unwrap();
                let want = ranked(&logits, k);
                let got = gpu
                    .forward_top_k(b.as_mut(), tok, k)
                    .unwrap()
                    .expect("offered for k <= 64");
                assert_eq!(got.len(), k, "screen {screen} k {k} step {step}");
                for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        (g.0, g.1.to_bits()),
                        (w.0, w.1.to_bits()),
                        "screen {screen} k {k} step {step} rank {j}"
                    );
                }
                if screen {
                    let (cand, fell_back) = gpu.screen_last_pick().unwrap().expect("a screened step ran");
                    assert!(
                        !fell_back && cand >= k as u32 && cand < vocab / 2,
                        "k {k} step {step}: {cand} candidates"
                    );
                    eprintln!("screened top-{k} step {step}: {cand} candidate rows of {vocab}");
                }
                // Not always the best token, so the steps differ from greedy.
                tok = want[want.len() / 2].0;
            }
        }
        assert_eq!(gpu.screen_top_k_fallbacks(), 0, "no step fell back to the full head");
    }
    let mut c = gpu.new_cache(16).unwrap();
    assert!(gpu.forward_top_k(c.as_mut(), 3, 65).unwrap().is_none());
    assert!(gpu.forward_top_k(c.as_mut(), 3, 0).unwrap().is_none());
    assert_eq!(c.len(), 0, "nothing ran for a k not offered");
}

/// A step whose screen sees a non-finite value (final norm weights at
/// f32::MAX overflow the normed x) falls back to the full head and ranks
/// as the host ranks its logits, non-finite ones included.
#[test]
fn screened_top_k_falls_back_on_non_finite_values() {
    let mut model = synthetic::build("125m").unwrap();
    for i in (3..model.config.hidden).step_by(48) {
        model.final_norm[i] = f32::MAX;
    }
    let Some(gpu) = cuda(&model) else { return };
    gpu.set_lm_head_screen(Some(model.lm_head())).unwrap();
    let prompt = spread_prompt(&model);
    let (mut a, mut b) = (prompted(&gpu, &prompt, 16), prompted(&gpu, &prompt, 16));
    let mut tok = 5u32;
    for step in 0..3 {
        let logits = gpu.forward(a.as_mut(), &[tok], Output::LastLogits).unwrap();
        assert!(
            logits.iter().any(|v| !v.is_finite()),
            "step {step}: the case needs a non-finite logit"
        );
        let want = ranked(&logits, 40);
        let got = gpu.forward_top_k(b.as_mut(), tok, 40).unwrap().expect("offered");
        assert_eq!(pick_bits(&got), pick_bits(&want), "step {step}");
        tok = want[3].0;
    }
    assert_eq!(gpu.screen_top_k_fallbacks(), 3, "every step fell back");
}

/// The screened greedy pick (8-bit head + bound, then the F16 rows that can
/// still win) picks the full head's argmax, step after step: against the
/// full head's logits on a second cache (steps fed a middle-ranked token, so
/// the states vary), and `generate_greedy` with the screen on and off.
#[test]
fn screened_pick_on_the_device_is_the_full_heads_argmax() {
    let model = synthetic::build("125m").unwrap();
    let Some(gpu) = cuda(&model) else { return };
    assert!(
        !gpu.set_lm_head_screen(Some(model.lm_head())).unwrap(),
        "off by default"
    );
    let vocab = model.config.vocab as u32;
    let prompt = spread_prompt(&model);
    let (mut a, mut b) = (prompted(&gpu, &prompt, 96), prompted(&gpu, &prompt, 96));
    let mut tok = 11u32;
    for step in 0..40 {
        let logits = gpu.forward(a.as_mut(), &[tok], Output::LastLogits).unwrap();
        let want = argmax(&logits) as u32;
        let got = gpu.forward_greedy(b.as_mut(), tok).unwrap().expect("offered");
        assert_eq!(got, want, "step {step}");
        // The pick screened (no fallback) and left out most rows.
        let (cand, fell_back) = gpu.screen_last_pick().unwrap().expect("a screened pick ran");
        assert!(
            !fell_back && cand >= 1 && cand < vocab / 2,
            "step {step}: {cand} candidates"
        );
        tok = ranked(&logits, 9)[4].0;
    }
    let run = |screen: bool| {
        gpu.set_lm_head_screen(screen.then(|| model.lm_head())).unwrap();
        let mut c = prompted(&gpu, &prompt, 96);
        gpu.generate_greedy(c.as_mut(), 3, 48).unwrap()
    };
    let (on, off) = (run(true), run(false));
    assert_eq!(on, off);
    assert!(
        on.iter().collect::<std::collections::HashSet<_>>().len() > 1,
        "a varied run: {on:?}"
    );
}

/// Mutable views of a batch's caches, as `forward_batch` takes them.
fn refs(v: &mut [Box<dyn yinsen::backends::KvCache>]) -> Vec<&mut dyn yinsen::backends::KvCache> {
    v.iter_mut()
        .map(|c| c.as_mut() as &mut dyn yinsen::backends::KvCache)
        .collect()
}

/// A batched decode step on the GPU (one body call for several sequences,
/// each token's RoPE, cache row and attention in its own cache; through the
/// persistent multi-token kernel and through the per-kernel body) against
/// the CPU's batched step, which equals the CPU's one-sequence steps bit for
/// bit: sequences of different lengths (some past a 64-key chunk, so chunk
/// and split counts differ inside a launch), more sequences than one launch
/// takes (16 + 1), five rounds (graphs captured on a key's second use,
/// replayed on its third), then one-sequence steps over the caches the batch wrote;
/// the picks equal those ranked from the batch's logits; a full cache fails
/// the call before anything runs.
#[test]
fn batched_step_matches_cpu() {
    for (kv, multi) in [(KvDtype::F32, true), (KvDtype::F32, false), (KvDtype::F16, true)] {
        let model = synthetic::build("tiny").unwrap();
        let Some(gpu) = cuda_kv(&model, kv) else { return };
        if multi && !path_in_use(gpu.uses_mega_multi(), "the persistent multi-token step") {
            continue;
        }
        gpu.set_mega_multi(multi);
        let vocab = model.config.vocab;
        let cpu = CpuBackend::new(Arc::new(model.clone()), "auto", 2).unwrap();
        let ids = prompt(100, vocab);
        // 17 sequences: one launch of 16, one of 1.
        let lens: Vec<usize> = (0..17).map(|i| [5, 1, 23, 70, 9, 64, 2][i % 7] + i).collect();
        let fill = |be: &dyn Backend| -> Vec<Box<dyn yinsen::backends::KvCache>> {
            lens.iter()
                .map(|&n| {
                    let mut c = be.new_cache(128).unwrap();
                    be.forward(c.as_mut(), &ids[..n], Output::LastLogits).unwrap();
                    c
                })
                .collect()
        };
        let (mut gc, mut cc) = (fill(&gpu), fill(&cpu));
        let mut step: Vec<u32> = (0..lens.len() as u32).map(|i| (i * 97 + 3) % vocab as u32).collect();
        // Five rounds: a key's graph is captured on its second use and
        // replayed on its third.
        for round in 0..5 {
            // Rounds 1 and 3 run a batch of 3 (one launch); the others all 17.
            let n = if round % 2 == 1 { 3 } else { lens.len() };
            let got = {
                let mut r = refs(&mut gc[..n]);
                gpu.forward_batch(&mut r, &step[..n]).unwrap()
            };
            let want = {
                let mut r = refs(&mut cc[..n]);
                cpu.forward_batch(&mut r, &step[..n]).unwrap()
            };
            close_tokens(
                &got,
                &want,
                vocab,
                &format!("{kv:?} multi {multi} round {round}, {n} sequences"),
            );
            for i in 0..n {
                assert_eq!(gc[i].len(), cc[i].len());
                step[i] = argmax(&want[i * vocab..(i + 1) * vocab]) as u32;
            }
            // Sequences left out of round 1 catch up alone.
            for i in n..lens.len() {
                let g = gpu.forward(gc[i].as_mut(), &[step[i]], Output::LastLogits).unwrap();
                let w = cpu.forward(cc[i].as_mut(), &[step[i]], Output::LastLogits).unwrap();
                close(&g, &w, vocab, &format!("{kv:?} round {round}, sequence {i} alone"));
                step[i] = argmax(&w) as u32;
            }
        }
        // One-sequence steps over what the batches wrote into the caches.
        for i in [0, 3, 16] {
            let g = gpu.forward(gc[i].as_mut(), &[step[i]], Output::LastLogits).unwrap();
            let w = cpu.forward(cc[i].as_mut(), &[step[i]], Output::LastLogits).unwrap();
            close(&g, &w, vocab, &format!("{kv:?}: sequence {i} alone after the batches"));
        }
        // Greedy picks (the GPU's argmax of each row, the logit not given),
        // mixed picks of k <= 64 (the device's top-k per row) and mixed
        // picks with a k past it (ranked on the host): those ranked from the
        // same step's logits (separate caches in the same state).
        let (mut a, mut b, mut c, mut d) = (fill(&gpu), fill(&gpu), fill(&gpu), fill(&gpu));
        let argmaxes = {
            let mut r = refs(&mut c);
            gpu.forward_batch_pick(&mut r, &step, &vec![(1, true); lens.len()])
                .unwrap()
                .expect("offered")
        };
        let picks: Vec<(usize, bool)> = (0..lens.len())
            .map(|i| if i % 3 == 0 { (1, true) } else { (i, false) })
            .collect();
        let got = {
            let mut r = refs(&mut a);
            gpu.forward_batch_pick(&mut r, &step, &picks).unwrap().expect("offered")
        };
        let mut wide = picks.clone();
        wide[1] = (100, false);
        let got_wide = {
            let mut r = refs(&mut d);
            gpu.forward_batch_pick(&mut r, &step, &wide).unwrap().expect("offered")
        };
        let l = {
            let mut r = refs(&mut b);
            gpu.forward_batch(&mut r, &step).unwrap()
        };
        for (i, &(k, greedy)) in picks.iter().enumerate() {
            let li = &l[i * vocab..(i + 1) * vocab];
            assert_eq!(
                argmaxes[i][0].0,
                argmax(li) as u32,
                "{kv:?}: greedy pick of sequence {i}"
            );
            let want: Vec<(u32, u32)> = match greedy {
                true => vec![(argmax(li) as u32, li[argmax(li)].to_bits())],
                false => pick_bits(&ranked(li, k)),
            };
            assert_eq!(pick_bits(&got[i]), want, "{kv:?}: pick of sequence {i}");
            if i != 1 {
                assert_eq!(
                    pick_bits(&got_wide[i]),
                    want,
                    "{kv:?}: pick of sequence {i}, host ranking"
                );
            }
        }
        let want_wide = ranked(&l[vocab..2 * vocab], 100);
        assert_eq!(got_wide[1], want_wide, "{kv:?}: top-100 of sequence 1");
        // A full cache: an error, and no cache moved.
        let mut full = gpu.new_cache(1).unwrap();
        gpu.forward(full.as_mut(), &[1], Output::LastLogits).unwrap();
        let before = a[0].len();
        let mut r: Vec<&mut dyn yinsen::backends::KvCache> = vec![a[0].as_mut(), full.as_mut()];
        assert!(gpu.forward_batch(&mut r, &[1, 2]).is_err());
        assert_eq!(a[0].len(), before);
    }
}

/// A batched step's picks through the screened head (the 8-bit head read
/// once for all of the step's sequences, then each sequence's F16 rows that
/// can still win or reach its top-k floor) are the full head's: greedy picks
/// (token and logit bits) and top-k picks (k of 1, 5, 40 and 64, mixed with
/// greedy rows) against the ranking of the same step's logits, on caches in
/// the same state. Batches of 17 (launches of 16 and 1) and 3, five rounds
/// (graphs captured, then replayed); every token screened, no fallback, most
/// rows left out. Both pass 1 kernels: tensor cores (the default) and dp4a.
#[test]
fn batched_screened_picks_are_the_full_heads() {
    let model = synthetic::build("125m").unwrap();
    if let Some(gpu) = with_each_batch_pass1(&model, batched_screened_picks) {
        assert_eq!(gpu.screen_top_k_fallbacks(), 0, "no token fell back to the full head");
    }
}

/// A CUDA backend of `model` with the screened head on, `body` run with
/// each pass 1 of the batched screen; None (SKIP) without a GPU.
fn with_each_batch_pass1(model: &Model, body: fn(&CudaBackend, &Model, BatchPass1)) -> Option<CudaBackend> {
    let gpu = cuda(model)?;
    gpu.set_lm_head_screen(Some(model.lm_head())).unwrap();
    for pass1 in [BatchPass1::Mma, BatchPass1::Dp4a] {
        gpu.set_batch_pass1(pass1);
        body(&gpu, model, pass1);
    }
    Some(gpu)
}

/// Picks as (token, logit bits), for exact comparisons.
fn pick_bits(p: &[(u32, f32)]) -> Vec<(u32, u32)> {
    p.iter().map(|&(t, v)| (t, v.to_bits())).collect()
}

fn batched_screened_picks(gpu: &CudaBackend, model: &Model, pass1: BatchPass1) {
    let vocab = model.config.vocab;
    let ids = prompt(60, vocab);
    let lens: Vec<usize> = (0..17).map(|i| 3 + (i * 7) % 40).collect();
    let fill =
        || -> Vec<Box<dyn yinsen::backends::KvCache>> { lens.iter().map(|&n| prompted(gpu, &ids[..n], 96)).collect() };
    let (mut a, mut b, mut l) = (fill(), fill(), fill());
    let mut step: Vec<u32> = (0..17u32).map(|i| (i * 4099 + 11) % vocab as u32).collect();
    for round in 0..5 {
        let n = if round % 2 == 1 { 3 } else { 17 };
        let logits = gpu.forward_batch(&mut refs(&mut l[..n]), &step[..n]).unwrap();
        let greedy = gpu
            .forward_batch_pick(&mut refs(&mut a[..n]), &step[..n], &vec![(1, true); n])
            .unwrap()
            .expect("offered");
        let greedy_screen = gpu.batch_screen_last(n.min(16)).unwrap();
        let picks: Vec<(usize, bool)> = (0..n)
            .map(|i| match i % 5 {
                0 => (1, true),
                j => ([1, 5, 40, 64][(j + round) % 4], false),
            })
            .collect();
        let top = gpu
            .forward_batch_pick(&mut refs(&mut b[..n]), &step[..n], &picks)
            .unwrap()
            .expect("offered");
        let top_screen = gpu.batch_screen_last(n.min(16)).unwrap();
        // The last launch's tokens: the 17th sequence alone, or all 3.
        let last = if n == 17 { 16..17 } else { 0..n };
        for (j, i) in last.enumerate() {
            for (kind, (cand, fell_back)) in [("greedy", greedy_screen[j]), ("top-k", top_screen[j])] {
                assert!(
                    !fell_back && cand >= 1 && (cand as usize) < vocab / 2,
                    "{pass1:?} round {round} sequence {i} {kind}: {cand} candidate rows of {vocab}"
                );
            }
        }
        for i in 0..n {
            let li = &logits[i * vocab..(i + 1) * vocab];
            let t = argmax(li);
            assert_eq!(
                pick_bits(&greedy[i]),
                vec![(t as u32, li[t].to_bits())],
                "{pass1:?} round {round}: greedy pick of sequence {i}"
            );
            let want = ranked(li, picks[i].0);
            assert_eq!(
                pick_bits(&top[i]),
                pick_bits(&want),
                "{pass1:?} round {round}: pick {:?} of sequence {i}",
                picks[i]
            );
            // Not always the best token, so the sequences' states spread.
            step[i] = ranked(li, 9)[4 + i % 5].0;
        }
    }
}

/// A batched step whose screen sees a non-finite value (final norm weights
/// at f32::MAX overflow the normed x) falls back, token by token, to the
/// full head: greedy and top-40 picks as the host ranks the same step's
/// logits, non-finite ones included; both pass 1 kernels.
#[test]
fn batched_screened_picks_fall_back_on_non_finite_values() {
    let mut model = synthetic::build("125m").unwrap();
    for i in (3..model.config.hidden).step_by(48) {
        model.final_norm[i] = f32::MAX;
    }
    if let Some(gpu) = with_each_batch_pass1(&model, batched_screen_falls_back) {
        assert_eq!(gpu.screen_top_k_fallbacks(), 8, "every token fell back");
    }
}

fn batched_screen_falls_back(gpu: &CudaBackend, model: &Model, pass1: BatchPass1) {
    let vocab = model.config.vocab;
    let ids = prompt(20, vocab);
    let fill = || -> Vec<Box<dyn yinsen::backends::KvCache>> {
        (0..4).map(|i| prompted(gpu, &ids[..4 + 3 * i], 16)).collect()
    };
    let (mut a, mut b, mut l) = (fill(), fill(), fill());
    let step = [5u32, 77, 901, 3000];
    let logits = gpu.forward_batch(&mut refs(&mut l), &step).unwrap();
    assert!(
        logits.iter().any(|v| !v.is_finite()),
        "the case needs a non-finite logit"
    );
    let greedy = gpu
        .forward_batch_pick(&mut refs(&mut a), &step, &[(1, true); 4])
        .unwrap()
        .expect("offered");
    assert!(
        gpu.batch_screen_last(4).unwrap().iter().all(|s| s.1),
        "{pass1:?}: every token flagged"
    );
    let top = gpu
        .forward_batch_pick(&mut refs(&mut b), &step, &[(40, false); 4])
        .unwrap()
        .expect("offered");
    for i in 0..4 {
        let li = &logits[i * vocab..(i + 1) * vocab];
        // The GPU's argmax rule: the first row of the largest logit above
        // -inf (NaN never wins), else row 0.
        let first_max = (0..vocab).fold((f32::NEG_INFINITY, 0), |m, r| if li[r] > m.0 { (li[r], r) } else { m });
        assert_eq!(
            greedy[i][0].0, first_max.1 as u32,
            "{pass1:?}: greedy pick of sequence {i}"
        );
        let want = ranked(li, 40);
        assert_eq!(
            pick_bits(&top[i]),
            pick_bits(&want),
            "{pass1:?}: top-40 of sequence {i}"
        );
    }
}

/// The lm_head of 2-8 tokens through `lm_head_f16_rows` (4 rows a warp)
/// gives the bits of `lm_head_f16` (a row a warp) for every token: calls of
/// 2, 5 and 8 tokens (AllLogits) and a batched step of 7 sequences.
#[test]
fn lm_head_rows_kernel_gives_the_row_kernels_bits() {
    let model = synthetic::build("tiny").unwrap();
    let Some(gpu) = cuda(&model) else { return };
    let vocab = model.config.vocab;
    let ids = prompt(40, vocab);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let run = |rows: bool| -> Vec<Vec<f32>> {
        gpu.set_lm_head_rows(rows);
        let mut out = Vec::new();
        let mut c = gpu.new_cache(64).unwrap();
        let mut at = 0;
        for n in [2, 5, 8] {
            out.push(gpu.forward(c.as_mut(), &ids[at..at + n], Output::AllLogits).unwrap());
            at += n;
        }
        let mut seqs: Vec<Box<dyn yinsen::backends::KvCache>> = (0..7)
            .map(|i| {
                let mut c = gpu.new_cache(64).unwrap();
                gpu.forward(c.as_mut(), &ids[i..i + 3 + i], Output::LastLogits).unwrap();
                c
            })
            .collect();
        let mut r = refs(&mut seqs);
        out.push(gpu.forward_batch(&mut r, &ids[20..27]).unwrap());
        out
    };
    let (rows, one) = (run(true), run(false));
    gpu.set_lm_head_rows(true);
    for (i, (a, b)) in rows.iter().zip(&one).enumerate() {
        assert!(
            a.iter().all(|v| v.is_finite()) && a.iter().any(|&v| v != 0.0),
            "call {i}"
        );
        assert_eq!(bits(a), bits(b), "call {i}: lm_head_f16_rows against lm_head_f16");
    }
}

/// Greedy steps queued ahead: `forward_greedy` queues the step its pick
/// feeds (fed on the device) before it reads the pick back. A greedy loop
/// gives the full head's argmax step by step and takes the queued steps;
/// stepping a second cache in between, truncating, a logits call, or
/// feeding a token other than the pick each leave the queued step unused
/// and still give the right tokens.
#[test]
fn greedy_steps_queued_ahead_match_plain_steps() {
    let model = synthetic::build("125m").unwrap();
    let Some(gpu) = cuda(&model) else { return };
    gpu.set_lm_head_screen(Some(model.lm_head())).unwrap();
    let prompt = spread_prompt(&model);
    let other: Vec<u32> = prompt.iter().rev().copied().collect();
    // The full head's argmax after feeding `first`, then each pick, n steps.
    let reference = |p: &[u32], first: u32, n: usize| -> Vec<u32> {
        let mut c = prompted(&gpu, p, 96);
        let mut tok = first;
        (0..n)
            .map(|_| {
                tok = argmax(&gpu.forward(c.as_mut(), &[tok], Output::LastLogits).unwrap()) as u32;
                tok
            })
            .collect()
    };
    let (want, want_b) = (reference(&prompt, 3, 24), reference(&other, 7, 12));
    assert!(
        want.iter().collect::<std::collections::HashSet<_>>().len() > 1,
        "a varied run: {want:?}"
    );
    let greedy =
        |c: &mut Box<dyn yinsen::backends::KvCache>, tok: u32| gpu.forward_greedy(c.as_mut(), tok).unwrap().unwrap();
    // A plain greedy loop.
    let taken = gpu.greedy_steps_taken_ahead();
    let mut a = prompted(&gpu, &prompt, 96);
    let mut tok = 3;
    let got: Vec<u32> = (0..24)
        .map(|_| {
            tok = greedy(&mut a, tok);
            tok
        })
        .collect();
    assert_eq!(got, want, "greedy loop");
    assert_eq!(
        gpu.greedy_steps_taken_ahead() - taken,
        23,
        "every step after the first was queued ahead"
    );
    // Two caches stepped in turn: no queued step fits the other cache.
    let taken = gpu.greedy_steps_taken_ahead();
    let (mut a, mut b) = (prompted(&gpu, &prompt, 96), prompted(&gpu, &other, 96));
    let (mut ta, mut tb) = (3, 7);
    for i in 0..12 {
        ta = greedy(&mut a, ta);
        tb = greedy(&mut b, tb);
        assert_eq!((ta, tb), (want[i], want_b[i]), "interleaved step {i}");
    }
    assert_eq!(
        gpu.greedy_steps_taken_ahead(),
        taken,
        "interleaved caches took no queued step"
    );
    // Truncated after 10 steps to 6: the step at position 6 is fed pick 5.
    let mut c = prompted(&gpu, &prompt, 96);
    let mut tok = 3;
    for _ in 0..10 {
        tok = greedy(&mut c, tok);
    }
    let n = c.len();
    c.truncate(n - 4);
    let mut tok = want[5];
    for (i, w) in want.iter().enumerate().take(12).skip(6) {
        tok = greedy(&mut c, tok);
        assert_eq!(tok, *w, "after the truncation, step {i}");
    }
    // A logits call between greedy steps, then a token other than the pick.
    let mut d = prompted(&gpu, &prompt, 96);
    let mut tok = 3;
    for _ in 0..3 {
        tok = greedy(&mut d, tok);
    }
    let logits = gpu.forward(d.as_mut(), &[tok], Output::LastLogits).unwrap();
    assert_eq!(argmax(&logits) as u32, want[3], "logits call after greedy steps");
    let pick = greedy(&mut d, want[3]);
    assert_eq!(pick, want[4], "greedy after a logits call");
    let alt = ranked(&logits, 9)[4].0;
    let mut e = prompted(&gpu, &prompt, 96);
    for &t in &[3, want[0], want[1], want[2]] {
        greedy(&mut e, t);
    }
    let via_alt = greedy(&mut e, alt);
    let mut g = prompted(&gpu, &prompt, 96);
    let mut want_after_alt = 0;
    for &t in &[3, want[0], want[1], want[2], alt] {
        want_after_alt = argmax(&gpu.forward(g.as_mut(), &[t], Output::LastLogits).unwrap()) as u32;
    }
    assert_eq!(via_alt, want_after_alt, "a token other than the pick");
}
