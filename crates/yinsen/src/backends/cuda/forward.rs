//! [`CudaBackend`]: weights uploaded in the GPU layout, a KV cache per
//! sequence (f32 by default, f16 on request: [`KvDtype`]), and the BitNet / Llama-style block forward as a chain of
//! kernels on one stream. A one-token decode step is captured once per cache
//! as a CUDA graph (kernels read the position from device memory, so the
//! graph stays valid as the sequence grows) and replayed every step. Calls
//! of 2..=16 tokens (batched or speculative steps) replay a graph per token
//! count too, captured on a count's second use.

use std::any::Any;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use cudarc::driver::{result, sys};

mod batch;
mod head;
mod mega_multi;
mod prefill;
mod profile;

pub use head::BatchPass1;
use head::{HeadTma, ScreenHead};
pub use prefill::NQ_GROUPS;
use prefill::{norm_threads, NQ_WARPS_DEFAULT};

use super::layout::{rope_pair_order, GpuLayout};
use super::{launch_matmul, Arg, DevBuf, Epilogue, Gpu, GpuMatrix, Launch, MatKernel, PinnedHost, RopeOut};
use crate::backends::{Backend, KvCache, Output};
use crate::error::{Error, Result};
use crate::model::{Activation, DenseMatrix, DenseType, Model, ModelConfig};

/// Keys per attention split (ATT_CHUNK in ops.cu).
const ATT_CHUNK: usize = 64;
/// Tokens per prefill chunk at most (activation buffers are sized for it).
const MAX_CHUNK: usize = 2048;
/// Calls of this many tokens or more take the big-call GEMM ([`BigGemm`]).
const BIG_GEMM_TOKENS: usize = 128;
/// The big-call GEMM where the device runs it (sm_90a).
const TMA_DEFAULT: &str = "tern_wgmma_tma_s4";
/// Its 128-token tiles, for grids of under 1.5 waves of 256-token ones.
const TMA_NARROW: &str = "tern_wgmma_tma_n128";
/// `BigGemm::Auto` takes the TMA GEMM from this many tokens (where its
/// tiles pay, see `kernel_for`). S14-10 (H100, the reworked epilogue):
/// `yinsen bench -p 128,192,256` through 128-token TMA tiles 32.4k / 43.5k /
/// 55.3k tok/s against 23.9k / 32.3k / 49.9k through mma.sync (from 256
/// before).
const TMA_MIN_TOKENS: usize = 128;

/// The GEMM of calls of >= BIG_GEMM_TOKENS tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BigGemm {
    /// The TMA-fed wgmma kernel where the device has it, else `Shape`.
    Auto,
    /// The tile variant `MmaVariant::for_shape` picks (mma.sync).
    Shape,
    /// This variant (if the device runs it, else `Shape`).
    Variant(super::MmaVariant),
}

impl BigGemm {
    /// "auto", "shape" or a variant name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(Self::Auto),
            "shape" => Some(Self::Shape),
            _ => super::MmaVariant::by_name(s).map(Self::Variant),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Shape => "shape",
            Self::Variant(v) => v.name,
        }
    }

    fn code(self) -> usize {
        match self {
            Self::Auto => 0,
            Self::Shape => 1,
            Self::Variant(v) => 2 + super::MmaVariant::ALL.iter().position(|a| *a == v).unwrap_or(0),
        }
    }

    fn from_code(c: usize) -> Self {
        match c {
            0 => Self::Auto,
            1 => Self::Shape,
            _ => super::MmaVariant::ALL
                .get(c - 2)
                .map_or(Self::Auto, |v| Self::Variant(*v)),
        }
    }
}
/// Tokens per lm_head launch (the kernel's accumulator count).
const LM_T: usize = 8;
/// Rows a warp of `lm_head_f16_rows` takes (LM_R in ops.cu).
const LM_R: usize = 4;

fn berr(msg: impl Into<String>) -> Error {
    Error::backend("cuda", msg)
}

struct GpuLayer {
    attn_norm: DevBuf,
    qkv: GpuMatrix,
    o: GpuMatrix,
    attn_sub: Option<DevBuf>,
    ffn_norm: DevBuf,
    gu: GpuMatrix,
    down: GpuMatrix,
    ffn_sub: Option<DevBuf>,
}

/// Activation buffers, sized for `chunk` tokens.
struct Scratch {
    chunk: usize,
    /// Tokens the split-K attention partials (`part`, `cnt`) have room for.
    part_tokens: usize,
    tok: DevBuf,
    pos: DevBuf,
    /// A batched step's `BatchSeq` table (ops.cu): per token, its cache's
    /// K and V addresses, capacity and position.
    seqs: DevBuf,
    x: DevBuf,
    /// Quantised activations: row-major, or tiled for `ntp` tokens (the TMA
    /// GEMM's order, `super::tile_x`); room for either.
    q8: DevBuf,
    ntp: usize,
    sx: DevBuf,
    xsum: DevBuf,
    qkv: DevBuf,
    attn: DevBuf,
    gu: DevBuf,
    part: DevBuf,
    normed: DevBuf,
    logits: DevBuf,
    argmax: DevBuf,
    /// Rotated q rows [max(chunk, 2)][q_dim].
    qr: DevBuf,
    /// Attention split counters [chunk][n_heads] (zero between launches).
    cnt: DevBuf,
    /// argmax key of the fused decode head (u64, see lm_head_dec).
    best: DevBuf,
    /// Greedy tokens of the decode graph's steps, by position mod HIST.
    hist: DevBuf,
    /// Set (i32 1) where `tok` and `pos` hold the next step's input, as the
    /// host or `decode_advance` leave them; clear, `mega_begin` advances
    /// from the last pick itself.
    fed: DevBuf,
    /// `topk_logits` (ops.cu): per-block candidates, the arrival counter
    /// (zero between launches), the k values and tokens.
    topk_part: DevBuf,
    topk_cnt: DevBuf,
    topk_v: DevBuf,
    topk_i: DevBuf,
    /// Logits on their way to the host, as many rows as `logits` (None
    /// where the driver refused page-locked memory: the pageable read then,
    /// ~3x slower for a batched step's 16 rows).
    logits_host: Option<PinnedHost>,
    /// The greedy pick (`best`) on its way to the host.
    pick_host: PinnedHost,
    /// The greedy step queued ahead by `forward_greedy`, if still valid
    /// (every other use of the scratch drops it: see `lock_scratch`).
    ahead: Option<Ahead>,
    /// Grid-barrier counter of the persistent kernels (zeroed per step; the
    /// one-token kernel's tagged vectors need none, but for MG_TAGGED < 2).
    bar: DevBuf,
    /// The persistent decode's tagged vectors (mega.cu, MG_TAGGED): u64
    /// (value, tag) words of x after down, x after O, the attention output,
    /// h, then q and the new key's k and v ([2 hidden + q_dim + ffn + q_dim +
    /// 2 kv_dim]), and its step count `gen` (u32) that the tags derive from.
    tagged: DevBuf,
    gen: DevBuf,
    /// Captured batched steps (they read only these buffers).
    batch_graphs: batch::BatchGraphs,
    /// K/V of one layer split into hi/lo f16 rows for `flash_tcx_*`
    /// ([n_kv][flash_tcx_scap][4][hd] halves), where that kernel runs.
    kvs: Option<DevBuf>,
}

/// A greedy step `forward_greedy` queued behind the one it returned: fed on
/// the device by that step's pick (`decode_advance`), it writes position
/// `pos` of cache `cache`. The next `forward_greedy` on that cache, at that
/// length, with that token, takes it instead of launching; anything else
/// leaves it unused (its KV row past the cache's length is overwritten later).
#[derive(Clone, Copy, Debug)]
struct Ahead {
    cache: u64,
    pos: usize,
    token: u32,
}

/// Element type of the KV cache. F32 (the default) keeps the forward in
/// f32 like the CPU backend; F16 halves the cache bytes (and the attention
/// reads) but rounds K and V, which can flip int8 activation codes downstream
/// (with one token the attention output is V itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KvDtype {
    F16,
    #[default]
    F32,
}

impl KvDtype {
    /// Bytes per cached element.
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F16 => 2,
            KvDtype::F32 => 4,
        }
    }

    /// `$YINSEN_CUDA_KV` (`f16` or `f32`), else F32.
    pub fn from_env() -> Result<Self> {
        match std::env::var("YINSEN_CUDA_KV") {
            Err(_) => Ok(KvDtype::F32),
            Ok(v) => match v.to_ascii_lowercase().as_str() {
                "f16" => Ok(KvDtype::F16),
                "f32" | "" => Ok(KvDtype::F32),
                _ => Err(Error::input(format!("YINSEN_CUDA_KV={v}: expected f16 or f32"))),
            },
        }
    }

    /// The kernel instantiations for this element type.
    fn rope_kv(self) -> &'static str {
        match self {
            KvDtype::F16 => "rope_kv_f16",
            KvDtype::F32 => "rope_kv_f32",
        }
    }
    fn attn_partial(self) -> &'static str {
        match self {
            KvDtype::F16 => "attn_partial_f16",
            KvDtype::F32 => "attn_partial_f32",
        }
    }
    /// `rope_kv` and `attn_partial` of a batched step (each token its own cache).
    fn batch_kernels(self) -> (&'static str, &'static str) {
        match self {
            KvDtype::F16 => ("rope_kv_batch_f16", "attn_partial_batch_f16"),
            KvDtype::F32 => ("rope_kv_batch_f32", "attn_partial_batch_f32"),
        }
    }
    /// The flash prefill attention for head dims up to 128 or (`wide`) 256.
    fn flash(self, wide: bool) -> &'static str {
        match (self, wide) {
            (KvDtype::F16, false) => "flash_attn_d128_f16",
            (KvDtype::F16, true) => "flash_attn_d256_f16",
            (KvDtype::F32, false) => "flash_attn_d128_f32",
            (KvDtype::F32, true) => "flash_attn_d256_f32",
        }
    }
    /// The tensor-core flash prefill (flash.cu, sm_80+) for head dims up to
    /// 128 or (`wide`) 256, split precision or (`!split`) plain f16.
    pub fn flash_tc(self, wide: bool, split: bool) -> &'static str {
        match (self, wide, split) {
            (KvDtype::F16, false, true) => "flash_tc_d128_f16",
            (KvDtype::F16, true, true) => "flash_tc_d256_f16",
            (KvDtype::F32, false, true) => "flash_tc_d128_f32",
            (KvDtype::F32, true, true) => "flash_tc_d256_f32",
            (KvDtype::F16, false, false) => "flash_tc16_d128_f16",
            (KvDtype::F16, true, false) => "flash_tc16_d256_f16",
            (KvDtype::F32, false, false) => "flash_tc16_d128_f32",
            (KvDtype::F32, true, false) => "flash_tc16_d256_f32",
        }
    }
    fn dec_mm(self, lpr: usize) -> &'static str {
        match (self, lpr) {
            (KvDtype::F16, 8) => "dec_mm_l8_f16",
            (KvDtype::F16, _) => "dec_mm_l16_f16",
            (KvDtype::F32, 8) => "dec_mm_l8_f32",
            (KvDtype::F32, _) => "dec_mm_l16_f32",
        }
    }
}

/// Which attention kernel prefill (more than one token) uses. A mode the
/// device or shape cannot run falls back to split-K (Auto: to F32 first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FlashMode {
    /// The split-K attn_partial kernels (the decode attention).
    Off,
    /// Tc where the device (sm_80+) and head dim (multiple of 16) allow, else
    /// F32; calls of TCX_MIN_NT tokens or more take TcxPv where it runs.
    Auto,
    /// flash.cu's f32 CUDA-core kernel, the narrowest instantiation that holds the head dim.
    F32,
    /// The f32 kernel's hd <= 256 instantiation for any head dim (tests).
    Wide,
    /// flash.cu's tensor-core kernel, split precision (hi + lo f16 parts, ~f32 accuracy).
    Tc,
    /// The tensor-core kernel on plain f16 inputs: ~3x fewer mma than Tc,
    /// f16 rounding of Q, K, V and P (flips int8 codes downstream).
    Tc16,
    /// Tc with K/V copied raw by cp.async and converted in shared memory
    /// (`flash_tcs_d128_f32`: f32 cache, head dim <= 128; else Tc).
    TcStaged,
    /// Split precision with K/V split into hi/lo f16 once per layer
    /// (`kv_split_f32` + `flash_tcx_*`: f32 cache, head dim 64 or 128) for
    /// calls of at least TCX_MIN_NT tokens; else Tc. (Auto's choice up to
    /// session 24.)
    Tcx,
    /// Tcx in plain f16 (`kv_half_f32` + `flash_tcx16_*`): one mma per
    /// product instead of three, Q, K, V and P rounded to f16 (as Tc16; held
    /// to the fixtures' flip-prone limits only); calls under TCX_MIN_NT
    /// tokens take Tc16.
    Tcx16,
    /// Tcx with P V split and Q K in plain f16 (`flash_tcxv_*`): one mma for
    /// Q K instead of three (attention at 2048 tokens -20%); on
    /// the fixtures its logits stay near Tcx's (long prompt, F32 cache, max
    /// / mean |dlogit| 8.3e-3 / 1.7e-3 against 5.3e-3 / 1.2e-3; Tcx16 2.6e-2
    /// / 5.7e-3), since P V's rounding is what moves them. Auto's choice
    /// where it runs; calls under TCX_MIN_NT tokens take Tc.
    TcxPv,
}

impl FlashMode {
    const ALL: [FlashMode; 10] = [
        FlashMode::Off,
        FlashMode::Auto,
        FlashMode::F32,
        FlashMode::Wide,
        FlashMode::Tc,
        FlashMode::Tc16,
        FlashMode::TcStaged,
        FlashMode::Tcx,
        FlashMode::Tcx16,
        FlashMode::TcxPv,
    ];

    /// `$YINSEN_CUDA_FLASH`: `0`/`off`, `1`/`auto` (the default), `f32`, `wide`, `tc`, `tc16`, `tcs`, `tcx`,
    /// `tcx16`, `tcxv`.
    pub fn from_env() -> Result<Self> {
        let Ok(v) = std::env::var("YINSEN_CUDA_FLASH") else {
            return Ok(FlashMode::Auto);
        };
        Ok(match v.to_ascii_lowercase().as_str() {
            "0" | "off" => FlashMode::Off,
            "" | "1" | "auto" => FlashMode::Auto,
            "f32" => FlashMode::F32,
            "wide" => FlashMode::Wide,
            "tc" => FlashMode::Tc,
            "tc16" => FlashMode::Tc16,
            "tcs" => FlashMode::TcStaged,
            "tcx" => FlashMode::Tcx,
            "tcx16" => FlashMode::Tcx16,
            "tcxv" => FlashMode::TcxPv,
            _ => {
                return Err(Error::input(format!(
                    "YINSEN_CUDA_FLASH={v}: expected 0, auto, f32, wide, tc, tc16, tcs, tcx, tcx16 or tcxv"
                )))
            }
        })
    }
}

/// Tokens per query tile and keys per key tile of flash.cu (FA_BQ, FA_BK).
const FA_TILE: usize = 64;

/// Dynamic shared memory of flash.cu for head dim `hd`: Q [64][hd + 4],
/// K/P [64][max(hd + 4, 68)], V [64][hd] floats.
fn flash_smem(hd: usize) -> usize {
    4 * FA_TILE * ((hd + 4) + (hd + 4).max(FA_TILE + 4) + hd)
}

/// Threads per block of flash.cu's tensor-core kernel (TC_THREADS).
pub const FLASH_TC_THREADS: u32 = 128;

/// Dynamic shared memory of the tensor-core kernel: f16 tiles [64][hd + 8]
/// of Q, K and V, plus the lo parts in split mode (Q always, K and V only
/// from an f32 cache: f16 cache values are exact in f16); an f16 cache's K
/// and V tiles are double-buffered (cp.async).
pub fn flash_tc_smem(hd: usize, split: bool, kv: KvDtype) -> usize {
    let kv_tiles = match kv {
        KvDtype::F32 => 2 * (1 + split as usize),
        KvDtype::F16 => 4,
    };
    2 * FA_TILE * (hd + 8) * (1 + split as usize + kv_tiles)
}

/// A prefill attention kernel: name, threads per block, dynamic smem bytes.
type FlashKernel = (&'static str, u32, usize);

/// Calls of at least this many tokens take `flash_tcx_*` (Auto / Tcx): the
/// per-layer K/V split costs a pass over every cached key, which a short
/// batched step after a long context would not earn back. Above the step
/// graphs' sizes, so no captured graph holds the split.
pub const TCX_MIN_NT: usize = 64;
const _: () = assert!(TCX_MIN_NT > STEP_GRAPH_MAX);

/// Precision of a `flash_tcx*` kernel (its index into the backend's tables).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcxPrec {
    /// `flash_tcx16_*`: Q, K, V and P rounded to f16, one mma per product.
    Plain = 0,
    /// `flash_tcx_*`: both products on hi + lo f16 parts (~f32).
    Split = 1,
    /// `flash_tcxv_*`: P V split, Q K plain (the split side buffer, its K lo
    /// plane unread).
    SplitPv = 2,
}

/// One `flash_tcx_*` instantiation (flash.cu): kernel, query heads per
/// block, warps per block, keys per tile (two stages of four f16 planes, or
/// two where `!split`: `flash_tcx16_*`, plain f16), head dim, whether Q K
/// and P V are split (`flash_tcx_*` both, `flash_tcxv_*` P V only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcxKernel {
    pub name: &'static str,
    pub hpb: usize,
    pub warps: usize,
    pub bk: usize,
    pub hd: usize,
    pub split: bool,
    pub qk_split: bool,
    pub pv_split: bool,
    /// `flash_wg_*` (sm_90a warpgroup MMA, `kv_tile_f32`'s tile images).
    pub wg: bool,
}

impl TcxKernel {
    pub fn threads(&self) -> u32 {
        32 * self.warps as u32
    }
    /// Query rows per tile: 16 per warp, over hpb heads.
    pub fn bq(&self) -> usize {
        16 * self.warps / self.hpb
    }
    /// Dynamic shared memory: 2 stages x 4 planes (K hi, K lo, V hi, V lo;
    /// plain f16: K, V) [bk][hd + 8] f16; `flash_wg_*`: its stages of
    /// 3 planes [bk][hd] f16 (one tile image each) and their mbarriers.
    pub fn smem(&self) -> usize {
        if self.wg {
            let stages = if self.hd == 128 { 3 } else { 4 };
            return stages * (3 * self.bk * self.hd * 2 + 16);
        }
        2 * self.planes() * self.bk * (self.hd + 8) * 2
    }
    fn planes(&self) -> usize {
        if self.split {
            4
        } else {
            2
        }
    }
    /// The kernel that fills the f16 side buffer this one reads.
    pub fn kv_kernel(&self) -> &'static str {
        if self.wg {
            "kv_tile_f32"
        } else if self.split {
            "kv_split_f32"
        } else {
            "kv_half_f32"
        }
    }
}

/// The `flash_tcx_*` variants: `h1`, `h2`, `h4` (8 warps, 64-key tiles, 1,
/// 2 or 4 query heads of a KV group per block) and `w4` (4 warps, one head,
/// 32-key tiles), for head dims 64 and 128; `wg` / `wg3`: `flash_wg_*` /
/// `flash_wg3_*` (P V split only; sm_90a: two / three warpgroups, one head,
/// 64-key tiles).
pub const TCX_VARIANTS: [&str; 6] = ["h1", "h2", "h4", "w4", "wg", "wg3"];

/// `flash_tcx_*` (split) or `flash_tcx16_*` variant `v` (TCX_VARIANTS) for
/// head dim `hd`, if instantiated.
pub fn flash_tcx(hd: usize, v: &str, split: bool) -> Option<TcxKernel> {
    flash_tcx_prec(hd, v, if split { TcxPrec::Split } else { TcxPrec::Plain })
}

/// The `flash_tcx*` variant `v` of precision `prec` for head dim `hd`, if instantiated.
pub fn flash_tcx_prec(hd: usize, v: &str, prec: TcxPrec) -> Option<TcxKernel> {
    let split = prec != TcxPrec::Plain;
    let name = match (hd, v, prec) {
        (128 | 64, "wg" | "wg3", TcxPrec::SplitPv) => {
            return Some(TcxKernel {
                name: match (hd, v) {
                    (128, "wg") => "flash_wg_d128",
                    (64, "wg") => "flash_wg_d64",
                    (128, _) => "flash_wg3_d128",
                    _ => "flash_wg3_d64",
                },
                hpb: 1,
                warps: if v == "wg" { 8 } else { 12 },
                bk: 64,
                hd,
                split: true,
                qk_split: false,
                pv_split: true,
                wg: true,
            })
        }
        (_, "wg" | "wg3", _) => return None,
        (128, "h1", TcxPrec::SplitPv) => "flash_tcxv_d128_h1",
        (128, "h2", TcxPrec::SplitPv) => "flash_tcxv_d128_h2",
        (128, "h4", TcxPrec::SplitPv) => "flash_tcxv_d128_h4",
        (128, "w4", TcxPrec::SplitPv) => "flash_tcxv_d128_w4",
        (64, "h1", TcxPrec::SplitPv) => "flash_tcxv_d64_h1",
        (64, "h2", TcxPrec::SplitPv) => "flash_tcxv_d64_h2",
        (64, "h4", TcxPrec::SplitPv) => "flash_tcxv_d64_h4",
        (64, "w4", TcxPrec::SplitPv) => "flash_tcxv_d64_w4",
        _ => return flash_tcx_named(hd, v, split),
    };
    flash_tcx_named(hd, v, split).map(|t| TcxKernel {
        name,
        qk_split: false,
        pv_split: true,
        ..t
    })
}

fn flash_tcx_named(hd: usize, v: &str, split: bool) -> Option<TcxKernel> {
    let name = match (hd, v, split) {
        (128, "h1", true) => "flash_tcx_d128_h1",
        (128, "h2", true) => "flash_tcx_d128_h2",
        (128, "h4", true) => "flash_tcx_d128_h4",
        (128, "w4", true) => "flash_tcx_d128_w4",
        (64, "h1", true) => "flash_tcx_d64_h1",
        (64, "h2", true) => "flash_tcx_d64_h2",
        (64, "h4", true) => "flash_tcx_d64_h4",
        (64, "w4", true) => "flash_tcx_d64_w4",
        (128, "h1", false) => "flash_tcx16_d128_h1",
        (128, "h2", false) => "flash_tcx16_d128_h2",
        (128, "h4", false) => "flash_tcx16_d128_h4",
        (128, "w4", false) => "flash_tcx16_d128_w4",
        (64, "h1", false) => "flash_tcx16_d64_h1",
        (64, "h2", false) => "flash_tcx16_d64_h2",
        (64, "h4", false) => "flash_tcx16_d64_h4",
        (64, "w4", false) => "flash_tcx16_d64_w4",
        _ => return None,
    };
    let (hpb, warps, bk) = match v {
        "h2" => (2, 8, 64),
        "h4" => (4, 8, 64),
        "w4" => (1, 4, 32),
        _ => (1, 8, 64),
    };
    Some(TcxKernel {
        name,
        hpb,
        warps,
        bk,
        hd,
        split,
        qk_split: split,
        pv_split: split,
        wg: false,
    })
}

/// Key rows of the hi/lo side buffer of `kv_split_f32` (whole key tiles).
pub fn flash_tcx_scap(max_ctx: usize) -> usize {
    max_ctx.div_ceil(FA_TILE) * FA_TILE
}

/// The default `flash_tcx_*` variants (`YINSEN_CUDA_TCX` sets one for
/// every call): `w4` for calls of fewer than TCX_SHORT_NT tokens, where its
/// 4-warp blocks (2 per SM) fill the GPU better (S6-F2, 512 tokens: 0.035
/// vs 0.041 ms a layer), `h1` from there (2048: 0.205 vs 0.214 ms).
/// On sm_90a the P V split precision (Auto's) takes the wgmma kernels
/// (`flash_wg_*`): 2048 tokens 0.110 against h1's 0.165 ms a layer, 512
/// tokens 0.024 against 0.034 (S26-1, split included); three warpgroups a
/// block (`wg3`) from TCX_SHORT_NT tokens (S26-6: attention at 2048 tokens
/// 2957-2968 against 3068-3075 us; at 512 its 60 blocks take a key split
/// and lose: 1490 against 846 us).
const TCX_DEFAULT: &str = "h1";
const TCX_SHORT: &str = "w4";
const TCX_WG: &str = "wg3";
const TCX_WG_SHORT: &str = "wg";
const TCX_SHORT_NT: usize = 1024;

/// Whether the persistent decode's `mega_begin` takes the previous step's
/// pick itself (no `decode_advance` launch; `YINSEN_CUDA_BEGIN_ADVANCE=0`:
/// the graph ends with it as the other decode paths do). Read once.
fn begin_advances() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("YINSEN_CUDA_BEGIN_ADVANCE").map_or(true, |v| v != "0"))
}

/// Whether the persistent decode kernel launches with PDL behind
/// `mega_begin` where the graph uses PDL (`YINSEN_CUDA_MEGA_PDL=0`: not).
fn mega_pdl() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("YINSEN_CUDA_MEGA_PDL").map_or(true, |v| v != "0"))
}

pub struct CudaBackend {
    /// Unique per backend (never 0): caches remember which backend captured
    /// their graphs (an address could be reused by a later backend).
    id: usize,
    gpu: Arc<Gpu>,
    kv: KvDtype,
    config: ModelConfig,
    layers: Vec<GpuLayer>,
    embed: DevBuf,
    lm_head: Option<DevBuf>,
    /// Optional 8-bit lm_head for the decode step (the CPU's `--lm-head q8`
    /// bytes, split: int8 values, f16 scales), and whether decode uses it.
    lm_head_q8: Mutex<Option<(DevBuf, DevBuf)>>,
    lm_head_q8_on: std::sync::atomic::AtomicBool,
    /// The screened greedy pick's device data (`set_lm_head_screen`).
    lm_head_screen: Mutex<Option<ScreenHead>>,
    lm_head_screen_on: std::sync::atomic::AtomicBool,
    /// The head of the decode graph being captured (a [`Head`] as u8):
    /// `lm_head_step` queues the full head, the screened greedy pick or
    /// the screened top-k.
    capturing_head: std::sync::atomic::AtomicU8,
    /// Screened top-k steps that fell back to the full head (a non-finite
    /// value, or more rows at the floor than the list holds).
    topk_fallbacks: std::sync::atomic::AtomicUsize,
    /// Greedy steps `forward_greedy` found queued ahead (tests).
    ahead_taken: std::sync::atomic::AtomicUsize,
    /// The streamed 8-bit head passes' launch (`head_tma`), planned once.
    head_tma: std::sync::OnceLock<Option<HeadTma>>,
    final_norm: DevBuf,
    rope: DevBuf,
    max_splits: usize,
    scratch: Mutex<Scratch>,
    weight_bytes: usize,
    /// Use the tensor-core GEMM from this many tokens on (else the GEMV).
    mma_min_tokens: std::sync::atomic::AtomicUsize,
    /// Tenths of a wave of 256-token TMA tiles from which a call takes them
    /// over 128-token ones (`YINSEN_CUDA_TMA_WIDE_WAVES=1.5`, the default;
    /// A/B runs; see `kernel_for`).
    tma_wide_tenths: usize,
    /// GEMM for calls of >= BIG_GEMM_TOKENS tokens: a [`BigGemm`] as
    /// usize (`YINSEN_CUDA_GEMM=shape|<variant name>`; benchmarks' A/B).
    big_gemm: std::sync::atomic::AtomicUsize,
    /// Prefill attention: a FlashMode as u8.
    flash: std::sync::atomic::AtomicU8,
    /// Forced key splits of the tensor-core flash (tests; 0 = automatic).
    key_splits_override: std::sync::atomic::AtomicUsize,
    /// Calls of fewer tokens take `tcx_short` (TCX_SHORT_NT; tests move it).
    tcx_short_nt: std::sync::atomic::AtomicUsize,
    /// Tokens `part` holds with max_splits splits (see Scratch).
    part_tokens: usize,
    /// Whether each f32 flash instantiation (narrow, wide) can run this head dim.
    flash_ok: [bool; 2],
    /// Whether the tensor-core flash kernel (plain f16, split) can run here
    /// (sm_80+, head dim a multiple of 16 up to 256, smem).
    tc_ok: [bool; 2],
    /// Whether flash_tcs_d128_f32 can run (tc split, f32 cache, hd <= 128).
    tcs_ok: bool,
    /// Fewest warps per token of the grouped quantiser (`norm_quant_w*`) for
    /// calls of NQ_GROUP_MIN_TOKENS+ tokens; 0 keeps the block per token
    /// (`YINSEN_CUDA_NQ_W=0|1|2|4|8|16`, A/B runs).
    nq_warps: usize,
    /// The `flash_tcx_*` kernels (f32 cache, hd 64 / 128, sm_80+, smem), if
    /// any, by `TcxPrec`: [plain f16 (`flash_tcx16_*`, Tcx16), split (Auto,
    /// Tcx), P V split (`flash_tcxv_*`, Auto, TcxPv)].
    tcx: [Option<TcxKernel>; 3],
    /// The ones for calls of fewer than TCX_SHORT_NT tokens.
    tcx_short: [Option<TcxKernel>; 3],
    /// The decode step uses the fused one-token kernels (shapes permitting;
    /// `YINSEN_CUDA_FUSED=0` turns them off).
    fused: bool,
    /// Decode graphs use PDL (sm_90+; `YINSEN_CUDA_PDL=0` turns it off).
    pdl: std::sync::atomic::AtomicBool,
    /// Prefill's TMA GEMM RoPEs q|k|v and writes the KV cache in its
    /// epilogue instead of `rope_kv` (`YINSEN_CUDA_FUSED_ROPE=0` turns it off).
    fused_rope: std::sync::atomic::AtomicBool,
    /// The persistent one-launch decode (mega.cu), where the shapes and the
    /// device allow it (`YINSEN_CUDA_MEGA=0` turns it off).
    mega: Option<Mega>,
    mega_on: std::sync::atomic::AtomicBool,
    /// Variant bits of the persistent kernel (MG_* flags in mega.cu), for
    /// A/B measurements: `YINSEN_CUDA_MEGA_FLAGS` or the bench sweep.
    mega_flags: std::sync::atomic::AtomicU32,
    /// The persistent multi-token step (mega_multi.cu) for calls of
    /// 2..=16 tokens, where the persistent decode runs and shared memory
    /// allows (`YINSEN_CUDA_MEGA_MULTI=0` turns it off).
    mega_multi: Option<mega_multi::MegaMulti>,
    mega_multi_on: std::sync::atomic::AtomicBool,
    /// The multi-token kernel runs while the keys of a call (cached + new)
    /// stay at most this many; longer contexts take the per-kernel body,
    /// whose flash attention scales better (`YINSEN_CUDA_MEGA_MULTI_CTX`).
    mega_multi_ctx: std::sync::atomic::AtomicUsize,
    /// The same for batched steps across sequences, as a budget of the
    /// longest sequence's keys times sequences
    /// (`YINSEN_CUDA_MEGA_MULTI_BATCH_KEYS`).
    mega_multi_batch_keys: std::sync::atomic::AtomicUsize,
    /// Heads of 2+ tokens through `lm_head_f16_rows` (tests compare it with
    /// `lm_head_f16`).
    lm_head_rows: std::sync::atomic::AtomicBool,
    /// Which pass 1 a batched step's screened picks run (`BatchPass1` as
    /// u8; `YINSEN_CUDA_BATCH_SCREEN=0|dp4a|mma`, default mma).
    batch_pass1: std::sync::atomic::AtomicU8,
    /// Calls of 2..=16 tokens replay a captured graph per token count
    /// (`YINSEN_CUDA_STEP_GRAPH=0` turns it off).
    step_graphs: std::sync::atomic::AtomicBool,
}

static NEXT_BACKEND_ID: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);

/// What the persistent decode kernel needs beyond the layers: a table of
/// per-layer device addresses and its grid (one block per SM).
struct Mega {
    table: DevBuf,
    grid: u32,
    /// 16-byte chunks of the two weight buffers (QKV and gate/up; O and down).
    w0_chunks: usize,
    w1_chunks: usize,
    /// Bytes of the attention's V staging buffer (0: V read from L2).
    vbytes: usize,
}

impl Mega {
    fn smem(&self) -> usize {
        (self.w0_chunks + self.w1_chunks) * 16 + MG_XBYTES + self.vbytes
    }
}

/// 16-byte chunks of the persistent kernels' two weight buffers on `grid`
/// blocks: buffer 0 holds a block's QKV then gate/up rows, buffer 1 its O
/// then down rows (mega.cu, mega_multi.cu).
fn mega_weight_chunks(c: &ModelConfig, grid: usize) -> (usize, usize) {
    let rows = |n: usize, even: bool| {
        let r = n.div_ceil(grid);
        r + (even && r % 2 == 1) as usize
    };
    let (ch, cq, cf) = (c.hidden.div_ceil(64), c.q_dim().div_ceil(64), c.ffn.div_ceil(64));
    let w0 = (rows(c.q_dim() + 2 * c.kv_dim(), true) * ch).max(2 * rows(c.ffn, false) * ch);
    let w1 = (rows(c.hidden, false) * cq).max(rows(c.hidden, false) * cf);
    (w0, w1)
}

/// Default variant bits of the persistent kernel (see mega.cu): no L2 bulk
/// prefetch, release-reduction arrive, no fence after the acquire spin
/// (run 22: 718 / 572 tok/s vs 689 / 546 with 0, H200); weight copies with
/// an L2 evict-first policy (S9-14, H100, alternated x3 in one call: 798-799
/// / 696-697 vs 797-798 / 691-692 tok/s at ctx 0 / 2048); blocks without an
/// attention item holding their gate/up copy back 2000 cycles (S11-2, S11-3:
/// 865-888 vs 842-867 tok/s at ctx 0 in two calls); attention items of
/// fewer query heads where the grid has room (MG_HEAD_SPLIT, session 18);
/// a 64 ns back-off between polls of a tagged input (512, MG_TAG_SLEEP_SHIFT:
/// S31-2, 1239 / 989 tok/s against 1226 / 980 with none).
pub const MEGA_DEFAULT_FLAGS: u32 = 727;

/// `topk_logits` limits (TK_* in ops.cu): k, blocks, logits per block.
const TK_MAX: usize = 64;
const TK_BLOCKS: usize = 64;
const TK_PER: usize = 2048;

/// What a decode graph ends with, after the layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Head {
    /// The full head's logits (and their argmax).
    Logits,
    /// The screened greedy pick (`screened_pick_step`): the token only.
    Greedy,
    /// The screened top-k: the k best rows and logits only.
    TopK,
}

/// Steps of a greedy generation queued before their tokens are read.
const HIST: usize = 1024;

/// How `time_decode_loop` drives the decode graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DecodeLoop {
    /// Graph replays queued back to back, each step fed by the previous one
    /// on the device (the decode rows of `yinsen bench`; GPU time).
    Replays,
    /// Per step the host writes the token and position, replays and reads
    /// the token back, as `forward` does per token (host wall time).
    HostFed,
    /// `generate_greedy` (host wall time).
    Generate,
}

/// Limits of mega.cu (MG_* there).
const MG_THREADS: usize = 512;
/// Threads of the persistent decode's blocks: MG_THREADS unless
/// `YINSEN_NVRTC_DEFINES=MG_THREADS=N` builds the kernel for N (A/B runs;
/// the launch follows the same setting, so the two cannot disagree).
fn mega_threads() -> u32 {
    crate::backends::cuda::nvrtc::define_value("MG_THREADS")
        .and_then(|v| v.parse().ok())
        .unwrap_or(MG_THREADS as u32)
}
const MG_MAXROWS: usize = 512;
const MG_GMAX: usize = 8;
const MG_QMAX: usize = 1024;
/// Trace marks per layer (MG_TRACE).
const MG_TRACE: usize = 30;
/// Bytes of the padded int8 activation buffer (MG_XBYTES).
const MG_XBYTES: usize = 8192 / 64 * 80;

/// Largest width the fused decode kernels take (DM_NMAX in decode.cu).
const DM_NMAX: usize = 8192;
/// Threads of the fused decode kernels (DM_THREADS).
const DM_THREADS: usize = 256;

/// A captured decode step.
struct Graph {
    exec: sys::CUgraphExec,
    graph: sys::CUgraph,
}

impl CudaCache {
    /// Layer `li`'s K and V rows ([kv head][cap][head dim] each).
    fn layer_kv(&self, li: usize) -> (Arg, Arg) {
        (self.k.at(li * self.layer_bytes), self.v.at(li * self.layer_bytes))
    }

    /// The captured decode graph that ends with `head`.
    fn graph_of(&mut self, head: Head) -> &mut Option<Graph> {
        match head {
            Head::Logits => &mut self.graph,
            Head::Greedy => &mut self.pick_graph,
            Head::TopK => &mut self.topk_graph,
        }
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        unsafe {
            let _ = result::graph::exec_destroy(self.exec);
            let _ = result::graph::destroy(self.graph);
        }
    }
}

/// KV cache `[layer][kv_head][capacity][head_dim]` for K and for V, of the
/// making backend's [`KvDtype`].
pub struct CudaCache {
    k: DevBuf,
    v: DevBuf,
    cap: usize,
    len: usize,
    kv: KvDtype,
    /// Bytes of one layer's K (or V).
    layer_bytes: usize,
    graph: Option<Graph>,
    /// The decode graph whose head is the screened greedy pick (no logits).
    pick_graph: Option<Graph>,
    /// The decode graph whose head is the screened top-k (no logits).
    topk_graph: Option<Graph>,
    /// Captured multi-token steps (1 < nt <= STEP_GRAPH_MAX), least recently
    /// used first, at most STEP_GRAPHS.
    steps: Vec<(StepKey, Graph)>,
    /// Step keys requested once and run un-graphed (least recently used
    /// first, at most STEP_GRAPHS): a key is captured on its second use, so
    /// one-off calls (a short prompt, `yinsen tune`'s fresh caches) do not
    /// pay for a capture.
    seen: Vec<StepKey>,
    /// Identity (`CudaBackend::id`) of the backend that captured the graphs.
    owner: usize,
    /// Unique among the process's caches (a greedy step queued ahead names
    /// its cache by this; an address could be reused).
    uid: u64,
}

/// Bytes of one `BatchSeq` (ops.cu): K and V addresses, capacity, position.
const BATCH_SEQ_BYTES: usize = 24;

/// Largest token count a multi-token step is captured for (the GEMV's group).
const STEP_GRAPH_MAX: usize = 16;
/// Multi-token graphs kept per cache (speculative or batched callers vary nt).
const STEP_GRAPHS: usize = 8;

/// Everything a captured multi-token step depends on besides the cache and
/// the scratch buffers (position and token ids are read from device memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct StepKey {
    nt: usize,
    /// Attention splits launched (split-K only; 0 with flash, whose grid does
    /// not depend on the position).
    splits: usize,
    flash: Option<&'static str>,
    /// The settings that pick the matrix kernels: GEMM from this many
    /// tokens, the big-call GEMM (a BigGemm code).
    mat: (usize, usize),
    /// Logits of every token instead of the last.
    all: bool,
    /// Forced key splits (tests) and the persistent kernels' flag bits, which
    /// the captured launches bake in.
    knobs: (usize, u32),
}

// SAFETY: the graph handles are only used with the owning backend's lock held.
unsafe impl Send for CudaCache {}

impl KvCache for CudaCache {
    fn len(&self) -> usize {
        self.len
    }
    fn capacity(&self) -> usize {
        self.cap
    }
    fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
    }
    fn resident_bytes(&self) -> usize {
        self.k.bytes + self.v.bytes
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// A dense matrix as f16 bytes (converted on the host when stored otherwise).
fn dense_to_f16(m: &DenseMatrix) -> Vec<u8> {
    if m.dtype == DenseType::F16 {
        return m.data.as_slice().to_vec();
    }
    let mut out = Vec::with_capacity(m.rows * m.cols * 2);
    let mut row = vec![0f32; m.cols];
    for r in 0..m.rows {
        m.row_to_f32(r, &mut row);
        out.extend(row.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()));
    }
    out
}

fn checked(parts: &[usize], what: &str) -> Result<usize> {
    parts
        .iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b))
        .filter(|&b| b <= (1usize << 40))
        .ok_or_else(|| berr(format!("{what} size overflows")))
}

impl CudaBackend {
    /// The backend with an f32 KV cache, or f16 when `YINSEN_CUDA_KV=f16`.
    pub fn new(model: &Model, device: usize) -> Result<Self> {
        Self::with_kv_dtype(model, device, KvDtype::from_env()?)
    }

    pub fn with_kv_dtype(model: &Model, device: usize, kv: KvDtype) -> Result<Self> {
        model.validate()?;
        let c = model.config.clone();
        Self::check_shapes(&c)?;
        let gpu = Gpu::new(device)?;
        let up = |v: &[f32]| gpu.upload(v);
        let mut layers = Vec::with_capacity(c.n_layers);
        for l in &model.layers {
            layers.push(GpuLayer {
                attn_norm: up(&l.attn_norm)?,
                // RoPE pairs side by side, so the decode GEMV can rotate in its epilogue.
                qkv: GpuMatrix::from_layout(
                    &gpu,
                    &GpuLayout::stack(&[&l.wq, &l.wk, &l.wv])?.permute_rows(&rope_pair_order(
                        c.n_heads,
                        c.n_kv_heads,
                        c.head_dim,
                    ))?,
                )?,
                o: GpuMatrix::upload(&gpu, &[&l.wo])?,
                attn_sub: l.attn_sub_norm.as_deref().map(up).transpose()?,
                ffn_norm: up(&l.ffn_norm)?,
                gu: GpuMatrix::upload_gate_up(&gpu, &l.w_gate, &l.w_up)?,
                down: GpuMatrix::upload(&gpu, &[&l.w_down])?,
                ffn_sub: l.ffn_sub_norm.as_deref().map(up).transpose()?,
            });
        }
        let embed = gpu.upload(&dense_to_f16(&model.embed))?;
        let lm_head = model
            .output
            .as_ref()
            .map(|o| gpu.upload(&dense_to_f16(o)))
            .transpose()?;
        let final_norm = up(&model.final_norm)?;
        let rope = gpu.upload(&rope_table(&c))?;
        let max_splits = c.max_ctx.div_ceil(ATT_CHUNK);
        // Keep the split-K partials under ~256 MiB: they bound the chunk only
        // when prefill attention is split-K (no flash kernel).
        let per_tok = checked(&[c.n_heads, max_splits, c.head_dim + 2, 4], "attention partials")?;
        let part_tokens = (256usize << 20).checked_div(per_tok).unwrap_or(1).clamp(1, MAX_CHUNK);
        let chunk = MAX_CHUNK.min(c.max_ctx.max(1));
        let scratch = Scratch::new(&gpu, &c, chunk, part_tokens, max_splits, &layers)?;
        let norms: usize = model
            .layers
            .iter()
            .map(|l| {
                4 * (l.attn_norm.len()
                    + l.ffn_norm.len()
                    + l.attn_sub_norm.as_ref().map_or(0, Vec::len)
                    + l.ffn_sub_norm.as_ref().map_or(0, Vec::len))
            })
            .sum();
        let weight_bytes = layers
            .iter()
            .map(|l| l.qkv.resident_bytes() + l.o.resident_bytes() + l.gu.resident_bytes() + l.down.resident_bytes())
            .sum::<usize>()
            + norms
            + embed.bytes
            + lm_head.as_ref().map_or(0, |b| b.bytes)
            + final_norm.bytes;
        let fused = [c.hidden, c.q_dim(), c.ffn].iter().all(|&n| n <= DM_NMAX)
            && std::env::var("YINSEN_CUDA_FUSED").map_or(true, |v| v != "0")
            && layers.iter().all(|l| {
                [&l.qkv, &l.o, &l.gu, &l.down]
                    .iter()
                    .all(|m| m.kpad() <= DM_NMAX && m.chunks <= 128)
            });
        let pdl = std::env::var("YINSEN_CUDA_PDL").map_or(true, |v| v != "0");
        let mut flash_ok = [false; 2];
        for (i, wide) in [false, true].into_iter().enumerate() {
            let fits = c.n_kv_heads > 0
                && c.n_heads.is_multiple_of(c.n_kv_heads)
                && c.head_dim <= if wide { 256 } else { 128 };
            flash_ok[i] = fits
                && [KvDtype::F16, KvDtype::F32].iter().try_fold(true, |ok, k| {
                    Ok::<_, Error>(ok && gpu.allow_dynamic_smem(k.flash(wide), flash_smem(c.head_dim))?)
                })?;
        }
        let mut tc_ok = [false; 2];
        for (i, split) in [false, true].into_iter().enumerate() {
            let fits = gpu.info.sm.0 >= 8
            // mg_quant reads float4s.
            && [c.hidden, c.q_dim(), c.ffn].iter().all(|d| d % 4 == 0)
                && c.n_kv_heads > 0
                && c.n_heads.is_multiple_of(c.n_kv_heads)
                && c.head_dim.is_multiple_of(16)
                && c.head_dim <= 256;
            tc_ok[i] = fits
                && gpu.allow_dynamic_smem(
                    kv.flash_tc(c.head_dim > 128, split),
                    flash_tc_smem(c.head_dim, split, kv),
                )?;
        }
        let tcs_smem = flash_tc_smem(c.head_dim, true, KvDtype::F32);
        let tcs_ok = tc_ok[1]
            && kv == KvDtype::F32
            && c.head_dim <= 128
            && gpu.allow_dynamic_smem("flash_tcs_d128_f32", tcs_smem)?;
        let flash_mode = FlashMode::from_env()?;
        let tma_wide_tenths = match std::env::var("YINSEN_CUDA_TMA_WIDE_WAVES") {
            Err(_) => 15,
            Ok(v) => match v.parse::<f64>() {
                Ok(w) if w.is_finite() && (0.0..=1e5).contains(&w) => (w * 10.0).round() as usize,
                _ => {
                    return Err(Error::input(format!(
                        "YINSEN_CUDA_TMA_WIDE_WAVES={v}: expected a number of waves from 0 (e.g. 1.5)"
                    )))
                }
            },
        };
        let nq_warps = match std::env::var("YINSEN_CUDA_NQ_W") {
            Err(_) => NQ_WARPS_DEFAULT,
            Ok(v) => match v.parse::<usize>() {
                Ok(w @ (0 | 1 | 2 | 4 | 8 | 16)) => w,
                _ => {
                    return Err(Error::input(format!(
                        "YINSEN_CUDA_NQ_W={v}: expected 0, 1, 2, 4, 8 or 16"
                    )))
                }
            },
        };
        // `YINSEN_CUDA_TCX=h1|h2|h4|w4` (A/B runs) for every call, else the
        // defaults above.
        let tcx_env = std::env::var("YINSEN_CUDA_TCX").ok();
        if let Some(v) = tcx_env.as_deref().filter(|v| !TCX_VARIANTS.contains(v)) {
            return Err(Error::input(format!(
                "YINSEN_CUDA_TCX={v}: expected one of {TCX_VARIANTS:?}"
            )));
        }
        let tcx_kernel = |v: &str, prec: TcxPrec| -> Result<Option<TcxKernel>> {
            Ok(match (kv, c.head_dim) {
                (KvDtype::F32, 64 | 128)
                    if gpu.info.sm.0 >= 8 && c.n_kv_heads > 0 && c.n_heads.is_multiple_of(c.n_kv_heads) =>
                {
                    // A variant whose heads per block do not divide the
                    // group falls back to h1.
                    let group = c.n_heads / c.n_kv_heads;
                    let t = flash_tcx_prec(c.head_dim, v, prec)
                        .filter(|t| group.is_multiple_of(t.hpb) && (!t.wg || gpu.arch == "sm_90a"))
                        .or_else(|| flash_tcx_prec(c.head_dim, "h1", prec));
                    match t {
                        Some(t) if gpu.allow_dynamic_smem(t.name, t.smem())? => Some(t),
                        _ => None,
                    }
                }
                _ => None,
            })
        };
        let wg = gpu.arch == "sm_90a";
        let both = |default: &str, wg_default: &str| -> Result<[Option<TcxKernel>; 3]> {
            let v = |prec: TcxPrec| match tcx_env.as_deref() {
                Some(v) => v,
                None if wg && prec == TcxPrec::SplitPv => wg_default,
                None => default,
            };
            Ok([
                tcx_kernel(v(TcxPrec::Plain), TcxPrec::Plain)?,
                tcx_kernel(v(TcxPrec::Split), TcxPrec::Split)?,
                tcx_kernel(v(TcxPrec::SplitPv), TcxPrec::SplitPv)?,
            ])
        };
        let tcx = both(TCX_DEFAULT, TCX_WG)?;
        let tcx_short = both(TCX_SHORT, TCX_WG_SHORT)?;
        // The hi/lo side buffer holds every key of the context (21 MB at
        // 2b4t); past 256 MiB (very long contexts) the old kernel stays.
        let kvs_bytes = checked(
            &[c.n_kv_heads, flash_tcx_scap(c.max_ctx), 4, c.head_dim, 2],
            "K/V split",
        )?;
        let fits = kvs_bytes <= 256 << 20;
        let tcx = tcx.map(|t| t.filter(|_| fits));
        let tcx_short = [0, 1, 2].map(|i| tcx_short[i].filter(|_| tcx[i].is_some()));
        let mut scratch = scratch;
        if tcx.iter().any(Option::is_some) {
            scratch.kvs = Some(gpu.alloc(kvs_bytes)?);
        }
        let mega = match fused && std::env::var("YINSEN_CUDA_MEGA").map_or(true, |v| v != "0") {
            true => Self::prepare_mega(&gpu, &c, &layers)?,
            false => None,
        };
        let mega_multi = match (
            &mega,
            std::env::var("YINSEN_CUDA_MEGA_MULTI").map_or(true, |v| v != "0"),
        ) {
            (Some(m), true) => mega_multi::MegaMulti::prepare(&gpu, &c, m, part_tokens, max_splits, kv.bytes())?,
            _ => None,
        };
        let mega_multi_ctx = match std::env::var("YINSEN_CUDA_MEGA_MULTI_CTX") {
            Ok(v) => v
                .parse::<usize>()
                .map_err(|_| Error::input(format!("YINSEN_CUDA_MEGA_MULTI_CTX={v}: expected an integer")))?,
            Err(_) => mega_multi::DEFAULT_MAX_CTX,
        };
        let mega_multi_batch_keys = match std::env::var("YINSEN_CUDA_MEGA_MULTI_BATCH_KEYS") {
            Ok(v) => v
                .parse::<usize>()
                .map_err(|_| Error::input(format!("YINSEN_CUDA_MEGA_MULTI_BATCH_KEYS={v}: expected an integer")))?,
            Err(_) => mega_multi::DEFAULT_BATCH_KEY_BUDGET,
        };
        let mega_flags = match std::env::var("YINSEN_CUDA_MEGA_FLAGS") {
            Ok(v) => v
                .parse::<u32>()
                .map_err(|_| Error::input(format!("YINSEN_CUDA_MEGA_FLAGS={v}: expected an integer")))?,
            Err(_) => MEGA_DEFAULT_FLAGS,
        };
        let step_graphs = std::env::var("YINSEN_CUDA_STEP_GRAPH").map_or(true, |v| v != "0");
        let fused_rope = std::env::var("YINSEN_CUDA_FUSED_ROPE").map_or(true, |v| v != "0");
        let be = Self {
            id: NEXT_BACKEND_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            step_graphs: step_graphs.into(),
            mega_flags: mega_flags.into(),
            mega_on: mega.is_some().into(),
            mega,
            mega_multi_on: mega_multi.is_some().into(),
            mega_multi,
            mega_multi_ctx: mega_multi_ctx.into(),
            mega_multi_batch_keys: mega_multi_batch_keys.into(),
            lm_head_rows: true.into(),
            batch_pass1: (head::BatchPass1::from_env() as u8).into(),
            gpu,
            kv,
            fused,
            pdl: pdl.into(),
            fused_rope: fused_rope.into(),
            config: c,
            layers,
            embed,
            lm_head,
            lm_head_q8: Mutex::new(None),
            lm_head_q8_on: false.into(),
            lm_head_screen: Mutex::new(None),
            lm_head_screen_on: false.into(),
            capturing_head: (Head::Logits as u8).into(),
            topk_fallbacks: 0.into(),
            head_tma: std::sync::OnceLock::new(),
            ahead_taken: 0.into(),
            final_norm,
            rope,
            max_splits,
            scratch: Mutex::new(scratch),
            weight_bytes,
            // The tensor-core GEMM from 2 tokens: at 16 tokens its 64x16 tile
            // runs a matrix in 12-25 us, the dp4a GEMV in ~80 (H200 sweep).
            mma_min_tokens: 2.into(),
            tma_wide_tenths,
            big_gemm: std::env::var("YINSEN_CUDA_GEMM")
                .ok()
                .and_then(|n| BigGemm::parse(&n))
                .unwrap_or(BigGemm::Auto)
                .code()
                .into(),
            flash: (flash_mode as u8).into(),
            key_splits_override: 0.into(),
            tcx_short_nt: TCX_SHORT_NT.into(),
            tcs_ok,
            tcx,
            tcx_short,
            nq_warps,
            part_tokens,
            flash_ok,
            tc_ok,
        };
        match std::env::var("YINSEN_CUDA_LM_HEAD") {
            Ok(v) if v.eq_ignore_ascii_case("q8") => {
                be.set_lm_head_q8(Some(model.lm_head()))?;
            }
            // A head the screen cannot cover (non-finite weights, an odd
            // width) keeps the full head's pick.
            Ok(v) if v.eq_ignore_ascii_case("screen") => {
                if let Err(e) = be.set_lm_head_screen(Some(model.lm_head())) {
                    eprintln!("note: CUDA screened lm_head off: {e}");
                }
            }
            _ => {}
        }
        Ok(be)
    }

    /// The persistent decode's layer table, or None where mega.cu's limits
    /// (or the device) rule it out; the per-kernel decode then runs.
    fn prepare_mega(gpu: &Arc<Gpu>, c: &ModelConfig, layers: &[GpuLayer]) -> Result<Option<Mega>> {
        let grid = gpu.info.sms.max(1) as usize;
        let group = c.n_heads / c.n_kv_heads.max(1);
        let rows = |n: usize, even: bool| {
            let r = n.div_ceil(grid);
            r + (even && r % 2 == 1) as usize
        };
        let (w0_chunks, w1_chunks) = mega_weight_chunks(c, grid);
        let fits = gpu.info.sm.0 >= 8
            && c.n_kv_heads > 0
            && c.n_heads.is_multiple_of(c.n_kv_heads)
            && group <= MG_GMAX
            && group * c.head_dim <= MG_QMAX
            && rows(c.q_dim() + 2 * c.kv_dim(), true) <= MG_MAXROWS
            && rows(c.hidden, false) <= MG_MAXROWS
            && 2 * rows(c.ffn, false) <= MG_MAXROWS
            // The attention merge keeps (group x chunks) pairs in shared memory.
            && group * (grid / c.n_kv_heads).max(c.max_ctx.div_ceil(256)).max(1) <= 512;
        if !fits {
            return Ok(None);
        }
        // The largest K/V staging buffer (64 KB: an item's f32 V rows of up to
        // 128 keys of 128 dims, or its K and V rows of up to 64) that still
        // lets one block run per SM; 0 reads V from L2. (96 KB, K and V of
        // the 79-key items at ctx 2048, made that context slower: S11-6.)
        let smem = |vbytes: usize| (w0_chunks + w1_chunks) * 16 + MG_XBYTES + vbytes;
        // YINSEN_CUDA_MEGA_VBYTES=KB tries that size first (measurements: a
        // smaller buffer leaves more of the SM's 256 KB to the L1).
        let first = std::env::var("YINSEN_CUDA_MEGA_VBYTES")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .map(|kb| kb << 10);
        let mut chosen = None;
        for vbytes in first.into_iter().chain([64 << 10, 32 << 10, 0]) {
            let mut ok = true;
            for name in ["mega_f32", "mega_f16"] {
                ok = ok
                    && gpu.allow_dynamic_smem(name, smem(vbytes))?
                    && gpu.occupancy(name, mega_threads(), smem(vbytes))? >= 1;
            }
            if ok {
                chosen = Some(vbytes);
                break;
            }
        }
        let Some(vbytes) = chosen else {
            return Ok(None);
        };
        let mut t: Vec<u64> = Vec::with_capacity(layers.len() * 12);
        for l in layers {
            let opt = |b: &Option<DevBuf>| b.as_ref().map_or(0, |b| b.ptr);
            t.extend([
                l.qkv.w.ptr,
                l.qkv.scale.ptr,
                l.o.w.ptr,
                l.o.scale.ptr,
                l.gu.w.ptr,
                l.gu.scale.ptr,
                l.down.w.ptr,
                l.down.scale.ptr,
                l.attn_norm.ptr,
                opt(&l.attn_sub),
                l.ffn_norm.ptr,
                opt(&l.ffn_sub),
            ]);
        }
        Ok(Some(Mega {
            table: gpu.upload(&t)?,
            grid: grid as u32,
            w0_chunks,
            w1_chunks,
            vbytes,
        }))
    }

    /// For benchmarks: the persistent kernel's variant bits for graphs
    /// captured afterwards; returns the previous bits.
    pub fn set_mega_flags(&self, flags: u32) -> u32 {
        self.mega_flags.swap(flags, std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether decode steps use the persistent kernel.
    pub fn uses_mega(&self) -> bool {
        self.mega.is_some() && self.mega_on.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// For benchmarks and tests: turn the persistent decode on or off (for
    /// graphs captured afterwards); returns the previous setting.
    pub fn set_mega(&self, on: bool) -> bool {
        self.mega_on
            .swap(on && self.mega.is_some(), std::sync::atomic::Ordering::Relaxed)
    }

    fn check_shapes(c: &ModelConfig) -> Result<()> {
        let uns = |m: String| Err(Error::Unsupported(format!("CUDA backend: {m}")));
        if !c.head_dim.is_multiple_of(8) || c.head_dim > 256 {
            return uns(format!("head dim {} (needs a multiple of 8, at most 256)", c.head_dim));
        }
        if !c.hidden.is_multiple_of(8) {
            return uns(format!("hidden size {} (needs a multiple of 8)", c.hidden));
        }
        if c.hidden.max(c.ffn).max(c.q_dim()) > (1 << 17) {
            return uns("widths above 131072".into());
        }
        if c.max_ctx > (1 << 18) {
            return uns(format!("context length {} (at most 262144)", c.max_ctx));
        }
        Ok(())
    }

    /// Token count from which the tensor-core GEMM runs (default 2);
    /// returns the previous setting.
    pub fn set_mma_min_tokens(&self, n: usize) -> usize {
        self.mma_min_tokens.swap(n.max(1), std::sync::atomic::Ordering::Relaxed)
    }

    /// For benchmarks and tests: the prefill attention kernel (default Auto,
    /// else `YINSEN_CUDA_FLASH`); returns the previous setting. A mode the
    /// device or shape cannot run falls back to split-K.
    pub fn set_flash(&self, mode: FlashMode) -> FlashMode {
        let old = self.flash.swap(mode as u8, std::sync::atomic::Ordering::Relaxed);
        FlashMode::ALL[old as usize]
    }

    /// The flash kernel prefill attention runs now, if any.
    fn flash_kernel(&self) -> Option<FlashKernel> {
        let hd = self.config.head_dim;
        let f32k = |wide: bool| self.flash_ok[wide as usize].then(|| (self.kv.flash(wide), 256, flash_smem(hd)));
        let narrow = || f32k(false).or_else(|| f32k(true));
        let tc = |split: bool| {
            self.tc_ok[split as usize].then(|| {
                (
                    self.kv.flash_tc(hd > 128, split),
                    FLASH_TC_THREADS,
                    flash_tc_smem(hd, split, self.kv),
                )
            })
        };
        match FlashMode::ALL[self.flash.load(std::sync::atomic::Ordering::Relaxed) as usize] {
            FlashMode::Off => None,
            FlashMode::Auto => tc(true).or_else(narrow),
            FlashMode::F32 => narrow(),
            FlashMode::Wide => f32k(true),
            FlashMode::Tc => tc(true),
            FlashMode::Tc16 => tc(false),
            FlashMode::Tcx => tc(true),
            FlashMode::Tcx16 => tc(false),
            FlashMode::TcxPv => tc(true),
            FlashMode::TcStaged => match self.tcs_ok {
                true => Some(("flash_tcs_d128_f32", FLASH_TC_THREADS, flash_tc_smem(hd, true, self.kv))),
                false => tc(true),
            },
        }
    }

    /// Key splits of the tensor-core flash kernel for `nt` queries: enough
    /// blocks for two per SM when the query tiles alone are too few (a short
    /// batch after a long context), within `part`'s room. Depends on nt only,
    /// not on the position, so a captured step graph (keyed on nt) stays valid.
    pub fn key_splits(&self, nt: usize) -> usize {
        let forced = self.key_splits_override.load(std::sync::atomic::Ordering::Relaxed);
        let c = &self.config;
        let blocks = nt.div_ceil(FA_TILE) * c.n_heads;
        let target = 2 * self.gpu.info.sms.max(1) as usize;
        let want = if forced > 0 {
            forced
        } else {
            target.div_ceil(blocks.max(1))
        };
        // part holds [part_tokens][n_heads][max_splits][hd + 2] floats; the
        // key split uses [nt][n_heads][n_ks][hd + 2].
        let room = (self.part_tokens * self.max_splits) / nt.max(1);
        want.min(c.max_ctx.div_ceil(FA_TILE)).min(room).max(1)
    }

    /// The `flash_tcx*` kernel a call of `nt` tokens runs (Auto, Tcx and
    /// Tcx16 modes, nt >= TCX_MIN_NT), if any.
    fn tcx_for(&self, nt: usize) -> Option<TcxKernel> {
        let mode = FlashMode::ALL[self.flash.load(std::sync::atomic::Ordering::Relaxed) as usize];
        let split = match mode {
            FlashMode::Tcx => TcxPrec::Split,
            FlashMode::Tcx16 => TcxPrec::Plain,
            FlashMode::Auto | FlashMode::TcxPv => TcxPrec::SplitPv,
            _ => return None,
        } as usize;
        match nt {
            _ if nt >= self.tcx_short_nt.load(std::sync::atomic::Ordering::Relaxed) => self.tcx[split],
            _ if nt >= TCX_MIN_NT => self.tcx_short[split],
            _ => None,
        }
    }

    /// For tests: calls of fewer than `n` tokens take the short-call
    /// `flash_tcx` variant (0: none do); returns the previous setting.
    pub fn set_tcx_short_tokens(&self, n: usize) -> usize {
        self.tcx_short_nt.swap(n, std::sync::atomic::Ordering::Relaxed)
    }

    /// The kernel prefill attention of `nt` tokens runs now (tests, logs).
    pub fn attention_kernel_name(&self, nt: usize) -> Option<&'static str> {
        match self.tcx_for(nt) {
            Some(t) => Some(t.name),
            None => self.flash_kernel_name(),
        }
    }

    /// Key splits of `flash_tcx_*` for `nt` queries: only where its blocks
    /// would leave over half the SMs idle, then enough for about one block
    /// per SM (the split's partials and merge cost more than a partly idle
    /// wave: 512 tokens at 2b4t run faster un-split on an H100), within `part`.
    pub fn tcx_splits(&self, nt: usize, t: TcxKernel) -> usize {
        let forced = self.key_splits_override.load(std::sync::atomic::Ordering::Relaxed);
        let c = &self.config;
        let blocks = (nt.div_ceil(t.bq()) * (c.n_heads / t.hpb)).max(1);
        let slots = self.gpu.info.sms.max(1) as usize * (8 / t.warps).max(1);
        let want = match forced {
            0 if 2 * blocks <= slots => slots / blocks,
            0 => 1,
            n => n,
        };
        let room = (self.part_tokens * self.max_splits) / nt.max(1);
        want.min(c.max_ctx.div_ceil(FA_TILE)).min(room).max(1)
    }

    /// For tests: force `n` key splits of the tensor-core flash kernel (0 =
    /// automatic); returns the previous setting.
    pub fn set_key_splits(&self, n: usize) -> usize {
        self.key_splits_override.swap(n, std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether prefill uses flash.cu now (mode and device permitting).
    pub fn uses_flash(&self) -> bool {
        self.flash_kernel().is_some()
    }

    /// The kernel prefill attention runs now, if flash.cu's (tests, logs).
    pub fn flash_kernel_name(&self) -> Option<&'static str> {
        self.flash_kernel().map(|k| k.0)
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    pub fn kv_dtype(&self) -> KvDtype {
        self.kv
    }

    /// Downcast a cache made by `new_cache`.
    /// The scratch, for any use but `forward_greedy`'s: a greedy step
    /// queued ahead is dropped, since what runs next may overwrite its
    /// buffers (its token, position, pick).
    fn lock_scratch(&self) -> Result<std::sync::MutexGuard<'_, Scratch>> {
        let mut s = self.scratch.lock().map_err(|_| berr("scratch lock poisoned"))?;
        s.ahead = None;
        Ok(s)
    }

    fn cache_of<'a>(&self, cache: &'a mut dyn KvCache) -> Result<&'a mut CudaCache> {
        let c = cache
            .as_any_mut()
            .downcast_mut::<CudaCache>()
            .ok_or_else(|| Error::input("CUDA backend was given a cache made by another backend"))?;
        if c.kv != self.kv {
            return Err(Error::input(format!(
                "CUDA backend with a {:?} KV cache was given a {:?} cache",
                self.kv, c.kv
            )));
        }
        Ok(c)
    }

    /// Tokens per body() call: the activation chunk, or what the split-K
    /// attention partials hold when prefill attention is not flash.
    fn chunk_tokens(&self, s: &Scratch) -> usize {
        if self.flash_kernel().is_some() {
            s.chunk
        } else {
            s.chunk.min(s.part_tokens)
        }
    }

    /// The matrix kernel for `nt` tokens through `m`.
    fn kernel_for(&self, nt: usize, m: &GpuMatrix) -> MatKernel {
        if nt < self.mma_min_tokens.load(std::sync::atomic::Ordering::Relaxed) || !self.gpu.has_mma() {
            return MatKernel::Gemv;
        }
        // The TMA GEMM: 256-token tiles, or 128-token ones where those make
        // under 1.5 waves. S7-15 had the line at 1.5 waves (o at 2048 tokens,
        // 160 tiles on 132 SMs, 62.9 -> 58.5 us with 128-token tiles); with
        // the cheaper epilogue (S14-10's sweep) 256-token tiles won there (o
        // 35.7 vs 38.7 us, down 76.4 vs 87.3; prefill 2048 18.20 vs 18.67
        // ms) and the line moved to one wave; with the tail split (S24-8,
        // inside the forward, 30 calls) 128-token ones win again at 1.2 waves
        // (2048 tokens: o 1480 -> 1325 us, down 2168 -> 2064) and lose at
        // 1.6-1.8 (qkv at 2048 1408 -> 1534, gate_up at 512 1107 -> 1270),
        // so the line is back at 1.5. 128-token ones still at 512 tokens
        // (qkv, o, down: 40-60 tiles). It pays once there are enough tiles or the input is long
        // (S7-5 sweep: o at 512 tokens, 40 tiles of 2560 inputs, was slower
        // than the 64 x 64 mma.sync tile; S14-10: 13.2 vs 27.4 us now).
        let sms = self.gpu.info.sms.max(1) as usize;
        let rows = m.n_rows.div_ceil(super::layout::TILE_ROWS);
        let wide = 10 * rows * nt.div_ceil(super::TILED_TOKENS) >= self.tma_wide_tenths * sms;
        let tiles = rows * nt.div_ceil(if wide { 256 } else { 128 });
        let tma_pays = 2 * tiles >= sms || m.chunks >= 64;
        let v = match BigGemm::from_code(self.big_gemm.load(std::sync::atomic::Ordering::Relaxed)) {
            _ if nt < BIG_GEMM_TOKENS => None,
            BigGemm::Auto if tma_pays && nt >= TMA_MIN_TOKENS => {
                super::MmaVariant::by_name(if wide { TMA_DEFAULT } else { TMA_NARROW })
            }
            BigGemm::Auto => None,
            BigGemm::Shape => None,
            BigGemm::Variant(v) => Some(v),
        };
        match v {
            // A tiled variant needs the matrix's stage tiles (not built with
            // YINSEN_CUDA_GEMM=shape).
            Some(v) if v.available(&self.gpu) && (!v.tiled || m.tiles.is_some()) => MatKernel::MmaWith(v),
            _ => MatKernel::Mma,
        }
    }

    /// Token capacity of the tiled quantised activations when `nt` tokens
    /// through `m` take a tiled GEMM, else 0 (row-major).
    fn x_ntp(&self, s: &Scratch, nt: usize, m: &GpuMatrix) -> usize {
        match self.kernel_for(nt, m) {
            MatKernel::MmaWith(v) if v.tiled => s.ntp,
            _ => 0,
        }
    }

    /// For tests: RoPE and the KV-cache write in the TMA GEMM's epilogue (on)
    /// or by `rope_kv`; returns the previous setting.
    pub fn set_fused_rope(&self, on: bool) -> bool {
        self.fused_rope.swap(on, std::sync::atomic::Ordering::Relaxed)
    }

    /// For benchmarks: the GEMM of calls of >= BIG_GEMM_TOKENS tokens;
    /// returns the previous setting.
    pub fn set_big_gemm(&self, g: BigGemm) -> BigGemm {
        BigGemm::from_code(self.big_gemm.swap(g.code(), std::sync::atomic::Ordering::Relaxed))
    }

    /// `out = W x` (or `+=`), splitting into 16-token GEMV groups when needed.
    #[allow(clippy::too_many_arguments)]
    fn mm(&self, s: &Scratch, m: &GpuMatrix, nt: usize, ep: Epilogue, out: &DevBuf, stride: usize) -> Result<()> {
        let kernel = self.kernel_for(nt, m);
        let group = if kernel == MatKernel::Gemv { 16 } else { nt };
        let x_ntp = self.x_ntp(s, nt, m);
        for t0 in (0..nt).step_by(group) {
            let n = (nt - t0).min(group);
            launch_matmul(
                &self.gpu,
                m,
                kernel,
                s.q8.at(t0 * m.kpad()),
                x_ntp,
                n,
                s.sx.at(4 * t0),
                s.xsum.at(4 * t0),
                ep,
                out.at(4 * t0 * stride),
                stride,
                self.body_launch(),
                None,
            )?;
        }
        Ok(())
    }

    /// The q|k|v matrix for `nt` tokens with RoPE and the KV-cache write in
    /// its epilogue (`rope_kv`'s work), where `nt` takes the TMA GEMM; false
    /// (nothing launched) where it does not.
    fn mm_rope(&self, s: &Scratch, m: &GpuMatrix, nt: usize, rope: &RopeOut) -> Result<bool> {
        let kernel = self.kernel_for(nt, m);
        let tiled = matches!(kernel, MatKernel::MmaWith(v) if v.tiled);
        if !tiled
            || !rope.hd.is_multiple_of(4)
            || !m.n_rows.is_multiple_of(4)
            || !self.fused_rope.load(std::sync::atomic::Ordering::Relaxed)
        {
            return Ok(false);
        }
        launch_matmul(
            &self.gpu,
            m,
            kernel,
            s.q8.p(),
            self.x_ntp(s, nt, m),
            nt,
            s.sx.p(),
            s.xsum.p(),
            Epilogue::StoreRope,
            Arg::P(0),
            0,
            self.body_launch(),
            Some(rope),
        )?;
        Ok(true)
    }

    /// How body() and head() launch: with PDL where the device has it (each
    /// of their kernels starts with pdl_wait), so in a graph a kernel's
    /// launch overlaps its predecessor's tail. `YINSEN_CUDA_PDL=0`: plain.
    fn body_launch(&self) -> Launch {
        if self.pdl.load(std::sync::atomic::Ordering::Relaxed) && self.gpu.has_pdl() {
            Launch::Pdl
        } else {
            Launch::Plain
        }
    }

    /// Fused one-token matrix step: `in` normalised (with `nw`) and
    /// quantised inside the kernel, then mode 1 store / 2 add / 3 RoPE.
    #[allow(clippy::too_many_arguments)]
    fn dec_mm(
        &self,
        s: &Scratch,
        m: &GpuMatrix,
        input: Arg,
        n: usize,
        gate: i32,
        nw: Option<&DevBuf>,
        out: Arg,
        mode: i32,
        kv: (Arg, Arg, usize),
        pdl: bool,
    ) -> Result<()> {
        let c = &self.config;
        let lpr = if m.chunks <= 64 { 8 } else { 16 };
        let rows_per_block = DM_THREADS / 32 * (32 / lpr);
        let name = self.kv.dec_mm(lpr);
        self.gpu.launch_ex(
            name,
            (m.n_rows.div_ceil(rows_per_block) as u32, 1, 1),
            DM_THREADS as u32,
            &[
                m.w.p(),
                Arg::I(m.n_rows as i32),
                Arg::I(m.chunks as i32),
                input,
                Arg::I(n as i32),
                Arg::I(gate),
                nw.map_or(Arg::P(0), DevBuf::p),
                Arg::F(c.rms_eps),
                m.scale.p(),
                out,
                Arg::I(mode),
                s.pos.p(),
                self.rope.p(),
                Arg::I(c.n_heads as i32),
                Arg::I(c.n_kv_heads as i32),
                Arg::I(c.head_dim as i32),
                Arg::I(kv.2 as i32),
                kv.0,
                kv.1,
            ],
            pdl,
        )
    }

    /// The decode step with the fused kernels: embed, per layer 4 matrix
    /// kernels + attention, then norm + lm_head + argmax: 2 + 5 per layer.
    fn decode_fused(&self, s: &Scratch, cache: &CudaCache, n_split: usize, pdl: bool) -> Result<()> {
        let c = &self.config;
        let g = &self.gpu;
        let (h, q, f) = (c.hidden, c.q_dim(), c.ffn);
        let gate = match c.activation {
            Activation::Relu2 => 1,
            Activation::Silu => 2,
        };
        g.set_tag("embed");
        g.launch(
            "embed_f16",
            (1, 1, 1),
            256,
            &[s.tok.p(), self.embed.p(), Arg::I(h as i32), s.x.p(), s.best.p()],
        )?;
        for (li, l) in self.layers.iter().enumerate() {
            let (kc, vc) = cache.layer_kv(li);
            let kv = (kc, vc, cache.cap);
            let none = (Arg::P(0), Arg::P(0), 0);
            g.set_tag("qkv+rope");
            self.dec_mm(s, &l.qkv, s.x.p(), h, 0, Some(&l.attn_norm), s.qr.p(), 3, kv, pdl)?;
            g.set_tag("attention");
            self.attention(s, cache, li, 1, n_split, pdl)?;
            g.set_tag("o");
            self.dec_mm(s, &l.o, s.attn.p(), q, 0, l.attn_sub.as_ref(), s.x.p(), 2, none, pdl)?;
            g.set_tag("gate_up");
            self.dec_mm(s, &l.gu, s.x.p(), h, 0, Some(&l.ffn_norm), s.gu.p(), 1, none, pdl)?;
            g.set_tag("down");
            self.dec_mm(s, &l.down, s.gu.p(), f, gate, l.ffn_sub.as_ref(), s.x.p(), 2, none, pdl)?;
        }
        self.lm_head_step(s, pdl)
    }

    /// The decode step as three launches: embedding, the persistent kernel
    /// (every layer), final norm + lm_head + argmax.
    fn decode_mega(&self, s: &Scratch, cache: &CudaCache, pdl: bool) -> Result<()> {
        self.decode_mega_traced(s, cache, pdl, Arg::P(0))
    }

    fn decode_mega_traced(&self, s: &Scratch, cache: &CudaCache, pdl: bool, trace: Arg) -> Result<()> {
        let c = &self.config;
        let g = &self.gpu;
        let m = self
            .mega
            .as_ref()
            .ok_or_else(|| berr("persistent decode unavailable"))?;
        let gate = match c.activation {
            Activation::Relu2 => 1,
            Activation::Silu => 2,
        };
        // A pick graph's screen slots are zeroed by mega_begin (see
        // screened_pick_step).
        let screen_keys = if self.capturing_head.load(std::sync::atomic::Ordering::Relaxed) != Head::Logits as u8 {
            let sh = self.lm_head_screen.lock().map_err(|_| berr("lm_head lock poisoned"))?;
            sh.as_ref()
                .ok_or_else(|| berr("screened lm_head not prepared"))?
                .keys
                .p()
        } else {
            Arg::P(0)
        };
        g.set_tag("embed");
        g.launch(
            "mega_begin",
            (1, 1, 1),
            256,
            &[
                s.tok.p(),
                s.pos.p(),
                s.fed.p(),
                s.hist.p(),
                Arg::I(HIST as i32),
                self.embed.p(),
                Arg::I(c.hidden as i32),
                s.x.p(),
                s.best.p(),
                s.bar.p(),
                screen_keys,
                s.tagged.p(),
                s.gen.p(),
                Arg::I(c.n_layers as i32),
            ],
        )?;
        g.set_tag("layers (persistent)");
        let name = match self.kv {
            KvDtype::F16 => "mega_f16",
            KvDtype::F32 => "mega_f32",
        };
        g.launch_smem(
            name,
            (m.grid, 1, 1),
            mega_threads(),
            m.smem() as u32,
            &[
                m.table.p(),
                Arg::I(c.n_layers as i32),
                Arg::I(c.hidden as i32),
                Arg::I(c.q_dim() as i32),
                Arg::I(c.kv_dim() as i32),
                Arg::I(c.ffn as i32),
                Arg::I(c.head_dim as i32),
                Arg::I(c.n_heads as i32),
                Arg::I(c.n_kv_heads as i32),
                Arg::I(gate),
                Arg::F(c.rms_eps),
                Arg::F(1.0 / (c.head_dim as f32).sqrt()),
                s.pos.p(),
                self.rope.p(),
                cache.k.p(),
                cache.v.p(),
                Arg::I((cache.layer_bytes / self.kv.bytes()) as i32),
                Arg::I(cache.cap as i32),
                s.x.p(),
                s.qr.p(),
                s.attn.p(),
                s.gu.p(),
                s.part.p(),
                Arg::I(self.max_splits as i32),
                s.cnt.p(),
                s.bar.p(),
                trace,
                Arg::I(m.w0_chunks as i32),
                Arg::I(m.w1_chunks as i32),
                Arg::I(m.vbytes as i32),
                Arg::I(self.mega_flags.load(std::sync::atomic::Ordering::Relaxed) as i32),
                s.tagged.p(),
                s.gen.p(),
            ],
            if pdl && mega_pdl() {
                Launch::CooperativePdl
            } else {
                Launch::Cooperative
            },
        )?;
        self.lm_head_step(s, pdl)
    }

    /// The greedy token of the last decode step.
    fn decoded_token(&self, s: &Scratch) -> Result<u32> {
        if self.fused {
            let k = s.best.read::<u64>(1)?[0];
            // Key 0: no finite logit was seen (the unfused argmax gives 0 too).
            Ok(if k == 0 { 0 } else { !(k as u32) })
        } else {
            Ok(s.argmax.read::<i32>(1)?[0] as u32)
        }
    }

    /// Final norm of rows `t0..t0+n` of x into `normed`, then logits of up to
    /// LM_T of them into `logits`.
    fn head(&self, s: &Scratch, t0: usize, n: usize, logits: bool) -> Result<()> {
        self.head_at(s, t0, n, logits, 0)
    }

    /// `head`, writing the logits from row `row` of `logits` on.
    fn head_at(&self, s: &Scratch, t0: usize, n: usize, logits: bool, row: usize) -> Result<()> {
        let c = &self.config;
        let h = c.hidden;
        self.gpu.set_tag("lm_head+argmax");
        let how = self.body_launch();
        self.gpu.launch_smem(
            "norm_quant",
            (n as u32, 1, 1),
            norm_threads(h),
            0,
            &[
                s.x.at(4 * t0 * h),
                Arg::I(h as i32),
                Arg::I(h as i32),
                Arg::I(0),
                self.final_norm.p(),
                Arg::I(1),
                Arg::F(c.rms_eps),
                Arg::P(0),
                Arg::I(0),
                Arg::P(0),
                Arg::P(0),
                s.normed.p(),
                Arg::I(h as i32),
                Arg::I(0),
            ],
            how,
        )?;
        if !logits {
            return Ok(());
        }
        debug_assert!(n <= LM_T && (row + n) * c.vocab * 4 <= s.logits.bytes);
        let e = self.lm_head.as_ref().unwrap_or(&self.embed);
        // Several tokens: LM_R rows a warp (the same bits, fewer x loads).
        let (name, rows_per_block) = match n > 1 && self.lm_head_rows.load(Ordering::Relaxed) {
            true => ("lm_head_f16_rows", 8 * LM_R),
            false => ("lm_head_f16", 8),
        };
        self.gpu.launch_smem(
            name,
            (c.vocab.div_ceil(rows_per_block) as u32, 1, 1),
            256,
            0,
            &[
                e.p(),
                Arg::I(c.vocab as i32),
                Arg::I(h as i32),
                s.normed.p(),
                Arg::I(n as i32),
                s.logits.at(4 * row * c.vocab),
            ],
            how,
        )
    }

    fn check_call(&self, cache: &CudaCache, tokens: &[u32]) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::input("forward: no tokens"));
        }
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= self.config.vocab) {
            return Err(Error::input(format!("token id {t} >= vocab {}", self.config.vocab)));
        }
        if cache.len + tokens.len() > cache.cap {
            return Err(Error::input(format!(
                "context full: {} + {} tokens > capacity {}",
                cache.len,
                tokens.len(),
                cache.cap
            )));
        }
        Ok(())
    }

    /// Drop graphs another backend captured into `cache` (they point at
    /// that backend's buffers) and mark it as ours.
    fn claim(&self, cache: &mut CudaCache) {
        if cache.owner != self.id {
            cache.graph = None;
            cache.pick_graph = None;
            cache.topk_graph = None;
            cache.steps.clear();
            cache.seen.clear();
            cache.owner = self.id;
        }
    }

    /// One decode step through the cache's CUDA graph (captured on first
    /// use). Leaves the logits in `s.logits` and the greedy token in `s.argmax`.
    fn decode_graph(&self, s: &Scratch, cache: &mut CudaCache, token: u32, head: Head) -> Result<()> {
        self.decode_launch(s, cache, Some(token), head)?;
        self.gpu.sync()
    }

    /// Queue one replay of the decode graph (captured on first use). With
    /// `token` the host feeds it at the cache's position; with None the step
    /// takes what the previous replay left (`decode_advance`: its greedy
    /// token, the next position), so replays need no copy between them.
    /// `head`: what the step ends with; a screened head (only the greedy
    /// token, or only the top-k, is wanted) runs where the screen is on,
    /// else the full head.
    fn decode_launch(&self, s: &Scratch, cache: &mut CudaCache, token: Option<u32>, head: Head) -> Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        self.claim(cache);
        if let Some(token) = token {
            s.tok.write_async(&[token as i32])?;
            s.pos.write_async(&[cache.len as i32])?;
            s.fed.write_async(&[1i32])?;
        }
        let head = if self.lm_head_screen_on.load(Relaxed) {
            head
        } else {
            Head::Logits
        };
        if cache.graph_of(head).is_none() {
            let pdl = self.pdl.load(Relaxed) && self.gpu.has_pdl();
            let splits = cache.cap.div_ceil(ATT_CHUNK);
            self.capturing_head.store(head as u8, Relaxed);
            // A driver that cannot capture PDL edges still gets a graph.
            let graph = match self.capture(|| self.decode_kernels(s, cache, splits, pdl)) {
                Err(_) if pdl => self.capture(|| self.decode_kernels(s, cache, splits, false)),
                r => r,
            };
            self.capturing_head.store(Head::Logits as u8, Relaxed);
            *cache.graph_of(head) = Some(graph?);
        }
        let exec = cache.graph_of(head).as_ref().expect("just captured").exec;
        super::drv(unsafe { result::graph::launch(exec, self.gpu.stream) }, "cuGraphLaunch")
    }

    /// Record the launches `work` makes on the stream as a graph.
    fn capture(&self, work: impl FnOnce() -> Result<()>) -> Result<Graph> {
        let g = &self.gpu;
        super::drv(
            unsafe {
                result::stream::begin_capture(g.stream, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            },
            "cuStreamBeginCapture",
        )?;
        let work = work();
        // Always end the capture, even when a launch failed.
        let graph = super::drv(unsafe { result::stream::end_capture(g.stream) }, "cuStreamEndCapture");
        work?;
        let graph = graph?;
        let exec = unsafe { result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) };
        match exec {
            Ok(exec) => Ok(Graph { exec, graph }),
            Err(e) => {
                unsafe {
                    let _ = result::graph::destroy(graph);
                }
                Err(berr(format!("cuGraphInstantiate: {e:?}")))
            }
        }
    }

    /// The graph key of a multi-token step of `nt` tokens at the cache's
    /// position, or None where such a call runs un-graphed.
    fn step_key(&self, s: &Scratch, cache: &CudaCache, nt: usize, output: Output) -> Option<StepKey> {
        let all = match output {
            Output::LastLogits => false,
            Output::AllLogits => true,
            _ => return None,
        };
        if !(2..=STEP_GRAPH_MAX).contains(&nt) || nt > s.chunk || !self.step_graphs.load(Ordering::Relaxed) {
            return None;
        }
        let flash = self.flash_kernel();
        // Split-K's result does not depend on the split count beyond the
        // splits in use (its merge reads those only), so round up to a power
        // of two: log2(context / 64) captures per sequence instead of one
        // per 64 tokens.
        let splits = match flash {
            Some(_) => 0,
            None => (cache.len + nt)
                .div_ceil(ATT_CHUNK)
                .next_power_of_two()
                .min(self.max_splits),
        };
        Some(StepKey {
            nt,
            splits,
            flash: flash.map(|k| k.0),
            mat: (
                self.mma_min_tokens.load(std::sync::atomic::Ordering::Relaxed),
                self.big_gemm.load(std::sync::atomic::Ordering::Relaxed),
            ),
            all,
            knobs: (
                self.key_splits_override.load(Ordering::Relaxed),
                self.mega_flags.load(Ordering::Relaxed),
            ),
        })
    }

    /// The launches of a multi-token step: body, final norm and lm_head
    /// (last token, or all when `key.all`), as `run` issues them un-graphed.
    fn step_kernels(&self, s: &Scratch, cache: &CudaCache, key: StepKey) -> Result<()> {
        self.body(s, cache, key.nt, key.splits.max(1))?;
        match key.all {
            // The same LM_T-token launches as un-graphed, into successive rows.
            true => (0..key.nt)
                .step_by(LM_T)
                .try_for_each(|t0| self.head_at(s, t0, (key.nt - t0).min(LM_T), true, t0)),
            false => self.head(s, key.nt - 1, 1, true),
        }
    }

    /// Queue the multi-token step `key` for `tokens` at the cache's position
    /// through its graph, capturing it on its second use (`eager`: on the
    /// first) and evicting the least recently used graph when full. Returns
    /// false, having queued nothing, on a key's first use: the caller runs
    /// the step un-graphed. The cache is not advanced.
    fn step_graph(
        &self,
        s: &Scratch,
        cache: &mut CudaCache,
        tokens: &[u32],
        key: StepKey,
        eager: bool,
    ) -> Result<bool> {
        self.claim(cache);
        let cached = cache.steps.iter().position(|(k, _)| *k == key);
        let seen = cache.seen.iter().position(|k| *k == key);
        if cached.is_none() && seen.is_none() && !eager {
            if cache.seen.len() >= STEP_GRAPHS {
                cache.seen.remove(0);
            }
            cache.seen.push(key);
            return Ok(false);
        }
        let tok: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        s.tok.write_async(&tok)?;
        s.pos.write_async(&[cache.len as i32])?;
        let graph = match cached {
            Some(i) => cache.steps.remove(i).1,
            None => {
                if let Some(i) = seen {
                    cache.seen.remove(i);
                }
                if cache.steps.len() >= STEP_GRAPHS {
                    cache.steps.remove(0);
                }
                self.capture(|| self.step_kernels(s, cache, key))?
            }
        };
        let exec = graph.exec;
        cache.steps.push((key, graph));
        super::drv(unsafe { result::graph::launch(exec, self.gpu.stream) }, "cuGraphLaunch")?;
        Ok(true)
    }

    /// The decode graph's launches: one step, then `decode_advance`; in the
    /// persistent decode the next step's `mega_begin` advances instead (one
    /// launch fewer a step; `YINSEN_CUDA_BEGIN_ADVANCE=0`: not).
    fn decode_kernels(&self, s: &Scratch, cache: &CudaCache, splits: usize, pdl: bool) -> Result<()> {
        let greedy = if self.uses_mega() {
            self.decode_mega(s, cache, pdl)?;
            if begin_advances() {
                return Ok(());
            }
            (s.best.p(), Arg::P(0))
        } else if self.fused {
            self.decode_fused(s, cache, splits, pdl)?;
            (s.best.p(), Arg::P(0))
        } else {
            self.body(s, cache, 1, splits)?;
            self.head(s, 0, 1, true)?;
            self.gpu.launch(
                "argmax_f32",
                (1, 1, 1),
                1024,
                &[s.logits.p(), Arg::I(self.config.vocab as i32), s.argmax.p()],
            )?;
            (Arg::P(0), s.argmax.p())
        };
        self.gpu.launch(
            "decode_advance",
            (1, 1, 1),
            32,
            &[
                greedy.0,
                greedy.1,
                s.tok.p(),
                s.pos.p(),
                s.hist.p(),
                Arg::I(HIST as i32),
                s.fed.p(),
            ],
        )
    }

    /// Run `tokens` and return the requested output (the Backend contract).
    fn run(&self, cache: &mut CudaCache, tokens: &[u32], output: Output) -> Result<Vec<f32>> {
        self.check_call(cache, tokens)?;
        let s = self.lock_scratch()?;
        self.gpu.bind()?;
        let c = &self.config;
        if tokens.len() == 1 && output == Output::LastLogits {
            self.decode_graph(&s, cache, tokens[0], Head::Logits)?;
            cache.len += 1;
            return s.read_logits(1, c.vocab);
        }
        // Multi-token steps through a graph (from a key's second use on).
        if let Some(key) = self.step_key(&s, cache, tokens.len(), output) {
            if self.step_graph(&s, cache, tokens, key, false)? {
                let rows = if key.all { key.nt } else { 1 };
                let out = s.read_logits(rows, c.vocab)?;
                cache.len += key.nt;
                return Ok(out);
            }
        }
        let mut out = Vec::new();
        let per_call = self.chunk_tokens(&s);
        for (ci, chunk) in tokens.chunks(per_call).enumerate() {
            let nt = chunk.len();
            let tok: Vec<i32> = chunk.iter().map(|&t| t as i32).collect();
            let pos = [cache.len as i32];
            s.tok.write_async(&tok)?;
            s.pos.write_async(&pos)?;
            let splits = (cache.len + nt).div_ceil(ATT_CHUNK);
            self.body(&s, cache, nt, splits)?;
            let last_chunk = (ci + 1) * per_call >= tokens.len();
            match output {
                Output::LastLogits if last_chunk => {
                    self.head(&s, nt - 1, 1, true)?;
                    out = s.read_logits(1, c.vocab)?;
                }
                Output::LastLogits => self.gpu.sync()?,
                Output::AllLogits => {
                    for t0 in (0..nt).step_by(LM_T) {
                        let n = (nt - t0).min(LM_T);
                        self.head(&s, t0, n, true)?;
                        out.extend(s.read_logits(n, c.vocab)?);
                    }
                }
                Output::Hidden => {
                    self.head(&s, 0, nt, false)?;
                    out.extend(s.normed.read::<f32>(nt * c.hidden)?);
                }
            }
            cache.len += nt;
        }
        Ok(out)
    }

    /// Greedy decode of `n` tokens after `first` through the graph: the steps
    /// feed their own tokens back on the device (`decode_advance`) and are
    /// queued back to back; the tokens are read once per HIST steps.
    pub fn generate_greedy(&self, cache: &mut dyn KvCache, first: u32, n: usize) -> Result<Vec<u32>> {
        let cache = self.cache_of(cache)?;
        self.check_call(cache, &[first])?;
        if cache.len + n > cache.cap {
            return Err(Error::input(format!(
                "context full: {} + {n} tokens > capacity {}",
                cache.len, cache.cap
            )));
        }
        let s = self.lock_scratch()?;
        self.gpu.bind()?;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let start = cache.len;
            let k = (n - out.len()).min(HIST);
            for i in 0..k {
                let feed = (out.is_empty() && i == 0).then_some(first);
                self.decode_launch(&s, cache, feed, Head::Greedy)?;
                cache.len += 1;
            }
            // The chunk's last pick is in `best` (hist gets it from the
            // next step's start where mega_begin advances).
            let hist = s.hist.read::<i32>(HIST)?;
            out.extend((start..start + k - 1).map(|p| hist[p % HIST] as u32));
            out.push(self.decoded_token(&s)?);
        }
        Ok(out)
    }

    pub(crate) fn cuda_cache(&self, capacity: usize) -> Result<CudaCache> {
        let c = &self.config;
        if capacity == 0 || capacity > c.max_ctx {
            return Err(Error::input(format!(
                "cache capacity {capacity} outside 1..={}",
                c.max_ctx
            )));
        }
        let layer_bytes = checked(&[c.n_kv_heads, capacity, c.head_dim, self.kv.bytes()], "KV cache")?;
        let bytes = checked(&[layer_bytes, c.n_layers], "KV cache")?;
        let k = self.gpu.alloc(bytes)?;
        let v = self.gpu.alloc(bytes)?;
        Ok(CudaCache {
            k,
            v,
            cap: capacity,
            len: 0,
            kv: self.kv,
            layer_bytes,
            graph: None,
            pick_graph: None,
            topk_graph: None,
            steps: Vec::new(),
            seen: Vec::new(),
            owner: 0,
            uid: {
                static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
                NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            },
        })
    }

    /// For tests: heads of 2+ tokens through `lm_head_f16_rows` (true, the
    /// default) or `lm_head_f16`; returns the previous setting.
    pub fn set_lm_head_rows(&self, on: bool) -> bool {
        self.lm_head_rows.swap(on, Ordering::Relaxed)
    }

    pub fn max_splits(&self) -> usize {
        self.max_splits
    }

    /// For benchmarks and tests: replay captured graphs for calls of
    /// 2..=16 tokens (on by default); returns the previous setting.
    pub fn set_step_graphs(&self, on: bool) -> bool {
        self.step_graphs.swap(on, Ordering::Relaxed)
    }
}

/// (cos, sin) of p * base^(-2i/d), computed in f64.
fn rope_table(c: &ModelConfig) -> Vec<f32> {
    let half = c.head_dim / 2;
    let mut t = Vec::with_capacity(c.max_ctx * half * 2);
    for p in 0..c.max_ctx {
        for i in 0..half {
            let theta = (c.rope_theta as f64).powf(-2.0 * i as f64 / c.head_dim as f64);
            let a = p as f64 * theta;
            t.push(a.cos() as f32);
            t.push(a.sin() as f32);
        }
    }
    t
}

impl Scratch {
    /// The first `rows` rows of `logits`, through the page-locked buffer.
    fn read_logits(&self, rows: usize, vocab: usize) -> Result<Vec<f32>> {
        match &self.logits_host {
            Some(pin) => self.logits.read_via::<f32>(rows * vocab, pin),
            None => self.logits.read::<f32>(rows * vocab),
        }
    }

    fn new(
        gpu: &Arc<Gpu>,
        c: &ModelConfig,
        chunk: usize,
        part_tokens: usize,
        splits: usize,
        layers: &[GpuLayer],
    ) -> Result<Self> {
        let kmax = layers
            .iter()
            .flat_map(|l| [l.qkv.kpad(), l.o.kpad(), l.gu.kpad(), l.down.kpad()])
            .max()
            .unwrap_or(64);
        let f32s = |n: &[usize]| -> Result<DevBuf> { gpu.alloc(checked(n, "scratch")? * 4) };
        let ntp = chunk.div_ceil(super::TILED_TOKENS) * super::TILED_TOKENS;
        Ok(Self {
            chunk,
            part_tokens,
            tok: f32s(&[chunk])?,
            pos: f32s(&[1])?,
            seqs: gpu.alloc(checked(&[chunk, BATCH_SEQ_BYTES], "scratch")?)?,
            x: f32s(&[chunk, c.hidden])?,
            q8: gpu.alloc(checked(&[chunk, kmax], "scratch")?.max(super::tiled_x_bytes(kmax, ntp)))?,
            ntp,
            sx: f32s(&[chunk])?,
            xsum: f32s(&[chunk])?,
            qkv: f32s(&[chunk, c.q_dim() + 2 * c.kv_dim()])?,
            attn: f32s(&[chunk, c.q_dim()])?,
            gu: f32s(&[chunk, 2 * c.ffn])?,
            part: f32s(&[part_tokens, c.n_heads, splits, c.head_dim + 2])?,
            normed: f32s(&[chunk, c.hidden])?,
            // LM_T rows per head launch; a graphed step keeps all its rows.
            logits: f32s(&[LM_T.max(STEP_GRAPH_MAX), c.vocab])?,
            // A batched step's greedy tokens, one per row of `logits`.
            argmax: f32s(&[LM_T.max(STEP_GRAPH_MAX)])?,
            // Two rows at least: the persistent decode alternates them by layer.
            qr: f32s(&[chunk.max(2), c.q_dim()])?,
            cnt: {
                let b = f32s(&[part_tokens, c.n_heads])?;
                b.fill(0)?;
                b
            },
            best: f32s(&[2])?,
            hist: f32s(&[HIST])?,
            fed: f32s(&[1])?,
            logits_host: PinnedHost::new(gpu, checked(&[LM_T.max(STEP_GRAPH_MAX), c.vocab, 4], "scratch")?).ok(),
            pick_host: PinnedHost::new(gpu, 8)?,
            ahead: None,
            topk_part: gpu.alloc(8 * TK_BLOCKS * TK_MAX)?,
            topk_cnt: {
                let b = f32s(&[1])?;
                b.fill(0)?;
                b
            },
            // A batched step's rows each get TK_MAX slots.
            topk_v: f32s(&[LM_T.max(STEP_GRAPH_MAX), TK_MAX])?,
            topk_i: f32s(&[LM_T.max(STEP_GRAPH_MAX), TK_MAX])?,
            bar: f32s(&[1])?,
            tagged: {
                let words = 2 * c.hidden + 2 * c.q_dim() + c.ffn + 2 * c.kv_dim();
                let b = gpu.alloc(checked(&[words, 8], "scratch")?)?;
                b.fill(0)?;
                b
            },
            gen: {
                let b = f32s(&[1])?;
                b.fill(0)?;
                b
            },
            batch_graphs: batch::BatchGraphs::default(),
            kvs: None,
        })
    }
}

/// A start/stop pair of CUDA events.
struct Events(sys::CUevent, sys::CUevent);

impl Events {
    fn new() -> Result<Self> {
        let f = sys::CUevent_flags::CU_EVENT_DEFAULT;
        Ok(Self(
            super::drv(result::event::create(f), "cuEventCreate")?,
            super::drv(result::event::create(f), "cuEventCreate")?,
        ))
    }
    fn record_start(&self, s: sys::CUstream) -> Result<()> {
        super::drv(unsafe { result::event::record(self.0, s) }, "cuEventRecord")
    }
    fn record_stop_ms(&self, s: sys::CUstream) -> Result<f32> {
        super::drv(unsafe { result::event::record(self.1, s) }, "cuEventRecord")?;
        super::drv(unsafe { result::event::synchronize(self.1) }, "cuEventSynchronize")?;
        super::drv(unsafe { result::event::elapsed(self.0, self.1) }, "cuEventElapsedTime")
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        unsafe {
            let _ = result::event::destroy(self.0);
            let _ = result::event::destroy(self.1);
        }
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> String {
        format!("cuda:{}", self.gpu.ctx.ordinal())
    }
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn new_cache(&self, capacity: usize) -> Result<Box<dyn KvCache>> {
        let _g = self.lock_scratch()?;
        self.gpu.bind()?;
        Ok(Box::new(self.cuda_cache(capacity)?))
    }
    fn forward(&self, cache: &mut dyn KvCache, tokens: &[u32], output: Output) -> Result<Vec<f32>> {
        let cache = self.cache_of(cache)?;
        self.run(cache, tokens, output)
    }
    /// Several sequences in one body call (see `run_batch`); one sequence
    /// takes the decode graph. The logits equal each sequence's own step
    /// within the fixtures' tolerances, not bit for bit: the one-token step
    /// runs the persistent decode kernel, whose float order differs.
    fn forward_batch(&self, caches: &mut [&mut dyn KvCache], tokens: &[u32]) -> Result<Vec<f32>> {
        let mut cs = crate::backends::batch_caches::<CudaCache>(&self.config, caches, tokens, "cuda")?;
        match cs.len() {
            1 => self.run(cs[0], tokens, Output::LastLogits),
            _ => match self.run_batch(&mut cs, tokens, batch::BatchWant::Logits)? {
                batch::BatchOut::Logits(l) => Ok(l),
                _ => Err(berr("batched step: logits expected")),
            },
        }
    }
    /// With the screened head on, the picks of every row from one pass over
    /// the 8-bit head plus each row's F16 candidates (greedy: the full
    /// head's token and logit; top-k, k <= 64: its rows and logit bits).
    /// Otherwise greedy picks from the GPU's argmax of each row (the full
    /// head's token; its logit NaN) and top-k picks from the device's top-k
    /// per row. Past k = 64 the logits, ranked on the host. One sequence:
    /// the device's own picks.
    fn forward_batch_pick(
        &self,
        caches: &mut [&mut dyn KvCache],
        tokens: &[u32],
        picks: &[(usize, bool)],
    ) -> Result<Option<crate::backends::BatchPicks>> {
        let vocab = self.config.vocab;
        if !crate::backends::picks_offered(picks, tokens.len(), vocab) {
            return Ok(None);
        }
        if caches.len() == 1 {
            let pick = match picks[0] {
                (_, true) => self
                    .forward_greedy(&mut *caches[0], tokens[0])?
                    .map(|t| vec![(t, f32::NAN)]),
                (k, false) => self.forward_top_k(&mut *caches[0], tokens[0], k)?,
            };
            if let Some(p) = pick {
                return Ok(Some(vec![p]));
            }
        }
        let mut cs = crate::backends::batch_caches::<CudaCache>(&self.config, caches, tokens, "cuda")?;
        // Every pick greedy: the argmax per row. Else, where the device's
        // top-k takes the largest k: its ranked list per row, cut to each
        // row's k (a ranked list's first k are the top k; a greedy pick is
        // the first). Else every logit, ranked on the host.
        let kmax = picks.iter().map(|p| p.0).max().unwrap_or(1);
        let want = if picks.iter().all(|p| p.1) {
            batch::BatchWant::Greedy
        } else if kmax <= TK_MAX && vocab <= TK_BLOCKS * TK_PER {
            batch::BatchWant::TopK(kmax)
        } else {
            batch::BatchWant::Logits
        };
        let out = self.run_batch(&mut cs, tokens, want)?;
        Ok(Some(match &out {
            batch::BatchOut::Greedy(best) => best.iter().map(|&p| vec![p]).collect(),
            batch::BatchOut::TopK(rows) => rows
                .iter()
                .zip(picks)
                .map(|(r, &(k, _))| r[..k.min(r.len())].to_vec())
                .collect(),
            // Rows ranked in parallel (a top-k over 128k logits is ~0.1 ms);
            // the picks above are copies, not worth waking the pool for.
            batch::BatchOut::Logits(l) => {
                use rayon::prelude::*;
                picks
                    .par_iter()
                    .enumerate()
                    .map(|(i, &(k, g))| {
                        let l = &l[i * vocab..(i + 1) * vocab];
                        match g {
                            true => {
                                let t = crate::logits::argmax(l);
                                vec![(t, l[t as usize])]
                            }
                            false => crate::logits::ranked(l, k),
                        }
                    })
                    .collect()
            }
        }))
    }
    fn forward_top_k(&self, cache: &mut dyn KvCache, token: u32, k: usize) -> Result<Option<Vec<(u32, f32)>>> {
        let vocab = self.config.vocab;
        if k == 0 || k > TK_MAX || vocab > TK_BLOCKS * TK_PER {
            return Ok(None);
        }
        let cache = self.cache_of(cache)?;
        self.check_call(cache, &[token])?;
        let s = self.lock_scratch()?;
        self.gpu.bind()?;
        if self.lm_head_screened() && !self.lm_head_q8_on.load(Ordering::Relaxed) {
            if let Some(top) = self.screened_top_k(&s, cache, token, k)? {
                return Ok(Some(top));
            }
        } else {
            self.decode_launch(&s, cache, Some(token), Head::Logits)?;
            cache.len += 1;
        }
        self.gpu.launch(
            "topk_logits",
            (vocab.div_ceil(TK_PER) as u32, 1, 1),
            256,
            &[
                s.logits.p(),
                Arg::I(vocab as i32),
                Arg::I(k as i32),
                s.topk_part.p(),
                s.topk_cnt.p(),
                s.topk_v.p(),
                s.topk_i.p(),
            ],
        )?;
        let (v, i) = (s.topk_v.read::<f32>(k)?, s.topk_i.read::<i32>(k)?);
        Ok(Some(
            i.into_iter()
                .zip(v)
                .filter(|&(t, _)| t >= 0)
                .map(|(t, x)| (t as u32, x))
                .collect(),
        ))
    }
    /// One greedy step. Where the pick is made on the device (the fused
    /// head), the step after it is queued before the pick is read back,
    /// fed on the device by that pick: a caller that feeds the returned
    /// token next (a greedy generation loop) finds its step already running,
    /// so the host's round trip per token hides behind the GPU's work.
    /// `YINSEN_CUDA_GREEDY_AHEAD=0` turns that off (A/B runs).
    fn forward_greedy(&self, cache: &mut dyn KvCache, token: u32) -> Result<Option<u32>> {
        let cache = self.cache_of(cache)?;
        self.check_call(cache, &[token])?;
        let mut s = self.scratch.lock().map_err(|_| berr("scratch lock poisoned"))?;
        self.gpu.bind()?;
        let ahead = s.ahead.take();
        if !self.fused {
            self.decode_graph(&s, cache, token, Head::Greedy)?;
            cache.len += 1;
            return self.decoded_token(&s).map(Some);
        }
        let queued = ahead.is_some_and(|a| a.cache == cache.uid && a.pos == cache.len && a.token == token);
        if queued {
            self.ahead_taken.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        } else {
            self.decode_launch(&s, cache, Some(token), Head::Greedy)?;
        }
        let pick = s.best.read_async_into(8, &s.pick_host)?;
        static AHEAD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let on = *AHEAD.get_or_init(|| std::env::var("YINSEN_CUDA_GREEDY_AHEAD").map_or(true, |v| v != "0"));
        // The next step writes position len + 1.
        let next = on && cache.len + 2 <= cache.cap;
        if next {
            self.decode_launch(&s, cache, None, Head::Greedy)?;
        }
        let k = pick.wait::<u64>()?[0];
        cache.len += 1;
        // Key 0: no finite logit was seen (as `decoded_token` reads it).
        let t = if k == 0 { 0 } else { !(k as u32) };
        if next {
            s.ahead = Some(Ahead {
                cache: cache.uid,
                pos: cache.len,
                token: t,
            });
        }
        Ok(Some(t))
    }
    fn resident_weight_bytes(&self) -> usize {
        self.weight_bytes
    }
    fn export_kv(&self, cache: &mut dyn KvCache) -> Result<crate::backends::KvSnapshot> {
        self.export_cuda_kv(cache)
    }
    fn import_kv(&self, snap: &crate::backends::KvSnapshot, capacity: usize) -> Result<Box<dyn KvCache>> {
        Ok(Box::new(self.import_cuda_kv(snap, capacity)?))
    }
}

impl CudaCache {
    /// For tests: how many multi-token step graphs the cache holds.
    pub fn step_graph_count(&self) -> usize {
        self.steps.len()
    }

    /// Benchmarks fill a cache by timing a forward without advancing it.
    pub(crate) fn set_len_for_bench(&mut self, n: usize) {
        self.len = n.min(self.cap);
    }
}

/// KV moves between paths: the device cache is f32 or f16 `[layer][kv_head][cap][head_dim]`,
/// the snapshot f32 `[layer][pos][kv_head * head_dim]` (the CPU layout).
impl CudaBackend {
    pub fn export_cuda_kv(&self, cache: &mut dyn KvCache) -> Result<crate::backends::KvSnapshot> {
        let cache = self.cache_of(cache)?;
        let c = &self.config;
        let _g = self.lock_scratch()?;
        self.gpu.bind()?;
        let layer_elems = cache.layer_bytes / cache.kv.bytes();
        let total = checked(&[layer_elems, c.n_layers], "KV export")?;
        let (hd, kvd, cap, len) = (c.head_dim, c.kv_dim(), cache.cap, cache.len);
        let f16 = cache.kv == KvDtype::F16;
        let to_host = |buf: &DevBuf| -> Result<Vec<Vec<f32>>> {
            let raw: Vec<f32> = if f16 {
                buf.read::<u16>(total)?
                    .into_iter()
                    .map(|b| half::f16::from_bits(b).to_f32())
                    .collect()
            } else {
                buf.read::<f32>(total)?
            };
            Ok((0..c.n_layers)
                .map(|li| {
                    let base = li * layer_elems;
                    let mut out = vec![0f32; len * kvd];
                    for p in 0..len {
                        for h in 0..c.n_kv_heads {
                            let src = base + (h * cap + p) * hd;
                            for d in 0..hd {
                                out[p * kvd + h * hd + d] = raw[src + d];
                            }
                        }
                    }
                    out
                })
                .collect())
        };
        Ok(crate::backends::KvSnapshot {
            len,
            kv_dim: kvd,
            k: to_host(&cache.k)?,
            v: to_host(&cache.v)?,
        })
    }

    pub fn import_cuda_kv(&self, snap: &crate::backends::KvSnapshot, capacity: usize) -> Result<CudaCache> {
        let c = &self.config;
        snap.validate(c, capacity)?;
        let _g = self.lock_scratch()?;
        self.gpu.bind()?;
        let mut cache = self.cuda_cache(capacity.min(c.max_ctx))?;
        let layer_elems = cache.layer_bytes / cache.kv.bytes();
        let total = checked(&[layer_elems, c.n_layers], "KV import")?;
        let (hd, kvd, cap) = (c.head_dim, c.kv_dim(), cache.cap);
        let to_dev = |layers: &[Vec<f32>]| -> Vec<f32> {
            let mut raw = vec![0f32; total];
            for (li, l) in layers.iter().enumerate() {
                let base = li * layer_elems;
                for p in 0..snap.len {
                    for h in 0..c.n_kv_heads {
                        let dst = base + (h * cap + p) * hd;
                        for d in 0..hd {
                            raw[dst + d] = l[p * kvd + h * hd + d];
                        }
                    }
                }
            }
            raw
        };
        for (buf, layers) in [(&cache.k, &snap.k), (&cache.v, &snap.v)] {
            let raw = to_dev(layers);
            if cache.kv == KvDtype::F16 {
                buf.write(
                    &raw.iter()
                        .map(|&x| half::f16::from_f32(x).to_bits())
                        .collect::<Vec<u16>>(),
                )?;
            } else {
                buf.write(&raw)?;
            }
        }
        cache.len = snap.len;
        Ok(cache)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel name the host builds for a cache type is one the module loads.
    #[test]
    fn kv_kernel_names_are_loaded() {
        for kv in [KvDtype::F16, KvDtype::F32] {
            for name in [
                kv.rope_kv(),
                kv.attn_partial(),
                kv.dec_mm(8),
                kv.dec_mm(16),
                kv.flash(false),
                kv.flash(true),
                kv.flash_tc(false, false),
                kv.flash_tc(false, true),
                kv.flash_tc(true, false),
                kv.flash_tc(true, true),
            ] {
                assert!(super::super::KERNELS.contains(&name), "{name} not in KERNELS");
            }
        }
        assert_ne!(KvDtype::F16.dec_mm(8), KvDtype::F32.dec_mm(8));
        assert_ne!(KvDtype::F16.dec_mm(16), KvDtype::F16.dec_mm(8));
        // Every (cache, width, precision) picks its own tensor-core kernel.
        let mut tc: Vec<&str> = [KvDtype::F16, KvDtype::F32]
            .iter()
            .flat_map(|kv| [(false, false), (false, true), (true, false), (true, true)].map(|(w, s)| kv.flash_tc(w, s)))
            .collect();
        tc.sort();
        tc.dedup();
        assert_eq!(tc.len(), 8);
    }

    /// FlashMode round-trips through its u8 (the backend's atomic).
    #[test]
    fn flash_mode_table_matches_discriminants() {
        for (i, m) in FlashMode::ALL.iter().enumerate() {
            assert_eq!(*m as usize, i, "{m:?}");
        }
    }

    /// Tensor-core smem: 3 f16 tiles (tc16, f32 cache), + Q lo (split), + K, V
    /// lo (split, f32 cache), + a second K, V stage (f16 cache, cp.async);
    /// the widest must fit an H100's 227 KB per block.
    #[test]
    fn flash_tc_smem_sizes() {
        let tile = |hd: usize| 2 * 64 * (hd + 8);
        assert_eq!(flash_tc_smem(128, false, KvDtype::F32), 3 * tile(128));
        assert_eq!(flash_tc_smem(128, false, KvDtype::F16), 5 * tile(128));
        assert_eq!(flash_tc_smem(128, true, KvDtype::F16), 6 * tile(128));
        assert_eq!(flash_tc_smem(128, true, KvDtype::F32), 6 * tile(128));
        assert_eq!(flash_tc_smem(128, true, KvDtype::F32), 104_448);
        for kv in [KvDtype::F32, KvDtype::F16] {
            assert!(flash_tc_smem(256, true, kv) <= 227 * 1024, "{kv:?}");
            // Two d128 split blocks per SM (228 KB, 1 KB reserved per block).
            assert!(2 * (flash_tc_smem(128, true, kv) + 1024) <= 228 * 1024, "{kv:?}");
        }
        // flash_tcs stages an f32 tile (256 hd bytes) in the Q hi + lo tiles.
        for hd in (16..=128).step_by(16) {
            assert!(64 * hd * 4 <= 2 * tile(hd), "hd {hd}");
        }
    }
}
