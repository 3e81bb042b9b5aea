//! Plans chosen for each phase on synthetic machines: CPU only, CPU + CUDA,
//! with and without a tuning profile.

use yinsen::backends::cpu::kernels::policy::KernelPolicy;
use yinsen::dispatch::plan::{default_cpu_policy, Path, Phase, Planner};
use yinsen::dispatch::profile::{crossover_rules, KvMovePoint, Profile, SweepPoint, PROFILE_VERSION};
use yinsen::dispatch::Capabilities;

fn pt(path: &str, tokens: usize, ms: f64) -> SweepPoint {
    SweepPoint {
        path: path.into(),
        tokens,
        ms,
    }
}

fn profile(caps: &Capabilities, path_rules: Vec<(usize, String)>, points: Vec<SweepPoint>) -> Profile {
    Profile {
        version: PROFILE_VERSION,
        fingerprint: caps.fingerprint(),
        cpu_name: caps.cpu_name.clone(),
        cuda_devices: vec![],
        model: "synthetic:tiny".into(),
        threads: 1,
        created_unix: 0,
        cpu_policy: KernelPolicy {
            rules: vec![(1, "vnni".into()), (64, "amx".into())],
        },
        path_rules,
        points,
        kv_move: vec![],
    }
}

#[test]
fn cpu_only_everything_on_cpu_vector_then_amx() {
    let caps = Capabilities::cpu_only(&["vnni", "avx2", "scalar", "amx"]);
    let p = Planner::new(caps, None);
    for (phase, n) in [(Phase::Decode, 1), (Phase::Prefill, 512), (Phase::Embed, 64)] {
        let plan = p.plan(phase, n, None, 0);
        assert_eq!(plan.path, Path::Cpu, "{phase:?}");
        assert_eq!(plan.source, "only path");
    }
    assert_eq!(p.plan(Phase::Decode, 1, None, 0).cpu_kernel.as_deref(), Some("vnni"));
    let t = yinsen::backends::cpu::kernels::AMX_MIN_TOKENS;
    assert_eq!(
        p.plan(Phase::Prefill, t - 1, None, 0).cpu_kernel.as_deref(),
        Some("vnni")
    );
    assert_eq!(p.plan(Phase::Prefill, t, None, 0).cpu_kernel.as_deref(), Some("amx"));
    let e = p.plan(Phase::Embed, 8, None, 0);
    assert!(e.lm_head.starts_with("skipped"), "{}", e.lm_head);
}

#[test]
fn cpu_only_without_amx_has_one_kernel() {
    let caps = Capabilities::cpu_only(&["avx2", "scalar"]);
    let pol = default_cpu_policy(&caps);
    assert_eq!(pol.rules, vec![(1, "avx2".to_string())]);
    assert_eq!(caps.cpu_matrix_kernel(), "avx2");
}

#[test]
fn cpu_plus_cuda_default_rules_follow_the_seed() {
    let caps = Capabilities::cpu_only(&["vnni", "avx2", "scalar"]).with_cuda("Fake GPU", 80 << 30);
    let p = Planner::new(caps, None);
    let d = p.plan(Phase::Decode, 1, None, 0);
    assert_eq!((d.path, d.source.as_str()), (Path::Cuda, "default rules"));
    assert_eq!(d.attention, "cuda:0");
    assert_eq!(p.plan(Phase::Prefill, 15, None, 0).path, Path::Cuda);
    assert_eq!(p.plan(Phase::Prefill, 16, None, 0).path, Path::Cpu);
    assert_eq!(p.plan(Phase::Embed, 256, None, 0).path, Path::Cpu);
    assert_eq!(p.plan(Phase::Embed, 3, None, 0).path, Path::Cpu);
    // Decode after a CPU prefill moves the cache to the GPU.
    let mv = p.plan(Phase::Decode, 1, Some(Path::Cpu), 100);
    assert_eq!(mv.kv_move_from, Some(Path::Cpu));
    // The CUDA path gone (e.g. failed to build): CPU only.
    assert_eq!(p.plan_with(Phase::Decode, 1, None, 0, false).path, Path::Cpu);
}

#[test]
fn forced_path_wins() {
    let caps = Capabilities::cpu_only(&["avx2"]).with_cuda("Fake GPU", 1 << 30);
    let mut p = Planner::new(caps, None);
    p.force = Some(Path::Cpu);
    assert_eq!(p.plan(Phase::Decode, 1, None, 0).path, Path::Cpu);
}

#[test]
fn profile_rules_replace_defaults_and_kv_move_cost_counts() {
    let caps = Capabilities::cpu_only(&["vnni", "avx2", "scalar"]).with_cuda("Fake GPU", 80 << 30);
    let points = vec![
        pt("cpu/vnni", 1, 10.0),
        pt("cuda", 1, 2.0),
        pt("cpu/vnni", 64, 20.0),
        pt("cuda", 64, 5.0),
    ];
    // The measured profile says the GPU wins everywhere.
    let rules = crossover_rules(&points, &["cpu/vnni".into(), "cuda".into()]);
    assert_eq!(rules, vec![(1, "cuda".to_string())]);
    let mut prof = profile(&caps, vec![(1, "cuda".into())], points);
    prof.validate("test").unwrap();
    let p = Planner::new(caps.clone(), Some(prof.clone()));
    let pre = p.plan(Phase::Prefill, 512, None, 0);
    assert_eq!(pre.path, Path::Cuda);
    assert!(pre.source.starts_with("profile "), "{}", pre.source);
    // A cache on the CPU: a cheap move is made, an expensive one is not.
    let kv = |cuda_ms: f64| KvMovePoint {
        positions: 1000,
        bytes: 1,
        export_cpu_ms: 0.0,
        import_cpu_ms: 0.0,
        export_cuda_ms: Some(cuda_ms),
        import_cuda_ms: Some(cuda_ms),
    };
    prof.kv_move = vec![kv(0.1)];
    let p = Planner::new(caps.clone(), Some(prof.clone()));
    assert_eq!(p.plan(Phase::Decode, 1, Some(Path::Cpu), 1000).path, Path::Cuda);
    prof.kv_move = vec![kv(100.0)];
    let p = Planner::new(caps, Some(prof));
    let stay = p.plan(Phase::Decode, 1, Some(Path::Cpu), 1000);
    assert_eq!(stay.path, Path::Cpu, "{}", stay.summary());
    assert_eq!(stay.kv_move_from, None);
}

#[test]
fn crossover_finds_the_kernel_switch() {
    let points = vec![
        pt("cpu/vnni", 1, 1.0),
        pt("cpu/amx", 1, 3.0),
        pt("cpu/vnni", 16, 8.0),
        pt("cpu/amx", 16, 9.0),
        pt("cpu/vnni", 64, 40.0),
        pt("cpu/amx", 64, 12.0),
        pt("cpu/vnni", 256, 160.0),
        pt("cpu/amx", 256, 30.0),
    ];
    let r = crossover_rules(&points, &["cpu/vnni".into(), "cpu/amx".into()]);
    assert_eq!(r, vec![(1, "cpu/vnni".to_string()), (64, "cpu/amx".to_string())]);
}

#[test]
fn bad_profiles_are_rejected_with_the_file_name() {
    let caps = Capabilities::cpu_only(&["scalar"]);
    let base = profile(&caps, vec![(1, "cpu".into())], vec![pt("cpu/scalar", 1, 1.0)]);
    let mut p = base.clone();
    p.path_rules = vec![(4, "cpu".into())];
    assert!(p.validate("x.json").unwrap_err().to_string().contains("x.json"));
    let mut p = base.clone();
    p.path_rules = vec![(1, "tpu".into())];
    assert!(p.validate("x.json").is_err());
    let mut p = base.clone();
    p.points[0].ms = f64::NAN;
    assert!(p.validate("x.json").is_err());
    let mut p = base;
    p.version = 99;
    assert!(p.validate("x.json").is_err());
    // Garbage and missing files are errors, not panics.
    let dir = std::env::temp_dir().join(format!("yinsen-dispatch-plan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("garbage.json");
    std::fs::write(&f, b"{\"version\": 1, \"fingerprint\": [").unwrap();
    let e = Profile::load(&f).unwrap_err().to_string();
    assert!(e.contains("garbage.json"), "{e}");
    assert!(Profile::load(&dir.join("missing.json")).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fingerprint_depends_on_devices() {
    let a = Capabilities::cpu_only(&["avx2"]);
    let b = a.clone().with_cuda("GPU", 1);
    assert_ne!(a.fingerprint(), b.fingerprint());
    assert_eq!(a.fingerprint(), Capabilities::cpu_only(&["avx2"]).fingerprint());
    assert_eq!(a.fingerprint().len(), 16);
}
