//! [`HybridBackend`]: a `Backend` that runs each call on the path its plan
//! picks, moving the sequence's KV cache along when the path changes.

use std::any::Any;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

use super::plan::{Path, Phase, Plan, Planner};
use crate::backends::cpu::forward::check_forward_args;
use crate::backends::{Backend, KvCache, KvSnapshot, Output};
use crate::error::{Error, Result};
use crate::model::ModelConfig;

/// How weights of the two paths are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightMode {
    /// Option A: every path's layout resident from start-up.
    Dual,
    /// Option B: a path's layout is built on first use; when both exceed
    /// `budget` bytes, the idle one is dropped (rebuilt if needed again).
    Lazy { budget: Option<usize> },
}

pub type Builder = Box<dyn Fn() -> Result<Arc<dyn Backend>> + Send + Sync>;

/// One path's backend, built now or on first use.
pub struct Slot {
    pub path: Path,
    build: Builder,
    cur: Mutex<Option<Arc<dyn Backend>>>,
    builds: Mutex<(usize, f64)>,
}

impl Slot {
    pub fn new(path: Path, build: Builder) -> Self {
        Self {
            path,
            build,
            cur: Mutex::new(None),
            builds: Mutex::new((0, 0.0)),
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Option<Arc<dyn Backend>>>> {
        self.cur
            .lock()
            .map_err(|_| Error::backend("hybrid", "slot lock poisoned"))
    }

    pub fn get(&self) -> Result<Arc<dyn Backend>> {
        let mut cur = self.lock()?;
        if let Some(b) = cur.as_ref() {
            return Ok(b.clone());
        }
        let t = Instant::now();
        let b = (self.build)()?;
        if let Ok(mut s) = self.builds.lock() {
            s.0 += 1;
            s.1 += t.elapsed().as_secs_f64() * 1e3;
        }
        *cur = Some(b.clone());
        Ok(b)
    }

    /// Built backend, if any (no build).
    pub fn peek(&self) -> Option<Arc<dyn Backend>> {
        self.lock().ok().and_then(|c| c.clone())
    }

    /// Drop the weights (caches still on this path keep their backend alive).
    fn release(&self) {
        if let Ok(mut c) = self.lock() {
            *c = None;
        }
    }
}

/// Resident weights of one path, for reports.
#[derive(Clone, Debug, Serialize)]
pub struct PathResidency {
    pub path: Path,
    pub backend: Option<String>,
    pub resident_weight_bytes: usize,
    pub builds: usize,
    pub build_ms: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct HybridStats {
    pub cpu_calls: usize,
    pub cuda_calls: usize,
    pub kv_moves: usize,
    pub kv_moved_bytes: usize,
    pub kv_move_ms: f64,
}

pub struct HybridBackend {
    config: ModelConfig,
    pub planner: Planner,
    cpu: Slot,
    cuda: Option<Slot>,
    mode: WeightMode,
    explain: bool,
    /// Cleared when the CUDA path fails to build (e.g. a model it cannot run).
    cuda_ok: std::sync::atomic::AtomicBool,
    /// Notes for the user (profile ignored, CUDA fallback, ...).
    pub notes: Mutex<Vec<String>>,
    last_plan: Mutex<Option<Plan>>,
    stats: Mutex<HybridStats>,
}

/// A cache, the path it is on, and the backend that made it (kept alive
/// with it, so lazily dropped weights never strand a cache).
type Placed = (Path, Arc<dyn Backend>, Box<dyn KvCache>);

/// A sequence's cache on whichever path holds it (made on first use).
struct HybridCache {
    inner: Option<Placed>,
    capacity: usize,
}

impl KvCache for HybridCache {
    fn len(&self) -> usize {
        self.inner.as_ref().map_or(0, |i| i.2.len())
    }
    fn capacity(&self) -> usize {
        self.capacity
    }
    fn truncate(&mut self, n: usize) {
        if let Some(i) = self.inner.as_mut() {
            i.2.truncate(n);
        }
    }
    fn resident_bytes(&self) -> usize {
        self.inner.as_ref().map_or(0, |i| i.2.resident_bytes())
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

impl HybridBackend {
    /// Plan the call of `tokens` (path, where the cache lives), move the
    /// cache if the plan says so, then run `call` on the planned backend and
    /// its cache, and count it if it ran (`forward`, the picks).
    fn run_planned<T: Ran>(
        &self,
        cache: &mut dyn KvCache,
        tokens: &[u32],
        output: Output,
        call: impl FnOnce(&Arc<dyn Backend>, &mut dyn KvCache) -> Result<T>,
    ) -> Result<T> {
        let hc = cache
            .as_any_mut()
            .downcast_mut::<HybridCache>()
            .ok_or_else(|| Error::backend("hybrid", "KV cache belongs to another backend"))?;
        check_forward_args(&self.config, hc.len(), hc.capacity, tokens)?;
        let kv_on = hc.inner.as_ref().map(|i| i.0);
        let mut plan = self.plan_for(tokens.len(), output, kv_on, hc.len());
        let be = match self.slot(plan.path)?.get() {
            Ok(b) => b,
            // A lazily built CUDA path that cannot run this model: CPU from now on.
            Err(Error::Unsupported(why)) if plan.path == Path::Cuda => {
                self.cuda_ok.store(false, std::sync::atomic::Ordering::Relaxed);
                self.note(format!("CUDA path unusable, staying on the CPU: {why}"));
                plan = self.plan_for(tokens.len(), output, kv_on, hc.len());
                self.cpu.get()?
            }
            Err(e) => return Err(e),
        };
        if self.explain {
            eprintln!("[plan] {}", plan.summary());
        }
        match hc.inner.as_ref().map(|i| i.0) {
            Some(p) if p != plan.path => self.move_cache(hc, plan.path, &be)?,
            Some(_) => {}
            None => hc.inner = Some((plan.path, be.clone(), be.new_cache(hc.capacity)?)),
        }
        let (_, owner, inner) = hc.inner.as_mut().expect("placed above");
        let out = call(owner, inner.as_mut())?;
        if !out.ran() {
            return Ok(out);
        }
        self.record(plan);
        Ok(out)
    }

    /// A call that ran on `plan`'s path: counted, the budget kept, the plan
    /// kept for reports.
    fn record(&self, plan: Plan) {
        if let Ok(mut s) = self.stats.lock() {
            match plan.path {
                Path::Cpu => s.cpu_calls += 1,
                Path::Cuda => s.cuda_calls += 1,
            }
        }
        self.enforce_budget(plan.path);
        if let Ok(mut lp) = self.last_plan.lock() {
            *lp = Some(plan);
        }
    }

    /// A batched step, planned as a call of that many tokens (a batch of 16
    /// goes where 16 tokens of one sequence would): every cache moves to that
    /// path and its backend runs `call` on them.
    fn run_batch<T: Ran>(
        &self,
        caches: &mut [&mut dyn KvCache],
        tokens: &[u32],
        call: impl FnOnce(&Arc<dyn Backend>, &mut [&mut dyn KvCache]) -> Result<T>,
    ) -> Result<T> {
        let mut hcs = crate::backends::batch_caches::<HybridCache>(&self.config, caches, tokens, "hybrid")?;
        let plan = self.plan_for(tokens.len(), Output::LastLogits, None, 0);
        let be = self.slot(plan.path)?.get()?;
        if self.explain {
            eprintln!("[plan] batch of {}: {}", tokens.len(), plan.summary());
        }
        for hc in hcs.iter_mut() {
            match hc.inner.as_ref() {
                Some((p, owner, _)) if *p == plan.path && Arc::ptr_eq(owner, &be) => {}
                Some(_) => self.move_cache(hc, plan.path, &be)?,
                None => hc.inner = Some((plan.path, be.clone(), be.new_cache(hc.capacity)?)),
            }
        }
        let mut inner: Vec<&mut dyn KvCache> = hcs
            .iter_mut()
            .map(|hc| hc.inner.as_mut().expect("placed above").2.as_mut() as &mut dyn KvCache)
            .collect();
        let out = call(&be, &mut inner)?;
        if !out.ran() {
            return Ok(out);
        }
        self.record(plan);
        Ok(out)
    }

    /// `cuda` is None on machines (or models) without a GPU path. In `Dual`
    /// mode both paths are built now.
    pub fn new(config: ModelConfig, planner: Planner, cpu: Slot, cuda: Option<Slot>, mode: WeightMode) -> Result<Self> {
        let mut planner = planner;
        planner.cuda_usable = cuda.is_some();
        let h = Self {
            config,
            planner,
            cpu,
            cuda,
            mode,
            explain: false,
            cuda_ok: true.into(),
            notes: Mutex::new(Vec::new()),
            last_plan: Mutex::new(None),
            stats: Mutex::new(HybridStats::default()),
        };
        if mode == WeightMode::Dual {
            h.cpu.get()?;
            if let Some(c) = &h.cuda {
                match c.get() {
                    Ok(_) => {}
                    Err(Error::Unsupported(why)) => {
                        h.cuda_ok.store(false, std::sync::atomic::Ordering::Relaxed);
                        h.note(format!("CUDA path unusable, CPU only: {why}"));
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(h)
    }

    /// Print every call's plan on stderr.
    pub fn set_explain(&mut self, on: bool) {
        self.explain = on;
    }

    fn slot(&self, p: Path) -> Result<&Slot> {
        match p {
            Path::Cpu => Ok(&self.cpu),
            Path::Cuda => self
                .cuda
                .as_ref()
                .ok_or_else(|| Error::Unsupported("no CUDA path on this machine".into())),
        }
    }

    pub fn note(&self, s: String) {
        if let Ok(mut n) = self.notes.lock() {
            n.push(s);
        }
    }

    pub fn last_plan(&self) -> Option<Plan> {
        self.last_plan.lock().ok().and_then(|p| p.clone())
    }

    pub fn stats(&self) -> HybridStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn mode(&self) -> WeightMode {
        self.mode
    }

    /// The backend of one path (built if needed).
    pub fn path_backend(&self, p: Path) -> Result<Arc<dyn Backend>> {
        self.slot(p)?.get()
    }

    pub fn residency(&self) -> Vec<PathResidency> {
        std::iter::once(&self.cpu)
            .chain(self.cuda.as_ref())
            .map(|s| {
                let b = s.peek();
                let (builds, build_ms) = s.builds.lock().map(|b| *b).unwrap_or((0, 0.0));
                PathResidency {
                    path: s.path,
                    backend: b.as_ref().map(|b| b.name()),
                    resident_weight_bytes: b.as_ref().map_or(0, |b| b.resident_weight_bytes()),
                    builds,
                    build_ms,
                }
            })
            .collect()
    }

    /// The plan a call would get (nothing runs).
    pub fn plan_for(&self, n_tokens: usize, output: Output, kv_on: Option<Path>, kv_len: usize) -> Plan {
        let phase = Phase::of(n_tokens, output == Output::Hidden);
        let cuda_ok = self.cuda.is_some() && self.cuda_ok.load(std::sync::atomic::Ordering::Relaxed);
        self.planner.plan_with(phase, n_tokens, kv_on, kv_len, cuda_ok)
    }

    /// Lazy mode: over budget, drop the weights of the path not just used.
    fn enforce_budget(&self, used: Path) {
        let WeightMode::Lazy { budget: Some(budget) } = self.mode else {
            return;
        };
        let total: usize = self.residency().iter().map(|r| r.resident_weight_bytes).sum();
        if total > budget {
            let other = if used == Path::Cpu { Path::Cuda } else { Path::Cpu };
            if let Ok(s) = self.slot(other) {
                s.release();
            }
        }
    }

    /// Move `hc` to `to`: export f32 K/V from its path, import on `to`.
    fn move_cache(&self, hc: &mut HybridCache, to: Path, dest: &Arc<dyn Backend>) -> Result<()> {
        let Some((_, from_be, cache)) = hc.inner.as_mut() else {
            return Ok(());
        };
        let t = Instant::now();
        let snap: KvSnapshot = from_be.export_kv(cache.as_mut())?;
        let new = dest.import_kv(&snap, hc.capacity)?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        hc.inner = Some((to, dest.clone(), new));
        if let Ok(mut s) = self.stats.lock() {
            s.kv_moves += 1;
            s.kv_moved_bytes += snap.bytes();
            s.kv_move_ms += ms;
        }
        Ok(())
    }
}

/// Whether a backend call ran (a pick a path does not offer runs nothing
/// and is not counted).
trait Ran {
    fn ran(&self) -> bool;
}
impl Ran for Vec<f32> {
    fn ran(&self) -> bool {
        true
    }
}
impl<T> Ran for Option<T> {
    fn ran(&self) -> bool {
        self.is_some()
    }
}

impl Backend for HybridBackend {
    fn name(&self) -> String {
        let built = |s: &Slot| s.peek().map_or(format!("{} (lazy)", s.path.as_str()), |b| b.name());
        match &self.cuda {
            Some(c) => format!("hybrid[{} | {}]", built(&self.cpu), built(c)),
            None => format!("hybrid[{}]", built(&self.cpu)),
        }
    }
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn new_cache(&self, capacity: usize) -> Result<Box<dyn KvCache>> {
        if capacity == 0 {
            return Err(Error::input("cache capacity 0"));
        }
        Ok(Box::new(HybridCache {
            inner: None,
            capacity: capacity.min(self.config.max_ctx),
        }))
    }
    fn forward(&self, cache: &mut dyn KvCache, tokens: &[u32], output: Output) -> Result<Vec<f32>> {
        self.run_planned(cache, tokens, output, |be, c| be.forward(c, tokens, output))
    }
    // The planned path picks (CUDA on the device, the CPU through its
    // screened head); a path that does not offer it runs nothing.
    fn forward_greedy(&self, cache: &mut dyn KvCache, token: u32) -> Result<Option<u32>> {
        self.run_planned(cache, &[token], Output::LastLogits, |be, c| be.forward_greedy(c, token))
    }
    fn forward_top_k(&self, cache: &mut dyn KvCache, token: u32, k: usize) -> Result<Option<Vec<(u32, f32)>>> {
        self.run_planned(cache, &[token], Output::LastLogits, |be, c| {
            be.forward_top_k(c, token, k)
        })
    }
    fn forward_batch(&self, caches: &mut [&mut dyn KvCache], tokens: &[u32]) -> Result<Vec<f32>> {
        self.run_batch(caches, tokens, |be, c| be.forward_batch(c, tokens))
    }
    fn forward_batch_pick(
        &self,
        caches: &mut [&mut dyn KvCache],
        tokens: &[u32],
        picks: &[(usize, bool)],
    ) -> Result<Option<crate::backends::BatchPicks>> {
        self.run_batch(caches, tokens, |be, c| be.forward_batch_pick(c, tokens, picks))
    }
    fn resident_weight_bytes(&self) -> usize {
        self.residency().iter().map(|r| r.resident_weight_bytes).sum()
    }
    fn hybrid(&self) -> Option<&HybridBackend> {
        Some(self)
    }
    fn export_kv(&self, cache: &mut dyn KvCache) -> Result<KvSnapshot> {
        let hc = cache
            .as_any_mut()
            .downcast_mut::<HybridCache>()
            .ok_or_else(|| Error::backend("hybrid", "KV export: cache belongs to another backend"))?;
        match hc.inner.as_mut() {
            Some((_, be, c)) => be.export_kv(c.as_mut()),
            None => Ok(KvSnapshot {
                len: 0,
                kv_dim: self.config.kv_dim(),
                k: vec![Vec::new(); self.config.n_layers],
                v: vec![Vec::new(); self.config.n_layers],
            }),
        }
    }
    fn import_kv(&self, snap: &KvSnapshot, capacity: usize) -> Result<Box<dyn KvCache>> {
        snap.validate(&self.config, capacity)?;
        let be = self.cpu.get()?;
        Ok(Box::new(HybridCache {
            inner: Some((Path::Cpu, be.clone(), be.import_kv(snap, capacity)?)),
            capacity: capacity.min(self.config.max_ctx),
        }))
    }
}
