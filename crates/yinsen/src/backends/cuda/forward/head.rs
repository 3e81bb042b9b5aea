//! The decode step's lm_head on the host side: the full F16 head, the
//! optional 8-bit copy (`--lm-head q8`), and the screened head (decode.cu's
//! `lm_head_screen_q8`, `lm_head_pick_f16`, `lm_head_topk_*`), which picks
//! the full head's greedy token or top-k rows from the 8-bit copy plus the
//! F16 rows a proved per-row bound cannot rule out.

use std::sync::atomic::Ordering;

use super::{berr, dense_to_f16, CudaBackend, CudaCache, Head, Scratch, DM_NMAX, TK_MAX};
use crate::backends::cuda::{Arg, DevBuf, Launch};
use crate::error::{Error, Result};
use crate::model::{DenseMatrix, DenseType};

/// The screened pick's device data (see `set_lm_head_screen`; decode.cu's
/// ScreenArgs): per-row bound constants and the per-step slots.
pub(super) struct ScreenHead {
    /// f32 per row: max |E - Ê|.
    pub(super) err: DevBuf,
    /// f32 per row: Σ max(|E|, |Ê|).
    pub(super) abs: DevBuf,
    /// The step's bound factors (a, b), written by the screen pass.
    pub(super) fac: DevBuf,
    /// The largest lower end's order key, the non-finite flag and the
    /// candidate count of the last pick (u32 each, one spare).
    pub(super) keys: DevBuf,
    /// The step's normed x (f32 per hidden unit): pass 1 writes it, pass 2
    /// reads it.
    pub(super) xs: DevBuf,
    /// The screened top-k (decode.cu, `lm_head_topk_*`): pass 1's per-warp
    /// largest lower ends (u64 each), the floor (f32), k (i32, written
    /// before each replay), the list of rows at or above the floor (u64 x
    /// TL_CAP), its length and the blocks' arrivals (2 x u32, reset by the
    /// kernel), and the ranked output (status, TK_MAX rows, TK_MAX logits).
    pub(super) wmax: DevBuf,
    pub(super) floor: DevBuf,
    pub(super) k: DevBuf,
    pub(super) list: DevBuf,
    pub(super) cnt: DevBuf,
    pub(super) out: DevBuf,
    /// The batched steps' slots (None: pass 1's shared memory does not fit
    /// LMB_T rows of codes; batched picks then read the full head).
    pub(super) batch: Option<BatchScreen>,
}

/// Tokens a batched screen takes (LMB_T in decode.cu).
pub(super) const LMB_T: usize = 16;

/// The screened head of a batched step (decode.cu: `lm_head_screen_prep`,
/// `lm_head_screen_q8_batch`, then `lm_head_pick_f16_batch` or the top-k's
/// `lm_head_topk_floor_batch` / `lm_head_topk_f16_batch`): the one-token
/// slots with a row per token, and each token's 8-bit blocks of its normed x.
pub(super) struct BatchScreen {
    xq8: DevBuf,
    dxs: DevBuf,
    fac: DevBuf,
    keys: DevBuf,
    best: DevBuf,
    wmax: DevBuf,
    floor: DevBuf,
    list: DevBuf,
    cnt: DevBuf,
    out: DevBuf,
    /// `lm_head_screen_q8_batch`'s dynamic shared memory per token: its
    /// codes and block scales.
    smem_per_token: usize,
    /// `lm_head_screen_q8_mma_cp`'s dynamic shared memory (LMB_T padded
    /// code rows, block scales, each warp's cp.async stages), where that
    /// pass 1 runs (None: dp4a's).
    mma_smem: Option<usize>,
}

/// Each warp's cp.async stages of `lm_head_screen_q8_mma_cp` (decode.cu:
/// 8 warps x LMB_ST stages x LMB_STAGE bytes), and the blocks of 32 codes a
/// stage holds (LMB_KB).
const LMB_CP_BYTES: usize = 8 * 3 * (16 * 160 + 16 * 4 * 2);
const LMB_KB: usize = 4;

/// Which pass 1 a batched step's screened picks run: none (the full head's
/// passes), `lm_head_screen_q8_batch` (dp4a) or `lm_head_screen_q8_mma_cp`
/// (tensor cores, sm_80+, weights staged by cp.async; the default where its
/// shared memory fits, else dp4a).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchPass1 {
    Off = 0,
    Dp4a = 1,
    Mma = 2,
}

impl BatchPass1 {
    /// `YINSEN_CUDA_BATCH_SCREEN=0|dp4a|mma` (A/B runs), else Mma.
    pub(super) fn from_env() -> Self {
        match std::env::var("YINSEN_CUDA_BATCH_SCREEN").as_deref() {
            Ok("0") => Self::Off,
            Ok("dp4a") => Self::Dp4a,
            _ => Self::Mma,
        }
    }
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Off,
            1 => Self::Dp4a,
            _ => Self::Mma,
        }
    }
}

/// Blocks per token of a batched screen's pass 2 on `sms` SMs:
/// `YINSEN_CUDA_BATCH_P2_BPS` per SM (A/B runs; read once), default 1.
fn batch_pass2_blocks(sms: u32) -> u32 {
    static PER_SM: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *PER_SM.get_or_init(|| env_per_sm("YINSEN_CUDA_BATCH_P2_BPS", 1)) as u32 * sms
}

/// Blocks per SM from the environment variable `var` (1..=16; A/B runs),
/// else `default`.
fn env_per_sm(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|v| (1..=16).contains(v))
        .unwrap_or(default)
}

/// The streamed 8-bit head passes (decode.cu: `lm_head_screen_q8_tma`,
/// `lm_head_dec_q8_tma`; sm_90a): thread 0 of each block keeps `ring`
/// stages of 8 rows in flight by bulk copies, where the register-fed
/// kernels hold one row a warp.
#[derive(Clone, Copy, Debug)]
pub(super) struct HeadTma {
    grid: u32,
    smem: u32,
    ring: i32,
}

/// Ring stages of the streamed head (`YINSEN_CUDA_HEAD_TMA_RING`, 2..=8;
/// A/B runs), default 4: 87 KB of rows in flight a block on 2B4T.
fn head_tma_ring() -> usize {
    std::env::var("YINSEN_CUDA_HEAD_TMA_RING")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|v| (2..=8).contains(v))
        .unwrap_or(4)
}

/// The (row, logit) of an argmax key (decode.cu's `argmax_key`; 0: no
/// finite logit was seen).
fn from_argmax_key(k: u64) -> Option<(u32, f32)> {
    let u = (k >> 32) as u32;
    let bits = if u & 0x8000_0000 != 0 { u & 0x7fff_ffff } else { !u };
    (k != 0).then_some((!(k as u32), f32::from_bits(bits)))
}

/// List entries the screened top-k ranks (TL_CAP in decode.cu).
const TL_CAP: usize = DM_NMAX / 2;
/// Blocks of the top-k floor (FG_BLOCKS in decode.cu).
const FG_BLOCKS: usize = 32;

/// The lm_head as ggml Q8_0 (the CPU's 8-bit copy, same numbers), split for
/// aligned GPU loads: int8 values `[rows][cols]` and the f16 scale of each
/// 32 values `[rows][cols / 32]`.
pub(super) fn q8_split(m: &DenseMatrix) -> Result<(Vec<u8>, Vec<u8>)> {
    let q = m.to_q8_0()?;
    let (mut vals, mut scales) = (
        Vec::with_capacity(m.rows * m.cols),
        Vec::with_capacity(m.rows * m.cols / 16),
    );
    for blk in q.data.as_slice().chunks_exact(34) {
        scales.extend_from_slice(&blk[..2]);
        vals.extend_from_slice(&blk[2..]);
    }
    Ok((vals, scales))
}

impl CudaBackend {
    /// Decode with an 8-bit copy of `lm_head` (the model's output matrix:
    /// ggml Q8_0, the same bytes as the CPU's `--lm-head q8`; half the bytes
    /// of f16; `YINSEN_CUDA_LM_HEAD=q8` at construction), or with the f16 one
    /// (None). It serves the one-token decode step (graphs captured
    /// afterwards); prefill logits stay f16. Returns the previous setting.
    pub fn set_lm_head_q8(&self, lm_head: Option<&DenseMatrix>) -> Result<bool> {
        let c = &self.config;
        let on = lm_head.is_some();
        if let Some(m) = lm_head {
            if !c.hidden.is_multiple_of(32) || c.hidden > DM_NMAX || !self.fused {
                return Err(Error::Unsupported(format!(
                    "CUDA 8-bit lm_head needs the fused decode and a width divisible by 32 (<= {DM_NMAX}), got {}",
                    c.hidden
                )));
            }
            let mut q = self.lm_head_q8.lock().map_err(|_| berr("lm_head lock poisoned"))?;
            if q.is_none() {
                if m.rows != c.vocab || m.cols != c.hidden {
                    return Err(Error::input("8-bit lm_head: matrix shape differs from the model's"));
                }
                let (vals, scales) = q8_split(m)?;
                *q = Some((self.gpu.upload(&vals)?, self.gpu.upload(&scales)?));
            }
        }
        self.head_tma();
        drop(self.lock_scratch()?);
        Ok(self.lm_head_q8_on.swap(on, Ordering::Relaxed))
    }

    /// The screened greedy pick after the last layer (decode.cu): the
    /// per-step slots zeroed (by `mega_begin` in the persistent decode, so
    /// no memset node cuts pass 1's programmatic launch; here otherwise),
    /// the 8-bit head's logits and the largest lower end, then the F16 rows
    /// that can still win and the pick into `best`; with `top_k`, the
    /// screened top-k instead (decode.cu: the floor, then the rows that
    /// can reach it, ranked into the screen's `out`).
    pub(super) fn screened_pick_step(&self, s: &Scratch, pdl: bool, top_k: bool) -> Result<()> {
        let g = &self.gpu;
        let q = self.lm_head_q8.lock().map_err(|_| berr("lm_head lock poisoned"))?;
        let (vals, scales) = q.as_ref().ok_or_else(|| berr("8-bit lm_head not uploaded"))?;
        let sh = self.lm_head_screen.lock().map_err(|_| berr("lm_head lock poisoned"))?;
        let sh = sh.as_ref().ok_or_else(|| berr("screened lm_head not prepared"))?;
        let blocks = self.head_blocks();
        g.set_tag("lm_head pass 1 (8-bit screen)");
        if !self.uses_mega() {
            sh.keys.fill(0)?;
        }
        // Both passes take the bound constants and the per-step slots.
        let slots = [sh.err.p(), sh.abs.p(), sh.fac.p(), sh.keys.p(), sh.xs.p()];
        let mut a1 = vec![vals.p(), scales.p()];
        a1.extend(self.head_args(s));
        a1.extend(slots);
        // Only the top-k's floor reads the per-warp lower ends.
        a1.push(if top_k { sh.wmax.p() } else { Arg::P(0) });
        // The floor reads a lower end from each warp of pass 1's grid.
        let p1_blocks = match self.head_tma() {
            Some(t) => {
                a1.push(Arg::I(t.ring));
                let how = if pdl { Launch::Pdl } else { Launch::Plain };
                g.launch_smem("lm_head_screen_q8_tma", (t.grid, 1, 1), 256, t.smem, &a1, how)?;
                t.grid
            }
            None => {
                g.launch_ex("lm_head_screen_q8", (blocks, 1, 1), 256, &a1, pdl)?;
                blocks
            }
        };
        let c = &self.config;
        let e = self.lm_head.as_ref().unwrap_or(&self.embed).p();
        if top_k {
            g.set_tag("lm_head top-k floor");
            let floor = [
                e,
                Arg::I(c.hidden as i32),
                sh.wmax.p(),
                Arg::I(p1_blocks as i32 * 8),
                sh.k.p(),
                sh.keys.p(),
                sh.xs.p(),
                sh.floor.p(),
            ];
            // A grid of up to FG_BLOCKS blocks of 8 rows each (decode.cu);
            // its scratch is the list, which the next kernel fills.
            let fg = (blocks as usize).clamp(1, FG_BLOCKS);
            let mut a = floor.to_vec();
            a.push(sh.list.p());
            g.launch_ex("lm_head_topk_floor", (fg as u32, 1, 1), 256, &a, pdl)?;
            g.set_tag("lm_head top-k rows");
            let mut a2 = vec![e, Arg::I(c.vocab as i32), Arg::I(c.hidden as i32), s.logits.p()];
            a2.extend(slots);
            a2.extend([sh.floor.p(), sh.k.p(), sh.list.p(), sh.cnt.p(), sh.out.p()]);
            g.launch_ex("lm_head_topk_f16", (blocks, 1, 1), 256, &a2, pdl)?;
            g.set_tag("");
            return Ok(());
        }
        g.set_tag("lm_head pass 2 (greedy rows)");
        let mut a2 = vec![e, Arg::I(c.vocab as i32), Arg::I(c.hidden as i32), s.logits.p()];
        a2.extend(slots);
        a2.push(s.best.p());
        g.launch_ex("lm_head_pick_f16", (blocks, 1, 1), 256, &a2, pdl)?;
        g.set_tag("");
        Ok(())
    }

    /// Pick greedy tokens and top-k rows through the screened head
    /// (Some(lm_head): the model's output matrix) or through the full F16
    /// head (None); returns the previous setting. A pick reads an 8-bit copy
    /// of the head (the `--lm-head q8` bytes, +330 MB on 2B4T) and two floats
    /// per row of bound constants (cpu/head_screen.rs: err_i = max|E - Ê|,
    /// abs_i = Σ max(|E|, |Ê|) against the F16 values the full head
    /// multiplies), then the F16 rows whose bound leaves them a chance: the
    /// same token, or the same k rows and logit bits, as the full head.
    /// Serves `forward_greedy` and `generate_greedy` (the pick graph) and
    /// `forward_top_k` (the top-k graph; see decode.cu's `lm_head_topk_*`);
    /// logits keep the full head.
    pub fn set_lm_head_screen(&self, lm_head: Option<&DenseMatrix>) -> Result<bool> {
        let c = &self.config;
        if let Some(m) = lm_head {
            if !c.hidden.is_multiple_of(32) || c.hidden > DM_NMAX || !self.fused {
                return Err(Error::Unsupported(format!(
                    "CUDA screened lm_head needs the fused decode and a width divisible by 32 (<= {DM_NMAX}), got {}",
                    c.hidden
                )));
            }
            if m.rows != c.vocab || m.cols != c.hidden {
                return Err(Error::input("screened lm_head: matrix shape differs from the model's"));
            }
            let mut sh = self.lm_head_screen.lock().map_err(|_| berr("lm_head lock poisoned"))?;
            if sh.is_none() {
                let q8 = m.to_q8_0()?;
                // The bound compares the 8-bit copy with the F16 values the
                // full head reads (an F16 conversion of other dtypes).
                let f16 = DenseMatrix::new(
                    m.rows,
                    m.cols,
                    DenseType::F16,
                    crate::model::Storage::owned(dense_to_f16(m)),
                )?;
                let rows = crate::model::dense::RowError::of_rows(&f16, &q8);
                if let Some(r) = rows.iter().position(|e| e.max_diff.is_nan()) {
                    return Err(Error::Unsupported(format!(
                        "lm_head row {r} holds a non-finite value: not screened"
                    )));
                }
                let floats = |f: &dyn Fn(&crate::model::dense::RowError) -> f32| -> Vec<u8> {
                    rows.iter().flat_map(|e| f(e).to_le_bytes()).collect()
                };
                let mut q = self.lm_head_q8.lock().map_err(|_| berr("lm_head lock poisoned"))?;
                if q.is_none() {
                    let (vals, scales) = q8_split(m)?;
                    *q = Some((self.gpu.upload(&vals)?, self.gpu.upload(&scales)?));
                }
                *sh = Some(ScreenHead {
                    err: self.gpu.upload(&floats(&|e| e.max_diff))?,
                    abs: self.gpu.upload(&floats(&|e| e.abs_sum))?,
                    fac: self.gpu.upload(&[0u8; 8])?,
                    keys: self.gpu.upload(&[0u8; 16])?,
                    xs: self.gpu.upload(&vec![0u8; 4 * c.hidden])?,
                    wmax: self.gpu.upload(&vec![0u8; 8 * 8 * self.head_blocks() as usize])?,
                    floor: self.gpu.upload(&[0u8; 4])?,
                    k: self.gpu.upload(&[0u8; 4])?,
                    list: self.gpu.upload(&vec![0u8; 8 * TL_CAP])?,
                    cnt: self.gpu.upload(&[0u8; 8])?,
                    out: self.gpu.upload(&vec![0u8; 4 * (1 + 2 * TK_MAX)])?,
                    batch: self.batch_screen_slots()?,
                });
            }
        }
        // Planned here, outside any graph capture (it sets kernel attributes).
        self.head_tma();
        // A greedy step queued ahead picked through the head before this call.
        drop(self.lock_scratch()?);
        Ok(self.lm_head_screen_on.swap(lm_head.is_some(), Ordering::Relaxed))
    }

    /// The batched screen's slots, or None where pass 1 cannot hold LMB_T
    /// tokens' codes in shared memory.
    fn batch_screen_slots(&self) -> Result<Option<BatchScreen>> {
        let (h, nb) = (self.config.hidden, self.config.hidden / 32);
        let smem_per_token = h + 4 * nb;
        if smem_per_token * LMB_T > 48 * 1024
            && !self
                .gpu
                .allow_dynamic_smem("lm_head_screen_q8_batch", smem_per_token * LMB_T)?
        {
            eprintln!("note: CUDA batched screened picks off: {h}-wide rows do not fit shared memory");
            return Ok(None);
        }
        // The tensor-core pass 1 (sm_80+): LMB_T code rows of hw words
        // padded to 8 mod 32, nb x LMB_T scales, then the warps' stages
        // (decode.cu).
        let hw = h / 4;
        let mma_bytes = 4 * (LMB_T * (hw + (8usize.wrapping_sub(hw) & 31)) + nb * LMB_T) + LMB_CP_BYTES;
        let mma_smem = (self.gpu.has_mma()
            && nb.is_multiple_of(LMB_KB)
            && self.gpu.allow_dynamic_smem("lm_head_screen_q8_mma_cp", mma_bytes)?)
        .then_some(mma_bytes);
        let zeros = |n: usize| self.gpu.upload(&vec![0u8; n]);
        let nw = 8 * self.head_blocks() as usize;
        Ok(Some(BatchScreen {
            xq8: zeros(LMB_T * h)?,
            dxs: zeros(LMB_T * 4 * nb)?,
            fac: zeros(LMB_T * 8)?,
            keys: zeros(LMB_T * 16)?,
            best: zeros(LMB_T * 8)?,
            wmax: zeros(LMB_T * 8 * nw)?,
            floor: zeros(LMB_T * 4)?,
            list: zeros(LMB_T * 8 * TL_CAP)?,
            // The top-k rows' list lengths and arrivals: zero between steps
            // (the last block of each token's grid resets them).
            cnt: zeros(LMB_T * 8)?,
            out: zeros(LMB_T * 4 * (1 + 2 * TK_MAX))?,
            smem_per_token,
            mma_smem,
        }))
    }

    /// For tests and A/B runs: which pass 1 batched screened picks run
    /// (Off: the full head's passes); returns the previous setting.
    pub fn set_batch_pass1(&self, p: BatchPass1) -> BatchPass1 {
        BatchPass1::from_u8(self.batch_pass1.swap(p as u8, Ordering::Relaxed))
    }

    /// The pass 1 batched screened picks run.
    pub(super) fn batch_pass1(&self) -> BatchPass1 {
        BatchPass1::from_u8(self.batch_pass1.load(Ordering::Relaxed))
    }

    /// Whether a batched step's picks go through the screened head: the
    /// screen is on (and not the 8-bit head's logits) and its batch slots
    /// fit; `YINSEN_CUDA_BATCH_SCREEN=0` (read once, for A/B runs) keeps the
    /// full head's passes.
    pub(super) fn batch_screened(&self) -> bool {
        self.batch_pass1() != BatchPass1::Off
            && self.lm_head_screened()
            && !self.lm_head_q8_on.load(Ordering::Relaxed)
            && self
                .lm_head_screen
                .lock()
                .is_ok_and(|sh| sh.as_ref().is_some_and(|sh| sh.batch.is_some()))
    }

    /// The screened picks of a batched step's `nt` tokens (<= LMB_T), whose
    /// final norms are rows 0..nt of `s.normed`: pass 1 over the 8-bit head
    /// once for all of them (its logits into rows 0..nt of `s.logits`), then
    /// per token the greedy pick (`top_k` false) or the screened top-k (k
    /// written to the screen's `k` before the launch). Every token's result
    /// is what the one-token screen gives for its x: the full head's token,
    /// or its k rows and logit bits.
    pub(super) fn batch_screen_kernels(&self, s: &Scratch, nt: usize, top_k: bool) -> Result<()> {
        let g = &self.gpu;
        let c = &self.config;
        let q = self.lm_head_q8.lock().map_err(|_| berr("lm_head lock poisoned"))?;
        let (vals, scales) = q.as_ref().ok_or_else(|| berr("8-bit lm_head not uploaded"))?;
        let sh = self.lm_head_screen.lock().map_err(|_| berr("lm_head lock poisoned"))?;
        let sh = sh.as_ref().ok_or_else(|| berr("screened lm_head not prepared"))?;
        let b = sh.batch.as_ref().ok_or_else(|| berr("batched screen not prepared"))?;
        if nt == 0 || nt > LMB_T {
            return Err(berr(format!("batched screen: {nt} tokens (1..={LMB_T})")));
        }
        let (blocks, nt32) = (self.head_blocks(), nt as u32);
        let (vocab, hidden) = (Arg::I(c.vocab as i32), Arg::I(c.hidden as i32));
        g.set_tag("screen prep");
        let prep = [
            s.normed.p(),
            hidden,
            b.xq8.p(),
            b.dxs.p(),
            b.fac.p(),
            b.keys.p(),
            b.best.p(),
        ];
        g.launch("lm_head_screen_prep", (nt32, 1, 1), 256, &prep)?;
        g.set_tag("screen pass 1");
        let pass1 = [
            vals.p(),
            scales.p(),
            vocab,
            hidden,
            Arg::I(nt as i32),
            b.xq8.p(),
            b.dxs.p(),
            b.fac.p(),
            sh.err.p(),
            sh.abs.p(),
            b.keys.p(),
            s.logits.p(),
            if top_k { b.wmax.p() } else { Arg::P(0) },
        ];
        // The tensor-core pass 1 runs 16-row tiles on 2 blocks an SM.
        // (The wmax rows hold 8 entries per head block: grids up to that.)
        let (name, p1_blocks, smem) = match b.mma_smem.filter(|_| self.batch_pass1() == BatchPass1::Mma) {
            Some(bytes) => {
                // As many blocks as are resident at once (2 an SM at their
                // shared memory; 16-row tiles shared out over their warps).
                let name = "lm_head_screen_q8_mma_cp";
                let tiles = c.vocab.div_ceil(16).div_ceil(8) as u32;
                let per_sm = self.gpu.occupancy(name, 256, bytes)?.max(1) as u32;
                let grid = tiles.min(per_sm * self.gpu.info.sms.max(1) as u32).min(blocks);
                (name, grid, bytes)
            }
            None => ("lm_head_screen_q8_batch", blocks, nt * b.smem_per_token),
        };
        g.launch_smem(name, (p1_blocks, 1, 1), 256, smem as u32, &pass1, Launch::Plain)?;
        let e = self.lm_head.as_ref().unwrap_or(&self.embed).p();
        let lq = [
            e,
            vocab,
            hidden,
            s.logits.p(),
            sh.err.p(),
            sh.abs.p(),
            b.fac.p(),
            b.keys.p(),
            s.normed.p(),
        ];
        // Passes 2 run a grid per token: a block per SM and token scans
        // several 256-row rounds (one round per block, 4 blocks an SM per
        // token, spent more on each block's copy of x than on its rows).
        let p2 = batch_pass2_blocks(self.gpu.info.sms.max(1) as u32).min(blocks);
        if !top_k {
            let mut a = lq.to_vec();
            a.push(b.best.p());
            g.set_tag("screen pass 2");
            g.launch("lm_head_pick_f16_batch", (p2, nt32, 1), 256, &a)?;
        } else {
            let fg = (blocks as usize).clamp(1, FG_BLOCKS) as u32;
            let floor = [
                e,
                hidden,
                b.wmax.p(),
                Arg::I(p1_blocks as i32 * 8),
                sh.k.p(),
                b.keys.p(),
                s.normed.p(),
                b.floor.p(),
                b.list.p(),
            ];
            g.set_tag("screen top-k floor");
            g.launch("lm_head_topk_floor_batch", (fg, nt32, 1), 256, &floor)?;
            g.set_tag("screen top-k rows");
            let mut a = lq.to_vec();
            a.extend([b.floor.p(), sh.k.p(), b.list.p(), b.cnt.p(), b.out.p()]);
            g.launch("lm_head_topk_f16_batch", (p2, nt32, 1), 256, &a)?;
        }
        g.set_tag("");
        Ok(())
    }

    /// Sets k for the screened top-k of the next step (one-token or batched).
    pub(super) fn set_screen_k(&self, k: usize) -> Result<()> {
        let sh = self.lm_head_screen.lock().map_err(|_| berr("lm_head lock poisoned"))?;
        let sh = sh.as_ref().ok_or_else(|| berr("screened lm_head not prepared"))?;
        sh.k.write_async(&[k as i32])
    }

    /// The greedy picks of the last batched screen's `nt` tokens: (token,
    /// its F16 logit); token 0 with a NaN logit where no logit was finite
    /// (as `argmax_f32` gives 0).
    pub(super) fn batch_screen_greedy(&self, nt: usize) -> Result<Vec<(u32, f32)>> {
        let sh = self.lm_head_screen.lock().map_err(|_| berr("lm_head lock poisoned"))?;
        let b = sh
            .as_ref()
            .and_then(|sh| sh.batch.as_ref())
            .ok_or_else(|| berr("batched screen not prepared"))?;
        let keys = b.best.read::<u64>(nt)?;
        Ok(keys
            .into_iter()
            .map(|k| from_argmax_key(k).unwrap_or((0, f32::NAN)))
            .collect())
    }

    /// The top-k rows of the last batched screen's `nt` tokens, ranked. A
    /// token whose screen fell back (a non-finite value, or more rows at the
    /// floor than the list holds) gets the full head's logits from its row
    /// of `s.normed`, ranked on the host.
    pub(super) fn batch_screen_top_k(&self, s: &Scratch, nt: usize, k: usize) -> Result<Vec<Vec<(u32, f32)>>> {
        let c = &self.config;
        let out = {
            let sh = self.lm_head_screen.lock().map_err(|_| berr("lm_head lock poisoned"))?;
            let b = sh
                .as_ref()
                .and_then(|sh| sh.batch.as_ref())
                .ok_or_else(|| berr("batched screen not prepared"))?;
            b.out.read::<i32>(nt * (1 + 2 * TK_MAX))?
        };
        let mut rows = Vec::with_capacity(nt);
        for (t, o) in out.chunks(1 + 2 * TK_MAX).enumerate() {
            if o[0] == 0 {
                rows.push(
                    (0..k)
                        .filter(|&j| o[1 + j] >= 0)
                        .map(|j| (o[1 + j] as u32, f32::from_bits(o[1 + TK_MAX + j] as u32)))
                        .collect(),
                );
                continue;
            }
            self.topk_fallbacks.fetch_add(1, Ordering::Relaxed);
            let e = self.lm_head.as_ref().unwrap_or(&self.embed);
            let args = [
                e.p(),
                Arg::I(c.vocab as i32),
                Arg::I(c.hidden as i32),
                s.normed.at(4 * t * c.hidden),
                Arg::I(1),
                s.logits.at(4 * t * c.vocab),
            ];
            self.gpu
                .launch("lm_head_f16", (c.vocab.div_ceil(8) as u32, 1, 1), 256, &args)?;
            rows.push(crate::logits::ranked(
                &s.logits.read_at::<f32>(t * c.vocab, c.vocab)?,
                k,
            ));
        }
        Ok(rows)
    }

    /// For tests: each token's candidate rows in the last batched screen
    /// and whether it fell back to every row (a non-finite value).
    pub fn batch_screen_last(&self, nt: usize) -> Result<Vec<(u32, bool)>> {
        let sh = self.lm_head_screen.lock().map_err(|_| berr("lm_head lock poisoned"))?;
        let b = sh
            .as_ref()
            .and_then(|sh| sh.batch.as_ref())
            .ok_or_else(|| berr("batched screen not prepared"))?;
        let k = b.keys.read::<u32>(4 * nt.min(LMB_T))?;
        Ok(k.chunks(4).map(|k| (k[2], k[1] != 0)).collect())
    }

    /// Whether greedy picks go through the screened head.
    pub fn lm_head_screened(&self) -> bool {
        self.lm_head_screen_on.load(Ordering::Relaxed)
    }

    /// For tests and benchmarks: the candidate rows of the last screened
    /// pick, and whether it fell back to every row (a non-finite value);
    /// None before any.
    pub fn screen_last_pick(&self) -> Result<Option<(u32, bool)>> {
        let sh = self.lm_head_screen.lock().map_err(|_| berr("lm_head lock poisoned"))?;
        let Some(sh) = sh.as_ref() else { return Ok(None) };
        let k = sh.keys.read::<u32>(3)?;
        Ok((k[0] != 0 || k[1] != 0).then_some((k[2], k[1] != 0)))
    }

    /// For tests: greedy steps `forward_greedy` took from the queue (run
    /// ahead, fed on the device by the pick before them).
    pub fn greedy_steps_taken_ahead(&self) -> usize {
        self.ahead_taken.load(Ordering::Relaxed)
    }

    /// For tests: screened top-k steps that fell back to the full head.
    pub fn screen_top_k_fallbacks(&self) -> usize {
        self.topk_fallbacks.load(Ordering::Relaxed)
    }

    /// Final RMSNorm + lm_head + greedy pick of the one decoded token.
    pub(super) fn lm_head_step(&self, s: &Scratch, pdl: bool) -> Result<()> {
        let head = self.capturing_head.load(Ordering::Relaxed);
        if head != Head::Logits as u8 {
            return self.screened_pick_step(s, pdl, head == Head::TopK as u8);
        }
        let g = &self.gpu;
        g.set_tag("lm_head+argmax");
        // The 8-bit copy takes (values, scales) where the f16 kernel takes E.
        let (name, args) = if self.lm_head_q8_on.load(Ordering::Relaxed) {
            let q = self.lm_head_q8.lock().map_err(|_| berr("lm_head lock poisoned"))?;
            let (vals, scales) = q.as_ref().ok_or_else(|| berr("8-bit lm_head not uploaded"))?;
            let mut args = vec![vals.p(), scales.p()];
            args.extend(self.head_args(s));
            args.push(s.best.p());
            if let Some(t) = self.head_tma() {
                args.push(Arg::I(t.ring));
                let how = if pdl { Launch::Pdl } else { Launch::Plain };
                g.launch_smem("lm_head_dec_q8_tma", (t.grid, 1, 1), 256, t.smem, &args, how)?;
                g.set_tag("");
                return Ok(());
            }
            ("lm_head_dec_q8", args)
        } else {
            let mut args = vec![self.lm_head.as_ref().unwrap_or(&self.embed).p()];
            args.extend(self.head_args(s));
            args.push(s.best.p());
            ("lm_head_dec", args)
        };
        g.launch_ex(name, (self.head_blocks(), 1, 1), 256, &args, pdl)?;
        g.set_tag("");
        Ok(())
    }

    /// The streamed 8-bit head's launch, planned at first use: None before
    /// sm_90a, with `YINSEN_CUDA_HEAD_TMA=0` (A/B runs), or where its
    /// shared memory does not fit. Its grid stays within `head_blocks`
    /// (the screen's per-warp buffer) and the row octets.
    pub(super) fn head_tma(&self) -> Option<HeadTma> {
        *self.head_tma.get_or_init(|| {
            let g = &self.gpu;
            let c = &self.config;
            if g.arch != "sm_90a" || std::env::var("YINSEN_CUDA_HEAD_TMA").is_ok_and(|v| v == "0") {
                return None;
            }
            let ring = head_tma_ring();
            let smem = crate::backends::cuda::head_tma_smem(c.hidden, ring);
            let names = ["lm_head_screen_q8_tma", "lm_head_dec_q8_tma"];
            let mut per_sm = u32::MAX;
            for name in names {
                if !g.allow_dynamic_smem(name, smem).ok()? {
                    return None;
                }
                per_sm = per_sm.min(g.occupancy(name, 256, smem).ok()?.max(0) as u32);
            }
            let grid = (per_sm * g.info.sms.max(1) as u32)
                .min(c.vocab.div_ceil(8) as u32)
                .min(self.head_blocks());
            (grid > 0).then_some(HeadTma {
                grid,
                smem: smem as u32,
                ring: ring as i32,
            })
        })
    }

    /// Blocks of the decode head kernels: 8 rows in flight per block, a few
    /// blocks per SM (each renormalises x).
    pub(super) fn head_blocks(&self) -> u32 {
        let sms = self.gpu.info.sms.max(1) as usize;
        // `YINSEN_CUDA_HEAD_BPS`: blocks per SM (A/B runs; default 4), read
        // once: the screen's per-warp buffer is sized by this grid.
        static PER_SM: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        let per_sm = *PER_SM.get_or_init(|| env_per_sm("YINSEN_CUDA_HEAD_BPS", 4));
        self.config.vocab.div_ceil(8).min(per_sm * sms) as u32
    }

    /// The decode head kernels' arguments after their weights: vocab,
    /// hidden, x, the final norm, eps, and the logits out.
    pub(super) fn head_args(&self, s: &Scratch) -> [Arg; 6] {
        let c = &self.config;
        [
            Arg::I(c.vocab as i32),
            Arg::I(c.hidden as i32),
            s.x.p(),
            self.final_norm.p(),
            Arg::F(c.rms_eps),
            s.logits.p(),
        ]
    }

    /// The screened top-k of one decode step (`forward_top_k` where the
    /// screen is on): k goes to the device before the replay of the cache's
    /// top-k graph, the ranking comes back in one read. None where the step
    /// fell back (a non-finite value, or more rows at the floor than the
    /// list holds): the full head has then been queued from the step's
    /// final hidden state, and the caller ranks its logits.
    pub(super) fn screened_top_k(
        &self,
        s: &Scratch,
        cache: &mut CudaCache,
        token: u32,
        k: usize,
    ) -> Result<Option<Vec<(u32, f32)>>> {
        let screen = self.lm_head_screen.lock().map_err(|_| berr("lm_head lock poisoned"))?;
        let sh = screen.as_ref().ok_or_else(|| berr("screened lm_head not prepared"))?;
        sh.k.write_async(&[k as i32])?;
        drop(screen); // a first replay captures the graph, which locks it again
        self.decode_launch(s, cache, Some(token), Head::TopK)?;
        cache.len += 1;
        let screen = self.lm_head_screen.lock().map_err(|_| berr("lm_head lock poisoned"))?;
        let sh = screen.as_ref().ok_or_else(|| berr("screened lm_head not prepared"))?;
        let out = sh.out.read::<i32>(1 + 2 * TK_MAX)?;
        if out[0] == 0 {
            return Ok(Some(
                (0..k)
                    .filter(|&j| out[1 + j] >= 0)
                    .map(|j| (out[1 + j] as u32, f32::from_bits(out[1 + TK_MAX + j] as u32)))
                    .collect(),
            ));
        }
        self.topk_fallbacks.fetch_add(1, Ordering::Relaxed);
        let mut args = vec![self.lm_head.as_ref().unwrap_or(&self.embed).p()];
        args.extend(self.head_args(s));
        args.push(s.best.p());
        self.gpu.launch("lm_head_dec", (self.head_blocks(), 1, 1), 256, &args)?;
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::from_argmax_key;

    /// decode.cu's `argmax_key`, written out as the kernels compute it.
    fn argmax_key(v: f32, i: u32) -> u64 {
        let u = v.to_bits();
        let u = if u & 0x8000_0000 != 0 { !u } else { u | 0x8000_0000 };
        (u as u64) << 32 | !i as u64
    }

    /// The batched greedy picks read (row, logit) back from the GPU's keys:
    /// every finite and infinite value and row comes back bit for bit, and
    /// the keys order as the pick does (larger logit, then the lower row).
    #[test]
    fn argmax_keys_give_back_row_and_logit_in_pick_order() {
        let vals = [
            f32::NEG_INFINITY,
            -3.4e38,
            -1.0,
            -1e-40,
            -0.0,
            1e-40,
            0.5,
            1.0,
            7.25,
            3.4e38,
            f32::INFINITY,
        ];
        for (a, &v) in vals.iter().enumerate() {
            for i in [0u32, 1, 77, 128_255] {
                let (r, x) = from_argmax_key(argmax_key(v, i)).expect("a key");
                assert_eq!((r, x.to_bits()), (i, v.to_bits()), "{v} row {i}");
                assert!(argmax_key(v, i) > argmax_key(v, i + 1), "{v}: the lower row wins a tie");
                for &w in &vals[a + 1..] {
                    assert!(argmax_key(w, 128_255) > argmax_key(v, 0), "{w} over {v}");
                }
            }
        }
        assert_eq!(from_argmax_key(0), None, "0: no finite logit was seen");
    }
}
