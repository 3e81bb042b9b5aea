#!/usr/bin/env python3
"""Lane-level emulation of flash.cu's tensor-core kernel (flash_tc_body), no GPU.

    python3 scripts/flash-tc-emu.py        # needs numpy

Implements ldmatrix (.trans) and mma.m16n8k16 fragment semantics as the PTX
ISA states them and copies the kernel's index math (ldmatrix lane offsets,
mask, online softmax, P fragments from S, epilogue) line by line, then
compares with an f64 reference. Keep it in step with flash.cu when the
kernel's fragment or tile math changes; it checks the index math, not the
hardware (mma here sums in f64).
"""
import numpy as np
f16 = np.float16
def ldsm4(flat, offs, trans):
    # offs[l]: element offset of the row lane l addresses (row l%8 of matrix l//8)
    regs = np.zeros((32, 4, 2), np.float32)
    for i in range(4):
        M = np.stack([flat[offs[8*i+r]: offs[8*i+r]+8] for r in range(8)]).astype(np.float32)
        for l in range(32):
            if trans: regs[l, i] = [M[2*(l%4)][l//4], M[2*(l%4)+1][l//4]]
            else: regs[l, i] = [M[l//4][2*(l%4)], M[l//4][2*(l%4)+1]]
    return regs
def mma(d, a, b0, b1):
    # d [32][4], a [32][4][2], b0/b1 [32][2]
    A = np.zeros((16,16)); B = np.zeros((16,8))
    for l in range(32):
        g, c = l//4, l%4
        A[g, 2*c:2*c+2] = a[l,0]; A[g+8, 2*c:2*c+2] = a[l,1]
        A[g, 2*c+8:2*c+10] = a[l,2]; A[g+8, 2*c+8:2*c+10] = a[l,3]
        B[2*c:2*c+2, g] = b0[l]; B[2*c+8:2*c+10, g] = b1[l]
    D = A @ B
    for l in range(32):
        g, c = l//4, l%4
        d[l,0] += D[g,2*c]; d[l,1] += D[g,2*c+1]; d[l,2] += D[g+8,2*c]; d[l,3] += D[g+8,2*c+1]
def pack(a, b): return np.array([f16(a), f16(b)], np.float32)
def pack_lo(a, b, h): return np.array([f16(np.float32(a)-h[0]), f16(np.float32(b)-h[1])], np.float32)

def store4(v, hi, lo, off, LO):
    h = v.astype(f16); hi[off:off+4] = h
    if LO: lo[off:off+4] = (v - h.astype(np.float32)).astype(f16)

def split_chunk(kmax, n_ks): return ((kmax + n_ks - 1)//n_ks + 63)//64*64
def fin(m): return np.where(m == -np.inf, 0.0, m)

def block(qr, q_stride, kc, vc, p0, nt, n_heads, n_kv, hd, cap, scale, out, out_stride, qt, h, HDMAX, SPLIT, KVF32,
          ksp=0, n_ks=1, part=None):
    KLO = SPLIT and KVF32; NT = HDMAX//8; TC_BQ = TC_BK = 64
    ld = hd + 8; tile = TC_BQ*ld
    Qh, Ql, Kh, Kl, Vh, Vl = [np.full(tile, np.nan, f16) for _ in range(6)]
    kvh = h // (n_heads // n_kv); t0 = qt*TC_BQ
    rows = min(TC_BQ, nt - t0); kmax = p0 + t0 + rows
    kchunk = split_chunk(kmax, n_ks); kbeg = ksp*kchunk; kend = min(kmax, kbeg + kchunk)
    if kbeg >= kmax: return
    kb = kc[kvh]; vb = vc[kvh]
    for idx in range(TC_BQ*(hd//4)):
        r = idx // (hd//4); d = (idx - r*(hd//4))*4
        v = np.zeros(4, np.float32)
        if r < rows: v = (qr[(t0+r), h*hd+d:h*hd+d+4] * np.float32(scale * 1.4426950408889634)).astype(np.float32)
        store4(v, Qh, Ql, r*ld+d, SPLIT)
    states = []
    for warp in range(4):
        lanes = np.arange(32); lm = lanes >> 3; lr = lanes & 7
        q_off = (16*warp + lr + 8*(lm & 1))*ld + 8*(lm >> 1)
        k_off = (lr + 8*(lm >> 1))*ld + 8*(lm & 1)
        v_off = (lr + 8*(lm & 1))*ld + 8*(lm >> 1)
        states.append(dict(q_off=q_off, k_off=k_off, v_off=v_off, o=np.zeros((32, NT, 4)),
            m0=np.full(32, -np.inf), m1=np.full(32, -np.inf), l0=np.zeros(32), l1=np.zeros(32)))
    j0 = kbeg
    while j0 < kend:
        for (base, hi, lo) in ((kb, Kh, Kl), (vb, Vh, Vl)):
            hi[:] = np.nan; lo[:] = np.nan
            for j in range(TC_BK):
                for d in range(0, hd, 4):
                    v = np.zeros(4, np.float32)
                    if j0 + j < kend: v = base[j0+j, d:d+4].astype(np.float32)
                    store4(v, hi, lo, j*ld+d, KLO)
        for warp in range(4):
            st = states[warp]
            wfirst = p0 + t0 + 16*warp; wlast = wfirst + 15
            active = 16*warp < rows
            if not (active and j0 <= wlast): continue
            s = np.zeros((32, 8, 4))
            for ks in range(HDMAX//16):
                if 16*ks >= hd: continue
                qh = ldsm4(Qh, st['q_off'] + 16*ks, False)
                ql = ldsm4(Ql, st['q_off'] + 16*ks, False) if SPLIT else None
                for np_ in range(4):
                    ko = st['k_off'] + 16*np_*ld + 16*ks
                    kh = ldsm4(Kh, ko, False)
                    sl = [s[:, 2*np_], s[:, 2*np_+1]]
                    if SPLIT:
                        mma(sl[0], ql, kh[:,0], kh[:,1]); mma(sl[1], ql, kh[:,2], kh[:,3])
                    if KLO:
                        kl = ldsm4(Kl, ko, False)
                        mma(sl[0], qh, kl[:,0], kl[:,1]); mma(sl[1], qh, kl[:,2], kl[:,3])
                    mma(sl[0], qh, kh[:,0], kh[:,1]); mma(sl[1], qh, kh[:,2], kh[:,3])
                    s[:, 2*np_] = sl[0]; s[:, 2*np_+1] = sl[1]
            for l in range(32):
                g, c = l//4, l%4
                r0 = 16*warp + g; pos0 = p0 + t0 + r0
                if j0 + TC_BK - 1 > wfirst:
                    for n in range(8):
                        for e in range(4):
                            if j0 + 8*n + 2*c + (e & 1) > pos0 + 8*(e >> 1): s[l, n, e] = -np.inf
            mx0 = np.max(s[:, :, 0:2].reshape(32, -1), axis=1); mx1 = np.max(s[:, :, 2:4].reshape(32, -1), axis=1)
            # quad reduce
            mx0 = np.repeat(mx0.reshape(8, 4).max(1), 4); mx1 = np.repeat(mx1.reshape(8, 4).max(1), 4)
            mn0 = np.maximum(st['m0'], mx0); mn1 = np.maximum(st['m1'], mx1)
            a0 = np.exp2(st['m0'] - fin(mn0)); a1 = np.exp2(st['m1'] - fin(mn1))
            st['m0'], st['m1'] = mn0, mn1
            s[:, :, 0:2] = np.exp2(s[:, :, 0:2] - fin(mn0)[:, None, None]); s[:, :, 2:4] = np.exp2(s[:, :, 2:4] - fin(mn1)[:, None, None])
            st['l0'] = st['l0']*a0 + s[:, :, 0:2].sum((1, 2)); st['l1'] = st['l1']*a1 + s[:, :, 2:4].sum((1, 2))
            o = st['o']; o[:, :, 0:2] *= a0[:, None, None]; o[:, :, 2:4] *= a1[:, None, None]
            for kk in range(4):
                ph = np.zeros((32, 4, 2), np.float32); pl = np.zeros((32, 4, 2), np.float32)
                for l in range(32):
                    ph[l,0] = pack(s[l,2*kk,0], s[l,2*kk,1]); ph[l,1] = pack(s[l,2*kk,2], s[l,2*kk,3])
                    ph[l,2] = pack(s[l,2*kk+1,0], s[l,2*kk+1,1]); ph[l,3] = pack(s[l,2*kk+1,2], s[l,2*kk+1,3])
                    if SPLIT:
                        pl[l,0] = pack_lo(s[l,2*kk,0], s[l,2*kk,1], ph[l,0]); pl[l,1] = pack_lo(s[l,2*kk,2], s[l,2*kk,3], ph[l,1])
                        pl[l,2] = pack_lo(s[l,2*kk+1,0], s[l,2*kk+1,1], ph[l,2]); pl[l,3] = pack_lo(s[l,2*kk+1,2], s[l,2*kk+1,3], ph[l,3])
                for dp in range(NT//2):
                    if 16*dp >= hd: continue
                    vo = st['v_off'] + 16*kk*ld + 16*dp
                    vh = ldsm4(Vh, vo, True)
                    oa, ob = o[:, 2*dp].copy(), o[:, 2*dp+1].copy()
                    if SPLIT: mma(oa, pl, vh[:,0], vh[:,1]); mma(ob, pl, vh[:,2], vh[:,3])
                    if KLO:
                        vl = ldsm4(Vl, vo, True)
                        mma(oa, ph, vl[:,0], vl[:,1]); mma(ob, ph, vl[:,2], vl[:,3])
                    mma(oa, ph, vh[:,0], vh[:,1]); mma(ob, ph, vh[:,2], vh[:,3])
                    o[:, 2*dp], o[:, 2*dp+1] = oa, ob
        j0 += TC_BK
    for warp in range(4):
        if not 16*warp < rows: continue
        st = states[warp]
        l0 = np.repeat(st['l0'].reshape(8,4).sum(1), 4); l1 = np.repeat(st['l1'].reshape(8,4).sum(1), 4)
        if n_ks > 1 and kchunk < kmax:
            for l in range(32):
                g, c = l//4, l%4; r0 = 16*warp + g
                for (r, m, ll, e) in ((r0, st['m0'][l], l0[l], 0), (r0 + 8, st['m1'][l], l1[l], 2)):
                    if r >= rows: continue
                    pp = part[t0 + r, h, ksp]
                    if c == 0: pp[0], pp[1] = m, ll
                    for n in range(NT):
                        if 8*n < hd: pp[2 + 8*n + 2*c: 4 + 8*n + 2*c] = st['o'][l, n, e:e+2]
            continue
        for l in range(32):
            g, c = l//4, l%4; r0 = 16*warp + g
            for n in range(NT):
                if 8*n >= hd: continue
                if r0 < rows: out[t0+r0, h*hd + 8*n + 2*c: h*hd + 8*n + 2*c + 2] = st['o'][l, n, 0:2] / l0[l]
                if r0 + 8 < rows: out[t0+r0+8, h*hd + 8*n + 2*c: h*hd + 8*n + 2*c + 2] = st['o'][l, n, 2:4] / l1[l]

def merge(part, p0, nt, n_heads, hd, n_ks, out):
    for t in range(nt):
        t0 = t//64*64; kmax = p0 + t0 + min(64, nt - t0)
        kchunk = split_chunk(kmax, n_ks); used = (kmax + kchunk - 1)//kchunk
        if used == 1: continue
        for h in range(n_heads):
            b = part[t, h]
            m = max(b[s, 0] for s in range(used))
            l = sum(b[s, 1]*np.exp2(b[s, 0] - m) for s in range(used))
            out[t, h*hd:(h+1)*hd] = sum(b[s, 2:2+hd]*np.exp2(b[s, 0] - m) for s in range(used)) / l

def run(hd, n_heads, n_kv, nt, p0, HDMAX, SPLIT, KVF32, seed=1, n_ks=1):
    rng = np.random.default_rng(seed); cap = p0 + nt + 10
    q = rng.uniform(-1, 1, (nt, n_heads*hd)).astype(np.float32)
    k = rng.uniform(-3, 3, (n_kv, cap, hd)).astype(np.float32); v = rng.uniform(-2, 2, (n_kv, cap, hd)).astype(np.float32)
    k[:, p0+nt:] = np.nan; v[:, p0+nt:] = np.nan
    if not KVF32: k = k.astype(f16).astype(np.float32); v = v.astype(f16).astype(np.float32)
    scale = 1/np.sqrt(hd)
    out = np.full((nt, n_heads*hd), np.nan)
    part = np.full((nt, n_heads, n_ks, hd + 2), np.nan)
    for qt in range((nt+63)//64):
        for h in range(n_heads):
            for ksp in range(n_ks):
                block(q, n_heads*hd, k, v, p0, nt, n_heads, n_kv, hd, cap, scale, out, n_heads*hd, qt, h, HDMAX, SPLIT,
                      KVF32, ksp, n_ks, part)
    if n_ks > 1: merge(part, p0, nt, n_heads, hd, n_ks, out)
    want = np.zeros_like(out)
    for t in range(nt):
        for h in range(n_heads):
            kvh = h // (n_heads//n_kv)
            sc = (k[kvh, :p0+t+1].astype(np.float64) @ q[t, h*hd:(h+1)*hd].astype(np.float64)) * scale
            e = np.exp(sc - sc.max()); want[t, h*hd:(h+1)*hd] = (e @ v[kvh, :p0+t+1].astype(np.float64)) / e.sum()
    err = np.abs(out - want) / (1 + np.abs(want))
    return np.nanmax(err) if not np.isnan(out).any() else float('nan')

if __name__ == '__main__':
    # (hd, heads, kv heads, nt, p0, HDMAX, split, f32 cache) -> max |err| / (1 + |want|)
    worst = 0.0
    for case in [(64, 2, 1, 70, 37, 128, True, True), (64, 2, 1, 70, 37, 128, False, True),
                 (32, 2, 2, 20, 0, 128, True, False), (48, 1, 1, 65, 64, 64, True, True),
                 (128, 8, 2, 100, 37, 128, True, True), (128, 4, 1, 70, 0, 256, True, False),
                 # key splits (last field): rows wholly masked in a split, empty splits, one split in use
                 (32, 2, 1, 16, 200, 128, True, True, 1, 3), (32, 2, 1, 5, 130, 128, True, False, 1, 9),
                 (32, 2, 1, 70, 60, 128, True, True, 1, 2), (32, 1, 1, 5, 0, 128, True, True, 1, 4)]:
        e = run(*case)
        print(case, f"{e:.2e}")
        tol = 1e-6 if case[6] else 1e-2
        assert e <= tol, (case, e)
    print("ok")
