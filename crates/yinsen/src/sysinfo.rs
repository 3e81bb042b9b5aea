//! What this machine can run: CPU name and features, AMX permission,
//! thread counts. (CUDA devices are probed by the cuda backend.)

use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct CpuInfo {
    pub name: String,
    pub logical_cores: usize,
    pub physical_cores: Option<usize>,
    pub avx2: bool,
    pub fma: bool,
    pub f16c: bool,
    pub avx512f: bool,
    pub avx512bw: bool,
    pub avx512_vnni: bool,
    /// Byte permutes (`vpermi2b`), which the vnni3 kernel needs.
    pub avx512_vbmi: bool,
    pub amx_int8: bool,
    pub amx_tile: bool,
}

/// Physical cores from /proc/cpuinfo (unique (physical id, core id) pairs).
pub fn physical_cores() -> Option<usize> {
    let s = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mut set = std::collections::HashSet::new();
    let mut phys = "0".to_string();
    for line in s.lines() {
        if let Some((k, v)) = line.split_once(':') {
            match k.trim() {
                "physical id" => phys = v.trim().to_string(),
                "core id" => {
                    set.insert((phys.clone(), v.trim().to_string()));
                }
                _ => {}
            }
        }
    }
    (!set.is_empty()).then_some(set.len())
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

#[cfg(target_arch = "x86_64")]
fn cpuid7_edx() -> u32 {
    // CPUID is always available on x86-64; leaf 7 reads zeros where absent.
    std::arch::x86_64::__cpuid_count(7, 0).edx
}

pub fn cpu_info() -> CpuInfo {
    #[cfg(target_arch = "x86_64")]
    let f = |name: &str| -> bool {
        match name {
            "avx2" => std::is_x86_feature_detected!("avx2"),
            "fma" => std::is_x86_feature_detected!("fma"),
            "f16c" => std::is_x86_feature_detected!("f16c"),
            "avx512f" => std::is_x86_feature_detected!("avx512f"),
            "avx512bw" => std::is_x86_feature_detected!("avx512bw"),
            "avx512vnni" => std::is_x86_feature_detected!("avx512vnni"),
            "avx512vbmi" => std::is_x86_feature_detected!("avx512vbmi"),
            // AMX detection is unstable in std: read CPUID.(7,0):EDX directly.
            "amx-int8" => cpuid7_edx() >> 25 & 1 == 1,
            "amx-tile" => cpuid7_edx() >> 24 & 1 == 1,
            _ => false,
        }
    };
    #[cfg(not(target_arch = "x86_64"))]
    let f = |_: &str| false;
    CpuInfo {
        name: cpu_name(),
        logical_cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        physical_cores: physical_cores(),
        avx2: f("avx2"),
        fma: f("fma"),
        f16c: f("f16c"),
        avx512f: f("avx512f"),
        avx512bw: f("avx512bw"),
        avx512_vnni: f("avx512vnni"),
        avx512_vbmi: f("avx512vbmi"),
        amx_int8: f("amx-int8"),
        amx_tile: f("amx-tile"),
    }
}

/// Everything `yinsen info` reports.
#[derive(Clone, Debug, Serialize)]
pub struct MachineInfo {
    pub cpu: CpuInfo,
    pub default_threads: usize,
    /// CPU kernels usable here, best first.
    pub cpu_kernels: Vec<String>,
    /// AMX tile-data permission: "granted", "unsupported" or "denied: <why>".
    pub amx: String,
    /// CUDA devices, or why there are none.
    pub cuda: CudaInfo,
    /// What the dispatcher can route to (paths, fingerprint).
    pub capabilities: crate::dispatch::Capabilities,
}

#[derive(Clone, Debug, Serialize)]
pub struct CudaInfo {
    pub available: bool,
    pub devices: Vec<String>,
    pub reason: Option<String>,
}

pub fn machine_info() -> MachineInfo {
    MachineInfo {
        cpu: cpu_info(),
        default_threads: crate::backends::cpu::forward::default_threads(),
        cpu_kernels: crate::backends::cpu::kernels::available()
            .iter()
            .map(|s| s.to_string())
            .collect(),
        amx: crate::backends::cpu::kernels::amx_status_text(),
        cuda: crate::dispatch::cuda_info(),
        capabilities: crate::dispatch::Capabilities::detect(),
    }
}

impl MachineInfo {
    pub fn to_text(&self) -> String {
        let c = &self.cpu;
        let yn = |b: bool| if b { "yes" } else { "no" };
        let mut s = format!(
            "cpu: {}\n  logical cores {}, physical cores {}, default threads {}\n  avx2 {} fma {} f16c {} avx512f {} avx512bw {} avx512_vnni {} avx512_vbmi {} amx_tile {} amx_int8 {}\n  amx tile permission: {}\n  cpu kernels: {}\n",
            c.name,
            c.logical_cores,
            c.physical_cores.map_or("?".into(), |n| n.to_string()),
            self.default_threads,
            yn(c.avx2),
            yn(c.fma),
            yn(c.f16c),
            yn(c.avx512f),
            yn(c.avx512bw),
            yn(c.avx512_vnni),
            yn(c.avx512_vbmi),
            yn(c.amx_tile),
            yn(c.amx_int8),
            self.amx,
            self.cpu_kernels.join(", "),
        );
        if self.cuda.available {
            s += &format!("cuda: {} device(s)\n", self.cuda.devices.len());
            for d in &self.cuda.devices {
                s += &format!("  {d}\n");
            }
        } else {
            s += &format!("cuda: {}\n", self.cuda.reason.as_deref().unwrap_or("no CUDA device"));
        }
        s += &self.capabilities.to_text();
        s
    }
}
