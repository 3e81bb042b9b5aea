// Shared definitions for every Yinsen kernel. NVRTC compiles these without
// any toolkit header, so the few types and helpers needed are defined here.
typedef signed char i8;
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define NEG_INF (__int_as_float(0xff800000))

__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
// KV-cache elements are f16 (u16 bits) or f32, chosen per backend; kernels
// touching the cache are templates over the element type and go through these.
__device__ __forceinline__ float kv_load(const u16* p) { return h2f(*p); }
__device__ __forceinline__ float kv_load(const float* p) { return *p; }
__device__ __forceinline__ void kv_store(u16* p, float v) { *p = f2h(v); }
__device__ __forceinline__ void kv_store(float* p, float v) { *p = v; }
// q . k over one cached key row of hd elements (hd % 8 == 0, row 16-byte
// aligned): 16-byte loads of 8 halves or 4 floats.
__device__ __forceinline__ float kv_dot(const float* q, const u16* k, int hd) {
    const uint4* kr = (const uint4*)k;
    float s = 0.f;
    for (int d8 = 0; d8 < hd / 8; d8++) {
        uint4 w = kr[d8];
        u32 ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int e = 0; e < 4; e++) {
            s += q[8 * d8 + 2 * e] * h2f((u16)(ws[e] & 0xffff));
            s += q[8 * d8 + 2 * e + 1] * h2f((u16)(ws[e] >> 16));
        }
    }
    return s;
}
__device__ __forceinline__ float kv_dot(const float* q, const float* k, int hd) {
    const float4* kr = (const float4*)k;
    float s = 0.f;
    for (int d4 = 0; d4 < hd / 4; d4++) {
        float4 w = kr[d4];
        s += q[4 * d4] * w.x;
        s += q[4 * d4 + 1] * w.y;
        s += q[4 * d4 + 2] * w.z;
        s += q[4 * d4 + 3] * w.w;
    }
    return s;
}
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ int warp_sum_i(int v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
// Block-wide reductions; `red` is 32 floats of shared memory. Every thread
// of the block must call them (they synchronise). `max` picks the operation.
template <bool MAX>
__device__ __forceinline__ float block_reduce(float v, float* red) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = MAX ? warp_max(v) : warp_sum(v);
    __syncthreads();
    if (lane == 0) red[w] = v;
    __syncthreads();
    v = lane < nw ? red[lane] : (MAX ? NEG_INF : 0.f);
    return MAX ? warp_max(v) : warp_sum(v);
}
__device__ float block_sum(float v, float* red) { return block_reduce<false>(v, red); }
__device__ float block_max(float v, float* red) { return block_reduce<true>(v, red); }
// Warp-wide argmax of (v, idx): the larger value, then the lower index.
__device__ __forceinline__ void warp_argmax(float& v, int& idx) {
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, v, o);
        int oi = __shfl_xor_sync(0xffffffffu, idx, o);
        if (ov > v || (ov == v && oi < idx)) {
            v = ov;
            idx = oi;
        }
    }
}

// PDL (programmatic dependent launch, sm_90+): launch_dependents lets the
// next kernel start; wait blocks until the previous kernel has finished and
// its writes are visible. No-ops without the launch attribute or before sm_90.
// The prefill kernels do not trigger early: letting every successor launch
// right after its own wait measured slower (S30-1: prefill 2048 13.05 against
// 12.77 ms; the waiting blocks take SMs the last wave could use).
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}


// RoPE of one (x1, x2) = (dim j, dim j + hd/2) pair by (cos, sin): the
// products and their fused sums spelled out, so every kernel that rotates
// (decode, prefill's rope_kv, the prefill GEMM's epilogue) gives the same
// bits whatever the compiler would contract.
__device__ __forceinline__ float2 rope_pair(float x1, float x2, float2 c) {
    return make_float2(__fmaf_rn(x1, c.x, -__fmul_rn(x2, c.y)), __fmaf_rn(x2, c.x, __fmul_rn(x1, c.y)));
}

// One output row of the fused q|k|v matrix for one token: RoPE on the
// pair-interleaved q|k rows (layout rows 2j, 2j+1 of a head are dims j,
// j + hd/2; `partner` is the other row of the pair). Returns where the value
// goes: kind 0 q, 1 k, 2 v; head h, dim d (natural order).
struct QkvOut {
    int kind, h, d;
    float v;
};
__device__ __forceinline__ QkvOut qkv_rope_out(int row, float y, float partner, const float2* rope_row, int n_heads,
                                               int n_kv, int hd) {
    const int half = hd / 2, nq = n_heads * hd, nk = n_kv * hd;
    if (row < nq + nk) {
        const int rr = row < nq ? row : row - nq, h = rr / hd, w = rr % hd, j = w >> 1, second = w & 1;
        const float2 cs = rope_row[j];
        const float x1 = second ? partner : y, x2 = second ? y : partner;
        const float2 r = rope_pair(x1, x2, cs);
        return QkvOut{row < nq ? 0 : 1, h, j + (second ? half : 0), second ? r.y : r.x};
    }
    const int rr = row - nq - nk;
    return QkvOut{2, rr / hd, rr % hd, y};
}

// Epilogue of one output row of the fused q|k|v matrix for one token at
// position p (qkv_rope_out): the rotated q to q_out (natural order), k and v
// to the caches at p. rope_row: the (cos, sin) pairs of position p.
template <typename KV>
__device__ __forceinline__ void qkv_rope_store(int row, float y, float partner, int p, const float2* rope_row,
                                               int n_heads, int n_kv, int hd, int cap, float* q_out, KV* kc,
                                               KV* vc) {
    const QkvOut o = qkv_rope_out(row, y, partner, rope_row, n_heads, n_kv, hd);
    if (o.kind == 0) q_out[o.h * hd + o.d] = o.v;
    else if (o.kind == 1) kv_store(kc + ((size_t)o.h * cap + p) * hd + o.d, o.v);
    else kv_store(vc + ((size_t)o.h * cap + p) * hd + o.d, o.v);
}

// Bulk (TMA) weight copies, sm_90+: one thread issues a few large copies
// that complete on an mbarrier, instead of every thread issuing 16-byte
// cp.async (whose issue stalls once the SM's request queue is full).
__device__ __forceinline__ unsigned smem_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbar_init(u64* bar, unsigned count = 1) {
#if __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}
__device__ __forceinline__ void mbar_wait(u64* bar, unsigned parity) {
#if __CUDA_ARCH__ >= 900
    unsigned done = 0;
    while (!done)
        asm volatile(
            "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
            : "=r"(done)
            : "r"(smem_addr(bar)), "r"(parity)
            : "memory");
#endif
}
// Thread 0: copy `bytes` (a multiple of 16, both ends 16-byte aligned) from
// global src to shared dst as bulk copies of <= 32 KB, completing on bar.
// mg_bulk_expect fences the shared-memory proxies first: earlier
// generic-proxy reads of dst come before the copy's writes. Sources are
// never written in the launch that copies them (weights; a GEMM's inputs
// come from an earlier kernel), so the fence is the CTA's shared-memory one:
// the full `fence.proxy.async` was a MEMBAR.GPU in front of every phase's
// copy (S21-3: decode +1%).
__device__ __forceinline__ void mg_bulk_part(unsigned dst, const char* src, unsigned bytes, u64* bar,
                                             bool evict_first = false) {
#if __CUDA_ARCH__ >= 900
    // evict_first: data read once (a decode step's weights) should not push
    // the small, re-read data (activations, KV rows) out of the L2.
    unsigned long long policy = 0;
    if (evict_first) asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
    for (unsigned o = 0; o < bytes; o += 32768u) {
        const unsigned nb = min(32768u, bytes - o);
        if (evict_first)
            asm volatile(
                "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], "
                "%4;" ::"r"(dst + o),
                "l"(src + o), "r"(nb), "r"(smem_addr(bar)), "l"(policy)
                : "memory");
        else
            asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                             dst + o),
                         "l"(src + o), "r"(nb), "r"(smem_addr(bar))
                         : "memory");
    }
#endif
}
__device__ __forceinline__ void mg_bulk_expect(u64* bar, unsigned bytes) {
#if __CUDA_ARCH__ >= 900
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
#endif
}
__device__ __forceinline__ void mbar_arrive(u64* bar) {
#if __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
#endif
}

// Exact int8 dot of 16 bytes (four dp4a in x, y, z, w order) added to acc.
__device__ __forceinline__ int dp4a16(uint4 w, uint4 x, int acc) {
    acc = __dp4a((int)w.x, (int)x.x, acc);
    acc = __dp4a((int)w.y, (int)x.y, acc);
    acc = __dp4a((int)w.z, (int)x.z, acc);
    return __dp4a((int)w.w, (int)x.w, acc);
}

// int8 code of t: one saturating round-to-nearest-even conversion (NaN ->
// 0, clamped to [-128, 127]), as the CPU's `as i8` of the rounded value.
__device__ __forceinline__ int q8_code(float t) {
    int q;
    asm("cvt.rni.sat.s8.f32 %0, %1;" : "=r"(q) : "f"(t));
    return q;
}
// The codes of y * s for 4 values, packed little-endian (byte permutes).
__device__ __forceinline__ unsigned q8_word(float4 y, float s) {
    const unsigned lo = __byte_perm(q8_code(y.x * s), q8_code(y.y * s), 0x0040);
    const unsigned hi = __byte_perm(q8_code(y.z * s), q8_code(y.w * s), 0x0040);
    return __byte_perm(lo, hi, 0x5410);
}

// a / b with __fdiv_rn's bits, cheaper where one b divides many a (the
// GEMM epilogues: row scale / token scale): r1 = div_rcp(b) once per b, then
// div_by(a, b, r1) per a. Inside |a|, |b| in [2^-40, 2^40] this is the fast
// path the compiler emits for div.rn.f32 (an approximate reciprocal, one
// Newton step, Markstein's correction; correctly rounded where nothing
// over- or underflows), without its per-division range check and branch,
// which left a GEMM epilogue waiting on one division after another (ncu,
// S14-3); outside that range (zeros, denormals, huge values, inf, NaN),
// __fdiv_rn itself. Test (device): `fast_division_matches_ieee`.
#define DIV_LO 0x1p-40f
#define DIV_HI 0x1p40f
__device__ __forceinline__ bool div_in_range(float x) {
    const float ax = fabsf(x);
    return ax >= DIV_LO && ax <= DIV_HI;  // false for NaN
}
__device__ __forceinline__ float div_rcp(float b) {
    if (!div_in_range(b)) return 0.f;  // 0: div_by takes __fdiv_rn
    float r0;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r0) : "f"(b));
    return __fmaf_rn(r0, __fmaf_rn(-b, r0, 1.f), r0);
}
// The fast path alone: where div_in_range(a) and r1 = div_rcp(b) != 0.
// Callers with many divisions test that once for all of them (one branch
// per group instead of one per division: S14-7).
__device__ __forceinline__ float div_fast(float a, float b, float r1) {
    const float q0 = __fmul_rn(a, r1);
    return __fmaf_rn(r1, __fmaf_rn(-b, q0, a), q0);
}
__device__ __forceinline__ float div_by(float a, float b, float r1) {
    return r1 != 0.f && div_in_range(a) ? div_fast(a, b, r1) : __fdiv_rn(a, b);
}

// The gated FFN activation act(g) * u (gate 1 = relu2, 2 = silu): one
// expression for norm_quant's input and the GEMM's gated epilogue, so both
// give the same bits.
__device__ __forceinline__ float gated_act(float g, float u, int gate) {
    if (gate == 1) {
        g = fmaxf(g, 0.f);
        return g * g * u;
    }
    return g / (1.f + expf(-g)) * u;
}
