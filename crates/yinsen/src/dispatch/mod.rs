//! The dispatcher: decides which compute path runs what. For now it
//! resolves `--backend` to one path ("auto" = CUDA when a device is usable,
//! else CPU); per-call plans come with the hybrid dispatcher.

use std::sync::Arc;

use crate::backends::cpu::{CpuBackend, CpuOptions};
use crate::backends::cuda::{self, CudaBackend, CudaStatus};
use crate::backends::Backend;
use crate::error::{Error, Result};
use crate::model::Model;

/// Build the backend named by `choice` ("cpu", "cuda", "auto").
pub fn make_backend(model: &Arc<Model>, choice: &str, cpu: &CpuOptions) -> Result<Arc<dyn Backend>> {
    match choice {
        "cpu" => Ok(Arc::new(CpuBackend::with_options(model.clone(), cpu)?)),
        "cuda" => match cuda::probe() {
            CudaStatus::Available { .. } => Ok(Arc::new(CudaBackend::new(model, 0)?)),
            CudaStatus::Unavailable(why) => Err(Error::Unsupported(format!("--backend cuda: {why}"))),
        },
        "auto" => match cuda::probe() {
            CudaStatus::Available { .. } => match CudaBackend::new(model, 0) {
                Ok(b) => Ok(Arc::new(b)),
                // A model the GPU path cannot run (e.g. per-block scales) stays on the CPU.
                Err(Error::Unsupported(_)) => Ok(Arc::new(CpuBackend::with_options(model.clone(), cpu)?)),
                Err(e) => Err(e),
            },
            CudaStatus::Unavailable(_) => Ok(Arc::new(CpuBackend::with_options(model.clone(), cpu)?)),
        },
        other => Err(Error::input(format!("unknown backend '{other}' (cpu, cuda, auto)"))),
    }
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
