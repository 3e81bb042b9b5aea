//! Host side of the persistent multi-token step (kernels/mega_multi.cu):
//! 2..=16 tokens of one sequence through every layer in one launch.
//!
//! The shared-memory plan (see the kernel's header) is computed here and
//! passed as byte offsets; buffers the kernel exchanges between blocks
//! (int8 codes, per-block statistics) live in global memory.

use super::prefill::Keys;
use super::{Mega, MG_MAXROWS, MG_QMAX};
use crate::backends::cuda::{Arg, DevBuf, Gpu, Launch};
use crate::error::Result;
use crate::model::ModelConfig;
use std::sync::Arc;

/// Threads per block of the multi-token kernel (MM_THREADS in mega_multi.cu;
/// the one-token kernel's are `MG_THREADS`).
const MM_THREADS: usize = 512;
/// MM_THREADS unless `YINSEN_NVRTC_DEFINES=MM_THREADS=N` builds the kernel
/// for N (A/B runs: 1024 or 512, else the kernel does not compile); the
/// launch follows the same setting.
fn multi_threads() -> usize {
    crate::backends::cuda::nvrtc::define_value("MM_THREADS")
        .and_then(|v| v.parse().ok())
        .unwrap_or(MM_THREADS)
}
/// Every block's per-token partials, as float4, that mm_scales stages
/// (MM_SL x MM_THREADS there).
const MM_STAGED_F4: usize = 2048;

/// Tokens per launch at most (MM_T).
pub(super) const MM_T: usize = 16;
/// Keys (cached + new) up to which calls take the multi-token kernel by
/// default: its attention is a plain loop over 64-key chunks, slower than
/// the per-kernel flash attention on long contexts (device runs 102, 105).
/// At 512 threads a block with the partials read token-major (S28-5, H200,
/// 16 tokens, persistent / per-kernel ms): 2.25 / 2.62 after 512 keys,
/// 2.99 / 2.945 after 1024: a linear crossover near 970 keys (S28-1, the
/// block-major reads: near 790).
pub(super) const DEFAULT_MAX_CTX: usize = 960;
/// The same for a batched step across sequences, as a budget of keys (of
/// its longest sequence) times sequences: each token's own keys make the
/// persistent kernel's attention items grow with both, while the per-kernel
/// attention spreads over many more blocks. Device S29-1 (H200, ms a step,
/// persistent / per-kernel, two runs): 4 sequences 2.61 and 2.53 / 2.67
/// after 1024 keys, 3.70 and 3.38 / 3.31 after 2048 (crossover near 1300);
/// 16 sequences 1.78 / 2.42 at ctx 0, 3.92 and 3.64 / 3.75 and 3.70 after
/// 512 (crossover near 470). 4096 stays inside both wins: 4 sequences up
/// to 1024 keys, 16 up to 256 (a flat 160 keys before).
pub(super) const DEFAULT_BATCH_KEY_BUDGET: usize = 4096;

/// Whether a batched step of `seqs` sequences whose longest holds `keys`
/// keys (cached + new) takes the persistent multi-token kernel.
pub(super) fn batch_takes_multi(seqs: usize, keys: usize, budget: usize) -> bool {
    (2..=MM_T).contains(&seqs) && keys.saturating_mul(seqs) <= budget
}
/// Query rows (tokens x group) at most (MM_RMAX).
const MM_RMAX: usize = 128;
/// Keys per attention item (MM_AC).
const MM_AC: usize = 64;

/// Bytes per token row of int8 codes (mm_xs).
fn xs(kpad: usize) -> usize {
    kpad.div_ceil(128) * 128 + 64
}

/// Byte offsets of the kernel's dynamic shared memory (see mega_multi.cu's
/// header): B = [0, w_b) holds O then down weights, A = [w_b, w_b + w_a)
/// QKV then gate/up; the rest is placed so that nothing a phase uses
/// overlaps what is live or landing in that phase (tests below).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Plan {
    /// The QKV / O / gate-up codes, or the attention's q, K and V rows.
    c_off: usize,
    /// The down codes: in A behind the next layer's QKV weights.
    dn_off: usize,
    /// The attention scores: B's free tail behind the O weights if they fit.
    s_off: usize,
    /// The int32 row x token sums of the dot.
    acc_off: usize,
    /// Bytes in all.
    smem: usize,
}

/// Shapes one block handles on `grid` blocks (as mega.cu's mg_rows).
struct Shapes {
    r_qkv: usize,
    r_o: usize,
    r_gu: usize,
    r_dn: usize,
    ch: usize,
    cq: usize,
    cf: usize,
}

impl Shapes {
    fn new(c: &ModelConfig, grid: usize) -> Self {
        let rows = |n: usize, even: bool| {
            let r = n.div_ceil(grid);
            r + (even && r % 2 == 1) as usize
        };
        Self {
            r_qkv: rows(c.q_dim() + 2 * c.kv_dim(), true),
            r_o: rows(c.hidden, false),
            r_gu: rows(c.ffn, false),
            r_dn: rows(c.hidden, false),
            ch: c.hidden.div_ceil(64),
            cq: c.q_dim().div_ceil(64),
            cf: c.ffn.div_ceil(64),
        }
    }
}

/// Attention buffer bytes for KV elements of `kv_bytes`: (q rows, K rows,
/// V rows, scores), sized for 16 tokens.
fn attention_bytes(c: &ModelConfig, kv_bytes: usize) -> (usize, usize, usize, usize) {
    let (hd, r_max) = (c.head_dim, MM_T * (c.n_heads / c.n_kv_heads.max(1)));
    (
        r_max * (hd + 4) * 4,
        MM_AC * (hd * kv_bytes + 16),
        MM_AC * hd * kv_bytes,
        r_max * (MM_AC + 1) * 4,
    )
}

/// The shared-memory plan for `c` on `grid` blocks next to the one-token
/// kernel's weight buffers (w0 / w1 chunks), or None where the kernel's
/// limits rule the shape out (the device and its shared memory are checked
/// by the caller).
fn plan(
    c: &ModelConfig,
    threads: usize,
    grid: usize,
    (w0_chunks, w1_chunks): (usize, usize),
    part_tokens: usize,
    max_splits: usize,
    kv_bytes: usize,
) -> Option<Plan> {
    let sh = Shapes::new(c, grid);
    let group = c.n_heads / c.n_kv_heads.max(1);
    let hd = c.head_dim;
    let (w_b, w_a) = (w1_chunks * 16, w0_chunks * 16);
    let (qkv_bytes, o_bytes) = (sh.r_qkv * sh.ch * 16, sh.r_o * sh.cq * 16);
    let (q_bytes, k_bytes, v_bytes, s_bytes) = attention_bytes(c, kv_bytes);
    let r_max = MM_T * group;
    let fits = c.n_kv_heads > 0
        && c.n_heads.is_multiple_of(c.n_kv_heads)
        && grid * MM_T / 2 <= MM_STAGED_F4
        && group * hd <= MG_QMAX
        && r_max <= MM_RMAX
        && hd > 0
        && threads.is_multiple_of(hd)
        && c.hidden.is_multiple_of(4)
        && c.q_dim().is_multiple_of(4)
        && c.ffn.is_multiple_of(4)
        && part_tokens >= MM_T
        && sh.r_qkv.max(sh.r_o).max(2 * sh.r_gu).max(sh.r_dn) <= MG_MAXROWS
        // The chunk merge keeps (m, l) of every (row, chunk) in the K/V area.
        && r_max * max_splits * 2 * 4 <= k_bytes + v_bytes
        && w_b >= o_bytes
        && w_a >= qkv_bytes;
    if !fits {
        return None;
    }
    let c_off = w_b + w_a;
    // The scores go into B's free tail behind the O weights when they fit.
    let (s_off, att) = match w_b - o_bytes >= s_bytes {
        true => (o_bytes, q_bytes + k_bytes + v_bytes),
        false => (
            c_off + q_bytes + k_bytes + v_bytes,
            q_bytes + k_bytes + v_bytes + s_bytes,
        ),
    };
    // The code buffers also stage the per-block partials (mm_scales).
    let partials = grid * MM_T * 8;
    let c_need = att.max(MM_T * xs(sh.ch * 64)).max(MM_T * xs(sh.cq * 64)).max(partials);
    let dn_off = w_b + qkv_bytes;
    let end = (c_off + c_need).max(dn_off + (MM_T * xs(sh.cf * 64)).max(partials));
    let acc_off = end.next_multiple_of(16);
    let n_acc = sh.r_qkv.max(sh.r_o).max(2 * sh.r_gu).max(sh.r_dn);
    Some(Plan {
        c_off,
        dn_off,
        s_off,
        acc_off,
        smem: acc_off + n_acc * MM_T * 4,
    })
}

pub(super) struct MegaMulti {
    /// int8 codes of a phase input, [MM_T][xs].
    xg: DevBuf,
    /// Per-token, per-block (sum of squares, max) partials, [MM_T][grid] float2.
    stat: DevBuf,
    plan: Plan,
    /// Threads per block (MM_THREADS).
    threads: usize,
}

impl MegaMulti {
    /// The plan for `c` on `gpu` next to the one-token kernel's `mega`, or
    /// None where the shapes, the device or shared memory rule it out.
    pub(super) fn prepare(
        gpu: &Arc<Gpu>,
        c: &ModelConfig,
        mega: &Mega,
        part_tokens: usize,
        max_splits: usize,
        kv_bytes: usize,
    ) -> Result<Option<Self>> {
        let grid = mega.grid as usize;
        let threads = multi_threads();
        let plan = match plan(
            c,
            threads,
            grid,
            (mega.w0_chunks, mega.w1_chunks),
            part_tokens,
            max_splits,
            kv_bytes,
        ) {
            Some(p) if gpu.info.sm.0 >= 9 => p,
            _ => return Ok(None),
        };
        for name in ["mega_multi_f32", "mega_multi_f16"] {
            if !gpu.allow_dynamic_smem(name, plan.smem)? || gpu.occupancy(name, threads as u32, plan.smem)? < 1 {
                return Ok(None);
            }
        }
        let sh = Shapes::new(c, grid);
        let xg = gpu.alloc(MM_T * xs(sh.ch.max(sh.cq).max(sh.cf) * 64))?;
        xg.fill(0)?;
        Ok(Some(Self {
            xg,
            stat: gpu.alloc(grid * MM_T * 8)?,
            plan,
            threads,
        }))
    }
}

impl super::CudaBackend {
    /// Whether calls of 2..=16 tokens run the persistent multi-token kernel.
    pub fn uses_mega_multi(&self) -> bool {
        self.mega_multi.is_some() && self.mega_multi_on.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether a call reaching `keys` keys runs the multi-token kernel.
    pub(super) fn uses_mega_multi_at(&self, keys: usize) -> bool {
        self.uses_mega_multi() && keys <= self.mega_multi_ctx.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// For benchmarks: the longest context (keys) the multi-token kernel
    /// takes; returns the previous limit.
    pub fn set_mega_multi_ctx(&self, keys: usize) -> usize {
        self.mega_multi_ctx.swap(keys, std::sync::atomic::Ordering::Relaxed)
    }

    /// For benchmarks and tests: turn the persistent multi-token step on or
    /// off (for graphs captured afterwards); returns the previous setting.
    pub fn set_mega_multi(&self, on: bool) -> bool {
        self.mega_multi_on
            .swap(on && self.mega_multi.is_some(), std::sync::atomic::Ordering::Relaxed)
    }

    /// The body (embedding + every layer, hidden states into `s.x`) of `nt`
    /// tokens at the cache's position in two launches.
    pub(super) fn body_multi(&self, s: &super::Scratch, keys: Keys, nt: usize) -> Result<()> {
        self.body_multi_traced(s, keys, nt, Arg::P(0))
    }

    fn body_multi_traced(&self, s: &super::Scratch, keys: Keys, nt: usize, trace: Arg) -> Result<()> {
        let c = &self.config;
        let g = &self.gpu;
        let (Some(m), Some(mm)) = (self.mega.as_ref(), self.mega_multi.as_ref()) else {
            return Err(super::berr("persistent multi-token step unavailable"));
        };
        g.set_tag("embed");
        g.launch(
            "mega_multi_begin",
            (nt as u32, 1, 1),
            256,
            &[s.tok.p(), self.embed.p(), Arg::I(c.hidden as i32), s.x.p(), s.bar.p()],
        )?;
        g.set_tag("layers (persistent, multi-token)");
        let name = match self.kv {
            super::KvDtype::F16 => "mega_multi_f16",
            super::KvDtype::F32 => "mega_multi_f32",
        };
        let gate = match c.activation {
            crate::model::Activation::Relu2 => 1,
            crate::model::Activation::Silu => 2,
        };
        let i = |v: usize| Arg::I(v as i32);
        // One sequence's cache (layer 0 and the layer stride), or a batched
        // step's table of caches.
        let (seqs, kc0, vc0, layer_elems, cap) = match keys {
            Keys::One(cache) => (
                Arg::P(0),
                cache.k.p(),
                cache.v.p(),
                cache.layer_bytes / self.kv.bytes(),
                cache.cap,
            ),
            Keys::Batch(seqs) => (seqs, Arg::P(0), Arg::P(0), 0, 0),
        };
        g.launch_smem(
            name,
            (m.grid, 1, 1),
            mm.threads as u32,
            mm.plan.smem as u32,
            &[
                m.table.p(),
                i(c.n_layers),
                i(c.hidden),
                i(c.q_dim()),
                i(c.kv_dim()),
                i(c.ffn),
                i(c.head_dim),
                i(c.n_heads),
                i(c.n_kv_heads),
                Arg::I(gate),
                Arg::F(c.rms_eps),
                Arg::F(1.0 / (c.head_dim as f32).sqrt()),
                s.pos.p(),
                i(nt),
                seqs,
                self.rope.p(),
                kc0,
                vc0,
                i(layer_elems),
                i(cap),
                s.x.p(),
                s.qr.p(),
                s.attn.p(),
                s.gu.p(),
                s.part.p(),
                i(self.max_splits),
                s.cnt.p(),
                s.bar.p(),
                mm.xg.p(),
                mm.stat.p(),
                i(m.w0_chunks),
                i(m.w1_chunks),
                i(mm.plan.c_off),
                i(mm.plan.dn_off),
                i(mm.plan.s_off),
                i(mm.plan.acc_off),
                trace,
                Arg::I(self.mega_flags.load(std::sync::atomic::Ordering::Relaxed) as i32),
            ],
            Launch::Cooperative,
        )?;
        g.set_tag("");
        Ok(())
    }
}

/// Trace marks per layer (MM_TRACE).
const MM_TRACE: usize = 48;

impl super::CudaBackend {
    /// For benchmarks: block 0's clock at the marks of one `nt`-token call
    /// after `ctx` cached tokens, as microseconds per layer of each step:
    /// (name, us). Empty where the multi-token kernel is off.
    pub(crate) fn trace_mega_multi(&self, nt: usize, ctx: usize) -> Result<Vec<(&'static str, f64)>> {
        if !self.uses_mega_multi() || !(2..=MM_T).contains(&nt) {
            return Ok(Vec::new());
        }
        let n = self.config.n_layers;
        let mut cache = self.cuda_cache(ctx + nt)?;
        cache.set_len_for_bench(ctx);
        let s = self.lock_scratch()?;
        self.gpu.bind()?;
        let tr = self.gpu.alloc(n * MM_TRACE * 8)?;
        tr.fill(0)?;
        let tok: Vec<i32> = (0..nt as i32).collect();
        s.tok.write_async(&tok)?;
        s.pos.write_async(&[ctx as i32])?;
        self.body_multi_traced(&s, Keys::One(&cache), nt, Arg::P(0))?; // warm-up
        self.body_multi_traced(&s, Keys::One(&cache), nt, tr.p())?;
        let t = tr.read::<u64>(n * MM_TRACE)?;
        let khz = self.gpu.clock_khz()? as f64;
        // Consecutive marks (mega_multi.cu); the last step of a layer runs
        // to the next layer's first mark.
        const STEPS: [(&str, usize, usize); 39] = [
            ("qkv scales", 0, 30),
            ("qkv quant slice", 30, 31),
            ("qkv slice to barrier", 31, 1),
            ("qkv barrier", 1, 2),
            ("qkv codes issue", 2, 32),
            ("qkv codes wait+xsum", 32, 3),
            ("qkv weights wait", 3, 26),
            ("qkv dot", 26, 4),
            ("qkv epilogue", 4, 5),
            ("qkv end barrier", 5, 6),
            ("attention start", 6, 33),
            ("att staging wait", 33, 34),
            ("att scale+scores", 34, 35),
            ("att softmax", 35, 36),
            ("att pv", 36, 37),
            ("att out+stats", 37, 38),
            ("att rest", 38, 7),
            ("attention barrier", 7, 8),
            ("o scales+quant", 8, 9),
            ("o barrier", 9, 10),
            ("o load codes", 10, 11),
            ("o weights wait", 11, 27),
            ("o dot", 27, 12),
            ("o epilogue", 12, 13),
            ("o end barrier", 13, 14),
            ("gu scales+quant", 14, 15),
            ("gu barrier", 15, 16),
            ("gu load codes", 16, 17),
            ("gu weights wait", 17, 28),
            ("gu dot", 28, 18),
            ("gu epilogue", 18, 19),
            ("gu end barrier", 19, 20),
            ("down scales+quant", 20, 21),
            ("down barrier", 21, 22),
            ("down load codes", 22, 23),
            ("down weights wait", 23, 29),
            ("down dot", 29, 24),
            ("down epilogue", 24, 25),
            ("down end barrier", 25, MM_TRACE),
        ];
        let mut out = Vec::new();
        for (name, a, b) in STEPS {
            let mut us = 0.0;
            let mut cnt = 0;
            for l in 0..n {
                let (ia, ib) = (l * MM_TRACE + a, l * MM_TRACE + b);
                if ib < n * MM_TRACE && t[ib] >= t[ia] && t[ia] > 0 {
                    us += (t[ib] - t[ia]) as f64 / khz * 1e3;
                    cnt += 1;
                }
            }
            out.push((name, us / cnt.max(1) as f64));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn batched_steps_take_the_multi_token_kernel_within_the_key_budget() {
        use super::{batch_takes_multi, DEFAULT_BATCH_KEY_BUDGET as B};
        assert!(batch_takes_multi(4, 1024, B) && !batch_takes_multi(4, 1025, B));
        assert!(batch_takes_multi(16, 256, B) && !batch_takes_multi(16, 257, B));
        assert!(!batch_takes_multi(1, 1, B) && !batch_takes_multi(17, 1, B));
        assert!(!batch_takes_multi(16, usize::MAX, usize::MAX - 1) && batch_takes_multi(16, usize::MAX, usize::MAX));
    }

    use super::*;
    use crate::model::synthetic;

    /// Byte ranges that must not overlap.
    fn disjoint(what: &str, parts: &[(&str, usize, usize)]) {
        for (i, a) in parts.iter().enumerate() {
            assert!(a.1 <= a.2, "{what}: {} is empty backwards", a.0);
            for b in &parts[i + 1..] {
                assert!(
                    a.2 <= b.1 || b.2 <= a.1,
                    "{what}: {} {:?} overlaps {} {:?}",
                    a.0,
                    (a.1, a.2),
                    b.0,
                    (b.1, b.2)
                );
            }
        }
    }

    /// In every phase, the buffers it uses and the weight copies live or
    /// landing then are disjoint; the accumulators come after everything;
    /// 2B4T fits an H100 / H200 block (227 KB) with f32 and f16 caches.
    #[test]
    fn shared_memory_plan_keeps_each_phase_apart() {
        for shape in synthetic::SHAPES {
            let c = synthetic::shape(shape).unwrap();
            for grid in [132, 114, 78] {
                for kvb in [2, 4] {
                    let what = format!("{shape} grid {grid} kv {kvb}");
                    let chunks = super::super::mega_weight_chunks(&c, grid);
                    let max_splits = c.max_ctx.div_ceil(MM_AC);
                    let Some(p) = plan(&c, MM_THREADS, grid, chunks, 64, max_splits, kvb) else {
                        // The attention loops need head dims dividing the block (700m's is 96).
                        assert!(!MM_THREADS.is_multiple_of(c.head_dim), "{what}: no plan");
                        continue;
                    };
                    let sh = Shapes::new(&c, grid);
                    let (w_b, w_a) = (chunks.1 * 16, chunks.0 * 16);
                    let (qkv, o) = (sh.r_qkv * sh.ch * 16, sh.r_o * sh.cq * 16);
                    let (qb, kb, vb, sb) = attention_bytes(&c, kvb);
                    let codes = |k: usize| (MM_T * xs(k * 64)).max(grid * MM_T * 8);
                    let acc = ("acc", p.acc_off, p.smem);
                    let (a_all, b_all) = (("A", w_b, w_b + w_a), ("B", 0, w_b));
                    let c_codes = |k| ("codes", p.c_off, p.c_off + codes(k));
                    disjoint(
                        &format!("{what} qkv"),
                        &[("A qkv", w_b, w_b + qkv), ("B o", 0, o), c_codes(sh.ch), acc],
                    );
                    disjoint(
                        &format!("{what} attention"),
                        &[
                            a_all,
                            ("B o", 0, o),
                            ("q", p.c_off, p.c_off + qb),
                            ("k", p.c_off + qb, p.c_off + qb + kb),
                            ("v", p.c_off + qb + kb, p.c_off + qb + kb + vb),
                            ("scores", p.s_off, p.s_off + sb),
                            acc,
                        ],
                    );
                    disjoint(&format!("{what} o"), &[a_all, ("B o", 0, o), c_codes(sh.cq), acc]);
                    disjoint(&format!("{what} gate/up"), &[a_all, b_all, c_codes(sh.ch), acc]);
                    disjoint(
                        &format!("{what} down"),
                        &[
                            b_all,
                            ("A qkv", w_b, w_b + qkv),
                            ("codes", p.dn_off, p.dn_off + codes(sh.cf)),
                            acc,
                        ],
                    );
                    assert!(
                        p.acc_off % 16 == 0 && p.dn_off % 16 == 0 && p.s_off % 16 == 0,
                        "{what}: alignment"
                    );
                    if shape == "2b4t" && grid == 132 {
                        assert!(p.smem + 10_112 <= 232_448, "{what}: {} bytes do not fit", p.smem);
                    }
                }
            }
        }
    }
}
