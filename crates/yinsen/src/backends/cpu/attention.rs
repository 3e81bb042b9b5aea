//! Causal GQA attention on the CPU.
//!
//! Prefill uses a tiled, flash-style loop: a task takes one KV head and a
//! block of query tokens (all query heads of that group), walks the keys in
//! blocks of 64 with an online softmax, and does each block as two small
//! GEMMs: `S = Q . K^T` and `O += P . V`, with a vector exp2.
//!
//! The AVX-512 kernels (`x86`) put the task's query rows (up to 64) in the
//! lanes: `S^T = K . Q^T` with `Q^T` built once per task and the keys read
//! as they lie in the cache, so the softmax is lane-wise and nothing is
//! transposed per key block. The portable loops (scalar, AVX2) transpose K
//! once per call (`[kv head][dim][position]`) so the score GEMM broadcasts
//! query elements against 64 contiguous keys.
//! Tasks run longest-first (late query blocks see more keys) from a shared
//! counter, so threads finish together.

use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;

use super::ops;
use super::spin_pool::Par;

/// Shapes for one attention call.
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// What one attention call reads: the queries `q` (`[n][n_heads *
/// head_dim]`, token t at position `p0 + t`) and the caches `kc` / `vc`
/// (`[p0 + n][n_kv_heads * head_dim]`, or more rows).
#[derive(Clone, Copy)]
pub struct AttnInput<'a> {
    pub shape: &'a AttnShape,
    pub q: &'a [f32],
    pub kc: &'a [f32],
    pub vc: &'a [f32],
    pub p0: usize,
}

impl<'a> AttnInput<'a> {
    pub fn new(shape: &'a AttnShape, q: &'a [f32], kc: &'a [f32], vc: &'a [f32], p0: usize) -> Self {
        AttnInput { shape, q, kc, vc, p0 }
    }

    /// (shape, q, kc, vc, p0).
    pub fn parts(self) -> (&'a AttnShape, &'a [f32], &'a [f32], &'a [f32], usize) {
        (self.shape, self.q, self.kc, self.vc, self.p0)
    }
}

const Q_BLOCK: usize = 16;
/// Keys per block; also the width of a score row (four 16-lane vectors).
const K_BLOCK: usize = 64;

/// Instruction set of the block kernels (chosen at run time).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    /// The portable loops compiled with AVX2 + FMA enabled.
    Avx2,
    /// Hand-written AVX-512F kernels (head_dim a multiple of 64).
    Avx512,
}

impl Isa {
    /// Every kernel set usable here for `head_dim`, fastest first.
    pub fn available(head_dim: usize) -> Vec<Isa> {
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") && head_dim.is_multiple_of(64) {
                v.push(Isa::Avx512);
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                v.push(Isa::Avx2);
            }
        }
        let _ = head_dim;
        v.push(Isa::Scalar);
        v
    }
}

/// `q`: `[n][n_heads * hd]` (token t at position p0 + t); `kc`/`vc`:
/// `[p0 + n][n_kv_heads * hd]`. Returns `[n][n_heads * hd]`.
pub fn causal_attention(s: &AttnShape, q: &[f32], kc: &[f32], vc: &[f32], p0: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n * s.n_heads * s.head_dim];
    let mut sc = AttnScratch::default();
    let input = AttnInput::new(s, q, kc, vc, p0);
    causal_attention_into(Isa::available(s.head_dim)[0], input, n, &mut out, &mut sc, Par::Rayon);
    out
}

/// Output pointer shared by the tasks; each writes a disjoint set of rows.
struct OutPtr(*mut f32);
unsafe impl Sync for OutPtr {}

/// Buffers of a prefill attention call that a caller keeps across layers, so
/// their pages are faulted in once per forward instead of once per layer.
#[derive(Default)]
pub struct AttnScratch {
    kt: Vec<f32>,
}

impl AttnScratch {
    /// `K^T` of every kv head, `[kv head][dim][stride]`: key p's dim d at
    /// `d * stride + p`, zeros from `tot` to the end of its key block. Tasks
    /// of (kv head, key block) so every thread helps (5 kv heads < 16 cores);
    /// a task's 64 keys x 128 dims (32 KiB) stay in L1 while it transposes.
    fn transpose_keys(&mut self, kc: &[f32], tot: usize, n_kv: usize, hd: usize, stride: usize, par: Par) -> &[f32] {
        let kvd = n_kv * hd;
        let len = n_kv * hd * stride;
        if self.kt.len() < len {
            self.kt.resize(len, 0.0);
        }
        let n_kb = tot.div_ceil(K_BLOCK);
        let op = OutPtr(self.kt.as_mut_ptr());
        par.for_each_index(n_kv * n_kb, |i| {
            let op = &op;
            let (kvh, kb) = (i / n_kb, i % n_kb);
            let base = kvh * hd * stride;
            for p in kb * K_BLOCK..(kb + 1) * K_BLOCK {
                let src = (p < tot).then(|| &kc[p * kvd + kvh * hd..p * kvd + (kvh + 1) * hd]);
                for d in 0..hd {
                    // SAFETY: (kvh, d, p) is unique to this task; p < stride.
                    unsafe { *op.0.add(base + d * stride + p) = src.map_or(0.0, |r| r[d]) };
                }
            }
        });
        &self.kt[..len]
    }
}

/// [`causal_attention`] with a given kernel set (tests compare them) into
/// `out` (`[n][n_heads * hd]`, every element written), its parallel regions
/// on `par`.
pub fn causal_attention_into(
    isa: Isa,
    input: AttnInput,
    n: usize,
    out: &mut [f32],
    scratch: &mut AttnScratch,
    par: Par,
) {
    let (s, q, kc, vc, p0) = input.parts();
    let (hd, qd, kvd) = (s.head_dim, s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim);
    assert!(isa != Isa::Avx512 || hd.is_multiple_of(64));
    let group = s.n_heads / s.n_kv_heads;
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && group <= x86::LANES {
        return x86::causal(s, q, kc, vc, p0, n, out, par);
    }
    // (Groups of more than 64 query heads per kv head, no real model, take
    // the portable loops below.)
    let tot = p0 + n;
    assert!(q.len() >= n * qd && kc.len() >= tot * kvd && vc.len() >= tot * kvd);
    // K^T per kv head, positions padded with zeros to whole key blocks so
    // every block load is in bounds (padded scores are masked off). One extra
    // cache line per row: a power-of-two pitch (2 KiB at 512 tokens) would put
    // the 128 rows of a key block into 2 L1 sets.
    let stride = tot.next_multiple_of(K_BLOCK) + 16;
    let kt = scratch.transpose_keys(kc, tot, s.n_kv_heads, hd, stride, par);
    // Scores in base 2: exp(x * scale) = exp2(x * scale * log2 e).
    let qscale = std::f32::consts::LOG2_E / (hd as f32).sqrt();
    let n_qb = n.div_ceil(Q_BLOCK);
    let n_tasks = s.n_kv_heads * n_qb;
    let next = AtomicUsize::new(0);
    assert_eq!(out.len(), n * qd);
    let op = OutPtr(out.as_mut_ptr());
    let rows_max = Q_BLOCK * group;
    par.broadcast_claim(|| {
        let op = &op;
        let mut sc = Scratch {
            qs: vec![0f32; rows_max * hd],
            acc: vec![0f32; rows_max * hd],
            s: vec![0f32; rows_max * K_BLOCK],
            m: vec![0f32; rows_max],
            l: vec![0f32; rows_max],
            corr: vec![0f32; rows_max],
            vis: vec![0usize; rows_max],
        };
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n_tasks {
                break;
            }
            // Longest first: the last query block of every head, then the one before.
            let (qb, kvh) = (n_qb - 1 - i / s.n_kv_heads, i % s.n_kv_heads);
            let (t0, t1) = (qb * Q_BLOCK, ((qb + 1) * Q_BLOCK).min(n));
            let rows = (t1 - t0) * group;
            // Row r = (token t0 + r / group, head kvh * group + r % group).
            for r in 0..rows {
                let (t, h) = (t0 + r / group, kvh * group + r % group);
                let src = &q[t * qd + h * hd..t * qd + (h + 1) * hd];
                for (d, &v) in sc.qs[r * hd..(r + 1) * hd].iter_mut().zip(src) {
                    *d = v * qscale;
                }
            }
            let kh = &kt[kvh * hd * stride..(kvh + 1) * hd * stride];
            tile(
                isa,
                &mut sc,
                rows,
                group,
                hd,
                kh,
                stride,
                vc,
                kvd,
                kvh,
                p0 + t0,
                p0 + t1,
            );
            for r in 0..rows {
                let (t, h) = (t0 + r / group, kvh * group + r % group);
                // SAFETY: (t, h) is unique to this task's rows; `out` has n * qd elements.
                let dst = unsafe { std::slice::from_raw_parts_mut(op.0.add(t * qd + h * hd), hd) };
                let inv = 1.0 / sc.l[r];
                for (o, &a) in dst.iter_mut().zip(&sc.acc[r * hd..(r + 1) * hd]) {
                    *o = a * inv;
                }
            }
        }
    });
}

struct Scratch {
    /// Scaled queries `[rows][hd]`.
    qs: Vec<f32>,
    /// Unnormalised outputs `[rows][hd]`.
    acc: Vec<f32>,
    /// Scores, then probabilities, `[rows][K_BLOCK]`.
    s: Vec<f32>,
    /// Running max (base 2) and sum per row.
    m: Vec<f32>,
    l: Vec<f32>,
    /// Rescale factor of each row's accumulator for the current block.
    corr: Vec<f32>,
    /// Visible keys of each row in the current block.
    vis: Vec<usize>,
}

/// One (kv head, query block) tile: queries at positions `pa..pb`.
#[allow(clippy::too_many_arguments)]
fn tile(
    isa: Isa,
    sc: &mut Scratch,
    rows: usize,
    group: usize,
    hd: usize,
    kh: &[f32],
    stride: usize,
    vc: &[f32],
    kvd: usize,
    kvh: usize,
    pa: usize,
    pb: usize,
) {
    sc.acc[..rows * hd].fill(0.0);
    sc.m[..rows].fill(f32::NEG_INFINITY);
    sc.l[..rows].fill(0.0);
    let mut k0 = 0;
    while k0 < pb {
        let k1 = (k0 + K_BLOCK).min(pb);
        // Query at position p sees keys 0..=p; rows are in position order, so
        // the rows that see nothing of this block are a prefix.
        for r in 0..rows {
            sc.vis[r] = (pa + r / group + 1).min(k1).saturating_sub(k0);
        }
        let lo = sc.vis[..rows].iter().take_while(|&&v| v == 0).count();
        let nr = rows - lo;
        let kb = k1 - k0;
        let v = &vc[k0 * kvd + kvh * hd..];
        let blk = Block {
            rows: nr,
            hd,
            kb,
            qs: &sc.qs[lo * hd..],
            kt: &kh[k0..],
            stride,
            v,
            kvd,
        };
        let mut t = Tile {
            s: &mut sc.s[..nr * K_BLOCK],
            m: &mut sc.m[lo..rows],
            l: &mut sc.l[lo..rows],
            corr: &mut sc.corr[lo..rows],
            vis: &sc.vis[lo..rows],
            acc: &mut sc.acc[lo * hd..rows * hd],
        };
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: Avx2 is only chosen when avx2 and fma are detected.
            Isa::Avx2 => unsafe { block_avx2(&blk, &mut t) },
            _ => block_portable(&blk, &mut t),
        }
        k0 = k1;
    }
}

/// The running state of the rows of one block step: scores `s`
/// (`[rows][K_BLOCK]`), online-softmax max `m`, sum `l` and rescale `corr`
/// per row, visible keys per row, and the output accumulators `[rows][hd]`.
struct Tile<'a> {
    s: &'a mut [f32],
    m: &'a mut [f32],
    l: &'a mut [f32],
    corr: &'a mut [f32],
    vis: &'a [usize],
    acc: &'a mut [f32],
}

/// Inputs of one key block for the rows that see any of it.
struct Block<'a> {
    rows: usize,
    hd: usize,
    /// Keys in the block (<= K_BLOCK).
    kb: usize,
    /// `[rows][hd]`, scaled.
    qs: &'a [f32],
    /// `kt[d * stride + j]` = key j of the block, dim d (K_BLOCK readable).
    kt: &'a [f32],
    stride: usize,
    /// `v[j * kvd + d]` = value j of the block, dim d.
    v: &'a [f32],
    kvd: usize,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn block_avx2(b: &Block, t: &mut Tile) {
    block_portable(b, t)
}

/// The block in plain loops (vectorised by the compiler where it can).
#[inline(always)]
fn block_portable(b: &Block, t: &mut Tile) {
    let (s, m, l, corr, vis, acc) = (&mut *t.s, &mut *t.m, &mut *t.l, &mut *t.corr, t.vis, &mut *t.acc);
    let hd = b.hd;
    // S = Q . K^T over all K_BLOCK columns (padding and masked keys included).
    for r in 0..b.rows {
        let mut a = [0f32; K_BLOCK];
        for d in 0..hd {
            let qd = b.qs[r * hd + d];
            let k = &b.kt[d * b.stride..d * b.stride + K_BLOCK];
            for (x, &kj) in a.iter_mut().zip(k) {
                *x += qd * kj;
            }
        }
        s[r * K_BLOCK..(r + 1) * K_BLOCK].copy_from_slice(&a);
    }
    // Online softmax: P = exp2(S - new max) on visible keys, 0 elsewhere.
    for r in 0..b.rows {
        let row = &mut s[r * K_BLOCK..(r + 1) * K_BLOCK];
        let cnt = vis[r];
        let bm = row[..cnt].iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
        let nm = m[r].max(bm);
        let mut sum = 0.0;
        for (j, x) in row.iter_mut().enumerate() {
            let p = if j < cnt { exp2_portable(*x - nm) } else { 0.0 };
            *x = p;
            sum += p;
        }
        corr[r] = exp2_portable(m[r] - nm);
        l[r] = l[r] * corr[r] + sum;
        m[r] = nm;
    }
    // O = O * corr + P . V
    for r in 0..b.rows {
        let a = &mut acc[r * hd..(r + 1) * hd];
        let c = corr[r];
        a.iter_mut().for_each(|x| *x *= c);
        for j in 0..b.kb {
            let p = s[r * K_BLOCK + j];
            let vj = &b.v[j * b.kvd..j * b.kvd + hd];
            for (x, &y) in a.iter_mut().zip(vj) {
                *x += p * y;
            }
        }
    }
}

// exp2 on [-0.5, 0.5]: 2^f = 1 + f * P(f) (Cephes exp2f, rel. error < 2e-7).
const EXP2_P: [f32; 6] = [
    1.535_336_2e-4,
    1.339_887_4e-3,
    9.618_437e-3,
    5.550_332_5e-2,
    2.402_264_8e-1,
    6.931_472e-1,
];

/// `2^x` for `x <= 127` (no NaN input); results below 2^-126 (x < -126.5)
/// come out as 0. Integer ops only, so it vectorises.
#[inline(always)]
pub fn exp2_portable(x: f32) -> f32 {
    let x = x.clamp(-127.0, 127.0);
    let n = (x + 0.5).floor();
    let f = x - n;
    let mut p = EXP2_P[0];
    for &c in &EXP2_P[1..] {
        p = p * f + c;
    }
    let r = 1.0 + f * p;
    // 2^n from the mantissa of n + 127 + 2^23 (an exact integer there);
    // n = -127 gives the bit pattern 0 = 0.0.
    let e = (n + (127.0 + 8_388_608.0)).to_bits() - 0x4b00_0000;
    r * f32::from_bits(e << 23)
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::{AttnShape, OutPtr, Par, EXP2_P, K_BLOCK};

    /// Query rows of a task at most: one lane of four 16-lane vectors each.
    pub const LANES: usize = 64;

    /// A 64-byte aligned f32 buffer (vector loads never split a cache line).
    struct Aligned {
        buf: Vec<f32>,
        off: usize,
    }

    impl Aligned {
        fn new(len: usize) -> Self {
            let buf = vec![0f32; len + 16];
            let off = buf.as_ptr().align_offset(64).min(15);
            Aligned { buf, off }
        }
        fn ptr(&mut self) -> *mut f32 {
            self.buf[self.off..].as_mut_ptr()
        }
    }

    /// The AVX-512 prefill attention. A task is (kv head, block of query
    /// tokens); its rows (token, head of the group), at most [`LANES`], are
    /// the lanes of the vectors: `Q^T` (`[dim][lane]`, scaled, built once per
    /// task) times the keys as they lie in the cache (one broadcast per key
    /// and dim) gives `S^T` (`[key][lane]`), so the online softmax is
    /// lane-wise (no horizontal max or sum, no transpose of K), and
    /// `O += P V` broadcasts `P^T[key][row]` against value vectors into
    /// row-major accumulators.
    #[allow(clippy::too_many_arguments)]
    pub fn causal(s: &AttnShape, q: &[f32], kc: &[f32], vc: &[f32], p0: usize, n: usize, out: &mut [f32], par: Par) {
        let (hd, qd, kvd) = (s.head_dim, s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim);
        let group = s.n_heads / s.n_kv_heads;
        assert!(is_x86_feature_detected!("avx512f") && hd.is_multiple_of(64) && (1..=LANES).contains(&group));
        let tot = p0 + n;
        assert!(q.len() >= n * qd && kc.len() >= tot * kvd && vc.len() >= tot * kvd && out.len() == n * qd);
        // Scores in base 2: exp(x * scale) = exp2(x * scale * log2 e).
        let qscale = std::f32::consts::LOG2_E / (hd as f32).sqrt();
        let qt_tokens = LANES / group;
        let n_qb = n.div_ceil(qt_tokens);
        let n_tasks = s.n_kv_heads * n_qb;
        let next = AtomicUsize::new(0);
        let head_major = head_major();
        let op = OutPtr(out.as_mut_ptr());
        par.broadcast_claim(|| {
            let op = &op;
            let mut qt = Aligned::new(hd * LANES);
            let mut st = Aligned::new(K_BLOCK * LANES);
            let mut acc = Aligned::new(LANES * hd);
            let mut ml = Aligned::new(4 * LANES);
            // Longest first: the last query block of every head, then the one
            // before; or (`head_major`) each head's blocks longest first, so a
            // thread's next task mostly reads the same head's keys and values
            // (in its L2 while they fit). Gives the task's kv head and tokens.
            let task = |i: usize| {
                let (qb, kvh) = if head_major {
                    (n_qb - 1 - i % n_qb, i / n_qb)
                } else {
                    (n_qb - 1 - i / s.n_kv_heads, i % s.n_kv_heads)
                };
                (kvh, qb * qt_tokens, ((qb + 1) * qt_tokens).min(n))
            };
            let mut i = next.fetch_add(1, Ordering::Relaxed);
            while i < n_tasks {
                // Claim the next task now and ask for its query rows and
                // output lines (from L3 or memory) while this one runs.
                let after = next.fetch_add(1, Ordering::Relaxed);
                if after < n_tasks {
                    let (kvh, t0, t1) = task(after);
                    for tk in t0..t1 {
                        let off = tk * qd + kvh * group * hd;
                        for e in (0..group * hd).step_by(16) {
                            // SAFETY: prefetches of in-bounds addresses.
                            unsafe {
                                _mm_prefetch::<_MM_HINT_T1>(q.as_ptr().add(off + e).cast());
                                _mm_prefetch::<_MM_HINT_ET1>(op.0.add(off + e).cast_const().cast());
                            }
                        }
                    }
                }
                let (kvh, t0, t1) = task(i);
                let t = Task {
                    rows: (t1 - t0) * group,
                    group,
                    hd,
                    qd,
                    kvd,
                    pa: p0 + t0,
                    pb: p0 + t1,
                };
                // SAFETY: avx512f and the shapes are checked above; the task's
                // (token, head) rows of `out` are its alone.
                unsafe {
                    t.load_q(q.as_ptr().add(t0 * qd + kvh * group * hd), qscale, qt.ptr());
                    t.run(
                        kc.as_ptr().add(kvh * hd),
                        vc.as_ptr().add(kvh * hd),
                        qt.ptr(),
                        st.ptr(),
                        acc.ptr(),
                        ml.ptr(),
                    );
                    t.store(acc.ptr(), ml.ptr().add(LANES), op.0.add(t0 * qd + kvh * group * hd));
                }
                i = after;
            }
        });
    }

    /// `YINSEN_CPU_ATTN_ORDER=head`: tasks in head-major order (measurement
    /// switch; default: query-block-major, see `causal`).
    fn head_major() -> bool {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| std::env::var("YINSEN_CPU_ATTN_ORDER").is_ok_and(|v| v == "head"))
    }

    /// One task's shape: `rows` = tokens x `group` query rows at positions
    /// `pa..pb` (row r: token r / group, head r % group of the kv head).
    struct Task {
        rows: usize,
        group: usize,
        hd: usize,
        qd: usize,
        kvd: usize,
        pa: usize,
        pb: usize,
    }

    impl Task {
        /// Lane vectors: rows / 16 rounded up.
        fn nv(&self) -> usize {
            self.rows.div_ceil(16)
        }

        /// `qt[d][lane]` = query row `lane`, dim d, times `scale` (0 past the
        /// rows), by 16x16 transposes. `q` points at the first row.
        #[target_feature(enable = "avx512f")]
        unsafe fn load_q(&self, q: *const f32, scale: f32, qt: *mut f32) {
            let (hd, rw) = (self.hd, self.nv() * 16);
            let sc = _mm512_set1_ps(scale);
            for lb in 0..self.nv() {
                // Offsets of the 16 rows (None past the last row).
                let rows: [Option<usize>; 16] = std::array::from_fn(|i| {
                    let row = lb * 16 + i;
                    (row < self.rows).then(|| (row / self.group) * self.qd + (row % self.group) * hd)
                });
                for db in (0..hd).step_by(16) {
                    let mut r: [__m512; 16] = std::array::from_fn(|i| match rows[i] {
                        Some(o) => _mm512_mul_ps(_mm512_loadu_ps(q.add(o + db)), sc),
                        None => _mm512_setzero_ps(),
                    });
                    transpose16(&mut r);
                    for (c, v) in r.iter().enumerate() {
                        _mm512_store_ps(qt.add((db + c) * rw + lb * 16), *v);
                    }
                }
            }
        }

        /// The key blocks of the task: `kc`/`vc` point at key 0's dims of
        /// this kv head; `ml` holds m, l, corr (`[3][LANES]`).
        #[target_feature(enable = "avx512f")]
        unsafe fn run(
            &self,
            kc: *const f32,
            vc: *const f32,
            qt: *const f32,
            st: *mut f32,
            acc: *mut f32,
            ml: *mut f32,
        ) {
            let (nv, hd, kvd) = (self.nv(), self.hd, self.kvd);
            let rw = nv * 16;
            let (m, l, corr) = (ml, ml.add(LANES), ml.add(2 * LANES));
            for v in 0..nv {
                _mm512_store_ps(m.add(16 * v), _mm512_set1_ps(f32::NEG_INFINITY));
                _mm512_store_ps(l.add(16 * v), _mm512_setzero_ps());
            }
            // Position of each lane (padding lanes see every key).
            let pos: [__m512i; 4] = std::array::from_fn(|v| {
                let lane = _mm512_add_epi32(
                    _mm512_set1_epi32(16 * v as i32),
                    _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                );
                let mut p = [0i32; 16];
                _mm512_storeu_si512(p.as_mut_ptr().cast(), lane);
                for x in &mut p {
                    *x = if (*x as usize) < self.rows {
                        (self.pa + *x as usize / self.group) as i32
                    } else {
                        i32::MAX
                    };
                }
                _mm512_loadu_si512(p.as_ptr().cast())
            });
            // Last position of each vector's rows, and of each row.
            let last: [usize; 4] = std::array::from_fn(|v| self.pa + (16 * v + 15).min(self.rows - 1) / self.group);
            let row_last = |r: usize| self.pa + r / self.group;
            let mut k0 = 0;
            while k0 < self.pb {
                let k1 = (k0 + K_BLOCK).min(self.pb);
                let kb = k1 - k0;
                let kp = kc.add(k0 * kvd);
                // The next block's keys and values towards L2 (long contexts
                // stream them from L3).
                for j in k1..(k1 + K_BLOCK).min(self.pb) {
                    for e in (0..hd).step_by(16) {
                        _mm_prefetch::<_MM_HINT_T1>(kc.add(j * kvd + e).cast());
                        _mm_prefetch::<_MM_HINT_T1>(vc.add(j * kvd + e).cast());
                    }
                }
                let last = &last[..nv];
                match nv {
                    1 => scores_t::<16>(qt, rw, hd, kp, kvd, k0, kb, last, st),
                    2 => scores_t::<12>(qt, rw, hd, kp, kvd, k0, kb, last, st),
                    3 => scores_t::<8>(qt, rw, hd, kp, kvd, k0, kb, last, st),
                    _ => scores_t::<6>(qt, rw, hd, kp, kvd, k0, kb, last, st),
                }
                // Keys past the first row's position are masked per lane.
                let masked = k1 - 1 > self.pa;
                for (v, &pv) in pos.iter().enumerate().take(nv) {
                    softmax_lanes(
                        st.add(16 * v),
                        rw,
                        kb,
                        k0,
                        masked,
                        pv,
                        m.add(16 * v),
                        l.add(16 * v),
                        corr.add(16 * v),
                    );
                }
                let vp = vc.add(k0 * kvd);
                let first = k0 == 0;
                for d0 in (0..hd).step_by(64) {
                    // 6 rows at a time (24 accumulators), then 4, 2, 1.
                    let mut r = 0;
                    while r < self.rows {
                        let step = match self.rows - r {
                            6.. => 6,
                            4 | 5 => 4,
                            2 | 3 => 2,
                            _ => 1,
                        };
                        let kernel: unsafe fn(
                            *const f32,
                            usize,
                            usize,
                            *const f32,
                            usize,
                            *mut f32,
                            usize,
                            *const f32,
                            bool,
                        ) = match step {
                            6 => pv::<6>,
                            4 => pv::<4>,
                            2 => pv::<2>,
                            _ => pv::<1>,
                        };
                        // Keys past the last row's position have p = 0.
                        let kbr = (row_last(r + step - 1) + 1 - k0).min(kb);
                        kernel(
                            st.add(r),
                            rw,
                            kbr,
                            vp.add(d0),
                            kvd,
                            acc.add(r * hd + d0),
                            hd,
                            corr.add(r),
                            first,
                        );
                        r += step;
                    }
                }
                k0 = k1;
            }
        }

        /// `out` row r (token r / group, head r % group) = `acc[r] / l[r]`.
        #[target_feature(enable = "avx512f")]
        unsafe fn store(&self, acc: *const f32, l: *const f32, out: *mut f32) {
            let hd = self.hd;
            for r in 0..self.rows {
                let inv = _mm512_set1_ps(1.0 / *l.add(r));
                let dst = out.add((r / self.group) * self.qd + (r % self.group) * hd);
                for d in (0..hd).step_by(16) {
                    _mm512_storeu_ps(dst.add(d), _mm512_mul_ps(_mm512_load_ps(acc.add(r * hd + d)), inv));
                }
            }
        }
    }

    /// The first step of an in-register transpose on any vector width:
    /// rows 2i and 2i + 1 interleaved, `lo(a, b)` (an unpacklo) into slot 2i
    /// and `hi(a, b)` (an unpackhi) into slot 2i + 1.
    #[inline(always)]
    pub(crate) fn interleave_row_pairs<V: Copy, const N: usize>(
        r: &[V; N],
        lo: impl Fn(V, V) -> V,
        hi: impl Fn(V, V) -> V,
    ) -> [V; N] {
        std::array::from_fn(|i| {
            let (a, b) = (r[i & !1], r[i | 1]);
            if i % 2 == 0 {
                lo(a, b)
            } else {
                hi(a, b)
            }
        })
    }

    /// In-register 16x16 transpose: `r[i]` lane j becomes `r[j]` lane i.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn transpose16(r: &mut [__m512; 16]) {
        // Pairs of rows interleaved per 128-bit lane, then quads: r[4i + k]
        // lane L = column 4L + k of rows 4i..4i+3.
        let t = interleave_row_pairs(r, |a, b| _mm512_unpacklo_ps(a, b), |a, b| _mm512_unpackhi_ps(a, b));
        for i in 0..4 {
            let pd = |x: __m512| _mm512_castps_pd(x);
            let (a0, a1, a2, a3) = (pd(t[4 * i]), pd(t[4 * i + 1]), pd(t[4 * i + 2]), pd(t[4 * i + 3]));
            r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a0, a2));
            r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a0, a2));
            r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a1, a3));
            r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a1, a3));
        }
        // Column 4L + k = lane L of r[k], r[4 + k], r[8 + k], r[12 + k].
        let u = *r;
        for k in 0..4 {
            let s0 = _mm512_shuffle_f32x4::<0x44>(u[k], u[4 + k]);
            let s1 = _mm512_shuffle_f32x4::<0xEE>(u[k], u[4 + k]);
            let s2 = _mm512_shuffle_f32x4::<0x44>(u[8 + k], u[12 + k]);
            let s3 = _mm512_shuffle_f32x4::<0xEE>(u[8 + k], u[12 + k]);
            r[k] = _mm512_shuffle_f32x4::<0x88>(s0, s2);
            r[4 + k] = _mm512_shuffle_f32x4::<0xDD>(s0, s2);
            r[8 + k] = _mm512_shuffle_f32x4::<0x88>(s1, s3);
            r[12 + k] = _mm512_shuffle_f32x4::<0xDD>(s1, s3);
        }
    }

    /// `st[j][lanes] = sum_d k[j][d] * qt[d][lanes]` for the `kb` keys of a
    /// block, J keys at a time (then 4, 2, 1), lane vectors of stride `rw`.
    /// `last[v]`: the last position of vector v's rows; a group of keys skips
    /// the leading vectors that see none of it (their scores stay stale and
    /// are masked off by the softmax).
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn scores_t<const J: usize>(
        qt: *const f32,
        rw: usize,
        hd: usize,
        k: *const f32,
        kvd: usize,
        k0: usize,
        kb: usize,
        last: &[usize],
        st: *mut f32,
    ) {
        let group = |j: usize, w: usize| {
            let v0 = last.iter().take_while(|&&p| p < k0 + j).count();
            let (q, k, s) = (qt.add(16 * v0), k.add(j * kvd), st.add(j * rw + 16 * v0));
            let tile: unsafe fn(*const f32, usize, usize, *const f32, usize, *mut f32) = match (last.len() - v0, w) {
                (0, _) => return,
                (1, 1) => scores_tile::<1, 1>,
                (1, 2) => scores_tile::<1, 2>,
                (1, 4) => scores_tile::<1, 4>,
                (1, _) => scores_tile::<1, J>,
                (2, 1) => scores_tile::<2, 1>,
                (2, 2) => scores_tile::<2, 2>,
                (2, 4) => scores_tile::<2, 4>,
                (2, _) => scores_tile::<2, J>,
                (3, 1) => scores_tile::<3, 1>,
                (3, 2) => scores_tile::<3, 2>,
                (3, 4) => scores_tile::<3, 4>,
                (3, _) => scores_tile::<3, J>,
                (_, 1) => scores_tile::<4, 1>,
                (_, 2) => scores_tile::<4, 2>,
                (_, 4) => scores_tile::<4, 4>,
                _ => scores_tile::<4, J>,
            };
            tile(q, rw, hd, k, kvd, s);
        };
        let mut j = 0;
        while j + J <= kb {
            group(j, J);
            j += J;
        }
        if J > 4 && j + 4 <= kb {
            group(j, 4);
            j += 4;
        }
        while j + 2 <= kb {
            group(j, 2);
            j += 2;
        }
        if j < kb {
            group(j, 1);
        }
    }

    /// J keys x NV lane vectors: per dim NV loads and J broadcasts for
    /// J * NV FMAs.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn scores_tile<const NV: usize, const J: usize>(
        qt: *const f32,
        rw: usize,
        hd: usize,
        k: *const f32,
        kvd: usize,
        st: *mut f32,
    ) {
        let mut a = [[_mm512_setzero_ps(); NV]; J];
        for d in 0..hd {
            let qv: [__m512; NV] = std::array::from_fn(|v| _mm512_load_ps(qt.add(d * rw + 16 * v)));
            for (j, aj) in a.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*k.add(j * kvd + d));
                for (acc, &qx) in aj.iter_mut().zip(&qv) {
                    *acc = _mm512_fmadd_ps(x, qx, *acc);
                }
            }
        }
        for (j, aj) in a.iter().enumerate() {
            for (v, acc) in aj.iter().enumerate() {
                _mm512_store_ps(st.add(j * rw + 16 * v), *acc);
            }
        }
    }

    /// Online-softmax step of 16 lanes over the block's `kb` keys (`st[j *
    /// rw]`, probabilities written in place): key k0 + j is visible to a lane
    /// at position >= k0 + j (checked only where `masked`).
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn softmax_lanes(
        st: *mut f32,
        rw: usize,
        kb: usize,
        k0: usize,
        masked: bool,
        pos: __m512i,
        m: *mut f32,
        l: *mut f32,
        corr: *mut f32,
    ) {
        let vis = |j: usize| _mm512_cmpge_epi32_mask(pos, _mm512_set1_epi32((k0 + j) as i32));
        let max_of = |c: __m512, j: usize| {
            let x = _mm512_load_ps(st.add(j * rw));
            if masked {
                _mm512_mask_max_ps(c, vis(j), c, x)
            } else {
                _mm512_max_ps(c, x)
            }
        };
        // Two independent max chains (kept in registers).
        let (mut m0, mut m1) = (_mm512_set1_ps(f32::NEG_INFINITY), _mm512_set1_ps(f32::NEG_INFINITY));
        let mut j = 0;
        while j + 2 <= kb {
            m0 = max_of(m0, j);
            m1 = max_of(m1, j + 1);
            j += 2;
        }
        if j < kb {
            m0 = max_of(m0, j);
        }
        let mo = _mm512_load_ps(m);
        let nm = _mm512_max_ps(mo, _mm512_max_ps(m0, m1));
        let prob = |j: usize| {
            let x = _mm512_load_ps(st.add(j * rw));
            let mut p = exp2_finite(_mm512_sub_ps(x, nm));
            if masked {
                p = _mm512_maskz_mov_ps(vis(j), p);
            }
            _mm512_store_ps(st.add(j * rw), p);
            p
        };
        let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut j = 0;
        while j + 2 <= kb {
            s0 = _mm512_add_ps(s0, prob(j));
            s1 = _mm512_add_ps(s1, prob(j + 1));
            j += 2;
        }
        if j < kb {
            s0 = _mm512_add_ps(s0, prob(j));
        }
        // m = -inf (first block) gives exp2(-127 clamp) ~ 0: the empty accumulator.
        let c = exp2(_mm512_sub_ps(mo, nm));
        let s = _mm512_add_ps(s0, s1);
        _mm512_store_ps(l, _mm512_fmadd_ps(_mm512_load_ps(l), c, s));
        _mm512_store_ps(m, nm);
        _mm512_store_ps(corr, c);
    }

    /// `2^x` per lane, same polynomial as `exp2_portable` (x <= 127; -inf -> ~0).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp2(x: __m512) -> __m512 {
        exp2_finite(_mm512_min_ps(
            _mm512_max_ps(x, _mm512_set1_ps(-127.0)),
            _mm512_set1_ps(127.0),
        ))
    }

    /// [`exp2`] without the clamps, for finite x: 2^x over/underflows to
    /// inf/0 (the softmax masks lanes whose scores may exceed the max).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn exp2_finite(x: __m512) -> __m512 {
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
        let f = _mm512_sub_ps(x, n);
        let mut p = _mm512_set1_ps(EXP2_P[0]);
        for &c in &EXP2_P[1..] {
            p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
        }
        let r = _mm512_fmadd_ps(f, p, _mm512_set1_ps(1.0));
        _mm512_scalef_ps(r, n)
    }

    /// `acc[r][0..64] = acc[r][0..64] * corr[r] + sum_j p[j][r] * v[j][0..64]`
    /// for R rows (`p[j][r]` at `p[j * rw + r]`); `first`: acc starts empty.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn pv<const R: usize>(
        p: *const f32,
        rw: usize,
        kb: usize,
        v: *const f32,
        kvd: usize,
        acc: *mut f32,
        hd: usize,
        corr: *const f32,
        first: bool,
    ) {
        let mut a: [[__m512; 4]; R] = std::array::from_fn(|r| {
            let c = _mm512_set1_ps(*corr.add(r));
            std::array::from_fn(|k| {
                if first {
                    _mm512_setzero_ps()
                } else {
                    _mm512_mul_ps(_mm512_load_ps(acc.add(r * hd + 16 * k)), c)
                }
            })
        });
        for j in 0..kb {
            let vj = v.add(j * kvd);
            let vv = [
                _mm512_loadu_ps(vj),
                _mm512_loadu_ps(vj.add(16)),
                _mm512_loadu_ps(vj.add(32)),
                _mm512_loadu_ps(vj.add(48)),
            ];
            for (r, ar) in a.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*p.add(j * rw + r));
                for (c, acc) in ar.iter_mut().enumerate() {
                    *acc = _mm512_fmadd_ps(x, vv[c], *acc);
                }
            }
        }
        for (r, ar) in a.iter().enumerate() {
            for (c, x) in ar.iter().enumerate() {
                _mm512_store_ps(acc.add(r * hd + 16 * c), *x);
            }
        }
    }
}

/// Plain per-(token, head) attention: the readable reference the tiled loop
/// is tested against, and the decode path (one query, nothing to tile).
pub fn causal_attention_simple(s: &AttnShape, q: &[f32], kc: &[f32], vc: &[f32], p0: usize, n: usize) -> Vec<f32> {
    let (hd, qd) = (s.head_dim, s.n_heads * s.head_dim);
    let mut out = vec![0f32; n * qd];
    out.par_chunks_mut(hd)
        .enumerate()
        .for_each(|(i, o)| simple_head(s, q, kc, vc, p0, i, o));
    out
}

/// Output `o` (`head_dim` floats) of `causal_attention_simple` for head
/// slot `i` (token `i / n_heads`, head `i % n_heads`).
pub fn simple_head(s: &AttnShape, q: &[f32], kc: &[f32], vc: &[f32], p0: usize, i: usize, o: &mut [f32]) {
    let (hd, qd, kvd) = (s.head_dim, s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim);
    let group = s.n_heads / s.n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let (t, h) = (i / s.n_heads, i % s.n_heads);
    let kvh = h / group;
    let qv = &q[t * qd + h * hd..t * qd + (h + 1) * hd];
    let len = p0 + t + 1;
    let mut scores: Vec<f32> = (0..len)
        .map(|p| ops::dot(qv, &kc[p * kvd + kvh * hd..p * kvd + (kvh + 1) * hd]) * scale)
        .collect();
    ops::softmax(&mut scores);
    o.fill(0.0);
    for (p, &w) in scores.iter().enumerate() {
        ops::axpy(o, w, &vc[p * kvd + kvh * hd..p * kvd + (kvh + 1) * hd]);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::synthetic::SplitMix64;

    /// A shape and random queries (of `n` tokens after `p0` cached ones),
    /// keys and values: q in [-3, 3], K and V in [-1, 1], so scores are a
    /// few units, like real attention (peaked rows).
    pub(crate) fn random_case(
        r: &mut SplitMix64,
        (nh, nkv, hd): (usize, usize, usize),
        p0: usize,
        n: usize,
    ) -> (AttnShape, Vec<f32>, Vec<f32>, Vec<f32>) {
        let s = AttnShape {
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
        };
        let mut rnd = |k: usize, a: f32| (0..k).map(|_| (r.next_f32() * 2.0 - 1.0) * a).collect::<Vec<f32>>();
        let q = rnd(n * nh * hd, 3.0);
        let kc = rnd((p0 + n) * nkv * hd, 1.0);
        let vc = rnd((p0 + n) * nkv * hd, 1.0);
        (s, q, kc, vc)
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    /// Every kernel set against the plain reference. Tolerance 5e-6
    /// absolute (measured <= 6.1e-7) on outputs of magnitude <= 1: the sums run in another order
    /// and exp2 is a polynomial (rel. error < 2e-7).
    #[test]
    fn tiled_matches_simple() {
        let mut r = SplitMix64(3);
        // One scratch for every case: stale K^T of a longer call must not leak in.
        let mut scratch = AttnScratch::default();
        // Groups of 1 and 3 with hd 64 reach every row-tile remainder (1..5) of the AVX-512 kernels.
        for (nh, nkv, hd) in [(4, 2, 8), (20, 5, 128), (4, 1, 64), (3, 3, 16), (6, 2, 64), (5, 5, 64)] {
            for (p0, n) in [(0, 1), (0, 37), (5, 20), (70, 3), (0, 150), (63, 66)] {
                let (s, q, kc, vc) = random_case(&mut r, (nh, nkv, hd), p0, n);
                let want = causal_attention_simple(&s, &q, &kc, &vc, p0, n);
                for isa in Isa::available(hd) {
                    // NaN until written: a row no task writes shows up here.
                    let mut got = vec![f32::NAN; n * nh * hd];
                    let input = AttnInput::new(&s, &q, &kc, &vc, p0);
                    causal_attention_into(isa, input, n, &mut got, &mut scratch, Par::Rayon);
                    let d = max_diff(&got, &want);
                    assert!(d < 5e-6, "{isa:?} heads {nh}/{nkv} hd {hd} p0 {p0} n {n}: {d}");
                }
            }
        }
    }

    #[test]
    fn exp2_is_accurate() {
        // Dense grid over the range softmax uses, plus the clamped ends.
        let xs: Vec<f32> = (0..=200_000)
            .map(|i| -120.0 + i as f32 * 6.2e-4)
            .chain([-126.0, 0.0, 1.0, 20.5])
            .collect();
        let mut worst = 0f64;
        for &x in &xs {
            let want = (x as f64).exp2();
            let got = exp2_portable(x) as f64;
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 2e-7, "portable exp2 rel. error {worst}");
        assert_eq!(exp2_portable(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp2_portable(-200.0), 0.0);
        // exp(x) = exp2(x log2 e): input rounding adds |x| * 2^-24 relative.
        for i in 0..=2000 {
            let x = -20.0 + i as f32 * 0.01;
            let (got, want) = (exp2_portable(x * std::f32::consts::LOG2_E), x.exp());
            assert!(
                ((got - want) / want).abs() < 1e-6 + x.abs() * 1.2e-7,
                "exp({x}): {got} vs {want}"
            );
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") {
            for ch in xs.chunks_exact(16) {
                let mut out = [f32::NAN; 16];
                // SAFETY: avx512f detected above; 16 lanes in and out.
                unsafe {
                    use std::arch::x86_64::*;
                    _mm512_storeu_ps(out.as_mut_ptr(), x86::exp2(_mm512_loadu_ps(ch.as_ptr())));
                }
                for (&x, &g) in ch.iter().zip(&out) {
                    let want = (x as f64).exp2();
                    assert!(((g as f64 - want) / want).abs() < 2e-7, "avx512 exp2({x}) = {g}");
                }
            }
        } else {
            eprintln!("SKIP avx512 exp2: no avx512f");
        }
    }
}
