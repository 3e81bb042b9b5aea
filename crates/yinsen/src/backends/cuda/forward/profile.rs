//! The backend's measurement side (`yinsen bench --backend cuda`): decode
//! graphs timed back to back, per token with a host round trip, or as
//! `generate_greedy`; multi-token steps and forwards timed; per-kernel
//! profiles of the decode step, the persistent kernel's phases (its trace),
//! the steps and the prefill; the GEMM tile sweep. Nothing here runs in
//! inference.

use super::*;
use crate::backends::cuda::{bench, drv, tiled_x_bytes, MmaVariant, TILED_TOKENS};

impl CudaBackend {
    /// For benchmarks: run the decode graph `n` times back to back (each
    /// step feeds the next, see `decode_advance`) and return GPU
    /// milliseconds per step.
    pub(crate) fn time_decode(&self, cache: &mut CudaCache, n: usize) -> Result<f32> {
        self.time_decode_loop(cache, n, DecodeLoop::Replays)
    }

    /// [`Self::time_decode`] with the host's part chosen by `how` (see
    /// [`DecodeLoop`]): milliseconds per step after a warm step.
    pub(crate) fn time_decode_loop(&self, cache: &mut CudaCache, n: usize, how: DecodeLoop) -> Result<f32> {
        if cache.len + n + 1 > cache.cap {
            return Err(Error::input("bench: cache too small"));
        }
        if how == DecodeLoop::Generate {
            self.generate_greedy(cache, 1, 1)?;
            let t = std::time::Instant::now();
            self.generate_greedy(cache, 1, n)?;
            return Ok(t.elapsed().as_secs_f32() * 1e3 / n as f32);
        }
        let s = self.lock_scratch()?;
        self.gpu.bind()?;
        self.decode_graph(&s, cache, 1, Head::Greedy)?; // capture + warm
        cache.len += 1;
        if how == DecodeLoop::HostFed {
            let mut tok = self.decoded_token(&s)?;
            let t = std::time::Instant::now();
            for _ in 0..n {
                self.decode_graph(&s, cache, tok, Head::Greedy)?;
                cache.len += 1;
                tok = self.decoded_token(&s)?;
            }
            return Ok(t.elapsed().as_secs_f32() * 1e3 / n as f32);
        }
        let ev = Events::new()?;
        ev.record_start(self.gpu.stream)?;
        for _ in 0..n {
            self.decode_launch(&s, cache, None, Head::Greedy)?;
            cache.len += 1;
        }
        Ok(ev.record_stop_ms(self.gpu.stream)? / n as f32)
    }

    /// For benchmarks: GPU milliseconds per replay of the `nt`-token step
    /// graph (last logits) at the cache's position, `n` replays back to back
    /// after a capture + warm-up replay (the cache is not advanced; every
    /// replay rewrites the same KV rows). None where `run` would not use a
    /// graph for `nt` tokens.
    pub(crate) fn time_step_graph(&self, cache: &mut CudaCache, nt: usize, n: usize) -> Result<Option<f32>> {
        let s = self.lock_scratch()?;
        self.gpu.bind()?;
        if cache.len + nt > cache.cap {
            return Err(Error::input("bench: cache too small"));
        }
        let Some(key) = self.step_key(&s, cache, nt, Output::LastLogits) else {
            return Ok(None);
        };
        let tok: Vec<u32> = (0..nt).map(|i| (i % self.config.vocab) as u32).collect();
        self.step_graph(&s, cache, &tok, key, true)?; // capture + warm
        let exec = cache.steps.last().expect("just used").1.exec;
        let ev = Events::new()?;
        ev.record_start(self.gpu.stream)?;
        for _ in 0..n {
            drv(unsafe { result::graph::launch(exec, self.gpu.stream) }, "cuGraphLaunch")?;
        }
        Ok(Some(ev.record_stop_ms(self.gpu.stream)? / n.max(1) as f32))
    }

    /// For benchmarks: GPU milliseconds of one un-graphed forward of `nt`
    /// tokens at the cache's position (the cache is not advanced).
    pub(crate) fn time_forward(&self, cache: &mut CudaCache, nt: usize) -> Result<f32> {
        let s = self.lock_scratch()?;
        self.gpu.bind()?;
        if cache.len + nt > cache.cap {
            return Err(Error::input("bench: cache too small"));
        }
        let tok: Vec<i32> = (0..nt).map(|i| (i % self.config.vocab) as i32).collect();
        let ev = Events::new()?;
        let mut done = 0;
        let per_call = self.chunk_tokens(&s);
        ev.record_start(self.gpu.stream)?;
        while done < nt {
            let n = (nt - done).min(per_call);
            let pos = [(cache.len + done) as i32];
            s.tok.write_async(&tok[done..done + n])?;
            s.pos.write_async(&pos)?;
            self.body(&s, cache, n, (cache.len + done + n).div_ceil(ATT_CHUNK))?;
            done += n;
        }
        self.head(&s, nt - 1 - (nt - 1) / per_call * per_call, 1, true)?;
        ev.record_stop_ms(self.gpu.stream)
    }

    /// For benchmarks: turn PDL in newly captured decode graphs on or off;
    /// returns the previous setting.
    pub(crate) fn set_pdl(&self, on: bool) -> bool {
        self.pdl.swap(on, std::sync::atomic::Ordering::Relaxed)
    }

    /// A decode step's state for the profiles: a cache holding `ctx` tokens
    /// and the scratch with token 1 at position `ctx`.
    fn profile_state(&self, ctx: usize) -> Result<(CudaCache, std::sync::MutexGuard<'_, Scratch>)> {
        let mut cache = self.cuda_cache(ctx + 2)?;
        cache.set_len_for_bench(ctx);
        let s = self.lock_scratch()?;
        self.gpu.bind()?;
        Self::feed_at(&s, ctx)?;
        Ok((cache, s))
    }

    /// Token 1 at position `ctx`, fed by the host: the next persistent step
    /// runs there (`mega_begin` would otherwise advance from the last pick,
    /// past the cache's rows after a few launches).
    fn feed_at(s: &Scratch, ctx: usize) -> Result<()> {
        s.tok.write_async(&[1i32])?;
        s.pos.write_async(&[ctx as i32])?;
        s.fed.write_async(&[1i32])
    }

    /// For benchmarks: GPU microseconds of the persistent decode's three
    /// launches (embedding, all layers, lm_head + argmax), un-graphed, at
    /// context `ctx` (median of `reps` per launch).
    pub(crate) fn profile_mega(&self, ctx: usize, reps: usize) -> Result<Vec<(&'static str, f64)>> {
        if !self.uses_mega() {
            return Ok(Vec::new());
        }
        use std::sync::atomic::Ordering::Relaxed;
        let (cache, s) = self.profile_state(ctx)?;
        let mut out: Vec<(&'static str, f64)> = Vec::new();
        // The full head, then (where the screen is on) the screened greedy
        // pick and the screened top-40 in place of it: the heads' tags
        // differ, the layers' appear once per head.
        let mut heads = vec![Head::Logits];
        if self.lm_head_screened() {
            if let Some(sh) = self
                .lm_head_screen
                .lock()
                .map_err(|_| berr("lm_head lock poisoned"))?
                .as_ref()
            {
                sh.k.write(&[40i32])?;
                heads.extend([Head::Greedy, Head::TopK]);
            }
        }
        for head in heads {
            self.capturing_head.store(head as u8, Relaxed);
            let runs = self.profiled(reps, || {
                Self::feed_at(&s, ctx)?;
                self.decode_mega(&s, &cache, false)
            });
            self.capturing_head.store(Head::Logits as u8, Relaxed);
            let runs = runs?;
            for (i, (tag, _)) in runs.first().map(|r| r.as_slice()).unwrap_or(&[]).iter().enumerate() {
                if head != Head::Logits && !tag.starts_with("lm_head") {
                    continue;
                }
                let mut v: Vec<f32> = runs.iter().filter_map(|r| r.get(i).map(|t| t.1)).collect();
                v.sort_by(|a, b| a.total_cmp(b));
                out.push((tag, v[v.len() / 2] as f64 * 1e3));
            }
        }
        Ok(out)
    }

    /// For benchmarks: per-kernel GPU time of an un-graphed, PDL-less decode
    /// step at context `ctx` (median of `reps` steps), with the bytes each
    /// kernel group must read and its ternary ops.
    pub(crate) fn profile_decode(&self, ctx: usize, reps: usize) -> Result<Vec<bench::KernelTime>> {
        if !self.fused {
            return Ok(Vec::new());
        }
        let (cache, s) = self.profile_state(ctx)?;
        let splits = cache.cap.div_ceil(ATT_CHUNK);
        let runs = self.profiled(reps, || self.decode_fused(&s, &cache, splits, false))?;
        Ok(self.kernel_table(&runs, ctx, 1))
    }

    /// For benchmarks: per-kernel GPU time of an un-graphed `nt`-token step
    /// (last logits) at context `ctx` (median of `reps`), grouped like the
    /// decode profile (each norm + quantisation with the matrix it feeds).
    pub(crate) fn profile_step(&self, nt: usize, ctx: usize, reps: usize) -> Result<Vec<bench::KernelTime>> {
        let mut cache = self.cuda_cache(ctx + nt)?;
        cache.set_len_for_bench(ctx);
        let s = self.lock_scratch()?;
        self.gpu.bind()?;
        if nt == 0 || nt > s.chunk {
            return Ok(Vec::new());
        }
        let tok: Vec<i32> = (0..nt).map(|i| (i % self.config.vocab) as i32).collect();
        s.tok.write_async(&tok)?;
        s.pos.write_async(&[ctx as i32])?;
        let splits = (ctx + nt).div_ceil(ATT_CHUNK);
        let step = || -> Result<()> {
            self.body(&s, &cache, nt, splits)?;
            self.head(&s, nt - 1, 1, true)
        };
        let runs = self.profiled(reps, step)?;
        Ok(self.forward_table(&runs, nt, ctx))
    }

    /// For benchmarks: where the persistent decode spends a step at context
    /// `ctx`, from block 0's clock at each phase start and work end: per
    /// phase (summed over layers) the microseconds of work and of waiting
    /// at the grid barrier that follows. Empty without the persistent kernel.
    pub(crate) fn trace_mega(&self, ctx: usize) -> Result<Vec<bench::PhaseTime>> {
        if !self.uses_mega() {
            return Ok(Vec::new());
        }
        let n = self.config.n_layers;
        let mut cache = self.cuda_cache(ctx + 2)?;
        cache.set_len_for_bench(ctx);
        let s = self.lock_scratch()?;
        self.gpu.bind()?;
        let tr = self.gpu.alloc(n * MG_TRACE * 8)?;
        tr.fill(0)?;
        Self::feed_at(&s, ctx)?;
        self.decode_mega_traced(&s, &cache, false, Arg::P(0))?; // warm-up
        Self::feed_at(&s, ctx)?;
        self.decode_mega_traced(&s, &cache, false, tr.p())?;
        let t = tr.read::<u64>(n * MG_TRACE)?;
        let khz = self.gpu.clock_khz()? as f64;
        let us = |a: u64, b: u64| b.saturating_sub(a) as f64 / khz * 1e3;
        let names = ["qkv+rope", "attention", "o", "gate_up", "down"];
        Ok(names
            .iter()
            .enumerate()
            .map(|(p, name)| {
                let (mut work, mut wait, mut quant, mut dot) = (0.0, 0.0, 0.0, 0.0);
                for l in 0..n {
                    // Marks: start, after the norm + quantisation, after the dot, end.
                    let b = l * MG_TRACE + 4 * p;
                    work += us(t[b], t[b + 3]);
                    // Attention: scores + softmax (+ V rows landed), then P V.
                    quant += us(t[b], t[b + 1]);
                    dot += us(t[b + 1], t[b + 2]);
                    // The next phase starts after the barrier (the last down has none).
                    let next = if p == 4 { (l + 1) * MG_TRACE } else { b + 4 };
                    if next < n * MG_TRACE {
                        wait += us(t[b + 3], t[next]);
                    }
                }
                // Marks 24 + phase: this matrix phase's weights landed (after
                // its quantisation); zero in MG_TRACE_MERGE builds.
                if p != 1 && std::env::var("YINSEN_CUDA_BENCH").is_ok_and(|v| v == "decode") {
                    let w = (0..n)
                        .filter(|l| t[l * MG_TRACE + 24 + p] > 0)
                        .map(|l| us(t[l * MG_TRACE + 4 * p + 1], t[l * MG_TRACE + 24 + p]))
                        .sum::<f64>();
                    eprintln!("{name}: weights landed {:.2} us/layer after the quantisation", w / n as f64);
                }
                if p == 1 && std::env::var("YINSEN_CUDA_BENCH").is_ok_and(|v| v == "decode") {
                    // Attention's inner marks (block 0's first item): q loaded,
                    // scores, softmax, V landed; microseconds per layer.
                    let mut part = [0.0; 5];
                    for l in 0..n {
                        let b = l * MG_TRACE;
                        let m = [b + 4, b + 23, b + 20, b + 21, b + 22, b + 5];
                        for k in 0..5 {
                            part[k] += us(t[m[k]], t[m[k + 1]]) / n as f64;
                        }
                    }
                    eprintln!(
                        "attention inner (us/layer): start {:.2} q {:.2} scores {:.2} softmax {:.2} V+gu {:.2}",
                        part[0], part[1], part[2], part[3], part[4]
                    );
                    // Marks 24-29 (MG_TRACE_MERGE builds): cycle counts of
                    // the block that merged virtual head 0's key chunks
                    // (none with one chunk).
                    let merged: Vec<usize> = (0..n).filter(|l| t[l * MG_TRACE + 24] > 0).collect();
                    if !merged.is_empty() {
                        let mut m = [0.0; 6];
                        for &l in &merged {
                            for (k, v) in m.iter_mut().enumerate() {
                                *v += t[l * MG_TRACE + 24 + k] as f64 / khz * 1e3 / merged.len() as f64;
                            }
                        }
                        eprintln!(
                            "attention merge, head 0's merging block (us/layer, {} layers): item {:.2} counter {:.2} staging {:.2} merge: (m, l) loads {:.2} weights {:.2} outputs {:.2}",
                            merged.len(), m[0], m[1], m[2], m[3], m[4], m[5]
                        );
                    }
                }
                bench::PhaseTime {
                    phase: name.to_string(),
                    work_us: work,
                    quant_us: quant,
                    dot_us: dot,
                    barrier_us: wait,
                }
            })
            .collect())
    }

    /// Bytes of one matrix kind over all layers, and the ops (2 per
    /// multiply-add) of `nt` tokens through them.
    fn matrix_work(&self, f: &dyn Fn(&GpuLayer) -> &GpuMatrix, nt: usize) -> (usize, f64) {
        let bytes = self.layers.iter().map(|l| f(l).bytes()).sum();
        let ops = self
            .layers
            .iter()
            .map(|l| 2.0 * (f(l).n_rows * f(l).n_in * nt) as f64)
            .sum();
        (bytes, ops)
    }

    /// Per tag: median GPU time over `runs`, bytes, and the ops of `nt`
    /// tokens' matrix work (lm_head: one token).
    fn kernel_table(&self, runs: &[Vec<(&'static str, f32)>], ctx: usize, nt: usize) -> Vec<bench::KernelTime> {
        let c = &self.config;
        let mats = |f: &dyn Fn(&GpuLayer) -> &GpuMatrix| self.matrix_work(f, nt);
        let kv = 2 * c.n_layers * c.n_kv_heads * ctx * c.head_dim * self.kv.bytes();
        let mut tags = vec![
            ("embed", (c.hidden * 2, 0.0)),
            ("qkv+rope", mats(&|l| &l.qkv)),
            ("attention", (kv, 0.0)),
        ];
        tags.extend(self.tail_tags(nt));
        Self::group_times(runs, &tags)
    }

    /// For benchmarks: per-kernel-group GPU time of an un-graphed forward of
    /// `nt` tokens from position 0 (median of `reps`), with the matrix TOPS.
    pub(crate) fn profile_forward(&self, nt: usize, reps: usize) -> Result<Vec<bench::KernelTime>> {
        let mut cache = self.cuda_cache(nt)?;
        let runs = self.profiled(reps, || self.time_forward(&mut cache, nt).map(|_| ()))?;
        Ok(self.forward_table(&runs, nt, 0))
    }

    /// For benchmarks: GPU ms per kernel group (tag, in launch order;
    /// median over `reps`) of an un-graphed batched step of `nseq` sequences
    /// from short contexts, with greedy picks (`top_k` None) or top-k picks.
    pub(crate) fn profile_batch(
        &self,
        nseq: usize,
        top_k: Option<usize>,
        reps: usize,
    ) -> Result<Vec<(&'static str, f32)>> {
        use crate::backends::{Backend, KvCache};
        let vocab = self.config.vocab as u32;
        let mut caches = (0..nseq)
            .map(|_| self.cuda_cache(reps + 8))
            .collect::<Result<Vec<_>>>()?;
        let picks = vec![top_k.map_or((1, true), |k| (k, false)); nseq];
        let graphs = self.set_step_graphs(false);
        let mut step = 0u32;
        let runs = self.profiled(reps, || {
            let mut refs: Vec<&mut dyn KvCache> = caches.iter_mut().map(|c| c as &mut dyn KvCache).collect();
            let toks: Vec<u32> = (0..nseq as u32).map(|i| (i * 7919 + step) % vocab).collect();
            step += 1;
            self.forward_batch_pick(&mut refs, &toks, &picks).map(|_| ())
        });
        self.set_step_graphs(graphs);
        let runs = runs?;
        let mut tags: Vec<&'static str> = Vec::new();
        for (t, _) in runs.first().into_iter().flatten() {
            if !tags.contains(t) {
                tags.push(t);
            }
        }
        Ok(tags
            .into_iter()
            .map(|tag| {
                let mut per: Vec<f32> = runs
                    .iter()
                    .map(|r| r.iter().filter(|(t, _)| *t == tag).map(|(_, ms)| ms).sum())
                    .collect();
                per.sort_by(f32::total_cmp);
                (tag, per[per.len() / 2])
            })
            .collect())
    }

    /// One warm-up call of `f`, then `reps` calls with per-launch events on:
    /// (tag, ms) of every launch, per call.
    fn profiled(&self, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<Vec<Vec<(&'static str, f32)>>> {
        f()?;
        let mut runs = Vec::with_capacity(reps);
        for _ in 0..reps {
            self.gpu.profile(true)?;
            let r = f();
            let t = self.gpu.profile(false)?;
            r?;
            runs.push(t);
        }
        Ok(runs)
    }

    /// Per-tag times of body() + head() runs over `nt` tokens after `ctx`
    /// cached ones (tags set in body() and head_at()).
    fn forward_table(&self, runs: &[Vec<(&'static str, f32)>], nt: usize, ctx: usize) -> Vec<bench::KernelTime> {
        let c = &self.config;
        let mats = |f: &dyn Fn(&GpuLayer) -> &GpuMatrix| self.matrix_work(f, nt);
        // Scores and P V: 2 x 2 hd flops per (query, visible key) per head.
        let keys = (nt * ctx + nt * (nt + 1) / 2) as f64;
        let att = 4.0 * (c.n_layers * c.n_heads * c.head_dim) as f64 * keys;
        let mut tags = vec![
            ("embed", (0, 0.0)),
            ("norm_quant", (0, 0.0)),
            ("qkv", mats(&|l| &l.qkv)),
            ("rope_kv", (0, 0.0)),
            ("attention", (0, att)),
        ];
        tags.extend(self.tail_tags(nt));
        Self::group_times(runs, &tags)
    }

    /// The profile rows after the attention, the same in every table: the
    /// o / gate_up / down matrices of `nt` tokens and the lm_head (one token):
    /// (tag, (bytes, ops)).
    fn tail_tags(&self, nt: usize) -> [(&'static str, (usize, f64)); 4] {
        let c = &self.config;
        let mats = |f: &dyn Fn(&GpuLayer) -> &GpuMatrix| self.matrix_work(f, nt);
        [
            ("o", mats(&|l| &l.o)),
            ("gate_up", mats(&|l| &l.gu)),
            ("down", mats(&|l| &l.down)),
            (
                "lm_head+argmax",
                (c.vocab * c.hidden * 2, 2.0 * (c.vocab * c.hidden) as f64),
            ),
        ]
    }

    /// For benchmarks: every tensor-core tile variant on layer 0's four
    /// matrices at each token count (random int8 activations, Store epilogue).
    pub(crate) fn gemm_sweep(&self, token_counts: &[usize]) -> Result<Vec<bench::GemmTime>> {
        let Some(l) = self.layers.first() else {
            return Ok(Vec::new());
        };
        let g = &self.gpu;
        g.bind()?;
        let max_t = token_counts.iter().copied().max().unwrap_or(1);
        let mats: [(&str, &GpuMatrix); 4] = [("qkv", &l.qkv), ("o", &l.o), ("gate_up", &l.gu), ("down", &l.down)];
        let kmax = mats.iter().map(|(_, m)| m.kpad()).max().unwrap_or(64);
        let rows = mats.iter().map(|(_, m)| m.n_rows).max().unwrap_or(1);
        let mut r = 0x9E37_79B9_7F4A_7C15u64;
        let x: Vec<i8> = (0..max_t * kmax)
            .map(|_| {
                r ^= r << 13;
                r ^= r >> 7;
                r ^= r << 17;
                (r >> 56) as i8
            })
            .collect();
        let xb = g.upload(&x)?;
        // The tiled variants read a tiled copy (timing only: any bytes do).
        let ntp = max_t.div_ceil(TILED_TOKENS) * TILED_TOKENS;
        let xt = g.upload(
            &x.iter()
                .cycle()
                .take(tiled_x_bytes(kmax, ntp))
                .copied()
                .collect::<Vec<i8>>(),
        )?;
        let ones = g.upload(&vec![1f32; max_t])?;
        let zeros = g.upload(&vec![0i32; max_t])?;
        let out = g.alloc(4 * max_t * rows)?;
        let ev = Events::new()?;
        let mut res = Vec::new();
        for &(name, m) in &mats {
            for &nt in token_counts {
                for v in MmaVariant::ALL.into_iter().filter(|v| v.available(g)) {
                    // Paired gate/up tiles take the TMA GEMM with its gated epilogue only.
                    let gated = v.tiled && m.paired;
                    let (ep, stride) = match gated {
                        true => (Epilogue::GatedRelu2, m.n_rows / 2),
                        false => (Epilogue::Store, m.n_rows),
                    };
                    let run = || {
                        launch_matmul(
                            g,
                            m,
                            MatKernel::MmaWith(v),
                            if v.tiled { xt.p() } else { xb.p() },
                            if v.tiled { ntp } else { 0 },
                            nt,
                            ones.p(),
                            zeros.p(),
                            ep,
                            out.p(),
                            stride,
                            Launch::Plain,
                            None,
                        )
                    };
                    run()?; // warm-up
                            // Replayed as a graph of `reps` launches: GPU time without
                            // the host's per-launch cost (which floors short kernels).
                    let reps = 20;
                    let graph = self.capture(|| (0..reps).try_for_each(|_| run()))?;
                    let launch = || drv(unsafe { result::graph::launch(graph.exec, g.stream) }, "cuGraphLaunch");
                    launch()?;
                    ev.record_start(g.stream)?;
                    launch()?;
                    let us = ev.record_stop_ms(g.stream)? as f64 * 1000.0 / reps as f64;
                    let ops = 2.0 * (m.n_rows * m.n_in * nt) as f64;
                    res.push(bench::GemmTime {
                        matrix: name.to_string(),
                        tokens: nt,
                        variant: v.name.to_string(),
                        us,
                        tops: ops / us / 1e6,
                        weight_gb_s: m.bytes() as f64 / us / 1e3,
                    });
                }
            }
        }
        Ok(res)
    }

    /// Median GPU time per tag over `runs`, with GB/s and TOPS from each tag's bytes / ops.
    fn group_times(runs: &[Vec<(&'static str, f32)>], tags: &[(&str, (usize, f64))]) -> Vec<bench::KernelTime> {
        tags.iter()
            .map(|&(tag, (bytes, ops))| {
                let mut per: Vec<f32> = runs
                    .iter()
                    .map(|r| r.iter().filter(|(t, _)| *t == tag).map(|(_, ms)| ms).sum())
                    .collect();
                per.sort_by(|a, b| a.total_cmp(b));
                let us = per.get(per.len() / 2).copied().unwrap_or(0.0) as f64 * 1000.0;
                let calls = runs.first().map_or(0, |r| r.iter().filter(|(t, _)| *t == tag).count());
                let (gb_s, tops) = if us > 0.0 {
                    (bytes as f64 / us / 1e3, ops / us / 1e6)
                } else {
                    (0.0, 0.0)
                };
                bench::KernelTime {
                    tag: tag.to_string(),
                    calls,
                    us,
                    bytes,
                    gb_s,
                    tops,
                }
            })
            .collect()
    }
}
