//! The dispatcher: which compute path runs what.
//!
//! - `caps`: what this machine can run ([`Capabilities`]).
//! - `profile`: measured latencies and thresholds from `yinsen tune`.
//! - `plan`: per-call [`Plan`]s (phase, tokens, KV placement, profile).
//! - `hybrid`: [`HybridBackend`], the `Backend` that follows the plans.
//! - `tune`: the sweep that writes a profile; `paths`: the per-path table.
//!
//! `--backend cpu|cuda` builds that one backend; `auto` builds the hybrid.

pub mod caps;
pub mod hybrid;
pub mod paths;
pub mod plan;
pub mod profile;
pub mod tune;

use std::path::PathBuf;
use std::sync::Arc;

use crate::backends::cpu::kernels::policy::KernelPolicy;
use crate::backends::cpu::{CpuBackend, CpuOptions};
use crate::backends::cuda::{self, CudaBackend, CudaStatus};
use crate::backends::Backend;
use crate::error::{Error, Result};
use crate::model::Model;

pub use caps::Capabilities;
pub use hybrid::{HybridBackend, Slot, WeightMode};
pub use plan::{Path, Phase, Plan, PlanKind, Planner};
pub use profile::Profile;

/// Which tuning profile the hybrid loads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ProfileChoice {
    /// This machine's profile from the cache dir, if `yinsen tune` wrote one.
    #[default]
    Auto,
    /// Default rules only.
    Off,
    File(PathBuf),
}

/// Dispatcher settings beyond `--backend`.
#[derive(Clone, Debug)]
pub struct DispatchOptions {
    pub weights: WeightMode,
    pub profile: ProfileChoice,
    /// Print each call's plan on stderr.
    pub explain: bool,
}

impl Default for DispatchOptions {
    fn default() -> Self {
        Self {
            weights: WeightMode::Dual,
            profile: ProfileChoice::Auto,
            explain: false,
        }
    }
}

/// Build the backend named by `choice` ("cpu", "cuda", "auto").
pub fn make_backend(model: &Arc<Model>, choice: &str, cpu: &CpuOptions) -> Result<Arc<dyn Backend>> {
    make_backend_with(model, choice, cpu, &DispatchOptions::default())
}

pub fn make_backend_with(
    model: &Arc<Model>,
    choice: &str,
    cpu: &CpuOptions,
    opts: &DispatchOptions,
) -> Result<Arc<dyn Backend>> {
    match choice {
        "cpu" => Ok(Arc::new(CpuBackend::with_options(model.clone(), cpu)?)),
        "cuda" => match cuda::probe() {
            CudaStatus::Available { .. } => Ok(Arc::new(CudaBackend::new(model, 0)?)),
            CudaStatus::Unavailable(why) => Err(Error::Unsupported(format!("--backend cuda: {why}"))),
        },
        "auto" => Ok(Arc::new(make_hybrid(model, cpu, opts, Capabilities::detect())?)),
        other => Err(Error::input(format!("unknown backend '{other}' (cpu, cuda, auto)"))),
    }
}

/// The profile `choice` names, or why none is used.
pub fn load_profile(caps: &Capabilities, choice: &ProfileChoice) -> (Option<Profile>, Option<String>) {
    let path = match choice {
        ProfileChoice::Off => return (None, None),
        ProfileChoice::File(p) => p.clone(),
        ProfileChoice::Auto => match profile::default_profile_path(&caps.fingerprint()) {
            Some(p) if p.exists() => p,
            _ => return (None, None),
        },
    };
    match Profile::load(&path) {
        Ok(p) if p.fingerprint != caps.fingerprint() => {
            let note = format!(
                "profile {} was tuned on another machine ({}); using it anyway",
                path.display(),
                p.cpu_name
            );
            (Some(p), Some(note))
        }
        Ok(p) => (Some(p), None),
        Err(e) => (None, Some(format!("ignoring profile: {e}"))),
    }
}

/// The CPU kernel policy: explicit options win, then the planner's.
fn cpu_policy(cpu: &CpuOptions, planner: &Planner) -> Result<KernelPolicy> {
    if let Some(p) = &cpu.policy {
        return Ok(p.clone());
    }
    if cpu.kernel != "auto" {
        return KernelPolicy::single(&cpu.kernel);
    }
    match planner.cpu_policy.validate() {
        Ok(()) => Ok(planner.cpu_policy.clone()),
        Err(_) => KernelPolicy::single("auto"),
    }
}

/// The hybrid backend over this machine's paths (`caps` may be synthetic:
/// a CUDA device listed there is built with `CudaBackend`).
pub fn make_hybrid(
    model: &Arc<Model>,
    cpu: &CpuOptions,
    opts: &DispatchOptions,
    caps: Capabilities,
) -> Result<HybridBackend> {
    let (profile, note) = load_profile(&caps, &opts.profile);
    let mut planner = Planner::new(caps, profile);
    planner.cpu_policy = cpu_policy(cpu, &planner)?;
    let cpu_opts = CpuOptions {
        policy: Some(planner.cpu_policy.clone()),
        ..cpu.clone()
    };
    let m = model.clone();
    let cpu_slot = Slot::new(
        Path::Cpu,
        Box::new(move || Ok(Arc::new(CpuBackend::with_options(m.clone(), &cpu_opts)?) as Arc<dyn Backend>)),
    );
    let cuda_slot = planner.caps.has_cuda().then(|| {
        let m = model.clone();
        Slot::new(
            Path::Cuda,
            Box::new(move || Ok(Arc::new(CudaBackend::new(&m, 0)?) as Arc<dyn Backend>)),
        )
    });
    let mut h = HybridBackend::new(model.config.clone(), planner, cpu_slot, cuda_slot, opts.weights)?;
    h.set_explain(opts.explain);
    if let Some(n) = note {
        h.note(n);
    }
    Ok(h)
}

/// CUDA devices, or why there are none.
pub fn cuda_info() -> crate::sysinfo::CudaInfo {
    match cuda::probe() {
        CudaStatus::Available { devices } => crate::sysinfo::CudaInfo {
            available: true,
            devices: devices
                .iter()
                .map(|d| {
                    format!(
                        "{} (sm_{}{}, {:.1} GiB)",
                        d.name,
                        d.sm.0,
                        d.sm.1,
                        d.mem_bytes as f64 / (1u64 << 30) as f64
                    )
                })
                .collect(),
            reason: None,
        },
        CudaStatus::Unavailable(why) => crate::sysinfo::CudaInfo {
            available: false,
            devices: vec![],
            reason: Some(why),
        },
    }
}
