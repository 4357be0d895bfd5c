"""CPU benchmark of the fused `cpu` backend against torch SDPA and the unfused `math` path (issue 5).

    python benchmarks/bench_cpu.py            # the issue-5 table (several minutes on 2 cores)
    python benchmarks/bench_cpu.py --quick    # the same cases at smaller shapes (about a minute)
    python benchmarks/bench_cpu.py --compile-time   # numba compile time, first and second process
    python benchmarks/bench_cpu.py --only dense --paired 7   # + rounds of (peak, cpu, sdpa, peak) for the % targets
    python benchmarks/bench_cpu.py --threads 2 --only bfloat16 --paired 7   # issue 14's bfloat16 targets alone
    python benchmarks/bench_cpu.py --threads 2 --paired 7 --cases "dense fwd,dense fwd D128,causal fwd+bwd,dense fwd bfloat16,causal fwd+bwd bfloat16"
                                              # every issue-14 target (float32 % of peak, bfloat16 / float32) in one run
    python benchmarks/bench_cpu.py --smoke --json /tmp/x.json   # every case at tiny shapes, once: checks the script runs

The bfloat16 rows name the engine of the bfloat16 products (``selfattn.backends.get("cpu").features["bfloat16"]``:
AMX, AVX512-BF16 vdpbf16ps, or the float32 fallback; SELFATTN_CPU_BF16_ENGINE / SELFATTN_CPU_BF16 as set) and time
the float32 kernel on the same values in the same row ("cpu-float32"), so their bfloat16 / float32 ratio is read
against issue 14's targets (dense forward >= 1.6x, causal forward + backward >= 1.3x, on 2 threads) from numbers
taken back to back; a last section lists them.

float32 (two extra rows in bfloat16), all the threads torch is set to use, warm-up first, the median of several runs; every
ratio compares two numbers taken in the same run. FLOPs as DESIGN.md counts them: 4*B*H*Lq*Lk*D
for a forward, halved for causal, x2.5 more for the backward (forward + backward = 3.5x); for a
sliding window or packed documents, 4*B*H*D times the allowed (query, key) pairs instead. Decoding
is memory-bound: it reports the bytes of K and V read divided by the time. The ceiling is the
machine's float32 FMA peak, measured in the same run by benchmarks/peak.py on as many threads as
torch uses (a register-resident FMA loop compiled the way the kernels are); every GFLOP/s figure
is also given as a share of it, next to torch.mm's rate.

Results: a table on stdout and the raw numbers as JSON in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import selfattn  # noqa: E402
from selfattn import masks  # noqa: E402


@dataclass
class Case:
    name: str
    shape: tuple  # (B, H, Lq, Lk, D)
    quick: tuple  # the shape under --quick
    mask: str = "none"  # none | causal | window | documents
    backward: bool = False
    baselines: tuple = ("sdpa", "math")
    target: str = ""
    window: int = 256
    doc_len: int = 2048
    stats_pair: bool = False  # also time ours with return_stats=True
    dtype: str = "float32"
    softcap: float = 0.0  # > 0: every selfattn call with this softcap ("cpu-plain": the cpu backend without it)
    peak_share: float = 0.0  # issue 14's target as a share of the FMA peak (0: none); --paired measures these
    vs_float32: float = 0.0  # bfloat16 rows: issue 14's target for cpu bfloat16 / cpu float32 speed (0: none)


CASES = [
    Case("dense fwd", (1, 16, 2048, 2048, 64), (1, 8, 1024, 1024, 64), target=">= 1.0x SDPA; >= 70 % of peak (issue 14)",
         stats_pair=True, peak_share=0.70),
    Case("dense fwd D128", (1, 16, 2048, 2048, 128), (1, 8, 1024, 1024, 128), target=">= 65 % of peak (issue 14)",
         baselines=("sdpa",), peak_share=0.65),
    Case("causal fwd+bwd", (1, 16, 4096, 4096, 64), (1, 8, 1024, 1024, 64), mask="causal", backward=True,
         target=">= 1.0x SDPA; >= 55 % of peak (issue 14)", peak_share=0.55),
    Case("8x16x128 fwd", (8, 16, 128, 128, 64), (8, 16, 128, 128, 64), target=">= 0.8x SDPA"),
    Case("decode 1/16384", (1, 32, 1, 16384, 128), (1, 32, 1, 4096, 128), target=">= 1.0x SDPA, GB/s"),
    Case("window 256 causal fwd+bwd", (1, 16, 16384, 16384, 64), (1, 4, 4096, 4096, 64), mask="window", backward=True,
         baselines=("sdpa",), target=">= 10x SDPA (dense bool mask)"),
    Case("8 docs x 2048 causal fwd+bwd", (1, 16, 16384, 16384, 64), (1, 4, 4096, 4096, 64), mask="documents", backward=True,
         baselines=("sdpa",), target=">= 5x SDPA (block-diagonal dense mask)", doc_len=2048),
    # not in the table: what `auto` needs to rank cpu against sdpa for the rest
    Case("random dense bool mask fwd", (1, 16, 2048, 2048, 64), (1, 8, 1024, 1024, 64), mask="random", target="(rank)"),
    # bfloat16 on the CPU's bfloat16 products (issue 14), against the float32 kernel on the same values in the same row
    Case("dense fwd bfloat16", (1, 16, 2048, 2048, 64), (1, 8, 1024, 1024, 64), dtype="bfloat16",
         baselines=("cpu-float32", "sdpa"), target=">= 1.6x cpu float32, 2 threads (issue 14)", vs_float32=1.6),
    Case("causal fwd+bwd bfloat16", (1, 16, 4096, 4096, 64), (1, 8, 1024, 1024, 64), mask="causal", backward=True,
         dtype="bfloat16", baselines=("cpu-float32", "sdpa"), target=">= 1.3x cpu float32, 2 threads (issue 14)",
         vs_float32=1.3),
    # what a softcap (Gemma 2's 50, here 30) costs against the same call without it; SDPA has no softcap
    Case("softcap 30 fwd", (1, 16, 2048, 2048, 64), (1, 8, 1024, 1024, 64), softcap=30.0, baselines=("cpu-plain", "math"),
         target="(cost of a softcap)"),
]


@dataclass
class Row:
    case: str
    shape: tuple
    target: str
    times: dict = field(default_factory=dict)  # impl -> seconds (median)
    gflops: dict = field(default_factory=dict)  # impl -> GFLOP/s
    notes: list = field(default_factory=list)
    paired: dict = field(default_factory=dict)  # --paired: the interleaved rounds against the adjacent peak
    dtype: str = "float32"
    engine: str = ""  # bfloat16 rows: what computed the bfloat16 products (the cpu backend's features line)
    threads: int = 0  # torch threads of the run


def _median_time(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _allowed_pairs(case: Case, lq: int, lk: int) -> float:
    if case.mask in ("none", "random"):
        return float(lq * lk)
    if case.mask == "causal":
        return lq * lk / 2.0  # DESIGN.md: halved for causal
    if case.mask == "window":
        w = case.window + 1
        return float(sum(min(i + 1, w) for i in range(lq)))
    if case.mask == "documents":
        n = lk // case.doc_len
        d = case.doc_len
        return float(n * d * (d + 1) // 2)
    raise ValueError(case.mask)


def _mask_kwargs(case: Case, lq: int, lk: int, dense: bool):
    """attention() kwargs for ours (structured) or the dense tensor SDPA gets for the same mask."""
    if case.mask == "none":
        return {}
    if case.mask == "causal":
        return {"causal": True}
    if case.mask == "window":
        m = masks.window(case.window)
    elif case.mask == "random":
        g = torch.Generator().manual_seed(0)
        m = masks.dense(torch.rand(1, 1, lq, lk, generator=g) < 0.9)  # (1, 1, Lq, Lk) 10% of pairs masked
    else:
        ids = torch.arange(lk) // min(case.doc_len, lk)
        m = masks.documents(ids) & masks.causal()
    if not dense:
        return {"mask": m}
    return {"attn_mask": m.to_dense(lq, lk)}  # (1, 1, Lq, Lk) bool


def _run(impl: str, case: Case, q, k, v, go, **kw):
    if impl == "sdpa":
        if case.mask == "causal":
            def fwd():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            extra = _mask_kwargs(case, q.shape[2], k.shape[2], dense=True)

            def fwd():
                return F.scaled_dot_product_attention(q, k, v, **extra)
    else:
        extra = _mask_kwargs(case, q.shape[2], k.shape[2], dense=False)
        if case.softcap > 0 and impl != "cpu-plain":
            extra["softcap"] = case.softcap
        backend = "cpu" if impl in ("cpu-plain", "cpu-float32") else impl

        def fwd():
            return selfattn.attention(q, k, v, backend=backend, **extra, **kw)
    if not case.backward:
        return lambda: torch.no_grad()(fwd)()

    def fwd_bwd():
        out = fwd()
        out = out[0] if isinstance(out, tuple) else out
        torch.autograd.grad(out, (q, k, v), go)

    return fwd_bwd


def _math_fits(case: Case, shape) -> bool:
    B, H, Lq, Lk, D = shape
    per_matrix = B * H * Lq * Lk * 4
    return per_matrix * (6 if case.backward else 3) < 8 * 2**30


def matmul_rate(n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = _median_time(lambda: torch.mm(a, b), reps, warmup=2)
    return 2 * n**3 / t / 1e9


def case_shape(case: Case, size: str) -> tuple:
    """The case's (B, H, Lq, Lk, D) for --quick ("quick"), --smoke ("smoke": at most 2 x 2 heads of 256 keys,
    enough to reach every code path, nothing to time) or the full table."""
    if size == "smoke":
        B, H, Lq, Lk, D = case.shape
        return (min(B, 2), min(H, 2), min(Lq, 256), min(Lk, 256), D)
    return case.quick if size == "quick" else case.shape


def bf16_engine() -> tuple:
    """(short name, the cpu backend's features line) of what computes bfloat16 products here: 'amx', 'dot'
    (AVX512-BF16 vdpbf16ps) or 'float32 fallback'; SELFATTN_CPU_BF16_ENGINE / SELFATTN_CPU_BF16 as set. The line
    is ``selfattn.backends.get("cpu").features["bfloat16"]`` made now (cpu_amx.describe(): the class attribute
    was made at import, and the environment may have changed since)."""
    try:
        from selfattn.kernels import cpu_amx
    except ImportError:
        return "float32 fallback", selfattn.backends.get("cpu").features["bfloat16"]
    eng = cpu_amx.engine()
    name = "float32 fallback" if eng is None else "amx" if eng is cpu_amx.ENGINE_AMX else "dot"
    return name, cpu_amx.describe()


def bench_case(case: Case, size: str, reps: int) -> Row:
    shape = case_shape(case, size)
    B, H, Lq, Lk, D = shape
    torch.manual_seed(0)
    dt = getattr(torch, case.dtype)
    q, k, v = (torch.randn(B, H, L, D).to(dt).requires_grad_(case.backward) for L in (Lq, Lk, Lk))
    go = torch.randn(B, H, Lq, D).to(dt)
    # "cpu-float32": the float32 kernel on the same values (a bfloat16 row's own float32 comparison)
    f32 = [t.detach().float().requires_grad_(case.backward) for t in (q, k, v)] + [go.float()]
    row = Row(case.name, shape, case.target, dtype=case.dtype, threads=torch.get_num_threads())
    if dt == torch.bfloat16:
        name, line = bf16_engine()
        row.engine = f"{name}: {line}"
    flops = 4.0 * B * H * D * _allowed_pairs(case, Lq, Lk) * (3.5 if case.backward else 1.0)
    impls = ["cpu", *case.baselines]
    slow = Lq * Lk * B * H > 2**31  # the dense-mask SDPA runs at 16384: one timed run is minutes already
    for impl in impls:
        if impl == "math" and not _math_fits(case, shape):
            row.notes.append("math: does not fit in memory")
            continue
        fn = _run(impl, case, *(f32 if impl == "cpu-float32" else (q, k, v, go)))
        n = 1 if (slow and impl != "cpu") else reps
        t = _median_time(fn, n, warmup=0 if (slow and impl != "cpu") else 1)
        row.times[impl] = t
        row.gflops[impl] = flops / t / 1e9
    if case.stats_pair:
        fn = _run("cpu", case, q, k, v, go, return_stats=True)
        row.times["cpu+stats"] = _median_time(fn, reps)
        # the pair again, interleaved, so a load change between them shows up
        off = _median_time(_run("cpu", case, q, k, v, go), reps)
        on = _median_time(fn, reps)
        row.notes.append(f"stats on/off: {row.times['cpu+stats'] / row.times['cpu']:.3f}, again {on / off:.3f}")
    if case.name.startswith("decode"):
        kv_bytes = 2 * B * H * Lk * D * 4
        for impl in list(row.times):
            row.notes.append(f"{impl}: {kv_bytes / row.times[impl] / 1e9:.1f} GB/s")
    return row


def paired_rounds(case: Case, size: str, rounds: int, seconds: float = 0.25) -> dict:
    """Interleaved rounds of (FMA peak, cpu, sdpa, FMA peak) on torch's threads: each round's cpu rate is
    taken as a share of the mean of the two peak readings around it, so the share compares numbers taken
    within a second or two of each other on this noisy machine (the table's share divides a median time
    by the run's best peak reading, minutes apart)."""
    import peak

    B, H, Lq, Lk, D = case_shape(case, size)
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D).requires_grad_(case.backward) for L in (Lq, Lk, Lk))
    go = torch.randn(B, H, Lq, D)
    flops = 4.0 * B * H * D * _allowed_pairs(case, Lq, Lk) * (3.5 if case.backward else 1.0)
    fns = {impl: _run(impl, case, q, k, v, go) for impl in ("cpu", "sdpa")}
    for fn in fns.values():
        fn()  # warm-up (and compile)
    threads = torch.get_num_threads()

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    out = {"rounds": []}
    for _ in range(rounds):
        before = peak.measure(threads, seconds=seconds, repeats=1)
        t_cpu, t_sdpa = timed(fns["cpu"]), timed(fns["sdpa"])
        after = peak.measure(threads, seconds=seconds, repeats=1)
        fma = (before + after) / 2
        out["rounds"].append({"peak": fma, "peak_before": before, "peak_after": after, "cpu_ms": t_cpu * 1e3,
                              "sdpa_ms": t_sdpa * 1e3, "share": flops / t_cpu / 1e9 / fma, "sdpa_over_cpu": t_sdpa / t_cpu})
    shares = [r["share"] for r in out["rounds"]]
    out["median_share"] = statistics.median(shares)
    out["best_share"] = max(shares)
    out["median_sdpa_over_cpu"] = statistics.median(r["sdpa_over_cpu"] for r in out["rounds"])
    return out


def peak_memory(size: str) -> dict:
    """Peak extra memory of causal fwd+bwd, measured in a fresh process (VmHWM after a reset)."""
    L = {"smoke": 256, "quick": 4096}.get(size, 16384)
    code = f"""
import sys, torch
sys.path.insert(0, {os.path.join(ROOT, 'src')!r})
import selfattn
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key + ':'):
            return int(line.split()[1]) * 1024
B, H, L, D = 1, 16, {L}, 64
x = torch.randn(1, 1, 256, 64, requires_grad=True)
selfattn.attention(x, x, x, causal=True, backend='cpu').sum().backward()  # compile / load the cache
q, k, v = (torch.randn(B, H, L, D, requires_grad=True) for _ in range(3))
go = torch.randn(B, H, L, D)
open('/proc/self/clear_refs', 'w').write('5')
base = status('VmRSS')
out = selfattn.attention(q, k, v, causal=True, backend='cpu')
out.backward(go)
peak = status('VmHWM') - base
own = 4 * B * H * L * D * 4  # output and three gradients
print(peak, own)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        return {"error": res.stderr[-2000:]}
    peak, own = map(int, res.stdout.split()[-2:])
    return {"L": L, "peak_extra_bytes": peak, "outputs_and_grads_bytes": own,
            "beyond_outputs_and_grads_GiB": (peak - own) / 2**30,
            "one_LxL_float32_matrix_per_head_GiB": L * L * 4 / 2**30}


def compile_time() -> dict:
    """First-call time with an empty numba cache (a private NUMBA_CACHE_DIR, so the package's own
    cache and other processes are not touched), then in a second process that loads what the first
    wrote: a small float32 causal forward + backward on one thread (the kernels' lean variants:
    issue 14's bound), the same with softcap (the full variants, which every optional feature takes:
    softcap, ALiBi, bias, documents, mask functions, padding), float64, then float32 on two threads
    (the same compiled kernels on Python threads: expected to compile nothing). Wall and process CPU
    time of each step."""
    import glob
    import tempfile

    code = f"""
import sys, time
sys.path.insert(0, {os.path.join(ROOT, 'src')!r})
import torch, selfattn
torch.set_num_threads(1)
def step(f):
    w, c = time.perf_counter(), time.process_time()
    f()
    return time.perf_counter() - w, time.process_time() - c
x = torch.randn(1, 2, 100, 32, requires_grad=True)
x64 = x.detach().double().requires_grad_()
y = torch.randn(1, 4, 512, 32, requires_grad=True)
def par():
    torch.set_num_threads(2)  # big enough for both threads
    selfattn.attention(y, y, y, causal=True, backend='cpu').sum().backward()
r = [step(lambda: selfattn.attention(x, x, x, causal=True, backend='cpu').sum().backward()),
     step(lambda: selfattn.attention(x, x, x, causal=True, softcap=30.0, backend='cpu').sum().backward()),
     step(lambda: selfattn.attention(x64, x64, x64, causal=True, backend='cpu').sum().backward()),
     step(par)]
print(*[v for pair in r for v in pair])
"""
    out = {}
    with tempfile.TemporaryDirectory(prefix="selfattn_compile_") as cache_dir:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
        for run in ("first_process", "second_process"):
            res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600, env=env)
            if res.returncode != 0:
                raise RuntimeError(f"compile-time run failed:\n{res.stderr[-2000:]}")
            v = list(map(float, res.stdout.split()[-8:]))
            out[run] = {"float32_fwd_bwd_s": v[0], "float32_fwd_bwd_cpu_s": v[1],
                        "float32_softcap_fwd_bwd_s": v[2], "float32_softcap_fwd_bwd_cpu_s": v[3],
                        "float64_fwd_bwd_s": v[4], "float64_fwd_bwd_cpu_s": v[5],
                        "float32_two_threads_fwd_bwd_s": v[6], "float32_two_threads_fwd_bwd_cpu_s": v[7]}
        out["cache_files"] = len(glob.glob(os.path.join(cache_dir, "**", "*.nbc"), recursive=True))
    return out


def profile_forward(d: int = 64, heads: int = 2, length: int = 2048, reps: int = 3, peak_reps: int = 7) -> dict:
    """Where the float32 forward's time goes, on one thread (CPU time, best of ``reps``): the whole
    kernel (``flash_fwd_serial``, dense (1, heads, length, length, d)) against its pieces looped
    over the same number of 64 x 64 tiles with data in cache -- the Q K^T product (scaled), the
    online softmax rows (max, exp2 and sums of 64 rows), the P V product with the rescale -- and
    what is left (mask and tile bookkeeping, loads from L2, calls)."""
    import math

    import numba
    import numpy as np
    from numba import njit

    from selfattn import lowering
    from selfattn.backends import cpu as cpu_backend
    from selfattn.kernels import cpu_flash as K
    from selfattn.request import build_request

    torch.set_num_threads(1)
    numba.set_num_threads(1)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, heads, length, d)).astype(np.float32) for _ in range(3))
    kt = np.ascontiguousarray(k.transpose(0, 1, 3, 2))
    nb = length // K.BLOCK_M
    tiles = heads * nb * nb

    @njit
    def qk(q, kt, s, scale):
        for h in range(q.shape[1]):
            for qb in range(nb):
                for kb in range(nb):
                    K._mm(q[0, h, qb * 64:qb * 64 + 64], kt[0, h, :, kb * 64:kb * 64 + 64], s, 64, q.shape[3], 64, scale)

    @njit
    def pv(p, v, acc, alpha):
        for h in range(v.shape[1]):
            for qb in range(nb):
                for kb in range(nb):
                    K._mm(p, v[0, h, kb * 64:kb * 64 + 64], acc, 64, 64, v.shape[3], 1.0, K.RESCALE, alpha)

    @njit
    def softmax(s, p, m_i, l_i, n, stat):
        for t in range(n):
            for i in range(64):
                m_old = m_i[i]
                m_tile = K._row_max(s, i, 64)
                m_new = m_tile if m_tile > m_old else m_old
                tot = K._exp2_row(s, p, i, 64, m_new, stat)
                alpha = 1.0 if m_old == m_new else math.exp((m_old - m_new) * 0.6931471805599453)
                l_i[i] = alpha * l_i[i] + tot
                m_i[i] = m_new

    def cpu(fn, *a):
        fn(*a)
        best = float("inf")
        for _ in range(reps):
            t0 = time.thread_time()
            fn(*a)
            best = min(best, time.thread_time() - t0)
        return best

    s = (rng.standard_normal((64, 64)) * 8).astype(np.float32)
    p = rng.random((64, 64)).astype(np.float32)
    acc = np.zeros((64, d), np.float32)
    alpha = np.ones(64, np.float32)
    qt, ktt, vt = (torch.from_numpy(x) for x in (q, k, v))
    req = build_request(qt, ktt, vt)
    call = cpu_backend._Call(lowering.lower(req, K.BLOCK_M, K.BLOCK_N), req.scale, 0.0, False)
    mask = cpu_backend._kernel_mask(call.low, torch.float32)
    opts = cpu_backend._opts(torch.float32, call)
    out = np.empty_like(q)
    rm, rl, ent = (np.empty((1, heads, length), np.float32) for _ in range(3))
    counts = np.zeros(heads * nb, np.int64)
    fma1 = _peak_cpu_time(peak_reps)
    t_full = cpu(K.flash_fwd_serial, q, k, kt, v, out, rm, rl, ent, counts, mask, opts)
    parts = {
        "Q K^T (micro-kernel, scaled)": cpu(qk, q, kt, np.empty((64, 64), np.float32), 0.125),
        "softmax rows (max, exp2, sums)": cpu(softmax, s, p, np.full(64, -np.inf, np.float32), np.zeros(64, np.float32),
                                              tiles, np.zeros(0, np.float32)),
        "P V + rescale (micro-kernel)": cpu(pv, p, v, acc, alpha),
    }
    parts["rest (masks, bookkeeping, L2 loads)"] = max(0.0, t_full - sum(parts.values()))
    t_new, parts_new = _profile_transposed(q, k, v, mask, opts, cpu)
    flops = 4.0 * heads * length * length * d
    fma1 = max(fma1, _peak_cpu_time(peak_reps))  # before and after: the better of two (the other core's load moves it)
    res = {"shape": (1, heads, length, length, d), "full_ms": t_full * 1e3, "gflops": flops / t_full / 1e9,
           "fma_peak_1thread": fma1, "parts_ms": {n: t * 1e3 for n, t in parts.items()},
           "transposed": {"full_ms": t_new * 1e3, "gflops": flops / t_new / 1e9,
                          "parts_ms": {n: t * 1e3 for n, t in parts_new.items()}}}
    for title, t_all, split in (("cpu_flash.flash_fwd", t_full, parts), ("cpu_fwd.flash_fwd_t (transposed)", t_new, parts_new)):
        share = f" = {100 * flops / t_all / 1e9 / fma1:.0f} % of the 1-thread FMA peak {fma1:.0f}" if fma1 else ""
        print(f"forward profile {res['shape']} on 1 thread, {title}: {t_all * 1e3:.1f} ms, "
              f"{flops / t_all / 1e9:.1f} GFLOP/s{share}")
        for n, t in split.items():
            print(f"  {n:<38} {t * 1e3:7.1f} ms  {100 * t / t_all:5.1f} %")
        # the two products at the peak: what the kernel would take with nothing else to do
        print(f"  {'(both products at the FMA peak)':<38} {flops / fma1 / 1e6:7.1f} ms  {100 * flops / fma1 / 1e9 / t_all:5.1f} %")
    return res


def _peak_cpu_time(reps: int = 7) -> float:
    """peak.py's 1-thread FMA loop timed by this thread's CPU time (best of ``reps`` runs of ~30 ms):
    the reference of the profile, in the same process; wall time (peak.measure) counts the time the
    thread waits on a loaded machine."""
    import numpy as np

    import peak

    n = 1_000_000
    peak.fma_loop(1000, np.float32(1.0))
    best = float("inf")
    for _ in range(reps):
        t0 = time.thread_time()
        peak.fma_loop(n, np.float32(1.0))
        best = min(best, time.thread_time() - t0)
    return n * peak.flops_per_iter() / best / 1e9


def _profile_transposed(q, k, v, mask, opts, cpu):
    """profile_forward's split for the transposed kernel (kernels/cpu_fwd.py): the whole kernel against
    s^T = K Q^T (keys as stored, Q^T packed), the vertical softmax (column max, exp2, sums, over
    16-query vectors) and acc^T += V^T P^T (V read through strides), looped over as many tiles in cache."""
    import numpy as np
    from numba import njit

    from selfattn.kernels import cpu_flash as K
    from selfattn.kernels import cpu_fwd as F

    heads, length, d = q.shape[1], q.shape[2], q.shape[3]
    nb = length // K.BLOCK_M
    nvec, nopf = 64 // F.LANES, (np.intp(0),) * 4  # query vectors of a block; no prefetch ranges

    @njit
    def qk(k, qt, st, cmax, scale):
        # (a plain tile: the column max taken at the store, as the kernel does, into cmax)
        for h in range(k.shape[1]):
            for qb in range(nb):
                for kb in range(nb):
                    F._gemm_t(K._addr(k[0, h, kb * 64:]), d, 1, K._addr(qt), 64, K._addr(st), 64, 64, d, nvec, scale,
                              K.STORE, np.intp(0), K._addr(cmax), nopf, st)

    @njit
    def softmax(st, m, l, e, alpha, cmax, n):
        # (the column max from the product's store, as in a plain tile)
        for t in range(n):
            F._vsoftmax(K._addr(st), 64, 64, 64 // F.LANES, K._addr(m), K._addr(l), K._addr(e), K._addr(alpha), K._addr(cmax),
                        0, np.float32(0.18), st)  # 0.18: ~|scale| log2 e at D 64

    @njit
    def pv(pt, v, acct, alpha):
        # acc^T = alpha acc^T + V^T P^T (the kernel's transposed P V: V read through strides)
        for h in range(v.shape[1]):
            for qb in range(nb):
                for kb in range(nb):
                    F._gemm_t(K._addr(v[0, h, kb * 64:]), 1, d, K._addr(pt), 64, K._addr(acct), 64, d, 64, nvec, 1.0,
                              K.RESCALE, K._addr(alpha), np.intp(0), nopf, pt)

    rng = np.random.default_rng(1)
    out = np.empty_like(q)
    rm, rl, ent = (np.empty((1, heads, length), np.float32) for _ in range(3))
    counts = np.zeros(heads * nb, np.int64)
    units = heads * F._units(length, F.PAIR)[2]  # every work unit of the call, in order (as the launcher runs them)
    kernel = F.flash_fwd_t
    if K.lean_call(q, mask, opts):
        kernel = K.lean_variant(kernel)  # the variant the launcher takes for this call
    t_full = cpu(kernel, q, k, v, out, rm, rl, ent, counts, mask, opts, 0, units, F.PAIR, F.NO_COUNTER)
    qt = np.ascontiguousarray(q[0, 0, :64].T)
    # scores of a softmax step that keeps its max (the common case once a row has seen a few tiles)
    st = (rng.standard_normal((64, 64)) * 8).astype(np.float32)
    big = np.full(64, 40.0, np.float32)
    parts = {
        "s^T = K Q^T (micro-kernel, scaled; column max at the store)": cpu(qk, k, qt, np.empty((64, 64), np.float32),
                                                                          np.full(64, -np.inf, np.float32), 0.125),
        "vertical softmax (exp2, sums; max from the store)": cpu(softmax, st, big, np.zeros(64, np.float32), np.zeros(64, np.float32),
                                                                 np.ones(64, np.float32), st.max(axis=0), heads * nb * nb),
        "P V + rescale (acc^T += V^T P^T)": cpu(pv, rng.random((64, 64)).astype(np.float32), v,
                                                np.zeros((d, 64), np.float32), np.ones(64, np.float32)),
    }
    parts["rest (Q^T pack, bookkeeping, L2 loads)"] = max(0.0, t_full - sum(parts.values()))
    return t_full, parts


def _load() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def paired_bf16(case: Case, size: str, rounds: int) -> dict:
    """Interleaved rounds of (cpu float32, cpu bfloat16) on the same values: each round's ratio compares two
    calls made back to back, so load changes on this shared machine hit both alike."""
    B, H, Lq, Lk, D = case_shape(case, size)
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D).to(torch.bfloat16).requires_grad_(case.backward) for L in (Lq, Lk, Lk))
    go = torch.randn(B, H, Lq, D).to(torch.bfloat16)
    f32 = [t.detach().float().requires_grad_(case.backward) for t in (q, k, v)] + [go.float()]
    fns = {"float32": _run("cpu-float32", case, *f32), "bfloat16": _run("cpu", case, q, k, v, go)}
    for fn in fns.values():
        fn()  # warm-up (and compile)
    out = {"rounds": []}
    for _ in range(rounds):
        t = {}
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            t[name] = time.perf_counter() - t0
        out["rounds"].append({"float32_ms": t["float32"] * 1e3, "bfloat16_ms": t["bfloat16"] * 1e3,
                              "ratio": t["float32"] / t["bfloat16"]})
    out["median_ratio"] = statistics.median(r["ratio"] for r in out["rounds"])
    return out


def bf16_targets(rows: list, threads: int) -> list:
    """issue 14's bfloat16 targets from the rows of this run: each bfloat16 row's own float32 comparison
    ("cpu-float32", back to back) and, where this run has it, the float32 row of the same case and shape."""
    by_name = {r.case: r for r in rows}
    out = []
    for case in CASES:
        r = by_name.get(case.name)
        if r is None or not case.vs_float32 or "cpu-float32" not in r.times:
            continue
        item = {"case": case.name, "shape": r.shape, "engine": r.engine, "threads": threads, "target": case.vs_float32,
                "ratio": r.times["cpu-float32"] / r.times["cpu"],
                "issue_shape_and_threads": tuple(r.shape) == tuple(case.shape) and threads == 2}
        f32_row = by_name.get(case.name.replace(" bfloat16", ""))
        if f32_row is not None and tuple(f32_row.shape) == tuple(r.shape) and "cpu" in f32_row.times:
            item["ratio_vs_float32_row"] = f32_row.times["cpu"] / r.times["cpu"]
        if r.paired:
            item["paired_median_ratio"] = r.paired["median_ratio"]
        item["met"] = item.get("paired_median_ratio", item["ratio"]) >= case.vs_float32
        out.append(item)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller shapes")
    p.add_argument("--smoke", action="store_true",
                   help="every case at tiny shapes, one run each, a short peak: checks the script runs (numbers meaningless); "
                        "with --profile, one small profile")
    p.add_argument("--threads", type=int, default=0, help="torch (and kernel) threads (default: torch's own choice)")
    p.add_argument("--reps", type=int, default=5, help="timed runs per implementation (median)")
    p.add_argument("--only", default="", help="run only cases whose name contains this")
    p.add_argument("--cases", default="", help="run only these cases: exact names, comma-separated")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--compile-time", action="store_true", help="numba compile time: first calls in a fresh process with an empty private cache, then a second process")
    p.add_argument("--json", default="", help="output path (default benchmarks/results/bench_cpu[_quick].json; "
                                              "--smoke: bench_cpu_smoke.json in the temporary directory)")
    p.add_argument("--profile", action="store_true", help="only the one-thread forward profile (D 64 and 128)")
    p.add_argument("--paired", type=int, default=0, metavar="N",
                   help="for the cases with a share-of-peak target, also N interleaved rounds of peak, cpu, sdpa, peak; "
                        "for the bfloat16 rows, N interleaved rounds of cpu float32, cpu bfloat16")
    args = p.parse_args(argv)
    size = "smoke" if args.smoke else "quick" if args.quick else "full"
    wanted = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in {c.name for c in CASES}]
    if unknown:
        p.error(f"--cases: no case named {unknown}; the cases: {', '.join(c.name for c in CASES)}")
    if args.smoke:
        args.reps = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    suffix = "_profile" if args.profile else "_compile" if args.compile_time else "_smoke" if args.smoke else "_quick" if args.quick else ""
    path = args.json or (os.path.join(tempfile.gettempdir(), f"bench_cpu{suffix}.json") if args.smoke
                         else os.path.join(ROOT, "benchmarks", "results", f"bench_cpu{suffix}.json"))
    if args.profile:
        if args.smoke:
            result = {"profile": [profile_forward(64, heads=1, length=128, reps=1, peak_reps=1)], "loadavg": _load()}
        else:
            result = {"profile": [profile_forward(64), profile_forward(128)], "loadavg": _load()}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as fh:
            json.dump(result, fh, indent=1, default=str)
        print(f"wrote {path}")
        return

    import peak

    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(["python", "benchmarks/bench_cpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{platform.machine()} {peak.cpu_model()} {os.cpu_count()} CPUs",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "loadavg_start": _load(),
    }
    result = {"meta": meta}
    if args.compile_time:
        result["compile_time"] = compile_time()
        print(json.dumps(result["compile_time"], indent=1))
    else:
        seconds, repeats = (0.01, 1) if args.smoke else (0.5, 5)
        mm_n = 256 if args.smoke else 2048
        mm = matmul_rate(mm_n, reps=repeats)
        fma = peak.measure(torch.get_num_threads(), seconds, repeats)
        meta["fp32_matmul_GFLOPs"] = mm
        meta["fma_peak_GFLOPs"] = fma
        meta["fma_peak_1thread_GFLOPs"] = peak.measure(1, seconds, repeats)
        meta["fma_vector"] = f"<{peak.LANES} x float> ({'AVX-512' if peak.AVX512 else 'AVX2'})"
        meta["bfloat16_engine"] = " -- ".join(bf16_engine())
        print(f"{meta['date']}  {meta['machine']}  torch {meta['torch']}  threads {meta['threads']}  load {meta['loadavg_start']}")
        print(f"float32 FMA peak ({meta['fma_vector']}): {fma:.1f} GFLOP/s on {meta['threads']} threads, "
              f"{meta['fma_peak_1thread_GFLOPs']:.1f} on 1  <- ceiling")
        print(f"float32 matmul (torch.mm {mm_n}): {mm:.1f} GFLOP/s ({100 * mm / fma:.0f} % of peak)")
        print(f"bfloat16 products: {meta['bfloat16_engine']}")
        rows = []
        for case in CASES:
            if (args.only and args.only not in case.name) or (wanted and case.name not in wanted):
                continue
            row = bench_case(case, size, args.reps)
            rows.append(row)
            t = row.times
            ratio = {b: t[b] / t["cpu"] for b in t if b != "cpu"}
            print(f"\n{row.case} {row.shape}  target {row.target}")
            if row.engine:
                print(f"  bfloat16 engine: {row.engine}")
            for impl in t:
                extra = f"  cpu speedup {ratio[impl]:.2f}x" if impl in ratio else ""
                gf = f"{row.gflops[impl]:8.1f} GFLOP/s ({100 * row.gflops[impl] / fma:4.1f} % of peak)" if impl in row.gflops else ""
                print(f"  {impl:<11} {t[impl] * 1e3:10.2f} ms {gf}{extra}")
            for n in row.notes:
                print(f"  note: {n}")
            if args.paired and case.peak_share:
                pr = paired_rounds(case, size, args.paired, 0.01 if args.smoke else 0.25)
                row.paired = pr
                shares = " ".join(f"{100 * r['share']:.0f}" for r in pr["rounds"])
                print(f"  paired rounds (peak, cpu, sdpa, peak) x{args.paired}: cpu {100 * pr['median_share']:.1f} % of the "
                      f"adjacent peak (median; best {100 * pr['best_share']:.1f} %; rounds {shares}), "
                      f"sdpa/cpu {pr['median_sdpa_over_cpu']:.2f}x; target {100 * case.peak_share:.0f} %: "
                      f"{'met' if pr['median_share'] >= case.peak_share else 'not met'} in the median")
            if args.paired and case.vs_float32:
                pr = row.paired = paired_bf16(case, size, args.paired)
                each = " ".join(f"{r['ratio']:.2f}" for r in pr["rounds"])
                print(f"  paired rounds (cpu float32, cpu bfloat16) x{args.paired}: bfloat16 {pr['median_ratio']:.2f}x float32 "
                      f"(median; rounds {each})")
        result["rows"] = [asdict(r) for r in rows]
        targets = result["bf16_targets"] = bf16_targets(rows, torch.get_num_threads())
        if targets:
            print(f"\nissue 14, bfloat16 against float32 ({torch.get_num_threads()} threads; ratio = cpu float32 time / "
                  f"cpu bfloat16 time, back to back in the row{'; paired: median of interleaved rounds' if args.paired else ''}):")
        for tg in targets:
            extra = f", against the '{tg['case'].replace(' bfloat16', '')}' row {tg['ratio_vs_float32_row']:.2f}x" \
                if "ratio_vs_float32_row" in tg else ""
            paired = f", paired {tg['paired_median_ratio']:.2f}x" if "paired_median_ratio" in tg else ""
            where = "" if tg["issue_shape_and_threads"] else "  (not the issue's shape and 2 threads)"
            print(f"  {tg['case']} {tuple(tg['shape'])} on {tg['engine'].split(':')[0]}: {tg['ratio']:.2f}x{paired}{extra}; "
                  f"target >= {tg['target']}x: {'met' if tg['met'] else 'NOT met'}{where}")
        if not args.no_memory and not args.only and not wanted:
            result["peak_memory"] = peak_memory(size)
            print("\npeak memory, causal fwd+bwd:", json.dumps(result["peak_memory"]))
        meta["loadavg_end"] = _load()
        print(f"\nload average at the end: {meta['loadavg_end']}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1, default=str)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
