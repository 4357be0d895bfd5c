"""The forward of short calls: decoding steps and tiny heads (issue 14's per-call fixed cost).

A call of (1, 1, 8, 8, 16) computes for ~2.5 us; launched the general way it cost ~40 us more:
numpy views of four tensors (~1.9 us each), the two records typed and unboxed (KernelMask's ~20
arrays ~2.1 us, KernelOpts ~0.6 us), five torch allocations -- and the tile kernels' set-up per task.
:func:`fwd_small` takes the tensors as addresses and sizes and computes row by row, without tiles.

Only the forward of a call without mask or with a plain causal mask, no statistics, float32 or
bfloat16, contiguous inputs: ``selfattn.backends.cpu.fast_forward`` decides and falls back otherwise.
A unit of work is a run of query heads that share one kv head (the whole group: each key and value is
read once for all of them); float32 calls of serving size (decoding over long caches) run on several
threads (``backends.cpu._on_threads``), each taking its next unit from a shared counter. A decoding step
under a boolean mask comes from the general path (``backends.cpu._masked_rows``) to ``fwd_small_masked``.

numba keys a cached function on its own source file only, and these functions compile cpu_flash's
exp2 into themselves: their cache stamps include that file (``kernels.stamp_sources``), so an edit there is
never run stale from here.
"""

from __future__ import annotations

import numpy as np
from numba import carray, njit, types
from numba.core import config as numba_config
from numba.extending import intrinsic

from selfattn.kernels import cpu_flash as _k
from selfattn.kernels import cpu_fwd as _fwd
from selfattn.kernels import numba_cache_dir, stamp_sources

_CACHE_DIR, _NUMBA_CACHE_DIR = numba_cache_dir(), numba_config.CACHE_DIR
if _CACHE_DIR is not None:
    numba_config.CACHE_DIR = _CACHE_DIR


def _pointer_at(nbtype):
    # an intrinsic: the `nbtype` pointer at an integer address (a torch tensor's data_ptr())
    ptr = types.CPointer(nbtype)

    @intrinsic
    def at(typingctx, addr):
        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(ptr))

        return ptr(types.intp), codegen

    return at


def _prefetch_to(locality):
    # an intrinsic: a hint to bring the cache line at an integer address closer (locality 3: toward L1,
    # prefetcht0; 2: toward L2, prefetcht1); never faults, also past an array's end
    @intrinsic
    def prefetch(typingctx, addr):
        def codegen(context, builder, signature, args):
            _k._prefetch(builder, args[0], locality)
            return context.get_dummy_value()

        return types.void(types.intp), codegen

    return prefetch


_prefetch_l1 = _prefetch_to(3)
PV_COLS = 4 * _k.VEC_BYTES // 4  # columns of P V one _pv_chunk computes: four vectors of float32


@intrinsic
def _pv_chunk(typingctx, pp, pv, n, sv, ncols, pout):
    # out[:ncols] = sum over j < n of p[j] * v[j * sv : j * sv + ncols], float32 at raw addresses
    # (ncols <= PV_COLS): four vector accumulators in registers, one FMA per key and lane in key order
    # (cpu_flash's one-row micro-kernel computes the same; this is its STORE case alone, which compiles
    # in a fraction of the time)
    sig = types.void(types.intp, types.intp, types.intp, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        pp, pv, n, sv, ncols, pout = args
        vec = _k._Vectors(context, builder, types.float32)
        width, c = vec.width, vec.const
        masks = [vec.lanes_below(builder.sub(ncols, c(u * width))) for u in range(4)]
        entry = builder.block
        loop = builder.append_basic_block("pv.loop")
        done = builder.append_basic_block("pv.done")
        builder.cbranch(builder.icmp_signed(">", n, c(0)), loop, done)
        # -- acc[u] += p[kk] * v[kk, u-th vector], kk = 0 .. n-1 --
        builder.position_at_end(loop)
        kk = builder.phi(vec.i64)
        accs = [builder.phi(vec.vty) for _ in range(4)]
        a = vec.splat(builder.load(vec.at(pp, kk, vec.sptr)))
        row = builder.mul(kk, sv)
        vrow = [vec.load(pv, builder.add(row, c(u * width)), masks[u]) for u in range(4)]
        new = [builder.call(vec.fma, [a, vrow[u], accs[u]]) for u in range(4)]
        nxt = builder.add(kk, c(1))
        kk.add_incoming(c(0), entry)
        kk.add_incoming(nxt, loop)
        for u in range(4):
            accs[u].add_incoming(vec.zero, entry)
            accs[u].add_incoming(new[u], loop)
        builder.cbranch(builder.icmp_signed("<", nxt, n), loop, done)
        # -- store the sums --
        builder.position_at_end(done)
        totals = [builder.phi(vec.vty) for _ in range(4)]
        for u in range(4):
            totals[u].add_incoming(vec.zero, entry)
            totals[u].add_incoming(new[u], loop)
        for u in range(4):
            vec.store(totals[u], pout, c(u * width), masks[u])
        return context.get_dummy_value()

    return sig, codegen
_u16_at = _pointer_at(types.uint16)  # a bfloat16 tensor's bits
_f32_at = _pointer_at(types.float32)
_u8_at = _pointer_at(types.uint8)  # a bool tensor's bytes


@njit(fastmath=_k.FASTMATH, cache=True, nogil=True)
def fwd_small(pq, pk, pv, pout, B, Hq, Hkv, Lq, Lk, D, Dv, causal, scale, per, taken):
    """The output of a small call (decoding: a few query rows), one row at a time, without the tile
    machinery: each task of the general kernels allocates a dozen tile-sized buffers and runs per key
    block several helpers built for 64 x 64 tiles, ~4 us per task and ~2 us per key block for one row
    (measured, 1 thread: (1, 4, 1, 128, 64) 21 us in cpu_flash.flash_fwd's entry point).

    pq, pk, pv (read) and pout (written): addresses of C-contiguous float32 tensors (B, Hq, Lq, D),
    (B, Hkv, Lk, D), (B, Hkv, Lk, Dv), (B, Hq, Lq, Dv). Query i sees keys j < Lk, with ``causal`` (default
    positions) those j <= i + Lk - Lq. ``scale`` (float64) multiplies the scores. Scores, their max and
    the row sum in float64; the exponent ((s - max) * log2(e)) rounded to float32 once for cpu_flash's
    exp2; P V in float32 within groups of PV_GROUP keys, the groups summed in float64 (see _small_rows
    for why); the output rounded to float32. Fully-masked rows are 0; a NaN score makes its row NaN.
    A unit of work is ``per`` query heads of one kv head's group (1 <= per <= Hq / Hkv; the whole group
    reads each key and value once). ``taken``: cpu_fwd.NO_COUNTER (every unit in order, in this thread) or
    a zeroed (1,) int64 counter shared by the threads running this call, each taking its next unit from
    it (rows written by one thread alone: the same bits on any number of threads and any ``per``)."""
    q = carray(_f32_at(pq), (B, Hq, Lq, D))
    k = carray(_f32_at(pk), (B, Hkv, Lk, D))
    v = carray(_f32_at(pv), (B, Hkv, Lk, Dv))
    out = carray(_f32_at(pout), (B, Hq, Lq, Dv))
    _small_rows(q, k, v, out, causal, scale, carray(_u8_at(0), (0, 0, 0, 0)), per, taken)


@njit(fastmath=_k.FASTMATH, cache=True, nogil=True)
def fwd_small_masked(pq, pk, pv, pout, B, Hq, Hkv, Lq, Lk, D, Dv, scale, pallow, Ba, Ha, La, per, taken):
    """:func:`fwd_small` under a boolean mask given as its bits: ``pallow`` the address of a C-contiguous
    bool tensor (Ba, Ha, La, Lk), Ba in (1, B), Ha in (1, Hq), La in (1, Lq) (a size of 1 broadcasts),
    True where the query may see the key (causal, windows, padding, positions all in it). A row's keys
    are all scored, the ruled-out ones set to -inf before the max: the same row as the reference's
    where(allowed, s, -inf); a row with no key allowed is 0."""
    q = carray(_f32_at(pq), (B, Hq, Lq, D))
    k = carray(_f32_at(pk), (B, Hkv, Lk, D))
    v = carray(_f32_at(pv), (B, Hkv, Lk, Dv))
    out = carray(_f32_at(pout), (B, Hq, Lq, Dv))
    _small_rows(q, k, v, out, False, scale, carray(_u8_at(pallow), (Ba, Ha, La, Lk)), per, taken)


@njit(cache=True)
def fwd_small_bf16(pq, pk, pv, pout, B, Hq, Hkv, Lq, Lk, D, Dv, causal, scale, per, taken):
    """:func:`fwd_small` for bfloat16 tensors: the inputs widened to float32 (exactly), the output
    rounded to bfloat16 as torch rounds (to nearest even; NaN stays NaN). One thread (``taken``:
    cpu_fwd.NO_COUNTER)."""
    q = _widen(carray(_u16_at(pq), (B, Hq, Lq, D)))
    k = _widen(carray(_u16_at(pk), (B, Hkv, Lk, D)))
    v = _widen(carray(_u16_at(pv), (B, Hkv, Lk, Dv)))
    out = np.empty((B, Hq, Lq, Dv), np.float32)
    _small_rows(q, k, v, out, causal, scale, carray(_u8_at(0), (0, 0, 0, 0)), per, taken)
    _narrow(out, carray(_u16_at(pout), (B, Hq, Lq, Dv)))


@njit(cache=True)
def _widen(x16):
    # bfloat16 bits -> float32: the upper half of the float32 bits
    return (x16.astype(np.uint32) << np.uint32(16)).view(np.float32)


@njit(cache=True)
def _narrow(x, out16):
    # float32 -> bfloat16 bits, to nearest even as torch's .to(torch.bfloat16); NaN -> 0x7FC0
    xf = x.reshape(-1)
    bits = xf.view(np.uint32)
    flat = out16.reshape(-1)
    for i in range(bits.shape[0]):
        u = bits[i]
        even = (u >> np.uint32(16)) & np.uint32(1)
        flat[i] = np.uint16(0x7FC0) if xf[i] != xf[i] else np.uint16((u + (even + np.uint32(0x7FFF))) >> np.uint32(16))


PV_GROUP = 32  # keys per float32 partial sum of P V (then summed in float64)
PV_FEW = 16  # rows that see fewer keys sum P V in float64 directly (vector set-up: (1, 1, 8, 8, 16) +0.45 us)
# Calls whose keys and values outgrow L2 (serving-size decoding steps) wait on memory: the scores
# prefetch the keys PF_AHEAD rows ahead. Measured (1 thread, kernel alone, same process) on the 2 GHz
# Xeon: (1, 32, 1, 1024, 128) 4.9 -> 3.4 ms, (1, 8, 1, 4096, 64) 2.1 -> 1.6 ms, then with the values of
# each head walked into L2 during its scores as well; on the 3.75 GHz host (2026-12-02 j) the key
# prefetch measured neutral (1263 vs 1260 us, 652 vs 666 us) and the walk of the values 13 % slower at
# (1, 32, 1, 1024, 128) (1426 us against 1260; torch SDPA 1225): the walk is gone. Calls that stay in
# L2 keep the plain loop: there the hints only cost ((1, 4, 1, 128, 64) +0.2-0.6 us)
PF_AHEAD = 16  # keys
PF_MIN_BYTES = 1 << 20  # a call's keys and values from this size on take the hints


@njit(fastmath=_k.FASTMATH, cache=True, nogil=True)
def _small_rows(q, k, v, out, causal, scale, allow, per, taken):
    # fwd_small's rows on float32 arrays (B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, Dv) -> out. A unit is
    # `per` query heads of one kv head's group (grouped-query attention: the whole group when per = Hq / Hkv)
    # with all their rows: each key and value row is read once for all of them (per row, as before, a GQA
    # decoding step read its kv head once per query head). Units in order, or taken from the counter `taken`
    # (empty: all of them in this thread). `allow`: (B|1, Hq|1, Lq|1, Lk) bytes, nonzero where the query may
    # see the key, or (0, 0, 0, 0): no mask. Each row's arithmetic is the same whatever the unit.
    # Scores in float64 arithmetic on the float32 values: with float32 scores (s * scale * log2(e)
    # rounded, then s - max; or q.k rounded in another order than the reference's q @ k^T, then
    # (s - max) * scale log2(e)) a random sweep of the calls served here missed STYLE rule 6 by up to
    # 3.3x (1.6x). P V from the float32 probabilities: float32 products and sums over PV_GROUP keys
    # (_pv_chunk: accumulators in registers), the groups summed in float64.
    # A sweep of 4000 random requests served here (magnitudes 0.1-30, D 1-256, Lk up to 400): no
    # miss, at most 0.49x of the tolerance against the farthest-of-four twin and 0.65x against the
    # plain one (P V all in float64: 0.15x; all keys in one float32 sum: 0.65x / 0.80x). Float64 P V
    # was bound by its float32 -> float64 conversions: the decoding kernel (1, 4, 1, 128, 64) runs
    # ~20 % faster this way (1 thread, same process)
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    group = Hq // Hkv
    chunks = (group + per - 1) // per  # units per kv head
    R = min(per, group) * Lq  # rows of a unit at most
    qi = np.empty((R, D), np.float64)  # the unit's query rows, widened
    s = np.empty((R, Lk), np.float64)  # their scaled scores, then their probabilities (unnormalised)
    buf = np.empty(R * Lk + Dv, np.float32)  # (one allocation for two)
    p = buf[:R * Lk].reshape((R, Lk))  # their probabilities in float32 (the micro-kernel's operand)
    part = buf[R * Lk:]  # P V of one group of keys
    acc = np.empty((R, Dv), np.float64)  # the rows' output sums
    ns = np.empty(R, np.intp)  # keys each row sees (then 0 for the rows already written)
    tot = np.empty(R, np.float64)  # their probabilities' sums
    far = B * Hkv * Lk * (D + Dv) * 4 >= PF_MIN_BYTES  # (see PF_AHEAD)
    u = -1
    while True:
        u = _fwd._fetch_add(taken, _fwd.I1) if taken.size > 0 else u + 1
        if u >= B * Hkv * chunks:
            break
        b, hk, c = u // (Hkv * chunks), (u // chunks) % Hkv, u % chunks
        h0 = hk * group + c * per
        rows = (min(h0 + per, (hk + 1) * group) - h0) * Lq  # row r: head h0 + r // Lq, query r % Lq
        kh, vh = k[b, hk], v[b, hk]  # (Lk, D), (Lk, Dv)
        for r in range(rows):
            qrow = q[b, h0 + r // Lq, r % Lq]  # (D,)
            for d in range(D):  # (a loop: an array assignment here took ~4 s more to compile)
                qi[r, d] = qrow[d]
            i = r % Lq
            ns[r] = min(Lk, max(0, i + Lk - Lq + 1)) if causal else Lk  # keys this row sees
        # -- scores: each step of four keys for every row (one row: the single-row loops, ~0.1 us less a unit) --
        if rows == 1 and far:
            _scores_far(qi[0], kh, ns[0], scale, s[0])
        elif rows == 1:
            _scores(qi[0], kh, ns[0], scale, s[0])
        else:
            _scores_rows(qi, kh, ns, rows, scale, s, far)
        # -- per row: the mask, the max, p = exp2((s - m) log2(e)) (the exponent rounded to float32 once) --
        for r in range(rows):
            h, i, n = h0 + r // Lq, r % Lq, ns[r]
            sr, pr, oi = s[r], p[r], out[b, h, i]  # (Lk,), (Lk,), (Dv,)
            if allow.shape[3] > 0:  # the keys the mask rules out: -inf
                ar = allow[b if allow.shape[0] > 1 else 0, h if allow.shape[1] > 1 else 0, i if allow.shape[2] > 1 else 0]
                for j in range(n):
                    if ar[j] == 0:
                        sr[j] = -np.inf
            m, nan = _row_max(sr, n)
            if nan or m == -np.inf:
                # a NaN row stays NaN; no key (or every score -inf): 0 (its P V skipped: n = 0)
                fill = np.float32(np.nan) if nan else np.float32(0.0)
                for d in range(Dv):
                    oi[d] = fill
                ns[r] = 0
                continue
            total = 0.0
            for j in range(n):
                x = np.float32((sr[j] - m) * _k.LOG2E)
                pj = _k._exp2f(x) if x >= -126.0 else (x if x != x else np.float32(0.0))  # +inf - +inf: NaN
                pr[j] = pj
                sr[j] = pj
                total += sr[j]
            tot[r] = total
            if n < PV_FEW:  # few keys: P V in float64 now
                _weighted_sum(sr, vh, n, acc[r])
                inv = 1.0 / total
                for d in range(Dv):
                    oi[d] = acc[r, d] * inv
                ns[r] = 0
        # -- P V of the rows of many keys: each group of PV_GROUP value rows once for all of them --
        if rows == 1:
            if ns[0] > 0:
                _weighted_sum_groups(p[0], vh, ns[0], part, acc[0])
        else:
            _pv_rows(p, vh, ns, rows, part, acc)
        for r in range(rows):
            if ns[r] == 0:
                continue
            inv = 1.0 / tot[r]
            oi = out[b, h0 + r // Lq, r % Lq]
            for d in range(Dv):
                oi[d] = acc[r, d] * inv


@njit(fastmath=_k.FASTMATH, cache=True)
def _row_max(sr, n):
    # (max of sr[:n], whether one is NaN): eight running maxima, then the largest of them. A max is the
    # same in any order (ties between +0 and -0 aside, which s - max does not tell apart), so this is the
    # one-at-a-time loop's m without its chain of n dependent compares (~4 cycles a key)
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = -np.inf
    nan = False
    n8 = n - n % 8
    for j in range(0, n8, 8):
        s0, s1, s2, s3, s4, s5, s6, s7 = sr[j], sr[j + 1], sr[j + 2], sr[j + 3], sr[j + 4], sr[j + 5], sr[j + 6], sr[j + 7]
        nan |= (s0 != s0) | (s1 != s1) | (s2 != s2) | (s3 != s3) | (s4 != s4) | (s5 != s5) | (s6 != s6) | (s7 != s7)
        m0 = s0 if s0 > m0 else m0
        m1 = s1 if s1 > m1 else m1
        m2 = s2 if s2 > m2 else m2
        m3 = s3 if s3 > m3 else m3
        m4 = s4 if s4 > m4 else m4
        m5 = s5 if s5 > m5 else m5
        m6 = s6 if s6 > m6 else m6
        m7 = s7 if s7 > m7 else m7
    for j in range(n8, n):
        nan |= sr[j] != sr[j]
        m0 = sr[j] if sr[j] > m0 else m0
    m0 = m1 if m1 > m0 else m0
    m2 = m3 if m3 > m2 else m2
    m4 = m5 if m5 > m4 else m4
    m6 = m7 if m7 > m6 else m6
    m0 = m2 if m2 > m0 else m0
    m4 = m6 if m6 > m4 else m4
    return (m4 if m4 > m0 else m0), nan


@njit(fastmath=_k.FASTMATH, inline="always")
def _dot4(qi, kh, j):
    # qi . kh[j + t] for t < 4 in float64: four independent sums over the head dim
    k0, k1, k2, k3 = kh[j], kh[j + 1], kh[j + 2], kh[j + 3]  # (D,) each
    a0 = a1 = a2 = a3 = 0.0
    for d in range(qi.shape[0]):
        a0 += qi[d] * k0[d]
        a1 += qi[d] * k1[d]
        a2 += qi[d] * k2[d]
        a3 += qi[d] * k3[d]
    return a0, a1, a2, a3


@njit(fastmath=_k.FASTMATH, inline="always")
def _scores_rest(qi, kh, n4, n, scale, s):
    # s[j] = (qi . kh[j]) * scale for the last n - n4 (< 4) keys
    for j in range(n4, n):
        kj = kh[j]
        a0 = 0.0
        for d in range(qi.shape[0]):
            a0 += qi[d] * kj[d]
        s[j] = a0 * scale


@njit(fastmath=_k.FASTMATH, cache=True)
def _scores(qi, kh, n, scale, s):
    # s[j] = (qi . kh[j]) * scale in float64 for j < n, four keys at a time
    n4 = n - n % 4
    for j in range(0, n4, 4):
        a0, a1, a2, a3 = _dot4(qi, kh, j)
        s[j], s[j + 1], s[j + 2], s[j + 3] = a0 * scale, a1 * scale, a2 * scale, a3 * scale
    _scores_rest(qi, kh, n4, n, scale, s)


@njit(fastmath=_k.FASTMATH, cache=True)
def _scores_far(qi, kh, n, scale, s):
    # _scores for keys out of L2 (see PF_AHEAD): each step of four keys first prefetches the keys
    # PF_AHEAD rows ahead. (Its own loop: with the hints behind a flag in _scores itself, the calls
    # that stay in L2 ran ~3 % slower; issued in bursts of PF_AHEAD keys, the hints gained less)
    D = qi.shape[0]
    pk = _k._addr(kh)
    n4 = n - n % 4
    for j in range(0, n4, 4):
        if j + PF_AHEAD + 4 <= n:
            for off in range(0, 16 * D, 64):  # (four rows of D float32)
                _prefetch_l1(pk + (j + PF_AHEAD) * D * 4 + off)
        a0, a1, a2, a3 = _dot4(qi, kh, j)
        s[j], s[j + 1], s[j + 2], s[j + 3] = a0 * scale, a1 * scale, a2 * scale, a3 * scale
    _scores_rest(qi, kh, n4, n, scale, s)


@njit(fastmath=_k.FASTMATH, cache=True)
def _scores_rows(qi, kh, ns, rows, scale, s, far):
    # s[r, j] = (qi[r] . kh[j]) * scale in float64 for j < ns[r], r < rows: four keys at a time, each step
    # for every row while those keys are in L1; with `far` (keys and values out of L2, see PF_AHEAD) each
    # step first prefetches the keys PF_AHEAD rows ahead. A row's last ns[r] % 4 keys one at a time
    D = qi.shape[1]
    nmax = 0
    for r in range(rows):
        nmax = max(nmax, ns[r])
    pk = _k._addr(kh)
    for j in range(0, nmax - nmax % 4, 4):
        if far and j + PF_AHEAD + 4 <= nmax:
            for off in range(0, 16 * D, 64):  # (four rows of D float32)
                _prefetch_l1(pk + (j + PF_AHEAD) * D * 4 + off)
        for r in range(rows):
            if j + 4 <= ns[r]:
                a0, a1, a2, a3 = _dot4(qi[r], kh, j)
                s[r, j], s[r, j + 1], s[r, j + 2], s[r, j + 3] = a0 * scale, a1 * scale, a2 * scale, a3 * scale
    for r in range(rows):
        n = ns[r]
        _scores_rest(qi[r], kh, n - n % 4, n, scale, s[r])


@njit(fastmath=_k.FASTMATH, cache=True)
def _weighted_sum(p, vh, n, acc):
    # acc = sum over j < n of p[j] * vh[j] in float64, four keys at a time (rows of few keys)
    Dv = acc.shape[0]
    for d in range(Dv):
        acc[d] = 0.0
    n4 = n - n % 4
    for j in range(0, n4, 4):
        v0, v1, v2, v3 = vh[j], vh[j + 1], vh[j + 2], vh[j + 3]  # (Dv,) each
        p0, p1, p2, p3 = p[j], p[j + 1], p[j + 2], p[j + 3]
        for d in range(Dv):
            acc[d] += (p0 * v0[d] + p1 * v1[d]) + (p2 * v2[d] + p3 * v3[d])
    for j in range(n4, n):
        vj, pj = vh[j], p[j]
        for d in range(Dv):
            acc[d] += pj * vj[d]


@njit(fastmath=_k.FASTMATH, cache=True)
def _weighted_sum_groups(p, vh, n, part, acc):
    # acc = sum over j < n of p[j] * vh[j]: each group of PV_GROUP keys by _pv_chunk into `part`
    # (float32: one FMA per key and lane, accumulators in registers), the groups added in float64.
    # p (Lk,) and vh (Lk, Dv) float32, contiguous rows; part (Dv,) float32
    Dv = acc.shape[0]
    for d in range(Dv):
        acc[d] = 0.0
    pp, pv, ppart = _k._addr(p), _k._addr(vh), _k._addr(part)
    for j0 in range(0, n, PV_GROUP):
        for c0 in range(0, Dv, PV_COLS):
            # part[c0:c1] = p[j0:j1] @ vh[j0:j1, c0:c1]   (1 x keys) @ (keys x at most PV_COLS)
            _pv_chunk(pp + 4 * j0, pv + 4 * (j0 * Dv + c0), min(PV_GROUP, n - j0), Dv, min(PV_COLS, Dv - c0),
                      ppart + 4 * c0)
        for d in range(Dv):
            acc[d] += part[d]


@njit(fastmath=_k.FASTMATH, cache=True)
def _pv_rows(p, vh, ns, rows, part, acc):
    # acc[r] = sum over j < ns[r] of p[r, j] * vh[j] for r < rows (rows with ns[r] = 0 skipped): each group
    # of PV_GROUP keys by _pv_chunk into `part` (float32: one FMA per key and lane, accumulators in
    # registers) for every row while those values are in L1, the groups added in float64 in key order.
    # p (R, Lk) and vh (Lk, Dv) float32, contiguous rows; part (Dv,) float32; acc (R, Dv) float64
    Dv, Lk = acc.shape[1], p.shape[1]
    nmax = 0
    for r in range(rows):
        nmax = max(nmax, ns[r])
        for d in range(Dv):
            acc[r, d] = 0.0
    pp, pv, ppart = _k._addr(p), _k._addr(vh), _k._addr(part)
    for j0 in range(0, nmax, PV_GROUP):
        for r in range(rows):
            n = ns[r]
            if j0 >= n:
                continue
            for c0 in range(0, Dv, PV_COLS):
                # part[c0:c1] = p[r, j0:j1] @ vh[j0:j1, c0:c1]   (1 x keys) @ (keys x at most PV_COLS)
                _pv_chunk(pp + 4 * (r * Lk + j0), pv + 4 * (j0 * Dv + c0), min(PV_GROUP, n - j0), Dv,
                          min(PV_COLS, Dv - c0), ppart + 4 * c0)
            for d in range(Dv):
                acc[r, d] += part[d]


@njit(fastmath={"nsz", "arcp", "contract", "afn", "reassoc"}, cache=True)
def has_nan(p, n):
    """Whether any of the n float32 values at address p is NaN (sdpa's short-call check)."""
    x = carray(_f32_at(p), (n,))
    found = False
    for i in range(n):
        found |= x[i] != x[i]
    return found


@njit(cache=True)
def to_score_units(x, per_unit, big):
    """x * per_unit (x flat float32 or float64, per_unit of x's dtype: the product rounded as torch rounds
    it), except that a finite x stays finite: +-big where the product overflows (a float mask's finfo.min
    times log2(e)); -inf and NaN stay as they are. One pass (the torch expression took five)."""
    out = np.empty_like(x)
    for i in range(x.size):
        y = x[i] * per_unit
        if np.isinf(y) and np.isfinite(x[i]):
            y = big if x[i] > 0 else -big
        out[i] = y
    return out


stamp_sources(globals(), _k, _fwd)  # they compile cpu_flash's exp2 and helpers, and cpu_fwd's counter, into themselves

numba_config.CACHE_DIR = _NUMBA_CACHE_DIR
