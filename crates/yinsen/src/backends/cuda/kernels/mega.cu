// The persistent one-token decode: every layer of the transformer body in
// ONE kernel launch, one 512-thread block per SM (MG_THREADS), each phase
// waiting for its input vector from every block. Why: a decode step is ~150
// small dependent matrix kernels whose launch, ramp-up and tail latencies
// (not bytes) set the step time. Here a phase costs a wait for its input's
// tags (MG_TAGGED; a grid barrier before session 31), and the weights of the
// next phase are already on their way (bulk-copied into the other
// shared-memory buffer a phase ahead; gate/up's during the attention) while
// the current one runs.
//
// Per layer (5 phases; no grid barrier: each phase's input is a tagged
// vector, polled in its loads, see MG_TAGGED):
//   QKV  every block: RMSNorm + int8 quantisation of x (recomputed per block,
//        no extra barrier), its rows of W_qkv, RoPE + KV-cache write.
//   ATT  items (kv head, key chunk) over the blocks; a chunk's block merges
//        the partials when it finishes last (no extra barrier).
//   O    sub-norm + quantisation of the attention output, rows of W_o, x += y.
//   GU   norm + quantisation of x, gate rows [a, b) and the matching up rows
//        of the block, so the epilogue writes h = act(g) * u directly.
//   DN   sub-norm + quantisation of h, rows of W_down, x += y.
// Arithmetic per element is that of the separate decode kernels (decode.cu),
// except the norm: y = (x * r) * w as the CPU computes it (decode.cu divides
// by the root); reduction orders differ, so results match to float rounding.
//
// Data written inside the launch by other blocks is read with ld.global.cg
// (L2, never a stale L1 line); weights and norms are read-only (__ldg).

// Threads per block of the one-token kernel (the multi-token kernel has
// its own, MM_THREADS in mega_multi.cu). 512: 128 registers and half the
// warps running each phase's per-block code (the quantisation, the item
// setup: issue-bound at 32 warps, S21-2). S21-5 had it +2.8% at ctx 0 and
// -6% at ctx 2048 against 1024; with sessions 22-23's K staging and merge,
// S27-3 measured 1097-1103 / 884-889 tok/s against 1046-1047 / 856-861.
// A/B builds: YINSEN_NVRTC_DEFINES=MG_THREADS=1024 with
// YINSEN_CUDA_MEGA_THREADS=1024.
#ifndef MG_THREADS
#define MG_THREADS 512
#endif
#define MG_NQ (8192 / MG_THREADS)  // input elements per thread: widths up to 8192
#define MG_MAXROWS 512    // rows of one phase per block (host checks)
#define MG_GMAX 8         // query heads per KV head
#define MG_QMAX 1024      // group * head_dim
#define MG_ACMAX 256      // keys per attention item
#define MG_LT 12          // u64 entries per layer in the layer table
#define MG_TRACE 30       // trace marks per layer (bench only)
// int8 activations in shared memory: 64-byte chunks at an 80-byte stride, so
// the 8 lanes of a 16-byte load phase (consecutive chunks) hit 8 distinct
// 4-bank groups: no bank conflicts (at 64 bytes they collide 4-way).
#define MG_XSTRIDE 80
#define MG_XBYTES (MG_NQ * MG_THREADS / 64 * MG_XSTRIDE)

// Grid barrier over all blocks of the launch. `bar` is zeroed before the
// launch (mega_begin); `epoch` counts arrivals expected so far. flags bit 1:
// arrive with one release reduction (no separate fence, no returned value);
// bit 2: no fence after the acquire spin (the acquire orders the reads).
// bit 0 is unused: it turned off an L2 bulk prefetch of the next phases'
// weights, which runs 21-22 measured 1-4% slower than no prefetch; removed.
#define MG_BAR_RELEASE 2
#define MG_BAR_NO_TAIL_FENCE 4
#define MG_SPIN_SLEEP 8   // back off in the barrier spin
#define MG_EVICT_FIRST 16 // weight copies with an L2 evict-first policy
// Blocks without an attention item hold their gate/up weight copy back
// 1000 / 2000 / 4000 cycles (the bits add). Why: issued at once, the ~9 MB burst
// queues ahead of the items' q and K loads at small contexts; held ~1 us,
// those get through first (S11-2/3, H100: 2000 cycles +2.3-2.7% at ctx 0;
// 1000 no gain, 1500 +1.3%, 2500 +2.0%, 3000 +1.3%; no item-less blocks at
// ctx 2048, so no effect there). A timing heuristic: the default is
// measured, not derived.
#define MG_GU_HOLD_1K 32
#define MG_GU_HOLD_2K 64
#define MG_GU_HOLD_4K 1024
// Attention items of fewer query heads where the grid has room: at short
// contexts the (KV head, key chunk) items are few (5 on 2B4T up to 64 keys)
// and every other block waits for them at the barrier; an item then takes
// group / sub of its KV head's query heads (sub a power of two dividing
// group, the items at most one per block), so the serial part of each item
// (q loads, score FMAs, warp sums, P V) shrinks by sub.
#define MG_HEAD_SPLIT 128
// Each block's first attention item's K and V rows prefetched into L2 (thread
// 0, one bulk prefetch each). Why: at ctx 2048 an item reads ~80 KB of the
// cache from HBM in dependent rounds. When (A/B builds; 0 off):
//   1: at the layer's start (S22-2: ctx 2048 790 -> 808 tok/s, scores 4.4 ->
//      3.0 us a layer; the QKV phase's x loads queue behind it, 97 -> 106 us);
//   2: after the QKV phase's quantisation (S22-5: 831 against 828-830);
//   3: the next layer's, once the block's attention items are done, while it
//      waits at the barrier after them (layer 0's at its start). S22-6: with
//      MG_CNT_ACQREL 833-839 against 829-830 for 1; the QKV phase back to 99.
#ifndef MG_KVPF
#define MG_KVPF 3
#endif
// The first attention item's K rows staged in the gate/up weight buffer
// (free until that copy is issued, after the scores) where the V staging
// buffer has no room for them (ctx 2048 on 2B4T: 79-key items, 40 KB of K),
// so that the scores read shared memory (S22-3: 808 -> 821 tok/s at ctx 2048
// with MG_KVPF). 0 turns it off (A/B builds).
#ifndef MG_KSTAGE_GU
#define MG_KSTAGE_GU 1
#endif
// The attention's chunk counter as one acquire-release atomic instead of a
// fence, a relaxed atomic and a second fence (S22-6: +0.6% at both contexts;
// 0 turns it off).
#ifndef MG_CNT_ACQREL
#define MG_CNT_ACQREL 1
#endif
// Scores of groups of 1 or 2 query heads by mg_scores_g<KV, 4> (0 off: the
// generic loop). S23-1: ctx 0 1014-1017 -> 1045-1047 tok/s (the split items
// of short contexts have 1 head: scores 1.15 -> 0.44 us a layer).
#ifndef MG_SCORES_PAD4
#define MG_SCORES_PAD4 1
#endif
// The merge's partials read by weak loads (0: by mg_kv's strong generic
// loads; see the merge in mg_attention). S23-6: no measurable difference
// (1046 / 845-847 against 1041-1042 / 842-848 tok/s).
#ifndef MG_MERGE_PLAIN
#define MG_MERGE_PLAIN 1
#endif
// The attention merge split over the last blocks to finish a KV head's
// chunks, a share of its query heads each (see mg_attention; 0 off).
// S23-8: ctx 2048 844 -> 861 tok/s (the wait after the attention 164 -> 142
// us over 30 layers); ctx 0 unchanged. NVRTC 13.0 spills 4 bytes of
// mega_f32 since (either setting), at no measured cost.
#ifndef MG_MERGE_SPLIT
#define MG_MERGE_SPLIT 1
#endif
// Trace marks 24-29 of the attention merge (a diagnostic build: NVRTC 13.0
// spills 4 bytes with them).
#ifndef MG_TRACE_MERGE
#define MG_TRACE_MERGE 0
#endif
// The attention merge's partials staged in shared memory (see the merge in
// mg_attention; 0 off). S23-1: ctx 2048 831-832 -> 843 tok/s; with 0 (the
// chunk-major layout, loads from L2) 812.
#ifndef MG_MERGE_STAGE
#define MG_MERGE_STAGE 1
#endif
// Tagged vectors (MG_TAGGED): every vector one phase hands to the next (x
// after down and after O, the attention output, h; at level 2 also q and the
// new key's k and v) is written as 8-byte words (value, tag), the tag naming
// the step and the layer (mega_begin counts the steps); the consuming phase
// loads them with relaxed 8-byte loads and loads again until every tag is
// current. Why: a grid barrier is a release fence, an atomic and a polled
// counter (about three L2 round trips) before the input's own load; here
// the input's load is the poll (NCCL's LL protocol: an aligned 8-byte access
// is single-copy atomic). Reuse needs no barrier: a block writes one of these
// buffers again only after it has consumed a vector that every block reading
// it wrote after that read (a block without rows in a phase reads none of
// its input, so the blocks that nobody waits for read nothing).
//   0: five grid barriers a layer (A/B builds);
//   1: one, QKV -> attention (the K / V rows go to the cache untagged).
//      S31-1: 1207 / 977 tok/s against 1172 / 942 at ctx 0 / 2048;
//   2: none: the attention items poll q and the new key's k and v, and the
//      item that holds the new key writes its k and v rows where it reads
//      them (its staged copy, else the cache) rather than wait for the QKV
//      phase's cache write; the chunk counters count on over the layers
//      (reset after the last). S31-3 / S31-4: 1222-1225 / 1011-1014 against
//      1228-1232 / 993-994 for level 1.
// Every level gives the same tokens (S31-2, S31-3: 200 greedy tokens, f32
// and f16 caches).
#ifndef MG_TAGGED
#define MG_TAGGED 2
#endif

// Polls of a tagged input before the kernel traps (a tag never written is a
// bug: an error, not a hang).
#define MG_SPIN_MAX (1 << 24)
// flags bits 8-9: back off 32 << (k - 1) ns between polls of a tagged input
// (k = 1..3; 0: poll again at once). The launch's flags, for code that is
// not passed them.
#define MG_TAG_SLEEP_SHIFT 8
__shared__ int mg_flags_s;
#if MG_TAGGED
typedef u64 MgVec;
#else
typedef float MgVec;
#endif
__device__ __forceinline__ void mg_put(float* p, float v, unsigned) { *p = v; }
__device__ __forceinline__ void mg_put(u64* p, float v, unsigned tag) {
    const u64 w = ((u64)tag << 32) | __float_as_uint(v);
    asm volatile("st.relaxed.gpu.global.b64 [%0], %1;" ::"l"(p), "l"(w) : "memory");
}
// A value this thread wrote earlier (the residual's own rows).
__device__ __forceinline__ float mg_own(const float* p) { return __ldcg(p); }
__device__ __forceinline__ float mg_own(const u64* p) {
    u64 w;
    asm volatile("ld.relaxed.gpu.global.b64 %0, [%1];" : "=l"(w) : "l"(p) : "memory");
    return __uint_as_float((unsigned)w);
}
// One tagged value, polled until its tag is `tag`.
__device__ __forceinline__ float mg_tget1(const u64* p, unsigned tag) {
    for (int it = 0;; it++) {
        u64 w;
        asm volatile("ld.relaxed.gpu.global.b64 %0, [%1];" : "=l"(w) : "l"(p) : "memory");
        if ((unsigned)(w >> 32) == tag) return __uint_as_float((unsigned)w);
        if (it == MG_SPIN_MAX) __trap();
        const int k = (mg_flags_s >> MG_TAG_SLEEP_SHIFT) & 3;
        if (k) __nanosleep(16u << k);
    }
}
// 4 tagged values at p (16-byte aligned); ok cleared unless every tag is `tag`.
__device__ __forceinline__ float4 mg_tget4(const u64* p, unsigned tag, bool& ok) {
    u64 a, b, c, d;
    asm volatile("ld.relaxed.gpu.global.v2.b64 {%0, %1}, [%2];" : "=l"(a), "=l"(b) : "l"(p) : "memory");
    asm volatile("ld.relaxed.gpu.global.v2.b64 {%0, %1}, [%2];" : "=l"(c), "=l"(d) : "l"(p + 2) : "memory");
    ok = ok & ((unsigned)(a >> 32) == tag) & ((unsigned)(b >> 32) == tag) & ((unsigned)(c >> 32) == tag) &
         ((unsigned)(d >> 32) == tag);
    return make_float4(__uint_as_float((unsigned)a), __uint_as_float((unsigned)b), __uint_as_float((unsigned)c),
                       __uint_as_float((unsigned)d));
}
template <bool TAIL = true>
__device__ __forceinline__ void mg_grid_sync(unsigned* bar, unsigned& epoch, int flags) {
    __syncthreads();
    epoch += gridDim.x;
    if (threadIdx.x == 0) {
        if (flags & MG_BAR_RELEASE) {
            asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(bar) : "memory");
        } else {
            __threadfence();
            atomicAdd(bar, 1u);
        }
        unsigned v;
        while (true) {
            asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(bar) : "memory");
            if (v >= epoch) break;
            if (flags & MG_SPIN_SLEEP) __nanosleep(40);
        }
        if (!(flags & MG_BAR_NO_TAIL_FENCE)) __threadfence();
    }
    if (TAIL) __syncthreads();
}


__device__ __forceinline__ float ldcg_kv(const float* p) { return __ldcg(p); }
__device__ __forceinline__ float ldcg_kv(const u16* p) {
    u16 h;
    asm volatile("ld.global.cg.u16 %0, [%1];" : "=h"(h) : "l"(p));
    return h2f(h);
}

// 4-byte async copy global -> shared (sm_80+; plain copy before that).
__device__ __forceinline__ void cp_async4(float* smem, const float* g) {
#if __CUDA_ARCH__ >= 800
    const unsigned a = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(a), "l"(g) : "memory");
#else
    *smem = __ldg(g);
#endif
}
__device__ __forceinline__ void cp_async_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_all;" ::: "memory");
#endif
}

// v, computed where it is used: the compiler cannot hoist it out of a loop
// (a value live across the whole layer loop spills at 64 registers).
__device__ __forceinline__ int mg_opaque(int v) {
    asm volatile("" : "+r"(v));
    return v;
}
template <typename T>
__device__ __forceinline__ T* mg_opaque(T* p) {
    asm volatile("" : "+l"(p));
    return p;
}

// An L2 prefetch of [p, p + bytes) by one bulk instruction (sm_90; nothing
// before): rounded out to 16-byte bounds, as cp.async.bulk requires.
__device__ __forceinline__ void mg_prefetch_l2(const void* p, size_t bytes) {
#if __CUDA_ARCH__ >= 900
    const size_t a = (size_t)p & ~(size_t)15, e = ((size_t)p + bytes + 15) & ~(size_t)15;
    if (e > a) asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(a), "r"((unsigned)(e - a)) : "memory");
#endif
}

// Trace (bench only): block 0 records clock64 at phase start / work end.
__device__ __forceinline__ void mg_mark(u64* trace, int idx) {
    if (trace && blockIdx.x == 0 && threadIdx.x == 0) trace[idx] = clock64();
}

// The rows a block owns in one matrix phase: local row i < n is global row
// a + i; with off2 >= 0 the block also owns rows off2 + a + (i - n) for
// i in [n, 2n) (gate row a + i and its up row F + a + i).
struct MgRows {
    int a, n, off2;
};
__device__ __forceinline__ int mg_row(const MgRows& r, int i) { return i < r.n ? r.a + i : r.off2 + r.a + (i - r.n); }
__device__ __forceinline__ int mg_nloc(const MgRows& r) { return r.off2 >= 0 ? 2 * r.n : r.n; }

// Plain split of n_rows over the grid; `even` keeps RoPE pairs in one block.
__device__ __forceinline__ MgRows mg_rows(int n_rows, int even) {
    int rpb = (n_rows + gridDim.x - 1) / gridDim.x;
    if (even) rpb += rpb & 1;
    const int a = blockIdx.x * rpb;
    return MgRows{a, max(0, min(rpb, n_rows - a)), -1};
}
__device__ __forceinline__ MgRows mg_rows_paired(int f) {
    const int rpb = (f + gridDim.x - 1) / gridDim.x, a = blockIdx.x * rpb;
    return MgRows{a, max(0, min(rpb, f - a)), f};
}


// cp.async groups: a phase's weights and row scales are one group, so a
// later group (the gate/up weights, issued a phase early) can stay in
// flight while an earlier one is waited for.
__device__ __forceinline__ void cp_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_wait_group() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

// Layer l's table entries (MG_LT u64, 16-byte aligned: layers are 96 bytes
// apart) into lts[l & 1] by 16-byte cp.async from the last warp (warp 0
// drives the bulk copies and the trace), one commit group on every thread;
// the next barrier's wait makes them visible. Why: every phase starts by
// reading its weight, scale and norm pointers from the table; from global
// memory that was a dependent L2 round trip (and a stack store waiting on
// it) on the critical path of each of the 5 phases per layer (ncu, S10-5;
// decode +1.6-1.8%, S10-7).
__device__ __forceinline__ void mg_lt_copy(const u64* lt, int l, u64 (*lts)[MG_LT]) {
    const int t = threadIdx.x - (MG_THREADS - 32);
    if (t >= 0 && t < MG_LT / 2) {
#if __CUDA_ARCH__ >= 800
        const unsigned a = (unsigned)__cvta_generic_to_shared(&lts[l & 1][2 * t]);
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(a), "l"(lt + (size_t)l * MG_LT + 2 * t)
                     : "memory");
#else
        lts[l & 1][2 * t] = lt[(size_t)l * MG_LT + 2 * t];
        lts[l & 1][2 * t + 1] = lt[(size_t)l * MG_LT + 2 * t + 1];
#endif
    }
    cp_commit();
}

// Start copying a phase's weights (the block's rows, flattened (row, chunk)
// order) into a shared-memory buffer: 16-byte cp.async, L1 bypassed. They
// land while the current phase and the barrier run; cp_async_wait() waits.
// NT: the block's threads (MG_THREADS here, MM_THREADS in mega_multi.cu).
template <int NT = MG_THREADS>
__device__ __forceinline__ void mg_wcopy(const uint4* W, int chunks, MgRows r, uint4* dst) {
    // The block's rows are one contiguous range (two when paired): the
    // flattened chunk index maps to global chunks without a division.
    const int span = r.n * chunks, total = mg_nloc(r) * chunks;
    const uint4* b0 = W + (size_t)r.a * chunks;
    const uint4* b1 = r.off2 >= 0 ? W + (size_t)(r.off2 + r.a) * chunks - span : b0;
    for (int idx = threadIdx.x; idx < total; idx += NT) {
        const uint4* src = idx < span ? b0 + idx : b1 + idx;
#if __CUDA_ARCH__ >= 800
        const unsigned a = (unsigned)__cvta_generic_to_shared(dst + idx);
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(a), "l"(src) : "memory");
#else
        dst[idx] = __ldg(src);
#endif
    }
}

// Thread 0: copy the block's rows of W into dst, completing on bar.
__device__ __forceinline__ void mg_wbulk(const uint4* W, int chunks, MgRows r, uint4* dst, u64* bar,
                                         bool evict_first) {
    if (threadIdx.x != 0) return;
    const unsigned span = (unsigned)r.n * (unsigned)chunks * 16u, total = r.off2 >= 0 ? 2 * span : span;
    mg_bulk_expect(bar, total);
    for (int part = 0; part < (r.off2 >= 0 ? 2 : 1); part++)
        mg_bulk_part(smem_addr(dst) + part * span, (const char*)(W + (size_t)((part ? r.off2 : 0) + r.a) * chunks),
                     span, bar, evict_first);
}

// The next matrix phase's copy: the block's rows of W into `dst` (TMA bulk
// copies by thread 0 completing on `bar`, sm_90+; else cp.async), their row
// scales into `scs` (cp.async, one commit group).
struct MgNext {
    const uint4* W;
    int chunks;
    MgRows r;
    uint4* dst;
    u64* bar;
    const float* rs;
    float* scs;
    bool evict_first;  // MG_EVICT_FIRST
};
template <int NT = MG_THREADS>
__device__ __forceinline__ void mg_issue(const MgNext& n) {
#if __CUDA_ARCH__ >= 900
    mg_wbulk(n.W, n.chunks, n.r, n.dst, n.bar, n.evict_first);
#else
    mg_wcopy<NT>(n.W, n.chunks, n.r, n.dst);
#endif
    const int nloc = mg_nloc(n.r);
    for (int i = threadIdx.x; i < nloc; i += NT) cp_async4(n.scs + i, n.rs + mg_row(n.r, i));
    cp_commit();
}

__device__ __forceinline__ int mg_xsum(const int* xsum_s) {
    int t = 0;
#pragma unroll
    for (int w = 0; w < MG_THREADS / 32; w++) t += xsum_s[w];
    return t;
}

// Block-wide (sum, max) in one pass: one pair of barriers instead of two.
// red: 64 floats of shared memory. m must be >= 0.
__device__ __forceinline__ float2 mg_block_sum_max(float s, float m, float* red) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        s += __shfl_xor_sync(0xffffffffu, s, o);
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    }
    if (lane == 0) {
        red[w] = s;
        red[32 + w] = m;
    }
    __syncthreads();
    s = lane < MG_THREADS / 32 ? red[lane] : 0.f;
    m = lane < MG_THREADS / 32 ? red[32 + lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) {
        s += __shfl_xor_sync(0xffffffffu, s, o);
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    }
    return make_float2(s, m);
}

// Block-wide: v = [rmsnorm](in) [* nw] quantised to int8 into xq (zero
// padded to kpad); returns sx. The sum of the codes is left as 32 per-warp
// partials in xsum_s (see mg_xsum). n must be a multiple of 4 (host). Lean per
// element: float4 loads, only the threads that hold elements work; y =
// (v * r) * nw as the CPU's rms_quantize (r = 1 / sqrt(mean + eps)); the
// code is one saturating round-to-nearest-even conversion, 4 codes packed by
// byte permutes and summed by one dp4a. The max comes from redux.sync on
// the bits (non-negative floats order as integers). Why: at 1024 threads
// every per-element instruction costs 8 issue slots per scheduler; the
// divisions and clamps of mg_quant made it ~2 us per 2560 elements.
// The input's float4s of this thread (element 4 * (tid + k * MG_THREADS)),
// zero past n4: plain, or tagged (loaded again until every tag is `tag`).
__device__ __forceinline__ void mg_load_in(const float* in, unsigned, int n4, float4 (&v)[MG_NQ / 4]) {
#pragma unroll
    for (int k = 0; k < MG_NQ / 4; k++) {
        const int i4 = threadIdx.x + k * MG_THREADS;
        v[k] = i4 < n4 ? __ldcg((const float4*)in + i4) : make_float4(0.f, 0.f, 0.f, 0.f);
    }
}
__device__ __forceinline__ void mg_load_in(const u64* in, unsigned tag, int n4, float4 (&v)[MG_NQ / 4]) {
    for (int it = 0;; it++) {
        bool ok = true;
#pragma unroll
        for (int k = 0; k < MG_NQ / 4; k++) {
            const int i4 = threadIdx.x + k * MG_THREADS;
            v[k] = i4 < n4 ? mg_tget4(in + 4 * i4, tag, ok) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
        if (__all_sync(0xffffffffu, ok)) break;
        if (it == MG_SPIN_MAX) __trap();
        const int k = (mg_flags_s >> MG_TAG_SLEEP_SHIFT) & 3;
        if (k) __nanosleep(16u << k);
    }
}

template <typename IN>
__device__ float mg_quant(const IN* in, unsigned tag, int n, const float* nw, float eps, int kpad, i8* xq,
                          float* red, int* xsum_s, bool need = true) {
    const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5, n4 = n >> 2;
    // Every load first, then the arithmetic: loaded and used in one loop,
    // the second float4's loads waited for the first's use (ncu, S10-5:
    // down's 6912-wide input took two L2 round trips). The norm weights
    // first: they do not wait for another block.
    float4 v[MG_NQ / 4], g[MG_NQ / 4];
#pragma unroll
    for (int k = 0; k < MG_NQ / 4; k++) {
        const int i4 = tid + k * MG_THREADS;
        g[k] = nw && i4 < n4 ? __ldg((const float4*)nw + i4) : make_float4(1.f, 1.f, 1.f, 1.f);
    }
    mg_load_in(in, tag, need ? n4 : 0, v);
    float ss = 0.f, mw = 0.f;
#pragma unroll
    for (int k = 0; k < MG_NQ / 4; k++) {
        ss += v[k].x * v[k].x;
        ss += v[k].y * v[k].y;
        ss += v[k].z * v[k].z;
        ss += v[k].w * v[k].w;
        mw = fmaxf(mw, fmaxf(fmaxf(fabsf(v[k].x * g[k].x), fabsf(v[k].y * g[k].y)),
                             fmaxf(fabsf(v[k].z * g[k].z), fabsf(v[k].w * g[k].w))));
    }
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    unsigned mb = __float_as_uint(mw);
#if __CUDA_ARCH__ >= 800
    mb = __reduce_max_sync(0xffffffffu, mb);
#else
    for (int o = 16; o > 0; o >>= 1) mb = max(mb, __shfl_xor_sync(0xffffffffu, mb, o));
#endif
    if (lane == 0) {
        red[w] = ss;
        red[32 + w] = __uint_as_float(mb);
    }
    __syncthreads();
    ss = lane < MG_THREADS / 32 ? red[lane] : 0.f;
    mb = lane < MG_THREADS / 32 ? __float_as_uint(red[32 + lane]) : 0u;
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
#if __CUDA_ARCH__ >= 800
    mb = __reduce_max_sync(0xffffffffu, mb);
#else
    for (int o = 16; o > 0; o >>= 1) mb = max(mb, __shfl_xor_sync(0xffffffffu, mb, o));
#endif
    const float r = nw ? 1.f / sqrtf(ss / (float)n + eps) : 1.f;
    const float s = 127.f / fmaxf(__uint_as_float(mb) * r, 1e-5f);
    int qs = 0;
#pragma unroll
    for (int k = 0; k < MG_NQ / 4; k++) {
        const int i4 = tid + k * MG_THREADS, i = 4 * i4;
        if (i < kpad) {
            unsigned word = 0;
            if (i4 < n4) {
                float4 t = v[k];
                if (nw) t = make_float4(t.x * r * g[k].x, t.y * r * g[k].y, t.z * r * g[k].z, t.w * r * g[k].w);
                word = q8_word(t, s);
                qs = __dp4a((int)word, 0x01010101, qs);
            }
            *(unsigned*)(xq + (i >> 6) * MG_XSTRIDE + (i & 63)) = word;
        }
    }
#if __CUDA_ARCH__ >= 800
    qs = __reduce_add_sync(0xffffffffu, qs);
#else
    for (int o = 16; o > 0; o >>= 1) qs += __shfl_xor_sync(0xffffffffu, qs, o);
#endif
    if (lane == 0) xsum_s[w] = qs;
    __syncthreads();  // xq complete
    return s;
}

// acc_s[li] += p summed over the warp's lanes of each row (li < 0: none).
// With >= 32 chunks per row a warp spans at most two rows: two reductions;
// otherwise group lanes by row with match_any.
__device__ __forceinline__ void mg_acc(int li, int p, int* acc_s, bool wide) {
#if __CUDA_ARCH__ >= 800
    const int lane = threadIdx.x & 31;
    if (wide) {
        const int l0 = __shfl_sync(0xffffffffu, li, 0), l1 = __shfl_sync(0xffffffffu, li, 31);
        const int a = __reduce_add_sync(0xffffffffu, li == l0 ? p : 0);
        const int b = __reduce_add_sync(0xffffffffu, li == l0 ? 0 : p);
        if (lane == 0 && l0 >= 0) atomicAdd(acc_s + l0, a);
        if (lane == 31 && l1 >= 0 && l1 != l0) atomicAdd(acc_s + l1, b);
        return;
    }
    const unsigned m = __match_any_sync(0xffffffffu, li);
    const int s = __reduce_add_sync(m, p);
    if (li >= 0 && lane == __ffs(m) - 1) atomicAdd(acc_s + li, s);
#else
    if (li >= 0) atomicAdd(acc_s + li, p);
#endif
}


// dp4a of unsigned bytes a (0..255) and signed bytes b.
__device__ __forceinline__ int dp4a_us(u32 a, u32 b, int c) {
    int d;
    asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
// One chunk's dot without the shifts of ext2: the code field j of every
// byte is masked in place (value c << 2j, at most 128: unsigned dp4a) into
// accumulator j, which is then exactly 4^j times the field's dot product.
// 4 fewer instructions per word (the dot is integer-issue bound).
__device__ __forceinline__ int mg_dot_chunk_masked(uint4 w, uint4 x0, uint4 x1, uint4 x2, uint4 x3) {
    const u32 wd[4] = {w.x, w.y, w.z, w.w};
    const uint4 xs[4] = {x0, x1, x2, x3};
    int a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma unroll
    for (int m = 0; m < 4; m++) {
        a0 = dp4a_us(wd[m] & 0x03030303u, xs[m].x, a0);
        a1 = dp4a_us(wd[m] & 0x0c0c0c0cu, xs[m].y, a1);
        a2 = dp4a_us(wd[m] & 0x30303030u, xs[m].z, a2);
        a3 = dp4a_us(wd[m] & 0xc0c0c0c0u, xs[m].w, a3);
    }
    return a0 + (a1 >> 2) + (a2 >> 4) + (a3 >> 6);
}

// The dot with a fixed chunk per thread: thread t takes chunk c = t % chunks
// of rows t / chunks, t / chunks + G, ... (G = blockDim / chunks groups), so
// its 64 activations are read from shared memory once and stay in registers;
// per row only the 16 weight bytes are read. Shared-memory traffic drops
// from (16 + 64) to ~16 bytes per chunk, which bounded the flat loop.
__device__ void mg_dot(int chunks, MgRows r, const uint4* wsm, const i8* xq, int* acc_s) {
    const int nloc = mg_nloc(r), groups = MG_THREADS / chunks;
    const int grp = threadIdx.x / chunks, c = threadIdx.x - grp * chunks;
    const bool act = grp < groups;
    uint4 x0 = make_uint4(0, 0, 0, 0), x1 = x0, x2 = x0, x3 = x0;
    if (act) {
        const uint4* xc = (const uint4*)xq + c * (MG_XSTRIDE / 16);
        x0 = xc[0];
        x1 = xc[1];
        x2 = xc[2];
        x3 = xc[3];
    }
    for (int base = 0; base < nloc; base += groups) {
        const int li = base + grp;
        int row = -1, p = 0;
        if (act && li < nloc) {
            row = li;
            const uint4 w = wsm[li * chunks + c];
            p = mg_dot_chunk_masked(w, x0, x1, x2, x3);
        }
        mg_acc(row, p, acc_s, chunks >= 32);
    }
    __syncthreads();
}

// Warp: one query row's scores s[0..nj) replaced by e^(s - max) (all 0 when
// every key is masked, max = -inf), and on lane 0 (max, sum) into ml[0..2).
__device__ __forceinline__ void mg_softmax_row(float* s, int nj, float* ml) {
    const int lane = threadIdx.x & 31;
    float m = NEG_INF;
    for (int j = lane; j < nj; j += 32) m = fmaxf(m, s[j]);
    m = warp_max(m);
    float l = 0.f;
    for (int j = lane; j < nj; j += 32) {
        const float e = m == NEG_INF ? 0.f : expf(s[j] - m);
        s[j] = e;
        l += e;
    }
    l = warp_sum(l);
    if (lane == 0) {
        ml[0] = m;
        ml[1] = l;
    }
}

// Warp: the merge weights of one query row's nch chunk partials, in place
// in mw (max m_c -> e^(m_c - M); 0 for a chunk without a visible key), and
// on lane 0 the denominator sum l_c w_c into *den, in chunk order as the
// split-K merge of ops.cu sums.
__device__ __forceinline__ void mg_merge_row(float* mw, const float* lw, int nch, float* den) {
    const int lane = threadIdx.x & 31;
    float m = NEG_INF;
    for (int c = lane; c < nch; c += 32) m = fmaxf(m, mw[c]);
    m = warp_max(m);
    for (int c = lane; c < nch; c += 32) mw[c] = mw[c] == NEG_INF ? 0.f : expf(mw[c] - m);
    __syncwarp();
    // By lane 0 alone: summed by the warp (S23-7) it spilled registers.
    if (lane == 0) {
        float d = 0.f;
        for (int c = 0; c < nch; c++) d += lw[c] * mw[c];
        *den = d;
    }
}

// Block: `bytes` (a multiple of 16) from global src into shared dst by
// 16-byte cp.async (L1 bypassed); the caller commits the group.
__device__ __forceinline__ void mg_stage(const void* src, int bytes, uint4* dst) {
    for (int i = threadIdx.x; i < bytes / 16; i += MG_THREADS) {
#if __CUDA_ARCH__ >= 800
        const unsigned a = (unsigned)__cvta_generic_to_shared(dst + i);
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(a), "l"((const uint4*)src + i) : "memory");
#else
        dst[i] = __ldcg((const uint4*)src + i);
#endif
    }
}

// A K value from shared or global memory through one generic load:
// ld.relaxed.gpu reads global memory at L2 (never a stale L1 line, as
// ld.global.cg) and shared memory as any load does, so the scores need no
// second code path (which spilled registers) for staged K rows.
__device__ __forceinline__ float mg_kv(const float* p) {
    float v;
    asm("ld.relaxed.gpu.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}
__device__ __forceinline__ float mg_kv(const u16* p) {
    u16 h;
    asm("ld.relaxed.gpu.b16 %0, [%1];" : "=h"(h) : "l"(p));
    return h2f(h);
}

// A weak generic load (as a plain one) in the same asm form as mg_kv, so
// that the merge's code is scheduled as before (plain C++ loads spilled).
__device__ __forceinline__ float mg_ld_weak(const float* p) {
    float v;
    asm("ld.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}

// Attention of the one new query (position pos) of every head over keys
// 0..pos of this layer's cache; output [n_heads * hd] into attn. Items are
// (KV head, key chunk); a chunk's V rows are copied into `vstage` (a free
// weight buffer) while its scores are computed, when they fit, and its K
// rows before them when both fit.
// Scores of an item's keys for its `group` query heads into sc[g * ac + j]:
// warp w takes keys w, w + 32, ...; a lane's 4 K values of a key (dims
// lane + 32 e) are loaded before the first is used, so their round trips
// overlap (one dim at a time, each load waited for before the next: decode
// 796 / 684 -> 805 / 696 tok/s at ctx 0 / 2048, S8-8 / S8-9). Same float
// order as before; no spills (a template on the head count spilled).
// MG_KB keys per warp are loaded before the first is used. At 512 threads
// (16 warps; the default since session 27, see MG_THREADS) the unstaged 79-key items of ctx
// 2048 took 5 round trips a warp: 4 keys at once cut their scores from 8.1
// to 6.8 us a layer, still above 1024 threads' 5.4 (S21-5).
#ifndef MG_KB
#if MG_THREADS <= 512
#define MG_KB 4
#else
#define MG_KB 1  // 64 registers: more keys in flight spilled
#endif
#endif
// One key's partial scores on a lane: s[g] = sum over the lane's dims d =
// lane + 32 e < min(hd, 128) of q[g][d] * k[d], for heads g < n (G unrolled;
// the rest 0). Shared by mg_scores (G = MG_GMAX, n the run-time group) and
// mg_scores_g (n = G).
template <int G>
__device__ __forceinline__ void mg_key_dot(const float* qs, const float (&kv)[4], int lane, int hd, int n,
                                           float (&s)[G]) {
#pragma unroll
    for (int g = 0; g < G; g++) s[g] = 0.f;
#pragma unroll
    for (int e = 0; e < 4; e++) {
        const int d = lane + 32 * e;
        if (d < hd)
#pragma unroll
            for (int g = 0; g < G; g++)
                if (g < n) s[g] += qs[g * hd + d] * kv[e];
    }
}
template <typename KV>
__device__ __forceinline__ void mg_scores(const float* qs, const KV* kb, int nj, int hd, int group, int ac,
                                          float* sc) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = MG_THREADS / 32;
    for (int j0 = warp; j0 < nj; j0 += nwarps * MG_KB) {
        float kv[MG_KB][4];
#pragma unroll
        for (int b = 0; b < MG_KB; b++) {
            const int j = j0 + b * nwarps;
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int d = lane + 32 * e;
                kv[b][e] = j < nj && d < hd ? mg_kv(kb + (size_t)j * hd + d) : 0.f;
            }
        }
#pragma unroll
        for (int b = 0; b < MG_KB; b++) {
            const int j = j0 + b * nwarps;
            if (j >= nj) break;
            float s[MG_GMAX];
            mg_key_dot(qs, kv[b], lane, hd, group, s);
            // Dims past 128 (head_dim > 128): one at a time.
            for (int d = lane + 128; d < hd; d += 32) {
                const float k = mg_kv(kb + (size_t)j * hd + d);
#pragma unroll
                for (int g = 0; g < MG_GMAX; g++)
                    if (g < group) s[g] += qs[g * hd + d] * k;
            }
#pragma unroll
            for (int g = 0; g < MG_GMAX; g++)
                if (g < group) {
                    const float t = warp_sum(s[g]);
                    if (lane == 0) sc[g * ac + j] = t;
                }
        }
    }
}

// mg_scores for G query heads known at compile time and hd <= 128: per key
// 4 K values a lane, 4 * G FMAs, and the G sums reduced together: at each
// butterfly step a lane keeps the half of its sums its lane bit selects and
// adds its partner's copy of them (G - 1 + 5 - log2 G shuffles instead of
// 5 G). Lane (h << (5 - log2 G)) ends with head h's sum.
template <int G>
__device__ __forceinline__ void mg_reduce_heads(float (&s)[G], int lane) {
#pragma unroll
    for (int o = 16, n = G; o > 0; o >>= 1) {
        if (n > 1) {
            const bool up = lane & o;
#pragma unroll
            for (int i = 0; i < G / 2; i++)
                if (i < n / 2) {
                    const float send = up ? s[i] : s[i + n / 2];
                    const float keep = up ? s[i + n / 2] : s[i];
                    s[i] = keep + __shfl_xor_sync(0xffffffffu, send, o);
                }
            n /= 2;
        } else {
            s[0] += __shfl_xor_sync(0xffffffffu, s[0], o);
        }
    }
}
template <typename KV, int G>
__device__ __forceinline__ void mg_scores_g(const float* qs, const KV* kb, int nj, int hd, int ac, float* sc) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = MG_THREADS / 32;
    constexpr int LG = G == 1 ? 0 : G == 2 ? 1 : G == 4 ? 2 : 3;
    for (int j = warp; j < nj; j += nwarps) {
        float kv[4];
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int d = lane + 32 * e;
            kv[e] = d < hd ? mg_kv(kb + (size_t)j * hd + d) : 0.f;
        }
        float s[G];
        mg_key_dot(qs, kv, lane, hd, G, s);
        mg_reduce_heads<G>(s, lane);
        // Lane bits 4..(5 - LG) name the head whose sum this lane holds.
        if ((lane & ((32 >> LG) - 1)) == 0) sc[(lane >> (5 - LG)) * ac + j] = s[0];
    }
}

template <typename KV>
__device__ void mg_attention(const float* qr, const KV* kc, const KV* vc, int pos, int n_heads, int n_kv, int hd,
                             int cap, float scale, int nsplit, float* part, int* cnt, MgVec* attn, unsigned tag, float* qs,
                             float* sc, float* ml, uint4* vstage, int vstage_bytes, uint4* kbuf, int kbuf_bytes,
                             const MgNext& gu, u64* trace, int tb, int ac, int nch, int flags, int sub_log,
                             const u64* qkt, unsigned cbase) {
    const int tid = threadIdx.x, warp = tid >> 5;
    const int group = n_heads / n_kv, n_keys = pos + 1;
    const size_t pst = hd + 2;
    __shared__ int last;
    // Trace (bench only): clocks of the block's item, for the merge's marks.
    __shared__ long long mt[6];
    // Items are (virtual head vh, key chunk): vh covers query heads
    // vh * group .. + group - 1 of KV head vh >> sub_log; the caller passes
    // n_kv << sub_log as n_kv (see MG_HEAD_SPLIT).
    // The gate/up copy (gu) is issued after the first item's K and V reads,
    // which it would otherwise slow down; blocks without an item issue it at
    // once. Its row scales are the newest cp.async group: the barrier after
    // the attention waits for all others.
    bool gu_issued = false;
    // qs: MG_QMAX floats, sc: MG_GMAX * MG_ACMAX floats (the caller's big buffer).
    for (int item = blockIdx.x; item < n_kv * nch; item += gridDim.x) {
        const int vh = item / nch, kvh = vh >> sub_log, ch = item % nch, j0 = ch * ac, nj = min(ac, n_keys - j0);
        if (item != blockIdx.x) __syncthreads();  // smem reuse across items (the first follows a grid barrier)
        const KV* vb = vc + ((size_t)kvh * cap + j0) * hd;
        const KV* kb = kc + ((size_t)kvh * cap + j0) * hd;
        const int vbytes = nj * hd * (int)sizeof(KV);
        const bool staged = vbytes <= vstage_bytes && vbytes % 16 == 0 && ((size_t)vb & 15) == 0;
        // K staged too where K and V fit (f32 items of up to 64 keys), ahead
        // of V in the buffer as its own cp.async group: one round trip for
        // the item's K rows instead of one per key a warp takes (S11-7: ctx
        // 0 +3.4%; ctx 1024 and 2048 unchanged). f32 caches only: the f16
        // kernel spilled registers with it.
        const bool kstaged = staged && 2 * vbytes <= vstage_bytes && ((size_t)kb & 15) == 0 && sizeof(KV) == 4;
        const uint4* vdst = kstaged ? vstage + vbytes / 16 : vstage;
        // MG_KSTAGE_GU: the first item's K rows into kbuf (the gate/up
        // buffer, not yet copied into), a group of their own ahead of V's.
        const bool kgu = MG_KSTAGE_GU && staged && !kstaged && item == blockIdx.x && vbytes <= kbuf_bytes &&
                         ((size_t)kb & 15) == 0 && sizeof(KV) == 4;
        if (kgu) {
            mg_stage(kb, vbytes, kbuf);
            cp_commit();
        }
        for (int pass = kstaged ? 0 : 1; staged && pass < 2; pass++) {
            mg_stage(pass ? (const void*)vb : (const void*)kb, vbytes, pass ? (uint4*)vdst : vstage);
            cp_commit();
        }
        if (item == blockIdx.x) mg_mark(trace, tb + 23);
        if (MG_TRACE_MERGE && trace && tid == 0) mt[0] = clock64();
#if MG_TAGGED >= 2
        // q from its tagged words; the new key's k and v (the last chunk's
        // last row) held by threads d < hd until their copies have landed.
        const bool newkey = j0 + nj == n_keys;
        float knew = 0.f, vnew = 0.f;
        {
            const int nq = n_heads * hd, nkr = (n_kv >> sub_log) * hd;
            for (int i = tid; i < group * hd; i += MG_THREADS) qs[i] = mg_tget1(qkt + (size_t)vh * group * hd + i, tag) * scale;
            if (newkey && tid < hd) {
                knew = mg_tget1(qkt + nq + kvh * hd + tid, tag);
                vnew = mg_tget1(qkt + nq + nkr + kvh * hd + tid, tag);
            }
        }
        if (kstaged || kgu) cp_wait_group<1>();
        // Every thread's K copies landed before the new row is written over
        // them (or into the cache, where K is read from there).
        if (newkey) {
            __syncthreads();
            if (tid < hd) {
                KV* kr = kstaged ? (KV*)vstage : kgu ? (KV*)kbuf : (KV*)kb;
                kv_store(kr + (size_t)(nj - 1) * hd + tid, knew);
            }
        }
        __syncthreads();
#else
        for (int i = tid; i < group * hd; i += MG_THREADS) qs[i] = __ldcg(qr + (size_t)vh * group * hd + i) * scale;
        if (kstaged || kgu) cp_wait_group<1>();  // the K rows (V may still be in flight), under the same barrier as q
        __syncthreads();
#endif
        if (item == blockIdx.x) mg_mark(trace, tb + 20);
        {
            const KV* ks = kstaged ? (const KV*)vstage : kgu ? (const KV*)kbuf : kb;
            // A compile-time head count where hd <= 128 (S21-11: the generic
            // loop issued ~200 instructions per key a warp at group 4; S22-1:
            // 2B4T's ctx-2048 scores 5.4 -> 4.4 us a layer, decode +1.7%).
            // MG_SCORES_PAD4: groups of 1 or 2 (the split items of short
            // contexts, tiny's 2) through the same loop, as 4 heads: rows past
            // the group are computed and never read (heads never mix in the
            // reduction), so no second instantiation adds registers.
            if (hd <= 128 && (group == 4 || (MG_SCORES_PAD4 && group < 4)))
                mg_scores_g<KV, 4>(qs, ks, nj, hd, ac, sc);
            else
                mg_scores(qs, ks, nj, hd, group, ac, sc);
        }
        __syncthreads();
        if (item == blockIdx.x) mg_mark(trace, tb + 21);
        if (warp < group) mg_softmax_row(sc + warp * ac, nj, ml + 2 * warp);
        if (item == blockIdx.x) mg_mark(trace, tb + 22);
        cp_async_wait();  // the V rows
        __syncthreads();
#if MG_TAGGED >= 2
        if (newkey) {
            if (tid < hd) kv_store((staged ? (KV*)vdst : (KV*)vb) + (size_t)(nj - 1) * hd + tid, vnew);
            __syncthreads();
        }
#endif
        if (!gu_issued) {
            mg_issue(gu);
            gu_issued = true;
        }
        if (item == blockIdx.x) mg_mark(trace, tb + 5);
        const KV* vsm = (const KV*)vdst;
        // PV: `split` adjacent lanes share an output, each taking every
        // split-th key, summed by shuffles (a 512-output group would leave
        // half of 1024 threads idle otherwise).
        int split = 1;
        while (split < 8 && group * hd * split * 2 <= MG_THREADS) split *= 2;
        if ((group * hd * split) % 32 != 0) split = 1;  // whole warps only (the shuffles)
        const int part_i = tid & (split - 1);
        for (int o = tid / split; o < group * hd; o += MG_THREADS / split) {
            const int g = o / hd, d = o - g * hd, h = vh * group + g;
            float a = 0.f;
            if (staged)
#pragma unroll 4
                for (int j = part_i; j < nj; j += split) a += sc[g * ac + j] * kv_load(vsm + (size_t)j * hd + d);
            else
                for (int j = part_i; j < nj; j += split) a += sc[g * ac + j] * ldcg_kv(vb + (size_t)j * hd + d);
            for (int m = 1; m < split; m *= 2) a += __shfl_xor_sync(0xffffffffu, a, m);
            if (part_i != 0) continue;
            if (nch == 1) mg_put(attn + h * hd + d, a / ml[2 * g + 1], tag);
            else part[((size_t)vh * nsplit + ch) * mg_opaque(group * (int)pst) + g * pst + 2 + d] = a;
        }
        if (item == blockIdx.x) mg_mark(trace, tb + 6);
        if (nch == 1) continue;
        if (tid < group) {
            float* p = part + ((size_t)vh * nsplit + ch) * mg_opaque(group * (int)pst) + tid * pst;
            p[0] = ml[2 * tid];
            p[1] = ml[2 * tid + 1];
        }
        // Publish; the blocks finishing this KV head's last chunks merge. One
        // thread fences around the counter, after and before a block barrier
        // (as a grid sync does): the barrier orders the block's partial
        // writes before the fence, and the merge's reads after it.
        // MG_MERGE_SPLIT: the last nm blocks to count (nm a power of two
        // dividing the group, at most nch) merge group / nm heads each;
        // all but the last wait for the count to reach nch (they would wait
        // at the grid barrier anyway). The counts are reset by block 0
        // after the grid barrier that ends the attention (mega_body).
        // Else the last block merges every head and resets the count.
        // From opaque copies: computed here, not hoisted out of the layer
        // loop (live across the quantisation, it spilled).
        int nm = 1;
        const int grp = mg_opaque(group), nc = mg_opaque(nch);
        if (MG_MERGE_SPLIT && (grp & (grp - 1)) == 0)
            while (nm < grp && 2 * nm <= nc) nm *= 2;
        __syncthreads();
        if (tid == 0) {
            if (MG_TRACE_MERGE && trace) mt[1] = clock64();
            unsigned old;
#if MG_CNT_ACQREL
            // One acquire-release atomic: its release orders the block's
            // partial writes (before the block barrier) ahead of the count,
            // its acquire the merge's reads after it. The reset is ordered
            // before the next layer's counts by the grid barriers between.
            asm volatile("atom.add.acq_rel.gpu.u32 %0, [%1], 1;" : "=r"(old) : "l"(cnt + vh) : "memory");
#else
            __threadfence();
            old = atomicAdd(cnt + vh, 1);
            __threadfence();
#endif
            // MG_TAGGED: the counts go on from layer to layer (cbase: nch
            // per layer before this one), reset after the launch's last layer.
            const unsigned target = (MG_TAGGED ? cbase : 0u) + (unsigned)nch;
            const int k = (int)(target - 1u - old);  // 0: the last to count
            last = k < nm ? k : -1;
            if (!MG_TAGGED && !MG_MERGE_SPLIT && k == 0) cnt[vh] = 0;
            if (MG_MERGE_SPLIT && k > 0 && k < nm) {
                unsigned v;
                do {
                    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(cnt + vh) : "memory");
                } while (v < target);
            }
            if (MG_TRACE_MERGE && trace) mt[2] = clock64();
        }
        __syncthreads();
        const int mk = last;  // this block's heads: mk, mk + nm, ...
        if (mk < 0) continue;
        // Merge in parallel: every chunk's (max, sum) first, then per head the
        // weights e^(m_c - M) and the denominator, then the weighted outputs.
        float* mw = sc;          // [group][nch]: m, then the weight
        float* lw = sc + 512;    // [group][nch]: l
        // The partials of KV head vh lie chunk-major (entry (c, g) at pb +
        // (c * group + g) * pst), so that the merge's are one contiguous
        // range: MG_MERGE_STAGE copies it into vstage (the V rows are used
        // up) by one round of 16-byte cp.async, where the loads below take
        // five L2 round trips in a row; mg_kv reads either memory. sm_90 only:
        // before, cp_async_wait would wait for the gate/up weights too.
        const int cs = mg_opaque(group * (int)pst);  // a chunk's floats
        const float* pb = part + (size_t)vh * nsplit * cs;
#if MG_MERGE_STAGE && __CUDA_ARCH__ >= 900
        {
            const int bytes = nch * cs * 4;
            // part is 256-byte aligned (cudaMalloc): pb is 16-byte aligned where cs is a multiple of 4.
            if (bytes <= vstage_bytes && (cs & 3) == 0) {
                uint4* st = mg_opaque(vstage);
                mg_stage(pb, bytes, st);
                cp_commit();
                cp_async_wait();
                __syncthreads();
                pb = (const float*)st;
            }
        }
#endif
        if (MG_TRACE_MERGE && trace && tid == 0) mt[3] = clock64();
        // MG_MERGE_PLAIN: the partials (staged, or in global memory) read
        // by weak loads. That is enough in the memory model: the writers'
        // stores precede their block barrier and release; this block's
        // thread 0 acquired the count (or fenced after it) and a block
        // barrier follows, so every thread's later loads observe them (the
        // acquire also discards this SM's stale L1 lines). Else mg_kv's
        // strong generic loads. The staged merge took ~3 us a layer at ctx
        // 2048 with either (MG_TRACE_MERGE, S23-5 / S23-6): its time is the
        // per-block code, hence MG_MERGE_SPLIT.
        {
            auto ld = [](const float* p) { return MG_MERGE_PLAIN ? mg_ld_weak(p) : mg_kv(p); };
            for (int i = tid; i < group * nch; i += MG_THREADS) {
                const int g = i / nch, c = i - g * nch;
                const float* p = pb + c * cs + g * (int)pst;
                mw[i] = ld(p);
                lw[i] = ld(p + 1);
            }
            __syncthreads();
            if (MG_TRACE_MERGE && trace && tid == 0) mt[4] = clock64();
            if (warp < group && (warp & (nm - 1)) == mk)
                mg_merge_row(mw + warp * nch, lw + warp * nch, nch, ml + 2 * warp + 1);
            __syncthreads();
            if (MG_TRACE_MERGE && trace && tid == 0) mt[5] = clock64();
            // `ms` adjacent lanes share an output, each summing every ms-th
            // chunk, combined by shuffles: a 512-output group left half of the
            // threads idle, and each output's 26 partial loads at ctx 2048 ran
            // four at a time (S11-3: ctx 2048 676-677 -> 708-709 tok/s).
            const int outs = group / nm * hd;  // this block's outputs
            int ms = 1;
            while (ms < 8 && outs * ms * 2 <= MG_THREADS) ms *= 2;
            if ((outs * ms) % 32 != 0) ms = 1;
            const int mi = tid & (ms - 1);
            for (int o = tid / ms; o < outs; o += MG_THREADS / ms) {
                const int gi = o / hd, d = o - gi * hd, g = mk + gi * nm, h = vh * group + g;
                const float* ph = pb + g * (int)pst + 2 + d;
                float num = 0.f;
#if MG_THREADS <= 512
#pragma unroll 8  // ms = 1 at 512 threads: 26 partials a thread at ctx 2048
#else
#pragma unroll 4
#endif
                for (int c = mi; c < nch; c += ms) num += ld(ph + c * cs) * mw[g * nch + c];
                for (int m = 1; m < ms; m *= 2) num += __shfl_xor_sync(0xffffffffu, num, m);
                if (mi == 0) mg_put(attn + h * hd + d, num / ml[2 * g + 1], tag);
            }
        }
        // Marks 24-29 (bench only, MG_TRACE_MERGE builds): the merging block
        // of virtual head 0, in its own clock: its item (staging issued to P
        // V done), the counter, the partials' staging, the (m, l) loads, the
        // weights and denominators, the outputs (thread 0's).
        if (MG_TRACE_MERGE && trace && tid == 0 && vh == 0 && mk == 0) {
            u64* tr = mg_opaque(trace) + mg_opaque(tb);
            tr[24] = mt[1] - mt[0];
            tr[25] = mt[2] - mt[1];
            tr[26] = mt[3] - mt[2];
            tr[27] = mt[4] - mt[3];
            tr[28] = mt[5] - mt[4];
            tr[29] = clock64() - mt[5];
        }
    }
    if (!gu_issued) {
        // See MG_GU_HOLD_1K.
        const int dly = (flags & MG_GU_HOLD_1K ? 1000 : 0) + (flags & MG_GU_HOLD_2K ? 2000 : 0) +
                        (flags & MG_GU_HOLD_4K ? 4000 : 0);
        if (dly) {
            const long long t0 = clock64();
            while (clock64() - t0 < dly) {
            }
        }
        mg_issue(gu);
    }
    __syncthreads();  // qs / sc reuse by the next layer's attention
}

// A matrix phase up to its dot: norm + quantise the input (nw: the norm
// weight, or null), start the next phase's copy, wait for this phase's
// weights (buf, on bar with parity ph), dot the block's rows into acc_s.
// Returns sx. Marks `mark + 1` after the quantisation, `mark + 2` after the
// dot.
// `issue_next()` starts the next phase's copy after the quantisation: built
// there (from the layer table in shared memory), its addresses are not live
// across mg_quant (with NVRTC 13.0 they were, and the kernel spilled).
// Issued before the quantisation instead, while the block waits for its
// tagged input, it was slower (S31-5: 1176 / 955 against 1229 / 992 tok/s;
// the copy's bytes queue ahead of the input's loads, as in MG_GU_HOLD_1K).
// Issued after the dot by the last warp (the row scales where they are), it
// was slower too (S32-1: 1169 / 974 against 1217 / 1009 tok/s): the weights
// then land late for the next phase.
// P: the phase (0 QKV, 2 O, 3 gate/up, 4 down; `mark` is layer start + 4 P).
template <int P, typename IssueNext, typename IN>
__device__ __forceinline__ float mg_phase(int chunks, MgRows r, const uint4* buf, u64* bar, unsigned& ph,
                                       IssueNext issue_next, const IN* in, unsigned tag, int n, const float* nw,
                                       float eps, i8* xq, float* red, int* xsum_s, int* acc_s, u64* trace,
                                       int mark) {
    if (threadIdx.x < MG_MAXROWS) acc_s[threadIdx.x] = 0;
    // A block without rows here reads none of the input (MG_TAGGED 2: see there).
    const float sx = mg_quant(in, tag, n, nw, eps, chunks * 64, xq, red, xsum_s, MG_TAGGED < 2 || r.n > 0);
    mg_mark(trace, mark + 1);
    issue_next();
    mbar_wait(bar, ph);  // this phase's weights (a no-op before sm_90: cp.async, waited at the barrier)
    ph ^= 1;
    // Marks 24 + phase (trace builds without MG_TRACE_MERGE): the weights landed.
    if (!MG_TRACE_MERGE) mg_mark(trace, mark - 3 * P + 24);
    mg_dot(chunks, r, buf, xq, acc_s);
    mg_mark(trace, mark + 2);
    return sx;
}

// Layer table entries (u64 device addresses), MG_LT per layer.
#define LT_QKV 0
#define LT_QKV_S 1
#define LT_O 2
#define LT_O_S 3
#define LT_GU 4
#define LT_GU_S 5
#define LT_DN 6
#define LT_DN_S 7
#define LT_ATTN_NORM 8
#define LT_ATTN_SUB 9
#define LT_FFN_NORM 10
#define LT_FFN_SUB 11

// Copy schedule (one cp.async group per phase's weights + row scales):
//   QKV phase issues O -> wb1;  attention issues GU -> wb0 (its V rows go to
//   vbuf), and GU stays in flight through the O phase (its barrier waits for
//   all but the newest group); GU issues DN -> wb1; DN issues QKV(l+1) -> wb0.
// Why: gate/up is the largest matrix (67 KB per block on 2B4T): issued in
// the O phase it could not land before O's barrier.
template <typename KV>
__device__ void mega_body(const u64* lt, int n_layers, int H, int Q, int KVD, int F, int hd, int n_heads, int n_kv,
                          int gate, float eps, float att_scale, const int* pos_p, const float2* rope, KV* kc0, KV* vc0,
                          int layer_elems, int cap, float* x, float* qr, float* attn, float* hb, float* part,
                          int nsplit, int* cnt, unsigned* bar, u64* trace, int w0_chunks, int w1_chunks, int vbytes,
                          int flags, u64* tg, const unsigned* gen) {
    // Dynamic shared memory: weight buffers wb0 (QKV, GU) and wb1 (O, DN),
    // the int8 activations (MG_XBYTES), then the attention's V staging.
    extern __shared__ __align__(16) uint4 wdyn[];
    uint4* wb0 = wdyn;
    uint4* wb1 = wdyn + w0_chunks;
    i8* xq = (i8*)(wdyn + w0_chunks + w1_chunks);
    uint4* vbuf = (uint4*)(xq + MG_XBYTES);
    // q and scores in attention.
    __shared__ __align__(16) float big[MG_QMAX + MG_GMAX * MG_ACMAX];
    __shared__ int acc_s[MG_MAXROWS];
    __shared__ float scs2[2][MG_MAXROWS];  // row scales: QKV, GU in [0]; O, DN in [1]
    __shared__ float2 rope_s[MG_QMAX / 8];
    __shared__ float red[64];
    __shared__ float ml[2 * MG_GMAX];
    __shared__ int xsum_s[MG_THREADS / 32];
    __shared__ __align__(8) u64 mbar[2];  // bulk weight copies into wb0, wb1
    __shared__ __align__(16) u64 lts[2][MG_LT];  // layer table ring (mg_lt_copy)
    unsigned ph0 = 0, ph1 = 0;            // their mbarrier phases
    float* qs = big;
    float* sc = big + MG_QMAX;
    pdl_wait();  // mega_begin's token, position, x and zeroed barrier
    const int tid = threadIdx.x, pos = pos_p[0], half = hd / 2;
    // Layer l's tag is tag0_s + l (MG_TAGGED; mega_begin counts the steps).
    __shared__ unsigned tag0_s;
    if (tid == 0) {
        tag0_s = MG_TAGGED ? *gen * (unsigned)n_layers : 0u;
        mg_flags_s = flags;
    }
    const int cH = (H + 63) / 64, cQ = (Q + 63) / 64, cF = (F + 63) / 64;
    const MgRows r_qkv = mg_rows(Q + 2 * KVD, 1), r_o = mg_rows(H, 0), r_gu = mg_rows_paired(F), r_dn = mg_rows(H, 0);
    unsigned epoch = 0;
    float sx;
    const bool ef = flags & MG_EVICT_FIRST;
#define W_(l, e) ((const uint4*)lts[(l) & 1][e])
#define F_(l, e) ((const float*)lts[(l) & 1][e])
    // The attention's key chunks: the position is fixed for the launch.
    const int n_keys = pos + 1, per_head = max(1, (int)gridDim.x / n_kv);
    const int att_ac = min(MG_ACMAX, max(64, (n_keys + per_head - 1) / per_head));
    const int att_nch = (n_keys + att_ac - 1) / att_ac;  // <= nsplit; group * nch <= 512 (host)
    __shared__ int att_sub_log;  // MG_HEAD_SPLIT: log2 of the items per KV head and chunk
    if (tid == 0) {
        int sl = 0;
        const int group = n_heads / n_kv;
        if (flags & MG_HEAD_SPLIT)
            while (group % (2 << sl) == 0 && (n_kv * att_nch << (sl + 1)) <= (int)gridDim.x) sl++;
        att_sub_log = sl;
    }
    // After the grid barrier, one block barrier: the other threads wait for
    // their copies (WAIT) while thread 0 spins (S21-3: +0.6% at ctx 0).
#define SYNC_(WAIT)                         \
    mg_grid_sync<false>(bar, epoch, flags); \
    WAIT;                                   \
    __syncthreads();
    // Between the phases whose inputs are tagged: the block's own copies.
#if MG_TAGGED
#define TSYNC_(WAIT) \
    WAIT;            \
    __syncthreads();
// q rows by layer parity: the next layer's QKV phase may write them while
// a slower block still reads this layer's (no grid barrier between).
#define QR_(l) (mg_opaque(qr) + (size_t)((l) & 1) * Q)
#define XA_ (mg_opaque(tg))
#define XB_ (mg_opaque(tg) + H)
#define ATT_ (mg_opaque(tg) + 2 * H)
#define HB_ (mg_opaque(tg) + 2 * H + Q)
#define QKT_ (mg_opaque(tg) + 2 * H + Q + F)
#else
#define TSYNC_(WAIT) SYNC_(WAIT)
#define QR_(l) qr
#define XA_ x
#define XB_ x
#define ATT_ attn
#define HB_ hb
#define QKT_ ((u64*)nullptr)
#endif
    // After the QKV phase: a grid barrier, but for MG_TAGGED 2.
#if MG_TAGGED >= 2
#define QSYNC_(WAIT) TSYNC_(WAIT)
#else
#define QSYNC_(WAIT) SYNC_(WAIT)
#endif
    // MG_KVPF: the block's first attention item's K and V rows of layer ll
    // into L2 (thread 0). Its element offset in a layer and its bytes are
    // found once (a per-call loop over the items spilled registers).
    __shared__ long long pf_off;
    __shared__ unsigned pf_bytes;
    if (MG_KVPF && tid == 0) {
        const int item = blockIdx.x, j0 = (item % att_nch) * att_ac;
        const bool any = item < (n_kv << att_sub_log) * att_nch;
        pf_off = any ? ((long long)((item / att_nch) >> att_sub_log) * cap + j0) * hd : 0;
        pf_bytes = any ? (unsigned)(min(att_ac, n_keys - j0) * hd * sizeof(KV)) : 0u;
    }
    auto prefetch_kv = [&](int ll) {
        if (tid != 0 || pf_bytes == 0) return;
        const size_t off = (size_t)ll * layer_elems + pf_off;
        mg_prefetch_l2(kc0 + off, pf_bytes);
        mg_prefetch_l2(vc0 + off, pf_bytes);
    };
    if (tid == 0) {
        mbar_init(&mbar[0]);
        mbar_init(&mbar[1]);
    }
    __syncthreads();
    mg_issue(MgNext{(const uint4*)lt[LT_QKV], cH, r_qkv, wb0, &mbar[0], (const float*)lt[LT_QKV_S], scs2[0], ef});
    mg_lt_copy(lt, 0, lts);
    if (n_layers > 1) mg_lt_copy(lt, 1, lts);
    for (int i = tid; i < half; i += MG_THREADS) rope_s[i] = rope[(size_t)pos * half + i];
    // MG_SCORES_PAD4 reads q rows past the group (the group is fixed for the
    // launch, so they are never written): zero, not uninitialised.
    if (MG_SCORES_PAD4)
        for (int i = tid; i < MG_QMAX; i += MG_THREADS) qs[i] = 0.f;
    cp_async_wait();
    __syncthreads();
    for (int l = 0; l < n_layers; l++) {
        KV* kc = kc0 + (size_t)l * layer_elems;
        KV* vc = vc0 + (size_t)l * layer_elems;
        const int tb = l * MG_TRACE;
        if (l == n_layers - 1) pdl_launch();  // let the lm_head start loading
        // ---- QKV + RoPE + KV write
        mg_mark(trace, tb + 0);
        if (MG_KVPF == 1 || (MG_KVPF == 3 && l == 0)) prefetch_kv(l);
        // Layer l + 1's table into the ring slot layer l - 1 used (read by
        // this layer's down phase, three barriers on).
        if (l >= 1 && l + 1 < n_layers) mg_lt_copy(lt, l + 1, lts);
        sx = mg_phase<0>(
            cH, r_qkv, wb0, &mbar[0], ph0,
            [&] {
                mg_issue(MgNext{W_(l, LT_O), cQ, r_o, wb1, &mbar[1], F_(l, LT_O_S), scs2[1], ef});
                if (MG_KVPF == 2) prefetch_kv(l);
            },
            XA_, tag0_s + l, H, F_(l, LT_ATTN_NORM), eps, xq, red, xsum_s, acc_s, trace, tb);
        if (tid < r_qkv.n) {
            const int row = r_qkv.a + tid;
            const int xs = mg_xsum(xsum_s);
            const float* scs = scs2[0];
            const float y = (float)(acc_s[tid] - xs) * (scs[tid] / sx);
            // The pair partner (rows 2j, 2j+1 stay in one block: rows per block are even).
            const float partner = (float)(acc_s[tid ^ 1] - xs) * (scs[tid ^ 1] / sx);
#if MG_TAGGED >= 2
            // The cache rows for the steps to come; q, k and v tagged for this
            // layer's attention items.
            const QkvOut o = qkv_rope_out(row, y, partner, rope_s, n_heads, n_kv, hd);
            if (o.kind) kv_store((o.kind == 1 ? kc : vc) + ((size_t)o.h * cap + pos) * hd + o.d, o.v);
            mg_put(QKT_ + (o.kind ? Q + (o.kind - 1) * KVD : 0) + o.h * hd + o.d, o.v, tag0_s + l);
#else
            qkv_rope_store(row, y, partner, pos, rope_s, n_heads, n_kv, hd, cap, QR_(l), kc, vc);
#endif
        }
        mg_mark(trace, tb + 3);
        QSYNC_(cp_async_wait());
        // ---- attention; the gate/up copy starts here
        mg_mark(trace, tb + 4);
        {
            const MgNext gu{W_(l, LT_GU), cH, r_gu, wb0, &mbar[0], F_(l, LT_GU_S), scs2[0], ef};
            mg_attention<KV>(QR_(l), kc, vc, pos, n_heads, n_kv << att_sub_log, hd, cap, att_scale, nsplit, part, cnt,
                             ATT_, tag0_s + l, qs, sc, ml, vbuf, vbytes, wb0, w0_chunks * 16, gu, trace, tb, att_ac, att_nch, flags,
                             att_sub_log, QKT_, (unsigned)(l * att_nch));
        }
        if (MG_KVPF == 3 && l + 1 < n_layers) prefetch_kv(l + 1);
        mg_mark(trace, tb + 7);
        TSYNC_(cp_wait_group<1>());  // all but the gate/up group (its row scales; sm_80: and weights)
        // ---- O + residual
        mg_mark(trace, tb + 8);
        // MG_MERGE_SPLIT: the attention's chunk counts back to zero, every
        // merging block past its wait (the grid barrier above); ordered
        // before the next layer's counts (and the next launch) by the
        // barriers between.
        // MG_TAGGED: they count on over the layers; block 0 resets them after
        // the last layer's attention, once its quantisation has seen the
        // whole attention output (every merge is past its wait).
        if (!MG_TAGGED && MG_MERGE_SPLIT && blockIdx.x == 0 && tid < mg_opaque(n_kv << att_sub_log))
            mg_opaque(cnt)[tid] = 0;
        {
            // The residual rows this block adds to: loaded now, used after the dot.
            const float xres = tid < r_o.n ? mg_own(XA_ + r_o.a + tid) : 0.f;
            sx = mg_phase<2>(cQ, r_o, wb1, &mbar[1], ph1, [] {}, ATT_, tag0_s + l, Q, F_(l, LT_ATTN_SUB), eps, xq, red,
                          xsum_s, acc_s, trace, tb + 8);
            if (MG_TAGGED && l == n_layers - 1 && blockIdx.x == 0 && tid < mg_opaque(n_kv << att_sub_log))
                mg_opaque(cnt)[tid] = 0;
            if (tid < r_o.n)
                mg_put(XB_ + r_o.a + tid, xres + (float)(acc_s[tid] - mg_xsum(xsum_s)) * (scs2[1][tid] / sx),
                       tag0_s + l);
        }
        mg_mark(trace, tb + 11);
        TSYNC_(cp_async_wait());
        // ---- gate/up + activation
        mg_mark(trace, tb + 12);
        sx = mg_phase<3>(
            cH, r_gu, wb0, &mbar[0], ph0,
            [&] { mg_issue(MgNext{W_(l, LT_DN), cF, r_dn, wb1, &mbar[1], F_(l, LT_DN_S), scs2[1], ef}); }, XB_,
            tag0_s + l, H, F_(l, LT_FFN_NORM), eps, xq, red, xsum_s, acc_s, trace, tb + 12);
        if (tid < r_gu.n) {
            const float* scs = scs2[0];
            const int row = r_gu.a + tid;
            float g = (float)(acc_s[tid] - mg_xsum(xsum_s)) * (scs[tid] / sx);
            const float u = (float)(acc_s[tid + r_gu.n] - mg_xsum(xsum_s)) * (scs[tid + r_gu.n] / sx);
            if (gate == 1) {
                g = fmaxf(g, 0.f);
                mg_put(HB_ + row, g * g * u, tag0_s + l);
            } else {
                mg_put(HB_ + row, g / (1.f + expf(-g)) * u, tag0_s + l);
            }
        }
        mg_mark(trace, tb + 15);
        TSYNC_(cp_async_wait());
        // ---- down + residual
        mg_mark(trace, tb + 16);
        {
            const bool more = l + 1 < n_layers;
            const float xres = tid < r_dn.n ? mg_own(XB_ + r_dn.a + tid) : 0.f;
            sx = mg_phase<4>(
                cF, r_dn, wb1, &mbar[1], ph1,
                [&] {
                    if (more)
                        mg_issue(MgNext{W_(l + 1, LT_QKV), cH, r_qkv, wb0, &mbar[0], F_(l + 1, LT_QKV_S), scs2[0], ef});
                },
                HB_, tag0_s + l, F, F_(l, LT_FFN_SUB), eps, xq, red, xsum_s, acc_s, trace, tb + 16);
            if (tid < r_dn.n) {
                // The last layer's x in plain floats, for the lm_head.
                const float y = xres + (float)(acc_s[tid] - mg_xsum(xsum_s)) * (scs2[1][tid] / sx);
                if (more)
                    mg_put(XA_ + r_dn.a + tid, y, tag0_s + l + 1);
                else
                    x[r_dn.a + tid] = y;
            }
        }
        mg_mark(trace, tb + 19);
        if (l + 1 < n_layers) {
            TSYNC_(cp_async_wait());
        }
    }
#undef W_
#undef F_
#undef SYNC_
#undef TSYNC_
#undef QR_
#undef XA_
#undef XB_
#undef ATT_
#undef HB_
#undef QKT_
#undef QSYNC_
}

#define MEGA(SUF, KV)                                                                                             \
    extern "C" __global__ void __launch_bounds__(MG_THREADS, 1)                                                  \
        mega_##SUF(const u64* lt, int n_layers, int H, int Q, int KVD, int F, int hd, int n_heads, int n_kv,     \
                   int gate, float eps, float att_scale, const int* pos_p, const float2* rope, KV* kc0, KV* vc0, \
                   int layer_elems, int cap, float* x, float* qr, float* attn, float* hb, float* part, int nsplit, \
                   int* cnt, unsigned* bar, u64* trace, int w0_chunks, int w1_chunks, int vbytes, int flags,    \
                   u64* tg, const unsigned* gen) {                                                               \
        mega_body<KV>(lt, n_layers, H, Q, KVD, F, hd, n_heads, n_kv, gate, eps, att_scale, pos_p, rope, kc0, vc0, \
                      layer_elems, cap, x, qr, attn, hb, part, nsplit, cnt, bar, trace, w0_chunks, w1_chunks,    \
                      vbytes, flags, tg, gen);                                                                   \
    }
MEGA(f16, u16)
MEGA(f32, float)

// Before the persistent kernel: the token's embedding row into x, the
// argmax slot and the barrier counter zeroed, and (screened pick graphs,
// else null) the pick's per-step slots: zeroed here rather than by a memset
// node, which would sit between the layers and pass 1 and cut its
// programmatic launch.
// A decode step's start, one block. A step fed by the host has its token
// and position written and `fed` set (decode_advance sets it too, where it
// ends a step); a step fed on the device takes the previous step's pick
// from `best` and the next position, as decode_advance would have left
// them (hist: the pick at the previous position). Then x = the token's
// embedding row, and the step's slots zeroed: the pick, the grid barrier,
// the screen's keys. It lets the persistent kernel launch at once (PDL),
// which waits for it before reading any of this.
// MG_TAGGED: the step count `gen` goes up by one, and x is also written
// tagged for layer 0 (tg, with n_layers: see mega_body).
extern "C" __global__ void mega_begin(int* tok, int* pos, int* fed, int* hist, int hist_len, const u16* emb,
                                      int hidden, float* x, u64* best, unsigned* bar, unsigned* screen_keys, u64* tg,
                                      unsigned* gen, int n_layers) {
    __shared__ int t_s;
    __shared__ unsigned tag_s;
    pdl_launch();
    if (threadIdx.x == 0) {
        int t;
        if (*fed) {
            t = *tok;
            *fed = 0;
        } else {
            const u64 k = *best;
            t = k == 0 ? 0 : (int)~(unsigned)k;  // key 0: no finite logit (as the host reads it)
            const int p = *pos;
            hist[p % hist_len] = t;
            *tok = t;
            *pos = p + 1;
        }
        t_s = t;
        *best = 0;
        *bar = 0;
        const unsigned g = *gen + 1;
        *gen = g;
        tag_s = g * (unsigned)n_layers;
    }
    if (screen_keys && threadIdx.x < 4) screen_keys[threadIdx.x] = 0;
    __syncthreads();
    const u16* e = emb + (size_t)t_s * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const float v = h2f(e[i]);
        x[i] = v;
        if (MG_TAGGED) mg_put(tg + i, v, tag_s);
    }
}
