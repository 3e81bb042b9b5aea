// Ternary x int8 -> int32 kernels over the GPU layout (see layout.rs):
// each row is `chunks` 16-byte chunks of 64 weights; word m of a chunk holds
// weight 16m + 4j + k at bits 8k + 2j as the code w + 1 (0, 1, 2). So
// (word >> 2j) & 0x03030303 is an int8x4 that lines up with the int8x4 word j
// of x, and sum_i (w_i + 1) x_i - sum_i x_i is the exact dot product.
//
// Output modes (epilogue fused): 0 = raw int32, 1 = store y = acc * (ws / sx),
// 2 = add y into the float output (residual connection).

__device__ __forceinline__ int ext2(u32 w, int j) { return (int)((w >> (2 * j)) & 0x03030303u); }

__device__ __forceinline__ int dot_word(u32 w, uint4 x, int a) {
    a = __dp4a(ext2(w, 0), (int)x.x, a);
    a = __dp4a(ext2(w, 1), (int)x.y, a);
    a = __dp4a(ext2(w, 2), (int)x.z, a);
    a = __dp4a(ext2(w, 3), (int)x.w, a);
    return a;
}

__device__ __forceinline__ void store_out(int mode, int acc, int row, int t, int out_stride,
                                          const int* xsum, const float* row_scale, const float* sx,
                                          int* out_i, float* out_f) {
    int v = acc - xsum[t];
    size_t o = (size_t)t * out_stride + row;
    if (mode == 0) {
        out_i[o] = v;
    } else {
        float y = (float)v * (row_scale[row] / sx[t]);
        if (mode == 1) out_f[o] = y;
        else out_f[o] += y;
    }
}

// Decode GEMV for up to T tokens: 8 lanes per row (a warp does 4 rows), each
// lane streams 16-byte weight chunks; x (tiny, shared by all rows) comes
// through L1. Tokens >= nt are skipped (nt is uniform).
template <int T>
__device__ __forceinline__ void gemv_body(const uint4* __restrict__ W, int n_rows, int chunks,
                                          const i8* __restrict__ X, int nt, const int* xsum,
                                          const float* row_scale, const float* sx, int* out_i,
                                          float* out_f, int out_stride, int mode) {
    const int lane = threadIdx.x & 31, sub = lane & 7;
    const int row = (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * 4 + (lane >> 3);
    const size_t x_stride = (size_t)chunks * 64;
    int acc[T];
#pragma unroll
    for (int t = 0; t < T; t++) acc[t] = 0;
    if (row < n_rows) {
        const uint4* wr = W + (size_t)row * chunks;
        // Issue U weight loads before using any: decode is latency-bound
        // unless many 16-byte loads are in flight per lane.
        const int U = 4;
        for (int c0 = sub; c0 < chunks; c0 += 8 * U) {
            uint4 wv[U];
#pragma unroll
            for (int u = 0; u < U; u++) {
                int c = c0 + 8 * u;
                wv[u] = c < chunks ? __ldg(wr + c) : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
            for (int u = 0; u < U; u++) {
                int c = c0 + 8 * u;
                if (c >= chunks) break;
                uint4 w = wv[u];
#pragma unroll
                for (int t = 0; t < T; t++) {
                    if (t < nt) {
                        const uint4* xp = (const uint4*)(X + t * x_stride) + 4 * c;
                        int a = acc[t];
                        a = dot_word(w.x, __ldg(xp + 0), a);
                        a = dot_word(w.y, __ldg(xp + 1), a);
                        a = dot_word(w.z, __ldg(xp + 2), a);
                        a = dot_word(w.w, __ldg(xp + 3), a);
                        acc[t] = a;
                    }
                }
            }
        }
    }
#pragma unroll
    for (int t = 0; t < T; t++) {
        acc[t] += __shfl_xor_sync(0xffffffffu, acc[t], 4);
        acc[t] += __shfl_xor_sync(0xffffffffu, acc[t], 2);
        acc[t] += __shfl_xor_sync(0xffffffffu, acc[t], 1);
    }
    if (row < n_rows && sub == 0) {
#pragma unroll
        for (int t = 0; t < T; t++)
            if (t < nt) store_out(mode, acc[t], row, t, out_stride, xsum, row_scale, sx, out_i, out_f);
    }
}

#define GEMV(T)                                                                                      \
    extern "C" __global__ void __launch_bounds__(128) tern_gemv_t##T(                                \
        const uint4* W, int n_rows, int chunks, const i8* X, int nt, const int* xsum,               \
        const float* row_scale, const float* sx, int* out_i, float* out_f, int out_stride, int mode) { \
        gemv_body<T>(W, n_rows, chunks, X, nt, xsum, row_scale, sx, out_i, out_f, out_stride, mode); \
    }
GEMV(1)
GEMV(2)
GEMV(4)
GEMV(8)
GEMV(16)

// Per-token sums of int8 rows (the offset-code correction), for callers that
// did not get them from the quantiser.
extern "C" __global__ void row_sums_i8(const i8* X, int n, int stride, int* out) {
    __shared__ float red[32];
    const i8* x = X + (size_t)blockIdx.x * stride;
    int s = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += x[i];
    // |sum| < 2^24 for n <= 2^17 (validated on the host), so f32 is exact.
    float t = block_sum((float)s, red);
    if (threadIdx.x == 0) out[blockIdx.x] = (int)t;
}

// Prefill GEMM on int8 tensor cores (mma.sync m16n8k32 s8, sm_80+).
// Block tile: 128 weight rows x 64 tokens, K step 64 (one chunk). 4 warps,
// warp w owns rows 32w..32w+31 (2 m16 tiles) x 64 tokens (8 n8 tiles).
// Weight codes (0..2) are expanded to int8 in shared memory; x is loaded
// as is. Row stride 80 bytes keeps fragment reads bank-conflict free.
#define MM_BM 128
#define MM_BN 64
#define MM_LD 80
extern "C" __global__ void __launch_bounds__(128) tern_mma(
    const uint4* W, int n_rows, int chunks, const i8* X, int nt, const int* xsum,
    const float* row_scale, const float* sx, int* out_i, float* out_f, int out_stride, int mode) {
#if __CUDA_ARCH__ >= 800
    __shared__ __align__(16) u8 As[MM_BM * MM_LD];
    __shared__ __align__(16) u8 Bs[MM_BN * MM_LD];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, tg = lane & 3;
    const int row0 = blockIdx.x * MM_BM, tok0 = blockIdx.y * MM_BN;
    const size_t x_stride = (size_t)chunks * 64;
    int acc[2][8][4];
#pragma unroll
    for (int a = 0; a < 2; a++)
#pragma unroll
        for (int b = 0; b < 8; b++)
#pragma unroll
            for (int c = 0; c < 4; c++) acc[a][b][c] = 0;

    // Each thread loads one weight chunk (its row) and two 16-byte x pieces.
    const int wrow = row0 + tid;
    const int xt0 = tid >> 2, xp0 = tid & 3;  // token tid/4, piece tid%4 (and token + 32)
    uint4 wv = make_uint4(0, 0, 0, 0), xv0 = wv, xv1 = wv;
    auto load = [&](int c) {
        wv = wrow < n_rows ? __ldg(W + (size_t)wrow * chunks + c) : make_uint4(0, 0, 0, 0);
        int ta = tok0 + xt0, tb = tok0 + xt0 + 32;
        xv0 = ta < nt ? __ldg((const uint4*)(X + ta * x_stride + (size_t)c * 64) + xp0) : make_uint4(0, 0, 0, 0);
        xv1 = tb < nt ? __ldg((const uint4*)(X + tb * x_stride + (size_t)c * 64) + xp0) : make_uint4(0, 0, 0, 0);
    };
    load(0);
    for (int c = 0; c < chunks; c++) {
        __syncthreads();
        u32* ar = (u32*)(As + tid * MM_LD);
        u32 ws[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
        for (int m = 0; m < 4; m++)
#pragma unroll
            for (int j = 0; j < 4; j++) ar[4 * m + j] = (ws[m] >> (2 * j)) & 0x03030303u;
        *(uint4*)(Bs + xt0 * MM_LD + 16 * xp0) = xv0;
        *(uint4*)(Bs + (xt0 + 32) * MM_LD + 16 * xp0) = xv1;
        __syncthreads();
        if (c + 1 < chunks) load(c + 1);
#pragma unroll
        for (int ks = 0; ks < 2; ks++) {
            const int kb = ks * 32;
            u32 af[2][4], bf[8][2];
#pragma unroll
            for (int mt = 0; mt < 2; mt++) {
                const u8* base = As + (warp * 32 + mt * 16 + g) * MM_LD + kb + 4 * tg;
                af[mt][0] = *(const u32*)(base);
                af[mt][1] = *(const u32*)(base + 8 * MM_LD);
                af[mt][2] = *(const u32*)(base + 16);
                af[mt][3] = *(const u32*)(base + 8 * MM_LD + 16);
            }
#pragma unroll
            for (int n8 = 0; n8 < 8; n8++) {
                const u8* base = Bs + (n8 * 8 + g) * MM_LD + kb + 4 * tg;
                bf[n8][0] = *(const u32*)(base);
                bf[n8][1] = *(const u32*)(base + 16);
            }
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int n8 = 0; n8 < 8; n8++) {
                    int* d = acc[mt][n8];
                    asm volatile(
                        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, "
                        "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
                        : "r"(af[mt][0]), "r"(af[mt][1]), "r"(af[mt][2]), "r"(af[mt][3]),
                          "r"(bf[n8][0]), "r"(bf[n8][1]));
                }
        }
    }
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int n8 = 0; n8 < 8; n8++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                int r = row0 + warp * 32 + mt * 16 + g + (i >= 2 ? 8 : 0);
                int t = tok0 + n8 * 8 + 2 * tg + (i & 1);
                if (r < n_rows && t < nt)
                    store_out(mode, acc[mt][n8][i], r, t, out_stride, xsum, row_scale, sx, out_i, out_f);
            }
#endif
}
