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
        flash_body<KV, NG>(qr, q_stride, kc, vc, pos, nt, n_heads, n_kv, hd, cap, scale, outp, out_stride);   \
    }
FLASH_ATTN(flash_attn_d128_f16, u16, 2, 2)
FLASH_ATTN(flash_attn_d128_f32, float, 2, 2)
FLASH_ATTN(flash_attn_d256_f16, u16, 4, 1)
FLASH_ATTN(flash_attn_d256_f32, float, 4, 1)
