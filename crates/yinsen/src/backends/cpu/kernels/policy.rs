//! Which CPU kernel runs a call, by the number of tokens in it: e.g. VNNI
//! for decode and AMX for prefill. Kernels over the shared tile layout
//! share one copy of the weights, so switching costs nothing.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::layout::TileLayout;
use super::{select, PackedTernary};
use crate::error::{Error, Result};
use crate::model::TernaryMatrix;

/// Rules `(min_tokens, kernel)`, ascending by `min_tokens`, the first at 1:
/// a call of `n` tokens uses the last rule whose `min_tokens <= n`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelPolicy {
    pub rules: Vec<(usize, String)>,
}

impl KernelPolicy {
    /// The default before any tuning: vnni3 (1.6-bit layout) for one-token
    /// calls where it runs, the best 2-bit vector kernel for small calls,
    /// AMX from `AMX_MIN_TOKENS` tokens when the OS granted it (measured on
    /// the device: AMX passes VNNI at 16 tokens, docs/device-runs-amx.md).
    pub fn auto() -> Self {
        let avail = super::available();
        let mut rules = vec![(1, avail[0].to_string())];
        // The 1.6-bit decode layout for one-token calls, the 2-bit tile
        // layout from two tokens: vnni3's line decode costs more than it
        // saves once a call is compute-bound (pp512 here: vnni 160 vs vnni3
        // 145 tok/s), while decode reads 0.8x the bytes (docs/performance.md).
        if avail[0] == "vnni3" && avail.contains(&"vnni") {
            rules.push((2, "vnni".to_string()));
        }
        if avail.contains(&"amx") && avail[0] != "amx" {
            rules.push((super::AMX_MIN_TOKENS, "amx".to_string()));
        }
        Self { rules }
    }

    /// One kernel for every call; "auto" gives [`KernelPolicy::auto`].
    pub fn single(name: &str) -> Result<Self> {
        if name == "auto" {
            return Ok(Self::auto());
        }
        let k = select(name)?;
        Ok(Self {
            rules: vec![(1, k.name().to_string())],
        })
    }

    /// Check the rules name runnable kernels and start at one token.
    pub fn validate(&self) -> Result<()> {
        if self.rules.first().map(|r| r.0) != Some(1) {
            return Err(Error::input("kernel policy must start at 1 token"));
        }
        if !self.rules.windows(2).all(|w| w[0].0 < w[1].0) {
            return Err(Error::input("kernel policy thresholds must increase"));
        }
        for (_, k) in &self.rules {
            select(k)?;
        }
        Ok(())
    }

    pub fn kernel_for(&self, n_tokens: usize) -> &str {
        let mut k = &self.rules[0].1;
        for (min, name) in &self.rules {
            if n_tokens >= *min {
                k = name;
            }
        }
        k
    }

    /// "vnni" or "vnni<32<=amx".
    pub fn describe(&self) -> String {
        let mut s = self.rules[0].1.clone();
        for (min, k) in &self.rules[1..] {
            s += &format!(",{k}@{min}+");
        }
        s
    }

    /// Prepare `w` for every kernel of the policy, sharing one tile layout.
    pub fn prepare(&self, w: &TernaryMatrix) -> Result<Arc<dyn PackedTernary>> {
        if self.rules.len() == 1 {
            return select(&self.rules[0].1)?.prepare(w);
        }
        let mut tiled: Option<Arc<TileLayout>> = None;
        let mut variants = Vec::new();
        for (min, name) in &self.rules {
            let k = select(name)?;
            if tiled.is_none() {
                tiled = Some(Arc::new(TileLayout::from_canonical(w)?));
            }
            let p = match k.prepare_tiled(tiled.as_ref().unwrap()) {
                Some(p) => p,
                None => k.prepare(w)?,
            };
            variants.push((*min, p));
        }
        Ok(Arc::new(Switched { variants }))
    }
}

/// One matrix, several kernels; the call's token count picks one.
struct Switched {
    variants: Vec<(usize, Arc<dyn PackedTernary>)>,
}

impl Switched {
    fn pick(&self, n_tokens: usize) -> &Arc<dyn PackedTernary> {
        let mut p = &self.variants[0].1;
        for (min, v) in &self.variants {
            if n_tokens >= *min {
                p = v;
            }
        }
        p
    }
}

impl PackedTernary for Switched {
    fn n_out(&self) -> usize {
        self.variants[0].1.n_out()
    }
    fn n_in(&self) -> usize {
        self.variants[0].1.n_in()
    }
    fn resident_bytes(&self) -> usize {
        // Tiled variants share one layout; count distinct allocations once.
        let mut seen = std::collections::HashSet::new();
        self.variants
            .iter()
            .filter(|(_, v)| seen.insert(v.resident_bytes()))
            .map(|(_, v)| v.resident_bytes())
            .sum()
    }
    fn bytes_for(&self, n_tokens: usize) -> usize {
        self.pick(n_tokens).resident_bytes()
    }
    fn row_block(&self) -> usize {
        self.variants.iter().map(|(_, v)| v.row_block()).max().unwrap_or(1)
    }
    fn gemm(&self, x: &[i8], n_tokens: usize, r0: usize, r1: usize, out: &mut [i32]) {
        self.pick(n_tokens).gemm(x, n_tokens, r0, r1, out)
    }
    fn token_major(&self, n_tokens: usize) -> bool {
        self.pick(n_tokens).token_major(n_tokens)
    }
    fn gemm_tokens(&self, x: &[i8], n_tokens: usize, r0: usize, r1: usize, out: &mut [i32]) -> bool {
        self.pick(n_tokens).gemm_tokens(x, n_tokens, r0, r1, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::cpu::reference::ternary_matmul_i32;
    use crate::model::synthetic::random_ternary;

    #[test]
    fn switched_policy_is_exact_on_both_sides_of_the_threshold() {
        let avail = super::super::available();
        if avail.len() < 2 {
            let _ = std::io::Write::write_fmt(
                &mut std::io::stderr(),
                format_args!("SKIP policy: only {avail:?} here\n"),
            ); // uncaptured: visible in CI logs
            return;
        }
        let p = KernelPolicy {
            rules: vec![(1, avail[0].to_string()), (3, avail[1].to_string())],
        };
        p.validate().unwrap();
        let w = random_ternary(40, 70, 9).unwrap();
        let packed = p.prepare(&w).unwrap();
        for n in [1, 2, 3, 5] {
            let x: Vec<i8> = (0..n * 70).map(|i| (i * 31 % 255) as i8).collect();
            let want = ternary_matmul_i32(&w, &x, n);
            let mut out = vec![i32::MIN + 7; 40 * n];
            packed.gemm(&x, n, 0, 40, &mut out);
            for r in 0..40 {
                for t in 0..n {
                    assert_eq!(out[r * n + t], want[t * 40 + r]);
                }
            }
        }
        assert_eq!(p.kernel_for(2), avail[0]);
        assert_eq!(p.kernel_for(64), avail[1]);
    }

    #[test]
    fn bad_policies_are_rejected() {
        assert!(KernelPolicy {
            rules: vec![(2, "scalar".into())]
        }
        .validate()
        .is_err());
        assert!(KernelPolicy {
            rules: vec![(1, "scalar".into()), (1, "scalar".into())]
        }
        .validate()
        .is_err());
        assert!(KernelPolicy {
            rules: vec![(1, "nope".into())]
        }
        .validate()
        .is_err());
    }
}
