// Prefill attention, flash style: causal, GQA, f32 online softmax.
// One block of FA_THREADS per (64-token query tile, query head); the key
// range 0..=p0+t is walked in 64-key tiles staged in shared memory, so K/V
// are read once per query tile instead of once per query token (the split-K
// attn_partial kernels of ops.cu, which remain the decode path).
//
// Threads form 16 (tx) x 16 (ty): thread (ty, tx) owns query rows
// 4 ty .. 4 ty + 3 and, for the scores, keys tx + 16 c (c < 4); for the
// output, dims 4 tx + 64 g .. +3 (g < NG, so hd <= 64 NG). Dynamic shared
// memory: Q [64][hd + 4] (pre-scaled), K [64][max(hd + 4, 68)] (reused for
// the probabilities P [64][68] once the scores are in registers), V [64][hd].
// The +4 pads make the strided row reads conflict-free.
#define FA_BQ 64
#define FA_BK 64
#define FA_THREADS 256
#define FA_PSTRIDE (FA_BK + 4)

// 8 cache elements (16-byte aligned source) as floats into smem.
__device__ __forceinline__ void fa_load8(const u16* src, float* dst) {
    uint4 w = *(const uint4*)src;
    u32 ws[4] = {w.x, w.y, w.z, w.w};
    float4 a, b;
    a.x = h2f((u16)(ws[0] & 0xffff));
    a.y = h2f((u16)(ws[0] >> 16));
    a.z = h2f((u16)(ws[1] & 0xffff));
    a.w = h2f((u16)(ws[1] >> 16));
    b.x = h2f((u16)(ws[2] & 0xffff));
    b.y = h2f((u16)(ws[2] >> 16));
    b.z = h2f((u16)(ws[3] & 0xffff));
    b.w = h2f((u16)(ws[3] >> 16));
    *(float4*)dst = a;
    *(float4*)(dst + 4) = b;
}
__device__ __forceinline__ void fa_load8(const float* src, float* dst) {
    *(float4*)dst = *(const float4*)src;
    *(float4*)(dst + 4) = *(const float4*)(src + 4);
}

// Keys j0 .. j0 + 63 of one KV head into smem rows of `stride` floats; keys
// at or past kmax (not written yet) become zeros.
template <typename KV>
__device__ __forceinline__ void fa_load_tile(const KV* base, int j0, int kmax, int hd, float* dst, int stride) {
    const int per_row = hd / 8;
    for (int idx = threadIdx.x; idx < FA_BK * per_row; idx += FA_THREADS) {
        const int j = idx / per_row, d = (idx - j * per_row) * 8;
        float* o = dst + j * stride + d;
        if (j0 + j < kmax) {
            fa_load8(base + (size_t)(j0 + j) * hd + d, o);
        } else {
            *(float4*)o = make_float4(0.f, 0.f, 0.f, 0.f);
            *(float4*)(o + 4) = make_float4(0.f, 0.f, 0.f, 0.f);
        }
    }
}

// Grid (query tiles, n_heads). qr: [nt][q_stride] rotated queries of the
// tokens at p0 .. p0 + nt - 1 (p0 = pos[0]); kc/vc: [kv_head][cap][hd];
// out: [nt][out_stride], head h at h * hd. Query t attends keys 0 ..= p0 + t.
template <typename KV, int NG>
__device__ __forceinline__ void flash_body(const float* qr, int q_stride, const KV* kc, const KV* vc,
                                           const int* pos, int nt, int n_heads, int n_kv, int hd, int cap,
                                           float scale, float* outp, int out_stride) {
    extern __shared__ float4 fa_smem4[];
    float* fa_smem = (float*)fa_smem4;
    const int ks = hd + 4;
    float* Qs = fa_smem;
    float* Ks = Qs + FA_BQ * ks;
    float* Ps = Ks;  // P replaces K once the scores are in registers
    float* Vs = Ks + FA_BK * max(ks, FA_PSTRIDE);
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    // Heaviest (last) query tiles first: the causal work grows with the tile.
    const int qt = gridDim.x - 1 - blockIdx.x, h = blockIdx.y;
    const int kvh = h / (n_heads / n_kv);
    const int p0 = pos[0], t0 = qt * FA_BQ;
    const int rows = min(FA_BQ, nt - t0);
    // Keys this tile needs: up to the last row's position (inclusive).
    const int kmax = p0 + t0 + rows;
    const KV* kb = kc + (size_t)kvh * cap * hd;
    const KV* vb = vc + (size_t)kvh * cap * hd;

    for (int idx = tid; idx < FA_BQ * (hd / 4); idx += FA_THREADS) {
        const int r = idx / (hd / 4), d = (idx - r * (hd / 4)) * 4;
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (r < rows) {
            v = *(const float4*)(qr + (size_t)(t0 + r) * q_stride + h * hd + d);
            v.x *= scale;
            v.y *= scale;
            v.z *= scale;
            v.w *= scale;
        }
        *(float4*)(Qs + r * ks + d) = v;
    }

    float o[4][NG][4];
    float m[4], l[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        m[i] = NEG_INF;
        l[i] = 0.f;
#pragma unroll
        for (int g = 0; g < NG; g++)
#pragma unroll
            for (int e = 0; e < 4; e++) o[i][g][e] = 0.f;
    }

    for (int j0 = 0; j0 < kmax; j0 += FA_BK) {
        fa_load_tile(kb, j0, kmax, hd, Ks, ks);
        fa_load_tile(vb, j0, kmax, hd, Vs, hd);
        __syncthreads();

        float s[4][4];
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int c = 0; c < 4; c++) s[i][c] = 0.f;
        for (int d = 0; d < hd; d += 4) {
            float4 q[4], k[4];
#pragma unroll
            for (int i = 0; i < 4; i++) q[i] = *(const float4*)(Qs + (4 * ty + i) * ks + d);
#pragma unroll
            for (int c = 0; c < 4; c++) k[c] = *(const float4*)(Ks + (tx + 16 * c) * ks + d);
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int c = 0; c < 4; c++)
                    s[i][c] += q[i].x * k[c].x + q[i].y * k[c].y + q[i].z * k[c].z + q[i].w * k[c].w;
        }
        // Causal mask only where the tile reaches past the first row's position.
        if (j0 + FA_BK - 1 > p0 + t0) {
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int c = 0; c < 4; c++)
                    if (j0 + tx + 16 * c > p0 + t0 + 4 * ty + i) s[i][c] = NEG_INF;
        }
        // Online softmax per row; a row's 64 scores live in the 16 tx lanes
        // of one half-warp. Tile 0 holds key 0 for every row, so m is finite
        // from then on and fully masked rows of later tiles add exp(-inf) = 0.
        float alpha[4];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float mx = fmaxf(fmaxf(s[i][0], s[i][1]), fmaxf(s[i][2], s[i][3]));
#pragma unroll
            for (int off = 1; off < 16; off <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
            const float mn = fmaxf(m[i], mx);
            alpha[i] = expf(m[i] - mn);
            m[i] = mn;
            float sum = 0.f;
#pragma unroll
            for (int c = 0; c < 4; c++) {
                s[i][c] = expf(s[i][c] - mn);
                sum += s[i][c];
            }
#pragma unroll
            for (int off = 1; off < 16; off <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
            l[i] = l[i] * alpha[i] + sum;
        }
        __syncthreads();  // every thread is done reading K before P overwrites it
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int c = 0; c < 4; c++) Ps[(4 * ty + i) * FA_PSTRIDE + tx + 16 * c] = s[i][c];
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int g = 0; g < NG; g++)
#pragma unroll
                for (int e = 0; e < 4; e++) o[i][g][e] *= alpha[i];
        __syncthreads();

        for (int j = 0; j < FA_BK; j += 4) {
            float4 p[4];
#pragma unroll
            for (int i = 0; i < 4; i++) p[i] = *(const float4*)(Ps + (4 * ty + i) * FA_PSTRIDE + j);
#pragma unroll
            for (int jj = 0; jj < 4; jj++) {
#pragma unroll
                for (int g = 0; g < NG; g++) {
                    const int d = 4 * tx + 64 * g;
                    if (d < hd) {
                        const float4 v = *(const float4*)(Vs + (j + jj) * hd + d);
#pragma unroll
                        for (int i = 0; i < 4; i++) {
                            const float pi = jj == 0 ? p[i].x : jj == 1 ? p[i].y : jj == 2 ? p[i].z : p[i].w;
                            o[i][g][0] += pi * v.x;
                            o[i][g][1] += pi * v.y;
                            o[i][g][2] += pi * v.z;
                            o[i][g][3] += pi * v.w;
                        }
                    }
                }
            }
        }
        __syncthreads();  // P and V are overwritten by the next tile
    }

#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int r = 4 * ty + i;
        if (r >= rows) continue;
        const float inv = 1.f / l[i];
        float* out = outp + (size_t)(t0 + r) * out_stride + h * hd;
#pragma unroll
        for (int g = 0; g < NG; g++) {
            const int d = 4 * tx + 64 * g;
            if (d < hd)
                *(float4*)(out + d) =
                    make_float4(o[i][g][0] * inv, o[i][g][1] * inv, o[i][g][2] * inv, o[i][g][3] * inv);
        }
    }
}
// d128: hd <= 128, two blocks per SM; d256: hd <= 256.
#define FLASH_ATTN(NAME, KV, NG, MINB)                                                                          \
    extern "C" __global__ void __launch_bounds__(FA_THREADS, MINB)                                              \
        NAME(const float* qr, int q_stride, const KV* kc, const KV* vc, const int* pos, int nt, int n_heads,    \
             int n_kv, int hd, int cap, float scale, float* outp, int out_stride) {                             \
        pdl_wait(); /* `attention` may launch with PDL: q and the cache come from the previous kernel */      \
        flash_body<KV, NG>(qr, q_stride, kc, vc, pos, nt, n_heads, n_kv, hd, cap, scale, outp, out_stride);   \
    }
FLASH_ATTN(flash_attn_d128_f16, u16, 2, 2)
FLASH_ATTN(flash_attn_d128_f32, float, 2, 2)
FLASH_ATTN(flash_attn_d256_f16, u16, 4, 1)
FLASH_ATTN(flash_attn_d256_f32, float, 4, 1)

// ---- Prefill attention on tensor cores (mma.sync m16n8k16 f16 -> f32, sm_80+)
// Same contract and grid as flash_body: one block per (64-token query tile,
// query head), causal, GQA. 4 warps; warp w owns query rows 16 w .. 16 w + 15
// of the tile. Per 64-key tile: K and V are converted to f16 while staged in
// shared memory, S = Q K^T by mma, online softmax on the accumulator
// fragments, P turned into A fragments straight from the S registers
// (FlashAttention-2), O += P V by mma with V fragments from ldmatrix.trans.
//
// SPLIT (the default mode): x = hi + lo, hi = f16(x), lo = f16(x - hi), and
// each product takes hi*hi + hi*lo + lo*hi (the lo*lo term is ~2^-22 of the
// result), so Q, K, V and P carry ~22 bits instead of 11: accuracy close to
// the f32 kernel. An f16 cache has no lo part (K, V exact in f16), so there
// only Q and P are split. f16 has no f32 range: |K|, |V|, |Q scale| must stay
// below 65504 (the f32 kernel has no such limit).
//
// Fragment layouts (PTX ISA, mma.m16n8k16 .f16, g = lane / 4, c = lane % 4):
//   A 16x16 (row): a0 (row g, cols 2c, 2c+1), a1 (row g+8, same cols),
//                  a2 (row g, cols 2c+8, 2c+9), a3 (row g+8, cols 2c+8, 2c+9)
//   B 16x8 (col):  b0 (k rows 2c, 2c+1, col g), b1 (k rows 2c+8, 2c+9, col g)
//   C/D 16x8 f32:  d0, d1 (row g, cols 2c, 2c+1), d2, d3 (row g+8, same cols)
// The lower-index element sits in the low half of each f16x2 register.
// ldmatrix.x4: lane l gives the address of row l % 8 of 8x8 matrix l / 8 and
// receives register i = its (row l / 4, cols 2 (l % 4) .. +1) of matrix i
// (.trans: rows 2 (l % 4) .. +1 of column l / 4 instead).
//
// Shared memory, f16, rows of ld = hd + 8 halves (16-byte aligned rows, and
// the 16-byte shift per row keeps the 8 row reads of an ldmatrix on distinct
// banks): Qh [64][ld], Ql (SPLIT), Kh, Kl (SPLIT, f32 cache), Vh, Vl (same),
// and with an f16 cache a second stage of Kh, Vh (cp.async double buffer).
#define TC_BQ 64
#define TC_BK 64
#define TC_THREADS 128

#if __CUDA_ARCH__ >= 800
// f16x2 of (a, b): a in the low half.
__device__ __forceinline__ u32 tc_pack(float a, float b) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(b), "f"(a));
    return r;
}
// The residual pair (a, b) - f16x2 h: what the low part holds.
__device__ __forceinline__ u32 tc_pack_lo(float a, float b, u32 h) {
    return tc_pack(a - h2f((u16)(h & 0xffff)), b - h2f((u16)(h >> 16)));
}
__device__ __forceinline__ void tc_ldsm4(u32* r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}
__device__ __forceinline__ void tc_ldsm4t(u32* r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}
// d += a b (16x8x16).
__device__ __forceinline__ void tc_mma(float* d, const u32* a, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two n8 tiles (c0: B regs 0-1, c1: 2-3) of A x B with the split operands:
// lo(A) hi(B) when SPLIT, hi(A) lo(B) when KLO, then hi(A) hi(B) — small
// terms first, one fixed order for the S and the O products.
template <bool SPLIT, bool KLO>
__device__ __forceinline__ void tc_mma_split(float* c0, float* c1, const u32* ah, const u32* al, const u32* bh,
                                             const u32* bl) {
    if (SPLIT) {
        tc_mma(c0, al, bh[0], bh[1]);
        tc_mma(c1, al, bh[2], bh[3]);
    }
    if (KLO) {
        tc_mma(c0, ah, bl[0], bl[1]);
        tc_mma(c1, ah, bl[2], bl[3]);
    }
    tc_mma(c0, ah, bh[0], bh[1]);
    tc_mma(c1, ah, bh[2], bh[3]);
}
// One k16 step of B: its hi fragments from shared address `hi` and, with
// KLO, its lo ones from `lo` (TRANS: ldmatrix .trans, for V), times the
// split A operand into the n8 tiles c0, c1.
template <bool SPLIT, bool KLO, bool TRANS>
__device__ __forceinline__ void tc_split_step(float* c0, float* c1, const u32* ah, const u32* al, u32 hi, u32 lo) {
    u32 bh[4], bl[4];
    if (TRANS) {
        tc_ldsm4t(bh, hi);
        if (KLO) tc_ldsm4t(bl, lo);
    } else {
        tc_ldsm4(bh, hi);
        if (KLO) tc_ldsm4(bl, lo);
    }
    tc_mma_split<SPLIT, KLO>(c0, c1, ah, al, bh, bl);
}
// P's A fragment for keys 16 kk.. — the S accumulators of key tiles 2 kk
// (a0, a1) and 2 kk + 1 (a2, a3) — as f16 and, with SPLIT, the residual.
template <bool SPLIT>
__device__ __forceinline__ void tc_p_frag(const float (*s)[4], int kk, u32* ph, u32* pl) {
    ph[0] = tc_pack(s[2 * kk][0], s[2 * kk][1]);
    ph[1] = tc_pack(s[2 * kk][2], s[2 * kk][3]);
    ph[2] = tc_pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    ph[3] = tc_pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    if (SPLIT) {
        pl[0] = tc_pack_lo(s[2 * kk][0], s[2 * kk][1], ph[0]);
        pl[1] = tc_pack_lo(s[2 * kk][2], s[2 * kk][3], ph[1]);
        pl[2] = tc_pack_lo(s[2 * kk + 1][0], s[2 * kk + 1][1], ph[2]);
        pl[3] = tc_pack_lo(s[2 * kk + 1][2], s[2 * kk + 1][3], ph[3]);
    }
}
// 4 floats into hi (and, with LO, lo) f16 rows at 8-byte aligned dst.
template <bool LO>
__device__ __forceinline__ void tc_store4(float4 v, u16* hi, u16* lo) {
    const u32 h0 = tc_pack(v.x, v.y), h1 = tc_pack(v.z, v.w);
    *(uint2*)hi = make_uint2(h0, h1);
    if (LO) *(uint2*)lo = make_uint2(tc_pack_lo(v.x, v.y, h0), tc_pack_lo(v.z, v.w, h1));
}
// Keys j0 .. j0 + 63 of one KV head into f16 rows; keys at or past kend
// (not written yet: garbage or NaN; or the next key split's) become zeros,
// as P V would otherwise pick up 0 * NaN. TC_LB loads per thread are issued
// before any is converted: the compiler cannot hoist a global load above the
// shared-memory stores, so one at a time each would wait its full latency.
#define TC_LB 8
template <bool LO, int HDMAX>
__device__ __forceinline__ void tc_load_tile(const float* base, int j0, int kend, int hd, int ld, u16* hi, u16* lo) {
    constexpr int ITER = TC_BK * (HDMAX / 4) / TC_THREADS;  // float4s per thread at hd = HDMAX
    static_assert(ITER % TC_LB == 0, "whole load batches");
    const int per_row = hd / 4, n = TC_BK * per_row;
#pragma unroll 1
    for (int b = 0; b < ITER; b += TC_LB) {
        float4 v[TC_LB];
#pragma unroll
        for (int i = 0; i < TC_LB; i++) {
            const int idx = threadIdx.x + (b + i) * TC_THREADS, j = idx / per_row, d = (idx - j * per_row) * 4;
            v[i] = make_float4(0.f, 0.f, 0.f, 0.f);
            if (idx < n && j0 + j < kend) v[i] = *(const float4*)(base + (size_t)(j0 + j) * hd + d);
        }
#pragma unroll
        for (int i = 0; i < TC_LB; i++) {
            const int idx = threadIdx.x + (b + i) * TC_THREADS, j = idx / per_row, d = (idx - j * per_row) * 4;
            if (idx < n) tc_store4<LO>(v[i], hi + j * ld + d, lo + j * ld + d);
        }
    }
}
// Rows j0 .. j0 + TC_BK of a [key][hd] cache into dst (row stride ld) as
// 16-byte cp.async copies, all in flight at once; zeros past kend.
template <typename T>
__device__ __forceinline__ void tc_copy_rows(const T* base, int j0, int kend, int hd, int ld, T* dst0) {
    constexpr int PER = 16 / sizeof(T);
    const int per_row = hd / PER;
    for (int idx = threadIdx.x; idx < TC_BK * per_row; idx += TC_THREADS) {
        const int j = idx / per_row, d = (idx - j * per_row) * PER;
        T* dst = dst0 + j * ld + d;
        if (j0 + j < kend) {
            const u32 a = (u32)__cvta_generic_to_shared(dst);
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(a), "l"(base + (size_t)(j0 + j) * hd + d)
                         : "memory");
        } else {
            *(uint4*)dst = make_uint4(0, 0, 0, 0);
        }
    }
}
// f16 cache: copied as is (exact in f16, so never a lo part) by cp.async;
// tc_load_wait() before the barrier.
template <bool LO, int HDMAX>
__device__ __forceinline__ void tc_load_tile(const u16* base, int j0, int kend, int hd, int ld, u16* hi, u16*) {
    tc_copy_rows(base, j0, kend, hd, ld, hi);
}
__device__ __forceinline__ void tc_load_wait() { asm volatile("cp.async.wait_all;" ::: "memory"); }
__device__ __forceinline__ void tc_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void tc_wait_prev() { asm volatile("cp.async.wait_group 1;" ::: "memory"); }
// Raw f32 keys j0 .. j0 + 63 into stg [64][hd] by cp.async (zeros past kend).
__device__ __forceinline__ void tc_stage_tile(const float* base, int j0, int kend, int hd, float* stg) {
    tc_copy_rows(base, j0, kend, hd, hd, stg);
}
__device__ __forceinline__ void tc_stage_tile(const u16*, int, int, int, float*) {}  // f16 cache: never staged
// The staged f32 tile into hi/lo f16 rows.
__device__ __forceinline__ void tc_convert(const float* stg, int hd, int ld, u16* hi, u16* lo) {
    const int per_row = hd / 4;
    for (int idx = threadIdx.x; idx < TC_BK * per_row; idx += TC_THREADS) {
        const int j = idx / per_row, d = (idx - j * per_row) * 4;
        tc_store4<true>(*(const float4*)(stg + j * hd + d), hi + j * ld + d, lo + j * ld + d);
    }
}
#endif

// Keys per key split of a query tile that needs kmax keys: n_ks near-equal
// whole key tiles (the last splits may be empty). Shared with the merge.
__device__ __forceinline__ int tc_split_chunk(int kmax, int n_ks) {
    return ((kmax + n_ks - 1) / n_ks + TC_BK - 1) / TC_BK * TC_BK;
}
__device__ __forceinline__ float tc_fin(float m) { return m == NEG_INF ? 0.f : m; }

// The block's query tile and key range, as every tiled flash kernel takes
// them: with qt (its query tile), ksp (its key split of n_ks), BQ query
// rows a tile, nt tokens at pos[0], declares p0, t0, rows, kmax (the keys
// the tile needs, last row inclusive), kchunk and [kbeg, kend), and returns
// from a block past the tile's keys (block-uniform; the merge skips it;
// with one split in use, kchunk >= kmax, that split writes the output
// itself). A macro so that each kernel keeps its own code as compiled
// before (a shared function changed 17 of 28 kernels' SASS, session 26).
#define TC_KEY_RANGE(BQ)                                                   \
    const int p0 = pos[0], t0 = qt * BQ;                                   \
    const int rows = min(BQ, nt - t0);                                     \
    const int kmax = p0 + t0 + rows;                                       \
    const int kchunk = tc_split_chunk(kmax, n_ks);                         \
    const int kbeg = ksp * kchunk, kend = min(kmax, kbeg + kchunk);        \
    if (kbeg >= kmax) return;

// HDMAX: the largest head dim of the instantiation (hd <= HDMAX, hd % 16 == 0).
// STG (f32 cache, split, hd <= 128 only): raw f32 K/V tiles are copied by
// cp.async into the Q tiles' smem (dead once Q's fragments are in
// registers; 256 (hd + 8) bytes hold a 256 hd-byte f32 tile) and converted
// to hi/lo there: V's copy flies during S = Q K^T, the next K's during O += P V.
// One key tile's online-softmax step for a lane's rows r0 (s[.][0..2]) and
// r0 + 8 (s[.][2..4]) in base-2 units: causal mask (only where `mask`: the
// tile reaches past the warp's first row; row r0 sits at position pos0),
// the row max over the quad's lanes, p = 2^(s - max) in place, and the
// running max m, sum l and output rows o rescaled. A row masked out of the
// whole tile keeps m (max = -inf) and gets p = 0; while m is -inf, 0 is
// subtracted instead (-inf - -inf is NaN).
template <int NS, int NT>
__device__ __forceinline__ void tc_softmax_step(float (&s)[NS][4], float (&o)[NT][4], bool mask, int j0, int pos0,
                                                int c, float& m0, float& m1, float& l0, float& l1) {
    if (mask) {
#pragma unroll
        for (int n = 0; n < NS; n++)
#pragma unroll
            for (int e = 0; e < 4; e++)
                if (j0 + 8 * n + 2 * c + (e & 1) > pos0 + 8 * (e >> 1)) s[n][e] = NEG_INF;
    }
    float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
    for (int n = 0; n < NS; n++) {
        mx0 = fmaxf(mx0, fmaxf(s[n][0], s[n][1]));
        mx1 = fmaxf(mx1, fmaxf(s[n][2], s[n][3]));
    }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
    }
    const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
    const float a0 = exp2f(m0 - tc_fin(mn0)), a1 = exp2f(m1 - tc_fin(mn1));
    m0 = mn0;
    m1 = mn1;
    float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
    for (int n = 0; n < NS; n++) {
        s[n][0] = exp2f(s[n][0] - tc_fin(mn0));
        s[n][1] = exp2f(s[n][1] - tc_fin(mn0));
        s[n][2] = exp2f(s[n][2] - tc_fin(mn1));
        s[n][3] = exp2f(s[n][3] - tc_fin(mn1));
        sum0 += s[n][0] + s[n][1];
        sum1 += s[n][2] + s[n][3];
    }
    l0 = l0 * a0 + sum0;
    l1 = l1 * a1 + sum1;
#pragma unroll
    for (int n = 0; n < NT; n++) {
        o[n][0] *= a0;
        o[n][1] *= a0;
        o[n][2] *= a1;
        o[n][3] *= a1;
    }
}

// The end of a tensor-core flash tile for one lane's rows r0 and r0 + 8:
// the row sums were lane-partial (each lane its 2 keys per n8 tile); then
// either this key split's un-normalised partial [m (base 2), l, o[hd]] per
// (token, head, split) for the merge kernel, or the normalised output.
template <int NT>
__device__ __forceinline__ void tc_finish(const float (&o)[NT][4], float m0, float m1, float l0, float l1, int hd,
                                          bool partial, float* part, int t0, int r0, int rows, int c, int h,
                                          int n_heads, int n_ks, int ksp, float* outp, int out_stride) {
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, off);
        l1 += __shfl_xor_sync(0xffffffffu, l1, off);
    }
    if (partial) {
        const size_t pst = hd + 2;
        float* pp0 = part + (((size_t)(t0 + r0) * n_heads + h) * n_ks + ksp) * pst;
        float* pp1 = pp0 + (size_t)8 * n_heads * n_ks * pst;
        if (c == 0) {
            if (r0 < rows) *(float2*)pp0 = make_float2(m0, l0);
            if (r0 + 8 < rows) *(float2*)pp1 = make_float2(m1, l1);
        }
#pragma unroll
        for (int n = 0; n < NT; n++) {
            if (8 * n < hd) {
                if (r0 < rows) *(float2*)(pp0 + 2 + 8 * n + 2 * c) = make_float2(o[n][0], o[n][1]);
                if (r0 + 8 < rows) *(float2*)(pp1 + 2 + 8 * n + 2 * c) = make_float2(o[n][2], o[n][3]);
            }
        }
        return;
    }
    const float inv0 = 1.f / l0, inv1 = 1.f / l1;
    float* out0 = outp + (size_t)(t0 + r0) * out_stride + h * hd + 2 * c;
    float* out1 = out0 + (size_t)8 * out_stride;
#pragma unroll
    for (int n = 0; n < NT; n++) {
        if (8 * n < hd) {
            if (r0 < rows) *(float2*)(out0 + 8 * n) = make_float2(o[n][0] * inv0, o[n][1] * inv0);
            if (r0 + 8 < rows) *(float2*)(out1 + 8 * n) = make_float2(o[n][2] * inv1, o[n][3] * inv1);
        }
    }
}

template <typename KV, int HDMAX, bool SPLIT, bool STG = false>
__device__ __forceinline__ void flash_tc_body(const float* qr, int q_stride, const KV* kc, const KV* vc,
                                              const int* pos, int nt, int n_heads, int n_kv, int hd, int cap,
                                              float scale, float* outp, int out_stride, int n_ks, float* part) {
#if __CUDA_ARCH__ >= 800
    constexpr bool KLO = SPLIT && sizeof(KV) == 4;  // K, V need a lo part
    constexpr int NT = HDMAX / 8;                   // n8 tiles of an output row
    constexpr int KS = HDMAX / 16;                  // k16 steps over the head dim
    constexpr bool QREG = HDMAX <= 128;             // Q fragments live in registers (d256: too many)
    constexpr bool STG_ = STG && KLO && QREG;
    extern __shared__ uint4 tc_smem4[];
    const int ld = hd + 8, tile = TC_BQ * ld;
    u16* p = (u16*)tc_smem4;
    u16* Qh = p;
    p += tile;
    u16* Ql = p;
    if (SPLIT) p += tile;
    u16* Kh = p;
    p += tile;
    u16* Kl = p;
    if (KLO) p += tile;
    u16* Vh = p;
    p += tile;
    u16* Vl = p;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, c = lane & 3;
    // Heaviest (last) query tiles first: the causal work grows with the tile.
    // With n_ks > 1 key splits, block x = (tile, split) takes one key range.
    const int qt = gridDim.x / n_ks - 1 - blockIdx.x / n_ks, ksp = blockIdx.x % n_ks, h = blockIdx.y;
    const int kvh = h / (n_heads / n_kv);
    TC_KEY_RANGE(TC_BQ)
    const KV* kb = kc + (size_t)kvh * cap * hd;
    const KV* vb = vc + (size_t)kvh * cap * hd;
    // f16 cache: K/V tiles double-buffered by cp.async (stage 1 two tiles
    // past stage 0, after Vh): the next tile lands while this one computes.
    // The first is in flight while Q is staged.
    constexpr bool ASYNC = sizeof(KV) == 2;
    const int sst = 2 * tile;  // halves from stage 0 to stage 1 (ASYNC)
    if (ASYNC) {
        tc_load_tile<KLO, HDMAX>(kb, kbeg, kend, hd, ld, Kh, Kl);
        tc_load_tile<KLO, HDMAX>(vb, kbeg, kend, hd, ld, Vh, Vl);
        tc_commit();
    }

    // Q, pre-scaled by scale * log2(e): scores come out in base-2 units, so
    // the softmax takes exp2 (one ex2) instead of expf. Rows past nt are
    // zeros (finite, never written out).
    const float qscale = scale * 1.4426950408889634f;
    for (int idx = threadIdx.x; idx < TC_BQ * (hd / 4); idx += TC_THREADS) {
        const int r = idx / (hd / 4), d = (idx - r * (hd / 4)) * 4;
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (r < rows) {
            v = *(const float4*)(qr + (size_t)(t0 + r) * q_stride + h * hd + d);
            v.x *= qscale;
            v.y *= qscale;
            v.z *= qscale;
            v.w *= qscale;
        }
        tc_store4<SPLIT>(v, Qh + r * ld + d, Ql + r * ld + d);
    }

    // ldmatrix row addresses of this lane (elements; x2 bytes below).
    // lm = matrix, lr = row within it.
    const int lm = lane >> 3, lr = lane & 7;
    // Q as A (rows 16 warp.. +15, 16 dims): matrices (rows +0/+8) x (dims +0/+8) in a0..a3 order.
    const int q_off = (16 * warp + lr + 8 * (lm & 1)) * ld + 8 * (lm >> 1);
    // K as B of two n8 key tiles: regs 0, 1 = b0, b1 of keys +0..7; regs 2, 3 of keys +8..15.
    const int k_off = (lr + 8 * (lm >> 1)) * ld + 8 * (lm & 1);
    // V (rows = keys) transposed as B of two n8 dim tiles: regs 0, 1 = b0
    // (keys +0..7), b1 (keys +8..15) of dims +0..7; regs 2, 3 of dims +8..15.
    const int v_off = (lr + 8 * (lm & 1)) * ld + 8 * (lm >> 1);
    const u32 sQh = (u32)__cvta_generic_to_shared(Qh) + 2 * q_off;
    const u32 sQl = (u32)__cvta_generic_to_shared(Ql) + 2 * q_off;
    const u32 sKh = (u32)__cvta_generic_to_shared(Kh) + 2 * k_off;
    const u32 sKl = (u32)__cvta_generic_to_shared(Kl) + 2 * k_off;
    const u32 sVh = (u32)__cvta_generic_to_shared(Vh) + 2 * v_off;
    const u32 sVl = (u32)__cvta_generic_to_shared(Vl) + 2 * v_off;

    // This lane's accumulator rows: r0 = 16 warp + g (d0, d1) and r0 + 8 (d2, d3).
    const int r0 = 16 * warp + g;
    const int pos0 = p0 + t0 + r0;  // position of row r0 (row r0 + 8: pos0 + 8)
    const int wfirst = p0 + t0 + 16 * warp;
    // Warp-uniform: this warp holds a real row, and which key tiles it needs.
    const bool active = 16 * warp < rows;
    const int wlast = wfirst + 15;

    // Q's A fragments are the same for every key tile: load them once.
    u32 qreg[QREG ? KS : 1][4], qlreg[QREG && SPLIT ? KS : 1][4];
    if (QREG) {
        __syncthreads();  // Q staged
#pragma unroll
        for (int ks = 0; ks < KS; ks++) {
            if (16 * ks < hd) {
                tc_ldsm4(qreg[ks], sQh + 32 * ks);
                if (SPLIT) tc_ldsm4(qlreg[QREG && SPLIT ? ks : 0], sQl + 32 * ks);
            }
        }
    }
    float* stg = (float*)Qh;
    if (STG_) {
        __syncthreads();  // every warp holds Q: its smem becomes the staging tile
        tc_stage_tile(kb, kbeg, kend, hd, stg);
        tc_commit();
    }

    float o[NT][4] = {};
    // Running max and (lane-partial) sum of rows r0, r0 + 8.
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;

    int stage = 0;
    for (int j0 = kbeg; j0 < kend; j0 += TC_BK) {
        if (STG_) {
            tc_load_wait();
            __syncthreads();  // K's copy landed; everyone is past the previous P V (Kh, Vh free)
            tc_convert(stg, hd, ld, Kh, Kl);
            __syncthreads();  // Kh ready, staging free
            tc_stage_tile(vb, j0, kend, hd, stg);
            tc_commit();
        } else if (!ASYNC) {
            tc_load_tile<KLO, HDMAX>(kb, j0, kend, hd, ld, Kh, Kl);
            tc_load_tile<KLO, HDMAX>(vb, j0, kend, hd, ld, Vh, Vl);
        } else if (j0 + TC_BK < kend) {
            // The other stage was last read before the previous trailing barrier.
            const int o = (stage ^ 1) * sst;
            tc_load_tile<KLO, HDMAX>(kb, j0 + TC_BK, kend, hd, ld, Kh + o, Kl);
            tc_load_tile<KLO, HDMAX>(vb, j0 + TC_BK, kend, hd, ld, Vh + o, Vl);
            tc_commit();
            tc_wait_prev();  // this tile's group is done, the next one may still fly
        } else {
            tc_load_wait();
        }
        if (!STG_) __syncthreads();
        const u32 sb = 2 * stage * sst;  // bytes to this stage's K/V
        // Tiles wholly past the warp's rows are skipped. A row can see only
        // masked keys (a key split past its position): m stays -inf, p = 0.
        const bool run = active && j0 <= wlast;
        float s[8][4];
#pragma unroll
        for (int n = 0; n < 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[n][e] = 0.f;
        if (run) {
#pragma unroll
            for (int ks = 0; ks < KS; ks++) {
                if (16 * ks < hd) {
                    u32 qh[4], ql[4];
                    if (QREG) {
#pragma unroll
                        for (int i = 0; i < 4; i++) {
                            qh[i] = qreg[QREG ? ks : 0][i];
                            ql[i] = qlreg[QREG && SPLIT ? ks : 0][i];
                        }
                    } else {
                        tc_ldsm4(qh, sQh + 32 * ks);
                        if (SPLIT) tc_ldsm4(ql, sQl + 32 * ks);
                    }
#pragma unroll
                    for (int np = 0; np < 4; np++) {
                        const u32 koff = 2 * 16 * np * ld + 32 * ks;
                        tc_split_step<SPLIT, KLO, false>(s[2 * np], s[2 * np + 1], qh, ql, sKh + sb + koff, sKl + koff);
                    }
                }
            }
            // s[n][e] is key j0 + 8 n + 2 c + (e & 1) of row r0 + 8 (e >> 1).
            // Mask only where the tile reaches past the warp's first row.
            tc_softmax_step<8, NT>(s, o, j0 + TC_BK - 1 > wfirst, j0, pos0, c, m0, m1, l0, l1);
        }
        if (STG_) {
            tc_load_wait();
            __syncthreads();  // V's copy landed (S used Kh only)
            tc_convert(stg, hd, ld, Vh, Vl);
            __syncthreads();  // Vh ready, staging free
            if (j0 + TC_BK < kend) {
                tc_stage_tile(kb, j0 + TC_BK, kend, hd, stg);
                tc_commit();
            }
        }
        if (run) {
            // O += P V, 16 keys per step. P's A fragment of keys 16 kk.. is
            // the S accumulators of key tiles 2 kk (a0, a1) and 2 kk + 1 (a2, a3).
#pragma unroll
            for (int kk = 0; kk < 4; kk++) {
                u32 ph[4], pl[4];
                tc_p_frag<SPLIT>(s, kk, ph, pl);
#pragma unroll
                for (int dp = 0; dp < NT / 2; dp++) {
                    if (16 * dp < hd) {
                        const u32 voff = 2 * 16 * kk * ld + 32 * dp;
                        tc_split_step<SPLIT, KLO, true>(o[2 * dp], o[2 * dp + 1], ph, pl, sVh + sb + voff, sVl + voff);
                    }
                }
            }
        }
        if (!STG_) __syncthreads();  // K and V are overwritten by the next tile (STG: the next top barrier)
        if (ASYNC) stage ^= 1;
    }

    if (!active) return;
    tc_finish<NT>(o, m0, m1, l0, l1, hd, n_ks > 1 && kchunk < kmax, part, t0, r0, rows, c, h, n_heads, n_ks, ksp,
                  outp, out_stride);
#endif
}
// tc: split precision (default); tc16: plain f16 inputs. d128: hd <= 128,
// two blocks per SM; d256: hd <= 256.
#define FLASH_TC(NAME, KV, HDMAX, SPLIT, MINB)                                                                 \
    extern "C" __global__ void __launch_bounds__(TC_THREADS, MINB)                                             \
        NAME(const float* qr, int q_stride, const KV* kc, const KV* vc, const int* pos, int nt, int n_heads,    \
             int n_kv, int hd, int cap, float scale, float* outp, int out_stride, int n_ks, float* part) {      \
        pdl_wait(); /* as FLASH_ATTN */                                                                         \
        flash_tc_body<KV, HDMAX, SPLIT>(qr, q_stride, kc, vc, pos, nt, n_heads, n_kv, hd, cap, scale, outp,     \
                                        out_stride, n_ks, part);                                                \
    }
FLASH_TC(flash_tc_d128_f16, u16, 128, true, 2)
FLASH_TC(flash_tc_d128_f32, float, 128, true, 2)
FLASH_TC(flash_tc_d256_f16, u16, 256, true, 1)
FLASH_TC(flash_tc_d256_f32, float, 256, true, 1)
FLASH_TC(flash_tc16_d128_f16, u16, 128, false, 2)
FLASH_TC(flash_tc16_d128_f32, float, 128, false, 2)
FLASH_TC(flash_tc16_d256_f16, u16, 256, false, 1)
FLASH_TC(flash_tc16_d256_f32, float, 256, false, 1)
// Split, f32 cache, hd <= 128, K/V staged raw by cp.async (STG above).
extern "C" __global__ void __launch_bounds__(TC_THREADS, 2)
    flash_tcs_d128_f32(const float* qr, int q_stride, const float* kc, const float* vc, const int* pos, int nt,
                       int n_heads, int n_kv, int hd, int cap, float scale, float* outp, int out_stride, int n_ks,
                       float* part) {
    pdl_wait();
    flash_tc_body<float, 128, true, true>(qr, q_stride, kc, vc, pos, nt, n_heads, n_kv, hd, cap, scale, outp,
                                          out_stride, n_ks, part);
}

// Merges the key-split partials of flash_tc_* / flash_tcx_* (n_ks > 1) in
// split order (deterministic): grid (nt, n_heads), any block size. part as
// written there; bq: the query tile of the kernel that wrote it (its kmax).
__device__ __forceinline__ void tc_merge_body(const float* part, const int* pos, int nt, int n_heads, int hd,
                                              int n_ks, float* outp, int out_stride, int bq) {
    const int t = blockIdx.x, h = blockIdx.y;
    const int t0 = t / bq * bq;
    const int kmax = pos[0] + t0 + min(bq, nt - t0);
    const int kchunk = tc_split_chunk(kmax, n_ks);
    const int used = (kmax + kchunk - 1) / kchunk;  // splits that wrote (split 0 holds key 0: m finite)
    if (used == 1) return;                          // split 0 wrote the output
    const size_t pst = hd + 2;
    const float* base = part + ((size_t)t * n_heads + h) * n_ks * pst;
    float m = NEG_INF;
    for (int s = 0; s < used; s++) m = fmaxf(m, base[s * pst]);
    float l = 0.f;
    for (int s = 0; s < used; s++) l += base[s * pst + 1] * exp2f(base[s * pst] - m);
    const float inv = 1.f / l;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float a = 0.f;
        for (int s = 0; s < used; s++) a += base[s * pst + 2 + d] * exp2f(base[s * pst] - m);
        outp[(size_t)t * out_stride + h * hd + d] = a * inv;
    }
}
extern "C" __global__ void __launch_bounds__(128)
    flash_tc_merge(const float* part, const int* pos, int nt, int n_heads, int hd, int n_ks, float* outp,
                   int out_stride) {
    pdl_wait();
    tc_merge_body(part, pos, nt, n_heads, hd, n_ks, outp, out_stride, TC_BQ);
}
extern "C" __global__ void __launch_bounds__(128)
    flash_tcx_merge(const float* part, const int* pos, int nt, int n_heads, int hd, int n_ks, float* outp,
                    int out_stride, int bq) {
    pdl_wait();
    tc_merge_body(part, pos, nt, n_heads, hd, n_ks, outp, out_stride, bq);
}

// ---- Prefill attention, v2 (flash_tcx_*): split precision, f32 cache, K/V split once per layer.
// kv_split_f32 turns keys 0 .. p0 + nt - 1 of one layer's f32 cache into
// f16 rows kvs [n_kv][scap][4][hd] (per key: K hi, K lo, V hi, V lo, the
// same hi/lo values tc_store4 makes; scap a multiple of 64), so the attention blocks only copy f16
// tiles (cp.async, multi-stage) and never convert. Everything else (mma
// order, softmax, masking, key split, partials) is flash_tc_body's, so
// with one key split the results are bit-identical to flash_tc_d*_f32.
//
// flash_tcx_d{HD}_h{HPB}: NW = 8 warps per block; one block per (query
// tile, group of HPB query heads sharing one KV head, key split): the
// K/V tile in shared memory serves HPB heads. Warp w: head hg HPB + w /
// (NW / HPB), rows 16 (w % (NW / HPB)) .. +15 of the BQ = 16 NW / HPB row
// tile. Q's A fragments go straight from global memory to registers. Key
// tiles of BK = 64 rotate through ST = 2 stages (one barrier per tile).
// The 1-D grid runs the heaviest query tiles of every head group first.
// flash_tcx_d{HD}_w4: 4 warps, one head, 32-key tiles (two blocks per SM).
// SPLIT: rows [Kh | Kl | Vh | Vl] for flash_tcx_*; else [Kh | Vh] (f16
// values only) for flash_tcx16_*.
template <bool SPLIT>
__device__ __forceinline__ void kv_split_body(const float* kc, const float* vc, const int* pos, int nt, int n_kv,
                                              int hd, int cap, int scap, u16* kvs) {
#if __CUDA_ARCH__ >= 800
    constexpr int NPL = SPLIT ? 4 : 2;  // f16 planes per key row
    const int kmax = pos[0] + nt;
    const int which = blockIdx.y & 1, kvh = blockIdx.y >> 1;  // which: 0 = K, 1 = V
    const float* src = (which ? vc : kc) + (size_t)kvh * cap * hd;
    u16* dst = kvs + (size_t)kvh * scap * NPL * hd + (NPL / 2) * which * hd;
    const int per_row = hd / 4;
    const int n = kmax * per_row;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const int j = i / per_row, d = (i - j * per_row) * 4;
        u16* hi = dst + (size_t)j * NPL * hd + d;
        tc_store4<SPLIT>(*(const float4*)(src + (size_t)j * hd + d), hi, hi + hd);
    }
#endif
}
extern "C" __global__ void __launch_bounds__(256)
    kv_split_f32(const float* kc, const float* vc, const int* pos, int nt, int n_kv, int hd, int cap, int scap,
                 u16* kvs) {
    pdl_wait();
    kv_split_body<true>(kc, vc, pos, nt, n_kv, hd, cap, scap, kvs);
}
extern "C" __global__ void __launch_bounds__(256)
    kv_half_f32(const float* kc, const float* vc, const int* pos, int nt, int n_kv, int hd, int cap, int scap,
                u16* kvs) {
    pdl_wait();
    kv_split_body<false>(kc, vc, pos, nt, n_kv, hd, cap, scap, kvs);
}

#if __CUDA_ARCH__ >= 800
__device__ __forceinline__ void tcx_cp16(u16* dst, const u16* src, bool ok) {
    const u32 a = (u32)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(a), "l"(src), "r"(ok ? 16 : 0) : "memory");
}
template <int N>
__device__ __forceinline__ void tcx_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
#endif

// Q (pre-scaled by scale * log2(e), as flash_tc_body) as A fragments
// straight from global memory (row t0 + r0 of qr, the head's first column
// col): a0 row r0 cols 2c.., a1 row r0 + 8, a2 / a3 cols + 8, the ks-th
// k16 step at + 16 ks;
// with QKS also the lo parts. Rows at or past `rows` are zeros.
#if __CUDA_ARCH__ >= 800
template <int KS, bool QKS>
__device__ __forceinline__ void tcx_q_frags(const float* qr, int q_stride, int t0, int col, int r0, int rows, int c,
                                            float scale, u32 (&qreg)[KS][4], u32 (&qlreg)[KS][4]) {
    const float qscale = scale * 1.4426950408889634f;
    const float* q0 = qr + (size_t)(t0 + r0) * q_stride + col + 2 * c;
    const float* q1 = q0 + (size_t)8 * q_stride;
    const bool ok0 = r0 < rows, ok1 = r0 + 8 < rows;
#pragma unroll
    for (int ks = 0; ks < KS; ks++) {
        float2 v[4];
        v[0] = ok0 ? *(const float2*)(q0 + 16 * ks) : make_float2(0.f, 0.f);
        v[1] = ok1 ? *(const float2*)(q1 + 16 * ks) : make_float2(0.f, 0.f);
        v[2] = ok0 ? *(const float2*)(q0 + 16 * ks + 8) : make_float2(0.f, 0.f);
        v[3] = ok1 ? *(const float2*)(q1 + 16 * ks + 8) : make_float2(0.f, 0.f);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const float x = v[i].x * qscale, y = v[i].y * qscale;
            qreg[ks][i] = tc_pack(x, y);
            qlreg[ks][i] = QKS ? tc_pack_lo(x, y, qreg[ks][i]) : 0u;
        }
    }
}
#endif

// With SPLIT, QKS (the default) splits Q K too; false takes Q K in plain
// f16 (one mma instead of three) and leaves the side buffer's K lo plane
// uncopied: flash_tcxv_* (P V split only, Auto's choice). On the fixtures
// the P V product's rounding is what moves the logits (S24-3, S24-4:
// Q K split with P V plain was as far off as plain f16).
template <int HD, int HPB, int ST, int NW, int BK, bool SPLIT, bool QKS = SPLIT>
__device__ __forceinline__ void flash_tcx_body(const float* qr, int q_stride, const u16* kvs, const int* pos, int nt,
                                               int n_heads, int n_kv, int scap, float scale, float* outp,
                                               int out_stride, int n_ks, float* part) {
#if __CUDA_ARCH__ >= 800
    constexpr int THREADS = 32 * NW;
    constexpr int WPH = NW / HPB;  // warps per head
    constexpr int BQ = 16 * WPH;   // query rows per tile
    constexpr int KS = HD / 16, NT = HD / 8;
    constexpr int LD = HD + 8;            // halves per smem row (as flash_tc_body)
    constexpr int NPL = SPLIT ? 4 : 2;    // planes: Kh, Kl, Vh, Vl (split) or Kh, Vh
    constexpr int PLANE = BK * LD;        // halves per plane and stage
    constexpr int STAGE = NPL * PLANE;
    constexpr int CPR = HD / 8;           // 16-byte chunks per row
    constexpr int CPT = NPL * BK * CPR / THREADS;  // chunks per thread and tile
    constexpr int NS = BK / 8;                     // n8 key tiles of S
    static_assert(NW % HPB == 0 && CPT * THREADS == NPL * BK * CPR && TC_BK % BK == 0, "tile shape");
    extern __shared__ uint4 tc_smem4[];
    u16* sm = (u16*)tc_smem4;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, c = lane & 3;
    const int n_hg = n_heads / HPB, n_qt = (nt + BQ - 1) / BQ;
    const int hg = blockIdx.x % n_hg, rest = blockIdx.x / n_hg;
    const int ksp = rest % n_ks, qt = n_qt - 1 - rest / n_ks;
    const int h = hg * HPB + warp / WPH;
    const int kvh = hg * HPB / (n_heads / n_kv);
    TC_KEY_RANGE(BQ)
    const int ntl = (kend - kbeg + BK - 1) / BK;
    // kvs rows are [Kh | Kl | Vh | Vl] (split) or [Kh | Vh] of one key (NPL
    // HD halves), so a key tile is one contiguous run: chunk id = tid +
    // THREADS i is 16 bytes at id * 8 halves, i.e. key row id / (NPL CPR),
    // plane (id / CPR) % NPL.
    // Rows at or past kend become zeros (cp.async zero fill; the source
    // stays inside kvs: scap is a whole number of key tiles).
    const u16* src_t = kvs + (size_t)kvh * scap * NPL * HD + threadIdx.x * 8;
    const int jt = threadIdx.x / (NPL * CPR), pt = (threadIdx.x / CPR) % NPL, dt = (threadIdx.x % CPR) * 8;
    constexpr int RSTEP = THREADS / (NPL * CPR);  // key rows per chunk step
    static_assert(THREADS % (NPL * CPR) == 0, "whole rows per chunk step");
    u16* dst_t = sm + pt * PLANE + jt * LD + dt;
    auto copy_tile = [&](int j0, int st) {
        const u16* src = src_t + (size_t)j0 * NPL * HD;
        u16* dst = dst_t + st * STAGE;
#pragma unroll
        for (int i = 0; i < CPT; i++)
            if (!SPLIT || QKS || pt != 1)  // K lo (split layout) unread by a plain Q K
                tcx_cp16(dst + i * RSTEP * LD, src + i * THREADS * 8, j0 + jt + i * RSTEP < kend);
    };
    copy_tile(kbeg, 0);
    tc_commit();
#pragma unroll
    for (int s = 1; s < ST - 1; s++) {
        if (s < ntl) copy_tile(kbeg + s * BK, s);
        tc_commit();
    }

    // Q split into hi/lo A fragments (tcx_q_frags).
    const int wr = 16 * (warp % WPH);  // the warp's first row in the tile
    const int r0 = wr + g;
    u32 qreg[KS][4], qlreg[KS][4];
    tcx_q_frags<KS, QKS>(qr, q_stride, t0, h * HD, r0, rows, c, scale, qreg, qlreg);

    const int lm = lane >> 3, lr = lane & 7;
    const int k_off = (lr + 8 * (lm >> 1)) * LD + 8 * (lm & 1);
    const int v_off = (lr + 8 * (lm & 1)) * LD + 8 * (lm >> 1);
    const u32 s_base = (u32)__cvta_generic_to_shared(sm);
    const u32 sKh = s_base + 2 * k_off, sKl = sKh + 2 * PLANE;
    const u32 sVh = s_base + 2 * ((NPL / 2) * PLANE + v_off), sVl = sVh + 2 * PLANE;  // sKl, sVl: split only

    const int pos0 = p0 + t0 + r0;
    const int wfirst = p0 + t0 + wr, wlast = wfirst + 15;
    const bool active = wr < rows;

    float o[NT][4] = {};
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;

#pragma unroll 1
    for (int it = 0; it < ntl; it++) {
        tcx_wait<ST - 2>();
        __syncthreads();  // tile it landed for all; everyone is past tile it - 1 (its stage is free)
        if (it + ST - 1 < ntl) copy_tile(kbeg + (it + ST - 1) * BK, (it + ST - 1) % ST);
        tc_commit();
        const int j0 = kbeg + it * BK;
        const u32 sb = 2 * (it % ST) * STAGE;
        if (!(active && j0 <= wlast)) continue;  // tiles wholly past the warp's rows
        float s[NS][4];
#pragma unroll
        for (int n = 0; n < NS; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[n][e] = 0.f;
#pragma unroll
        for (int ks = 0; ks < KS; ks++) {
#pragma unroll
            for (int np = 0; np < NS / 2; np++) {
                const u32 koff = sb + 2 * 16 * np * LD + 32 * ks;
                tc_split_step<QKS, QKS, false>(s[2 * np], s[2 * np + 1], qreg[ks], qlreg[ks], sKh + koff,
                                                   sKl + koff);
            }
        }
        tc_softmax_step<NS, NT>(s, o, j0 + BK - 1 > wfirst, j0, pos0, c, m0, m1, l0, l1);
#pragma unroll
        for (int kk = 0; kk < NS / 2; kk++) {
            u32 ph[4], pl[4];
            tc_p_frag<SPLIT>(s, kk, ph, pl);
#pragma unroll
            for (int dp = 0; dp < NT / 2; dp++) {
                const u32 voff = sb + 2 * 16 * kk * LD + 32 * dp;
                tc_split_step<SPLIT, SPLIT, true>(o[2 * dp], o[2 * dp + 1], ph, pl, sVh + voff, sVl + voff);
            }
        }
    }
    tcx_wait<0>();  // nothing in flight at exit (the last groups are empty)

    if (!active) return;
    tc_finish<NT>(o, m0, m1, l0, l1, HD, n_ks > 1 && kchunk < kmax, part, t0, r0, rows, c, h, n_heads, n_ks, ksp,
                  outp, out_stride);
#endif
}
// NW warps per block (8: one resident block per SM; 4: two, with 32-key
// tiles). flash_tcx_*: split precision; flash_tcx16_*: plain f16 (Q, K, V
// and P rounded to f16 once, one mma per product instead of three:
// YINSEN_CUDA_FLASH=tcx16); flash_tcxv_*: P V split, Q K plain (QKS).
#define FLASH_TCX(NAME, HD, HPB, ST, NW, BK, SPLIT, QKS)                                                      \
    extern "C" __global__ void __launch_bounds__(32 * NW, 8 / NW)                                              \
        NAME(const float* qr, int q_stride, const u16* kvs, const int* pos, int nt, int n_heads, int n_kv,      \
             int scap, float scale, float* outp, int out_stride, int n_ks, float* part) {                       \
        pdl_wait();                                                                                             \
        flash_tcx_body<HD, HPB, ST, NW, BK, SPLIT, QKS>(qr, q_stride, kvs, pos, nt, n_heads, n_kv, scap, scale,  \
                                                        outp, out_stride, n_ks, part);                          \
    }
FLASH_TCX(flash_tcx_d128_h1, 128, 1, 2, 8, 64, true, true)
FLASH_TCX(flash_tcx_d128_h2, 128, 2, 2, 8, 64, true, true)
FLASH_TCX(flash_tcx_d128_h4, 128, 4, 2, 8, 64, true, true)
FLASH_TCX(flash_tcx_d128_w4, 128, 1, 2, 4, 32, true, true)
FLASH_TCX(flash_tcx_d64_h1, 64, 1, 2, 8, 64, true, true)
FLASH_TCX(flash_tcx_d64_h2, 64, 2, 2, 8, 64, true, true)
FLASH_TCX(flash_tcx_d64_h4, 64, 4, 2, 8, 64, true, true)
FLASH_TCX(flash_tcx_d64_w4, 64, 1, 2, 4, 32, true, true)
FLASH_TCX(flash_tcx16_d128_h1, 128, 1, 2, 8, 64, false, false)
FLASH_TCX(flash_tcx16_d128_h2, 128, 2, 2, 8, 64, false, false)
FLASH_TCX(flash_tcx16_d128_h4, 128, 4, 2, 8, 64, false, false)
FLASH_TCX(flash_tcx16_d128_w4, 128, 1, 2, 4, 32, false, false)
FLASH_TCX(flash_tcx16_d64_h1, 64, 1, 2, 8, 64, false, false)
FLASH_TCX(flash_tcx16_d64_h2, 64, 2, 2, 8, 64, false, false)
FLASH_TCX(flash_tcx16_d64_h4, 64, 4, 2, 8, 64, false, false)
FLASH_TCX(flash_tcx16_d64_w4, 64, 1, 2, 4, 32, false, false)
FLASH_TCX(flash_tcxv_d128_h1, 128, 1, 2, 8, 64, true, false)
FLASH_TCX(flash_tcxv_d128_h2, 128, 2, 2, 8, 64, true, false)
FLASH_TCX(flash_tcxv_d128_h4, 128, 4, 2, 8, 64, true, false)
FLASH_TCX(flash_tcxv_d128_w4, 128, 1, 2, 4, 32, true, false)
FLASH_TCX(flash_tcxv_d64_h1, 64, 1, 2, 8, 64, true, false)
FLASH_TCX(flash_tcxv_d64_h2, 64, 2, 2, 8, 64, true, false)
FLASH_TCX(flash_tcxv_d64_h4, 64, 4, 2, 8, 64, true, false)
FLASH_TCX(flash_tcxv_d64_w4, 64, 1, 2, 4, 32, true, false)

// ---- Prefill attention, v3 (flash_wg_*): Hopper warpgroup MMA (sm_90a).
// The precision of flash_tcxv_* (Q K in plain f16, P V split into hi + lo
// f16: lo(P) hi(V), hi(P) lo(V), hi(P) hi(V), in that order) on wgmma
// instead of mma.sync: B operands come straight from shared memory through
// matrix descriptors (no ldmatrix), A (Q, then P) from registers in the
// mma.sync fragment layout, so qreg, tc_p_frag, tc_softmax_step and
// tc_finish carry over: a warp's m64nN accumulators are its 16 rows' m16n8
// C tiles along N.
//
// kv_tile_f32 writes the side buffer as the kernel's shared-memory image,
// one contiguous run per (KV head, 64-key tile), so a stage is one bulk
// copy (TMA) completing on an mbarrier. Tile image (halves, FW_TILE(hd)):
//   [0, 64 hd)         K hi, K-major core matrices of 8 keys x 8 dims:
//                      (key j, dim d) at ((j / 8) (hd / 8) + d / 8) 64 + (j % 8) 8 + d % 8
//   [64 hd, 128 hd)    V hi transposed, core matrices of 8 dims x 8 keys:
//                      (key j, dim d) at ((d / 8) 8 + j / 8) 64 + (d % 8) 8 + j % 8
//   [128 hd, 192 hd)   V lo, the same
// Core matrices are 128 contiguous bytes; along K (dims for S = Q K^T,
// keys for O = P V) the next one is +128 bytes (the descriptor's leading
// byte offset), along N +(hd / 8) 128 (K) or +1024 (V) (stride offset).
// Keys at or past p0 + nt of the last tile are written as zeros (P V would
// otherwise pick up 0 * NaN); tiles past it are never read.
#define FW_BK 64
__device__ __forceinline__ int fw_tile(int hd) { return 3 * FW_BK * hd; }

extern "C" __global__ void __launch_bounds__(256)
    kv_tile_f32(const float* kc, const float* vc, const int* pos, int nt, int n_kv, int hd, int cap, int scap,
                u16* kvs) {
    pdl_wait();
#if __CUDA_ARCH__ >= 800
    const int kmax = pos[0] + nt;
    const int ntile = (kmax + FW_BK - 1) / FW_BK;
    const int which = blockIdx.y & 1, kvh = blockIdx.y >> 1;  // which: 0 = K, 1 = V
    const float* src = (which ? vc : kc) + (size_t)kvh * cap * hd;
    u16* img = kvs + (size_t)kvh * (scap / FW_BK) * fw_tile(hd);
    const int per_tile = FW_BK * hd / 8;  // 16-byte chunks of one plane
    const int n = ntile * per_tile, hg = hd / 8;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const int t = i / per_tile, r = i - t * per_tile, cm = r >> 3, rr = r & 7;
        u16* dst = img + (size_t)t * fw_tile(hd) + r * 8;
        float v[8];
        if (!which) {
            // K: chunk r is (key group cm / hg, dim group cm % hg), key row rr.
            const int j = t * FW_BK + (cm / hg) * 8 + rr, d = (cm % hg) * 8;
            float4 a = make_float4(0.f, 0.f, 0.f, 0.f), b = a;
            if (j < kmax) {
                a = *(const float4*)(src + (size_t)j * hd + d);
                b = *(const float4*)(src + (size_t)j * hd + d + 4);
            }
            *(uint4*)dst = make_uint4(tc_pack(a.x, a.y), tc_pack(a.z, a.w), tc_pack(b.x, b.y), tc_pack(b.z, b.w));
        } else {
            // V: chunk r is (dim group cm / 8, key group cm % 8), dim row rr.
            const int d = (cm >> 3) * 8 + rr, j0 = t * FW_BK + (cm & 7) * 8;
#pragma unroll
            for (int e = 0; e < 8; e++) v[e] = j0 + e < kmax ? src[(size_t)(j0 + e) * hd + d] : 0.f;
            u32 hi[4], lo[4];
#pragma unroll
            for (int e = 0; e < 4; e++) {
                hi[e] = tc_pack(v[2 * e], v[2 * e + 1]);
                lo[e] = tc_pack_lo(v[2 * e], v[2 * e + 1], hi[e]);
            }
            *(uint4*)(dst + FW_BK * hd) = make_uint4(hi[0], hi[1], hi[2], hi[3]);
            *(uint4*)(dst + 2 * FW_BK * hd) = make_uint4(lo[0], lo[1], lo[2], lo[3]);
        }
    }
#endif
}

#if __CUDA_ARCH__ >= 900
// K-major, no-swizzle matrix descriptor: start address, leading byte
// offset 128 (the next core matrix along K), stride byte offset `sbo`.
__device__ __forceinline__ u64 fw_desc(u32 addr, u32 sbo) {
    u64 d = (u64)((addr & 0x3FFFF) >> 4) | ((u64)(128 >> 4) << 16) | ((u64)(sbo >> 4) << 32);
    asm volatile("" : "+l"(d));  // made before the fence, not between the wgmmas
    return d;
}
__device__ __forceinline__ void fw_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void fw_commit_wait() {
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
}
// d (m64n64 f32 accumulators) += a (m64k16 f16, registers) b (desc: k16 x n64, K-major); scale_d 0: d = a b.
__device__ __forceinline__ void fw_mma_n64(float* d, const u32* a, u64 desc, int scale_d) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(scale_d));
#endif
}
// d (m64n128 f32 accumulators) += a (m64k16 f16, registers) b (desc: k16 x n128, K-major); scale_d 0: d = a b.
__device__ __forceinline__ void fw_mma_n128(float* d, const u32* a, u64 desc, int scale_d) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(scale_d));
#endif
}
#endif

// flash_wg_d{HD} / flash_wg3_d{HD}: NWG = 2 / 3 warpgroups per block, one
// query head, 64 NWG query rows (warpgroup w: rows 64 w .. 64 w + 63; warp
// w: rows 16 w .. 16 w + 15, as flash_tcx_*'s h1; wg3 spills 44 bytes under
// NVRTC 13.0 at its 168 registers and is still faster from ~1024 tokens,
// S26-6), 64-key tiles through ST stages of bulk
// copies. Per tile a warpgroup issues S = Q K^T (HD / 16 wgmmas m64n64k16),
// the online softmax of tc_softmax_step, then O += P V (3 x 4 wgmmas
// m64n{HD}k16); the last warpgroup done with a tile refills its stage with
// tile it + ST. Grid, key splits and partials: flash_tcx_*'s (hpb 1).
// (Measured and not kept, S26-2 / S26-4: FlashAttention-3's intra-warpgroup
// pipelining, docs/wip/s26-wgp-pipelined.patch; one block barrier a tile.)
template <int HD, int ST, int NWG = 2>
__device__ __forceinline__ void flash_wg_body(const float* qr, int q_stride, const u16* kvs, const int* pos, int nt,
                                              int n_heads, int n_kv, int scap, float scale, float* outp,
                                              int out_stride, int n_ks, float* part) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int BQ = 64 * NWG, BK = FW_BK, KS = HD / 16, NT = HD / 8, NS = BK / 8;
    constexpr int TILE = 3 * BK * HD;  // halves per stage
    extern __shared__ uint4 tc_smem4[];
    u16* sm = (u16*)tc_smem4;
    u64* full = (u64*)(sm + ST * TILE);
    int* done = (int*)(full + ST);  // warpgroups done with each stage's tile

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, c = lane & 3;
    const int n_qt = (nt + BQ - 1) / BQ;
    const int h = blockIdx.x % n_heads, rest = blockIdx.x / n_heads;
    const int ksp = rest % n_ks, qt = n_qt - 1 - rest / n_ks;
    const int kvh = h / (n_heads / n_kv);
    TC_KEY_RANGE(BQ)
    const int ntl = (kend - kbeg + BK - 1) / BK;
    const char* src = (const char*)(kvs + ((size_t)kvh * (scap / BK) + kbeg / BK) * TILE);
    const u32 sbase = smem_addr(sm);
    auto issue = [&](int i) {  // thread 0: tile i into stage i % ST
        u64* bar = &full[i % ST];
        mg_bulk_expect(bar, 2 * TILE);
        mg_bulk_part(sbase + (i % ST) * 2 * TILE, src + (size_t)i * 2 * TILE, 2 * TILE, bar);
    };
    if (threadIdx.x == 0) {
#pragma unroll
        for (int s = 0; s < ST; s++) {
            mbar_init(&full[s]);
            done[s] = 0;
        }
    }
    __syncthreads();
    if (threadIdx.x == 0)
        for (int i = 0; i < ST && i < ntl; i++) issue(i);

    // Q as plain f16 A fragments (tcx_q_frags).
    const int wr = 16 * warp;  // the warp's first row in the tile
    const int r0 = wr + g;
    u32 qreg[KS][4], qlreg[KS][4];  // qlreg: unused (Q K plain)
    tcx_q_frags<KS, false>(qr, q_stride, t0, h * HD, r0, rows, c, scale, qreg, qlreg);

    const int pos0 = p0 + t0 + r0;
    const int wfirst = p0 + t0 + wr;
    // Tiles 0 .. n_w - 1 reach warpgroup w's rows (the later ones are wholly
    // past them); each warpgroup walks its own.
    auto tiles_of = [&](int w) {
        const int last = p0 + t0 + 64 * w + 63;
        return 64 * w >= rows || last < kbeg ? 0 : min(ntl, (last - kbeg) / BK + 1);
    };
    const int n_mine = tiles_of(warp >> 2);

    float o[NT][4] = {};
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;

#pragma unroll 1
    for (int it = 0; it < n_mine; it++) {
        const int st = it % ST, j0 = kbeg + it * BK;
        mbar_wait(&full[st], (it / ST) & 1);
        const u32 kb = sbase + st * 2 * TILE, vh = kb + 2 * BK * HD, vl = vh + 2 * BK * HD;
        float s[NS][4];
        u64 dk[KS];
#pragma unroll
        for (int ks = 0; ks < KS; ks++) dk[ks] = fw_desc(kb + 256 * ks, (HD / 8) * 128);
        fw_fence();
#pragma unroll
        for (int ks = 0; ks < KS; ks++) fw_mma_n64(&s[0][0], qreg[ks], dk[ks], ks);
        fw_commit_wait();
        tc_softmax_step<NS, NT>(s, o, j0 + BK - 1 > wfirst, j0, pos0, c, m0, m1, l0, l1);
        u32 ph[NS / 2][4], pl[NS / 2][4];
#pragma unroll
        for (int kk = 0; kk < NS / 2; kk++) tc_p_frag<true>(s, kk, ph[kk], pl[kk]);
        u64 dvh[NS / 2], dvl[NS / 2];
#pragma unroll
        for (int kk = 0; kk < NS / 2; kk++) {
            dvh[kk] = fw_desc(vh + 256 * kk, (BK / 8) * 128);
            dvl[kk] = fw_desc(vl + 256 * kk, (BK / 8) * 128);
        }
        fw_fence();
#pragma unroll
        for (int kk = 0; kk < NS / 2; kk++) {
            if constexpr (HD == 128) {
                fw_mma_n128(&o[0][0], pl[kk], dvh[kk], 1);
                fw_mma_n128(&o[0][0], ph[kk], dvl[kk], 1);
                fw_mma_n128(&o[0][0], ph[kk], dvh[kk], 1);
            } else {
                fw_mma_n64(&o[0][0], pl[kk], dvh[kk], 1);
                fw_mma_n64(&o[0][0], ph[kk], dvl[kk], 1);
                fw_mma_n64(&o[0][0], ph[kk], dvh[kk], 1);
            }
        }
        fw_commit_wait();
        // The warpgroup's last warp to retire counts it; the tile's last
        // consumer refills the stage. No block barrier: the warpgroups drift
        // apart, one's softmax overlapping the other's wgmmas (S26-4: the
        // attention at 2048 tokens -7% against one barrier a tile).
        asm volatile("bar.sync %0, 128;" ::"r"(1 + (warp >> 2)) : "memory");
        if ((threadIdx.x & 127) == 0) {
            int want = 0;
#pragma unroll
            for (int w = 0; w < NWG; w++) want += it < tiles_of(w);
            if (atomicAdd(&done[st], 1) + 1 == want) {
                done[st] = 0;
                if (it + ST < ntl) issue(it + ST);
            }
        }
    }

    if (wr >= rows) return;
    tc_finish<NT>(o, m0, m1, l0, l1, HD, n_ks > 1 && kchunk < kmax, part, t0, r0, rows, c, h, n_heads, n_ks, ksp,
                  outp, out_stride);
#endif
}
#define FLASH_WG(NAME, HD, ST, NWG)                                                                             \
    extern "C" __global__ void __launch_bounds__(128 * NWG, 1)                                                 \
        NAME(const float* qr, int q_stride, const u16* kvs, const int* pos, int nt, int n_heads, int n_kv,      \
             int scap, float scale, float* outp, int out_stride, int n_ks, float* part) {                       \
        pdl_wait();                                                                                             \
        flash_wg_body<HD, ST, NWG>(qr, q_stride, kvs, pos, nt, n_heads, n_kv, scap, scale, outp, out_stride,    \
                                   n_ks, part);                                                                 \
    }
FLASH_WG(flash_wg_d128, 128, 3, 2)
FLASH_WG(flash_wg_d64, 64, 4, 2)
FLASH_WG(flash_wg3_d128, 128, 3, 3)
FLASH_WG(flash_wg3_d64, 64, 4, 3)
