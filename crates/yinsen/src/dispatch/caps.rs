//! What this machine can run, gathered once at start-up: CPU kernels
//! (AMX only when the OS grants it) and CUDA devices.

use serde::{Deserialize, Serialize};

use crate::backends::cuda::{self, CudaStatus};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CudaDevice {
    pub index: usize,
    pub name: String,
    pub mem_bytes: usize,
    /// e.g. "sm_90".
    pub arch: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    pub cpu_name: String,
    /// SIMD/matrix features present (avx2, avx512_vnni, amx_int8, ...).
    pub cpu_features: Vec<String>,
    /// CPU kernels that run here: vector kernels best first, then "amx" when granted.
    pub cpu_kernels: Vec<String>,
    /// AMX tile permission text ("granted" or why not).
    pub amx: String,
    pub cuda: Vec<CudaDevice>,
    /// Why there is no CUDA device, when there is none.
    pub cuda_reason: Option<String>,
}

impl Capabilities {
    /// Probe this machine.
    pub fn detect() -> Self {
        let c = crate::sysinfo::cpu_info();
        let flags = [
            ("avx2", c.avx2),
            ("fma", c.fma),
            ("f16c", c.f16c),
            ("avx512f", c.avx512f),
            ("avx512bw", c.avx512bw),
            ("avx512_vnni", c.avx512_vnni),
            ("amx_tile", c.amx_tile),
            ("amx_int8", c.amx_int8),
        ];
        let (cuda, cuda_reason) = match cuda::probe() {
            CudaStatus::Available { devices } => (
                devices
                    .iter()
                    .enumerate()
                    .map(|(i, d)| CudaDevice {
                        index: i,
                        name: d.name.clone(),
                        mem_bytes: d.mem_bytes,
                        arch: cuda::arch_for(d.sm),
                    })
                    .collect(),
                None,
            ),
            CudaStatus::Unavailable(why) => (vec![], Some(why)),
        };
        Self {
            cpu_name: c.name,
            cpu_features: flags.iter().filter(|f| f.1).map(|f| f.0.to_string()).collect(),
            cpu_kernels: crate::backends::cpu::kernels::available()
                .iter()
                .map(|s| s.to_string())
                .collect(),
            amx: crate::backends::cpu::kernels::amx_status_text(),
            cuda,
            cuda_reason,
        }
    }

    /// A made-up CPU-only machine (tests, what-if plans).
    pub fn cpu_only(kernels: &[&str]) -> Self {
        Self {
            cpu_name: "synthetic cpu".into(),
            cpu_features: vec![],
            cpu_kernels: kernels.iter().map(|s| s.to_string()).collect(),
            amx: if kernels.contains(&"amx") {
                "granted".into()
            } else {
                "absent".into()
            },
            cuda: vec![],
            cuda_reason: Some("synthetic: no CUDA".into()),
        }
    }

    /// The same machine with one CUDA device added.
    pub fn with_cuda(mut self, name: &str, mem_bytes: usize) -> Self {
        self.cuda.push(CudaDevice {
            index: self.cuda.len(),
            name: name.into(),
            mem_bytes,
            arch: "sm_90".into(),
        });
        self.cuda_reason = None;
        self
    }

    pub fn has_cuda(&self) -> bool {
        !self.cuda.is_empty()
    }

    /// Best kernel for few tokens (vector path): the first non-AMX kernel.
    pub fn cpu_vector_kernel(&self) -> &str {
        self.cpu_kernels
            .iter()
            .find(|k| *k != "amx")
            .map_or("scalar", String::as_str)
    }

    /// Best kernel for many tokens (matrix path): AMX when granted, else the
    /// best kernel over the 2-bit tile layout (vnni3's 1.6-bit layout only
    /// pays where decode is memory-bound), else the vector kernel.
    pub fn cpu_matrix_kernel(&self) -> &str {
        match self.cpu_kernels.iter().any(|k| k == "amx") {
            true => "amx",
            false => self
                .cpu_kernels
                .iter()
                .find(|k| *k != "vnni3")
                .map_or(self.cpu_vector_kernel(), String::as_str),
        }
    }

    /// Stable id of this machine's compute: CPU name, features, kernels and
    /// CUDA device names (FNV-1a 64, hex). Names a tuning profile.
    pub fn fingerprint(&self) -> String {
        let mut s = self.cpu_name.clone();
        for part in self.cpu_features.iter().chain(&self.cpu_kernels) {
            s += "|";
            s += part;
        }
        for d in &self.cuda {
            s += "|cuda:";
            s += &d.name;
        }
        format!("{:016x}", fnv1a64(s.as_bytes()))
    }

    pub fn to_text(&self) -> String {
        let mut s = format!(
            "dispatch paths: cpu-vector {} | cpu-matrix {}",
            self.cpu_vector_kernel(),
            self.cpu_matrix_kernel()
        );
        match self.cuda.first() {
            Some(d) => s += &format!(" | cuda:{} {} ({})", d.index, d.name, d.arch),
            None => s += " | cuda n/a",
        }
        s += &format!("\n  machine fingerprint: {}\n", self.fingerprint());
        s
    }
}

pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}
