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

// `old`: out_f's value at the output, read by the caller (mode 2 only).
__device__ __forceinline__ void store_out_old(int mode, int acc, int row, int t, int out_stride,
                                              const int* xsum, const float* row_scale, const float* sx,
                                              int* out_i, float* out_f, float old) {
    int v = acc - xsum[t];
    size_t o = (size_t)t * out_stride + row;
    if (mode == 0) {
        out_i[o] = v;
    } else {
        // Rounded multiply and add (never contracted into an FMA), so every
        // kernel and call site gives the same float bits for the same int32.
        float y = __fmul_rn((float)v, __fdiv_rn(row_scale[row], sx[t]));
        if (mode == 1) out_f[o] = y;
        else out_f[o] = __fadd_rn(old, y);
    }
}

__device__ __forceinline__ void store_out(int mode, int acc, int row, int t, int out_stride,
                                          const int* xsum, const float* row_scale, const float* sx,
                                          int* out_i, float* out_f) {
    const float old = mode == 2 ? out_f[(size_t)t * out_stride + row] : 0.f;
    store_out_old(mode, acc, row, t, out_stride, xsum, row_scale, sx, out_i, out_f, old);
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
        const float* row_scale, const float* sx, int* out_i, float* out_f, int out_stride, int mode,   \
        int* ksum, int* kcnt) { /* split-K scratch: unused here */                                     \
        pdl_wait(); /* may be launched with PDL (see embed_f16 in ops.cu) */                           \
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

// Prefill / multi-token GEMM on int8 tensor cores (mma.sync m16n8k32 s8,
// sm_80+). A = weights (rows), B = activations (tokens), D = [row][token].
//
// Block tile BM = 16 MT MW rows x BN = 8 NT NW tokens; warp (wm, wn) owns
// MT m16 tiles x NT n8 tiles. The K loop walks stages of TM_KC chunks (64
// weights each) through an S-deep cp.async pipeline, so global loads of the
// next stages overlap the tensor-core work on this one.
//
// Shared memory per stage:
// - A: the weights as stored (2-bit codes, 16 bytes per row-chunk), laid out
//   [kc][row] so the 8 rows a warp's lane groups read are 128 contiguous
//   bytes. The codes are expanded to int8 in registers: the A fragment of
//   m16n8k32 wants, for lane (g, tg), k = 4 tg .. 4 tg + 3 (+16) of rows g
//   and g + 8, which is exactly `(word >> 2 tg) & 0x03030303` of words 2 ks
//   and 2 ks + 1 of the row's chunk (see the layout at the top).
// - B: the int8 activations, [token][TM_KC * 64 bytes + 16 pad]; the pad
//   makes the 8-row ldmatrix reads bank-conflict free. One ldmatrix.x2 per
//   n8 tile and k32 half gives its two B registers (k 0..15 and 16..31).
// Rows >= n_rows, tokens >= nt and chunks >= chunks are zero-filled by
// cp.async (source size 0) and never stored; zero activations make the pad
// weights' codes irrelevant.
#define TM_KC 2
#define TM_BROW (TM_KC * 64 + 16)

__device__ __forceinline__ void cp_async16(u32 dst, const void* src, bool ok) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(ok ? 16 : 0) : "memory");
}

__device__ __forceinline__ void mma_s8(int* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Split-K epilogue. Every z block has added its int32 partials into ksum
// ([token][row], zero between launches): integer adds are exact and
// commutative, so the sum does not depend on arrival order. The block that
// arrives last at the tile's counter applies the epilogue once, and leaves
// ksum and the counter at zero for the next launch (graph replays too).
__device__ __noinline__ void splitk_finish(int BM, int BN, int THREADS, int row0, int tok0, int n_rows, int nt,
                                           int* ksum, int* kcnt, int mode, int out_stride, const int* xsum,
                                           const float* row_scale, const float* sx, int* out_i, float* out_f) {
    __shared__ int last;
    __threadfence();
    __syncthreads();
    const int tile = blockIdx.y * gridDim.x + blockIdx.x;
    if (threadIdx.x == 0) last = atomicAdd(kcnt + tile, 1) == (int)gridDim.z - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int i = threadIdx.x; i < BM * BN; i += THREADS) {
        const int r = row0 + i % BM, t = tok0 + i / BM;
        if (r < n_rows && t < nt) {
            const int v = atomicExch(ksum + (size_t)t * n_rows + r, 0);
            store_out(mode, v, r, t, out_stride, xsum, row_scale, sx, out_i, out_f);
        }
    }
    if (threadIdx.x == 0) kcnt[tile] = 0;
}

template <int MW, int NW, int MT, int NT, int S>
__device__ __forceinline__ void tern_mma_body(const uint4* __restrict__ W, int n_rows, int chunks,
                                              const i8* __restrict__ X, int nt, const int* xsum,
                                              const float* row_scale, const float* sx, int* out_i,
                                              float* out_f, int out_stride, int mode, int* ksum, int* kcnt) {
#if __CUDA_ARCH__ >= 800
    constexpr int THREADS = 32 * MW * NW;
    constexpr int BM = 16 * MT * MW, BN = 8 * NT * NW;
    constexpr int A_BYTES = TM_KC * BM * 16, STAGE = A_BYTES + BN * TM_BROW;
    extern __shared__ __align__(16) u8 tm_smem[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp % MW, wn = warp / MW;
    const int g = lane >> 2, tg = lane & 3;
    const int row0 = blockIdx.x * BM, tok0 = blockIdx.y * BN;
    const size_t x_stride = (size_t)chunks * 64;
    // Split-K (gridDim.z > 1; only the 16-token tiles, the host never splits
    // others): block z takes chunks [c0, c1).
    constexpr bool CAN_SPLIT = BN <= 16;
    const int cps = CAN_SPLIT ? (chunks + gridDim.z - 1) / gridDim.z : chunks;
    const int c0 = CAN_SPLIT ? min(chunks, (int)blockIdx.z * cps) : 0, c1 = min(chunks, c0 + cps);
    const int iters = (c1 - c0 + TM_KC - 1) / TM_KC;
    const u32 sbase = (u32)__cvta_generic_to_shared(tm_smem);

    // Queue stage `it` (an empty group past the end keeps the counts uniform).
    auto issue = [&](int it) {
        if (it < iters) {
            const u32 a_s = sbase + (it % S) * STAGE, b_s = a_s + A_BYTES;
            for (int i = tid; i < TM_KC * BM; i += THREADS) {
                const int kc = i / BM, r = i % BM, c = c0 + it * TM_KC + kc, row = row0 + r;
                const bool ok = c < c1 && row < n_rows;
                cp_async16(a_s + 16 * i, ok ? W + (size_t)row * chunks + c : W, ok);
            }
            for (int i = tid; i < BN * TM_KC * 4; i += THREADS) {
                const int t = i / (TM_KC * 4), piece = i % (TM_KC * 4);
                const int c = c0 + it * TM_KC + piece / 4, tok = tok0 + t;
                const bool ok = c < c1 && tok < nt;
                const i8* src = ok ? X + tok * x_stride + (size_t)c * 64 + 16 * (piece % 4) : X;
                cp_async16(b_s + t * TM_BROW + 16 * piece, src, ok);
            }
        }
        asm volatile("cp.async.commit_group;" ::: "memory");
    };

    int acc[MT][NT][4];
#pragma unroll
    for (int a = 0; a < MT; a++)
#pragma unroll
        for (int b = 0; b < NT; b++)
#pragma unroll
            for (int c = 0; c < 4; c++) acc[a][b][c] = 0;

#pragma unroll
    for (int s = 0; s < S - 1; s++) issue(s);
    for (int it = 0; it < iters; it++) {
        // Stage `it` has landed once at most S - 2 newer groups are pending.
        asm volatile("cp.async.wait_group %0;" ::"n"(S - 2) : "memory");
        __syncthreads();
        // The slot refilled here was consumed in iteration it - 1, which every
        // thread has finished (the barrier above).
        issue(it + S - 1);
        const u32 a_s = sbase + (it % S) * STAGE, b_s = a_s + A_BYTES;
        const u8* a_p = tm_smem + (it % S) * STAGE;
#pragma unroll
        for (int kc = 0; kc < TM_KC; kc++) {
            uint4 wlo[MT], whi[MT];  // rows g and g + 8 of each m16 tile
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                const uint4* ap = (const uint4*)(a_p + 16 * (kc * BM + (wm * MT + mt) * 16 + g));
                wlo[mt] = ap[0];
                whi[mt] = ap[8];
            }
#pragma unroll
            for (int ks = 0; ks < 2; ks++) {
                // B fragments of this k32 half: matrix 0 = bytes 0..15, 1 = 16..31.
                u32 bf[NT][2];
#pragma unroll
                for (int n8 = 0; n8 < NT; n8++) {
                    const u32 addr = b_s + ((wn * NT + n8) * 8 + (lane & 7)) * TM_BROW + kc * 64 + 32 * ks +
                                     16 * ((lane >> 3) & 1);
                    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];"
                                 : "=r"(bf[n8][0]), "=r"(bf[n8][1])
                                 : "r"(addr));
                }
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    const u32 a0 = ext2(ks ? wlo[mt].z : wlo[mt].x, tg), a1 = ext2(ks ? whi[mt].z : whi[mt].x, tg);
                    const u32 a2 = ext2(ks ? wlo[mt].w : wlo[mt].y, tg), a3 = ext2(ks ? whi[mt].w : whi[mt].y, tg);
#pragma unroll
                    for (int n8 = 0; n8 < NT; n8++) mma_s8(acc[mt][n8], a0, a1, a2, a3, bf[n8][0], bf[n8][1]);
                }
            }
        }
    }
    asm volatile("cp.async.wait_group 0;" ::: "memory");
    const bool split = CAN_SPLIT && gridDim.z > 1;
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
        // The residuals (mode 2) of an m16 row of tiles are loaded before any
        // store: out_f's loads and stores may alias for the compiler, so one
        // store_out after another keeps a single load in flight. (Not with
        // two m16 rows per warp: the 128-register tiles would spill.)
        constexpr bool BATCH = MT == 1;
        // Fragment element i of n8 tile n8: its row and token.
        auto row = [&](int i) { return row0 + (wm * MT + mt) * 16 + g + (i >= 2 ? 8 : 0); };
        auto tok = [&](int n8, int i) { return tok0 + (wn * NT + n8) * 8 + 2 * tg + (i & 1); };
        float old[NT][4];
#pragma unroll
        for (int n8 = 0; n8 < NT; n8++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int r = row(i), t = tok(n8, i);
                old[n8][i] = BATCH && mode == 2 && !split && r < n_rows && t < nt ? out_f[(size_t)t * out_stride + r] : 0.f;
            }
#pragma unroll
        for (int n8 = 0; n8 < NT; n8++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int r = row(i), t = tok(n8, i);
                if (r < n_rows && t < nt) {
                    if (split) atomicAdd(ksum + (size_t)t * n_rows + r, acc[mt][n8][i]);
                    else if (BATCH)
                        store_out_old(mode, acc[mt][n8][i], r, t, out_stride, xsum, row_scale, sx, out_i, out_f,
                                      old[n8][i]);
                    else store_out(mode, acc[mt][n8][i], r, t, out_stride, xsum, row_scale, sx, out_i, out_f);
                }
            }
    }
    if (split) splitk_finish(BM, BN, THREADS, row0, tok0, n_rows, nt, ksum, kcnt, mode, out_stride, xsum,
                             row_scale, sx, out_i, out_f);
#endif
}

// Variants by token count (the host picks one, see `mma_variant` in mod.rs):
// name, warps along rows x tokens, m16 / n8 tiles per warp, pipeline depth,
// blocks per SM the registers must allow.
#define TERN_MMA(NAME, MW, NW, MT, NT, S, MINB)                                                        \
    extern "C" __global__ void __launch_bounds__(32 * MW * NW, MINB) NAME(                            \
        const uint4* W, int n_rows, int chunks, const i8* X, int nt, const int* xsum,                 \
        const float* row_scale, const float* sx, int* out_i, float* out_f, int out_stride, int mode,   \
        int* ksum, int* kcnt) {                                                                        \
        pdl_wait(); /* may be launched with PDL (see embed_f16 in ops.cu) */                           \
        tern_mma_body<MW, NW, MT, NT, S>(W, n_rows, chunks, X, nt, xsum, row_scale, sx, out_i, out_f,  \
                                         out_stride, mode, ksum, kcnt);                                \
    }
TERN_MMA(tern_mma_32x16, 2, 1, 1, 2, 8, 1)
TERN_MMA(tern_mma_64x16, 4, 1, 1, 2, 8, 1)
TERN_MMA(tern_mma_128x16, 8, 1, 1, 2, 6, 1)
TERN_MMA(tern_mma_64x32, 4, 1, 1, 4, 6, 1)
TERN_MMA(tern_mma_64x64, 4, 1, 1, 8, 4, 1)
TERN_MMA(tern_mma_128x128, 4, 2, 2, 8, 4, 2)
TERN_MMA(tern_mma_256x64, 8, 1, 2, 8, 4, 2)
TERN_MMA(tern_mma_256x128, 4, 2, 4, 8, 4, 1)

// Hopper (sm_90a): warpgroup MMA. Each warpgroup issues wgmma.m64nBNk32
// (BN = 128 or 256 tokens) with A (weights)
// from registers — expanded from the 2-bit codes exactly as for mma.sync
// (the wgmma A fragment of warp w is the m16n8k32 one for rows 16w..16w+15)
// — and B (activations) from shared memory through a matrix descriptor.
//
// B stage layout (no swizzle, K-major "core matrices" of 8 tokens x 16
// bytes, 128 contiguous bytes): core matrix (token group ng, k group kg) at
// (ng * 8 + kg) * 128, token r of the group at + 16 r. For k32 step kk the
// descriptor starts at kg = 2 kk; the next k group is +128 bytes (leading
// byte offset) and the next token group +1024 (stride byte offset).
// D fragment: per warp, like m16n8 C tiles repeated along N: d[4j + i] is
// row g (+8 for i >= 2), token 8 j + 2 tg + (i & 1).
#define WG_KG (TM_KC * 4)

__device__ __forceinline__ u64 wg_desc(u32 addr) {
    return (u64)((addr & 0x3FFFF) >> 4) | ((u64)(128 >> 4) << 16) | ((u64)((WG_KG * 128) >> 4) << 32);
}

__device__ __forceinline__ void wgmma_n128(int* d, u32 a0, u32 a1, u32 a2, u32 a3, u64 desc, int acc) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p;\n}\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]), "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]), "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]), "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]), "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]), "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc), "r"(acc));
#endif
}

__device__ __forceinline__ void wgmma_n256(int* d, u32 a0, u32 a1, u32 a2, u32 a3, u64 desc, int acc) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k32.s32.s8.s8 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, {%128, %129, %130, %131}, %132, p;\n}\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]), "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]), "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]), "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]), "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]), "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63]), "+r"(d[64]), "+r"(d[65]), "+r"(d[66]), "+r"(d[67]), "+r"(d[68]), "+r"(d[69]), "+r"(d[70]), "+r"(d[71]), "+r"(d[72]), "+r"(d[73]), "+r"(d[74]), "+r"(d[75]), "+r"(d[76]), "+r"(d[77]), "+r"(d[78]), "+r"(d[79]), "+r"(d[80]), "+r"(d[81]), "+r"(d[82]), "+r"(d[83]), "+r"(d[84]), "+r"(d[85]), "+r"(d[86]), "+r"(d[87]), "+r"(d[88]), "+r"(d[89]), "+r"(d[90]), "+r"(d[91]), "+r"(d[92]), "+r"(d[93]), "+r"(d[94]), "+r"(d[95]), "+r"(d[96]), "+r"(d[97]), "+r"(d[98]), "+r"(d[99]), "+r"(d[100]), "+r"(d[101]), "+r"(d[102]), "+r"(d[103]), "+r"(d[104]), "+r"(d[105]), "+r"(d[106]), "+r"(d[107]), "+r"(d[108]), "+r"(d[109]), "+r"(d[110]), "+r"(d[111]), "+r"(d[112]), "+r"(d[113]), "+r"(d[114]), "+r"(d[115]), "+r"(d[116]), "+r"(d[117]), "+r"(d[118]), "+r"(d[119]), "+r"(d[120]), "+r"(d[121]), "+r"(d[122]), "+r"(d[123]), "+r"(d[124]), "+r"(d[125]), "+r"(d[126]), "+r"(d[127])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc), "r"(acc));
#endif
}

// TMA-fed Hopper GEMM (sm_90a). A first wgmma kernel loaded its stages
// with per-thread 16-byte cp.async (address math and one instruction per
// 16 bytes, ~1300 per stage), which held it to ~420 TOPS, no faster than
// mma.sync; with no loads at all the same loop ran ~820 (device run S7-2).
// Here one producer thread feeds a ring of
// S stages with bulk copies that complete on an mbarrier per stage:
// - B, the activations, come pre-tiled by the quantiser (`norm_quant` with
//   `x_ntp` > 0): stage it (inputs 128 it .. 128 it + 127) of token t is at
//   it * x_ntp * 128 + (t / 8) * 1024 + kg * 128 + (t % 8) * 16, kg = 16-byte
//   group of the stage; the core-matrix order the descriptors above read, so
//   a block's 256-token tile of a stage is one contiguous 32 KB copy.
//   x_ntp (a multiple of 256) is the buffer's token capacity; the inputs of
//   an even number of stages are there, zero past the matrix's.
// - A, the weights, from the stage tiles (layout.rs): the block's 128 rows
//   x 2 chunks of a stage are 4096 contiguous bytes, row r at r * 32. (One
//   bulk copy per row, from the row-major layout, ran at ~190 TOPS: run S7-4.)
// Two consumer warpgroups (64 rows each, m64n256k32 with A from registers)
// wait on a slot's `full` barrier and, once the wgmma group that read it has
// retired, release it on its `empty` barrier (one arrival per warp). Rows or
// tokens past the matrix are never stored; the tail stages multiply zero
// pad codes by zero activations.
#define TW_BM 128
#ifndef TW_PROBE
#define TW_PROBE 0  // timing probe (A/B runs only, results wrong): 1 no loads, 2 no epilogue
#endif
// Tokens per round of the epilogue (1, 2, 4 or 8): stores only (modes 0
// and 1, gated) and with residual loads (mode 2). S14-8, prefill 2048
// (qkv / o / gate_up / down ms): 4 everywhere 1.35 / 1.65 / 3.80 / 3.05;
// 2: 1.31 / 1.76 / 3.66 / 3.15; 8: 1.35 / 1.60 / 4.05 / 3.00.
#ifndef TW_EP_STORE
#define TW_EP_STORE 2
#endif
#ifndef TW_EP_ADD
#define TW_EP_ADD 8
#endif
// Mode 5's tokens per round (its rounds load the RoPE table first).
#ifndef TW_EP_ROPE
#define TW_EP_ROPE TW_EP_ADD
#endif
// Each TMA GEMM kernel carries one epilogue family (EM): 0 modes 0 and 1
// (stores), 2 (residual add), 3 modes 3 and 4 (gated), 5 (RoPE). With
// mode 5's code in the same kernel, o and down took 2-17% longer though
// their own SASS was the same (S15-8, S16-1: code size, not registers).
template <int N>
struct TwInt {
    static constexpr int value = N;
};
#define TW_EP (TW_BM + 4)  // epilogue row pitch in words (see below)

// A tile's epilogue constants into shared memory, by threads i0, i0 + step,
// ...: per token (xsum, sx, the refined reciprocal of sx), per tile row the
// row scale (gated, paired tiles: tile rows p and 64 + p are gate and up row
// row0 / 2 + p).
template <int BN>
__device__ __forceinline__ void tw_tile_consts(int i0, int step, int row0, int tok0, int n_rows, int nt,
                                               const int* xsum, const float* row_scale, const float* sx, int mode,
                                               int* ep_xsum, float* ep_sx, float* ep_r1, float* ep_rs) {
    constexpr int BM = TW_BM;
    const bool gated = mode == 3 || mode == 4;
    const int f = n_rows / 2, p0 = row0 / 2;
    for (int i = i0; i < BN; i += step) {
        const int t = tok0 + i;
        ep_xsum[i] = t < nt ? xsum[t] : 0;
        ep_sx[i] = t < nt && mode > 0 ? sx[t] : 1.f;
        ep_r1[i] = div_rcp(ep_sx[i]);
    }
    for (int i = i0; i < BM; i += step) {
        const int p = i % (BM / 2), r = gated ? (p0 + p < f ? (i < BM / 2 ? 0 : f) + p0 + p : -1) : row0 + i;
        ep_rs[i] = mode > 0 && r >= 0 && r < n_rows ? row_scale[r] : 0.f;
    }
}

// Where the q|k|v GEMM's epilogue puts RoPE'd rows (mode 5, StoreRope):
// as rope_kv (ops.cu) does from the stored rows, for tokens at pos[0] + t.
struct TwRope {
    const int* pos;
    const float2* rope;
    int n_heads, n_kv, hd, cap, kv_f16;
    void *kc, *vc;
    float* qr;
};

// A thread's quad of q|k|v rows r .. r + 3 (in one head: hd % 4 == 0,
// r % 4 == 0), worked out once: which output (0 q, 1 k, 2 v), and its
// offset there without the token's (q: h hd + j; k: h cap hd + j; v: h cap
// hd + d). q and k rows are pair-interleaved (rows 2j, 2j + 1 of a head =
// dims j, j + hd/2), so their quad is dims j, j + 1 and j + hd/2,
// j + hd/2 + 1.
struct TwQuad {
    int kind;
    size_t off;
};
__device__ __forceinline__ TwQuad tw_rope_quad_at(const TwRope& ra, int r) {
    const int nq = ra.n_heads * ra.hd, nk = ra.n_kv * ra.hd;
    const int kind = r < nq ? 0 : r < nq + nk ? 1 : 2;
    const int rr = kind == 0 ? r : kind == 1 ? r - nq : r - nq - nk, h = rr / ra.hd, w = rr % ra.hd;
    const int col = kind == 2 ? w : w >> 1;
    return {kind, kind == 0 ? (size_t)h * ra.hd + col : (size_t)h * ra.cap * ra.hd + col};
}

// The quad `at` of token t at position p, values y, rotated by rope_pair
// with cs = the (cos, sin) of its dims j, j + 1 (loaded by the caller ahead
// of its stores); v rows go to the cache as they are.
__device__ __forceinline__ void tw_rope_quad(const TwRope& ra, TwQuad at, int p, int t, const float (&y)[4],
                                             float4 cs) {
    const int half = ra.hd / 2;
    auto kv4 = [&](void* base, size_t o, float a, float b, float c, float d, bool pairs) {
        // pairs: (a, b) at dims o, o + 1 and (c, d) at o + half, o + half + 1; else 4 in a row.
        const size_t o2 = pairs ? o + half : o + 2;
        if (ra.kv_f16) {
            u16* k = (u16*)base;
            *(unsigned*)(k + o) = (unsigned)f2h(a) | (unsigned)f2h(b) << 16;
            *(unsigned*)(k + o2) = (unsigned)f2h(c) | (unsigned)f2h(d) << 16;
        } else {
            float* k = (float*)base;
            *(float2*)(k + o) = make_float2(a, b);
            *(float2*)(k + o2) = make_float2(c, d);
        }
    };
    if (at.kind == 2) {
        kv4(ra.vc, at.off + (size_t)p * ra.hd, y[0], y[1], y[2], y[3], false);
        return;
    }
    const float2 a = rope_pair(y[0], y[1], make_float2(cs.x, cs.y));
    const float2 b = rope_pair(y[2], y[3], make_float2(cs.z, cs.w));
    if (at.kind == 0) {
        float* q = ra.qr + (size_t)t * ra.n_heads * ra.hd + at.off;
        *(float2*)q = make_float2(a.x, b.x);
        *(float2*)(q + half) = make_float2(a.y, b.y);
    } else {
        kv4(ra.kc, at.off + (size_t)p * ra.hd, a.x, b.x, a.y, b.y, true);
    }
}

// The epilogue of one tile from its parked sums `ep` ([token][row], row
// pitch TW_EP words) by NTH threads (this one: et; NTH a multiple of 128,
// so a round's tokens divide BN). Every thread keeps four
// tile rows (gated: four gate/up pairs) and walks the tile's tokens, EP_N
// of them per round: the parked sums (one 16-byte shared load per token)
// and the residuals (mode 2) loaded first, then the outputs as one 16-byte
// store per token. Per element the arithmetic is store_out_old's (gated:
// act(gate) * up as norm_quant's load_in computes it), so the bits are.
// Why: with one element at a time, each waiting on its global xsum / sx /
// scale loads behind the last store, the epilogue took longer than the MMA
// loop (timing probe TW_PROBE=2, S14-1: gate_up 2048 6.37 -> 2.62 ms
// without it); with those in shared memory and one row per thread it still
// took ~40% of the kernel, issue-bound on its ~56 instructions per output
// pair (ncu, S14-3; the division's branch was not the cost: S14-4).
template <int BN, int NTH, int EM>
__device__ __forceinline__ void tw_epilogue(const int* ep, int et, const int* ep_xsum, const float* ep_sx,
                                            const float* ep_r1, const float* ep_rs, int row0, int tok0, int n_rows,
                                            int nt, int* out_i, float* out_f, int out_stride, int mode,
                                            const TwRope& ra) {
    constexpr int BM = TW_BM;
    // 16-byte stores where the output rows allow them (else element-wise).
    const bool vec = out_stride % 4 == 0 && ((size_t)(mode == 0 ? (void*)out_i : (void*)out_f) & 15) == 0;
    if constexpr (EM == 3) {
        constexpr int EP_G = TW_EP_STORE;
        constexpr int HP = BM / 2, QS = HP / 4, TS = NTH / QS;  // pairs, quads, tokens per round
        const int f = n_rows / 2, p = 4 * (et % QS), rg = row0 / 2 + p;
        if (rg >= f) return;
        const int nv = min(4, f - rg);  // pairs of the quad inside the matrix
        float sg[4], su[4];
        bool fast = true;  // every scale in the division's fast range
#pragma unroll
        for (int j = 0; j < 4; j++) {
            sg[j] = ep_rs[p + j], su[j] = ep_rs[HP + p + j];
            fast = fast && div_in_range(sg[j]) && div_in_range(su[j]);
        }
        for (int k0 = et / QS; k0 < BN; k0 += EP_G * TS) {
            int4 vg[EP_G], vu[EP_G];
#pragma unroll
            for (int k = 0; k < EP_G; k++) {
                const int tl = k0 + k * TS;
                vg[k] = *(const int4*)(ep + tl * TW_EP + p);
                vu[k] = *(const int4*)(ep + tl * TW_EP + HP + p);
            }
#pragma unroll
            for (int k = 0; k < EP_G; k++) {
                const int tl = k0 + k * TS, t = tok0 + tl;
                if (t >= nt) break;  // tokens grow with k
                const int xs = ep_xsum[tl];
                const float kx = ep_sx[tl], r1 = ep_r1[tl];
                const int g[4] = {vg[k].x, vg[k].y, vg[k].z, vg[k].w}, u[4] = {vu[k].x, vu[k].y, vu[k].z, vu[k].w};
                float o[4], qg[4], qu[4];
                if (fast && r1 != 0.f) {
#pragma unroll
                    for (int j = 0; j < 4; j++) qg[j] = div_fast(sg[j], kx, r1), qu[j] = div_fast(su[j], kx, r1);
                } else {
                    for (int j = 0; j < 4; j++) qg[j] = __fdiv_rn(sg[j], kx), qu[j] = __fdiv_rn(su[j], kx);
                }
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const float yg = __fmul_rn((float)(g[j] - xs), qg[j]);
                    const float yu = __fmul_rn((float)(u[j] - xs), qu[j]);
                    o[j] = gated_act(yg, yu, mode - 2);
                }
                float* dst = out_f + (size_t)t * out_stride + rg;
                if (vec && nv == 4) *(float4*)dst = make_float4(o[0], o[1], o[2], o[3]);
                else
                    for (int j = 0; j < nv; j++) dst[j] = o[j];
            }
        }
        return;
    }
    constexpr int QS = BM / 4, TS = NTH / QS;  // quads, tokens per round
    const int rl = 4 * (et % QS), r = row0 + rl;
    if (r >= n_rows) return;
    // Mode 5: the quad's (cos, sin) offset in a position's row of the table
    // (-1: v rows, not rotated).
    const int p0 = EM == 5 ? ra.pos[0] : 0;
    const TwQuad quad = EM == 5 ? tw_rope_quad_at(ra, r) : TwQuad{2, 0};
    const int rot_j = quad.kind < 2 ? (r % ra.hd) >> 1 : -1;
    const int nv = min(4, n_rows - r);  // rows of the quad inside the matrix
    float rs[4];
    bool fast = true;  // every scale in the division's fast range
#pragma unroll
    for (int j = 0; j < 4; j++) {
        rs[j] = ep_rs[rl + j];
        fast = fast && div_in_range(rs[j]);
    }
    // The rounds' token count as a constant (the loops unroll over it).
    // Modes 2 and 5 as constants (MD; -1: mode 0 or 1 at run time): each gets
    // its own code, so the residual adds carry none of RoPE's (S15-6/S15-7:
    // sharing one instantiation made o and down 27-45% slower).
    auto rounds = [&](auto ep_n, auto md) {
        constexpr int EP_N = decltype(ep_n)::value, MD = decltype(md)::value;
        const int mode_ = MD >= 0 ? MD : mode;
        for (int k0 = et / QS; k0 < BN; k0 += EP_N * TS) {
            int4 v[EP_N];
            float old[EP_N][4];
#pragma unroll
            for (int k = 0; k < EP_N; k++) {
                const int tl = k0 + k * TS, t = tok0 + tl;
                v[k] = *(const int4*)(ep + tl * TW_EP + rl);
#pragma unroll
                for (int j = 0; j < 4; j++) old[k][j] = 0.f;
                if (MD == 2 && t < nt) {
                    const float* src = out_f + (size_t)t * out_stride + r;
                    if (vec && nv == 4) {
                        const float4 o4 = *(const float4*)src;
                        old[k][0] = o4.x, old[k][1] = o4.y, old[k][2] = o4.z, old[k][3] = o4.w;
                    } else {
                        for (int j = 0; j < nv; j++) old[k][j] = src[j];
                    }
                }
                // Mode 5: `old` holds the rows' (cos, sin) pairs (j even: 16 bytes).
                if (MD == 5 && rot_j >= 0 && t < nt) {
                    const float4 c = *(const float4*)(ra.rope + (size_t)(p0 + t) * (ra.hd / 2) + rot_j);
                    old[k][0] = c.x, old[k][1] = c.y, old[k][2] = c.z, old[k][3] = c.w;
                }
            }
#pragma unroll
            for (int k = 0; k < EP_N; k++) {
                const int tl = k0 + k * TS, t = tok0 + tl;
                if (t >= nt) break;  // tokens grow with k
                const int xs = ep_xsum[tl];
                const int a[4] = {v[k].x - xs, v[k].y - xs, v[k].z - xs, v[k].w - xs};
                const size_t o = (size_t)t * out_stride + r;
                if (mode_ == 0) {
                    if (vec && nv == 4) *(int4*)(out_i + o) = make_int4(a[0], a[1], a[2], a[3]);
                    else
                        for (int j = 0; j < nv; j++) out_i[o + j] = a[j];
                    continue;
                }
                const float kx = ep_sx[tl], r1 = ep_r1[tl];
                float y[4], qd[4];
                if (fast && r1 != 0.f) {
#pragma unroll
                    for (int j = 0; j < 4; j++) qd[j] = div_fast(rs[j], kx, r1);
                } else {
                    for (int j = 0; j < 4; j++) qd[j] = __fdiv_rn(rs[j], kx);
                }
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    y[j] = __fmul_rn((float)a[j], qd[j]);
                    if (MD == 2) y[j] = __fadd_rn(old[k][j], y[j]);
                }
                if (MD == 5) {
                    // nv == 4: the host checks hd % 4.
                    tw_rope_quad(ra, quad, p0 + t, t, y, make_float4(old[k][0], old[k][1], old[k][2], old[k][3]));
                    continue;
                }
                if (vec && nv == 4) *(float4*)(out_f + o) = make_float4(y[0], y[1], y[2], y[3]);
                else
                    for (int j = 0; j < nv; j++) out_f[o + j] = y[j];
            }
        }
    };
    // Rounds that load ahead of their stores (residuals, RoPE's table) take more tokens.
    if constexpr (EM == 5) rounds(TwInt<TW_EP_ROPE>{}, TwInt<5>{});
    else if constexpr (EM == 2) rounds(TwInt<TW_EP_ADD>{}, TwInt<2>{});
    else rounds(TwInt<TW_EP_STORE>{}, TwInt<-1>{});
}

// The tail split. A grid of n tiles on an S-SM GPU (one block an SM) runs
// w = n / S full waves and a last one of r = n % S tiles: for o and down at
// 2048 tokens (160 tiles of 128 rows x 256 tokens on 132 SMs) that last
// wave costs as long as the first with 28 SMs busy. With the tail split
// the host launches w S whole tiles, then each of the r last tiles as p
// pieces (p <= S / r) of its stage pairs, one block each (`tail` = w S << 8
// | p; 0: no split, grid row tiles x token tiles). Every piece parks its
// int32 sums in `tail_ws` and counts itself on the tile's counter; the
// last to count adds the others' sums to its own and runs the epilogue.
// Integer sums are exact and commutative, so the outputs are the unsplit
// kernel's bit for bit, whatever the arrival order.
struct TwTail {
    int rt, tt, s0, s1, piece, slot0, p, cnt;
};
__device__ __forceinline__ TwTail tw_tail(int tail, int n_rows, int iters) {
    if (tail == 0) return {(int)blockIdx.x, (int)blockIdx.y, 0, iters, -1, 0, 1, 0};
    const int full = tail >> 8, p = tail & 255, gx = (n_rows + TW_BM - 1) / TW_BM, b = blockIdx.x;
    if (b < full) return {b % gx, b / gx, 0, iters, -1, 0, 1, 0};
    const int q = b - full, tile = full + q / p, piece = q % p, pairs = iters / 2;
    return {tile % gx, tile / gx, 2 * (piece * pairs / p), 2 * ((piece + 1) * pairs / p), piece, q - piece, p,
            tile - full};
}

// A piece's sums into the workspace ([slot][value][thread]: each thread's
// own registers, coalesced), its count on the tile's counter; the last piece
// (returns true) adds every other piece's sums to `d` and leaves the counter
// at zero for the next launch. Consumer threads only (named barrier 1).
template <int BN>
__device__ __forceinline__ bool tw_tail_sum(int* d, const TwTail& tt, int* ws, int* cnt, int tid) {
    constexpr int NTH = 256, SLOT = TW_BM * BN;
    __shared__ int tw_last;
    int* mine = ws + (size_t)(tt.slot0 + tt.piece) * SLOT + tid;
#pragma unroll
    for (int i = 0; i < BN / 2; i++) __stcg(mine + i * NTH, d[i]);
    __threadfence();
    asm volatile("bar.sync 1, %0;" ::"n"(NTH) : "memory");
    if (tid == 0) tw_last = atomicAdd(cnt + tt.cnt, 1) == tt.p - 1;
    asm volatile("bar.sync 1, %0;" ::"n"(NTH) : "memory");
    if (!tw_last) return false;
    __threadfence();
    for (int j = 0; j < tt.p; j++) {
        if (j == tt.piece) continue;
        const int* other = ws + (size_t)(tt.slot0 + j) * SLOT + tid;
#pragma unroll
        for (int i = 0; i < BN / 2; i++) d[i] += __ldcg(other + i * NTH);
    }
    if (tid == 0) cnt[tt.cnt] = 0;
    return true;
}

// One stage of the consumer loop (warp `warp` of the two consumer
// warpgroups): A fragments from the 2-bit codes (the m16n8k32 fragment of
// warp w's rows 16 w .. 16 w + 15, as for mma.sync), then 4 wgmmas as one
// group; up to two groups in flight. ptxas serialises every wgmma (C7513)
// when registers a wgmma in flight reads are redefined, so: the fragments
// alternate between two sets, `prev` (the last stage's) is kept live by the
// empty asm until wait_group 1 has retired its group; the descriptors are
// made and pinned before the fence; no zero fill of d (scale-d 0 on the
// first wgmma of a tile, `it` = 0). `g` counts stages through the ring (over
// the tiles of a persistent block); the group of stage g - 1 has retired at
// the end, so its slot is released (not at a tile's first stage: the tile
// before released its last one).
template <int BN, int S>
__device__ __forceinline__ void tw_stage(int* d, int g, int it, u32 (&af)[4][4], u32 (&prev)[4][4], const u8* smem,
                                         u32 sbase, u64* full, u64* empty, int warp, int lane) {
    constexpr int A_BYTES = TW_BM * 32, TW_STAGE = A_BYTES + BN * 128;
    const int slot = g % S, tg = lane & 3;
    if (!(TW_PROBE & 1)) mbar_wait(&full[slot], (g / S) & 1);
    const u8* a_p = smem + slot * TW_STAGE + 32 * (warp * 16 + (lane >> 2));
    const u32 b_s = sbase + slot * TW_STAGE + A_BYTES;
#pragma unroll
    for (int kc = 0; kc < 2; kc++) {
        const uint4 lo = *(const uint4*)(a_p + 16 * kc), hi = *(const uint4*)(a_p + 16 * kc + 8 * 32);
        af[2 * kc][0] = ext2(lo.x, tg);
        af[2 * kc][1] = ext2(hi.x, tg);
        af[2 * kc][2] = ext2(lo.y, tg);
        af[2 * kc][3] = ext2(hi.y, tg);
        af[2 * kc + 1][0] = ext2(lo.z, tg);
        af[2 * kc + 1][1] = ext2(hi.z, tg);
        af[2 * kc + 1][2] = ext2(lo.w, tg);
        af[2 * kc + 1][3] = ext2(hi.w, tg);
    }
    u64 desc[4];
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
        desc[kk] = wg_desc(b_s + 2 * kk * 128);
        asm volatile("" : "+l"(desc[kk]));
    }
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
    for (int kk = 0; kk < 4; kk++)
        if constexpr (BN == 256) wgmma_n256(d, af[kk][0], af[kk][1], af[kk][2], af[kk][3], desc[kk], it | kk);
        else wgmma_n128(d, af[kk][0], af[kk][1], af[kk][2], af[kk][3], desc[kk], it | kk);
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
#pragma unroll
    for (int kk = 0; kk < 4; kk++)
        asm volatile("" ::"r"(prev[kk][0]), "r"(prev[kk][1]), "r"(prev[kk][2]), "r"(prev[kk][3]));
    __syncwarp();
    if (it > 0 && lane == 0 && !(TW_PROBE & 1)) mbar_arrive(&empty[(g - 1) % S]);
}

// A warp's 16 x BN accumulators parked as [token][row] in `ep` (row pitch
// TW_EP words: conflict-free).
template <int BN>
__device__ __forceinline__ void tw_park(int* ep, const int* d, int warp, int lane) {
    const int g = lane >> 2, tg = lane & 3;
#pragma unroll
    for (int j = 0; j < BN / 8; j++)
#pragma unroll
        for (int i = 0; i < 4; i++)
            ep[(8 * j + 2 * tg + (i & 1)) * TW_EP + warp * 16 + g + (i >= 2 ? 8 : 0)] = d[4 * j + i];
}

template <int BN, int S, int EM>
__device__ __forceinline__ void tern_wgmma_tma_body(const uint4* __restrict__ W, int n_rows, int chunks,
                                                    const i8* __restrict__ X, int nt, const int* xsum,
                                                    const float* row_scale, const float* sx, int* out_i,
                                                    float* out_f, int out_stride, int mode, int x_ntp,
                                                    const TwRope& ra, int* tail_ws, int* tail_cnt, int tail) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int WG = 2, BM = TW_BM, A_BYTES = BM * 32, B_BYTES = BN * 128, TW_STAGE = A_BYTES + B_BYTES;
    static_assert(BN == 128 || BN == 256, "wgmma N");
    extern __shared__ __align__(128) u8 tm_smem[];
    __shared__ __align__(8) u64 full[S], empty[S];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    // An even number of stages (a zero-filled one past the end), so the
    // consumer loop runs its two stages unconditionally: a conditional
    // second stage makes ptxas serialise the wgmmas (its C7513 info).
    const int iters = ((chunks + 1) / 2 + 1) & ~1;
    // The tile and its stages [s0, s1): the block's own (tail == 0, grid
    // row tiles x token tiles) or, for a grid whose last wave would leave
    // most SMs idle, a 1-D grid where that wave's tiles are cut along K
    // (see `TwTail`).
    const TwTail ts = tw_tail(tail, n_rows, iters);
    const int row0 = ts.rt * BM, tok0 = ts.tt * BN, s0 = ts.s0, n_st = ts.s1 - ts.s0;
    // Stages on a 1024-byte boundary (the host adds 1024 bytes of room):
    // what a 128-byte swizzled B would need. A swizzled variant (atoms of 8
    // tokens x 128 bytes, descriptor layout type 1) was exact but 0-10%
    // slower than this unswizzled one (run S7-7), so it was removed.
    const u32 sbase = (smem_addr(tm_smem) + 1023u) & ~1023u;
    const u8* smem = tm_smem + (sbase - smem_addr(tm_smem));
    if (tid == 0) {
        for (int s = 0; s < S; s++) {
            mbar_init(&full[s]);
            mbar_init(&empty[s], WG * 4);
        }
    }
    __syncthreads();
    // Registers move from the producer warpgroup (one thread of it works) to
    // the consumers: 384 threads get 168 each at launch, too few for 128
    // accumulators and two fragment sets.
    if (warp >= WG * 4) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
        if (warp > WG * 4) return;
        // Producer (one thread): stage it into slot it % S once the
        // consumers released that slot's previous stage.
        if (lane != 0 || (TW_PROBE & 1)) return;
        const char* wt = (const char*)W + ((size_t)ts.rt * iters + s0) * A_BYTES;
        const char* xt = (const char*)X + ((size_t)s0 * x_ntp + tok0) * 128;
        for (int it = 0; it < n_st; it++) {
            const int slot = it % S;
            if (it >= S) mbar_wait(&empty[slot], (it / S - 1) & 1);
            const u32 a_s = sbase + slot * TW_STAGE;
            mg_bulk_expect(&full[slot], A_BYTES + B_BYTES);
            mg_bulk_part(a_s, wt + (size_t)it * A_BYTES, A_BYTES, &full[slot]);
            mg_bulk_part(a_s + A_BYTES, xt + (size_t)it * x_ntp * 128, B_BYTES, &full[slot]);
        }
        return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
    // The epilogue's constants, read here (under the ring's first copies)
    // into shared memory: from global memory inside the epilogue each
    // element waited on them in turn.
    __shared__ int ep_xsum[BN];
    __shared__ float ep_sx[BN], ep_r1[BN], ep_rs[BM];
    tw_tile_consts<BN>(tid, WG * 128, row0, tok0, n_rows, nt, xsum, row_scale, sx, mode, ep_xsum, ep_sx, ep_r1, ep_rs);
    int d[BN / 2];
    u32 af0[4][4], af1[4][4];
    for (int it = 0; it < n_st; it += 2) {
        tw_stage<BN, S>(d, it, it, af0, af1, smem, sbase, full, empty, warp, lane);
        tw_stage<BN, S>(d, it + 1, it + 1, af1, af0, smem, sbase, full, empty, warp, lane);
    }
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    if (TW_PROBE & 2) return;
    if (ts.piece >= 0 && !tw_tail_sum<BN>(d, ts, tail_ws, tail_cnt, tid)) return;
    // Epilogue through shared memory (the ring is free once both consumer
    // warpgroups are here; the producer has issued its last copy): each warp
    // parks its accumulators, then a rolled loop stores rows of a token as
    // contiguous runs. Scattered per-fragment stores, fully unrolled (128
    // per thread), had the warps waiting on instruction fetch and on one
    // global load at a time (ncu, run S7-10).
    asm volatile("bar.sync 1, %0;" ::"n"(WG * 128) : "memory");
    int* ep = (int*)smem;
    tw_park<BN>(ep, d, warp, lane);
    asm volatile("bar.sync 1, %0;" ::"n"(WG * 128) : "memory");
    tw_epilogue<BN, WG * 128, EM>(ep, tid, ep_xsum, ep_sx, ep_r1, ep_rs, row0, tok0, n_rows, nt, out_i, out_f, out_stride,
                              mode, ra);
#endif
}

// Variants: name, tokens per block (the wgmma N), pipeline depth; each as
// four kernels, one per epilogue family: NAME (modes 0, 1), NAME_add,
// NAME_gated, NAME_rope. 2 consumer warpgroups + 1 producer warpgroup (one
// thread of it issues the copies). The parameters after x_ntp are mode 5's
// (TwRope; unused otherwise), then the tail split's (`TwTail`; ksum / kcnt
// are its workspace and counters).
#define TERN_WGMMA_TMA_K(NAME, BN, S, EM)                                                              \
    extern "C" __global__ void __launch_bounds__(384, 1) NAME(                                         \
        const uint4* W, int n_rows, int chunks, const i8* X, int nt, const int* xsum,                 \
        const float* row_scale, const float* sx, int* out_i, float* out_f, int out_stride, int mode,   \
        int* ksum, int* kcnt, int x_ntp, const int* pos, const float2* rope, int n_heads, int n_kv,   \
        int hd, int cap, int kv_f16, void* kc, void* vc, float* qr, int tail) {                       \
        pdl_wait();                                                                                    \
        const TwRope ra{pos, rope, n_heads, n_kv, hd, cap, kv_f16, kc, vc, qr};                        \
        tern_wgmma_tma_body<BN, S, EM>(W, n_rows, chunks, X, nt, xsum, row_scale, sx, out_i, out_f,    \
                                       out_stride, mode, x_ntp, ra, ksum, kcnt, tail);                 \
    }
#define TERN_WGMMA_TMA(NAME, BN, S)               \
    TERN_WGMMA_TMA_K(NAME, BN, S, 0)              \
    TERN_WGMMA_TMA_K(NAME##_add, BN, S, 2)        \
    TERN_WGMMA_TMA_K(NAME##_gated, BN, S, 3)      \
    TERN_WGMMA_TMA_K(NAME##_rope, BN, S, 5)
TERN_WGMMA_TMA(tern_wgmma_tma_s4, 256, 4)
TERN_WGMMA_TMA(tern_wgmma_tma_s6, 256, 6)
TERN_WGMMA_TMA(tern_wgmma_tma_n128, 128, 6)
