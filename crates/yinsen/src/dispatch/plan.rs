//! Plans: which path runs each stage of one forward call.

use serde::Serialize;

use super::caps::Capabilities;
use super::profile::Profile;
use crate::backends::cpu::kernels::policy::KernelPolicy;

/// Calls of at least this many tokens go to the CPU matrix path when no
/// profile says otherwise (the seed's `batch >= 16` rule).
pub const DEFAULT_CPU_MIN_TOKENS: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Several tokens into a sequence (prompt, or a chunk of it).
    Prefill,
    /// One token.
    Decode,
    /// Hidden states for embeddings (no lm_head).
    Embed,
}

impl Phase {
    pub fn of(n_tokens: usize, hidden: bool) -> Self {
        match (hidden, n_tokens) {
            (true, _) => Phase::Embed,
            (false, 1) => Phase::Decode,
            _ => Phase::Prefill,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Path {
    Cpu,
    Cuda,
}

impl Path {
    pub fn as_str(self) -> &'static str {
        match self {
            Path::Cpu => "cpu",
            Path::Cuda => "cuda",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanKind {
    /// Every stage on one path (what runs).
    Whole,
    /// The seed's split: projections on the CPU, attention on the GPU. Not
    /// run: it needs a host<->device copy of Q/K/V and the attention output
    /// in every layer (see docs/dispatch.md).
    AttentionSplit,
}

/// Where one call's stages run and why.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Plan {
    pub phase: Phase,
    pub tokens: usize,
    pub kind: PlanKind,
    pub path: Path,
    /// CPU kernel for the ternary projections when `path` is the CPU.
    pub cpu_kernel: Option<String>,
    pub projections: String,
    pub attention: String,
    pub lm_head: String,
    /// The sequence's KV cache moves here from this path first.
    pub kv_move_from: Option<Path>,
    /// "profile <fingerprint>", "default rules", "forced", "only path".
    pub source: String,
}

impl Plan {
    pub fn summary(&self) -> String {
        let mv = match self.kv_move_from {
            Some(from) => format!(", KV cache moves {} -> {}", from.as_str(), self.path.as_str()),
            None => String::new(),
        };
        format!(
            "{:?} of {} token(s): projections {}, attention {}, lm_head {} [{}{}]",
            self.phase, self.tokens, self.projections, self.attention, self.lm_head, self.source, mv
        )
    }
}

/// Chooses plans from the machine's capabilities and (optional) profile.
#[derive(Clone, Debug)]
pub struct Planner {
    pub caps: Capabilities,
    pub profile: Option<Profile>,
    /// `--backend cpu|cuda` pins every call to one path.
    pub force: Option<Path>,
    /// Kernel per token count on the CPU path.
    pub cpu_policy: KernelPolicy,
    /// The CUDA path exists for this model (a device and a model it can run).
    pub cuda_usable: bool,
}

impl Planner {
    /// The CPU policy: the profile's, else vector kernel below
    /// `AMX_MIN_TOKENS` and AMX above when granted. Built from names only,
    /// so synthetic capability sets work without the hardware.
    pub fn new(caps: Capabilities, profile: Option<Profile>) -> Self {
        let cpu_policy = match &profile {
            Some(p) => p.cpu_policy.clone(),
            None => default_cpu_policy(&caps),
        };
        let cuda_usable = caps.has_cuda();
        Self {
            caps,
            profile,
            force: None,
            cpu_policy,
            cuda_usable,
        }
    }

    /// The plan for a call of `n` tokens in `phase`, with the sequence's
    /// cache currently on `kv_on` (None = empty / not yet placed) holding
    /// `kv_len` positions.
    pub fn plan(&self, phase: Phase, n: usize, kv_on: Option<Path>, kv_len: usize) -> Plan {
        self.plan_with(phase, n, kv_on, kv_len, self.cuda_usable)
    }

    /// The fewest sequences (2..=`max`) whose batched step the default rules
    /// (no profile, no forced path) send to the CPU matrix path although the
    /// GPU path is usable; None where no such batch is planned so. Batched
    /// decode measured ~20x faster on the device host's GPU than on its
    /// CPU at 16 sequences (docs/open-questions.md), so `yinsen serve`
    /// points this out.
    pub fn default_rules_cpu_batch(&self, max: usize) -> Option<usize> {
        if !self.cuda_usable || self.profile.is_some() || self.force.is_some() {
            return None;
        }
        (2..=max).find(|&n| self.plan(Phase::Prefill, n, None, 0).path == Path::Cpu)
    }

    /// As [`Self::plan`], with the CUDA path's availability given (it can
    /// turn out unusable when built lazily).
    pub fn plan_with(&self, phase: Phase, n: usize, kv_on: Option<Path>, kv_len: usize, cuda_ok: bool) -> Plan {
        let (path, source) = self.choose(phase, n, kv_on, kv_len, cuda_ok);
        let cpu_kernel = (path == Path::Cpu).then(|| self.cpu_policy.kernel_for(n).to_string());
        let here = match (&cpu_kernel, path) {
            (Some(k), _) => format!("cpu/{k}"),
            (None, _) => match self.caps.cuda.first() {
                Some(d) => format!("cuda:{}", d.index),
                None => "cuda".into(),
            },
        };
        Plan {
            phase,
            tokens: n,
            kind: PlanKind::Whole,
            path,
            cpu_kernel,
            projections: here.clone(),
            attention: here.clone(),
            lm_head: if phase == Phase::Embed {
                "skipped (hidden states)".into()
            } else {
                here
            },
            kv_move_from: kv_on.filter(|&p| p != path && kv_len > 0),
            source,
        }
    }

    fn choose(&self, phase: Phase, n: usize, kv_on: Option<Path>, kv_len: usize, cuda_ok: bool) -> (Path, String) {
        if let Some(p) = self.force {
            return (p, "forced".into());
        }
        if !cuda_ok {
            return (Path::Cpu, "only path".into());
        }
        let Some(prof) = &self.profile else {
            // The seed: embeddings and big calls on the CPU matrix path.
            let p = if n >= DEFAULT_CPU_MIN_TOKENS || phase == Phase::Embed {
                Path::Cpu
            } else {
                Path::Cuda
            };
            return (p, "default rules".into());
        };
        let src = format!("profile {}", prof.fingerprint);
        let want = if prof.path_for(n) == "cuda" {
            Path::Cuda
        } else {
            Path::Cpu
        };
        // Stay where the cache is when moving it costs more than it saves.
        if let Some(cur) = kv_on.filter(|&c| c != want && kv_len > 0) {
            let est = |p: Path| prof.estimate_ms(p.as_str(), n);
            if let (Some(stay), Some(go), Some(mv)) = (est(cur), est(want), prof.move_ms(kv_len, want.as_str())) {
                if go + mv >= stay {
                    return (cur, format!("{src}, KV move {mv:.2} ms not worth it"));
                }
            }
        }
        (want, src)
    }
}

/// Vector kernel for few tokens, AMX from `AMX_MIN_TOKENS` when granted.
pub fn default_cpu_policy(caps: &Capabilities) -> KernelPolicy {
    let v = caps.cpu_vector_kernel().to_string();
    let m = caps.cpu_matrix_kernel().to_string();
    let mut rules = vec![(1, v.clone())];
    if m != v {
        rules.push((crate::backends::cpu::kernels::AMX_MIN_TOKENS, m));
    }
    KernelPolicy { rules }
}
