//! [`CudaBackend`]: weights uploaded in the GPU layout, an f16 KV cache per
//! sequence, and the BitNet / Llama-style block forward as a chain of
//! kernels on one stream. A one-token decode step is captured once per cache
//! as a CUDA graph (kernels read the position from device memory, so the
//! graph stays valid as the sequence grows) and replayed every step.

use std::any::Any;
use std::sync::{Arc, Mutex};

use cudarc::driver::{result, sys};

use super::{launch_matmul, Arg, DevBuf, Epilogue, Gpu, GpuMatrix, MatKernel};
use crate::backends::{Backend, KvCache, Output};
use crate::error::{Error, Result};
use crate::model::{Activation, DenseMatrix, DenseType, Model, ModelConfig};

/// Keys per attention split (ATT_CHUNK in ops.cu).
const ATT_CHUNK: usize = 64;
/// Tokens per prefill chunk at most.
const MAX_CHUNK: usize = 512;
/// Tokens per lm_head launch (the kernel's accumulator count).
const LM_T: usize = 8;

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
    tok: DevBuf,
    pos: DevBuf,
    x: DevBuf,
    q8: DevBuf,
    sx: DevBuf,
    xsum: DevBuf,
    qkv: DevBuf,
    attn: DevBuf,
    gu: DevBuf,
    part: DevBuf,
    normed: DevBuf,
    logits: DevBuf,
    argmax: DevBuf,
}

pub struct CudaBackend {
    gpu: Arc<Gpu>,
    config: ModelConfig,
    layers: Vec<GpuLayer>,
    embed: DevBuf,
    lm_head: Option<DevBuf>,
    final_norm: DevBuf,
    rope: DevBuf,
    max_splits: usize,
    scratch: Mutex<Scratch>,
    weight_bytes: usize,
    /// Use the tensor-core GEMM from this many tokens on (else the GEMV).
    mma_min_tokens: std::sync::atomic::AtomicUsize,
}

/// A captured decode step.
struct Graph {
    exec: sys::CUgraphExec,
    graph: sys::CUgraph,
}

impl Drop for Graph {
    fn drop(&mut self) {
        unsafe {
            let _ = result::graph::exec_destroy(self.exec);
            let _ = result::graph::destroy(self.graph);
        }
    }
}

/// f16 KV cache `[layer][kv_head][capacity][head_dim]` for K and for V.
pub struct CudaCache {
    k: DevBuf,
    v: DevBuf,
    cap: usize,
    len: usize,
    layer_elems: usize,
    graph: Option<Graph>,
    /// Identity of the backend that captured `graph`.
    owner: usize,
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
    pub fn new(model: &Model, device: usize) -> Result<Self> {
        model.validate()?;
        let c = model.config.clone();
        Self::check_shapes(&c)?;
        let gpu = Gpu::new(device)?;
        let up = |v: &[f32]| gpu.upload(v);
        let mut layers = Vec::with_capacity(c.n_layers);
        for l in &model.layers {
            layers.push(GpuLayer {
                attn_norm: up(&l.attn_norm)?,
                qkv: GpuMatrix::upload(&gpu, &[&l.wq, &l.wk, &l.wv])?,
                o: GpuMatrix::upload(&gpu, &[&l.wo])?,
                attn_sub: l.attn_sub_norm.as_deref().map(up).transpose()?,
                ffn_norm: up(&l.ffn_norm)?,
                gu: GpuMatrix::upload(&gpu, &[&l.w_gate, &l.w_up])?,
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
        // Keep the split-K partials under ~256 MiB.
        let per_tok = checked(&[c.n_heads, max_splits, c.head_dim + 2, 4], "attention partials")?;
        let chunk = (256usize << 20).checked_div(per_tok).unwrap_or(1).clamp(1, MAX_CHUNK);
        let scratch = Scratch::new(&gpu, &c, chunk, max_splits, &layers)?;
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
            .map(|l| l.qkv.bytes() + l.o.bytes() + l.gu.bytes() + l.down.bytes())
            .sum::<usize>()
            + norms
            + embed.bytes
            + lm_head.as_ref().map_or(0, |b| b.bytes)
            + final_norm.bytes;
        Ok(Self {
            gpu,
            config: c,
            layers,
            embed,
            lm_head,
            final_norm,
            rope,
            max_splits,
            scratch: Mutex::new(scratch),
            weight_bytes,
            mma_min_tokens: 17.into(),
        })
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

    /// Token count from which prefill uses the tensor-core GEMM (default 17).
    pub fn set_mma_min_tokens(&self, n: usize) {
        self.mma_min_tokens
            .store(n.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Downcast a cache made by `new_cache`.
    fn cache_of<'a>(&self, cache: &'a mut dyn KvCache) -> Result<&'a mut CudaCache> {
        cache
            .as_any_mut()
            .downcast_mut::<CudaCache>()
            .ok_or_else(|| Error::input("CUDA backend was given a cache made by another backend"))
    }

    fn kernel_for(&self, nt: usize) -> MatKernel {
        if nt >= self.mma_min_tokens.load(std::sync::atomic::Ordering::Relaxed) && self.gpu.has_mma() {
            MatKernel::Mma
        } else {
            MatKernel::Gemv
        }
    }

    /// `out = W x` (or `+=`), splitting into 16-token GEMV groups when needed.
    #[allow(clippy::too_many_arguments)]
    fn mm(&self, s: &Scratch, m: &GpuMatrix, nt: usize, ep: Epilogue, out: &DevBuf, stride: usize) -> Result<()> {
        let kernel = self.kernel_for(nt);
        let group = if kernel == MatKernel::Gemv { 16 } else { nt };
        for t0 in (0..nt).step_by(group) {
            let n = (nt - t0).min(group);
            launch_matmul(
                &self.gpu,
                m,
                kernel,
                s.q8.at(t0 * m.kpad()),
                n,
                s.sx.at(4 * t0),
                s.xsum.at(4 * t0),
                ep,
                out.at(4 * t0 * stride),
                stride,
            )?;
        }
        Ok(())
    }

    /// RMSNorm (optional) + quantisation of `nt` rows of `input` into q8/sx/xsum.
    #[allow(clippy::too_many_arguments)]
    fn norm_quant(
        &self,
        s: &Scratch,
        input: Arg,
        n: usize,
        stride: usize,
        gate: i32,
        w: Option<&DevBuf>,
        kpad: usize,
        nt: usize,
    ) -> Result<()> {
        let do_norm = w.is_some() as i32;
        self.gpu.launch(
            "norm_quant",
            (nt as u32, 1, 1),
            1024,
            &[
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
                Arg::P(0),
                Arg::I(0),
            ],
        )
    }

    /// The transformer body for `nt` tokens whose ids are in `s.tok` at
    /// position `s.pos` (device); `n_split` attention splits are launched.
    fn body(&self, s: &Scratch, cache: &CudaCache, nt: usize, n_split: usize) -> Result<()> {
        let c = &self.config;
        let g = &self.gpu;
        let (h, q, kv, f) = (c.hidden, c.q_dim(), c.kv_dim(), c.ffn);
        let qkv_n = q + 2 * kv;
        g.launch(
            "embed_f16",
            (nt as u32, 1, 1),
            256,
            &[s.tok.p(), self.embed.p(), Arg::I(h as i32), s.x.p()],
        )?;
        let gate = match c.activation {
            Activation::Relu2 => 1,
            Activation::Silu => 2,
        };
        for (li, l) in self.layers.iter().enumerate() {
            let kc = cache.k.at(2 * li * cache.layer_elems);
            let vc = cache.v.at(2 * li * cache.layer_elems);
            self.norm_quant(s, s.x.p(), h, h, 0, Some(&l.attn_norm), l.qkv.kpad(), nt)?;
            self.mm(s, &l.qkv, nt, Epilogue::Store, &s.qkv, qkv_n)?;
            g.launch(
                "rope_kv",
                (nt as u32, 1, 1),
                256,
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
                ],
            )?;
            let scale = 1.0 / (c.head_dim as f32).sqrt();
            g.launch(
                "attn_partial",
                (n_split as u32, c.n_heads as u32, nt as u32),
                128,
                &[
                    s.qkv.p(),
                    Arg::I(qkv_n as i32),
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
                ],
            )?;
            g.launch(
                "attn_combine",
                (c.n_heads as u32, nt as u32, 1),
                128,
                &[
                    s.part.p(),
                    s.pos.p(),
                    Arg::I(c.n_heads as i32),
                    Arg::I(c.head_dim as i32),
                    Arg::I(n_split as i32),
                    s.attn.p(),
                    Arg::I(q as i32),
                ],
            )?;
            // Without sub-norms the attention output is only quantised.
            self.norm_quant(s, s.attn.p(), q, q, 0, l.attn_sub.as_ref(), l.o.kpad(), nt)?;
            self.mm(s, &l.o, nt, Epilogue::Add, &s.x, h)?;
            self.norm_quant(s, s.x.p(), h, h, 0, Some(&l.ffn_norm), l.gu.kpad(), nt)?;
            self.mm(s, &l.gu, nt, Epilogue::Store, &s.gu, 2 * f)?;
            self.norm_quant(s, s.gu.p(), f, 2 * f, gate, l.ffn_sub.as_ref(), l.down.kpad(), nt)?;
            self.mm(s, &l.down, nt, Epilogue::Add, &s.x, h)?;
        }
        Ok(())
    }

    /// Final norm of rows `t0..t0+n` of x into `normed`, then logits of up to
    /// LM_T of them into `logits`.
    fn head(&self, s: &Scratch, t0: usize, n: usize, logits: bool) -> Result<()> {
        let c = &self.config;
        let h = c.hidden;
        self.gpu.launch(
            "norm_quant",
            (n as u32, 1, 1),
            1024,
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
            ],
        )?;
        if !logits {
            return Ok(());
        }
        debug_assert!(n <= LM_T);
        let e = self.lm_head.as_ref().unwrap_or(&self.embed);
        self.gpu.launch(
            "lm_head_f16",
            (c.vocab.div_ceil(8) as u32, 1, 1),
            256,
            &[
                e.p(),
                Arg::I(c.vocab as i32),
                Arg::I(h as i32),
                s.normed.p(),
                Arg::I(n as i32),
                s.logits.p(),
            ],
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

    /// One decode step through the cache's CUDA graph (captured on first
    /// use). Leaves the logits in `s.logits` and the greedy token in `s.argmax`.
    fn decode_graph(&self, s: &Scratch, cache: &mut CudaCache, token: u32) -> Result<()> {
        let me = self as *const Self as usize;
        if cache.owner != me {
            cache.graph = None;
        }
        let tok = [token as i32];
        let pos = [cache.len as i32];
        s.tok.write_async(&tok)?;
        s.pos.write_async(&pos)?;
        if cache.graph.is_none() {
            cache.graph = Some(self.capture(s, cache)?);
            cache.owner = me;
        }
        let exec = cache.graph.as_ref().expect("just captured").exec;
        super::drv(unsafe { result::graph::launch(exec, self.gpu.stream) }, "cuGraphLaunch")?;
        self.gpu.sync()
    }

    fn capture(&self, s: &Scratch, cache: &CudaCache) -> Result<Graph> {
        let g = &self.gpu;
        let splits = cache.cap.div_ceil(ATT_CHUNK);
        super::drv(
            unsafe {
                result::stream::begin_capture(g.stream, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            },
            "cuStreamBeginCapture",
        )?;
        let work = self.decode_kernels(s, cache, splits);
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

    fn decode_kernels(&self, s: &Scratch, cache: &CudaCache, splits: usize) -> Result<()> {
        self.body(s, cache, 1, splits)?;
        self.head(s, 0, 1, true)?;
        self.gpu.launch(
            "argmax_f32",
            (1, 1, 1),
            1024,
            &[s.logits.p(), Arg::I(self.config.vocab as i32), s.argmax.p()],
        )
    }

    /// Run `tokens` and return the requested output (the Backend contract).
    fn run(&self, cache: &mut CudaCache, tokens: &[u32], output: Output) -> Result<Vec<f32>> {
        self.check_call(cache, tokens)?;
        let s = self.scratch.lock().map_err(|_| berr("scratch lock poisoned"))?;
        self.gpu.bind()?;
        let c = &self.config;
        if tokens.len() == 1 && output == Output::LastLogits {
            self.decode_graph(&s, cache, tokens[0])?;
            cache.len += 1;
            return s.logits.read::<f32>(c.vocab);
        }
        let mut out = Vec::new();
        for (ci, chunk) in tokens.chunks(s.chunk).enumerate() {
            let nt = chunk.len();
            let tok: Vec<i32> = chunk.iter().map(|&t| t as i32).collect();
            let pos = [cache.len as i32];
            s.tok.write_async(&tok)?;
            s.pos.write_async(&pos)?;
            let splits = (cache.len + nt).div_ceil(ATT_CHUNK);
            self.body(&s, cache, nt, splits)?;
            let last_chunk = (ci + 1) * s.chunk >= tokens.len();
            match output {
                Output::LastLogits if last_chunk => {
                    self.head(&s, nt - 1, 1, true)?;
                    out = s.logits.read::<f32>(c.vocab)?;
                }
                Output::LastLogits => self.gpu.sync()?,
                Output::AllLogits => {
                    for t0 in (0..nt).step_by(LM_T) {
                        let n = (nt - t0).min(LM_T);
                        self.head(&s, t0, n, true)?;
                        out.extend(s.logits.read::<f32>(n * c.vocab)?);
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

    /// Greedy decode of `n` tokens after `first` through the graph; the next
    /// token is fed back on the device. Returns the generated ids.
    pub fn generate_greedy(&self, cache: &mut dyn KvCache, first: u32, n: usize) -> Result<Vec<u32>> {
        let cache = self.cache_of(cache)?;
        let s = self.scratch.lock().map_err(|_| berr("scratch lock poisoned"))?;
        self.gpu.bind()?;
        let mut tok = first;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            self.check_call(cache, &[tok])?;
            self.decode_graph(&s, cache, tok)?;
            cache.len += 1;
            tok = s.argmax.read::<i32>(1)?[0] as u32;
            out.push(tok);
        }
        Ok(out)
    }

    /// For benchmarks: run the decode graph `n` times back to back (same
    /// token, advancing position) and return GPU milliseconds per step.
    pub(crate) fn time_decode(&self, cache: &mut CudaCache, n: usize) -> Result<f32> {
        let s = self.scratch.lock().map_err(|_| berr("scratch lock poisoned"))?;
        self.gpu.bind()?;
        if cache.len + n + 1 > cache.cap {
            return Err(Error::input("bench: cache too small"));
        }
        self.decode_graph(&s, cache, 1)?; // capture + warm
        cache.len += 1;
        let exec = cache.graph.as_ref().expect("captured").exec;
        let ev = Events::new()?;
        let positions: Vec<[i32; 1]> = (0..n).map(|i| [(cache.len + i) as i32]).collect();
        ev.record_start(self.gpu.stream)?;
        for p in &positions {
            s.pos.write_async(p)?;
            super::drv(unsafe { result::graph::launch(exec, self.gpu.stream) }, "cuGraphLaunch")?;
        }
        let ms = ev.record_stop_ms(self.gpu.stream)?;
        cache.len += n;
        Ok(ms / n as f32)
    }

    /// For benchmarks: GPU milliseconds of one un-graphed forward of `nt`
    /// tokens at the cache's position (the cache is not advanced).
    pub(crate) fn time_forward(&self, cache: &mut CudaCache, nt: usize) -> Result<f32> {
        let s = self.scratch.lock().map_err(|_| berr("scratch lock poisoned"))?;
        self.gpu.bind()?;
        if cache.len + nt > cache.cap {
            return Err(Error::input("bench: cache too small"));
        }
        let tok: Vec<i32> = (0..nt).map(|i| (i % self.config.vocab) as i32).collect();
        let ev = Events::new()?;
        let mut done = 0;
        ev.record_start(self.gpu.stream)?;
        while done < nt {
            let n = (nt - done).min(s.chunk);
            let pos = [(cache.len + done) as i32];
            s.tok.write_async(&tok[done..done + n])?;
            s.pos.write_async(&pos)?;
            self.body(&s, cache, n, (cache.len + done + n).div_ceil(ATT_CHUNK))?;
            done += n;
        }
        self.head(&s, nt - 1 - (nt - 1) / s.chunk * s.chunk, 1, true)?;
        ev.record_stop_ms(self.gpu.stream)
    }

    pub(crate) fn cuda_cache(&self, capacity: usize) -> Result<CudaCache> {
        let c = &self.config;
        if capacity == 0 || capacity > c.max_ctx {
            return Err(Error::input(format!(
                "cache capacity {capacity} outside 1..={}",
                c.max_ctx
            )));
        }
        let layer_elems = checked(&[c.n_kv_heads, capacity, c.head_dim], "KV cache")?;
        let bytes = checked(&[layer_elems, c.n_layers, 2], "KV cache")?;
        let k = self.gpu.alloc(bytes)?;
        let v = self.gpu.alloc(bytes)?;
        Ok(CudaCache {
            k,
            v,
            cap: capacity,
            len: 0,
            layer_elems,
            graph: None,
            owner: 0,
        })
    }

    pub fn max_splits(&self) -> usize {
        self.max_splits
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
    fn new(gpu: &Arc<Gpu>, c: &ModelConfig, chunk: usize, splits: usize, layers: &[GpuLayer]) -> Result<Self> {
        let kmax = layers
            .iter()
            .flat_map(|l| [l.qkv.kpad(), l.o.kpad(), l.gu.kpad(), l.down.kpad()])
            .max()
            .unwrap_or(64);
        let f32s = |n: &[usize]| -> Result<DevBuf> { gpu.alloc(checked(n, "scratch")? * 4) };
        Ok(Self {
            chunk,
            tok: f32s(&[chunk])?,
            pos: f32s(&[1])?,
            x: f32s(&[chunk, c.hidden])?,
            q8: gpu.alloc(checked(&[chunk, kmax], "scratch")?)?,
            sx: f32s(&[chunk])?,
            xsum: f32s(&[chunk])?,
            qkv: f32s(&[chunk, c.q_dim() + 2 * c.kv_dim()])?,
            attn: f32s(&[chunk, c.q_dim()])?,
            gu: f32s(&[chunk, 2 * c.ffn])?,
            part: f32s(&[chunk, c.n_heads, splits, c.head_dim + 2])?,
            normed: f32s(&[chunk, c.hidden])?,
            logits: f32s(&[LM_T, c.vocab])?,
            argmax: f32s(&[1])?,
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
        let _g = self.scratch.lock().map_err(|_| berr("scratch lock poisoned"))?;
        self.gpu.bind()?;
        Ok(Box::new(self.cuda_cache(capacity)?))
    }
    fn forward(&self, cache: &mut dyn KvCache, tokens: &[u32], output: Output) -> Result<Vec<f32>> {
        let cache = self.cache_of(cache)?;
        self.run(cache, tokens, output)
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
    /// Benchmarks fill a cache by timing a forward without advancing it.
    pub(crate) fn set_len_for_bench(&mut self, n: usize) {
        self.len = n.min(self.cap);
    }
}

/// KV moves between paths: the device cache is f16 `[layer][kv_head][cap][head_dim]`,
/// the snapshot f32 `[layer][pos][kv_head * head_dim]` (the CPU layout).
impl CudaBackend {
    pub fn export_cuda_kv(&self, cache: &mut dyn KvCache) -> Result<crate::backends::KvSnapshot> {
        let cache = self.cache_of(cache)?;
        let c = &self.config;
        let _g = self.scratch.lock().map_err(|_| berr("scratch lock poisoned"))?;
        self.gpu.bind()?;
        let total = checked(&[cache.layer_elems, c.n_layers], "KV export")?;
        let (hd, kvd, cap, len) = (c.head_dim, c.kv_dim(), cache.cap, cache.len);
        let to_host = |buf: &DevBuf| -> Result<Vec<Vec<f32>>> {
            let raw: Vec<u16> = buf.read(total)?;
            Ok((0..c.n_layers)
                .map(|li| {
                    let base = li * cache.layer_elems;
                    let mut out = vec![0f32; len * kvd];
                    for p in 0..len {
                        for h in 0..c.n_kv_heads {
                            let src = base + (h * cap + p) * hd;
                            for d in 0..hd {
                                out[p * kvd + h * hd + d] = half::f16::from_bits(raw[src + d]).to_f32();
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
        let _g = self.scratch.lock().map_err(|_| berr("scratch lock poisoned"))?;
        self.gpu.bind()?;
        let mut cache = self.cuda_cache(capacity.min(c.max_ctx))?;
        let total = checked(&[cache.layer_elems, c.n_layers], "KV import")?;
        let (hd, kvd, cap) = (c.head_dim, c.kv_dim(), cache.cap);
        let to_dev = |layers: &[Vec<f32>]| -> Vec<u16> {
            let mut raw = vec![0u16; total];
            for (li, l) in layers.iter().enumerate() {
                let base = li * cache.layer_elems;
                for p in 0..snap.len {
                    for h in 0..c.n_kv_heads {
                        let dst = base + (h * cap + p) * hd;
                        for d in 0..hd {
                            raw[dst + d] = half::f16::from_f32(l[p * kvd + h * hd + d]).to_bits();
                        }
                    }
                }
            }
            raw
        };
        cache.k.write(&to_dev(&snap.k))?;
        cache.v.write(&to_dev(&snap.v))?;
        cache.len = snap.len;
        Ok(cache)
    }
}
