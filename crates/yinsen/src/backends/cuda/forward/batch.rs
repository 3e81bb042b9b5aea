//! Batched decode across sequences: one new token of each of several
//! sequences per step, every matrix over all of them, each token's RoPE,
//! cache row and attention in its own cache (`Keys::Batch`: a table of the
//! caches' addresses and positions in device memory), through the
//! persistent multi-token kernel on short contexts (`DEFAULT_BATCH_KEY_BUDGET`)
//! or the per-kernel body. Greedy and top-k picks go through the screened
//! head where it is on (`head.rs`: the 8-bit head read once for all of the
//! step's tokens). Steps replay a graph per (token count, attention splits,
//! head) from a key's second use.

use super::prefill::Keys;
use super::*;

/// What a batched step hands back per sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum BatchWant {
    /// Every logit (`[i][vocab]`).
    Logits,
    /// The greedy token (the GPU's argmax of the row).
    Greedy,
    /// The k best (token, logit), ranked (`topk_logits`, k <= TK_MAX).
    TopK(usize),
}

/// A batched step's results, as [`BatchWant`] asked.
pub(super) enum BatchOut {
    Logits(Vec<f32>),
    /// The token and its logit (NaN where the full head's argmax gave it).
    Greedy(Vec<(u32, f32)>),
    TopK(Vec<Vec<(u32, f32)>>),
}

/// Graph key of a batched step: everything its launches depend on besides
/// the token ids and the `BatchSeq` table (both read from device memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct BatchKey {
    nt: usize,
    /// Attention splits launched: a power of two covering the longest
    /// sequence (a token's blocks past its own keys only count themselves).
    n_split: usize,
    /// What the step ends with (the logits, or a pick per row from them).
    want: BatchWant,
    /// The matrix kernels' settings (as `StepKey::mat`).
    mat: (usize, usize),
    /// Through the persistent multi-token kernel (else the per-kernel body).
    multi: bool,
    /// The head through `lm_head_f16_rows`.
    lm_rows: bool,
    /// Picks through the screened head (`batch_screen_kernels`) with this
    /// pass 1: no logits.
    screen: Option<head::BatchPass1>,
}

/// Batched-step graphs kept at most (keys vary with the batch size and the
/// longest context's power of two).
const BATCH_GRAPHS: usize = 16;

/// Captured batched steps, least recently used first, and keys run once
/// un-graphed (a key is captured on its second use).
#[derive(Default)]
pub(super) struct BatchGraphs {
    graphs: Vec<(BatchKey, Graph)>,
    seen: Vec<BatchKey>,
}

// SAFETY: the graph handles are only used with the scratch lock held.
unsafe impl Send for BatchGraphs {}

impl CudaBackend {
    /// For benchmarks: the budget of keys (of the longest sequence) times
    /// sequences up to which a batched step takes the persistent
    /// multi-token kernel; returns the previous budget.
    pub fn set_mega_multi_batch_keys(&self, budget: usize) -> usize {
        self.mega_multi_batch_keys.swap(budget, Ordering::Relaxed)
    }

    /// For benchmarks: GPU ms of one replay of the most recently used
    /// batched-step graph (`n` back-to-back replays between events; the
    /// caches and positions are those of its last step, which must still be
    /// alive), or None where none is captured.
    pub(crate) fn time_last_batch_graph(&self, n: usize) -> Result<Option<f32>> {
        let s = self.lock_scratch()?;
        self.gpu.bind()?;
        let Some((_, g)) = s.batch_graphs.graphs.last() else {
            return Ok(None);
        };
        let ev = Events::new()?;
        ev.record_start(self.gpu.stream)?;
        for _ in 0..n {
            super::super::drv(
                unsafe { result::graph::launch(g.exec, self.gpu.stream) },
                "cuGraphLaunch",
            )?;
        }
        Ok(Some(ev.record_stop_ms(self.gpu.stream)? / n.max(1) as f32))
    }

    /// The launches of a batched step: body, heads into successive rows of
    /// `s.logits`, then what `key.want` asks for: each row's argmax into
    /// `s.argmax`, or its top k into its TK_MAX slots of `s.topk_v / _i`.
    fn batch_step_kernels(&self, s: &Scratch, key: BatchKey) -> Result<()> {
        let keys = Keys::Batch(s.seqs.p());
        match key.multi {
            true => self.body_multi(s, keys, key.nt)?,
            false => self.body_keys(s, keys, key.nt, key.n_split)?,
        }
        if key.screen.is_some() {
            // The final norms of all rows, then the screened picks.
            self.head_at(s, 0, key.nt, false, 0)?;
            return self.batch_screen_kernels(s, key.nt, matches!(key.want, BatchWant::TopK(_)));
        }
        for t0 in (0..key.nt).step_by(LM_T) {
            self.head_at(s, t0, (key.nt - t0).min(LM_T), true, t0)?;
        }
        let vocab = self.config.vocab;
        match key.want {
            BatchWant::Logits => Ok(()),
            BatchWant::Greedy => self.gpu.launch(
                "argmax_f32",
                (key.nt as u32, 1, 1),
                1024,
                &[s.logits.p(), Arg::I(vocab as i32), s.argmax.p()],
            ),
            // One row after another (the kernel's partials and arrival
            // counter are one row's), each into its own TK_MAX slots.
            BatchWant::TopK(k) => (0..key.nt).try_for_each(|t| {
                self.gpu.launch(
                    "topk_logits",
                    (vocab.div_ceil(TK_PER) as u32, 1, 1),
                    256,
                    &[
                        s.logits.at(4 * t * vocab),
                        Arg::I(vocab as i32),
                        Arg::I(k as i32),
                        s.topk_part.p(),
                        s.topk_cnt.p(),
                        s.topk_v.at(4 * t * TK_MAX),
                        s.topk_i.at(4 * t * TK_MAX),
                    ],
                )
            }),
        }
    }

    /// One decode step of several sequences (`tokens[i]` appended to
    /// `caches[i]`, checked by the caller), up to 16 sequences per launch
    /// sequence; returns what `want` asks for, in sequence order.
    pub(super) fn run_batch(&self, caches: &mut [&mut CudaCache], tokens: &[u32], want: BatchWant) -> Result<BatchOut> {
        let mut s = self.lock_scratch()?;
        self.gpu.bind()?;
        let vocab = self.config.vocab;
        // The split-K partials, the scratch rows and the logits rows bound it.
        let group = s
            .chunk
            .min(s.part_tokens)
            .min(LM_T.max(STEP_GRAPH_MAX))
            .min(head::LMB_T);
        // Picks through the screened head where it is on: the 8-bit head
        // read once for the step's tokens instead of the F16 head's passes.
        let screen = want != BatchWant::Logits && self.batch_screened();
        if let (true, BatchWant::TopK(k)) = (screen, want) {
            self.set_screen_k(k)?;
        }
        let (mut logits, mut best, mut top) = (Vec::new(), Vec::new(), Vec::new());
        let mut graphs = std::mem::take(&mut s.batch_graphs);
        let run = (|| -> Result<()> {
            for (cs, ts) in caches.chunks_mut(group).zip(tokens.chunks(group)) {
                let nt = ts.len();
                let tok: Vec<i32> = ts.iter().map(|&t| t as i32).collect();
                s.tok.write_async(&tok)?;
                let table: Vec<u64> = cs
                    .iter()
                    .flat_map(|c| [c.k.ptr, c.v.ptr, c.cap as u64 | (c.len as u64) << 32])
                    .collect();
                s.seqs.write_async(&table)?;
                let keys = cs.iter().map(|c| c.len + 1).max().unwrap_or(1);
                let longest = keys.div_ceil(ATT_CHUNK);
                let key = BatchKey {
                    nt,
                    n_split: longest.next_power_of_two().min(self.max_splits),
                    want,
                    mat: (
                        self.mma_min_tokens.load(Ordering::Relaxed),
                        self.big_gemm.load(Ordering::Relaxed),
                    ),
                    multi: self.uses_mega_multi()
                        && mega_multi::batch_takes_multi(nt, keys, self.mega_multi_batch_keys.load(Ordering::Relaxed)),
                    lm_rows: self.lm_head_rows.load(Ordering::Relaxed),
                    screen: screen.then(|| self.batch_pass1()),
                };
                self.batch_step(&s, &mut graphs, key)?;
                match want {
                    BatchWant::Logits => logits.extend(s.read_logits(nt, vocab)?),
                    BatchWant::Greedy if screen => best.extend(self.batch_screen_greedy(nt)?),
                    BatchWant::Greedy => {
                        best.extend(s.argmax.read::<i32>(nt)?.into_iter().map(|t| (t as u32, f32::NAN)))
                    }
                    BatchWant::TopK(k) if screen => top.extend(self.batch_screen_top_k(&s, nt, k)?),
                    BatchWant::TopK(k) => {
                        let (v, i) = (s.topk_v.read::<f32>(nt * TK_MAX)?, s.topk_i.read::<i32>(nt * TK_MAX)?);
                        for (vr, ir) in v.chunks(TK_MAX).zip(i.chunks(TK_MAX)) {
                            // Slots past the vocabulary hold -1.
                            let row = ir[..k].iter().zip(&vr[..k]).filter(|p| *p.0 >= 0);
                            top.push(row.map(|(&t, &x)| (t as u32, x)).collect());
                        }
                    }
                }
                for c in cs.iter_mut() {
                    c.len += 1;
                }
            }
            Ok(())
        })();
        s.batch_graphs = graphs;
        run.map(|()| match want {
            BatchWant::Logits => BatchOut::Logits(logits),
            BatchWant::Greedy => BatchOut::Greedy(best),
            BatchWant::TopK(_) => BatchOut::TopK(top),
        })
    }

    /// Queue the step `key`: through its graph where one is captured or the
    /// key was seen before, else un-graphed (first use).
    fn batch_step(&self, s: &Scratch, g: &mut BatchGraphs, key: BatchKey) -> Result<()> {
        if !self.step_graphs.load(Ordering::Relaxed) {
            return self.batch_step_kernels(s, key);
        }
        let graph = match g.graphs.iter().position(|(k, _)| *k == key) {
            Some(i) => g.graphs.remove(i).1,
            None => match g.seen.iter().position(|k| *k == key) {
                Some(i) => {
                    g.seen.remove(i);
                    if g.graphs.len() >= BATCH_GRAPHS {
                        g.graphs.remove(0);
                    }
                    self.capture(|| self.batch_step_kernels(s, key))?
                }
                None => {
                    if g.seen.len() >= BATCH_GRAPHS {
                        g.seen.remove(0);
                    }
                    g.seen.push(key);
                    return self.batch_step_kernels(s, key);
                }
            },
        };
        let exec = graph.exec;
        g.graphs.push((key, graph));
        super::super::drv(unsafe { result::graph::launch(exec, self.gpu.stream) }, "cuGraphLaunch")
    }
}
