// The persistent multi-token step: 2..16 tokens of one sequence through every
// layer in ONE launch (one 1024-thread block per SM, grid barriers), the
// batched counterpart of mega.cu's one-token decode. Uses mega.cu's barrier,
// row split and weight-copy helpers and ternary.cu's mma_s8 / ext2.
//
// Why not mega.cu's scheme: there every block normalises and quantises the
// whole input vector itself (no extra barrier). For T tokens that is T times
// the f32 broadcast to all 132 SMs (16 x 6912 floats = 442 KB per block for
// down), which the L2 cannot deliver in a few microseconds. Here the input is
// quantised ONCE, spread over the blocks, and the int8 codes (4x fewer bytes)
// are broadcast instead:
//   1. the phase that writes an input also leaves, per block and token, the
//      partial (sum of squares, max |v * norm weight|) of the rows it wrote
//      (`stat`, [16][block]);
//   2. the consuming phase sums those partials per token in a fixed order
//      (deterministic), quantises its share of the T x n values into the
//      global int8 buffer `xg` ([token][xs]);
//   3. grid barrier; every block copies the whole code matrix into shared
//      memory (cp.async), sums each token's codes there, and runs its rows
//      of W on the tensor cores.
// Every block reads the same partials and codes: each is loaded once per
// block with coalesced 16-byte loads (132 requests per L2 line; per-warp
// 4-byte loads of the same lines queued ~16x more and cost ~6 us a phase).
// So a matrix phase costs two barriers (9 per layer instead of 5).
//
// Per layer: QKV (+ RoPE + KV write for positions pos..pos+T-1), attention
// (items = (KV head, 64-key chunk) with all T tokens x group query heads;
// causal inside the new tokens; the last block of a head merges chunks), O +
// residual, gate/up + activation, down + residual.
//
// The dot: mma.sync m16n8k32 with A = the block's weight rows straight from
// the offset-code chunks in shared memory (`ext2` gives the A fragment, see
// ternary.cu) and B = the int8 codes of up to 16 tokens (two n8 tiles).
// Items (m16 row tile, 64-weight chunk) are split over the warps, partial
// int32 sums added into acc_s with shared atomics: exact in any order.
//
// Shared memory (bytes, offsets from the host, see `MegaMulti` in forward.rs):
//   [0, wB)            B: O weights, then down weights
//   [wB, wB + wA)      A: QKV weights, then gate/up weights
//   c_off ..           the codes of QKV / O / GU inputs, or the attention's
//                      q (later its outputs), K and V rows (f32)
//   dn_off ..          the codes of the down input: inside A behind the next
//                      layer's QKV weights (gate/up is done by then)
//   s_off ..           the attention scores (B's free tail where it fits)
//   acc_off ..         int32 row x token sums of the dot

// Threads per block (the one-token kernel's are MG_THREADS, mega.cu).
// 512 since session 28: the 16-token step at ctx 0 1.81 against 1.94 ms
// and the batch-16 step 1.90-1.95 against 2.03-2.10 ms on an H200 (S28-1),
// as the one-token kernel gained from 512 (half the warps issue each
// phase's per-block code; 128 registers, no spill). Its attention items
// loop over twice as many rows a thread, so long contexts lose (1024 keys:
// 3.13 against 2.97 ms, S28-1; the host's key limit is DEFAULT_MAX_CTX).
#ifndef MM_THREADS
#define MM_THREADS 512
#endif
#define MM_T 16          // tokens at most
// Threads per token in the per-token reductions and epilogues (64 or 32),
// the warps of the block as a power of two (mm_dot's item split), and the
// 16-byte loads per thread that stage every block's partials (mm_scales,
// 2 or 4: up to 2048 float4, i.e. 256 blocks; the host checks).
#define MM_TPT (MM_THREADS / MM_T)
#define MM_TLOG (MM_THREADS == 1024 ? 6 : 5)  // log2(MM_TPT)
#define MM_WLOG (MM_THREADS == 1024 ? 5 : 4)
#define MM_SL (2048 / MM_THREADS)
#if MM_THREADS != 1024 && MM_THREADS != 512
#error "MM_THREADS must be 1024 or 512"
#endif
#define MM_RMAX 128      // query rows (tokens x group) at most
#define MM_AC 64         // keys per attention item
#define MM_TRACE 48      // trace marks per layer (bench only; see trace_mega_multi)

// sm_90+ only (the host checks): cp.async, mma.sync m16n8k32 and bulk
// copies; older archs get empty kernels so that every image has the names.
#if __CUDA_ARCH__ >= 900
// Bytes per token row of codes: the K padding, then 64 bytes, so that two
// token rows' 64-byte chunks share no bank (the dot reads 16 bytes a lane).
__device__ __forceinline__ int mm_xs(int kpad) { return ((kpad + 127) / 128) * 128 + 64; }

// Where the 4 codes of elements i..i+3 (i % 4 == 0) sit in a token row:
// inside each 64-byte chunk the 16 words are stored transposed (word
// 4m + j at 4j + m), so lane j's B-fragment words of both k32 halves
// (elements 4j, 16 + 4j, 32 + 4j, 48 + 4j) are one 16-byte load.
__device__ __forceinline__ int mm_code_pos(int i) {
    const int w = (i & 63) >> 2;
    return (i & ~63) + 4 * (((w & 3) << 2) | (w >> 2));
}

// 16-byte cp.async global -> shared.
__device__ __forceinline__ void cp16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(dst)), "l"(src) : "memory");
}

// (sum, max) of the MM_TPT threads of each token group (threads
// MM_TPT t .. MM_TPT t + MM_TPT - 1) in a fixed order; thread MM_TPT t gets
// the result. red2: 32 float2. With 32 threads a token a group is a warp:
// no block barrier.
__device__ __forceinline__ float2 mm_group_reduce(float ss, float mx, float2* red2) {
#if MM_TPT == 64
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    ss = warp_sum(ss);
    mx = warp_max(mx);
    __syncthreads();  // red2 reuse
    if (lane == 0) red2[w] = make_float2(ss, mx);
    __syncthreads();
    const float2 a = red2[w & ~1], b = red2[w | 1];
    return make_float2(a.x + b.x, fmaxf(a.y, b.y));
#else
    return make_float2(warp_sum(ss), warp_max(mx));
#endif
}

// Write this block's per-token partials (thread MM_TPT t holds token t's).
__device__ __forceinline__ void mm_stat_put(float ss, float mx, int T, float2* red2, float2* stat) {
    const float2 r = mm_group_reduce(ss, mx, red2);
    const int t = (threadIdx.x >> MM_TLOG);
    if ((threadIdx.x & (MM_TPT - 1)) == 0 && t < MM_T)
        stat[t * gridDim.x + blockIdx.x] = t < T ? r : make_float2(0.f, 0.f);
}

// Per token: r = 1 / sqrt(mean square + eps) (1 without a norm) and the
// quantisation scale s = 127 / max(max|v w| r, 1e-5), from every block's
// partials summed in block order. As mg_quant, `max|v w| * r` stands for
// max|(v r) w|. The partials ([token][block], see mm_stat_put) are staged
// in `sbuf` (MM_T x grid float2 of free shared memory) by coalesced loads,
// all issued before the first use; warp t then reads token t's row, lane
// by lane consecutive. (Block-major, [block][token], those reads were 128
// bytes apart: one bank, 32 ways. ncu S28-4: the four phases' sums were
// 15% of the kernel's stall samples, nearly all short scoreboard.)
__device__ void mm_scales(const float2* stat, int T, int n, bool norm, float eps, float* r_s, float* s_s,
                          float2* sbuf) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, n4 = gridDim.x * MM_T / 2;
    const float4* src = (const float4*)stat;
    const int i0 = threadIdx.x, i1 = threadIdx.x + MM_THREADS;
    const float4 a = i0 < n4 ? __ldcg(src + i0) : make_float4(0.f, 0.f, 0.f, 0.f);
    const float4 b = i1 < n4 ? __ldcg(src + i1) : make_float4(0.f, 0.f, 0.f, 0.f);
#if MM_SL == 4
    const int i2 = i1 + MM_THREADS, i3 = i2 + MM_THREADS;
    const float4 c = i2 < n4 ? __ldcg(src + i2) : make_float4(0.f, 0.f, 0.f, 0.f);
    const float4 d = i3 < n4 ? __ldcg(src + i3) : make_float4(0.f, 0.f, 0.f, 0.f);
    if (i2 < n4) ((float4*)sbuf)[i2] = c;
    if (i3 < n4) ((float4*)sbuf)[i3] = d;
#endif
    if (i0 < n4) ((float4*)sbuf)[i0] = a;
    if (i1 < n4) ((float4*)sbuf)[i1] = b;
    __syncthreads();
    if (w < T) {
        float ss = 0.f, mx = 0.f;
        for (int blk = lane; blk < (int)gridDim.x; blk += 32) {
            const float2 v = sbuf[w * gridDim.x + blk];
            ss += v.x;
            mx = fmaxf(mx, v.y);
        }
        ss = warp_sum(ss);
        mx = warp_max(mx);
        if (lane == 0) {
            const float r = norm ? 1.f / sqrtf(ss / (float)n + eps) : 1.f;
            r_s[w] = r;
            s_s[w] = 127.f / fmaxf(mx * r, 1e-5f);
        }
    }
    __syncthreads();
}

// One word (4 codes) of token row t at element i: y = (v * r) * nw (as
// mg_quant), code = saturating round-to-nearest-even of y * s.
__device__ __forceinline__ unsigned mm_codes(float4 v, float4 g, bool norm, float r, float s) {
    if (norm) v = make_float4(v.x * r * g.x, v.y * r * g.y, v.z * r * g.z, v.w * r * g.w);
    return q8_word(v, s);
}

// A phase input's first half: the per-token scales (mm_scales), then this
// block's share of the codes of in [T][n] into xg [T][xs] (k in [n, kpad)
// -> 0). The first word of each thread is loaded before the scales, so both
// round trips overlap. sbuf: free shared memory for mm_scales.
__device__ void mm_quant_slice(const float* in, int T, int n, int kpad, int xs, const float* nw, const float2* stat,
                               bool norm, float eps, float* r_s, float* s_s, i8* xg, float2* sbuf,
                               u64* trace = nullptr, int mark = 0) {
    const int wpt = kpad / 4, total = T * wpt, per = (total + gridDim.x - 1) / gridDim.x;
    const int w0 = blockIdx.x * per, w1 = min(total, w0 + per);
    const bool has_nw = nw != nullptr;
    int idx = w0 + (int)threadIdx.x;
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f), g = v;
    if (idx < w1) {
        const int t = idx / wpt, i = (idx - t * wpt) * 4;
        if (i < n) {
            v = __ldcg((const float4*)(in + (size_t)t * n + i));
            if (has_nw) g = __ldg((const float4*)(nw + i));
        }
    }
    mm_scales(stat, T, n, norm, eps, r_s, s_s, sbuf);  // ends with a block barrier
    mg_mark(trace, mark);
    for (; idx < w1; idx += MM_THREADS) {
        const int t = idx / wpt, i = (idx - t * wpt) * 4;
        unsigned word = 0;
        if (i < n) {
            if (idx >= w0 + MM_THREADS) {
                v = __ldcg((const float4*)(in + (size_t)t * n + i));
                if (has_nw) g = __ldg((const float4*)(nw + i));
            }
            word = mm_codes(v, g, has_nw, r_s[t], s_s[t]);
        }
        *(unsigned*)(xg + (size_t)t * xs + mm_code_pos(i)) = word;
    }
    mg_mark(trace, mark + 1);
}

// After the barrier: copy the codes ([T][xs], written by every block) into
// shared memory, then each token's code sum (exact) from there: threads
// MM_TPT t .. MM_TPT t + MM_TPT - 1 take token t. (Bulk copies by one
// thread measured slower here than cp.async by all: run 103.)
__device__ void mm_load_codes(const i8* xg, int bytes, i8* xq, int T, int kpad, int xs, int* xsum_s, int* red_i,
                              u64* trace = nullptr, int mark = 0) {
    for (int i = threadIdx.x; i < bytes / 16; i += MM_THREADS) cp16(xq + 16 * i, xg + 16 * (size_t)i);
    cp_commit();
    mg_mark(trace, mark);
    cp_async_wait();
    __syncthreads();
    const int t = (threadIdx.x >> MM_TLOG), lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    int sum = 0;
    if (t < T)
        for (int k4 = (threadIdx.x & (MM_TPT - 1)); k4 < kpad / 4; k4 += MM_TPT)
            sum = __dp4a(*(const int*)(xq + t * xs + 4 * k4), 0x01010101, sum);
    sum = warp_sum_i(sum);
#if MM_TPT == 64
    if (lane == 0) red_i[w] = sum;
    __syncthreads();
    if ((threadIdx.x & 63) == 0 && t < T) xsum_s[t] = red_i[2 * t] + red_i[2 * t + 1];
#else
    (void)red_i;
    if (lane == 0 && t < T) xsum_s[t] = sum;
#endif
    __syncthreads();
}

// acc_s[li * MM_T + t] += sum_k code(W[li][k]) x[t][k] (codes 0..2 = w + 1)
// for the block's nloc rows (wsm: [nloc][chunks] offset-code chunks) and T
// tokens (xq: [T][xs] codes). acc_s must be zero; ends with a block barrier.
__device__ void mm_dot(int chunks, int nloc, int T, const uint4* wsm, const i8* xq, int xs, int* acc_s) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tg = lane & 3;
    const int items = ((nloc + 15) >> 4) * chunks, per = (items + (1 << MM_WLOG) - 1) >> MM_WLOG;
    const int i0 = warp * per, i1 = min(items, i0 + per);
    // B rows: token g (tile 0) and g + 8 (tile 1), clamped (extra columns
    // are never stored); lane tg's 4 words of a chunk are one uint4 (mm_code_pos).
    const uint4* xb0 = (const uint4*)(xq + min(g, T - 1) * xs) + tg;
    const uint4* xb1 = (const uint4*)(xq + min(g + 8, T - 1) * xs) + tg;
    const bool two = T > 8;
    int c0[4] = {0, 0, 0, 0}, c1[4] = {0, 0, 0, 0};
    auto flush = [&](int mt) {
        const int ra = mt * 16 + g, rb = ra + 8, t0 = 2 * tg;
        if (ra < nloc) {
            if (t0 < T) atomicAdd(acc_s + ra * MM_T + t0, c0[0]);
            if (t0 + 1 < T) atomicAdd(acc_s + ra * MM_T + t0 + 1, c0[1]);
            if (two && t0 + 8 < T) atomicAdd(acc_s + ra * MM_T + t0 + 8, c1[0]);
            if (two && t0 + 9 < T) atomicAdd(acc_s + ra * MM_T + t0 + 9, c1[1]);
        }
        if (rb < nloc) {
            if (t0 < T) atomicAdd(acc_s + rb * MM_T + t0, c0[2]);
            if (t0 + 1 < T) atomicAdd(acc_s + rb * MM_T + t0 + 1, c0[3]);
            if (two && t0 + 8 < T) atomicAdd(acc_s + rb * MM_T + t0 + 8, c1[2]);
            if (two && t0 + 9 < T) atomicAdd(acc_s + rb * MM_T + t0 + 9, c1[3]);
        }
#pragma unroll
        for (int i = 0; i < 4; i++) c0[i] = c1[i] = 0;
    };
    // The warp's items as runs of chunks of one m16 tile: the inner loop
    // has no branch but its bound, so the compiler can unroll and overlap
    // the next chunk's shared loads with this one's mma (ncu S28-4: with a
    // per-item end-of-tile test, 15% of the dot's stall samples were branch
    // resolving and a third fixed-latency waits).
    for (int it = i0; it < i1;) {
        const int mt = it / chunks, cs = it - mt * chunks, ce = min(chunks, cs + (i1 - it));
        const uint4 *wa = wsm + min(mt * 16 + g, nloc - 1) * chunks, *wb = wsm + min(mt * 16 + g + 8, nloc - 1) * chunks;
#pragma unroll 2
        for (int c = cs; c < ce; c++) {
            const uint4 a = wa[c], b = wb[c], x0 = xb0[4 * c];
            mma_s8(c0, ext2(a.x, tg), ext2(b.x, tg), ext2(a.y, tg), ext2(b.y, tg), x0.x, x0.y);
            mma_s8(c0, ext2(a.z, tg), ext2(b.z, tg), ext2(a.w, tg), ext2(b.w, tg), x0.z, x0.w);
            if (two) {
                const uint4 x1 = xb1[4 * c];
                mma_s8(c1, ext2(a.x, tg), ext2(b.x, tg), ext2(a.y, tg), ext2(b.y, tg), x1.x, x1.y);
                mma_s8(c1, ext2(a.z, tg), ext2(b.z, tg), ext2(a.w, tg), ext2(b.w, tg), x1.z, x1.w);
            }
        }
        flush(mt);
        it += ce - cs;
    }
    __syncthreads();
}

__device__ __forceinline__ void mm_zero_acc(int* acc_s, int nloc) {
    for (int i = threadIdx.x; i < nloc * MM_T; i += MM_THREADS) acc_s[i] = 0;
}

// A matrix phase after its barrier: acc_s zeroed, the codes copied in
// (mm_load_codes), the weights awaited (bar, parity ph), the dot. Marks
// m_codes after the copy, m_wait after the weights (m_issue: see
// mm_load_codes; 0 = none).
__device__ __forceinline__ void mm_matrix(int chunks, int nloc, int T, const uint4* wsm, u64* bar, unsigned& ph,
                                          const i8* xg, int xs, i8* xq, int* acc_s, int* xsum_s, int* red_i,
                                          u64* trace, int m_codes, int m_wait, int m_issue = 0) {
    mm_zero_acc(acc_s, nloc);
    mm_load_codes(xg, T * xs, xq, T, chunks * 64, xs, xsum_s, red_i, m_issue ? trace : nullptr, m_issue);
    mg_mark(trace, m_codes);
    mbar_wait(bar, ph);
    ph ^= 1;
    mg_mark(trace, m_wait);
    mm_dot(chunks, nloc, T, wsm, xq, xs, acc_s);
}

// Row y of local row li for token t: (acc - sum x) * (row scale / s).
__device__ __forceinline__ float mm_y(const int* acc_s, const int* xsum_s, const float* scs, const float* s_s, int li,
                                      int t) {
    return (float)(acc_s[li * MM_T + t] - xsum_s[t]) * (scs[li] / s_s[t]);
}

// Attention of the T new queries (positions pos..pos+T-1) of every head over
// keys 0..pos+t of this layer's cache; output [T][n_heads * hd] into attn.
// Items (KV head, MM_AC-key chunk, block of tokens) over the blocks; each
// holds its query rows, the chunk's K and V rows and the scores in shared memory.
// Per-token (sum of squares, max |v nw|) of the outputs this block writes
// accumulate into statacc (in item order: deterministic).
__device__ __forceinline__ float4 ld4f(const float* p) { return *(const float4*)p; }
__device__ __forceinline__ float4 ld4f(const u16* p) {
    const uint2 u = *(const uint2*)p;
    return make_float4(h2f((u16)(u.x & 0xffff)), h2f((u16)(u.x >> 16)), h2f((u16)(u.y & 0xffff)),
                       h2f((u16)(u.y >> 16)));
}

template <typename KV>
__device__ void mm_attention(const float* qr, const KV* kc, const KV* vc, int pos, int T, const BatchSeq* sq, int l,
                             int n_keys, int n_heads, int n_kv, int hd, int cap, float scale, int nsplit, float* part,
                             int* cnt, float* attn,
                             const float* nw, float* qsm, KV* ksm, KV* vsm, float* S, float* ml, float* nws,
                             float2* statacc, float2* red2, int* last_s, const MgNext& gu, u64* trace, int tb) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    // sq (a batched step, in shared memory): token t is the next of its own
    // sequence (cache, position sq[t]); n_keys then covers the longest.
    const int group = n_heads / n_kv, Q = n_heads * hd;
    const int nch = (n_keys + MM_AC - 1) / MM_AC, hs = hd + 4, ss_ = MM_AC + 1;
    // Token blocks: (KV head, chunk) pairs are few on short contexts (5 on
    // 2B4T at position 0), so the tokens are split too until the items
    // about fill the grid; each item then stages fewer query rows.
    const int TB = sq ? 1 : (T + max(1, min(T, (int)gridDim.x / (n_kv * nch))) - 1) / max(1, min(T, (int)gridDim.x / (n_kv * nch)));
    const int ntb = (T + TB - 1) / TB;  // non-empty blocks of TB tokens
    // K rows padded by 16 bytes (conflict-free 8-row reads); 16-byte units per row.
    const int khs = hd + 16 / (int)sizeof(KV), ku = hd * (int)sizeof(KV) / 16, qu = hd / 4;
    const size_t pst = hd + 2;
    for (int item = blockIdx.x; item < n_kv * nch * ntb; item += gridDim.x) {
        const int kvh = item / (nch * ntb), rem = item - kvh * nch * ntb, ch = rem / ntb, tbk = rem - ch * ntb;
        const int t0 = tbk * TB, Tb = min(TB, T - t0), R = Tb * group, j0 = ch * MM_AC;
        // The item's first position and cache rows.
        int ipos = pos + t0;
        const KV *kb = kc, *vb = vc;
        if (sq) {
            const BatchSeq& b = sq[t0];
            const size_t off = batch_layer_off(b, l, n_kv, hd) + ((size_t)kvh * b.cap + j0) * hd;
            ipos = b.pos;
            kb = (const KV*)b.k + off;
            vb = (const KV*)b.v + off;
        } else {
            kb += ((size_t)kvh * cap + j0) * hd;
            vb += ((size_t)kvh * cap + j0) * hd;
        }
        // Keys up to the block's last token only (none: an empty partial).
        const int nj = max(0, min(MM_AC, min(n_keys, ipos + Tb) - j0));
        __syncthreads();  // shared reuse across items
        // K, V rows of the chunk and the query rows into shared memory, all
        // as 16-byte cp.async (one round trip), then the queries scaled.
        // Loops are (row, unit) grids with the unit fixed per thread (units
        // per row divide the block): no integer division per element, which
        // at 1024 threads costs 8 issue slots per scheduler each.
        for (int j = tid / ku, c = tid % ku; j < nj; j += MM_THREADS / ku) {
            cp16(ksm + j * khs + c * (16 / (int)sizeof(KV)), (const char*)(kb + (size_t)j * hd) + 16 * c);
            cp16((char*)(vsm + j * hd) + 16 * c, (const char*)(vb + (size_t)j * hd) + 16 * c);
        }
        for (int r = tid / qu, c = tid % qu; r < R; r += MM_THREADS / qu) {
            const int t = t0 + r / group, g = r - (t - t0) * group;
            cp16(qsm + r * hs + 4 * c, qr + (size_t)t * Q + (kvh * group + g) * hd + 4 * c);
        }
        // The sub-norm weights of this head group (for the output statistics).
        if (nw)
            for (int i = tid; i < group * qu; i += MM_THREADS) cp16(nws + 4 * i, nw + (size_t)kvh * group * hd + 4 * i);
        cp_commit();
        const bool first = item == (int)blockIdx.x;
        if (first) mg_mark(trace, tb + 33);
        cp_async_wait();
        __syncthreads();
        if (first) mg_mark(trace, tb + 34);
        for (int r = tid / hd, d = tid % hd; r < R; r += MM_THREADS / hd) qsm[r * hs + d] *= scale;
        __syncthreads();
        // Scores, 4 query rows x 1 key per thread (each K row read once per
        // 4 rows); keys after a query's own position are masked.
        const int nrq = (R + 3) / 4;
        for (int p = tid; p < nrq * nj; p += MM_THREADS) {
            const int r0 = 4 * (p / nj), j = p - (p / nj) * nj;
            const KV* kr = ksm + j * khs;
            const float4* q0 = (const float4*)(qsm + min(r0, R - 1) * hs);
            const float4* q1 = (const float4*)(qsm + min(r0 + 1, R - 1) * hs);
            const float4* q2 = (const float4*)(qsm + min(r0 + 2, R - 1) * hs);
            const float4* q3 = (const float4*)(qsm + min(r0 + 3, R - 1) * hs);
            float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
            for (int d4 = 0; d4 < hd / 4; d4++) {
                const float4 b = ld4f(kr + 4 * d4), a0 = q0[d4], a1 = q1[d4], a2 = q2[d4], a3 = q3[d4];
                s0 += a0.x * b.x;
                s0 += a0.y * b.y;
                s0 += a0.z * b.z;
                s0 += a0.w * b.w;
                s1 += a1.x * b.x;
                s1 += a1.y * b.y;
                s1 += a1.z * b.z;
                s1 += a1.w * b.w;
                s2 += a2.x * b.x;
                s2 += a2.y * b.y;
                s2 += a2.z * b.z;
                s2 += a2.w * b.w;
                s3 += a3.x * b.x;
                s3 += a3.y * b.y;
                s3 += a3.z * b.z;
                s3 += a3.w * b.w;
            }
            const float sv[4] = {s0, s1, s2, s3};
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int r = r0 + i;
                if (r < R) S[r * ss_ + j] = j0 + j <= ipos + r / group ? sv[i] : NEG_INF;
            }
        }
        __syncthreads();
        if (first) mg_mark(trace, tb + 35);
        // Softmax per query row (unnormalised; the sum goes to ml).
        for (int r = warp; r < R; r += MM_THREADS / 32) mg_softmax_row(S + r * ss_, nj, ml + 2 * r);
        __syncthreads();
        if (first) mg_mark(trace, tb + 36);
        // P V: thread (4 rows, 4 dims); outputs into qsm ([R][hd]).
        const int n4 = hd / 4;
        for (int p = tid; p < nrq * n4; p += MM_THREADS) {
            const int r0 = 4 * (p / n4), d = 4 * (p - (p / n4) * n4);
            float4 a[4];
#pragma unroll
            for (int i = 0; i < 4; i++) a[i] = make_float4(0.f, 0.f, 0.f, 0.f);
            for (int j = 0; j < nj; j++) {
                const float4 v = ld4f(vsm + j * hd + d);
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const float e = S[min(r0 + i, R - 1) * ss_ + j];
                    a[i].x += e * v.x;
                    a[i].y += e * v.y;
                    a[i].z += e * v.z;
                    a[i].w += e * v.w;
                }
            }
#pragma unroll
            for (int i = 0; i < 4; i++)
                if (r0 + i < R) *(float4*)(qsm + (r0 + i) * hd + d) = a[i];
        }
        __syncthreads();
        if (first) mg_mark(trace, tb + 37);
        bool out = true;
        if (nch == 1) {
            for (int r = tid / hd, dd = tid % hd; r < R; r += MM_THREADS / hd) {
                const int t = t0 + r / group, g = r - (t - t0) * group;
                const float v = qsm[r * hd + dd] / ml[2 * r + 1];
                qsm[r * hd + dd] = v;
                attn[(size_t)t * Q + (kvh * group + g) * hd + dd] = v;
            }
        } else {
            for (int r = tid / hd, dd = tid % hd; r < R; r += MM_THREADS / hd) {
                const int t = t0 + r / group, g = r - (t - t0) * group;
                part[(((size_t)t * n_heads + kvh * group + g) * nsplit + ch) * pst + 2 + dd] = qsm[r * hd + dd];
            }
            for (int r = tid; r < R; r += MM_THREADS) {
                const int t = t0 + r / group, g = r - (t - t0) * group;
                float* p = part + (((size_t)t * n_heads + kvh * group + g) * nsplit + ch) * pst;
                p[0] = ml[2 * r];
                p[1] = ml[2 * r + 1];
            }
            // Publish; the block finishing this KV head's last chunk merges
            // (one thread fences around the counter, as in mega.cu).
            __syncthreads();
            if (tid == 0) {
                __threadfence();
                *last_s = atomicAdd(cnt + kvh * ntb + tbk, 1) == nch - 1;
                if (*last_s) {
                    cnt[kvh * ntb + tbk] = 0;
                    __threadfence();
                }
            }
            __syncthreads();
            out = *last_s;
            if (out) {
                // Every chunk's (max, sum) into the K/V area, the weights
                // e^(m_c - M) (0 for a chunk with no visible key), then the
                // outputs in chunk order.
                float* mw = (float*)ksm;
                float* lw = mw + R * nch;
                for (int i = tid; i < R * nch; i += MM_THREADS) {
                    const int r = i / nch, c = i - r * nch, t = t0 + r / group, g = r - (t - t0) * group;
                    const float* p = part + (((size_t)t * n_heads + kvh * group + g) * nsplit + c) * pst;
                    mw[i] = __ldcg(p);
                    lw[i] = __ldcg(p + 1);
                }
                __syncthreads();
                for (int r = warp; r < R; r += MM_THREADS / 32)
                    mg_merge_row(mw + r * nch, lw + r * nch, nch, ml + 2 * r + 1);
                __syncthreads();
                for (int r = tid / hd, dd = tid % hd; r < R; r += MM_THREADS / hd) {
                    const int t = t0 + r / group, g = r - (t - t0) * group, i = r * hd + dd;
                    const float* ph = part + ((size_t)t * n_heads + kvh * group + g) * nsplit * pst + 2 + dd;
                    float num = 0.f;
#pragma unroll 8
                    for (int c = 0; c < nch; c++) num += __ldcg(ph + c * pst) * mw[r * nch + c];
                    const float v = num / ml[2 * r + 1];
                    qsm[i] = v;
                    attn[(size_t)t * Q + (kvh * group + g) * hd + dd] = v;
                }
            }
        }
        if (!out) continue;  // uniform over the block (last_s)
        __syncthreads();
        // This item's outputs into the block's per-token statistics.
        const int t = tid >> MM_TLOG, lt = tid & (MM_TPT - 1);  // token t0 + t
        float ss = 0.f, mx = 0.f;
        if (t < Tb)
            for (int i = lt; i < group * hd; i += MM_TPT) {
                const float v = qsm[(t * group) * hd + i];
                ss += v * v;
                mx = fmaxf(mx, fabsf(nw ? v * nws[i] : v));
            }
        const float2 r = mm_group_reduce(ss, mx, red2);
        if (lt == 0 && t < Tb)
            statacc[t0 + t] = make_float2(statacc[t0 + t].x + r.x, fmaxf(statacc[t0 + t].y, r.y));
        if (first) mg_mark(trace, tb + 38);
    }
    // The gate/up weights are wanted two phases later: issued inside the
    // first item, the copy held up that item's scores by ~4 us (run 104).
    mg_issue<MM_THREADS>(gu);
}

// Per-token stats of this block's rows [a, a + n) of x [T][H] with norm
// weight nw (layer 0's input: nothing wrote it inside the launch).
__device__ void mm_stats_rows(const float* x, int H, int T, int a, int n, const float* nw, float2* red2,
                              float2* stat) {
    const int t = (threadIdx.x >> MM_TLOG), lt = (threadIdx.x & (MM_TPT - 1));
    float ss = 0.f, mx = 0.f;
    if (t < T)
        for (int i = lt; i < n; i += MM_TPT) {
            const float v = __ldcg(x + (size_t)t * H + a + i);
            ss += v * v;
            mx = fmaxf(mx, fabsf(v * nw[a + i]));
        }
    mm_stat_put(ss, mx, T, red2, stat);
}

// Epilogue of O and down: x[t][r.a + li] += y for the block's rows and the
// T tokens (xres: the thread's first old value, loaded ahead), then the
// per-token partials of the new x with the next norm's weight nw (null:
// none, the last layer) into stat.
__device__ void mm_residual(float* x, int H, int T, MgRows r, float xres, const int* acc_s, const int* xsum_s,
                            const float* scs, const float* s_s, const float* nw, float2* red2, float2* stat) {
    const int t = (threadIdx.x >> MM_TLOG), l0 = (threadIdx.x & (MM_TPT - 1));
    float ss = 0.f, mx = 0.f;
    if (t < T)
        for (int li = l0; li < r.n; li += MM_TPT) {
            const int row = r.a + li;
            float* xp = x + (size_t)t * H + row;
            const float v = (li == l0 ? xres : __ldcg(xp)) + mm_y(acc_s, xsum_s, scs, s_s, li, t);
            *xp = v;
            ss += v * v;
            mx = fmaxf(mx, fabsf(nw ? v * nw[row] : v));
        }
    mm_stat_put(ss, mx, T, red2, stat);
}

template <typename KV>
__device__ void mmega_body(const u64* lt, int n_layers, int H, int Q, int KVD, int F, int hd, int n_heads, int n_kv,
                           int gate, float eps, float att_scale, const int* pos_p, int T, const BatchSeq* seqs,
                           const float2* rope, KV* kc0, KV* vc0, int layer_elems, int cap, float* x, float* qr, float* attn, float* hb, float* part,
                           int nsplit, int* cnt, unsigned* bar, i8* xg, float2* stat, int w0_chunks,
                           int w1_chunks, int c_off, int dn_off, int s_off, int acc_off, u64* trace, int flags) {
    extern __shared__ __align__(16) uint4 wdyn[];
    char* base = (char*)wdyn;
    uint4* wb1 = wdyn;              // B: O, down
    uint4* wb0 = wdyn + w1_chunks;  // A: QKV, gate/up
    i8* xq_c = (i8*)(base + c_off);
    i8* xq_dn = (i8*)(base + dn_off);
    float* S = (float*)(base + s_off);
    int* acc_s = (int*)(base + acc_off);
    const int group = n_heads / n_kv, R = T * group;
    float* qsm = (float*)(base + c_off);
    KV* ksm = (KV*)(qsm + R * (hd + 4));  // behind the q rows of this T (the host sized 16)
    KV* vsm = ksm + MM_AC * (hd + 16 / (int)sizeof(KV));
    __shared__ float scs2[2][MG_MAXROWS];
    __shared__ float r_s[MM_T], s_s[MM_T], ml[2 * MM_RMAX];
    __shared__ int xsum_s[MM_T], red_i[32], last_s;
    __shared__ float2 red2[32], statacc[MM_T];
    __shared__ __align__(16) float nws[MG_QMAX];  // the attention's sub-norm weights
    __shared__ __align__(8) u64 mbar[2];  // bulk weight copies into A, B
    unsigned ph0 = 0, ph1 = 0;
    const int tid = threadIdx.x, half = hd / 2;
    // Loop-invariant shapes live in shared memory, re-read after barriers:
    // held in registers across the whole kernel they spilled (at 64
    // registers a thread), and a spill reload goes to L2 here (the L1 is
    // nearly all shared memory), ~1 us apiece.
    struct MmC {
        int cH, cQ, cF, xsH, xsQ, xsF, pos, keys;
        MgRows r_qkv, r_o, r_gu, r_dn;
    };
    __shared__ MmC mc;
    // A batched step's sequences (seqs non-null): token t's cache and position.
    __shared__ BatchSeq sq[MM_T];
    if (seqs && tid < T) sq[tid] = seqs[tid];
    if (tid == 0) {
        mc.cH = (H + 63) / 64;
        mc.cQ = (Q + 63) / 64;
        mc.cF = (F + 63) / 64;
        mc.xsH = mm_xs(mc.cH * 64);
        mc.xsQ = mm_xs(mc.cQ * 64);
        mc.xsF = mm_xs(mc.cF * 64);
        mc.pos = seqs ? 0 : pos_p[0];
        mc.keys = mc.pos + T;
        if (seqs)
            for (int t = 0; t < T; t++) mc.keys = max(mc.keys, seqs[t].pos + 1);
        mc.r_qkv = mg_rows(Q + 2 * KVD, 1);
        mc.r_o = mg_rows(H, 0);
        mc.r_gu = mg_rows_paired(F);
        mc.r_dn = mg_rows(H, 0);
    }
    __syncthreads();
#define tt ((threadIdx.x >> MM_TLOG))  // epilogue: token, row lane
#define ltk ((threadIdx.x & (MM_TPT - 1)))
    unsigned epoch = 0;
#define W_(l, e) ((const uint4*)lt[(size_t)(l) * MG_LT + (e)])
#define F_(l, e) ((const float*)lt[(size_t)(l) * MG_LT + (e)])
#define SYNC_ mg_grid_sync(bar, epoch, flags)
    if (tid == 0) {
        mbar_init(&mbar[0]);
        mbar_init(&mbar[1]);
    }
    __syncthreads();
    mg_issue<MM_THREADS>(MgNext{W_(0, LT_QKV), mc.cH, mc.r_qkv, wb0, &mbar[0], F_(0, LT_QKV_S), scs2[0]});
    mm_stats_rows(x, H, T, mc.r_dn.a, mc.r_dn.n, F_(0, LT_ATTN_NORM), red2, stat);
    SYNC_;
    for (int l = 0; l < n_layers; l++) {
        KV* kc = kc0 + (size_t)l * layer_elems;
        KV* vc = vc0 + (size_t)l * layer_elems;
        if (l == n_layers - 1) pdl_launch();
        const int tb = l * MM_TRACE;
        // ---- QKV + RoPE + KV write
        mg_mark(trace, tb + 0);
        mm_quant_slice(x, T, H, mc.cH * 64, mc.xsH, F_(l, LT_ATTN_NORM), stat, true, eps, r_s, s_s, xg, (float2*)xq_c,
                       trace, tb + 30);
        mg_mark(trace, tb + 1);
        SYNC_;
        mg_mark(trace, tb + 2);
        mg_issue<MM_THREADS>(MgNext{W_(l, LT_O), mc.cQ, mc.r_o, wb1, &mbar[1], F_(l, LT_O_S), scs2[1]});
        mm_matrix(mc.cH, mc.r_qkv.n, T, wb0, &mbar[0], ph0, xg, mc.xsH, xq_c, acc_s, xsum_s, red_i, trace, tb + 3,
                  tb + 26, tb + 32);
        mg_mark(trace, tb + 4);
        if (tt < T) {
            // This thread's token: its position and cache rows.
            int p = mc.pos + tt, capt = cap;
            KV *kt = kc, *vt = vc;
            if (seqs) {
                const BatchSeq& b = sq[tt];
                const size_t off = batch_layer_off(b, l, n_kv, hd);
                p = b.pos;
                capt = b.cap;
                kt = (KV*)b.k + off;
                vt = (KV*)b.v + off;
            }
            for (int li = ltk; li < mc.r_qkv.n; li += MM_TPT) {
                const float y = mm_y(acc_s, xsum_s, scs2[0], s_s, li, tt);
                const float partner = mm_y(acc_s, xsum_s, scs2[0], s_s, li ^ 1, tt);
                qkv_rope_store(mc.r_qkv.a + li, y, partner, p, rope + (size_t)p * half, n_heads, n_kv, hd, capt,
                               qr + (size_t)tt * Q, kt, vt);
            }
        }
        mg_mark(trace, tb + 5);
        SYNC_;
        // ---- attention; the gate/up copy starts here
        mg_mark(trace, tb + 6);
        if (tid < MM_T) statacc[tid] = make_float2(0.f, 0.f);
        __syncthreads();
        {
            const MgNext gu{W_(l, LT_GU), mc.cH, mc.r_gu, wb0, &mbar[0], F_(l, LT_GU_S), scs2[0]};
            mm_attention<KV>(qr, kc, vc, mc.pos, T, seqs ? sq : nullptr, l, mc.keys, n_heads, n_kv, hd, cap, att_scale,
                             nsplit, part, cnt, attn,
                             F_(l, LT_ATTN_SUB), qsm, ksm, vsm, S, ml, nws, statacc, red2, &last_s, gu, trace, tb);
        }
        __syncthreads();
        if (tid < MM_T) stat[tid * gridDim.x + blockIdx.x] = tid < T ? statacc[tid] : make_float2(0.f, 0.f);
        mg_mark(trace, tb + 7);
        SYNC_;
        // ---- O + residual
        mg_mark(trace, tb + 8);
        {
            const float* sub = F_(l, LT_ATTN_SUB);
            mm_quant_slice(attn, T, Q, mc.cQ * 64, mc.xsQ, sub, stat, sub != nullptr, eps, r_s, s_s, xg, (float2*)xq_c);
        }
        mg_mark(trace, tb + 9);
        SYNC_;
        mg_mark(trace, tb + 10);
        // The residual value of this thread's first row, loaded ahead of its use.
        float xres = tt < T && ltk < mc.r_o.n ? __ldcg(x + (size_t)tt * H + mc.r_o.a + ltk) : 0.f;
        mm_matrix(mc.cQ, mc.r_o.n, T, wb1, &mbar[1], ph1, xg, mc.xsQ, xq_c, acc_s, xsum_s, red_i, trace, tb + 11,
                  tb + 27);
        mg_mark(trace, tb + 12);
        mm_residual(x, H, T, mc.r_o, xres, acc_s, xsum_s, scs2[1], s_s, F_(l, LT_FFN_NORM), red2, stat);
        mg_mark(trace, tb + 13);
        SYNC_;
        // ---- gate/up + activation
        mg_mark(trace, tb + 14);
        mm_quant_slice(x, T, H, mc.cH * 64, mc.xsH, F_(l, LT_FFN_NORM), stat, true, eps, r_s, s_s, xg, (float2*)xq_c);
        mg_mark(trace, tb + 15);
        SYNC_;
        mg_mark(trace, tb + 16);
        mg_issue<MM_THREADS>(MgNext{W_(l, LT_DN), mc.cF, mc.r_dn, wb1, &mbar[1], F_(l, LT_DN_S), scs2[1]});
        mm_matrix(mc.cH, 2 * mc.r_gu.n, T, wb0, &mbar[0], ph0, xg, mc.xsH, xq_c, acc_s, xsum_s, red_i, trace, tb + 17,
                  tb + 28);
        mg_mark(trace, tb + 18);
        {
            const float* sub = F_(l, LT_FFN_SUB);
            float ss = 0.f, mx = 0.f;
            if (tt < T)
                for (int li = ltk; li < mc.r_gu.n; li += MM_TPT) {
                    const int row = mc.r_gu.a + li;
                    float g = mm_y(acc_s, xsum_s, scs2[0], s_s, li, tt);
                    const float u = mm_y(acc_s, xsum_s, scs2[0], s_s, li + mc.r_gu.n, tt);
                    float h;
                    if (gate == 1) {
                        g = fmaxf(g, 0.f);
                        h = g * g * u;
                    } else {
                        h = g / (1.f + expf(-g)) * u;
                    }
                    hb[(size_t)tt * F + row] = h;
                    ss += h * h;
                    mx = fmaxf(mx, fabsf(sub ? h * sub[row] : h));
                }
            mm_stat_put(ss, mx, T, red2, stat);
        }
        mg_mark(trace, tb + 19);
        SYNC_;
        // ---- down + residual
        mg_mark(trace, tb + 20);
        {
            const float* sub = F_(l, LT_FFN_SUB);
            mm_quant_slice(hb, T, F, mc.cF * 64, mc.xsF, sub, stat, sub != nullptr, eps, r_s, s_s, xg, (float2*)xq_dn);
        }
        mg_mark(trace, tb + 21);
        SYNC_;
        mg_mark(trace, tb + 22);
        const bool more = l + 1 < n_layers;
        if (more) mg_issue<MM_THREADS>(MgNext{W_(l + 1, LT_QKV), mc.cH, mc.r_qkv, wb0, &mbar[0], F_(l + 1, LT_QKV_S), scs2[0]});
        xres = tt < T && ltk < mc.r_dn.n ? __ldcg(x + (size_t)tt * H + mc.r_dn.a + ltk) : 0.f;
        mm_matrix(mc.cF, mc.r_dn.n, T, wb1, &mbar[1], ph1, xg, mc.xsF, xq_dn, acc_s, xsum_s, red_i, trace, tb + 23,
                  tb + 29);
        mg_mark(trace, tb + 24);
        mm_residual(x, H, T, mc.r_dn, xres, acc_s, xsum_s, scs2[1], s_s, more ? F_(l + 1, LT_ATTN_NORM) : nullptr, red2,
                    stat);
        mg_mark(trace, tb + 25);
        if (more) SYNC_;
    }
#undef W_
#undef F_
#undef SYNC_
#undef tt
#undef ltk
}

#define MMEGA_CALL(KV) mmega_body<KV>
#else
template <typename... A>
__device__ void mm_none(A...) {}
#define MMEGA_CALL(KV) mm_none
#endif  // __CUDA_ARCH__ >= 900

#define MEGA_MULTI(SUF, KV)                                                                                        \
    extern "C" __global__ void __launch_bounds__(MM_THREADS, 1) mega_multi_##SUF(                                  \
        const u64* lt, int n_layers, int H, int Q, int KVD, int F, int hd, int n_heads, int n_kv, int gate,        \
        float eps, float att_scale, const int* pos_p, int T, const BatchSeq* seqs, const float2* rope, KV* kc0,    \
        KV* vc0, int layer_elems,                                                                                  \
        int cap, float* x, float* qr, float* attn, float* hb, float* part, int nsplit, int* cnt, unsigned* bar,    \
        i8* xg, float2* stat, int w0_chunks, int w1_chunks, int c_off, int dn_off, int s_off,                      \
        int acc_off, u64* trace, int flags) {                                                                      \
        MMEGA_CALL(KV)(lt, n_layers, H, Q, KVD, F, hd, n_heads, n_kv, gate, eps, att_scale, pos_p, T, seqs, rope,  \
                       kc0,                                                                                        \
                       vc0, layer_elems, cap, x, qr, attn, hb, part, nsplit, cnt, bar, xg, stat, w0_chunks,         \
                       w1_chunks, c_off, dn_off, s_off, acc_off, trace, flags);                                    \
    }
MEGA_MULTI(f16, u16)
MEGA_MULTI(f32, float)

// Before the multi-token kernel: the T tokens' embedding rows into x (one
// block per token) and the barrier counter zeroed.
extern "C" __global__ void mega_multi_begin(const int* tok, const u16* emb, int hidden, float* x, unsigned* bar) {
    const u16* e = emb + (size_t)tok[blockIdx.x] * hidden;
    float* o = x + (size_t)blockIdx.x * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = h2f(e[i]);
    if (blockIdx.x == 0 && threadIdx.x == 0) *bar = 0;
}
