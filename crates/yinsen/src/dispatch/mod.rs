//! The dispatcher: decides which compute path runs what. For now it
//! resolves `--backend` to one path; per-stage plans come with issue 5.

use std::sync::Arc;

use crate::backends::cpu::CpuBackend;
use crate::backends::Backend;
use crate::error::{Error, Result};
use crate::model::Model;

/// Build the backend named by `choice` ("cpu", "cuda", "auto").
pub fn make_backend(model: &Arc<Model>, choice: &str, kernel: &str, threads: usize) -> Result<Arc<dyn Backend>> {
    match choice {
        "cpu" | "auto" => Ok(Arc::new(CpuBackend::new(model.clone(), kernel, threads)?)),
        "cuda" => Err(Error::Unsupported("the CUDA backend is not built yet".into())),
        other => Err(Error::input(format!("unknown backend '{other}' (cpu, cuda, auto)"))),
    }
}

/// CUDA devices, or why there are none.
pub fn cuda_info() -> crate::sysinfo::CudaInfo {
    crate::sysinfo::CudaInfo {
        available: false,
        devices: vec![],
        reason: Some("this build has no CUDA backend yet".into()),
    }
}
