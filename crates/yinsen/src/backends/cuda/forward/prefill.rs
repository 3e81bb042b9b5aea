//! The transformer body for many tokens (prefill and multi-token steps
//! through separate kernels): the quantiser before each matrix, the GEMMs,
//! RoPE and the KV-cache write, and the attention kernel the call's size
//! picks (flash-attention variants with their key splits and merge).

use super::*;

/// Threads per norm_quant row: enough for 8 values each (its register
/// path), at least 128; fewer threads make its three block reductions cheaper.
pub(super) fn norm_threads(n: usize) -> u32 {
    n.div_ceil(8).next_power_of_two().clamp(128, 1024) as u32
}

/// The grouped quantiser (`norm_quant_w{W}`, ops.cu) serves calls of this
/// many tokens or more; its variants' warps per token and float4 per lane,
/// by warps and then float4 (the first that holds a row is the tightest).
const NQ_GROUP_MIN_TOKENS: usize = 64;
pub const NQ_GROUPS: [(usize, usize, &str); 9] = [
    (1, 20, "norm_quant_w1"),
    (2, 12, "norm_quant_w2"),
    (4, 5, "norm_quant_w4r5"),
    (4, 14, "norm_quant_w4"),
    (8, 3, "norm_quant_w8r3"),
    (8, 7, "norm_quant_w8r7"),
    (8, 8, "norm_quant_w8"),
    (16, 2, "norm_quant_w16r2"),
    (16, 4, "norm_quant_w16"),
];
/// S13-2 (H100, prefill 2048 / 512, alternated x3): the block kernel 4.02 /
/// 1.39 ms of norm_quant; 1 warp per token (4 for 6912) 3.10 / 1.93; 2
/// (4) 3.15 / 1.45; 8 2.94 / 1.12.
pub(super) const NQ_WARPS_DEFAULT: usize = 8;

/// The grouped quantiser variant for rows of `n` values with at least
/// `min_w` warps per token: (warps, kernel), or None where no variant holds a row.
fn nq_group(n: usize, min_w: usize) -> Option<(usize, &'static str)> {
    if min_w == 0 {
        return None;
    }
    NQ_GROUPS
        .iter()
        .find(|(w, r, _)| *w >= min_w && n <= 128 * w * r)
        .map(|&(w, _, name)| (w, name))
}

/// Whose keys a body call's tokens attend to.
#[derive(Clone, Copy)]
pub(super) enum Keys<'a> {
    /// One sequence: its tokens at positions `s.pos..` of this cache.
    One(&'a CudaCache),
    /// A batched step: token t is the next of sequence t, whose cache and
    /// position are entry t of this `BatchSeq` table (ops.cu).
    Batch(Arg),
}

impl CudaBackend {
    /// RMSNorm (optional) + quantisation of `nt` rows of `input` into
    /// q8/sx/xsum, in the order the GEMM of `next` reads.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn norm_quant(
        &self,
        s: &Scratch,
        input: Arg,
        n: usize,
        stride: usize,
        gate: i32,
        w: Option<&DevBuf>,
        next: &GpuMatrix,
        nt: usize,
    ) -> Result<()> {
        let kpad = next.kpad();
        let do_norm = w.is_some() as i32;
        // Many tokens: the grouped kernel, where its float4 path applies (the
        // block kernel's condition; in and w are 16-byte aligned buffers).
        let group = nq_group(n, self.nq_warps).filter(|_| {
            nt >= NQ_GROUP_MIN_TOKENS
                && n.is_multiple_of(4)
                && stride.is_multiple_of(4)
                && matches!(input, Arg::P(p) if p % 16 == 0)
        });
        // Both kernels take the same arguments up to xsum; then the grouped
        // one its token count, the block one its (unused) f32 output.
        let mut args = vec![
            input,
            Arg::I(n as i32),
            Arg::I(stride as i32),
            Arg::I(gate),
            w.map_or(Arg::P(0), DevBuf::p),
            Arg::I(do_norm),
            Arg::F(self.config.rms_eps),
            s.q8.p(),
            Arg::I(kpad as i32),
            s.sx.p(),
            s.xsum.p(),
        ];
        let x_ntp = Arg::I(self.x_ntp(s, nt, next) as i32);
        let (name, grid, threads) = match group {
            Some((warps, name)) => {
                let tpb = (8 / warps).max(1);
                args.extend([Arg::I(nt as i32), x_ntp]);
                (name, nt.div_ceil(tpb), 32 * warps * tpb)
            }
            None => {
                args.extend([Arg::P(0), Arg::I(0), x_ntp]);
                ("norm_quant", nt, norm_threads(n) as usize)
            }
        };
        self.gpu
            .launch_smem(name, (grid as u32, 1, 1), threads as u32, 0, &args, self.body_launch())
    }

    /// The transformer body for `nt` tokens whose ids are in `s.tok` at
    /// position `s.pos` (device); `n_split` attention splits are launched.
    pub(super) fn body(&self, s: &Scratch, cache: &CudaCache, nt: usize, n_split: usize) -> Result<()> {
        if (2..=mega_multi::MM_T).contains(&nt) && self.uses_mega_multi_at(cache.len + nt) {
            return self.body_multi(s, Keys::One(cache), nt);
        }
        self.body_keys(s, Keys::One(cache), nt, n_split)
    }

    /// The per-kernel body for `nt` tokens in `s.tok` attending to `keys`.
    pub(super) fn body_keys(&self, s: &Scratch, keys: Keys, nt: usize, n_split: usize) -> Result<()> {
        let c = &self.config;
        let g = &self.gpu;
        let (h, q, kv) = (c.hidden, c.q_dim(), c.kv_dim());
        let qkv_n = q + 2 * kv;
        let how = self.body_launch();
        g.set_tag("embed");
        g.launch_smem(
            "embed_f16",
            (nt as u32, 1, 1),
            256,
            0,
            &[s.tok.p(), self.embed.p(), Arg::I(h as i32), s.x.p(), Arg::P(0)],
            how,
        )?;
        let gate = match c.activation {
            Activation::Relu2 => 1,
            Activation::Silu => 2,
        };
        for (li, l) in self.layers.iter().enumerate() {
            g.set_tag("norm_quant");
            self.norm_quant(s, s.x.p(), h, h, 0, Some(&l.attn_norm), &l.qkv, nt)?;
            g.set_tag("qkv");
            let cache = match keys {
                Keys::One(cache) => cache,
                Keys::Batch(seqs) => {
                    // Each token its own cache and position: rope_kv's batched twin.
                    self.mm(s, &l.qkv, nt, Epilogue::Store, &s.qkv, qkv_n)?;
                    g.set_tag("rope_kv");
                    let i = |v: usize| Arg::I(v as i32);
                    let (rope_kv, attn) = self.kv.batch_kernels();
                    let (heads, kvh, hd) = (c.n_heads, c.n_kv_heads, c.head_dim);
                    let args = [
                        s.qkv.p(),
                        i(qkv_n),
                        seqs,
                        i(li),
                        self.rope.p(),
                        i(heads),
                        i(kvh),
                        i(hd),
                        s.qr.p(),
                    ];
                    g.launch_smem(rope_kv, (nt as u32, 1, 1), 256, 0, &args, how)?;
                    g.set_tag("attention");
                    let args = [
                        s.qr.p(),
                        i(q),
                        seqs,
                        i(li),
                        i(heads),
                        i(kvh),
                        i(hd),
                        Arg::F(1.0 / (hd as f32).sqrt()),
                        i(n_split),
                        s.part.p(),
                        s.cnt.p(),
                        s.attn.p(),
                        i(q),
                    ];
                    let grid = (n_split as u32, heads as u32, nt as u32);
                    g.launch_ex(attn, grid, 128, &args, how == Launch::Pdl)?;
                    self.body_layer_rest(s, l, nt, gate)?;
                    continue;
                }
            };
            let (kc, vc) = cache.layer_kv(li);
            let rope = RopeOut {
                pos: s.pos.p(),
                rope: self.rope.p(),
                n_heads: c.n_heads,
                n_kv: c.n_kv_heads,
                hd: c.head_dim,
                cap: cache.cap,
                kv_f16: self.kv == KvDtype::F16,
                kc,
                vc,
                qr: s.qr.p(),
            };
            // The TMA GEMM RoPEs and writes the cache itself; else the rows
            // are stored and `rope_kv` does it.
            if !self.mm_rope(s, &l.qkv, nt, &rope)? {
                self.mm(s, &l.qkv, nt, Epilogue::Store, &s.qkv, qkv_n)?;
                g.set_tag("rope_kv");
                g.launch_smem(
                    self.kv.rope_kv(),
                    (nt as u32, 1, 1),
                    256,
                    0,
                    &[
                        s.qkv.p(),
                        Arg::I(qkv_n as i32),
                        s.pos.p(),
                        self.rope.p(),
                        Arg::I(c.n_heads as i32),
                        Arg::I(c.n_kv_heads as i32),
                        Arg::I(c.head_dim as i32),
                        Arg::I(cache.cap as i32),
                        kc,
                        vc,
                        s.qr.p(),
                    ],
                    how,
                )?;
            }
            g.set_tag("attention");
            self.attention(s, cache, li, nt, n_split, how == Launch::Pdl)?;
            self.body_layer_rest(s, l, nt, gate)?;
        }
        g.set_tag("");
        Ok(())
    }

    /// A layer after its attention: the o projection and the feed-forward.
    fn body_layer_rest(&self, s: &Scratch, l: &GpuLayer, nt: usize, gate: i32) -> Result<()> {
        let c = &self.config;
        let g = &self.gpu;
        let (h, q, f) = (c.hidden, c.q_dim(), c.ffn);
        {
            // Without sub-norms the attention output is only quantised.
            g.set_tag("norm_quant");
            self.norm_quant(s, s.attn.p(), q, q, 0, l.attn_sub.as_ref(), &l.o, nt)?;
            g.set_tag("o");
            self.mm(s, &l.o, nt, Epilogue::Add, &s.x, h)?;
            g.set_tag("norm_quant");
            self.norm_quant(s, s.x.p(), h, h, 0, Some(&l.ffn_norm), &l.gu, nt)?;
            g.set_tag("gate_up");
            // The TMA GEMM over paired tiles writes act(gate) * up itself
            // (half the bytes out and back in); else [gate | up] rows.
            if matches!(self.kernel_for(nt, &l.gu), MatKernel::MmaWith(v) if v.tiled) && l.gu.paired {
                let ep = if gate == 1 {
                    Epilogue::GatedRelu2
                } else {
                    Epilogue::GatedSilu
                };
                self.mm(s, &l.gu, nt, ep, &s.gu, f)?;
                g.set_tag("norm_quant");
                self.norm_quant(s, s.gu.p(), f, f, 0, l.ffn_sub.as_ref(), &l.down, nt)?;
            } else {
                self.mm(s, &l.gu, nt, Epilogue::Store, &s.gu, 2 * f)?;
                g.set_tag("norm_quant");
                self.norm_quant(s, s.gu.p(), f, 2 * f, gate, l.ffn_sub.as_ref(), &l.down, nt)?;
            }
            g.set_tag("down");
            self.mm(s, &l.down, nt, Epilogue::Add, &s.x, h)?;
        }
        Ok(())
    }

    /// The merge of `n_ks` key splits' partials (`s.part`) into `s.attn`:
    /// `flash_tc_merge`, or `flash_tcx_merge` given its query-tile rows `bq`.
    pub(super) fn flash_merge(&self, s: &Scratch, nt: usize, n_ks: usize, bq: Option<usize>, pdl: bool) -> Result<()> {
        let c = &self.config;
        let mut args = vec![
            s.part.p(),
            s.pos.p(),
            Arg::I(nt as i32),
            Arg::I(c.n_heads as i32),
            Arg::I(c.head_dim as i32),
            Arg::I(n_ks as i32),
            s.attn.p(),
            Arg::I(c.q_dim() as i32),
        ];
        let name = match bq {
            Some(bq) => {
                args.push(Arg::I(bq as i32));
                "flash_tcx_merge"
            }
            None => "flash_tc_merge",
        };
        self.gpu
            .launch_ex(name, (nt as u32, c.n_heads as u32, 1), 128, &args, pdl)
    }

    /// Attention of `nt` tokens over layer `li`'s cache, into `s.attn`:
    /// flash.cu for prefill, else split-K.
    pub(super) fn attention(
        &self,
        s: &Scratch,
        cache: &CudaCache,
        li: usize,
        nt: usize,
        n_split: usize,
        pdl: bool,
    ) -> Result<()> {
        let c = &self.config;
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        let (kc, vc) = cache.layer_kv(li);
        // The layer's cache rows and the call's first position and length,
        // as the prefill attention kernels take them.
        let cache_call = [kc, vc, s.pos.p(), Arg::I(nt as i32)];
        if let (Some(t), Some(kvs)) = (self.tcx_for(nt), s.kvs.as_ref()) {
            let scap = flash_tcx_scap(c.max_ctx);
            let gx = (cache.cap * c.head_dim / 4).div_ceil(2048).clamp(1, 64) as u32;
            let mut split = cache_call.to_vec();
            split.extend([
                Arg::I(c.n_kv_heads as i32),
                Arg::I(c.head_dim as i32),
                Arg::I(cache.cap as i32),
                Arg::I(scap as i32),
                kvs.p(),
            ]);
            self.gpu
                .launch_ex(t.kv_kernel(), (gx, 2 * c.n_kv_heads as u32, 1), 256, &split, pdl)?;
            let n_ks = self.tcx_splits(nt, t);
            let bq = t.bq();
            let blocks = nt.div_ceil(bq) * n_ks * (c.n_heads / t.hpb);
            let how = if pdl { Launch::Pdl } else { Launch::Plain };
            self.gpu.launch_smem(
                t.name,
                (blocks as u32, 1, 1),
                t.threads(),
                t.smem() as u32,
                &[
                    s.qr.p(),
                    Arg::I(c.q_dim() as i32),
                    kvs.p(),
                    s.pos.p(),
                    Arg::I(nt as i32),
                    Arg::I(c.n_heads as i32),
                    Arg::I(c.n_kv_heads as i32),
                    Arg::I(scap as i32),
                    Arg::F(scale),
                    s.attn.p(),
                    Arg::I(c.q_dim() as i32),
                    Arg::I(n_ks as i32),
                    s.part.p(),
                ],
                how,
            )?;
            if n_ks > 1 {
                self.flash_merge(s, nt, n_ks, Some(bq), pdl)?;
            }
            return Ok(());
        }
        if let Some((name, threads, smem)) = self.flash_kernel().filter(|_| nt > 1) {
            let tc = name.starts_with("flash_tc");
            let n_ks = if tc { self.key_splits(nt) } else { 1 };
            let how = if pdl { Launch::Pdl } else { Launch::Plain };
            let mut args = vec![s.qr.p(), Arg::I(c.q_dim() as i32)];
            args.extend(cache_call);
            args.extend([
                Arg::I(c.n_heads as i32),
                Arg::I(c.n_kv_heads as i32),
                Arg::I(c.head_dim as i32),
                Arg::I(cache.cap as i32),
                Arg::F(scale),
                s.attn.p(),
                Arg::I(c.q_dim() as i32),
            ]);
            if tc {
                args.extend([Arg::I(n_ks as i32), s.part.p()]);
            }
            let grid = ((nt.div_ceil(FA_TILE) * n_ks) as u32, c.n_heads as u32, 1);
            self.gpu.launch_smem(name, grid, threads, smem as u32, &args, how)?;
            if n_ks > 1 {
                self.flash_merge(s, nt, n_ks, None, pdl)?;
            }
            return Ok(());
        }
        self.gpu.launch_ex(
            self.kv.attn_partial(),
            (n_split as u32, c.n_heads as u32, nt as u32),
            128,
            &[
                s.qr.p(),
                Arg::I(c.q_dim() as i32),
                kc,
                vc,
                s.pos.p(),
                Arg::I(c.n_heads as i32),
                Arg::I(c.n_kv_heads as i32),
                Arg::I(c.head_dim as i32),
                Arg::I(cache.cap as i32),
                Arg::F(scale),
                Arg::I(n_split as i32),
                s.part.p(),
                s.cnt.p(),
                s.attn.p(),
                Arg::I(c.q_dim() as i32),
            ],
            pdl,
        )
    }
}
