"""Real-batch features on the `cpu` backend (issue 12), against torch SDPA in the same run.

    python benchmarks/bench_batches.py            # L = 16384 mask function, ALiBi/sinks overhead
    python benchmarks/bench_batches.py --quick    # L = 4096 (a minute or two)
    python benchmarks/bench_batches.py --smoke --json /tmp/x.json   # L = 512, once, memory of the function only:
                                                                    # checks the script runs

1. A mask function (sliding window 512 plus 64 global tokens, causal) at L = 16384, forward +
   backward: `cpu` with ``masks.function`` (lowered once per call: tile map plus the bits of
   partial tiles), the same pairs as the structured ``window`` mask on `cpu` for reference, and
   `sdpa` given the same mask as a dense L x L bool tensor. Peak extra memory of each `cpu`
   variant is measured in a fresh process (VmHWM after a reset, as bench_cpu.py does).
2. ALiBi and sinks: the same causal forward + backward on `cpu` with and without
   ``alibi_slopes`` / ``sinks``; the overhead is the ratio of medians.

Results: a table on stdout and JSON in benchmarks/results/bench_batches[_quick].json (``--json PATH`` elsewhere).
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

import torch  # noqa: E402

import selfattn  # noqa: E402
from selfattn import masks  # noqa: E402
from bench_cpu import _median_time  # noqa: E402  (the benchmarks' one timing rule)

WINDOW, GLOBAL = 512, 64


def sliding_global(b, h, q, kv):
    return (kv <= q) & ((q - kv <= WINDOW) | (kv < GLOBAL))


def _fwd_bwd(q, k, v, go, **kw):
    def run():
        for t in (q, k, v):
            t.grad = None
        selfattn.attention(q, k, v, **kw).backward(go)
    return run


def mask_function_case(L, H, D, reps):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, H, L, D, requires_grad=True) for _ in range(3))
    go = torch.randn(1, H, L, D)
    fn = masks.function(sliding_global)
    row = {"shape": (1, H, L, L, D)}
    t0 = time.perf_counter()
    selfattn.attention(q.detach(), k.detach(), v.detach(), mask=fn, backend="cpu")  # lowers (and caches) the mask
    row["first_call_s"] = time.perf_counter() - t0
    row["cpu_function_s"] = _median_time(_fwd_bwd(q, k, v, go, mask=fn, backend="cpu"), reps)
    row["cpu_window_s"] = _median_time(_fwd_bwd(q, k, v, go, causal=True, window=WINDOW, backend="cpu"), reps)
    dense = fn.allowed(L, L)  # (1, 1, L, L) bool, built once outside the timing
    row["sdpa_dense_s"] = _median_time(_fwd_bwd(q, k, v, go, mask=dense, backend="sdpa"), max(1, reps // 2))
    row["speedup_vs_sdpa"] = row["sdpa_dense_s"] / row["cpu_function_s"]
    return row


def memory(L, H, D, kind):
    """Peak extra memory of one cpu fwd+bwd in a fresh process, beyond inputs."""
    mask = {"function": "mask=masks.function(sliding_global)", "window": f"causal=True, window={WINDOW}"}[kind]
    code = f"""
import sys, torch
sys.path.insert(0, {os.path.join(ROOT, 'src')!r}); sys.path.insert(0, {os.path.join(ROOT, 'benchmarks')!r})
import selfattn
from selfattn import masks
from bench_batches import sliding_global
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key + ':'):
            return int(line.split()[1]) * 1024
x = torch.randn(1, 1, 256, {D}, requires_grad=True)
selfattn.attention(x, x, x, causal=True, backend='cpu').sum().backward()  # compile / load the cache
q, k, v = (torch.randn(1, {H}, {L}, {D}, requires_grad=True) for _ in range(3))
go = torch.randn(1, {H}, {L}, {D})
open('/proc/self/clear_refs', 'w').write('5')
base = status('VmRSS')
selfattn.attention(q, k, v, {mask}, backend='cpu').backward(go)
print(status('VmHWM') - base)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        return {"error": res.stderr[-1500:]}
    return int(res.stdout.split()[-1])


def overhead_case(L, H, D, reps):
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, H, L, D, requires_grad=True) for _ in range(3))
    go = torch.randn(1, H, L, D)
    slopes = torch.rand(H) * 0.1
    sinks = torch.zeros(H, requires_grad=True)
    base = _fwd_bwd(q, k, v, go, causal=True, backend="cpu")
    alibi = _fwd_bwd(q, k, v, go, causal=True, alibi_slopes=slopes, backend="cpu")
    sink = _fwd_bwd(q, k, v, go, causal=True, sinks=sinks, backend="cpu")
    # interleave the three so that load changes hit each alike
    times = {"plain": [], "alibi": [], "sinks": []}
    for f in (base, alibi, sink):
        f()
    for _ in range(reps):
        for name, f in (("plain", base), ("alibi", alibi), ("sinks", sink)):
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) for n, t in times.items()}
    return {"shape": (1, H, L, L, D), **{f"{n}_s": t for n, t in med.items()},
            "alibi_overhead": med["alibi"] / med["plain"] - 1, "sinks_overhead": med["sinks"] / med["plain"] - 1}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="L = 4096 instead of 16384")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--smoke", action="store_true", help="L = 512, one run each, the mask function's memory alone: "
                                                        "checks the script runs (numbers meaningless)")
    p.add_argument("--json", metavar="PATH", help="where the results go (default benchmarks/results/bench_batches[_quick].json; "
                                                  "--smoke: the temporary directory)")
    args = p.parse_args(argv)
    L = 512 if args.smoke else 4096 if args.quick else 16384
    if args.smoke:
        args.reps = 1
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "load_start": os.getloadavg(),
            "command": " ".join(["python", "benchmarks/bench_batches.py", *(argv if argv is not None else sys.argv[1:])])}
    print(f"{meta['date']}  {meta['machine']}  threads {meta['threads']}  load {meta['load_start']}")
    res = {"meta": meta}
    res["mask_function"] = m = mask_function_case(L, 2, 64, args.reps)  # 2 heads: sdpa's dense L x L math path must fit in memory
    print(f"mask function (window {WINDOW} + {GLOBAL} global, causal) fwd+bwd {m['shape']}:")
    print(f"  cpu function {m['cpu_function_s'] * 1e3:9.1f} ms   (first call, lowering included: {m['first_call_s'] * 1e3:.1f} ms)")
    print(f"  cpu window   {m['cpu_window_s'] * 1e3:9.1f} ms   (structured mask, near the same pairs)")
    print(f"  sdpa dense   {m['sdpa_dense_s'] * 1e3:9.1f} ms   -> cpu {m['speedup_vs_sdpa']:.1f}x   target >= 10x")
    if not args.no_memory:
        mf = memory(L, 2, 64, "function")
        mw = mf if args.smoke else memory(L, 2, 64, "window")  # smoke: one fresh process is enough to check the code
        res["memory"] = {"function_bytes": mf, "window_bytes": mw}
        if isinstance(mf, int) and isinstance(mw, int):
            print(f"  peak extra memory: function {mf / 2**20:.1f} MiB, window {mw / 2**20:.1f} MiB "
                  f"-> {mf / max(mw, 1):.2f}x   target <= 2x")
    res["overhead"] = o = overhead_case(L // 4, 2 if args.smoke else 8, 64, 1 if args.smoke else max(args.reps, 5))
    print(f"ALiBi / sinks overhead, causal fwd+bwd {o['shape']}: plain {o['plain_s'] * 1e3:.1f} ms, "
          f"alibi {100 * o['alibi_overhead']:+.1f} %, sinks {100 * o['sinks_overhead']:+.1f} %   target <= +10 %")
    meta["load_end"] = os.getloadavg()
    path = args.json or (os.path.join(tempfile.gettempdir(), "bench_batches_smoke.json") if args.smoke else
                         os.path.join(ROOT, "benchmarks", "results", f"bench_batches{'_quick' if args.quick else ''}.json"))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(res, fh, indent=1, default=str)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
