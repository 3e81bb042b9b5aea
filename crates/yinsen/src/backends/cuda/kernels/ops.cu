// Float-side kernels of the forward pass: embedding, RMSNorm + int8
// quantisation, RoPE + KV-cache write, attention, lm_head, argmax.
// Positions are read from device memory (`pos`) so a captured CUDA graph
// stays valid from one decode step to the next.

// x[t] = embed[tok[t]] (f16 table -> f32). A decode step also clears the
// argmax slot that lm_head_dec fills (`best`, may be null).
// The multi-token kernels below start with pdl_wait(): body() may launch
// them with PDL, and a PDL-launched kernel must not read its predecessor's
// output (nor overwrite what that still reads) before the wait.
extern "C" __global__ void embed_f16(const int* tok, const u16* emb, int hidden, float* x, u64* best) {
    pdl_wait();
    const u16* e = emb + (size_t)tok[blockIdx.x] * hidden;
    float* o = x + (size_t)blockIdx.x * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = h2f(e[i]);
    if (best && blockIdx.x == 0 && threadIdx.x == 0) *best = 0;
}

// Value i of token row `in` before normalisation: the plain input, or the
// gated activation act(g) * u of a [gate | up] row (relu2 = 1, silu = 2).
__device__ __forceinline__ float load_in(const float* in, int n, int i, int gate) {
    if (gate == 0) return in[i];
    return gated_act(in[i], in[n + i], gate);
}

// Where norm_quant puts code i of token t: row-major (stride kpad), or with
// x_ntp > 0 the stage-tiled order the TMA GEMM copies (tern_wgmma_tma_body
// in ternary.cu), zero-padded to an even number of 128-input stages.
__device__ __forceinline__ size_t q_at(int t, int i, int kpad, int x_ntp) {
    if (!x_ntp) return (size_t)t * kpad + i;
    return (size_t)(i >> 7) * x_ntp * 128 + (size_t)(t >> 3) * 1024 + ((i & 127) >> 4) * 128 + (t & 7) * 16 + (i & 15);
}
__device__ __forceinline__ int q_padded(int kpad, int x_ntp) { return x_ntp ? (kpad + 255) / 256 * 256 : kpad; }

// norm_quant for rows that fit in registers (n <= NQ_REG * blockDim): one
// read of the input instead of three; same arithmetic as the general path.
#define NQ_REG 8
__device__ void norm_quant_regs(const float* x, int n, int gate, const float* w, int do_norm, float eps, i8* q,
                                int kpad, float* sx, int* xsum, float* out_f, int out_stride, float* red,
                                int x_ntp) {
    const int tid = threadIdx.x, bd = blockDim.x;
    float v[NQ_REG];
#pragma unroll
    for (int k = 0; k < NQ_REG; k++) {
        int i = tid + k * bd;
        v[k] = i < n ? load_in(x, n, i, gate) : 0.f;
    }
    float inv = 1.f;
    if (do_norm) {
        float ss = 0.f;
#pragma unroll
        for (int k = 0; k < NQ_REG; k++) ss += v[k] * v[k];
        ss = block_sum(ss, red);
        inv = sqrtf(ss / (float)n + eps);
    }
    float am = 0.f;
#pragma unroll
    for (int k = 0; k < NQ_REG; k++) {
        int i = tid + k * bd;
        if (i < n) {
            v[k] = v[k] / inv;
            if (w) v[k] *= w[i];
            am = fmaxf(am, fabsf(v[k]));
        }
    }
    if (out_f) {
        float* o = out_f + (size_t)blockIdx.x * out_stride;
#pragma unroll
        for (int k = 0; k < NQ_REG; k++) {
            int i = tid + k * bd;
            if (i < n) o[i] = v[k];
        }
        return;
    }
    am = block_max(am, red);
    const float s = 127.f / fmaxf(am, 1e-5f);
    const int t = blockIdx.x;
    float qs = 0.f;
#pragma unroll
    for (int k = 0; k < NQ_REG; k++) {
        int i = tid + k * bd;
        if (i < n) {
            int qi = (int)fminf(fmaxf(rintf(v[k] * s), -128.f), 127.f);
            q[q_at(t, i, kpad, x_ntp)] = (i8)qi;
            qs += (float)qi;
        }
    }
    for (int i = n + tid, kq = q_padded(kpad, x_ntp); i < kq; i += bd) q[q_at(t, i, kpad, x_ntp)] = 0;
    qs = block_sum(qs, red);
    if (tid == 0) {
        sx[blockIdx.x] = s;
        xsum[blockIdx.x] = (int)qs;
    }
}

// norm_quant for rows of n % 4 == 0 values that fit in registers as float4
// (n <= NQ_REG * blockDim), quantised (no out_f). Lean per element as
// mega.cu's mg_quant: 16-byte loads, y = (v * r) * w with r = 1 / sqrt(mean
// + eps) as the CPU's rms_quantize, one saturating conversion per code, 4
// codes stored as one word and summed by one dp4a. Why: ncu (S9-7) had the
// per-element path issue-bound at 2048 tokens (0.80 issued warps per
// scheduler, 29 us and 745 GB/s for 21 MB in): a division, clamps and a
// tiled address and a byte store per element.
__device__ void norm_quant_v4(const float* x, int n, int gate, const float* w, int do_norm, float eps, i8* q,
                              int kpad, float* sx, int* xsum, float* red, int x_ntp) {
    const int tid = threadIdx.x, bd = blockDim.x, n4 = n >> 2, t = blockIdx.x;
    float4 v[NQ_REG / 4];
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < NQ_REG / 4; k++) {
        const int i4 = tid + k * bd;
        v[k] = make_float4(0.f, 0.f, 0.f, 0.f);
        if (i4 < n4) {
            v[k] = ((const float4*)x)[i4];
            if (gate) {
                const float4 u = ((const float4*)(x + n))[i4];
                v[k] = make_float4(gated_act(v[k].x, u.x, gate), gated_act(v[k].y, u.y, gate),
                                   gated_act(v[k].z, u.z, gate), gated_act(v[k].w, u.w, gate));
            }
            ss += v[k].x * v[k].x + v[k].y * v[k].y + v[k].z * v[k].z + v[k].w * v[k].w;
        }
    }
    const float r = do_norm ? 1.f / sqrtf(block_sum(ss, red) / (float)n + eps) : 1.f;
    float am = 0.f;
#pragma unroll
    for (int k = 0; k < NQ_REG / 4; k++) {
        const int i4 = tid + k * bd;
        if (i4 < n4) {
            float4 y = v[k];
            if (do_norm) y = make_float4(y.x * r, y.y * r, y.z * r, y.w * r);
            if (w) {
                const float4 g = ((const float4*)w)[i4];
                y = make_float4(y.x * g.x, y.y * g.y, y.z * g.z, y.w * g.w);
            }
            v[k] = y;
            am = fmaxf(am, fmaxf(fmaxf(fabsf(y.x), fabsf(y.y)), fmaxf(fabsf(y.z), fabsf(y.w))));
        }
    }
    am = block_max(am, red);
    const float s = 127.f / fmaxf(am, 1e-5f);
    int qs = 0;
#pragma unroll
    for (int k = 0; k < NQ_REG / 4; k++) {
        const int i4 = tid + k * bd;
        if (i4 < n4) {
            const unsigned word = q8_word(v[k], s);
            qs = __dp4a((int)word, 0x01010101, qs);
            *(unsigned*)(q + q_at(t, 4 * i4, kpad, x_ntp)) = word;
        }
    }
    for (int i4 = n4 + tid, kq4 = q_padded(kpad, x_ntp) >> 2; i4 < kq4; i4 += bd)
        *(unsigned*)(q + q_at(t, 4 * i4, kpad, x_ntp)) = 0u;
    qs = (int)block_sum((float)qs, red);  // exact: |sum| < 2^24
    if (tid == 0) {
        sx[t] = s;
        xsum[t] = qs;
    }
}

// One block per token. v = [rmsnorm](load_in(...)) [* w]; then either write
// v as f32 (out_f != 0) or quantise per token as BitNet does:
// s = 127 / max(max|v|, 1e-5), q = clamp(rint(v * s), -128, 127), padding
// q[n..kpad) with zeros, and record s and sum(q). `x_ntp` > 0: q in the
// TMA GEMM's tiled order (q_at).
extern "C" __global__ void norm_quant(const float* in, int n, int in_stride, int gate, const float* w,
                                      int do_norm, float eps, i8* q, int kpad, float* sx, int* xsum,
                                      float* out_f, int out_stride, int x_ntp) {
    pdl_wait();
    __shared__ float red[32];
    const float* x = in + (size_t)blockIdx.x * in_stride;
    if (!out_f && (n & 3) == 0 && (in_stride & 3) == 0 && ((size_t)in & 15) == 0 && ((size_t)w & 15) == 0 &&
        n <= NQ_REG * (int)blockDim.x) {
        norm_quant_v4(x, n, gate, w, do_norm, eps, q, kpad, sx, xsum, red, x_ntp);
        return;
    }
    if (n <= NQ_REG * (int)blockDim.x) {
        norm_quant_regs(x, n, gate, w, do_norm, eps, q, kpad, sx, xsum, out_f, out_stride, red, x_ntp);
        return;
    }
    float inv = 1.f;
    if (do_norm) {
        float ss = 0.f;
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            float v = load_in(x, n, i, gate);
            ss += v * v;
        }
        ss = block_sum(ss, red);
        inv = sqrtf(ss / (float)n + eps);
    }
    if (out_f) {
        float* o = out_f + (size_t)blockIdx.x * out_stride;
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            float v = load_in(x, n, i, gate) / inv;
            o[i] = w ? v * w[i] : v;
        }
        return;
    }
    float am = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = load_in(x, n, i, gate) / inv;
        if (w) v *= w[i];
        am = fmaxf(am, fabsf(v));
    }
    am = block_max(am, red);
    const float s = 127.f / fmaxf(am, 1e-5f);
    float qs = 0.f;
    for (int i = threadIdx.x, kq = q_padded(kpad, x_ntp); i < kq; i += blockDim.x) {
        int qi = 0;
        if (i < n) {
            float v = load_in(x, n, i, gate) / inv;
            if (w) v *= w[i];
            qi = (int)fminf(fmaxf(rintf(v * s), -128.f), 127.f);
        }
        q[q_at(blockIdx.x, i, kpad, x_ntp)] = (i8)qi;
        qs += (float)qi;
    }
    qs = block_sum(qs, red);
    if (threadIdx.x == 0) {
        sx[blockIdx.x] = s;
        xsum[blockIdx.x] = (int)qs;
    }
}

// norm_quant for calls of many tokens: W warps per token, blocks of
// max(1, 8 / W) tokens, each lane holding up to R float4 of its token's row
// (n <= 128 W R, n % 4 == 0, quantised: no out_f). Same per-element
// arithmetic as norm_quant_v4; the sums run in another order (the code sum
// is exact either way). Why: ncu (S13-1) had the block-per-token kernel at
// 26 us per 2560-wide call of 2048 tokens (~1 TB/s), its warps stalled
// mostly on its three block-wide reductions (2 barriers each); here a
// reduction is warp shuffles plus, for W > 1, one named barrier of the
// token's warps. (S7-8's one-warp kernel divided per element and was
// issue-bound; this one multiplies as norm_quant_v4.)
// bar.sync of group grp's N threads on barrier 1 + grp (grp < G <= 8), the
// id an immediate: ptxas then reserves ids up to G only. With the id in a
// register it reserved all 16, which capped the quantiser at 4 blocks an SM
// (ncu, S29-4: norm_quant_w8r3 at 50% theoretical occupancy, "Block Limit
// Barriers 4").
template <int G, int N>
__device__ __forceinline__ void group_bar(int grp) {
#define GROUP_BAR_CASE(K)                                                  \
    case K:                                                                \
        if constexpr (K < G) asm volatile("bar.sync %0, %1;" ::"n"(K + 1), "n"(N) : "memory"); \
        break;
    static_assert(G >= 1 && G <= 8, "group count");
    if constexpr (G == 1) {
        asm volatile("bar.sync 1, %0;" ::"n"(N) : "memory");
        return;
    }
    switch (grp) {
        GROUP_BAR_CASE(0)
        GROUP_BAR_CASE(1)
        GROUP_BAR_CASE(2)
        GROUP_BAR_CASE(3)
        GROUP_BAR_CASE(4)
        GROUP_BAR_CASE(5)
        GROUP_BAR_CASE(6)
        GROUP_BAR_CASE(7)
    }
#undef GROUP_BAR_CASE
}
template <int W, int R>
__device__ __forceinline__ void norm_quant_wg_body(const float* in, int n, int in_stride, int gate, const float* w,
                                                   int do_norm, float eps, i8* q, int kpad, float* sx, int* xsum,
                                                   int nt, int x_ntp) {
    constexpr int TPB = W >= 8 ? 1 : 8 / W, GT = 32 * W;
    __shared__ float red[3][W * TPB];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wi = warp % W, grp = warp / W;
    const int t = blockIdx.x * TPB + grp, gl = wi * 32 + lane, n4 = n >> 2;
    if (t >= nt) return;  // whole token groups: the named barriers below stay matched
    // Sum over the group's warps in warp order (every warp gets the same bits).
    auto group_reduce = [&](float v, int slot, bool mx) {
        v = mx ? warp_max(v) : warp_sum(v);
        if constexpr (W == 1) return v;
        if (lane == 0) red[slot][warp] = v;
        group_bar<TPB, GT>(grp);
        float a = red[slot][grp * W];
#pragma unroll
        for (int k = 1; k < W; k++) a = mx ? fmaxf(a, red[slot][grp * W + k]) : a + red[slot][grp * W + k];
        return a;
    };
    const float4* x = (const float4*)(in + (size_t)t * in_stride);
    float4 v[R];
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < R; k++) {
        const int i4 = gl + k * GT;
        v[k] = make_float4(0.f, 0.f, 0.f, 0.f);
        if (i4 < n4) {
            v[k] = x[i4];
            if (gate) {
                const float4 u = ((const float4*)((const float*)x + n))[i4];
                v[k] = make_float4(gated_act(v[k].x, u.x, gate), gated_act(v[k].y, u.y, gate),
                                   gated_act(v[k].z, u.z, gate), gated_act(v[k].w, u.w, gate));
            }
        }
    }
#pragma unroll
    for (int k = 0; k < R; k++) ss += v[k].x * v[k].x + v[k].y * v[k].y + v[k].z * v[k].z + v[k].w * v[k].w;
    const float r = do_norm ? 1.f / sqrtf(group_reduce(ss, 0, false) / (float)n + eps) : 1.f;
    float am = 0.f;
#pragma unroll
    for (int k = 0; k < R; k++) {
        const int i4 = gl + k * GT;
        if (i4 < n4) {
            float4 y = v[k];
            if (do_norm) y = make_float4(y.x * r, y.y * r, y.z * r, y.w * r);
            if (w) {
                const float4 g = __ldg((const float4*)w + i4);
                y = make_float4(y.x * g.x, y.y * g.y, y.z * g.z, y.w * g.w);
            }
            v[k] = y;
            am = fmaxf(am, fmaxf(fmaxf(fabsf(y.x), fabsf(y.y)), fmaxf(fabsf(y.z), fabsf(y.w))));
        }
    }
    am = group_reduce(am, 1, true);
    const float s = 127.f / fmaxf(am, 1e-5f);
    int qs = 0;
#pragma unroll
    for (int k = 0; k < R; k++) {
        const int i4 = gl + k * GT;
        if (i4 < n4) {
            const unsigned word = q8_word(v[k], s);
            qs = __dp4a((int)word, 0x01010101, qs);
            *(unsigned*)(q + q_at(t, 4 * i4, kpad, x_ntp)) = word;
        }
    }
    for (int i4 = n4 + gl, kq4 = q_padded(kpad, x_ntp) >> 2; i4 < kq4; i4 += GT)
        *(unsigned*)(q + q_at(t, 4 * i4, kpad, x_ntp)) = 0u;
    qs = (int)group_reduce((float)qs, 2, false);  // exact: |sum| < 2^24
    if (gl == 0) {
        sx[t] = s;
        xsum[t] = qs;
    }
}
// The arguments after R: the kernel's __launch_bounds__.
#define NORM_QUANT_WG_B(NAME, W, R, ...)                                                                         \
    extern "C" __global__ void __launch_bounds__(__VA_ARGS__) NAME(const float* in, int n, int in_stride, int gate,    \
                                                            const float* w, int do_norm, float eps, i8* q,     \
                                                            int kpad, float* sx, int* xsum, int nt, int x_ntp) { \
        pdl_wait();                                                                                            \
        norm_quant_wg_body<W, R>(in, n, in_stride, gate, w, do_norm, eps, q, kpad, sx, xsum, nt, x_ntp);       \
    }
#define NORM_QUANT_WG(NAME, W, R) NORM_QUANT_WG_B(NAME, W, R, W >= 8 ? 32 * W : 256)
// R fitted to the row (2B4T: 2560 and 6912 wide): the loops over R are
// unrolled and predicated, so a lane's unused float4 still issue their
// instructions (ncu, S25-3: norm_quant_w8 at 2560 wide, every memory unit
// under 50%, the SM's pipes at 47%).
NORM_QUANT_WG(norm_quant_w1, 1, 20)
NORM_QUANT_WG(norm_quant_w2, 2, 12)
NORM_QUANT_WG(norm_quant_w4r5, 4, 5)
NORM_QUANT_WG(norm_quant_w4, 4, 14)
// Blocks an SM the bounds ask for (NVRTC 13.0): w8r3 (2560-wide rows) 8
// at 32 registers, no spill (34 and 6 blocks without); w8r7 (6912) 5 at its
// 48 registers (without the bound ptxas spilled 4 bytes there since
// group_bar; 20 bytes at 40 registers for 6).
#ifndef NQ_R3_MINB
#define NQ_R3_MINB 8
#endif
#ifndef NQ_R7_MINB
#define NQ_R7_MINB 5
#endif
NORM_QUANT_WG_B(norm_quant_w8r3, 8, 3, 256, NQ_R3_MINB)
NORM_QUANT_WG_B(norm_quant_w8r7, 8, 7, 256, NQ_R7_MINB)
NORM_QUANT_WG(norm_quant_w8, 8, 8)
NORM_QUANT_WG(norm_quant_w16r2, 16, 2)
NORM_QUANT_WG(norm_quant_w16, 16, 4)

// RoPE NEOX on q and k of the fused [q | k | v] rows, whose q and k heads
// are pair-interleaved (row 2j, 2j+1 of a head = dims j, j + hd/2; see
// forward.rs): rotated q goes to qr [token][n_heads * hd] in natural order,
// rotated k and v to the cache [kv_head][cap][hd] (KV = u16 for f16 or
// float) at pos + t. rope[(p * hd/2 + i)] = (cos, sin) of p * base^(-2i/hd).
template <typename KV>
__device__ void rope_kv_body(const float* qkv, int stride, int t, int p, const float2* rope, int n_heads, int n_kv,
                             int hd, int cap, KV* kc, KV* vc, float* qr) {
    const int half = hd / 2;
    const float* row = qkv + (size_t)t * stride;
    const float2* cs = rope + (size_t)p * half;
    const int nq = n_heads * half, nk = n_kv * half;
    for (int idx = threadIdx.x; idx < nq + nk; idx += blockDim.x) {
        int h = idx < nq ? idx / half : (idx - nq) / half;
        int i = idx % half;
        const float* v = idx < nq ? row + h * hd : row + n_heads * hd + h * hd;
        float2 c = cs[i];
        const float2 o = rope_pair(v[2 * i], v[2 * i + 1], c);
        const float o1 = o.x, o2 = o.y;
        if (idx < nq) {
            float* q = qr + (size_t)t * n_heads * hd + h * hd;
            q[i] = o1;
            q[i + half] = o2;
        } else {
            KV* k = kc + ((size_t)h * cap + p) * hd;
            kv_store(k + i, o1);
            kv_store(k + i + half, o2);
        }
    }
    const float* vr = row + (n_heads + n_kv) * hd;
    for (int idx = threadIdx.x; idx < n_kv * hd; idx += blockDim.x) {
        int h = idx / hd, d = idx % hd;
        kv_store(vc + ((size_t)h * cap + p) * hd + d, vr[idx]);
    }
}
#define ROPE_KV(SUF, KV)                                                                                         \
    extern "C" __global__ void rope_kv_##SUF(const float* qkv, int stride, const int* pos, const float2* rope,     \
                                             int n_heads, int n_kv, int hd, int cap, KV* kc, KV* vc, float* qr) { \
        pdl_wait();                                                                                               \
        const int t = blockIdx.x;                                                                                 \
        rope_kv_body<KV>(qkv, stride, t, pos[0] + t, rope, n_heads, n_kv, hd, cap, kc, vc, qr);                   \
    }
ROPE_KV(f16, u16)
ROPE_KV(f32, float)

// A batched decode step (one token of each of several sequences): token t's
// cache and position. k / v: the cache's layer-0 K and V rows; layer li's
// start li * n_kv * cap * hd elements further (CudaCache's layout).
struct BatchSeq {
    unsigned long long k, v;
    int cap, pos;
};
__device__ __forceinline__ size_t batch_layer_off(const BatchSeq& s, int li, int n_kv, int hd) {
    return (size_t)li * n_kv * s.cap * hd;
}
#define ROPE_KV_BATCH(SUF, KV)                                                                                     \
    extern "C" __global__ void rope_kv_batch_##SUF(const float* qkv, int stride, const BatchSeq* seqs, int li,     \
                                                   const float2* rope, int n_heads, int n_kv, int hd, float* qr) {  \
        pdl_wait();                                                                                                 \
        const int t = blockIdx.x;                                                                                   \
        const BatchSeq s = seqs[t];                                                                                 \
        const size_t off = batch_layer_off(s, li, n_kv, hd);                                                    \
        rope_kv_body<KV>(qkv, stride, t, s.pos, rope, n_heads, n_kv, hd, s.cap, (KV*)s.k + off, (KV*)s.v + off, qr); \
    }
ROPE_KV_BATCH(f16, u16)
ROPE_KV_BATCH(f32, float)

// Split-K attention. Grid (split, head, token); split s covers keys
// [64 s, 64 s + 64) of the causal range 0..=pos+t and writes the running
// max m, the sum l of exp(score - m) and sum exp(score - m) * v to part
// [token][head][split][hd + 2]. The last split block of a (head, token) to
// finish (counted in cnt, which it resets to 0) merges the splits into out
// [token][n_heads * hd]. q: [token][q_stride], rotated. KV: the cache
// element (u16 = f16 bits, or float).
#define ATT_CHUNK 64
// Query row t over its n_keys keys (kc / vc: its layer's rows).
template <typename KV>
__device__ __forceinline__ void attn_partial_body(const float* qr, int q_stride, const KV* kc, const KV* vc, int t,
                                                  int n_keys, int n_heads, int n_kv, int hd, int cap, float scale,
                                                  int n_split, float* part, int* cnt, float* outp, int out_stride) {
    __shared__ float qs[256];
    __shared__ float sc[ATT_CHUNK];
    __shared__ float red[32];
    __shared__ int last;
    const int sp = blockIdx.x, h = blockIdx.y, j0 = sp * ATT_CHUNK;
    const size_t pstride = hd + 2;
    // One split holds every key (short contexts): it writes the output itself.
    const int used = (n_keys + ATT_CHUNK - 1) / ATT_CHUNK;
    float* base = part + ((size_t)t * n_heads + h) * n_split * pstride;
    if (j0 < n_keys) {
        float* out = base + sp * pstride;
        const int nj = min(ATT_CHUNK, n_keys - j0);
        const int kvh = h / (n_heads / n_kv);
        const float* q = qr + (size_t)t * q_stride + h * hd;
        for (int d = threadIdx.x; d < hd; d += blockDim.x) qs[d] = q[d] * scale;
        __syncthreads();
        const KV* kb = kc + ((size_t)kvh * cap + j0) * hd;
        float mx = NEG_INF;
        for (int j = threadIdx.x; j < nj; j += blockDim.x) {
            const float s = kv_dot(qs, kb + (size_t)j * hd, hd);
            sc[j] = s;
            mx = fmaxf(mx, s);
        }
        mx = block_max(mx, red);
        float l = 0.f;
        for (int j = threadIdx.x; j < nj; j += blockDim.x) {
            float e = expf(sc[j] - mx);
            sc[j] = e;
            l += e;
        }
        l = block_sum(l, red);  // synchronises, so sc is complete below
        const KV* vb = vc + ((size_t)kvh * cap + j0) * hd;
        for (int d = threadIdx.x; d < hd; d += blockDim.x) {
            float a = 0.f;
#pragma unroll 8
            for (int j = 0; j < nj; j++) a += sc[j] * kv_load(vb + (size_t)j * hd + d);
            if (used == 1) outp[(size_t)t * out_stride + h * hd + d] = a / l;
            else out[2 + d] = a;
        }
        if (threadIdx.x == 0) {
            out[0] = mx;
            out[1] = l;
        }
    }
    if (used == 1) return;
    // Publish this split, then let the last one merge.
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        int* c = cnt + (size_t)t * n_heads + h;
        last = atomicAdd(c, 1) == (int)gridDim.x - 1;
        if (last) *c = 0;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    float m = NEG_INF;
    for (int s = 0; s < used; s++) m = fmaxf(m, __ldcg(base + s * pstride));
    float l = 0.f;
    for (int s = 0; s < used; s++) l += __ldcg(base + s * pstride + 1) * expf(__ldcg(base + s * pstride) - m);
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float a = 0.f;
        for (int s = 0; s < used; s++) a += __ldcg(base + s * pstride + 2 + d) * expf(__ldcg(base + s * pstride) - m);
        outp[(size_t)t * out_stride + h * hd + d] = a / l;
    }
}
#define ATTN_PARTIAL(SUF, KV)                                                                                        \
    extern "C" __global__ void __launch_bounds__(128)                                                                \
        attn_partial_##SUF(const float* qr, int q_stride, const KV* kc, const KV* vc, const int* pos, int n_heads,    \
                           int n_kv, int hd, int cap, float scale, int n_split, float* part, int* cnt, float* outp,    \
                           int out_stride) {                                                                         \
        pdl_launch();                                                                                                \
        pdl_wait();                                                                                                  \
        const int t = blockIdx.z;                                                                                    \
        attn_partial_body<KV>(qr, q_stride, kc, vc, t, pos[0] + t + 1, n_heads, n_kv, hd, cap, scale, n_split, part,  \
                              cnt, outp, out_stride);                                                                \
    }
ATTN_PARTIAL(f16, u16)
ATTN_PARTIAL(f32, float)
// The batched step's attention: token t over its own sequence's keys
// (seqs[t]: its cache, its position); grid (split, head, token) as above,
// n_split covering the longest sequence (blocks past a shorter one's keys
// only count themselves in).
#define ATTN_PARTIAL_BATCH(SUF, KV)                                                                                  \
    extern "C" __global__ void __launch_bounds__(128)                                                                \
        attn_partial_batch_##SUF(const float* qr, int q_stride, const BatchSeq* seqs, int li, int n_heads, int n_kv, \
                                 int hd, float scale, int n_split, float* part, int* cnt, float* outp,               \
                                 int out_stride) {                                                                   \
        pdl_launch();                                                                                                \
        pdl_wait();                                                                                                  \
        const int t = blockIdx.z;                                                                                    \
        const BatchSeq s = seqs[t];                                                                                  \
        const size_t off = batch_layer_off(s, li, n_kv, hd);                                                     \
        attn_partial_body<KV>(qr, q_stride, (const KV*)s.k + off, (const KV*)s.v + off, t, s.pos + 1, n_heads, n_kv, \
                              hd, s.cap, scale, n_split, part, cnt, outp, out_stride);                               \
    }
ATTN_PARTIAL_BATCH(f16, u16)
ATTN_PARTIAL_BATCH(f32, float)

// logits[t][r] = x[t] . E[r] for up to 8 tokens; a warp per row, 16-byte
// loads of 8 halves. Needs hidden % 8 == 0.
extern "C" __global__ void __launch_bounds__(256) lm_head_f16(const u16* E, int vocab, int hidden, const float* x,
                                                            int nt, float* logits) {
    pdl_wait();
    const int lane = threadIdx.x & 31;
    const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= vocab) return;
    const uint4* er = (const uint4*)(E + (size_t)r * hidden);
    float acc[8];
#pragma unroll
    for (int t = 0; t < 8; t++) acc[t] = 0.f;
    for (int c = lane; c < hidden / 8; c += 32) {
        uint4 e = __ldg(er + c);
        float ev[8];
        u32 ws[4] = {e.x, e.y, e.z, e.w};
#pragma unroll
        for (int k = 0; k < 4; k++) {
            ev[2 * k] = h2f((u16)(ws[k] & 0xffff));
            ev[2 * k + 1] = h2f((u16)(ws[k] >> 16));
        }
#pragma unroll
        for (int t = 0; t < 8; t++) {
            if (t < nt) {
                const float4* xp = (const float4*)(x + (size_t)t * hidden + 8 * c);
                float4 a = __ldg(xp), b = __ldg(xp + 1);
                acc[t] += ev[0] * a.x + ev[1] * a.y + ev[2] * a.z + ev[3] * a.w + ev[4] * b.x + ev[5] * b.y +
                          ev[6] * b.z + ev[7] * b.w;
            }
        }
    }
#pragma unroll
    for (int t = 0; t < 8; t++) {
        if (t < nt) {
            float s = warp_sum(acc[t]);
            if (lane == 0) logits[(size_t)t * vocab + r] = s;
        }
    }
}

// lm_head_f16 for 2-8 tokens: a warp takes LM_R rows, so each loaded slice
// of x feeds LM_R rows (one row per warp made the x loads, not E's bytes, the
// limit: a batched step's two 8-token passes took ~0.6 ms each). Every
// (row, token) sums in lm_head_f16's order: the same bits.
#define LM_R 4
extern "C" __global__ void __launch_bounds__(256) lm_head_f16_rows(const u16* E, int vocab, int hidden,
                                                                 const float* x, int nt, float* logits) {
    pdl_wait();
    const int lane = threadIdx.x & 31;
    const int r0 = (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * LM_R;
    if (r0 >= vocab) return;
    const int nr = min(LM_R, vocab - r0);
    float acc[LM_R][8];
#pragma unroll
    for (int r = 0; r < LM_R; r++)
#pragma unroll
        for (int t = 0; t < 8; t++) acc[r][t] = 0.f;
    for (int c = lane; c < hidden / 8; c += 32) {
        float ev[LM_R][8];
#pragma unroll
        for (int r = 0; r < LM_R; r++) {
            const uint4 e = r < nr ? __ldg((const uint4*)(E + (size_t)(r0 + r) * hidden) + c) : make_uint4(0, 0, 0, 0);
            const u32 ws[4] = {e.x, e.y, e.z, e.w};
#pragma unroll
            for (int k = 0; k < 4; k++) {
                ev[r][2 * k] = h2f((u16)(ws[k] & 0xffff));
                ev[r][2 * k + 1] = h2f((u16)(ws[k] >> 16));
            }
        }
#pragma unroll
        for (int t = 0; t < 8; t++) {
            if (t < nt) {
                const float4* xp = (const float4*)(x + (size_t)t * hidden + 8 * c);
                const float4 a = __ldg(xp), b = __ldg(xp + 1);
#pragma unroll
                for (int r = 0; r < LM_R; r++)
                    acc[r][t] += ev[r][0] * a.x + ev[r][1] * a.y + ev[r][2] * a.z + ev[r][3] * a.w +
                                 ev[r][4] * b.x + ev[r][5] * b.y + ev[r][6] * b.z + ev[r][7] * b.w;
            }
        }
    }
#pragma unroll
    for (int r = 0; r < LM_R; r++)
#pragma unroll
        for (int t = 0; t < 8; t++) {
            if (t < nt) {
                const float s = warp_sum(acc[r][t]);
                if (lane == 0 && r < nr) logits[(size_t)t * vocab + r0 + r] = s;
            }
        }
}

// Greedy pick: index of the largest logit (lowest index on ties), one block
// of 1024 threads per row.
extern "C" __global__ void argmax_f32(const float* logits, int n, int* out) {
    __shared__ float bv[32];
    __shared__ int bi[32];
    const float* l = logits + (size_t)blockIdx.x * n;
    float v = NEG_INF;
    int idx = 0x7fffffff;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float x = l[i];
        if (x > v) {
            v = x;
            idx = i;
        }
    }
    warp_argmax(v, idx);
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    if (lane == 0) {
        bv[w] = v;
        bi[w] = idx;
    }
    __syncthreads();
    if (w == 0) {
        int nw = blockDim.x >> 5;
        v = lane < nw ? bv[lane] : NEG_INF;
        idx = lane < nw ? bi[lane] : 0x7fffffff;
        warp_argmax(v, idx);
        if (lane == 0) out[blockIdx.x] = idx == 0x7fffffff ? 0 : idx;
    }
}

// The last kernel of the one-token decode graph: the step advances itself.
// The greedy token (the fused head's argmax key in `best`, else `argmax`)
// becomes the next step's input and is kept in hist[pos % hist_len]; pos
// moves to the next position. Why: a greedy generation can queue its steps
// back to back and read the tokens once, instead of a host round trip per
// token (H100, S8-8: 1253 against 1278 us per step), and replays need no
// copy between them. The host overwrites tok and pos whenever it feeds its
// own token (`decode_graph`).
extern "C" __global__ void decode_advance(const u64* best, const int* argmax, int* tok, int* pos, int* hist,
                                          int hist_len, int* fed) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    int t;
    if (best) {
        const u64 k = *best;
        t = k == 0 ? 0 : (int)~(unsigned)k;  // key 0: no finite logit (as the host reads it)
    } else {
        t = *argmax;
    }
    const int p = *pos;
    hist[p % hist_len] = t;
    tok[0] = t;
    pos[0] = p + 1;
    *fed = 1;  // mega_begin takes tok and pos as they are
}

// The k largest logits of one row (k <= TK_MAX) in the host sampler's order
// (engine/sampling.rs `ranked`: falling value by f32 total order, the lower
// token first on ties), so a sampled decode step moves k pairs to the host
// instead of the vocabulary's logits. Each candidate is one u64: the value's
// total-order key above the complemented token index, so the largest u64 is
// the best candidate and every candidate is distinct. Block b takes TK_PER
// logits and pulls its k best one block-wide maximum at a time into part;
// the last block to finish does the same over those gridDim.x * k.
#define TK_MAX 64
#define TK_THREADS 256
#define TK_PER_THREAD 8
#define TK_PER (TK_THREADS * TK_PER_THREAD)
#define TK_MERGE (TK_MAX * 64 / TK_THREADS)  // merge candidates per thread: up to 64 blocks
__device__ __forceinline__ u64 tk_cand(float v, int i) {
    const unsigned b = __float_as_uint(v);
    const unsigned key = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
    return ((u64)key << 32) | (u64)(~(unsigned)i);
}
// The block-wide maximum of every thread's m (256 threads); red: 8 u64.
__device__ __forceinline__ u64 tk_block_max(u64 m, u64* red) {
    for (int o = 16; o > 0; o >>= 1) {
        const u64 x = __shfl_xor_sync(0xffffffffu, m, o);
        m = x > m ? x : m;
    }
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = m;
    __syncthreads();
    m = red[0];
#pragma unroll
    for (int w = 1; w < TK_THREADS / 32; w++) m = red[w] > m ? red[w] : m;
    __syncthreads();  // red reused by the next round
    return m;
}
// Pull the k best of the N candidates per thread in c (0 = none) into out.
template <int N>
__device__ __forceinline__ void tk_select(u64 (&c)[N], int k, u64* out, u64* red) {
    for (int r = 0; r < k; r++) {
        u64 m = 0;
#pragma unroll
        for (int j = 0; j < N; j++) m = c[j] > m ? c[j] : m;
        m = tk_block_max(m, red);
#pragma unroll
        for (int j = 0; j < N; j++)
            if (c[j] == m) c[j] = 0;  // candidates are distinct: one thread drops it
        if (threadIdx.x == 0) out[r] = m;
    }
}
extern "C" __global__ void __launch_bounds__(TK_THREADS) topk_logits(const float* logits, int n, int k, u64* part,
                                                                      int* cnt, float* out_v, int* out_i) {
    __shared__ u64 red[TK_THREADS / 32];
    __shared__ int last;
    const int base = blockIdx.x * TK_PER;
    u64 c[TK_PER_THREAD];
#pragma unroll
    for (int j = 0; j < TK_PER_THREAD; j++) {
        const int i = base + j * TK_THREADS + threadIdx.x;
        c[j] = i < n ? tk_cand(logits[i], i) : 0;
    }
    tk_select(c, k, part + (size_t)blockIdx.x * k, red);
    // Publish; the last block merges (as the attention merge of mega.cu).
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        last = atomicAdd(cnt, 1) == (int)gridDim.x - 1;
        if (last) {
            *cnt = 0;
            __threadfence();
        }
    }
    __syncthreads();
    if (!last) return;
    u64 m[TK_MERGE];
#pragma unroll
    for (int j = 0; j < TK_MERGE; j++) {
        const int i = j * TK_THREADS + threadIdx.x;
        m[j] = i < (int)gridDim.x * k ? __ldcg(part + i) : 0;
    }
    __shared__ u64 best[TK_MAX];
    tk_select(m, k, best, red);
    __syncthreads();
    if (threadIdx.x < k) {
        const u64 b = best[threadIdx.x];
        const int i = b ? (int)~(unsigned)(b & 0xffffffffu) : -1;
        out_i[threadIdx.x] = i;
        out_v[threadIdx.x] = i >= 0 ? logits[i] : 0.f;
    }
}

// Test only: q[i] = a[i] / b[i] through div_rcp / div_by (common.cuh), for
// the comparison with IEEE division on the host.
extern "C" __global__ void fdiv_check(const float* a, const float* b, int n, float* q) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) q[i] = div_by(a[i], b[i], div_rcp(b[i]));
}
