//! A machine's tuning profile: measured latency per path and token count,
//! and the thresholds derived from it. Written by `yinsen tune`, read by
//! the dispatcher at start-up.

use std::path::{Path as FsPath, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backends::cpu::kernels::policy::KernelPolicy;
use crate::backends::cpu::kernels::KERNEL_NAMES;
use crate::error::{Error, Result};

/// One measurement: a full forward of `tokens` tokens on `path`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepPoint {
    /// "cuda", or "cpu/<kernel>".
    pub path: String,
    pub tokens: usize,
    /// Median milliseconds per call.
    pub ms: f64,
}

/// Cost of moving a sequence's KV cache between paths (export f32 K/V
/// from one backend, import into the other).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvMovePoint {
    /// Positions in the cache.
    pub positions: usize,
    /// f32 snapshot bytes.
    pub bytes: usize,
    pub export_cpu_ms: f64,
    pub import_cpu_ms: f64,
    pub export_cuda_ms: Option<f64>,
    pub import_cuda_ms: Option<f64>,
}

impl KvMovePoint {
    /// One line for reports: "2048 positions (300.0 MiB f32): cpu export .. ms, ..".
    pub fn describe(&self) -> String {
        let opt = |v: Option<f64>| v.map_or("n/a (no CUDA path)".into(), |v| format!("{v:.2} ms"));
        format!(
            "{} positions ({:.1} MiB f32): cpu export {:.2} ms, cpu import {:.2} ms, cuda export {}, cuda import {}",
            self.positions,
            self.bytes as f64 / (1 << 20) as f64,
            self.export_cpu_ms,
            self.import_cpu_ms,
            opt(self.export_cuda_ms),
            opt(self.import_cuda_ms)
        )
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub version: u32,
    pub fingerprint: String,
    pub cpu_name: String,
    pub cuda_devices: Vec<String>,
    /// Model the sweep ran (thresholds depend on shape; 2B4T by default).
    pub model: String,
    pub threads: usize,
    pub created_unix: u64,
    /// CPU kernel per token count.
    pub cpu_policy: KernelPolicy,
    /// Whole-call path ("cpu" or "cuda") per token count, as `(min_tokens, path)`.
    pub path_rules: Vec<(usize, String)>,
    pub points: Vec<SweepPoint>,
    #[serde(default)]
    pub kv_move: Vec<KvMovePoint>,
}

pub const PROFILE_VERSION: u32 = 1;
/// Profiles are small; refuse anything larger before reading it.
const MAX_PROFILE_BYTES: u64 = 16 << 20;

/// `$XDG_CACHE_HOME/yinsen/profiles` (or `~/.cache/yinsen/profiles`).
pub fn profile_dir() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".cache"),
    };
    Some(base.join("yinsen").join("profiles"))
}

/// Where the profile of the machine with `fingerprint` lives.
pub fn default_profile_path(fingerprint: &str) -> Option<PathBuf> {
    profile_dir().map(|d| d.join(format!("{fingerprint}.json")))
}

/// `(min_tokens, name)` rules from measurements: at each token count the
/// fastest candidate wins; a rule starts wherever the winner changes.
pub fn crossover_rules(points: &[SweepPoint], candidates: &[String]) -> Vec<(usize, String)> {
    let mut tokens: Vec<usize> = points.iter().map(|p| p.tokens).collect();
    tokens.sort_unstable();
    tokens.dedup();
    let mut rules: Vec<(usize, String)> = Vec::new();
    for t in tokens {
        let best = points
            .iter()
            .filter(|p| p.tokens == t && candidates.contains(&p.path))
            .min_by(|a, b| a.ms.total_cmp(&b.ms));
        let Some(best) = best else { continue };
        if rules.last().map(|r| &r.1) != Some(&best.path) {
            rules.push((t, best.path.clone()));
        }
    }
    if let Some(first) = rules.first_mut() {
        first.0 = 1;
    }
    rules
}

impl Profile {
    /// Check internal consistency (any file may lie).
    pub fn validate(&self, file: &str) -> Result<()> {
        let bad = |m: &str| Err(Error::input(format!("profile {file}: {m}")));
        if self.version != PROFILE_VERSION {
            return bad(&format!(
                "version {} (this build reads {PROFILE_VERSION})",
                self.version
            ));
        }
        let r = &self.path_rules;
        if r.first().map(|r| r.0) != Some(1) || !r.windows(2).all(|w| w[0].0 < w[1].0) {
            return bad("path_rules must start at 1 token and increase");
        }
        if r.iter().any(|(_, p)| p != "cpu" && p != "cuda") {
            return bad("path_rules name a path other than cpu/cuda");
        }
        if self.points.iter().any(|p| !(p.ms.is_finite() && p.ms >= 0.0)) {
            return bad("a measurement is not a finite, non-negative time");
        }
        // Structure only: whether the kernels run here is the dispatcher's
        // check (a profile from another machine falls back to defaults).
        let c = &self.cpu_policy.rules;
        if c.first().map(|r| r.0) != Some(1) || !c.windows(2).all(|w| w[0].0 < w[1].0) {
            return bad("cpu_policy must start at 1 token and increase");
        }
        if c.iter()
            .any(|(_, k)| k == "auto" || !KERNEL_NAMES.contains(&k.as_str()))
        {
            return bad("cpu_policy names an unknown kernel");
        }
        Ok(())
    }

    pub fn load(path: &FsPath) -> Result<Self> {
        let name = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|e| Error::input(format!("profile {name}: {e}")))?;
        if meta.len() > MAX_PROFILE_BYTES {
            return Err(Error::input(format!(
                "profile {name}: {} bytes is too large",
                meta.len()
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::input(format!("profile {name}: {e}")))?;
        let p: Profile = serde_json::from_str(&text).map_err(|e| Error::input(format!("profile {name}: {e}")))?;
        p.validate(&name)?;
        Ok(p)
    }

    pub fn save(&self, path: &FsPath) -> Result<()> {
        let name = path.display().to_string();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::input(format!("creating {}: {e}", dir.display())))?;
        }
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::input(format!("profile {name}: {e}")))?;
        std::fs::write(path, text).map_err(|e| Error::input(format!("writing profile {name}: {e}")))
    }

    /// Whole-call path for a call of `n` tokens.
    pub fn path_for(&self, n: usize) -> &str {
        let mut p = &self.path_rules[0].1;
        for (min, name) in &self.path_rules {
            if n >= *min {
                p = name;
            }
        }
        p
    }

    /// Estimated ms of a call of `n` tokens on `path` ("cuda", "cpu/vnni",
    /// or "cpu" = best CPU kernel), interpolated linearly between measured
    /// token counts (clamped outside them); None when never measured.
    pub fn estimate_ms(&self, path: &str, n: usize) -> Option<f64> {
        let mut pts: Vec<(usize, f64)> = Vec::new();
        for p in &self.points {
            let hit = p.path == path || (path == "cpu" && p.path.starts_with("cpu/"));
            if !hit {
                continue;
            }
            match pts.iter_mut().find(|(t, _)| *t == p.tokens) {
                Some(e) => e.1 = e.1.min(p.ms),
                None => pts.push((p.tokens, p.ms)),
            }
        }
        pts.sort_by_key(|p| p.0);
        let (first, last) = (*pts.first()?, *pts.last()?);
        if n <= first.0 {
            return Some(first.1);
        }
        if n >= last.0 {
            return Some(last.1 * n as f64 / last.0 as f64);
        }
        let w = pts.windows(2).find(|w| w[0].0 <= n && n <= w[1].0)?;
        let f = (n - w[0].0) as f64 / (w[1].0 - w[0].0) as f64;
        Some(w[0].1 + f * (w[1].1 - w[0].1))
    }

    /// Estimated ms to move a cache of `positions` positions to `to`.
    pub fn move_ms(&self, positions: usize, to: &str) -> Option<f64> {
        let p = self.kv_move.iter().max_by_key(|p| p.positions)?;
        let ms = if to == "cuda" {
            p.export_cpu_ms + p.import_cuda_ms?
        } else {
            p.export_cuda_ms? + p.import_cpu_ms
        };
        Some(ms * positions as f64 / p.positions.max(1) as f64)
    }
}
