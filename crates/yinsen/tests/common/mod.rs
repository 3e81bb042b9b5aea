//! Shared test support: where the fixtures live.
#![allow(dead_code)]

use std::path::PathBuf;

/// `$YINSEN_FIXTURES` (set on the device), else the checkout's ../shared/fixtures.
pub fn fixtures_dir() -> PathBuf {
    if let Ok(p) = std::env::var("YINSEN_FIXTURES") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures")
}

pub fn tiny_a() -> PathBuf {
    fixtures_dir().join("tiny-bitnet-a")
}

pub fn read_json(p: PathBuf) -> serde_json::Value {
    let s = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&s).unwrap()
}

/// Every format of the tiny-bitnet-a model, as `formats::load` specs.
pub fn tiny_a_formats() -> Vec<(&'static str, String)> {
    let d = tiny_a();
    vec![
        ("hf-master", d.join("hf-master").display().to_string()),
        ("hf-packed", d.join("hf-packed").display().to_string()),
        ("TQ2_0", d.join("gguf/tiny-bitnet-a-TQ2_0.gguf").display().to_string()),
        ("TQ1_0", d.join("gguf/tiny-bitnet-a-TQ1_0.gguf").display().to_string()),
        ("I2_S", d.join("gguf/tiny-bitnet-a-I2_S.gguf").display().to_string()),
    ]
}

/// Acceptance limits for one fixture prompt (see the fixtures README).
pub struct Limits {
    pub max: f32,
    pub mean: f32,
    pub top1_min: f64,
    pub top5_identical: bool,
}

impl Limits {
    /// `expected/tolerances.json`'s entry for `prompt`, exactly.
    pub fn of(prompt: &str) -> Self {
        let t = &read_json(tiny_a().join("expected/tolerances.json"))["prompts"][prompt];
        Limits {
            max: t["max_abs_logit"].as_f64().unwrap() as f32,
            mean: t["mean_abs_logit"].as_f64().unwrap() as f32,
            top1_min: t["top1_agree_all_positions_min"].as_f64().unwrap(),
            top5_identical: t["top5_ids_identical_all_positions"].as_bool().unwrap(),
        }
    }
    /// At least the flip-prone limits (for reduced-precision paths).
    pub fn flip_prone(self) -> Self {
        Limits {
            max: self.max.max(0.1),
            mean: self.mean.max(0.01),
            top1_min: self.top1_min.min(0.8),
            top5_identical: false,
        }
    }
}

pub fn json_ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn argmax(v: &[f32]) -> usize {
    (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b })
}

pub fn top5(v: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    idx.truncate(5);
    idx
}

/// What `check_logits` measured for one prompt.
pub struct LogitReport {
    pub max: f32,
    pub mean: f32,
    pub all_max: f32,
    pub top1: f64,
}

/// The oracle's logit checks for one prompt: `all` holds the logits of
/// every position (`[n][vocab]`). Last-token max/mean |dlogit|, the
/// all-position maximum where recorded, top-1 wherever the reference margin
/// is >= 0.05, the top-1 agreement rate, and top-5 identity when required.
pub fn check_logits(what: &str, name: &str, all: &[f32], n: usize, vocab: usize, lim: &Limits) -> LogitReport {
    let exp = |f: String| tiny_a().join("expected").join(f);
    assert_eq!(all.len(), n * vocab);
    assert!(all.iter().all(|v| v.is_finite()), "{what} {name}: non-finite logits");
    let last = &all[(n - 1) * vocab..];
    let want = yinsen::formats::npy::read(&exp(format!("logits_last_{name}.npy")))
        .unwrap()
        .to_f32();
    let diffs: Vec<f32> = last.iter().zip(&want).map(|(a, b)| (a - b).abs()).collect();
    let max = diffs.iter().cloned().fold(0.0, f32::max);
    let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
    assert!(max <= lim.max, "{what} {name}: max |dlogit| {max} > {}", lim.max);
    assert!(mean <= lim.mean, "{what} {name}: mean |dlogit| {mean} > {}", lim.mean);
    let mut all_max = max;
    if let Ok(a) = yinsen::formats::npy::read(&exp(format!("logits_all_{name}.npy"))) {
        let a = a.to_f32();
        assert_eq!(a.len(), all.len());
        all_max = all.iter().zip(&a).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        assert!(all_max <= lim.max, "{what} {name}: all-position max {all_max}");
    }
    let refs = read_json(exp("top5.json".into()))[name].as_array().unwrap().clone();
    assert_eq!(refs.len(), n);
    let mut agree = 0;
    for (pos, r) in refs.iter().enumerate() {
        let ids: Vec<usize> = json_ids(&r["ids"]).iter().map(|&x| x as usize).collect();
        let lg: Vec<f64> = r["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let row = &all[pos * vocab..(pos + 1) * vocab];
        let ours = argmax(row);
        if ours == ids[0] {
            agree += 1;
        } else {
            let m = lg[0] - lg[1];
            assert!(
                m < 0.05,
                "{what} {name} pos {pos}: top-1 {ours} vs {} with margin {m}",
                ids[0]
            );
        }
        if lim.top5_identical {
            assert_eq!(top5(row), ids, "{what} {name} pos {pos}: top-5");
        }
    }
    let top1 = agree as f64 / n as f64;
    assert!(top1 >= lim.top1_min, "{what} {name}: top-1 agreement {top1}");
    LogitReport {
        max,
        mean,
        all_max,
        top1,
    }
}

/// Greedy continuation: identical until the first step whose recorded
/// top-1/top-2 margin is < 0.05. Returns the number of steps compared.
pub fn check_greedy(what: &str, name: &str, got: &[u32]) -> usize {
    let g = &read_json(tiny_a().join("expected/greedy.json"))[name];
    let want = json_ids(&g["generated_ids"]);
    let margins: Vec<f64> = g["top1_minus_top2_margin"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let mut same = 0;
    for i in 0..want.len() {
        if margins[i] < 0.05 {
            break;
        }
        assert_eq!(got[i], want[i], "{what} {name}: greedy step {i}");
        same += 1;
    }
    same
}

/// `SKIP cuda: <why>` on stderr, uncaptured so that CI logs show it.
pub fn skip_cuda(why: &str) {
    let _ = std::io::Write::write_fmt(&mut std::io::stderr(), format_args!("SKIP cuda: {why}\n"));
}

/// Device-only tests (timings on the real shape): true with YINSEN_DEVICE
/// set, else false after a SKIP line naming the test.
pub fn device_only(test: &str) -> bool {
    let on = std::env::var("YINSEN_DEVICE").is_ok();
    if !on {
        skip_cuda(&format!("{test} runs only with YINSEN_DEVICE=1"));
    }
    on
}
