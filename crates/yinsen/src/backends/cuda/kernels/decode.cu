// One-token decode kernels. Each matrix kernel fuses the RMSNorm + int8
// quantisation of its input in front (every block recomputes it from the
// f32 row in shared memory: no separate norm kernel, no int8 buffer) and
// its consumer behind (store, residual add, or RoPE + KV-cache write).
// PDL (programmatic dependent launch, sm_90+): a kernel lets the next one
// start at once; the next one loads its weights, which no kernel writes,
// and only then waits for its predecessor to finish. Without the launch
// attribute (or before sm_90) both calls are no-ops.

#define DM_THREADS 256
#define DM_CPL 8      // weight chunks per lane held in registers
#define DM_NMAX 8192  // largest input width (f32 row in shared memory)

// Block-wide: v = [rmsnorm](load_in(in)) [* w] into vs, then int8 into xq
// (zero-padded to kpad). Same arithmetic as norm_quant. Returns (sx, xsum).
// Global loads go in batches of DQ_B per thread: one L2 round trip per
// batch instead of one per element (the prologue is latency-bound).
#define DQ_B 12
__device__ void dec_quant(const float* in, int n, int gate, const float* nw, float eps, int kpad, float* vs,
                          i8* xq, float* red, float* sx_out, int* xsum_out) {
    const int tid = threadIdx.x, bd = blockDim.x;
    float ss = 0.f;
    for (int i0 = tid; i0 < n; i0 += DQ_B * bd) {
        float v[DQ_B];
#pragma unroll
        for (int k = 0; k < DQ_B; k++) {
            int i = i0 + k * bd;
            v[k] = i < n ? load_in(in, n, i, gate) : 0.f;
        }
#pragma unroll
        for (int k = 0; k < DQ_B; k++) {
            int i = i0 + k * bd;
            if (i < n) vs[i] = v[k];
            ss += v[k] * v[k];
        }
    }
    float inv = 1.f;
    if (nw) {
        ss = block_sum(ss, red);
        inv = sqrtf(ss / (float)n + eps);
    }
    float am = 0.f;
    for (int i0 = tid; i0 < n; i0 += DQ_B * bd) {
        float w[DQ_B];
#pragma unroll
        for (int k = 0; k < DQ_B; k++) {
            int i = i0 + k * bd;
            w[k] = nw && i < n ? nw[i] : 1.f;
        }
#pragma unroll
        for (int k = 0; k < DQ_B; k++) {
            int i = i0 + k * bd;
            if (i < n) {
                float v = vs[i] / inv;
                if (nw) v *= w[k];
                vs[i] = v;
                am = fmaxf(am, fabsf(v));
            }
        }
    }
    am = block_max(am, red);
    const float s = 127.f / fmaxf(am, 1e-5f);
    float qs = 0.f;
    for (int i = tid; i < kpad; i += bd) {
        int qi = i < n ? (int)fminf(fmaxf(rintf(vs[i] * s), -128.f), 127.f) : 0;
        xq[i] = (i8)qi;
        qs += (float)qi;
    }
    qs = block_sum(qs, red);  // synchronises: xq is complete after this
    *sx_out = s;
    *xsum_out = (int)qs;
}

// y = W q(in) for one token, LPR lanes per row. mode 1: out[row] = y;
// 2: out[row] += y; 3: RoPE on the pair-interleaved q|k rows (layout rows
// 2j, 2j+1 of a head are dims j, j + hd/2), rotated q to out (natural
// order), k and v to the caches (KV: u16 = f16 bits, or float) at pos[0].
template <int LPR, typename KV>
__device__ __forceinline__ void dec_mm_body(const uint4* __restrict__ W, int n_rows, int chunks, const float* in,
                                            int n, int gate, const float* nw, float eps,
                                            const float* __restrict__ row_scale, float* out, int mode,
                                            const int* pos, const float2* rope, int n_heads, int n_kv, int hd,
                                            int cap, KV* kc, KV* vc) {
    __shared__ __align__(16) float vs[DM_NMAX];
    __shared__ __align__(16) i8 xq[DM_NMAX];
    __shared__ float red[32];
    pdl_launch();
    const int lane = threadIdx.x & 31, sub = lane % LPR;
    const int row = (blockIdx.x * (DM_THREADS / 32) + (threadIdx.x >> 5)) * (32 / LPR) + lane / LPR;
    const bool live = row < n_rows;
    const uint4* wr = W + (size_t)(live ? row : 0) * chunks;
    uint4 wv[DM_CPL];
#pragma unroll
    for (int k = 0; k < DM_CPL; k++) {
        int c = sub + k * LPR;
        wv[k] = live && c < chunks ? __ldg(wr + c) : make_uint4(0, 0, 0, 0);
    }
    pdl_wait();
    float sx;
    int xsum;
    dec_quant(in, n, gate, nw, eps, chunks * 64, vs, xq, red, &sx, &xsum);
    const uint4* x4 = (const uint4*)xq;
    int acc = 0;
#pragma unroll
    for (int k = 0; k < DM_CPL; k++) {
        int c = sub + k * LPR;
        if (c < chunks) {
            uint4 w = wv[k];
            acc = dot_word(w.x, x4[4 * c + 0], acc);
            acc = dot_word(w.y, x4[4 * c + 1], acc);
            acc = dot_word(w.z, x4[4 * c + 2], acc);
            acc = dot_word(w.w, x4[4 * c + 3], acc);
        }
    }
    if (live)
        for (int c = sub + DM_CPL * LPR; c < chunks; c += LPR) {
            uint4 w = __ldg(wr + c);
            acc = dot_word(w.x, x4[4 * c + 0], acc);
            acc = dot_word(w.y, x4[4 * c + 1], acc);
            acc = dot_word(w.z, x4[4 * c + 2], acc);
            acc = dot_word(w.w, x4[4 * c + 3], acc);
        }
#pragma unroll
    for (int o = LPR / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    const float y = (float)(acc - xsum) * ((live ? row_scale[row] : 0.f) / sx);
    // Partner row (the other half of a RoPE pair) sits LPR lanes away.
    const float partner = __shfl_xor_sync(0xffffffffu, y, LPR < 32 ? LPR : 0);
    if (!live || sub != 0) return;
    if (mode == 1) {
        out[row] = y;
        return;
    }
    if (mode == 2) {
        out[row] += y;
        return;
    }
    const int p = pos[0];
    qkv_rope_store(row, y, partner, p, rope + (size_t)p * (hd / 2), n_heads, n_kv, hd, cap, out, kc, vc);
}

#define DEC_MM(L, SUF, KV)                                                                                 \
    extern "C" __global__ void __launch_bounds__(DM_THREADS) dec_mm_l##L##_##SUF(                          \
        const uint4* W, int n_rows, int chunks, const float* in, int n, int gate, const float* nw, float eps, \
        const float* row_scale, float* out, int mode, const int* pos, const float2* rope, int n_heads,     \
        int n_kv, int hd, int cap, KV* kc, KV* vc) {                                                       \
        dec_mm_body<L, KV>(W, n_rows, chunks, in, n, gate, nw, eps, row_scale, out, mode, pos, rope,       \
                           n_heads, n_kv, hd, cap, kc, vc);                                                \
    }
DEC_MM(8, f16, u16)
DEC_MM(16, f16, u16)
DEC_MM(8, f32, float)
DEC_MM(16, f32, float)

// Order-preserving key of (logit, index) for a u64 atomicMax: larger logit
// wins, then the lower index. 0 means "nothing yet".
__device__ __forceinline__ u64 argmax_key(float v, int i) {
    u32 u = __float_as_uint(v);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((u64)u << 32) | (u64)(~(u32)i);
}


__device__ __forceinline__ float dot8(uint4 e, const float* xp) {
    float4 a = *(const float4*)xp, b = *(const float4*)(xp + 4);
    return h2f((u16)(e.x & 0xffff)) * a.x + h2f((u16)(e.x >> 16)) * a.y + h2f((u16)(e.y & 0xffff)) * a.z +
           h2f((u16)(e.y >> 16)) * a.w + h2f((u16)(e.z & 0xffff)) * b.x + h2f((u16)(e.z >> 16)) * b.y +
           h2f((u16)(e.w & 0xffff)) * b.z + h2f((u16)(e.w >> 16)) * b.w;
}

// The final RMSNorm of x into xs (shared memory), block-wide.
__device__ __forceinline__ void lm_head_norm(const float* x, const float* nw, float eps, int hidden, float* xs,
                                             float* red) {
    float ss = 0.f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float v = x[i];
        xs[i] = v;
        ss += v * v;
    }
    ss = block_sum(ss, red);
    const float inv = sqrtf(ss / (float)hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) xs[i] = xs[i] / inv * nw[i];
    __syncthreads();
}

// The block's best (logit, row) over its 8 warps into the global argmax key.
__device__ __forceinline__ void lm_head_pick(float bv, int bi, float* bv_s, int* bi_s, u64* best) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        bv_s[warp] = bv;
        bi_s[warp] = bi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < 8; w++)
            if (bv_s[w] > bv || (bv_s[w] == bv && bi_s[w] < bi)) {
                bv = bv_s[w];
                bi = bi_s[w];
            }
        if (bi != 0x7fffffff) atomicMax(best, argmax_key(bv, bi));
    }
}

// Row formats of the decode lm_head: a row is `pieces` 16-byte pieces; a lane
// keeps U of them (and what their dot needs) in registers for the next row.
// f16: 8 halves per piece.
struct LmRowF16 {
    static constexpr int U = 16;  // hidden <= 4096 in one pass
    static constexpr int PER = 8;
    const u16* E;
    int hidden;
    __device__ int pieces() const { return hidden / 8; }
    __device__ const uint4* row(int r) const { return (const uint4*)(E + (size_t)r * hidden); }
    __device__ u16 aux(int, int) const { return 0; }
    __device__ float dot(uint4 p, u16, const float* xp) const { return dot8(p, xp); }
};
// Lane 0 of a row's warp: store its logit, keep the warp's best (first
// index on ties, rows ascending).
__device__ __forceinline__ void lm_head_keep(int r, float acc, float* logits, float& bv, int& bi) {
    if ((threadIdx.x & 31) == 0) {
        logits[r] = acc;
        if (acc > bv) {
            bv = acc;
            bi = r;
        }
    }
}

// Final RMSNorm + lm_head + greedy pick for one token. A warp per row, rows
// strided over a grid of a few blocks per SM (so the norm, redone by every
// block, stays cheap); the next row's pieces are loaded before this row's
// sum is reduced. best: u64 slot (zeroed by embed_dec) taking atomicMax of
// argmax_key. Needs hidden % 8 == 0, <= DM_NMAX.
template <typename Row>
__device__ void lm_head_body(Row R, int vocab, int hidden, const float* x, const float* nw, float eps,
                             float* logits, u64* best) {
    __shared__ __align__(16) float xs[DM_NMAX];
    __shared__ float red[32];
    __shared__ float bv_s[8];
    __shared__ int bi_s[8];
    pdl_launch();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = gridDim.x * 8, np = R.pieces();
    int r = blockIdx.x * 8 + warp;
    uint4 pv[Row::U];
    u16 av[Row::U];
    auto load_row = [&](int rr) {
        const int rs = rr < vocab ? rr : 0;
        const uint4* pr = R.row(rs);
#pragma unroll
        for (int k = 0; k < Row::U; k++) {
            const int c = lane + 32 * k;
            const bool in = rr < vocab && c < np;
            pv[k] = in ? __ldg(pr + c) : make_uint4(0, 0, 0, 0);
            av[k] = in ? R.aux(rs, c) : (u16)0;
        }
    };
    load_row(r);
    pdl_wait();
    lm_head_norm(x, nw, eps, hidden, xs, red);
    float bv = NEG_INF;
    int bi = 0x7fffffff;
    for (; r < vocab; r += nwarps) {
        float acc = 0.f;
#pragma unroll
        for (int k = 0; k < Row::U; k++) {
            const int c = lane + 32 * k;
            if (c < np) acc += R.dot(pv[k], av[k], xs + Row::PER * c);
        }
        const uint4* pr = R.row(r);
        for (int c = lane + 32 * Row::U; c < np; c += 32) acc += R.dot(__ldg(pr + c), R.aux(r, c), xs + Row::PER * c);
        load_row(r + nwarps);
        lm_head_keep(r, warp_sum(acc), logits, bv, bi);
    }
    lm_head_pick(bv, bi, bv_s, bi_s, best);
}

extern "C" __global__ void __launch_bounds__(256) lm_head_dec(const u16* E, int vocab, int hidden, const float* x,
                                                            const float* nw, float eps, float* logits, u64* best) {
    lm_head_body(LmRowF16{E, hidden}, vocab, hidden, x, nw, eps, logits, best);
}

// The screened pick's per-row bound constants (err_i = max|E - Ê|, abs_i =
// Σ max(|E|, |Ê|) over row i) and its per-step slots: fac = the token's
// factors (a, b) of bound_i = err_i a + abs_i b (block 0 writes them),
// keys[0] = the largest lower end lq - bound as an order-preserving key
// (0: none yet), keys[1] != 0: a non-finite value was seen (every row is a
// candidate then), keys[2]: pass 2's candidate rows (diagnostics). keys are
// zeroed before pass 1 (by mega_begin in the persistent decode's graph, so
// pass 1 keeps its programmatic launch under the last layer). xs: the
// step's normed x (block 0 of pass 1 writes it; pass 2 reads it instead of
// normalising x again in every block). wmax: pass 1's warps' largest lower
// ends, one per warp (tk_cand of the value and row; 0: none), from which
// the screened top-k picks the rows of its floor (null: not written).
struct ScreenArgs {
    const float* err;
    const float* abs_sum;
    float2* fac;
    unsigned* keys;
    float* xs;
    u64* wmax;
};

__device__ __forceinline__ unsigned order_key(float v) {
    const unsigned u = __float_as_uint(v);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float order_value(unsigned k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Row i's bound in f32, as head_screen.rs's bound32: widened for the
// roundings of its own arithmetic.
__device__ __forceinline__ float screen_bound(float err, float abs_sum, float lq, float2 ab) {
    return (err * ab.x + abs_sum * ab.y) * (1.f + 1.f / 1048576.f) + fabsf(lq) * (1.f / 2097152.f);
}

// The token's factors, as head_screen.rs's `factors` (f64, inflated by 0.1%
// twice, rounded up to f32) from the normed x (xs) and its 8-bit blocks
// (codes xq8, scales dxs) that pass 1 multiplies: a = ||x||_1, b = δ + γ (2
// max|x| + δ), δ = max |x - code dx|, γ = 2^-23 hidden. Block-wide; thread 0
// flags a non-finite value in keys[1] and stores them to fac_out (if any).
__device__ float2 screen_factors(const float* xs, const i8* xq8, const float* dxs, int hidden, unsigned* keys,
                                  float2* fac_out) {
    __shared__ double rd[2][8];
    __shared__ float rf[8];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    double l1 = 0.0, dl = 0.0;
    float hm = 0.f;
    bool bad = false;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const float v = xs[i];
        bad |= !isfinite(v) || !isfinite(dxs[i / 32]);
        l1 += fabs((double)v);
        hm = fmaxf(hm, fabsf(v));
        dl = fmax(dl, fabs((double)v - (double)xq8[i] * (double)dxs[i / 32]));
    }
    for (int o = 16; o > 0; o >>= 1) {
        l1 += __shfl_xor_sync(0xffffffffu, l1, o);
        dl = fmax(dl, __shfl_xor_sync(0xffffffffu, dl, o));
        hm = fmaxf(hm, __shfl_xor_sync(0xffffffffu, hm, o));
    }
    if (lane == 0) {
        rd[0][warp] = l1;
        rd[1][warp] = dl;
        rf[warp] = hm;
    }
    bad = __syncthreads_or(bad);
    l1 = dl = 0.0;
    hm = 0.f;
    for (int w = 0; w < 8; w++) {
        l1 += rd[0][w];
        dl = fmax(dl, rd[1][w]);
        hm = fmaxf(hm, rf[w]);
    }
    const double inflate = 1.001 * 1.001, gamma = (double)hidden / 8388608.0;
    const double a = inflate * l1, b = inflate * (dl + gamma * (2.0 * (double)hm + dl));
    const float2 ab = make_float2((float)a * (1.f + 1.1920929e-7f), (float)b * (1.f + 1.1920929e-7f));
    if (threadIdx.x == 0) {
        if (bad || !isfinite(ab.x) || !isfinite(ab.y)) atomicOr(keys + 1, 1u);
        if (fac_out) *fac_out = ab;
    }
    __syncthreads();  // rd / rf reuse
    return ab;
}

// Pass 1's per-row step on lane 0: lq kept, the largest lower end tracked
// (bv), a non-finite row flagged.
__device__ __forceinline__ void screen_keep(int r, float lq, float2 ab, float2 ea, ScreenArgs sa, float* out,
                                            float& bv, int& br) {
    if ((threadIdx.x & 31) == 0) {
        out[r] = lq;
        const float b = screen_bound(ea.x, ea.y, lq, ab);
        const float lo = lq - b;
        if (!isfinite(lo) || !isfinite(lq + b)) {
            atomicOr(sa.keys + 1, 1u);
        } else if (lo > bv) {
            bv = lo;
            br = r;
        }
    }
}

// The warp's largest lower end and its row into wmax, the block's into keys[0].
__device__ __forceinline__ void screen_put(float bv, int br, float* bv_s, ScreenArgs sa) {
    if ((threadIdx.x & 31) == 0) {
        if (sa.wmax) sa.wmax[blockIdx.x * 8 + (threadIdx.x >> 5)] = bv != NEG_INF ? tk_cand(bv, br) : 0ull;
        bv_s[threadIdx.x >> 5] = bv;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < 8; w++) bv = fmaxf(bv, bv_s[w]);
        if (bv != NEG_INF) atomicMax(sa.keys, order_key(bv));
    }
}

// Row rr's logit by the F16 head's own row dot, exactly as lm_head_body
// computes it (same lanes, same order, same sum), for the whole warp.
// The row's first P pieces per lane (hidden <= 2560) are loaded before any
// is used: a dot whose loads waited one by one took a round trip per piece
// (S12-4: the top-k floor's 88 rows, 30 us). The sum's order is by piece,
// as lm_head_body's, wherever the loads happen.
__device__ __forceinline__ float lm_f16_row_dot(const LmRowF16& R, int rr, const float* xs) {
    constexpr int P = 10;
    const int lane = threadIdx.x & 31, np = R.pieces();
    const uint4* pr = R.row(rr);
    uint4 pv[P];
#pragma unroll
    for (int k = 0; k < P; k++) {
        const int c = lane + 32 * k;
        pv[k] = c < np ? __ldg(pr + c) : make_uint4(0, 0, 0, 0);
    }
    float acc = 0.f;
#pragma unroll
    for (int k = 0; k < P; k++) {
        const int c = lane + 32 * k;
        if (c < np) acc += R.dot(pv[k], 0, xs + LmRowF16::PER * c);
    }
    for (int c = lane + 32 * P; c < np; c += 32) acc += R.dot(__ldg(pr + c), 0, xs + LmRowF16::PER * c);
    return warp_sum(acc);
}

// Blocks per SM the pass-2 kernels are compiled for: 4 caps them at 64
// registers (12 bytes of spills, off the row loop), 1 leaves them 80-84 (3
// blocks per SM). S12-7, H100, un-graphed: greedy rows 10.8 vs 11.7 us,
// top-k rows 12.4 vs 16.1 us.
#ifndef LM_PASS2_MINB
#define LM_PASS2_MINB 4
#endif

// One round of pass 2 over rows b0 .. b0 + 255: a thread per row tests its
// upper end lq + bound against `bar` (every row a candidate with `all`); the
// block's candidates go to a shared list that its warps share out, one row
// per warp at a time, and lane 0 of the warp gets `take(row, logit)` with
// the F16 head's own row dot. Returns the round's candidate count.
template <typename Take>
__device__ __forceinline__ unsigned screen_round(int b0, int vocab, const float* lq, const float* err,
                                                 const float* abs_sum, float2 ab, float bar, bool all,
                                                 const LmRowF16& R, const float* xs, int* cand_s, int* ncand_s,
                                                 Take take) {
    if (threadIdx.x == 0) *ncand_s = 0;
    __syncthreads();  // xs complete; the list empty
    const int r = b0 + threadIdx.x;
    if (r < vocab) {
        const float l = lq[r];
        if (all || l + screen_bound(err[r], abs_sum[r], l, ab) >= bar) cand_s[atomicAdd(ncand_s, 1)] = r;
    }
    __syncthreads();
    const int n = *ncand_s;
    for (int i = threadIdx.x >> 5; i < n; i += 8) {
        const int rr = cand_s[i];
        const float acc = lm_f16_row_dot(R, rr, xs);
        if ((threadIdx.x & 31) == 0) take(rr, acc);
    }
    __syncthreads();  // the list is read before the next round resets it
    return (unsigned)n;
}

// Pass 2 of the screened pick: a thread per row tests lq + bound against the
// largest lower end (every row is a candidate after a non-finite value); the
// block's candidates go to a shared list that its warps share out, one row
// per warp at a time (a warp scanning 32 rows of its own had to do its
// candidates one after another: the step waited for the warp with most).
// A candidate gets the F16 head's own row dot, exactly as lm_head_body
// computes it (pass 1's xs, same lanes, same sum), and the pick is
// lm_head_dec's: larger logit, then lower row (here in any order of rows).
__device__ __forceinline__ void pick_f16_body(const u16* E, int vocab, int hidden, const float* lq, const float* err,
                                              const float* abs_sum, const float2* fac, unsigned* keys,
                                              const float* xs_in, u64* best) {
    __shared__ __align__(16) float xs[DM_NMAX];
    __shared__ float bv_s[8];
    __shared__ int bi_s[8];
    __shared__ int cand_s[256];
    __shared__ int ncand_s;
    pdl_wait();  // pass 1 done (and the layers before it): xs, lq, fac, keys
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) xs[i] = xs_in[i];
    const float2 ab = *fac;
    const unsigned key = keys[0];
    const bool all = keys[1] != 0u || key == 0u;
    const float lmax = all ? NEG_INF : order_value(key);
    const LmRowF16 R{E, hidden};
    float bv = NEG_INF;
    int bi = 0x7fffffff;
    unsigned total = 0;
    for (int b0 = blockIdx.x * 256; b0 < vocab; b0 += gridDim.x * 256)  // block-uniform
        total += screen_round(b0, vocab, lq, err, abs_sum, ab, lmax, all, R, xs, cand_s, &ncand_s, [&](int rr, float acc) {
            if (acc > bv || (acc == bv && rr < bi)) {
                bv = acc;
                bi = rr;
            }
        });
    lm_head_pick(bv, bi, bv_s, bi_s, best);
    if (threadIdx.x == 0 && total) atomicAdd(keys + 2, total);
}

extern "C" __global__ void __launch_bounds__(256, LM_PASS2_MINB) lm_head_pick_f16(const u16* E, int vocab, int hidden,
                                                                 const float* lq, const float* err,
                                                                 const float* abs_sum, const float2* fac,
                                                                 unsigned* keys, const float* xs_in, u64* best) {
    pick_f16_body(E, vocab, hidden, lq, err, abs_sum, fac, keys, xs_in, best);
}

// The 8-bit lm_head, int8 x int8 as the CPU's Q8Head (cpu/lm_head.rs): the
// normed x is quantised per block of 32 (dx = max|v| / 127, codes
// round(v / dx) within +-127; a non-finite block gives dx = NaN), each block's
// dot is exact (dp4a; the two 16-byte halves sit in adjacent lanes), then
// lane j of the 16 blocks of a 512-wide group keeps acc = fma(dot, dw * dx,
// acc) over the groups, and the 16 lanes are summed pairwise in the CPU's
// order. For the same normed x the logits are the CPU's bits; and 4 dp4a
// replace 16 int8 -> f32 conversions and FMAs per 16 weights.
// Needs hidden % 32 == 0, <= DM_NMAX.
#ifndef LM_Q8_SLOTS
#define LM_Q8_SLOTS 1  // rows per warp in flight (2: 116 registers, 2 blocks per SM; 3: 156, one)
#endif
#ifndef LM_Q8_MINB
#define LM_Q8_MINB 4  // blocks per SM the 8-bit head's registers must allow
#endif
// One row per warp in flight at 64 registers (4 blocks per SM, all of the
// default grid resident) beat two rows at 116 (2 resident): pass 1 151.5 ->
// 139.5 us, decode 922 -> 933-935 tok/s (S14-1, S14-2, H100); 5 blocks per
// SM (grid or registers) was slower (168-187 us).
// The normed x (shared memory) in 8-bit blocks of 32, as the CPU's Q8Head
// quantises it: dx = max|v| / 127 (NaN for a non-finite block), codes
// round(v / dx) within +-127. Block-wide (a warp per block); synchronises.
__device__ __forceinline__ void q8_blocks(const float* xs, int nb, i8* xq8, float* dxs) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int b = warp; b < nb; b += 8) {  // 256 threads
        const float v = xs[32 * b + lane];
        const float amax = warp_max(fabsf(v));
        const float dx = isfinite(amax) ? amax / 127.f : __int_as_float(0x7fc00000);
        const float inv = dx > 0.f ? 1.f / dx : 0.f;
        const float t = roundf(v * inv);
        xq8[32 * b + lane] = (i8)(isnan(t) ? 0 : (int)fminf(fmaxf(t, -127.f), 127.f));
        if (lane == 0) dxs[b] = dx;
    }
    __syncthreads();
}

// The 8-bit head's per-block start, after the previous kernel's wait: the
// final norm of x into xs, its 8-bit blocks, and for the screen the block-0
// copy of xs and the bound factors.
template <bool SCREEN>
__device__ __forceinline__ float2 q8_head_prologue(const float* x, const float* nw, float eps, int hidden, float* xs,
                                                   float* red, i8* xq8, float* dxs, ScreenArgs sa) {
    lm_head_norm(x, nw, eps, hidden, xs, red);
    q8_blocks(xs, hidden / 32, xq8, dxs);
    if (!SCREEN) return make_float2(0.f, 0.f);
    if (blockIdx.x == 0)
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) sa.xs[i] = xs[i];
    return screen_factors(xs, xq8, dxs, hidden, sa.keys, blockIdx.x == 0 ? sa.fac : nullptr);
}

// A row's end: lanes 2j, 2j + 1 hold lane j of the CPU's 16, summed
// pairwise; lane 0 keeps the logit (and for the screen its bound, ea).
template <bool SCREEN>
__device__ __forceinline__ void q8_row_keep(int rr, float acc, float2 ab, float2 ea, ScreenArgs sa, float* logits,
                                            float& bv, int& bi) {
    acc += __shfl_xor_sync(0xffffffffu, acc, 16);
    acc += __shfl_xor_sync(0xffffffffu, acc, 8);
    acc += __shfl_xor_sync(0xffffffffu, acc, 4);
    acc += __shfl_xor_sync(0xffffffffu, acc, 2);
    if (SCREEN)
        screen_keep(rr, acc, ab, ea, sa, logits, bv, bi);
    else
        lm_head_keep(rr, acc, logits, bv, bi);
}

template <bool SCREEN>
__device__ void lm_head_q8_body(const uint4* Q, const u16* D, int vocab, int hidden, const float* x, const float* nw,
                                float eps, float* logits, u64* best, ScreenArgs sa) {
    __shared__ __align__(16) float xs[DM_NMAX];
    __shared__ __align__(16) i8 xq8[DM_NMAX];
    __shared__ float dxs[DM_NMAX / 32];
    __shared__ float red[32];
    __shared__ float bv_s[8];
    __shared__ int bi_s[8];
    pdl_launch();
    // Pieces per lane kept in registers: hidden <= 2560 (BitNet 2B4T) in one
    // pass; wider rows take the rest through the loop after them. 8 (4096)
    // took 165 registers with the loads-ahead order below: one block per SM.
    constexpr int U = 5;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = gridDim.x * 8, np = hidden / 16, nb = hidden / 32;
    int r = blockIdx.x * 8 + warp;
    // S rows per warp in flight (r, r + nwarps, ...): a row is half the
    // bytes of an f16 row, and one row per warp left HBM idle between rows.
    constexpr int S = LM_Q8_SLOTS;
    uint4 pv[S][U];
    float dw[S][U];
    // SCREEN: the row's bound constants travel with its pieces (loaded
    // where they are used, each row waited a round trip).
    float2 ea[S];
#pragma unroll
    for (int j = 0; j < S; j++) ea[j] = make_float2(0.f, 0.f);
    auto load_row = [&](int rr, int slot) {
        const int rs = rr < vocab ? rr : 0;
#pragma unroll
        for (int k = 0; k < U; k++) {
            const int c = lane + 32 * k;
            const bool in = rr < vocab && c < np;
            pv[slot][k] = in ? __ldg(Q + (size_t)rs * np + c) : make_uint4(0, 0, 0, 0);
            dw[slot][k] = in ? h2f(__ldg(D + (size_t)rs * nb + c / 2)) : 0.f;
        }
        if (SCREEN) ea[slot] = make_float2(__ldg(sa.err + rs), __ldg(sa.abs_sum + rs));
    };
#pragma unroll
    for (int j = 0; j < S; j++) load_row(r + j * nwarps, j);
    pdl_wait();
    const float2 ab = q8_head_prologue<SCREEN>(x, nw, eps, hidden, xs, red, xq8, dxs, sa);
    const uint4* xq4 = (const uint4*)xq8;
    float bv = NEG_INF;
    int bi = 0x7fffffff;
    // One block-half (16 bytes of a row at piece c): its exact dot (0 past
    // the row).
    auto half_dot = [&](uint4 w, int c) {
        int dot = 0;
        if (c < np) {
            const uint4 xv = xq4[c];
            dot = dp4a16(w, xv, dot);
        }
        return dot;
    };
    // Its dot joined with the other half's lane, then lane j's fma. k < kmax
    // is warp-uniform.
    auto piece = [&](uint4 w, float d, int c, float acc) {
        int dot = half_dot(w, c);
        dot += __shfl_xor_sync(0xffffffffu, dot, 1);  // the block's two halves
        return c < np ? fmaf((float)dot, __fmul_rn(d, dxs[c / 2]), acc) : acc;
    };
    // Per pair of rows: every piece's exact dot and scale product first
    // (independent: integer dots, so their order is free), then the next
    // pair's loads, then per row the block halves joined and lane j's fma
    // chain in the original order. One dependent chain per piece (load,
    // dp4a x4, shuffle, fma) had left the warps waiting on latency.
    for (; r < vocab; r += S * nwarps) {
        int dot[S][U];
        float sc[S][U];
        float2 eas[S];
#pragma unroll
        for (int j = 0; j < S; j++) eas[j] = ea[j];
#pragma unroll
        for (int slot = 0; slot < S; slot++)
#pragma unroll
            for (int k = 0; k < U; k++) {
                const int c = lane + 32 * k;
                dot[slot][k] = half_dot(pv[slot][k], c);
                sc[slot][k] = c < np ? __fmul_rn(dw[slot][k], dxs[c / 2]) : 0.f;
            }
#pragma unroll
        for (int j = 0; j < S; j++) load_row(r + (S + j) * nwarps, j);
#pragma unroll
        for (int slot = 0; slot < S; slot++) {
            const int rr = r + slot * nwarps;
            if (rr >= vocab) break;  // warp-uniform
            float acc = 0.f;
#pragma unroll
            for (int k = 0; k < U; k++) {
                const int c = lane + 32 * k;
                if (32 * k < np) {
                    const int d = dot[slot][k] + __shfl_xor_sync(0xffffffffu, dot[slot][k], 1);  // the block's halves
                    if (c < np) acc = fmaf((float)d, sc[slot][k], acc);
                }
            }
            for (int k = U; 32 * k < np; k++) {
                const int c = lane + 32 * k;
                const bool in = c < np;
                acc = piece(in ? __ldg(Q + (size_t)rr * np + c) : make_uint4(0, 0, 0, 0),
                            in ? h2f(__ldg(D + (size_t)rr * nb + c / 2)) : 0.f, c, acc);
            }
            q8_row_keep<SCREEN>(rr, acc, ab, eas[slot], sa, logits, bv, bi);
        }
    }
    if (SCREEN)
        screen_put(bv, bi, bv_s, sa);
    else
        lm_head_pick(bv, bi, bv_s, bi_s, best);
}

extern "C" __global__ void __launch_bounds__(256, LM_Q8_MINB) lm_head_dec_q8(const uint4* Q, const u16* D, int vocab, int hidden,
                                                               const float* x, const float* nw, float eps,
                                                               float* logits, u64* best) {
    lm_head_q8_body<false>(Q, D, vocab, hidden, x, nw, eps, logits, best, ScreenArgs{});
}

// The screened greedy pick (see backends/cpu/head_screen.rs, whose bound
// this is): pass 1 is the 8-bit head above, leaving every row's 8-bit logit
// lq in `logits` and the largest lower end lq - bound in `lkey`; pass 2
// (lm_head_pick_f16) computes the F16 head's own row dot, as lm_head_dec
// does, for the rows whose upper end reaches it, and picks as lm_head_dec
// picks. The greedy token is the full head's, bit for bit.
extern "C" __global__ void __launch_bounds__(256, LM_Q8_MINB) lm_head_screen_q8(const uint4* Q, const u16* D, int vocab,
                                                                  int hidden, const float* x, const float* nw,
                                                                  float eps, float* lq, const float* err,
                                                                  const float* abs_sum, float2* fac, unsigned* keys,
                                                                  float* xs, u64* wmax) {
    lm_head_q8_body<true>(Q, D, vocab, hidden, x, nw, eps, lq, nullptr,
                          ScreenArgs{err, abs_sum, fac, keys, xs, wmax});
}

// The 8-bit head with its rows streamed by bulk copies (sm_90; the host's
// default there, `YINSEN_CUDA_HEAD_TMA=0` for the kernels above). Why: the
// register-fed kernels keep one 2.5 KB row a warp in flight and read the
// head at ~3.1 TB/s on the H200 (ncu S30-2: DRAM 64%, 101.5 us of an 870 us
// step). Here block b owns the contiguous rows of octets [n8 b / G,
// n8 (b + 1) / G) and thread 0 keeps `ring` stages of 8 rows (codes, block
// scales, and the screen's two bound floats a row) in flight by bulk copies;
// warp w takes row w of each stage. A row's arithmetic is lm_head_q8_body's
// (same lanes, same order, same sums) and each warp walks its rows in
// ascending order, so logits, keys and picks are the same bits. A last,
// partial stage copies only its codes (a partial stage's scales need not be
// 16-byte sized); its warps read scales and bounds from global memory.
// Dynamic shared memory: 2 x ring mbarriers, then ring stages of
// lq_stage_bytes(hidden), then xs (f32), xq8 and dxs. Needs hidden % 32 == 0.
__device__ __forceinline__ int lq_stage_bytes(int hidden) { return 8 * hidden + hidden / 2 + 64; }

template <bool SCREEN>
__device__ void lm_head_q8_tma_body(const uint4* Q, const u16* D, int vocab, int hidden, const float* x,
                                    const float* nw, float eps, float* logits, u64* best, ScreenArgs sa, int ring) {
#if __CUDA_ARCH__ >= 900
    extern __shared__ __align__(128) unsigned char lq_smem[];
    __shared__ float red[32];
    __shared__ float bv_s[8];
    __shared__ int bi_s[8];
    pdl_launch();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int np = hidden / 16, nb = hidden / 32, sb = lq_stage_bytes(hidden);
    u64* full = (u64*)lq_smem;
    u64* empty = full + ring;
    unsigned char* stages = lq_smem + ((16 * ring + 127) / 128) * 128;
    float* xs = (float*)(stages + (size_t)ring * sb);
    i8* xq8 = (i8*)(xs + hidden);
    float* dxs = (float*)(xq8 + hidden);
    const int n8 = (vocab + 7) / 8;
    const int o0 = (int)((long long)n8 * blockIdx.x / gridDim.x);
    const int o1 = (int)((long long)n8 * (blockIdx.x + 1) / gridDim.x);
    const int nst = o1 - o0;
    // Stage s: rows 8 (o0 + s) .. + 8, within vocab.
    auto issue = [&](int s) {
        const int slot = s % ring, row0 = 8 * (o0 + s), rows = min(8, vocab - row0);
        unsigned char* st = stages + (size_t)slot * sb;
        const unsigned qb = (unsigned)(rows * hidden);
        const bool whole = rows == 8;
        mg_bulk_expect(full + slot, qb + (whole ? (unsigned)(hidden / 2 + (SCREEN ? 64 : 0)) : 0u));
        mg_bulk_part(smem_addr(st), (const char*)Q + (size_t)row0 * hidden, qb, full + slot, true);
        if (whole) {
            mg_bulk_part(smem_addr(st + 8 * hidden), (const char*)(D + (size_t)row0 * nb), hidden / 2, full + slot,
                         true);
            if (SCREEN) {
                mg_bulk_part(smem_addr(st + 8 * hidden + hidden / 2), (const char*)(sa.err + row0), 32, full + slot);
                mg_bulk_part(smem_addr(st + 8 * hidden + hidden / 2 + 32), (const char*)(sa.abs_sum + row0), 32,
                             full + slot);
            }
        }
    };
    if (threadIdx.x == 0) {
        for (int i = 0; i < ring; i++) {
            mbar_init(full + i, 1);
            mbar_init(empty + i, 8);
        }
    }
    __syncthreads();
    // The weights do not depend on the previous kernel: copy before its wait.
    if (threadIdx.x == 0)
        for (int s = 0; s < min(ring, nst); s++) issue(s);
    pdl_wait();
    const float2 ab = q8_head_prologue<SCREEN>(x, nw, eps, hidden, xs, red, xq8, dxs, sa);
    const uint4* xq4 = (const uint4*)xq8;
    float bv = NEG_INF;
    int bi = 0x7fffffff;
    for (int s = 0; s < nst; s++) {
        const int slot = s % ring, row0 = 8 * (o0 + s), rows = min(8, vocab - row0);
        const unsigned ph = (unsigned)(s / ring) & 1u;
        const unsigned char* st = stages + (size_t)slot * sb;
        mbar_wait(full + slot, ph);
        if (warp < rows) {  // warp-uniform
            const int rr = row0 + warp;
            const bool whole = rows == 8;
            const uint4* qrow = (const uint4*)(st + warp * hidden);
            const u16* drow = whole ? (const u16*)(st + 8 * hidden) + warp * nb : D + (size_t)rr * nb;
            // A piece's exact dot and scale product (0 past the row).
            auto piece = [&](int c, int& dot, float& sc) {
                dot = 0;
                sc = 0.f;
                if (c < np) {
                    const uint4 w = qrow[c], xv = xq4[c];
                    dot = dp4a16(w, xv, dot);
                    sc = __fmul_rn(h2f(drow[c / 2]), dxs[c / 2]);
                }
            };
            // The first U pieces' dots and scales are independent: all
            // first, then the halves joined and the fma chain in piece order.
            constexpr int U = 5;  // hidden <= 2560 in one round
            int dot[U];
            float sc[U];
#pragma unroll
            for (int k = 0; k < U; k++) piece(lane + 32 * k, dot[k], sc[k]);
            float acc = 0.f;
#pragma unroll
            for (int k = 0; k < U; k++)
                if (32 * k < np) {  // warp-uniform
                    const int d = dot[k] + __shfl_xor_sync(0xffffffffu, dot[k], 1);  // the block's halves
                    if (lane + 32 * k < np) acc = fmaf((float)d, sc[k], acc);
                }
            for (int k = U; 32 * k < np; k++) {  // warp-uniform
                int dk;
                float sk;
                piece(lane + 32 * k, dk, sk);
                const int d = dk + __shfl_xor_sync(0xffffffffu, dk, 1);
                if (lane + 32 * k < np) acc = fmaf((float)d, sk, acc);
            }
            float2 ea = make_float2(0.f, 0.f);
            if (SCREEN) {
                const float* eb = (const float*)(st + 8 * hidden + hidden / 2);
                ea = whole ? make_float2(eb[warp], eb[8 + warp])
                           : make_float2(__ldg(sa.err + rr), __ldg(sa.abs_sum + rr));
            }
            q8_row_keep<SCREEN>(rr, acc, ab, ea, sa, logits, bv, bi);
        }
        __syncwarp();
        if (lane == 0) mbar_arrive(empty + slot);
        if (threadIdx.x == 0 && s + ring < nst) {
            mbar_wait(empty + slot, ph);  // every warp is done with the slot
            issue(s + ring);
        }
    }
    if (SCREEN)
        screen_put(bv, bi, bv_s, sa);
    else
        lm_head_pick(bv, bi, bv_s, bi_s, best);
#endif
}

extern "C" __global__ void __launch_bounds__(256, 2) lm_head_screen_q8_tma(const uint4* Q, const u16* D, int vocab,
                                                                   int hidden, const float* x, const float* nw,
                                                                   float eps, float* lq, const float* err,
                                                                   const float* abs_sum, float2* fac,
                                                                   unsigned* keys, float* xs, u64* wmax, int ring) {
    lm_head_q8_tma_body<true>(Q, D, vocab, hidden, x, nw, eps, lq, nullptr,
                              ScreenArgs{err, abs_sum, fac, keys, xs, wmax}, ring);
}

extern "C" __global__ void __launch_bounds__(256, 2) lm_head_dec_q8_tma(const uint4* Q, const u16* D, int vocab,
                                                                int hidden, const float* x, const float* nw,
                                                                float eps, float* logits, u64* best, int ring) {
    lm_head_q8_tma_body<false>(Q, D, vocab, hidden, x, nw, eps, logits, best, ScreenArgs{}, ring);
}

// The screened top-k (the default sampling's ranking): the k best logits of
// the F16 head, in topk_logits' order and bits, reading the F16 rows of the
// candidates only. After pass 1 (lm_head_screen_q8):
// 1. lm_head_topk_floor (a grid of FG_BLOCKS blocks): rows of large
//    per-warp lower ends (wmax), their F16 logits, and the floor T = the
//    k-th largest of those. k rows reach T, so the head's k-th largest logit
//    is at least T (any k distinct rows would give a valid floor; these give
//    a high one).
// 2. lm_head_topk_f16 (the grid): a row whose upper end lq + bound is below
//    T can neither rank among the k best nor tie with them; the others get
//    the F16 head's own row dot (lm_f16_row_dot), and those at or above T go
//    to a list. The last block to finish ranks the list by topk_logits' key
//    (tk_cand): the same rows in the same order as topk_logits over the
//    full head's logits.
// out: [0] status (0: ranked; 1: a non-finite value, or more than TL_CAP
// rows at or above T: the host then runs the full head), [1 + j] the row
// of rank j (-1: none, a vocabulary under k), [1 + TK_MAX + j] its logit's
// bits. cnt: the list's length and the blocks' arrivals (the last block
// resets both).
#define TL_CAP (DM_NMAX / 2)   // list entries ranked (u64 in pass 2's xs)

// The floor over a grid of FG_BLOCKS blocks. Block b takes wmax entries
// [b per, (b + 1) per) (its first FG_MAXPER: any k distinct rows give a
// valid floor), keeps its FG_ROWS largest lower ends
// (one warp, FG_ROWS rounds of a warp maximum), and each of its warps
// computes one of those rows' F16 logit (lm_f16_row_dot) into `scratch`
// (value bits, then a non-finite flag per row). The last block to arrive
// (keys[3], zeroed with the step's slots; it resets it too) takes the k-th
// largest of the values as the floor. With the global top 2k + 8 spread
// over the blocks, a block rarely holds more than FG_ROWS of them, so the
// floor about as high as that of the global top 2k + 8 (the one-block
// kernel before S13-6, which a radix select fed). Why: ncu (S13-5) had that
// kernel's 28 us half in its row dots' loads (88 rows through one SM's
// memory pipeline) and a third in its four radix passes; this grid takes
// 16 us (un-graphed, S13-6).
#define FG_BLOCKS 32
#define FG_ROWS 8        // rows per block: one per warp of 256 threads
#define FG_MAXPER 1024   // wmax entries a block looks at
__device__ __forceinline__ void topk_floor_body(const u16* E, int hidden, const u64* wmax, int nw, const int* kp,
                                                unsigned* keys, const float* xs, float* floor_out, unsigned* scratch) {
    __shared__ u64 ent[FG_MAXPER];
    __shared__ int rows_s[FG_ROWS];
    __shared__ float vals_s[FG_BLOCKS * FG_ROWS];
    __shared__ int last_s;
    __shared__ float t_s;
    pdl_launch();
    pdl_wait();  // pass 1 done: wmax, xs, keys
    if (keys[1] != 0u) {  // a non-finite value: the host runs the full head
        if (blockIdx.x == 0 && threadIdx.x == 0) *floor_out = NEG_INF;
        return;
    }
    const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
    const int per = (nw + gridDim.x - 1) / gridDim.x, i0 = blockIdx.x * per;
    const int cnt = max(0, min(min(per, FG_MAXPER), nw - i0));
    for (int i = tid; i < cnt; i += blockDim.x) ent[i] = __ldcg(wmax + i0 + i);
    if (tid == 0) t_s = NEG_INF;
    __syncthreads();
    if (w == 0) {
        // Keys are distinct but for 0 (no row): lane i % 32 owns entry i.
        for (int r = 0; r < FG_ROWS; r++) {
            u64 best = 0ull;
            int bi = -1;
            for (int i = lane; i < cnt; i += 32) {
                const u64 v = ent[i];
                if (v > best) {
                    best = v;
                    bi = i;
                }
            }
            for (int o = 16; o > 0; o >>= 1) {
                const u64 ob = __shfl_xor_sync(0xffffffffu, best, o);
                const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
                if (ob > best) {
                    best = ob;
                    bi = oi;
                }
            }
            if (lane == 0) rows_s[r] = best ? (int)~(unsigned)best : -1;
            if (best && lane == (bi & 31)) ent[bi] = 0ull;  // taken
        }
    }
    __syncthreads();
    const int slot = blockIdx.x * FG_ROWS + w, n_all = gridDim.x * FG_ROWS;
    float v = NEG_INF;
    if (rows_s[w] >= 0) v = lm_f16_row_dot(LmRowF16{E, hidden}, rows_s[w], xs);
    if (lane == 0) {
        scratch[slot] = __float_as_uint(v);
        scratch[n_all + slot] = rows_s[w] >= 0 && !isfinite(v);
    }
    // Publish; the last block takes the floor (as attention's chunk merge:
    // the barrier orders the block's writes before thread 0's fence).
    __syncthreads();
    if (tid == 0) {
        __threadfence();
        last_s = atomicAdd(keys + 3, 1u) == gridDim.x - 1;
        if (last_s) __threadfence();
    }
    __syncthreads();
    if (!last_s) return;
    bool valid = false, bad = false;
    if (tid < n_all) {
        vals_s[tid] = __uint_as_float(__ldcg(scratch + tid));
        bad = __ldcg(scratch + n_all + tid) != 0u;
        valid = vals_s[tid] != NEG_INF;
    }
    const int any_bad = __syncthreads_or(bad);
    const int n = __syncthreads_count(valid && !bad);
    const int k = *kp;
    if (valid && !any_bad) {
        // The k-th largest of the n values (ties counted once each).
        const float x = vals_s[tid];
        int gt = 0, eq = 0;
        for (int j = 0; j < n_all; j++) {
            const float y = vals_s[j];
            gt += y != NEG_INF && y > x;
            eq += y == x;
        }
        if (gt < k && gt + eq >= k) t_s = x;  // every writer writes the same value
    }
    __syncthreads();
    if (tid == 0) {
        *floor_out = any_bad ? __int_as_float(0x7fc00000) : (n >= k ? t_s : NEG_INF);
        keys[3] = 0u;
    }
}

extern "C" __global__ void __launch_bounds__(256) lm_head_topk_floor(const u16* E, int hidden, const u64* wmax,
                                                                          int nw, const int* kp, unsigned* keys,
                                                                          const float* xs, float* floor_out,
                                                                          unsigned* scratch) {
    topk_floor_body(E, hidden, wmax, nw, kp, keys, xs, floor_out, scratch);
}

__device__ __forceinline__ void topk_f16_body(const u16* E, int vocab, int hidden, const float* lq, const float* err,
                                              const float* abs_sum, const float2* fac, unsigned* keys,
                                              const float* xs_in, const float* floor_in, const int* kp, u64* list,
                                              unsigned* cnt, int* out) {
    __shared__ __align__(16) float xs[DM_NMAX];  // the last block ranks in it
    __shared__ int cand_s[256];
    __shared__ int ncand_s, last_s;
    pdl_wait();  // the floor done (and pass 1 before it)
    const float2 ab = *fac;
    const float t = *floor_in;
    const bool skip = keys[1] != 0u || isnan(t);  // the host runs the full head
    if (!skip)
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) xs[i] = xs_in[i];
    const LmRowF16 R{E, hidden};
    unsigned total = 0;
    for (int b0 = blockIdx.x * 256; !skip && b0 < vocab; b0 += gridDim.x * 256)  // block-uniform
        total += screen_round(b0, vocab, lq, err, abs_sum, ab, t, false, R, xs, cand_s, &ncand_s, [&](int rr, float acc) {
            if (!isfinite(acc)) {
                atomicOr(keys + 1, 1u);
            } else if (acc >= t) {
                const unsigned j = atomicAdd(cnt, 1u);
                if (j < TL_CAP) list[j] = tk_cand(acc, rr);
            }
        });
    // Publish; the last block ranks (as topk_logits' merge).
    if (threadIdx.x == 0) {
        if (total) atomicAdd(keys + 2, total);
        __threadfence();
        last_s = atomicAdd(cnt + 1, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!last_s) return;
    __threadfence();
    const unsigned n = *(volatile unsigned*)cnt;
    const int k = *kp;
    const bool fail = *(volatile unsigned*)(keys + 1) != 0u || isnan(t) || n > TL_CAP;
    u64* top = (u64*)xs;
    if (!fail) {
        for (unsigned i = threadIdx.x; i < n; i += blockDim.x) top[i] = __ldcg(list + i);
        __syncthreads();
        for (unsigned i = threadIdx.x; i < n; i += blockDim.x) {
            const u64 key = top[i];
            int rank = 0;
            for (unsigned j = 0; j < n; j++) rank += top[j] > key;  // keys are distinct
            if (rank < k) {
                out[1 + rank] = (int)~(unsigned)key;
                out[1 + TK_MAX + rank] = __float_as_int(order_value((unsigned)(key >> 32)));
            }
        }
        for (int j = (int)n + threadIdx.x; j < k; j += blockDim.x) {
            out[1 + j] = -1;
            out[1 + TK_MAX + j] = 0;
        }
    }
    if (threadIdx.x == 0) {
        out[0] = fail ? 1 : 0;
        cnt[0] = 0;
        cnt[1] = 0;
    }
}

extern "C" __global__ void __launch_bounds__(256, LM_PASS2_MINB) lm_head_topk_f16(const u16* E, int vocab, int hidden,
                                                                 const float* lq, const float* err,
                                                                 const float* abs_sum, const float2* fac,
                                                                 unsigned* keys, const float* xs_in,
                                                                 const float* floor_in, const int* kp, u64* list,
                                                                 unsigned* cnt, int* out) {
    topk_f16_body(E, vocab, hidden, lq, err, abs_sum, fac, keys, xs_in, floor_in, kp, list, cnt, out);
}

// ---- The screened head of a batched step (forward/batch.rs) ----
// Token t of a step (the next token of sequence t) gets the pick the
// one-token screen gives: the same bound, per token, between the 8-bit
// head's logit of its normed x (norm_quant's row t, the x the batched full
// head multiplies) and the F16 head's own row dot. The 8-bit head is read
// once for all tokens (pass 1); passes 2 run a grid per token (blockIdx.y)
// on that token's slots: keys[4t..4t+3], fac[t], best[t], row t of lq, of
// the normed x, of wmax (nw entries each) and of the top-k list, cnt[2t..],
// out[t (1 + 2 TK_MAX)..].
#define LMB_T 16  // tokens a batched screen takes (MM_T, LM_T x 2)

// The end of a batched pass 1: token t's largest lower end over the
// block's 8 warps (bv_s[warp][t], written before) into keys[4t] as an
// order key.
__device__ __forceinline__ void batch_screen_put(const float (*bv_s)[LMB_T], int nt, unsigned* keys) {
    __syncthreads();
    if (threadIdx.x < nt) {
        const int t = threadIdx.x;
        float m = bv_s[0][t];
        for (int w = 1; w < 8; w++) m = fmaxf(m, bv_s[w][t]);
        if (m != NEG_INF) atomicMax(keys + 4 * t, order_key(m));
    }
}

// Block t: token t's step slots zeroed (keys, best), its normed x in 8-bit
// blocks into xq8_out / dxs_out (rows of hidden / nb), its bound factors
// into fac[t] (a non-finite value flags keys[4t + 1]).
extern "C" __global__ void __launch_bounds__(256) lm_head_screen_prep(const float* normed, int hidden, i8* xq8_out,
                                                                     float* dxs_out, float2* fac, unsigned* keys,
                                                                     u64* best) {
    __shared__ __align__(16) float xs[DM_NMAX];
    __shared__ __align__(16) i8 xq8[DM_NMAX];
    __shared__ float dxs[DM_NMAX / 32];
    pdl_launch();
    pdl_wait();
    const int t = blockIdx.x, nb = hidden / 32;
    if (threadIdx.x == 0) {
        for (int j = 0; j < 4; j++) keys[4 * t + j] = 0u;
        best[t] = 0ull;
    }
    const float* x = normed + (size_t)t * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) xs[i] = x[i];
    __syncthreads();
    q8_blocks(xs, nb, xq8, dxs);
    const uint4* q4 = (const uint4*)xq8;
    uint4* o4 = (uint4*)(xq8_out + (size_t)t * hidden);
    for (int i = threadIdx.x; i < hidden / 16; i += blockDim.x) o4[i] = q4[i];
    for (int b = threadIdx.x; b < nb; b += blockDim.x) dxs_out[(size_t)t * nb + b] = dxs[b];
    screen_factors(xs, xq8, dxs, hidden, keys + 4 * t, fac + t);
}

// Pass 1 for nt <= LMB_T tokens: a warp per row, each row's pieces loaded
// once and multiplied with every token's codes (dynamic shared memory: nt
// rows of codes, then nt rows of block scales), each (row, token) with
// lm_head_q8_body's arithmetic in its order (the same lq bits as the
// one-token screen for the same codes). Lane t keeps token t's factors and
// the warp's largest lower end; a non-finite value flags keys[4t + 1].
// wmax (or null): row t holds nw = gridDim.x * 8 per-warp entries.
extern "C" __global__ void __launch_bounds__(256, LM_Q8_MINB)
    lm_head_screen_q8_batch(const uint4* Q, const u16* D, int vocab, int hidden, int nt, const i8* xq8_g,
                            const float* dxs_g, const float2* fac, const float* err, const float* abs_sum,
                            unsigned* keys, float* lq, u64* wmax) {
    extern __shared__ __align__(16) unsigned char lmb_smem[];
    __shared__ float bv_s[8][LMB_T];
    constexpr int U = 5;  // pieces per lane in registers: hidden <= 2560 in one pass
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = gridDim.x * 8, np = hidden / 16, nb = hidden / 32;
    i8* xq8 = (i8*)lmb_smem;
    float* dxs = (float*)(lmb_smem + (size_t)nt * hidden);
    uint4 pv[U];
    float dw[U];
    float2 ea;
    auto load_row = [&](int rr) {
        const int rs = rr < vocab ? rr : 0;
#pragma unroll
        for (int k = 0; k < U; k++) {
            const int c = lane + 32 * k;
            const bool in = rr < vocab && c < np;
            pv[k] = in ? __ldg(Q + (size_t)rs * np + c) : make_uint4(0, 0, 0, 0);
            dw[k] = in ? h2f(__ldg(D + (size_t)rs * nb + c / 2)) : 0.f;
        }
        ea = make_float2(__ldg(err + rs), __ldg(abs_sum + rs));
    };
    int r = blockIdx.x * 8 + warp;
    pdl_launch();
    load_row(r);  // weights: written by no kernel
    pdl_wait();
    {
        const uint4* s4 = (const uint4*)xq8_g;
        uint4* d4 = (uint4*)xq8;
        for (int i = threadIdx.x; i < nt * hidden / 16; i += blockDim.x) d4[i] = s4[i];
        for (int i = threadIdx.x; i < nt * nb; i += blockDim.x) dxs[i] = dxs_g[i];
    }
    __syncthreads();
    const float2 ab = lane < nt ? fac[lane] : make_float2(0.f, 0.f);
    float bv = NEG_INF;
    int br = 0x7fffffff;
    for (; r < vocab; r += nwarps) {
        if (r != blockIdx.x * 8 + warp) load_row(r);
        for (int t = 0; t < nt; t++) {
            const uint4* xq4 = (const uint4*)(xq8 + (size_t)t * hidden);
            const float* dxt = dxs + (size_t)t * nb;
            float acc = 0.f;
#pragma unroll
            for (int k = 0; k < U; k++) {
                const int c = lane + 32 * k;
                if (32 * k < np) {
                    int d = 0;
                    if (c < np) {
                        const uint4 xv = xq4[c], w = pv[k];
                        d = dp4a16(w, xv, d);
                    }
                    d += __shfl_xor_sync(0xffffffffu, d, 1);  // the block's halves
                    if (c < np) acc = fmaf((float)d, __fmul_rn(dw[k], dxt[c / 2]), acc);
                }
            }
            // Wider rows: the rest of the row from global memory (L1 / L2
            // after the first token).
            for (int k = U; 32 * k < np; k++) {
                const int c = lane + 32 * k;
                int d = 0;
                float sc = 0.f;
                if (c < np) {
                    const uint4 xv = xq4[c], w = __ldg(Q + (size_t)r * np + c);
                    d = dp4a16(w, xv, d);
                    sc = __fmul_rn(h2f(__ldg(D + (size_t)r * nb + c / 2)), dxt[c / 2]);
                }
                d += __shfl_xor_sync(0xffffffffu, d, 1);
                if (c < np) acc = fmaf((float)d, sc, acc);
            }
            acc += __shfl_xor_sync(0xffffffffu, acc, 16);
            acc += __shfl_xor_sync(0xffffffffu, acc, 8);
            acc += __shfl_xor_sync(0xffffffffu, acc, 4);
            acc += __shfl_xor_sync(0xffffffffu, acc, 2);
            if (lane == t) {
                lq[(size_t)t * vocab + r] = acc;
                const float b = screen_bound(ea.x, ea.y, acc, ab);
                const float lo = acc - b;
                if (!isfinite(lo) || !isfinite(acc + b)) {
                    atomicOr(keys + 4 * t + 1, 1u);
                } else if (lo > bv) {
                    bv = lo;
                    br = r;
                }
            }
        }
    }
    if (lane < nt) {
        bv_s[warp][lane] = bv;
        if (wmax) wmax[(size_t)lane * nwarps + blockIdx.x * 8 + warp] = bv != NEG_INF ? tk_cand(bv, br) : 0ull;
    }
    batch_screen_put(bv_s, nt, keys);
}

// Pass 2, greedy: grid (blocks, tokens), token blockIdx.y's pick into best[t].
extern "C" __global__ void __launch_bounds__(256, LM_PASS2_MINB)
    lm_head_pick_f16_batch(const u16* E, int vocab, int hidden, const float* lq, const float* err,
                           const float* abs_sum, const float2* fac, unsigned* keys, const float* xs_in, u64* best) {
    const int t = blockIdx.y;
    pick_f16_body(E, vocab, hidden, lq + (size_t)t * vocab, err, abs_sum, fac + t, keys + 4 * t,
                  xs_in + (size_t)t * hidden, best + t);
}

// The top-k floor per token: grid (FG_BLOCKS or fewer, tokens); token t's
// floor scratch is the start of its list row (as the one-token floor's).
extern "C" __global__ void __launch_bounds__(256) lm_head_topk_floor_batch(const u16* E, int hidden, const u64* wmax,
                                                                          int nw, const int* kp, unsigned* keys,
                                                                          const float* xs, float* floor_out,
                                                                          u64* list) {
    const int t = blockIdx.y;
    topk_floor_body(E, hidden, wmax + (size_t)t * nw, nw, kp, keys + 4 * t, xs + (size_t)t * hidden, floor_out + t,
                    (unsigned*)(list + (size_t)t * TL_CAP));
}

// The screened top-k rows per token: grid (blocks, tokens).
extern "C" __global__ void __launch_bounds__(256, LM_PASS2_MINB)
    lm_head_topk_f16_batch(const u16* E, int vocab, int hidden, const float* lq, const float* err,
                           const float* abs_sum, const float2* fac, unsigned* keys, const float* xs_in,
                           const float* floor_in, const int* kp, u64* list, unsigned* cnt, int* out) {
    const int t = blockIdx.y;
    topk_f16_body(E, vocab, hidden, lq + (size_t)t * vocab, err, abs_sum, fac + t, keys + 4 * t,
                  xs_in + (size_t)t * hidden, floor_in + t, kp, list + (size_t)t * TL_CAP, cnt + 2 * t,
                  out + (size_t)t * (1 + 2 * TK_MAX));
}

// Pass 1 for nt <= LMB_T tokens on the tensor cores: a warp takes 16 rows
// at a time and multiplies them with all tokens' codes, one mma.sync
// m16n8k32 per (8 tokens, 32-code block), which gives each (row, token)
// block's exact int dot; then lane by lane acc = fma(dot, dw * dx, acc) over
// the blocks. The dp4a kernel above spent its time in shared-memory loads of
// the codes (every row reloaded every token's codes: 0.5 ms for 16 tokens
// on an H100, S18-2); here a code load serves 16 rows. The order of the float sum
// differs from the one-token screen's (the bound holds for any order).
// Lane (g, q) (g = lane / 4, q = lane % 4) loads words 2q, 2q + 1 of each
// 8-word block of rows g and g + 8 (one 8-byte load per row): as its mma
// k-words q and 4 + q, with the same words of the token's codes in B, the
// dot is the block's (any permutation of k within the block, applied to
// both, gives the same integer sum). Shared memory: codes [LMB_T][sw words]
// (sw = hidden / 4 padded to 8 mod 32, so a warp's 8-byte code loads hit
// distinct banks; rows past nt zeroed), block scales [nb][LMB_T], then
// each warp's stages. The weight rows come through shared memory: each warp keeps LMB_ST
// stages of (16 rows x LMB_KB blocks of 32 codes, and their scales) in
// flight, copied by cp.async. Rows sit LMB_RS bytes apart in a stage (words
// 8 mod 32: a warp's 8-byte fragment loads hit distinct banks). Loading one
// 4-block chunk ahead into registers instead (3248375) had fewer bytes in
// flight per SM: 200 against 152 us for 16 tokens (S18-7, H100). Needs
// nb % LMB_KB == 0 (the host checks).
#define LMB_ST 3
#define LMB_KB 4
#define LMB_RS 160
#define LMB_STAGE (16 * LMB_RS + 16 * LMB_KB * 2)
__device__ __forceinline__ void lmb_cp(u32 dst, const void* src, bool ok, int bytes) {
    if (bytes == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(ok ? 16 : 0) : "memory");
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" ::"r"(dst), "l"(src), "r"(ok ? 8 : 0) : "memory");
}
__device__ __forceinline__ void lmb_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void lmb_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(LMB_ST - 2) : "memory"); }

extern "C" __global__ void __launch_bounds__(256, 2)
    lm_head_screen_q8_mma_cp(const uint4* Q, const u16* D, int vocab, int hidden, int nt, const i8* xq8_g,
                             const float* dxs_g, const float2* fac, const float* err, const float* abs_sum,
                             unsigned* keys, float* lq, u64* wmax) {
// sm_80+ (cp.async, mma.sync s8; the host checks `has_mma`): older archs
// get an empty kernel so that every image has the name.
#if __CUDA_ARCH__ >= 800
    extern __shared__ __align__(16) unsigned char lmb_smem[];
    __shared__ float bv_s[8][LMB_T];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, q = lane & 3;
    const int nb = hidden / 32, hw = hidden / 4, sw = hw + ((8 - hw) & 31);
    u32* xw = (u32*)lmb_smem;
    float* dxt = (float*)(xw + (size_t)LMB_T * sw);
    unsigned char* stages = (unsigned char*)(dxt + (size_t)nb * LMB_T) + (size_t)warp * LMB_ST * LMB_STAGE;
    const u32 stages_s = (u32)__cvta_generic_to_shared(stages);
    const int nwarps = gridDim.x * 8, ntiles = (vocab + 15) / 16, nkc = nb / LMB_KB;
    const int first = blockIdx.x * 8 + warp;
    const int my_tiles = first < ntiles ? (ntiles - first + nwarps - 1) / nwarps : 0;
    const int total = my_tiles * nkc;
    const unsigned char* Qb = (const unsigned char*)Q;
    // Chunk i of this warp: tile first + (i / nkc) nwarps, blocks (i % nkc) LMB_KB ...
    auto issue = [&](int i) {
        if (i < total) {
            const int r0 = (first + (i / nkc) * nwarps) * 16, b0 = (i % nkc) * LMB_KB;
            const u32 st = stages_s + (u32)((i % LMB_ST) * LMB_STAGE);
#pragma unroll
            for (int k = 0; k < 16 * LMB_KB * 2 / 32; k++) {  // 16-byte pieces: 8 a row
                const int c = lane + 32 * k, row = c / (LMB_KB * 2), part = c % (LMB_KB * 2);
                const bool ok = r0 + row < vocab;
                const unsigned char* src = Qb + (size_t)(ok ? r0 + row : 0) * hidden + 32 * b0 + 16 * part;
                lmb_cp(st + row * LMB_RS + 16 * part, src, ok, 16);
            }
            if (lane < 16) {
                const bool ok = r0 + lane < vocab;
                lmb_cp(st + 16 * LMB_RS + lane * LMB_KB * 2, D + (size_t)(ok ? r0 + lane : 0) * nb + b0, ok, 8);
            }
        }
        lmb_commit();
    };
    for (int i = 0; i < LMB_ST - 1; i++) issue(i);
    pdl_launch();
    pdl_wait();
    for (int i = threadIdx.x; i < LMB_T * sw; i += blockDim.x) {
        const int t = i / sw, w = i - t * sw;
        xw[i] = t < nt && w < hw ? ((const u32*)xq8_g)[(size_t)t * hw + w] : 0u;
    }
    for (int i = threadIdx.x; i < nb * LMB_T; i += blockDim.x) {
        const int b = i / LMB_T, t = i - b * LMB_T;
        dxt[i] = t < nt ? dxs_g[(size_t)t * nb + b] : 0.f;
    }
    __syncthreads();
    float2 ab[4];
    float bv[4];
    int br[4];
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const int t = (j >> 1) * 8 + 2 * q + (j & 1);
        ab[j] = t < nt ? fac[t] : make_float2(0.f, 0.f);
        bv[j] = NEG_INF;
        br[j] = 0x7fffffff;
    }
    float acc[2][4];
#pragma unroll
    for (int n = 0; n < 2; n++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[n][j] = 0.f;
    for (int i = 0; i < total; i++) {
        lmb_wait();  // chunk i landed (this lane's copies)
        __syncwarp();  // every lane's; and stage (i - 1) % LMB_ST is free
        issue(i + LMB_ST - 1);
        const unsigned char* st = stages + (i % LMB_ST) * LMB_STAGE;
        const u16* scs = (const u16*)(st + 16 * LMB_RS);
        const int b0 = (i % nkc) * LMB_KB;
#pragma unroll
        for (int j = 0; j < LMB_KB; j++) {
            const int b = b0 + j;
            const uint2 wa = *(const uint2*)(st + g * LMB_RS + 32 * j + 8 * q);
            const uint2 wb = *(const uint2*)(st + (g + 8) * LMB_RS + 32 * j + 8 * q);
            const float da = h2f(scs[g * LMB_KB + j]), db = h2f(scs[(g + 8) * LMB_KB + j]);
#pragma unroll
            for (int n = 0; n < 2; n++) {
                const uint2 xv = *(const uint2*)(xw + (size_t)(8 * n + g) * sw + 8 * b + 2 * q);
                int d[4] = {0, 0, 0, 0};
                mma_s8(d, wa.x, wb.x, wa.y, wb.y, xv.x, xv.y);
                const float2 dx = *(const float2*)(dxt + b * LMB_T + 8 * n + 2 * q);
                acc[n][0] = fmaf((float)d[0], __fmul_rn(da, dx.x), acc[n][0]);
                acc[n][1] = fmaf((float)d[1], __fmul_rn(da, dx.y), acc[n][1]);
                acc[n][2] = fmaf((float)d[2], __fmul_rn(db, dx.x), acc[n][2]);
                acc[n][3] = fmaf((float)d[3], __fmul_rn(db, dx.y), acc[n][3]);
            }
        }
        if (i % nkc != nkc - 1) continue;
        // The tile's last chunk: its rows' logits, bounds and lower ends.
        const int ra = (first + (i / nkc) * nwarps) * 16 + g, rb = ra + 8;
        const int sa = ra < vocab ? ra : 0, sb = rb < vocab ? rb : 0;
        const float2 eaa = make_float2(__ldg(err + sa), __ldg(abs_sum + sa));
        const float2 ebb = make_float2(__ldg(err + sb), __ldg(abs_sum + sb));
#pragma unroll
        for (int n = 0; n < 2; n++)
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int t = 8 * n + 2 * q + (j & 1), r = j < 2 ? ra : rb, slot = 2 * n + (j & 1);
                if (t < nt && r < vocab) {
                    const float v = acc[n][j];
                    lq[(size_t)t * vocab + r] = v;
                    const float2 e = j < 2 ? eaa : ebb;
                    const float bnd = screen_bound(e.x, e.y, v, ab[slot]);
                    const float lo = v - bnd;
                    if (!isfinite(lo) || !isfinite(v + bnd)) {
                        atomicOr(keys + 4 * t + 1, 1u);
                    } else if (lo > bv[slot] || (lo == bv[slot] && r < br[slot])) {
                        bv[slot] = lo;
                        br[slot] = r;
                    }
                }
                acc[n][j] = 0.f;
            }
    }
    asm volatile("cp.async.wait_all;" ::: "memory");
#pragma unroll
    for (int j = 0; j < 4; j++) {
        for (int o = 4; o < 32; o <<= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv[j], o);
            const int orr = __shfl_xor_sync(0xffffffffu, br[j], o);
            if (ov > bv[j] || (ov == bv[j] && orr < br[j])) {
                bv[j] = ov;
                br[j] = orr;
            }
        }
        const int t = (j >> 1) * 8 + 2 * q + (j & 1);
        if (g == 0) {
            bv_s[warp][t] = bv[j];
            if (wmax && t < nt)
                wmax[(size_t)t * nwarps + blockIdx.x * 8 + warp] = bv[j] != NEG_INF ? tk_cand(bv[j], br[j]) : 0ull;
        }
    }
    batch_screen_put(bv_s, nt, keys);
#endif
}
