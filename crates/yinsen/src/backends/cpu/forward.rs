//! The CPU forward pass: the model graph over [`Linear`] and [`ops`], with a
//! persistent thread pool (rayon) and an f32 KV cache per sequence.

use std::any::Any;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use rayon::prelude::*;

use super::attention::{self, AttnInput, AttnShape};
use super::decode_attention;
use super::head_screen::{HeadScreen, ScreenCounters, ScreenCounts};
use super::kernels::policy::KernelPolicy;
use super::linear::{Epilogue, Linear, QuantizedInput};
use super::lm_head::{self, HeadQ8, Q8Act};
use super::ops;
use super::spin_pool::{Par, SendPtr, SpinPool};
use crate::backends::{Backend, KvCache, Output};
use crate::error::{Error, Result};
use crate::model::{Activation, DenseMatrix, Model, ModelConfig};

/// Per-phase wall time of one forward, printed to stderr when
/// `YINSEN_PROFILE=1`: tells where a forward spends its time without a profiler.
struct PhaseTimes {
    on: bool,
    last: Instant,
    acc: Vec<(&'static str, f64)>,
}

impl PhaseTimes {
    fn new() -> Self {
        static ON: OnceLock<bool> = OnceLock::new();
        let on = *ON.get_or_init(|| std::env::var("YINSEN_PROFILE").is_ok_and(|v| v == "1"));
        Self {
            on,
            last: Instant::now(),
            acc: Vec::new(),
        }
    }

    /// Charge the time since the previous mark to `phase`.
    fn mark(&mut self, phase: &'static str) {
        if !self.on {
            return;
        }
        let now = Instant::now();
        let dt = (now - self.last).as_secs_f64() * 1e3;
        self.last = now;
        match self.acc.iter_mut().find(|(p, _)| *p == phase) {
            Some((_, t)) => *t += dt,
            None => self.acc.push((phase, dt)),
        }
    }

    fn report(&self, n_tokens: usize) {
        if !self.on {
            return;
        }
        let total: f64 = self.acc.iter().map(|(_, t)| t).sum();
        let parts: Vec<String> = self.acc.iter().map(|(p, t)| format!("{p} {t:.2}")).collect();
        eprintln!(
            "profile cpu forward n={n_tokens}: total {total:.2} ms: {}",
            parts.join(", ")
        );
    }
}

/// The activation buffers of a many-token forward, kept by the backend
/// between calls (one set; a concurrent forward makes its own).
#[derive(Default)]
struct ForwardBufs {
    x: Vec<f32>,
    qkv: Vec<f32>,
    q: Vec<f32>,
    att: Vec<f32>,
    act: Vec<f32>,
    att_scratch: attention::AttnScratch,
    /// The int8 inputs of the matmuls: `nq` for the hidden-size ones (3 per
    /// layer), `nq_ffn` for down's. Two, so neither changes length between
    /// layers: a grown Vec zero-fills its new part (2.2 MB per layer).
    nq: QuantizedInput,
    nq_ffn: QuantizedInput,
}

/// Most bytes of activation buffers (and, separately, of dropped KV caches)
/// the backend keeps for the next call: 512 tokens of 2B4T need ~40 / ~80 MB.
const KEEP_BUF_BYTES: usize = 256 << 20;

/// Layer buffers of dropped KV caches, handed to the next `new_cache`.
type KvFree = Arc<Mutex<Vec<Vec<f32>>>>;

struct PreparedLayer {
    qkv: Linear,
    o: Linear,
    gate_up: Linear,
    down: Linear,
}

pub struct CpuBackend {
    model: Arc<Model>,
    kernel: KernelPolicy,
    layers: Vec<PreparedLayer>,
    inv_freq: Vec<f32>,
    pool: rayon::ThreadPool,
    /// Decode's fork-joins (one-token matmuls, lm_head): spinning workers
    /// start a run far faster than sleeping rayon workers wake.
    spin: SpinPool,
    threads: usize,
    /// Optional 8-bit copy of the lm_head (halves decode bytes).
    lm_head_q8: Option<HeadQ8>,
    /// The screened head: greedy and top-k picks equal to the lm_head's own,
    /// reading its 8-bit copy plus the few rows that may win.
    head_screen: Option<HeadScreen>,
    screen_counts: ScreenCounters,
    bufs: Mutex<ForwardBufs>,
    /// Dropped caches' buffers: a cache made right after another is
    /// dropped (a new prompt, `yinsen bench` repetitions) writes into pages
    /// that are already mapped instead of faulting in ~80 MB at 512 tokens.
    kv_free: KvFree,
}

/// How to build a CPU backend.
#[derive(Clone, Debug)]
pub struct CpuOptions {
    /// "auto", "amx", "vnni3", "vnni", "avx2", "scalar".
    pub kernel: String,
    /// 0 = physical cores.
    pub threads: usize,
    /// Compute logits from a Q8_0 copy of the lm_head.
    pub lm_head_q8: bool,
    /// Keep an 8-bit copy of the lm_head to pick greedy / top-k tokens
    /// exactly as the lm_head itself would, reading about half its bytes
    /// (see `head_screen`). Ignored with `lm_head_q8`.
    pub lm_head_screen: bool,
    /// Kernel per token count (from a tuning profile); overrides `kernel`.
    pub policy: Option<KernelPolicy>,
}

impl Default for CpuOptions {
    fn default() -> Self {
        Self {
            kernel: "auto".into(),
            threads: 0,
            lm_head_q8: false,
            lm_head_screen: false,
            policy: None,
        }
    }
}

/// One sequence's share of a forward call: its cache and how many of the
/// call's tokens are its (in order).
struct Seg<'a> {
    cache: &'a mut CpuKvCache,
    n: usize,
}

/// f32 keys and values, `[layer][position][kv_dim]`, grown on demand.
pub struct CpuKvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
    capacity: usize,
    kv_dim: usize,
    /// Where the layer buffers go when the cache is dropped.
    free: Option<KvFree>,
}

impl Drop for CpuKvCache {
    fn drop(&mut self) {
        let Some(free) = &self.free else {
            return;
        };
        let Ok(mut f) = free.lock() else {
            return;
        };
        let mut kept: usize = f.iter().map(|v| v.capacity() * 4).sum();
        for mut v in self.k.drain(..).chain(self.v.drain(..)) {
            if v.capacity() == 0 || kept + v.capacity() * 4 > KEEP_BUF_BYTES {
                continue;
            }
            kept += v.capacity() * 4;
            v.clear();
            f.push(v);
        }
    }
}

impl KvCache for CpuKvCache {
    fn len(&self) -> usize {
        self.len
    }
    fn capacity(&self) -> usize {
        self.capacity
    }
    fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
        for l in self.k.iter_mut().chain(self.v.iter_mut()) {
            l.truncate(self.len * self.kv_dim);
        }
    }
    fn resident_bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(|l| l.capacity() * 4).sum()
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// Whether many-token forwards run their parallel regions on the spin pool
/// (default) or on rayon (`YINSEN_CPU_PREFILL_POOL=rayon`).
fn prefill_on_spin() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("YINSEN_CPU_PREFILL_POOL").map_or(true, |v| v != "rayon"))
}

/// How long spin-pool workers busy-wait between the regions of a
/// many-token forward before yielding, if `YINSEN_PREFILL_HOT_US` is set
/// (else the pool's 50 us). 1000 us measured no different from 50 on the
/// device (docs/performance.md, CPU prefill).
fn prefill_hot() -> Option<std::time::Duration> {
    static US: OnceLock<Option<u64>> = OnceLock::new();
    let us = *US.get_or_init(|| std::env::var("YINSEN_PREFILL_HOT_US").ok().and_then(|v| v.parse().ok()));
    us.map(std::time::Duration::from_micros)
}

/// Default thread count: physical cores (logical / 2 when SMT is likely on).
pub fn default_threads() -> usize {
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    crate::sysinfo::physical_cores().unwrap_or(logical).max(1)
}

impl CpuBackend {
    /// Prepare every ternary matrix in `kernel`'s layout.
    pub fn new(model: Arc<Model>, kernel: &str, threads: usize) -> Result<Self> {
        Self::with_options(
            model,
            &CpuOptions {
                kernel: kernel.into(),
                threads,
                ..CpuOptions::default()
            },
        )
    }

    pub fn with_options(model: Arc<Model>, opts: &CpuOptions) -> Result<Self> {
        let kernel = match &opts.policy {
            Some(p) => {
                p.validate()?;
                p.clone()
            }
            None => KernelPolicy::single(&opts.kernel)?,
        };
        let threads = if opts.threads == 0 {
            default_threads()
        } else {
            opts.threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("yinsen-cpu-{i}"))
            .build()
            .map_err(|e| Error::backend("cpu", e.to_string()))?;
        let spin = SpinPool::new(threads).map_err(|e| Error::backend("cpu", e.to_string()))?;
        let layers = pool.install(|| {
            model
                .layers
                .par_iter()
                .map(|l| -> Result<PreparedLayer> {
                    let k = &kernel;
                    Ok(PreparedLayer {
                        qkv: Linear::prepare(k, &[&l.wq, &l.wk, &l.wv])?,
                        o: Linear::prepare(k, &[&l.wo])?,
                        gate_up: Linear::prepare(k, &[&l.w_gate, &l.w_up])?,
                        down: Linear::prepare(k, &[&l.w_down])?,
                    })
                })
                .collect::<Result<Vec<_>>>()
        })?;
        let c = &model.config;
        let inv_freq = ops::rope_inv_freq(c.head_dim, c.rope_theta);
        let lm_head_q8 = match opts.lm_head_q8 {
            true => {
                let d = pool.install(|| model.lm_head().to_q8_0())?;
                Some(pool.install(|| HeadQ8::build_from_q8_0(d))?)
            }
            false => None,
        };
        let head_screen = match opts.lm_head_screen && lm_head_q8.is_none() {
            true => match pool.install(|| HeadScreen::build(model.lm_head())) {
                Ok(s) => Some(s),
                Err(Error::Unsupported(why)) => {
                    eprintln!("note: greedy / top-k picks read the whole lm_head: {why}");
                    None
                }
                Err(e) => return Err(e),
            },
            false => None,
        };
        Ok(Self {
            model,
            kernel,
            layers,
            inv_freq,
            pool,
            spin,
            threads,
            lm_head_q8,
            head_screen,
            screen_counts: ScreenCounters::default(),
            bufs: Mutex::new(ForwardBufs::default()),
            kv_free: KvFree::default(),
        })
    }

    /// How the screened head's picks went (None: no screened head).
    pub fn screen_counts(&self) -> Option<ScreenCounts> {
        self.head_screen.as_ref().map(|_| self.screen_counts.get())
    }

    pub fn kernel_policy(&self) -> &KernelPolicy {
        &self.kernel
    }
    pub fn threads(&self) -> usize {
        self.threads
    }
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    fn rms_rows(&self, x: &[f32], w: &[f32], dim: usize) -> Vec<f32> {
        let eps = self.model.config.rms_eps;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(dim)
            .zip(x.par_chunks(dim))
            .with_min_len(8)
            .for_each(|(ot, xt)| ops::rms_norm(xt, w, eps, ot));
        out
    }

    /// Causal GQA attention of `n` new tokens against the cache.
    /// Prefill attention (n > 1) into `out` (`[n][q_dim]`, fully overwritten).
    #[allow(clippy::too_many_arguments)]
    fn attention_into(
        &self,
        q: &[f32],
        kc: &[f32],
        vc: &[f32],
        p0: usize,
        n: usize,
        out: &mut [f32],
        scratch: &mut attention::AttnScratch,
        par: Par,
    ) {
        let c = &self.model.config;
        let shape = AttnShape {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
        };
        let isa = attention::Isa::available(c.head_dim)[0];
        let input = AttnInput::new(&shape, q, kc, vc, p0);
        attention::causal_attention_into(isa, input, n, out, scratch, par);
    }

    fn attention(&self, q: &[f32], kc: &[f32], vc: &[f32], p0: usize, n: usize) -> Vec<f32> {
        let c = &self.model.config;
        let shape = AttnShape {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
        };
        // Decode has one query per head: nothing to tile. Heads in
        // contiguous groups on the spin pool, whose workers would otherwise
        // spin against rayon's for the cores; the reference's bits
        // (decode_attention.rs).
        if n == 1 {
            let hd = c.head_dim;
            let mut out = vec![0f32; c.q_dim()];
            self.spin.for_ranges(&mut out, hd, |r0, o| {
                let input = AttnInput::new(&shape, q, kc, vc, p0);
                decode_attention::decode_heads(input, r0 / hd, o);
            });
            out
        } else {
            attention::causal_attention(&shape, q, kc, vc, p0, n)
        }
    }

    fn logits(&self, h: &[f32]) -> Vec<f32> {
        self.logits_chunks(h, super::linear::spin_chunks_per_thread())
    }

    /// Logits of every token of `h` from the lm_head in use; `per`: vocabulary
    /// chunks per spin-pool thread for one token (1 = fixed ranges).
    fn logits_chunks(&self, h: &[f32], per: usize) -> Vec<f32> {
        let hid = self.model.config.hidden;
        let n = h.len() / hid;
        match &self.lm_head_q8 {
            Some(HeadQ8::Act8(q)) => {
                // Quantised once per call (a few us), read by every thread.
                let a = q.quantize(h, n);
                self.logits_with(n, q.rows, per, |r0, t0, nt, o| q.rows_dot(r0, &a, t0, nt, o))
            }
            Some(HeadQ8::Dense(d)) => self.logits_dense(h, d, per),
            None => self.logits_dense(h, self.model.lm_head(), per),
        }
    }

    fn logits_dense(&self, h: &[f32], head: &DenseMatrix, per: usize) -> Vec<f32> {
        let hid = self.model.config.hidden;
        self.logits_with(h.len() / hid, head.rows, per, |r0, t0, nt, o| {
            lm_head::rows_dot(head, r0, &h[t0 * hid..(t0 + nt) * hid], nt, o, &mut Vec::new())
        })
    }

    /// `[n][vocab]` logits from `dot(r0, t0, nt, out)`, which writes rows
    /// `r0..` for tokens `t0..t0 + nt` (`out[j * nt + t]`, nt <= 4).
    fn logits_with(
        &self,
        n: usize,
        vocab: usize,
        per: usize,
        dot: impl Fn(usize, usize, usize, &mut [f32]) + Sync,
    ) -> Vec<f32> {
        if n == 1 {
            // Decode: vocabulary ranges on the spin pool.
            let mut out = vec![0f32; vocab];
            let one = |r0: usize, o: &mut [f32]| dot(r0, 0, 1, o);
            if per <= 1 {
                self.spin.for_ranges(&mut out, 16, one);
            } else {
                let chunk = super::spin_pool::split_len(vocab, self.threads * per, 16);
                self.spin.for_chunks(&mut out, chunk, one);
            }
            return out;
        }
        // Row blocks small enough to stay in L2 while every group of up to
        // 4 tokens (the SIMD kernels' register budget) passes over them: the
        // lm_head is streamed from memory once per call, not once per group.
        let block = 64;
        let mut by_block = vec![0f32; vocab * n];
        by_block.par_chunks_mut(block * n).enumerate().for_each(|(bi, ch)| {
            let rows = ch.len() / n;
            for t0 in (0..n).step_by(4) {
                let nt = (n - t0).min(4);
                dot(bi * block, t0, nt, &mut ch[rows * t0..rows * (t0 + nt)]);
            }
        });
        // Block bi, group t0: rows x nt values, token fastest.
        let mut out = vec![0f32; n * vocab];
        for (bi, ch) in by_block.chunks(block * n).enumerate() {
            let rows = ch.len() / n;
            for t0 in (0..n).step_by(4) {
                let nt = (n - t0).min(4);
                for (j, v) in ch[rows * t0..rows * (t0 + nt)].chunks_exact(nt).enumerate() {
                    for (t, &x) in v.iter().enumerate() {
                        out[(t0 + t) * vocab + bi * block + j] = x;
                    }
                }
            }
        }
        out
    }

    /// Run one token and return the `k` best next tokens with their logits,
    /// ranked as `logits::ranked` ranks the full head's logits (`greedy`: the
    /// argmax as `logits::argmax` picks it), through the screened head: the
    /// 8-bit copy's logits, then the lm_head's own rows for the candidates
    /// only. None (nothing run) without a screened head.
    fn pick(&self, cache: &mut dyn KvCache, token: u32, k: usize, greedy: bool) -> Result<Option<Vec<(u32, f32)>>> {
        let Some(screen) = &self.head_screen else {
            return Ok(None);
        };
        let vocab = self.model.config.vocab;
        if k == 0 || k > vocab {
            return Ok(None);
        }
        let cache = cache
            .as_any_mut()
            .downcast_mut::<CpuKvCache>()
            .ok_or_else(|| Error::backend("cpu", "KV cache belongs to another backend"))?;
        check_forward_args(&self.model.config, cache.len, cache.capacity, &[token])?;
        let h = self
            .pool
            .install(|| self.forward_inner(&mut [Seg { cache, n: 1 }], &[token], Output::Hidden))?;
        Ok(Some(self.pick_row(screen, &h, k, greedy)))
    }

    /// A batched step's sequences, each checked (one token, room for it).
    fn batch_segs<'c>(&self, caches: &'c mut [&mut dyn KvCache], tokens: &[u32]) -> Result<Vec<Seg<'c>>> {
        let caches = crate::backends::batch_caches::<CpuKvCache>(&self.model.config, caches, tokens, "cpu")?;
        Ok(caches.into_iter().map(|cache| Seg { cache, n: 1 }).collect())
    }

    /// The pick of one final hidden row `h` (see `pick`).
    fn pick_row(&self, screen: &HeadScreen, h: &[f32], k: usize, greedy: bool) -> Vec<(u32, f32)> {
        let (lq, act) = self.screen_logits(screen, h);
        self.pick_screened(screen, h, &lq, act.as_ref(), k, greedy)
    }

    /// The 8-bit copy's logits of every row of `h` (`[n][vocab]`, one pass
    /// over the copy for all of them) and, where it multiplies int8 x int8,
    /// `h` as it quantised it.
    fn screen_logits(&self, screen: &HeadScreen, h: &[f32]) -> (Vec<f32>, Option<Q8Act>) {
        let n = h.len() / self.model.config.hidden;
        let per = super::linear::spin_chunks_per_thread();
        match screen.q8() {
            HeadQ8::Act8(q) => {
                let a = q.quantize(h, n);
                let l = self.logits_with(n, q.rows, per, |r0, t0, nt, o| q.rows_dot(r0, &a, t0, nt, o));
                (l, Some(a))
            }
            HeadQ8::Dense(d) => (self.logits_dense(h, d, per), None),
        }
    }

    /// The pick of one hidden row `h` from its screened logits `lq` (and
    /// `act`, `h` quantised alone): the candidates' own rows, or the full
    /// head where the screen cannot decide.
    fn pick_screened(
        &self,
        screen: &HeadScreen,
        h: &[f32],
        lq: &[f32],
        act: Option<&Q8Act>,
        k: usize,
        greedy: bool,
    ) -> Vec<(u32, f32)> {
        let per = super::linear::spin_chunks_per_thread();
        let head = self.model.lm_head();
        // The head's own row dot per row: the same bits as the full head's.
        let exact_of = |rows: &[u32]| -> Vec<f32> {
            let mut exact = vec![0f32; rows.len()];
            self.spin.for_ranges(&mut exact, 1, |i0, o| {
                let mut scratch = Vec::new();
                for (j, v) in o.iter_mut().enumerate() {
                    lm_head::rows_dot(head, rows[i0 + j] as usize, h, 1, std::slice::from_mut(v), &mut scratch);
                }
            });
            exact
        };
        let cand = screen.candidates_with(h, act, lq, k, |out, f| self.spin.for_ranges(out, 32, f), &exact_of);
        if let Ok(cand) = cand {
            let exact = exact_of(&cand);
            // A non-finite exact logit (an overflowing sum) ranks as the
            // full head ranks it only among all rows: take the full head.
            if exact.iter().all(|v| v.is_finite()) {
                self.screen_counts.record(Some(cand.len()));
                return crate::logits::ranked_pairs(cand.into_iter().zip(exact), k);
            }
        }
        self.screen_counts.record(None);
        let l = self.logits_dense(h, head, per);
        match greedy {
            true => {
                let t = crate::logits::argmax(&l);
                vec![(t, l[t as usize])]
            }
            false => crate::logits::ranked(&l, k),
        }
    }

    /// `x += W q`: for many tokens the residual add runs in the matmul's
    /// epilogue (same float ops); one token goes through the spin pool.
    fn add_linear(&self, lin: &Linear, q: &QuantizedInput, x: &mut [f32], threads: usize, par: Par) {
        if q.n_tokens() > 1 {
            lin.forward_multi_on(q, x, Epilogue::Add, threads, par);
        } else {
            let mut y = vec![0f32; x.len()];
            lin.forward_spin(q, &mut y, &self.spin);
            for (xi, yi) in x.iter_mut().zip(&y) {
                *xi += yi;
            }
        }
    }

    /// Run `tokens` for one sequence, or for several: `segs` in order take
    /// their `n` tokens each (a batched decode step: one each). Every layer's
    /// matmuls run over all the tokens at once; RoPE, the cache rows and
    /// attention are per sequence. LastLogits: each sequence's last row.
    fn forward_inner(&self, segs: &mut [Seg], tokens: &[u32], output: Output) -> Result<Vec<f32>> {
        let m = &*self.model;
        let c = &m.config;
        let n = tokens.len();
        debug_assert_eq!(segs.iter().map(|s| s.n).sum::<usize>(), n);
        // Per token: its sequence, its position, its row among the sequence's new ones.
        let seg_of: Vec<(usize, usize, usize)> = segs
            .iter()
            .enumerate()
            .flat_map(|(i, s)| (0..s.n).map(move |r| (i, s.cache.len + r, r)))
            .collect();
        let single = segs.len() == 1;
        let p0 = segs[0].cache.len;
        let (hid, qd, kvd) = (c.hidden, c.q_dim(), c.kv_dim());
        let mut prof = PhaseTimes::new();
        // Activation buffers kept from the last forward (fresh pages fault
        // in one by one: ~40 MB at 512 tokens), or new ones.
        let mut bufs = match n > 1 {
            true => self
                .bufs
                .try_lock()
                .map(|mut b| std::mem::take(&mut *b))
                .unwrap_or_default(),
            false => ForwardBufs::default(),
        };
        let ForwardBufs {
            x,
            qkv,
            q,
            att,
            act,
            att_scratch,
            nq,
            nq_ffn,
        } = &mut bufs;
        // Every element of these is overwritten before it is read (x by the
        // embeddings, the others in full by every layer): only growth is zeroed.
        x.resize(n * hid, 0.0);
        for (t, &tok) in tokens.iter().enumerate() {
            m.embed.row_to_f32(tok as usize, &mut x[t * hid..(t + 1) * hid]);
        }
        let th = self.threads;
        let half = c.head_dim / 2;
        let rope = ops::rope_table_at(seg_of.iter().map(|&(_, p, _)| p), &self.inv_freq);
        // Activation buffers for all layers: every layer overwrites them in
        // full, and a fresh 5-14 MB zeroed buffer per layer cost a serial memset.
        let qkv_dim = qd + 2 * kvd;
        qkv.resize(n * qkv_dim, 0.0);
        q.resize(n * qd, 0.0);
        att.resize(if n > 1 { n * qd } else { 0 }, 0.0);
        act.resize(n * c.ffn, 0.0);
        // Many tokens: every parallel region on the spin pool (~10 per
        // layer; an empty region costs 3.3 us there against rayon's 8.2 on
        // the device Xeon, pp512 +4%); `YINSEN_CPU_PREFILL_POOL=rayon`
        // restores rayon.
        let par = match n > 1 && prefill_on_spin() {
            true => Par::Spin(&self.spin),
            false => Par::Rayon,
        };
        // `YINSEN_PREFILL_HOT_US`: workers stay hot across the gaps between
        // regions (restored on return).
        struct Hot<'a>(&'a SpinPool);
        impl Drop for Hot<'_> {
            fn drop(&mut self) {
                self.0.set_hot(None);
            }
        }
        let _hot = match (par, prefill_hot()) {
            (Par::Spin(p), Some(hot)) => {
                p.set_hot(Some(hot));
                Some(Hot(p))
            }
            _ => None,
        };
        for (li, (layer, pl)) in m.layers.iter().zip(&self.layers).enumerate() {
            // Attention block.
            let eps = c.rms_eps;
            prof.mark("other");
            nq.refill_rms_norm_on(x, &layer.attn_norm, eps, par);
            let xq = &nq;
            prof.mark("norm_quant");
            if n > 1 {
                pl.qkv.forward_multi_on(xq, qkv, Epilogue::Store, th, par);
            } else {
                pl.qkv.forward_spin(xq, qkv, &self.spin);
            }
            prof.mark("qkv");
            // Grow each cache by its tokens' rows, then rope q/k and copy v
            // per token in parallel, straight into the new rows (no serial
            // zero-fill first).
            let kv_new: Vec<(SendPtr<f32>, SendPtr<f32>)> = segs
                .iter_mut()
                .map(|sg| {
                    let (kc, vc) = (&mut sg.cache.k[li], &mut sg.cache.v[li]);
                    debug_assert_eq!(kc.len(), sg.cache.len * kvd);
                    kc.reserve(sg.n * kvd);
                    vc.reserve(sg.n * kvd);
                    (
                        SendPtr(kc.spare_capacity_mut().as_mut_ptr() as *mut f32),
                        SendPtr(vc.spare_capacity_mut().as_mut_ptr() as *mut f32),
                    )
                })
                .collect();
            let qp = SendPtr(q.as_mut_ptr());
            const RUN: usize = 8;
            par.for_each_index(n.div_ceil(RUN), |i| {
                for t in i * RUN..((i + 1) * RUN).min(n) {
                    let row = &qkv[t * qkv_dim..(t + 1) * qkv_dim];
                    let (si, _, r) = seg_of[t];
                    let (kp, vp) = &kv_new[si];
                    // SAFETY: token t's rows are written by this task alone:
                    // `q` holds n rows of qd, each cache's spare capacity at
                    // least its tokens' rows of kvd (reserved above); the new
                    // cache rows are initialised by the copies before the
                    // slices over them are made.
                    let (qt, kt) = unsafe {
                        let (kd, vd) = (kp.get().add(r * kvd), vp.get().add(r * kvd));
                        std::ptr::copy_nonoverlapping(row[qd..].as_ptr(), kd, kvd);
                        std::ptr::copy_nonoverlapping(row[qd + kvd..].as_ptr(), vd, kvd);
                        (
                            std::slice::from_raw_parts_mut(qp.get().add(t * qd), qd),
                            std::slice::from_raw_parts_mut(kd, kvd),
                        )
                    };
                    let sc = &rope[t * half..(t + 1) * half];
                    qt.copy_from_slice(&row[..qd]);
                    for hq in qt.chunks_exact_mut(c.head_dim) {
                        ops::rope_neox_table(hq, sc);
                    }
                    for hk in kt.chunks_exact_mut(c.head_dim) {
                        ops::rope_neox_table(hk, sc);
                    }
                }
            });
            // SAFETY: each cache's new rows were written above.
            for sg in segs.iter_mut() {
                let len = (sg.cache.len + sg.n) * kvd;
                unsafe {
                    sg.cache.k[li].set_len(len);
                    sg.cache.v[li].set_len(len);
                }
            }
            prof.mark("rope_kv");
            // Last layer with only the last logits wanted: once the K/V of
            // every token are in the cache, no other token's row is read
            // again, so attention and everything after it run for the last
            // token alone. Each row's float ops are the same either way (the
            // tiled attention treats rows independently; one-token matmuls
            // are bit-equal to the batched ones), so the logits are too.
            let tail = single && n > 1 && li + 1 == m.layers.len() && matches!(output, Output::LastLogits);
            let (nt, t0) = if tail { (1, n - 1) } else { (n, 0) };
            let xs: &mut [f32] = &mut x[t0 * hid..];
            let a1;
            let a: &[f32] = if n == 1 {
                let kv = &segs[0].cache;
                a1 = self.attention(q, &kv.k[li], &kv.v[li], p0, n);
                &a1
            } else if single {
                let (qs, out) = (&q[t0 * qd..], &mut att[..nt * qd]);
                let kv = &segs[0].cache;
                self.attention_into(qs, &kv.k[li], &kv.v[li], p0 + t0, nt, out, att_scratch, par);
                &att[..nt * qd]
            } else {
                // A batch: each sequence's queries against its own cache.
                let mut r0 = 0;
                for sg in segs.iter() {
                    let (qs, out) = (&q[r0 * qd..(r0 + sg.n) * qd], &mut att[r0 * qd..(r0 + sg.n) * qd]);
                    let (kc, vc) = (&sg.cache.k[li], &sg.cache.v[li]);
                    if sg.n == 1 {
                        out.copy_from_slice(&self.attention(qs, kc, vc, sg.cache.len, 1));
                    } else {
                        self.attention_into(qs, kc, vc, sg.cache.len, sg.n, out, att_scratch, par);
                    }
                    r0 += sg.n;
                }
                &att[..n * qd]
            };
            prof.mark("attention");
            match &layer.attn_sub_norm {
                Some(w) => nq.refill_rms_norm_on(a, w, eps, par),
                None => nq.refill_on(a, qd, par),
            };
            let aq = &nq;
            prof.mark("norm_quant");
            self.add_linear(&pl.o, aq, xs, th, par);
            prof.mark("o");
            // FFN block.
            prof.mark("residual");
            nq.refill_rms_norm_on(xs, &layer.ffn_norm, eps, par);
            let mq = &nq;
            prof.mark("norm_quant");
            let f = c.ffn;
            let act = &mut act[..nt * f];
            if nt > 1 {
                // Gated activation fused into the gate/up epilogue (same float ops).
                pl.gate_up
                    .forward_multi_on(mq, act, Epilogue::Gated(c.activation), th, par);
                prof.mark("gate_up");
            } else {
                let mut gu = vec![0f32; 2 * f];
                pl.gate_up.forward_spin(mq, &mut gu, &self.spin);
                prof.mark("gate_up");
                let (g, u) = gu.split_at(f);
                match c.activation {
                    Activation::Relu2 => ops::relu2_mul(g, u, act),
                    Activation::Silu => ops::silu_mul(g, u, act),
                }
                prof.mark("act");
            }
            match &layer.ffn_sub_norm {
                Some(w) => nq_ffn.refill_rms_norm_on(act, w, eps, par),
                None => nq_ffn.refill_on(act, f, par),
            };
            let dq = &nq_ffn;
            prof.mark("norm_quant");
            self.add_linear(&pl.down, dq, xs, th, par);
            prof.mark("down");
        }
        prof.mark("residual");
        let mut lasts = Vec::new();
        let last = match output {
            Output::LastLogits if single => &x[(n - 1) * hid..],
            Output::LastLogits => {
                let mut r0 = 0;
                for sg in segs.iter() {
                    r0 += sg.n;
                    lasts.extend_from_slice(&x[(r0 - 1) * hid..r0 * hid]);
                }
                &lasts[..]
            }
            _ => &x[..],
        };
        for sg in segs.iter_mut() {
            sg.cache.len += sg.n;
        }
        let h = self.rms_rows(last, &m.final_norm, hid);
        let out = match output {
            Output::Hidden => h,
            _ => self.logits(&h),
        };
        prof.mark("lm_head");
        prof.report(n);
        let kept: usize = [&*x, &*qkv, &*q, &*att, &*act].iter().map(|v| v.capacity() * 4).sum();
        if n > 1 && kept <= KEEP_BUF_BYTES {
            if let Ok(mut b) = self.bufs.try_lock() {
                *b = bufs;
            }
        }
        Ok(out)
    }
}

/// Check tokens and cache room before running anything.
pub fn check_forward_args(c: &ModelConfig, cache_len: usize, capacity: usize, tokens: &[u32]) -> Result<()> {
    if tokens.is_empty() {
        return Err(Error::input("forward: no tokens"));
    }
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.vocab) {
        return Err(Error::input(format!(
            "token id {bad} is out of range (vocab {})",
            c.vocab
        )));
    }
    if cache_len + tokens.len() > capacity {
        return Err(Error::input(format!(
            "sequence of {} tokens exceeds the context of {capacity} tokens",
            cache_len + tokens.len()
        )));
    }
    Ok(())
}

impl Backend for CpuBackend {
    fn name(&self) -> String {
        format!("cpu/{}", self.kernel.describe())
    }
    fn config(&self) -> &ModelConfig {
        &self.model.config
    }
    fn new_cache(&self, capacity: usize) -> Result<Box<dyn KvCache>> {
        let c = &self.model.config;
        let capacity = capacity.min(c.max_ctx);
        // Empty buffers of dropped caches first (contents never read: the
        // cache is empty and grows by writing new rows).
        let mut free = self
            .kv_free
            .lock()
            .map(|mut f| std::mem::take(&mut *f))
            .unwrap_or_default();
        let mut take = || free.pop().unwrap_or_default();
        let k = (0..c.n_layers).map(|_| take()).collect();
        let v = (0..c.n_layers).map(|_| take()).collect();
        if !free.is_empty() {
            if let Ok(mut f) = self.kv_free.lock() {
                f.append(&mut free);
            }
        }
        Ok(Box::new(CpuKvCache {
            k,
            v,
            len: 0,
            capacity,
            kv_dim: c.kv_dim(),
            free: Some(self.kv_free.clone()),
        }))
    }
    fn forward(&self, cache: &mut dyn KvCache, tokens: &[u32], output: Output) -> Result<Vec<f32>> {
        let cache = cache
            .as_any_mut()
            .downcast_mut::<CpuKvCache>()
            .ok_or_else(|| Error::backend("cpu", "KV cache belongs to another backend"))?;
        check_forward_args(&self.model.config, cache.len, cache.capacity, tokens)?;
        let n = tokens.len();
        self.pool
            .install(|| self.forward_inner(&mut [Seg { cache, n }], tokens, output))
    }
    fn forward_batch(&self, caches: &mut [&mut dyn KvCache], tokens: &[u32]) -> Result<Vec<f32>> {
        let mut segs = self.batch_segs(caches, tokens)?;
        self.pool
            .install(|| self.forward_inner(&mut segs, tokens, Output::LastLogits))
    }
    fn forward_batch_pick(
        &self,
        caches: &mut [&mut dyn KvCache],
        tokens: &[u32],
        picks: &[(usize, bool)],
    ) -> Result<Option<crate::backends::BatchPicks>> {
        let Some(screen) = &self.head_screen else {
            return Ok(None);
        };
        let vocab = self.model.config.vocab;
        if !crate::backends::picks_offered(picks, tokens.len(), vocab) {
            return Ok(None);
        }
        let mut segs = self.batch_segs(caches, tokens)?;
        // Each sequence's final hidden row; the 8-bit copy's logits of all
        // of them in one pass over it; then each row's pick as `pick` makes it.
        let h = self
            .pool
            .install(|| self.forward_inner(&mut segs, tokens, Output::Hidden))?;
        let hid = self.model.config.hidden;
        let (lq, act) = self.pool.install(|| self.screen_logits(screen, &h));
        Ok(Some(
            picks
                .iter()
                .enumerate()
                .map(|(i, &(k, greedy))| {
                    let act_i = act.as_ref().map(|a| a.token(i));
                    let (hi, li) = (&h[i * hid..(i + 1) * hid], &lq[i * vocab..(i + 1) * vocab]);
                    self.pick_screened(screen, hi, li, act_i.as_ref(), k, greedy)
                })
                .collect(),
        ))
    }
    fn forward_greedy(&self, cache: &mut dyn KvCache, token: u32) -> Result<Option<u32>> {
        Ok(self.pick(cache, token, 1, true)?.map(|best| best[0].0))
    }
    fn forward_top_k(&self, cache: &mut dyn KvCache, token: u32, k: usize) -> Result<Option<Vec<(u32, f32)>>> {
        self.pick(cache, token, k, false)
    }
    fn resident_weight_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| {
                l.qkv.resident_bytes() + l.o.resident_bytes() + l.gate_up.resident_bytes() + l.down.resident_bytes()
            })
            .sum()
    }
    fn decode_ternary_bytes(&self) -> Option<usize> {
        Some(
            self.layers
                .iter()
                .map(|l| l.qkv.bytes_for(1) + l.o.bytes_for(1) + l.gate_up.bytes_for(1) + l.down.bytes_for(1))
                .sum(),
        )
    }
    fn export_kv(&self, cache: &mut dyn KvCache) -> Result<crate::backends::KvSnapshot> {
        self.export_cpu_kv(cache)
    }
    fn import_kv(&self, snap: &crate::backends::KvSnapshot, capacity: usize) -> Result<Box<dyn KvCache>> {
        self.import_cpu_kv(snap, capacity)
    }
}

impl CpuBackend {
    /// The f32 cache as a snapshot (a copy; the cache is unchanged).
    pub fn export_cpu_kv(&self, cache: &mut dyn KvCache) -> Result<crate::backends::KvSnapshot> {
        let c = cache
            .as_any_mut()
            .downcast_mut::<CpuKvCache>()
            .ok_or_else(|| Error::backend("cpu", "KV export: cache belongs to another backend"))?;
        Ok(crate::backends::KvSnapshot {
            len: c.len,
            kv_dim: c.kv_dim,
            k: c.k.clone(),
            v: c.v.clone(),
        })
    }

    pub fn import_cpu_kv(&self, snap: &crate::backends::KvSnapshot, capacity: usize) -> Result<Box<dyn KvCache>> {
        let cfg = &self.model.config;
        snap.validate(cfg, capacity)?;
        Ok(Box::new(CpuKvCache {
            k: snap.k.clone(),
            v: snap.v.clone(),
            len: snap.len,
            capacity: capacity.min(cfg.max_ctx),
            kv_dim: snap.kv_dim,
            free: Some(self.kv_free.clone()),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::synthetic::{self, SplitMix64};

    /// Logits as bit patterns (the tests compare paths bit for bit).
    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// synthetic:tiny and `n` token ids spread over its vocabulary
    /// (`(i * mul + add) % vocab`).
    fn tiny_ids(n: u32, mul: u32, add: u32) -> (Arc<Model>, Vec<u32>) {
        let model = Arc::new(synthetic::build("tiny").unwrap());
        let vocab = model.config.vocab as u32;
        (model, (0..n).map(|i| (i * mul + add) % vocab).collect())
    }

    /// One-token logits on the spin pool (1, 2, 5 threads; F16 head and the
    /// 8-bit copy) against every row computed alone on this thread: same
    /// bits. And a 6-token call gives each token the bits of its own call.
    #[test]
    fn one_token_logits_on_spin_pool_are_bit_equal() {
        let model = Arc::new(synthetic::build("tiny").unwrap());
        let hid = model.config.hidden;
        let mut r = SplitMix64(21);
        let h: Vec<f32> = (0..6 * hid).map(|_| r.next_f32() * 2.0 - 1.0).collect();
        let h0 = &h[..hid];
        for threads in [1, 2, 5] {
            for q8 in [false, true] {
                let opts = CpuOptions {
                    kernel: "scalar".into(),
                    threads,
                    lm_head_q8: q8,
                    ..CpuOptions::default()
                };
                let be = CpuBackend::with_options(model.clone(), &opts).unwrap();
                let vocab = model.config.vocab;
                let mut want = vec![f32::NAN; vocab];
                let mut scratch = Vec::new();
                for (row, w) in want.iter_mut().enumerate() {
                    let w = std::slice::from_mut(w);
                    match &be.lm_head_q8 {
                        None => lm_head::rows_dot(model.lm_head(), row, h0, 1, w, &mut scratch),
                        Some(HeadQ8::Dense(d)) => lm_head::rows_dot(d, row, h0, 1, w, &mut scratch),
                        Some(HeadQ8::Act8(q)) => q.rows_dot(row, &q.quantize(h0, 1), 0, 1, w),
                    }
                }
                assert!(want.iter().all(|v| v.is_finite()) && want.iter().any(|&v| v != 0.0));
                for per in [1, 3] {
                    let got = be.logits_chunks(h0, per);
                    assert_eq!(bits(&got), bits(&want), "{threads} threads, per {per}, q8 {q8}");
                }
                let all = be.pool.install(|| be.logits_chunks(&h, 1));
                for t in 0..6 {
                    let one = be.logits_chunks(&h[t * hid..(t + 1) * hid], 2);
                    assert_eq!(bits(&all[t * vocab..(t + 1) * vocab]), bits(&one), "token {t} q8 {q8}");
                }
            }
        }
    }

    /// Kept activation buffers and recycled KV buffers change nothing: a
    /// prompt gives the same bits in a fresh backend and after other
    /// prompts (longer and shorter) whose caches were dropped, and decode
    /// after it continues the same way.
    #[test]
    fn recycled_buffers_give_the_same_bits() {
        let (model, ids) = tiny_ids(11, 29, 3);
        let run = |be: &CpuBackend, toks: &[u32]| {
            let mut c = be.new_cache(32).unwrap();
            let mut a = be.forward(c.as_mut(), toks, Output::AllLogits).unwrap();
            a.extend(be.forward(c.as_mut(), &[7], Output::LastLogits).unwrap());
            a.extend(be.forward(c.as_mut(), &[9, 4], Output::AllLogits).unwrap());
            a
        };
        let fresh = CpuBackend::new(model.clone(), "auto", 2).unwrap();
        let want = run(&fresh, &ids);
        let be = CpuBackend::new(model.clone(), "auto", 2).unwrap();
        let long: Vec<u32> = (0..20).map(|i| (i * 13 + 1) % model.config.vocab as u32).collect();
        run(&be, &long);
        assert_eq!(bits(&run(&be, &ids)), bits(&want), "after a longer prompt");
        run(&be, &ids[..3]);
        assert_eq!(bits(&run(&be, &ids)), bits(&want), "after a shorter prompt");
        assert!(
            !be.kv_free.lock().unwrap().is_empty(),
            "dropped caches' buffers are kept"
        );
    }

    /// Last logits only (the last layer runs attention and the FFN for the
    /// last token alone) give the same bits as the last row of all logits,
    /// for a prompt and for a chunk after cached tokens, for every kernel.
    #[test]
    fn last_logits_equal_the_last_row_of_all_logits() {
        let (model, ids) = tiny_ids(37, 41, 7);
        let vocab = model.config.vocab;
        for kernel in crate::backends::cpu::kernels::available() {
            let be = CpuBackend::new(model.clone(), kernel, 2).unwrap();
            for (pre, n) in [(0usize, 37usize), (0, 2), (20, 17), (36, 1)] {
                let run = |output| {
                    let mut c = be.new_cache(64).unwrap();
                    if pre > 0 {
                        be.forward(c.as_mut(), &ids[..pre], Output::AllLogits).unwrap();
                    }
                    be.forward(c.as_mut(), &ids[pre..pre + n], output).unwrap()
                };
                let (all, last) = (run(Output::AllLogits), run(Output::LastLogits));
                assert_eq!(last.len(), vocab);
                assert!(last.iter().any(|&v| v != 0.0));
                assert_eq!(
                    bits(&last),
                    bits(&all[(n - 1) * vocab..]),
                    "{kernel}: {pre} cached, {n} new"
                );
            }
        }
    }

    /// A cache per prompt length, each holding that many of `ids`.
    fn filled(be: &CpuBackend, prompts: &[usize], ids: &[u32]) -> Vec<Box<dyn KvCache>> {
        prompts
            .iter()
            .map(|&p| {
                let mut c = be.new_cache(48).unwrap();
                if p > 0 {
                    be.forward(c.as_mut(), &ids[..p], Output::LastLogits).unwrap();
                }
                c
            })
            .collect()
    }

    /// A batched decode step (one call for several sequences: their matmuls
    /// over all the tokens, attention per cache) gives each sequence the bits
    /// of its own one-token step, and leaves the same caches behind: three
    /// steps in a row, contexts of 0 to 40 tokens, every kernel.
    #[test]
    fn batched_step_equals_one_sequence_at_a_time() {
        let (model, ids) = tiny_ids(64, 53, 11);
        let vocab = model.config.vocab;
        let prompts = [5usize, 0, 23, 1, 40];
        for kernel in crate::backends::cpu::kernels::available() {
            let be = CpuBackend::new(model.clone(), kernel, 2).unwrap();
            let (mut batched, mut alone) = (filled(&be, &prompts, &ids), filled(&be, &prompts, &ids));
            let mut step: Vec<u32> = (0..prompts.len() as u32).map(|i| (i * 97 + 3) % vocab as u32).collect();
            for round in 0..3 {
                let got = {
                    let mut refs: Vec<&mut dyn KvCache> =
                        batched.iter_mut().map(|c| c.as_mut() as &mut dyn KvCache).collect();
                    be.forward_batch(&mut refs, &step).unwrap()
                };
                assert_eq!(got.len(), prompts.len() * vocab);
                for (i, c) in alone.iter_mut().enumerate() {
                    let want = be.forward(c.as_mut(), &[step[i]], Output::LastLogits).unwrap();
                    assert!(want.iter().any(|&v| v != 0.0));
                    let what = format!(
                        "{kernel}, round {round}, sequence {i} after {} tokens",
                        prompts[i] + round
                    );
                    assert_eq!(bits(&got[i * vocab..(i + 1) * vocab]), bits(&want), "{what}");
                    assert_eq!(batched[i].len(), c.len(), "{what}");
                    step[i] = crate::logits::argmax(&want);
                }
            }
        }
        // Clear errors: a token count that is not one per sequence, a full cache.
        let be = CpuBackend::new(model.clone(), "scalar", 1).unwrap();
        let (mut a, mut b) = (be.new_cache(4).unwrap(), be.new_cache(1).unwrap());
        be.forward(b.as_mut(), &[1], Output::LastLogits).unwrap();
        {
            let mut refs: Vec<&mut dyn KvCache> = vec![a.as_mut(), b.as_mut()];
            assert!(be.forward_batch(&mut refs, &[1]).is_err());
            let e = be.forward_batch(&mut refs, &[1, 2]).unwrap_err().to_string();
            assert!(e.contains("context") || e.contains("capacity"), "{e}");
        }
        assert_eq!(a.len(), 0, "nothing ran");
    }

    /// The many-token logits loop puts each (row, token) value where it
    /// belongs: vocabularies that end inside a row block, token counts that
    /// end inside a group of 4, each dot called once per block and group.
    #[test]
    fn logits_with_places_every_row_and_token() {
        let model = Arc::new(synthetic::build("tiny").unwrap());
        let be = CpuBackend::new(model, "scalar", 2).unwrap();
        for (n, vocab) in [(2usize, 64usize), (5, 150), (9, 1), (16, 200)] {
            let calls = std::sync::atomic::AtomicUsize::new(0);
            let got = be.pool.install(|| {
                be.logits_with(n, vocab, 1, |r0, t0, nt, o: &mut [f32]| {
                    calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    assert!(nt <= 4 && t0 + nt <= n && o.len().is_multiple_of(nt));
                    for (j, v) in o.chunks_exact_mut(nt).enumerate() {
                        for (t, x) in v.iter_mut().enumerate() {
                            *x = ((r0 + j) * 1000 + t0 + t) as f32;
                        }
                    }
                })
            });
            let want: Vec<f32> = (0..n)
                .flat_map(|t| (0..vocab).map(move |r| (r * 1000 + t) as f32))
                .collect();
            assert_eq!(got, want, "{n} tokens, vocabulary {vocab}");
            assert_eq!(calls.into_inner(), vocab.div_ceil(64) * n.div_ceil(4));
        }
    }

    /// Batched picks through the screened head: each sequence gets what its
    /// own greedy or top-k step returns (tokens and logit bits), and the
    /// caches stay in step; a backend without the screen offers none.
    #[test]
    fn batched_picks_equal_one_sequence_at_a_time() {
        let model = Arc::new(synthetic::build("tiny").unwrap());
        let vocab = model.config.vocab;
        let ids: Vec<u32> = (0..64).map(|i| (i * 53 + 11) % vocab as u32).collect();
        // Six sequences: the screened logits run as two token groups (4 + 2).
        let prompts = [5usize, 0, 23, 9, 2, 17];
        let picks = [
            (1usize, true),
            (40, false),
            (5, false),
            (1, true),
            (3, false),
            (1, true),
        ];
        let opts = CpuOptions {
            kernel: "auto".into(),
            threads: 2,
            lm_head_screen: true,
            ..Default::default()
        };
        let be = CpuBackend::with_options(model.clone(), &opts).unwrap();
        let (mut batched, mut alone) = (filled(&be, &prompts, &ids), filled(&be, &prompts, &ids));
        let mut step: Vec<u32> = (0..prompts.len() as u32).map(|i| (i * 97 + 3) % vocab as u32).collect();
        let bits = |v: &[(u32, f32)]| v.iter().map(|&(t, l)| (t, l.to_bits())).collect::<Vec<_>>();
        for round in 0..3 {
            let got = {
                let mut refs: Vec<&mut dyn KvCache> =
                    batched.iter_mut().map(|c| c.as_mut() as &mut dyn KvCache).collect();
                be.forward_batch_pick(&mut refs, &step, &picks)
                    .unwrap()
                    .expect("offered")
            };
            for (i, c) in alone.iter_mut().enumerate() {
                let (k, greedy) = picks[i];
                let want = match greedy {
                    true => {
                        let t = be.forward_greedy(c.as_mut(), step[i]).unwrap().unwrap();
                        assert_eq!(got[i].len(), 1);
                        vec![(t, got[i][0].1)]
                    }
                    false => be.forward_top_k(c.as_mut(), step[i], k).unwrap().unwrap(),
                };
                assert_eq!(bits(&got[i]), bits(&want), "round {round}, sequence {i}");
                assert_eq!(got[i].len(), k);
                step[i] = got[i][0].0;
            }
        }
        let plain = CpuBackend::new(model.clone(), "scalar", 1).unwrap();
        let mut c = plain.new_cache(4).unwrap();
        let mut refs: Vec<&mut dyn KvCache> = vec![c.as_mut()];
        assert!(plain
            .forward_batch_pick(&mut refs, &[1], &[(1, true)])
            .unwrap()
            .is_none());
        // The trait's default (one sequence after another, as CUDA runs it)
        // over a backend that offers only one-sequence picks: the same picks.
        struct OneByOne(CpuBackend);
        impl Backend for OneByOne {
            fn name(&self) -> String {
                "one-by-one".into()
            }
            fn config(&self) -> &ModelConfig {
                self.0.config()
            }
            fn new_cache(&self, capacity: usize) -> Result<Box<dyn KvCache>> {
                self.0.new_cache(capacity)
            }
            fn forward(&self, cache: &mut dyn KvCache, tokens: &[u32], output: Output) -> Result<Vec<f32>> {
                self.0.forward(cache, tokens, output)
            }
            fn forward_greedy(&self, cache: &mut dyn KvCache, token: u32) -> Result<Option<u32>> {
                self.0.forward_greedy(cache, token)
            }
            fn forward_top_k(&self, cache: &mut dyn KvCache, t: u32, k: usize) -> Result<Option<Vec<(u32, f32)>>> {
                self.0.forward_top_k(cache, t, k)
            }
            fn resident_weight_bytes(&self) -> usize {
                0
            }
        }
        let looped = OneByOne(CpuBackend::with_options(model.clone(), &opts).unwrap());
        let (mut a, mut b) = (filled(&be, &prompts, &ids), filled(&be, &prompts, &ids));
        let step: Vec<u32> = (0..prompts.len() as u32).map(|i| (i * 31 + 9) % vocab as u32).collect();
        let native = {
            let mut r: Vec<&mut dyn KvCache> = a.iter_mut().map(|c| c.as_mut() as &mut dyn KvCache).collect();
            be.forward_batch_pick(&mut r, &step, &picks).unwrap().unwrap()
        };
        let one_by_one = {
            let mut r: Vec<&mut dyn KvCache> = b.iter_mut().map(|c| c.as_mut() as &mut dyn KvCache).collect();
            looped.forward_batch_pick(&mut r, &step, &picks).unwrap().unwrap()
        };
        for (i, (n, o)) in native.iter().zip(&one_by_one).enumerate() {
            match picks[i].1 {
                true => assert_eq!((o.len(), o[0].0), (1, n[0].0), "sequence {i}"),
                false => assert_eq!(bits(o), bits(n), "sequence {i}"),
            }
        }
    }

    /// The 8-bit lm_head (int8 activations where VNNI runs) against the F16
    /// one on the same model and prompt: a bounded change, not zero.
    #[test]
    fn q8_lm_head_error_against_f16() {
        let model = Arc::new(synthetic::build("tiny").unwrap());
        let ids: Vec<u32> = (0..9).map(|i| (i * 37 + 5) % model.config.vocab as u32).collect();
        let logits = |q8: bool| {
            let opts = CpuOptions {
                threads: 2,
                lm_head_q8: q8,
                ..CpuOptions::default()
            };
            let be = CpuBackend::with_options(model.clone(), &opts).unwrap();
            let mut c = be.new_cache(16).unwrap();
            be.forward(c.as_mut(), &ids, Output::AllLogits).unwrap()
        };
        let (f, q) = (logits(false), logits(true));
        let max = f.iter().zip(&q).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let mean = f.iter().zip(&q).map(|(a, b)| (a - b).abs()).sum::<f32>() / f.len() as f32;
        eprintln!("q8 vs f16 lm_head: max |dlogit| {max:.2e}, mean {mean:.2e}");
        assert!(max > 0.0 && max <= 0.05 && mean <= 0.01, "{max} / {mean}");
    }

    /// Decode attention on the spin pool equals the rayon per-head version
    /// bit for bit (1, 2, 5 threads; 5 leaves a thread without heads).
    #[test]
    fn one_token_attention_on_spin_pool_is_bit_equal() {
        let model = Arc::new(synthetic::build("tiny").unwrap());
        let c = model.config.clone();
        let shape = AttnShape {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
        };
        let mut r = SplitMix64(4);
        let p0 = 13;
        let mut rnd = |k: usize| (0..k).map(|_| r.next_f32() * 2.0 - 1.0).collect::<Vec<f32>>();
        let (q, kc, vc) = (rnd(c.q_dim()), rnd((p0 + 1) * c.kv_dim()), rnd((p0 + 1) * c.kv_dim()));
        let want = attention::causal_attention_simple(&shape, &q, &kc, &vc, p0, 1);
        assert!(want.iter().any(|&v| v != 0.0));
        for threads in [1, 2, 5] {
            let be = CpuBackend::new(model.clone(), "scalar", threads).unwrap();
            let got = be.attention(&q, &kc, &vc, p0, 1);
            assert_eq!(bits(&got), bits(&want), "{threads} threads");
        }
    }
}
