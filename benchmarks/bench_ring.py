"""Ring attention (selfattn.distributed, issue 15): 2 processes x 1 thread against 1 process x 2 threads.

    python benchmarks/bench_ring.py                 # the issue's case: L = 32768, causal, forward + backward
    python benchmarks/bench_ring.py --quick         # L = 4096 (well under a minute)
    python benchmarks/bench_ring.py --smoke --out /tmp/x.json   # L = 256, single and balanced, no memory pass:
                                                    # checks the script runs (numbers meaningless)

Three runs of the same causal forward + backward, float32, (B, H, L, D) = (1, --heads, L, --dim):

* ``single``: ``selfattn.attention(..., causal=True)`` in one process with 2 torch threads
  (backend "auto": the fused cpu kernel);
* ``contiguous`` and ``balanced``: ``ring_attention`` on 2 gloo processes with 1 thread each,
  in the two layouts.

Each run is a fresh process (group) that warms up on a short sequence first (numba loads its
kernels), then times one call (the median of --repeat). The ring's time is the slowest rank's.
Peak extra memory: the largest resident set seen (sampled every millisecond from /proc) during
the timed call, minus the resident set just before it, per process, measured in a second pass
of each run under MALLOC_MMAP_THRESHOLD_=65536: glibc then maps each tensor of 64 KiB or more on
its own and returns it on free (by default it raises that threshold after the first free and
keeps freed tensors in its heap, and the resident set says more about the allocator than the
code), which costs page faults, so times come from the first pass. CPU seconds per process
(``time.process_time``) show each rank's own work apart from its waiting, which on a shared,
loaded machine is the steadier number. FLOPs as DESIGN.md counts
them: 4*B*H*L*L*D, halved for causal, x3.5 for forward + backward.

Targets (issue 15): ring >= 0.8x the single process's throughput, each rank's peak extra memory
<= 0.6x the single process's, balanced >= 1.3x faster than contiguous.
Results: a table on stdout and JSON in benchmarks/results/bench_ring.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class _PeakRSS:
    """The largest resident set seen while the block runs, sampled every millisecond."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def _inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(4)]  # q, k, v, dout


def _time_call(fn, repeat):
    """(median wall seconds, median CPU seconds of this process, largest peak extra bytes)."""
    times, cpus, extras = [], [], []
    for _ in range(repeat):
        with _PeakRSS() as mem:
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
        times.append(dt)
        cpus.append(dc)
        extras.append(mem.extra)
    return statistics.median(times), statistics.median(cpus), max(extras)


def _warm_length(args) -> int:
    # long enough that the warm-up calls every kernel the timed call will (numba loads each on first use, and
    # that memory would count as the call's): the ring's backward pieces then span several 64-key tiles
    return min(args.length, 4096)


def _single(args, out):
    import selfattn

    torch.set_num_threads(2)
    warm = [t.requires_grad_() for t in _inputs((1, args.heads, _warm_length(args), args.dim))[:3]]
    selfattn.attention(*warm, causal=True).sum().backward()  # numba loads its kernels here
    q, k, v, do = _inputs((1, args.heads, args.length, args.dim))
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def step():
        o = selfattn.attention(q, k, v, causal=True)
        o.backward(do)
        q.grad = k.grad = v.grad = None

    t, cpu, extra = _time_call(step, args.repeat)
    out.put({"run": "single", "procs": 1, "threads": 2, "seconds": t, "cpu_seconds": [cpu], "peak_extra_bytes": [extra]})


def _ring_rank(rank, world, init, args, layout, out):
    from selfattn.distributed import ring_attention, shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=20))
    try:
        warm = [shard(t, 2, layout).requires_grad_() for t in _inputs((1, args.heads, _warm_length(args), args.dim))[:3]]
        ring_attention(*warm, causal=True, layout=layout).sum().backward()
        full = _inputs((1, args.heads, args.length, args.dim))
        q, k, v, do = (shard(t, 2, layout) for t in full)
        del full
        q, k, v = (t.requires_grad_() for t in (q, k, v))

        def step():
            o = ring_attention(q, k, v, causal=True, layout=layout)
            o.backward(do)
            q.grad = k.grad = v.grad = None

        times, cpus, extras = [], [], []
        for _ in range(args.repeat):
            dist.barrier()
            t, cpu, extra = _time_call(step, 1)
            dist.barrier()
            times.append(t)
            cpus.append(cpu)
            extras.append(extra)
        out.put({"rank": rank, "seconds": statistics.median(times), "cpu_seconds": statistics.median(cpus), "peak_extra_bytes": max(extras)})
    finally:
        dist.destroy_process_group()


def _ring(args, layout):
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ring_rank, args=(2, f"file://{tmp}/rdv", args, layout, q), nprocs=2, join=True)
    rows = sorted((q.get() for _ in range(2)), key=lambda r: r["rank"])
    return {"run": layout, "procs": 2, "threads": 1, "seconds": max(r["seconds"] for r in rows),
            "rank_seconds": [r["seconds"] for r in rows], "cpu_seconds": [r["cpu_seconds"] for r in rows],
            "peak_extra_bytes": [r["peak_extra_bytes"] for r in rows]}


def _one(args, run):
    if run != "single":
        return _ring(args, run)
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    proc = ctx.Process(target=_single, args=(args, q))
    proc.start()
    proc.join()
    if proc.exitcode:
        raise SystemExit(f"single run failed (exit code {proc.exitcode})")
    return q.get()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="L = 4096")
    p.add_argument("--runs", default="single,contiguous,balanced")
    p.add_argument("--out", help="where the results go (default benchmarks/results/bench_ring.json; --smoke: the temporary directory)")
    p.add_argument("--no-memory-pass", action="store_true", help="one pass per run: its peak memory as glibc comes")
    p.add_argument("--smoke", action="store_true", help="L = 256, runs single,balanced, no memory pass: checks the script runs")
    args = p.parse_args(argv)
    if args.quick:
        args.length = 4096
    if args.smoke:
        args.length, args.runs, args.no_memory_pass = 256, "single,balanced", True
    args.out = args.out or (os.path.join(tempfile.gettempdir(), "bench_ring_smoke.json") if args.smoke else
                            os.path.join(ROOT, "benchmarks", "results", "bench_ring.json"))
    flops = 3.5 * 4 * args.heads * args.length * args.length * args.dim / 2
    results = []
    for run in args.runs.split(","):
        r = _one(args, run)  # timing: glibc as it comes
        if not args.no_memory_pass:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # memory: read by glibc when each spawned process starts
            try:
                mem = _one(args, run)
            finally:
                del os.environ["MALLOC_MMAP_THRESHOLD_"]
            r["peak_extra_bytes"] = mem["peak_extra_bytes"]
            r["memory_pass_seconds"] = mem["seconds"]
        r["gflops"] = flops / r["seconds"] / 1e9
        results.append(r)
        mib = ", ".join(f"{b / 2**20:.0f}" for b in r["peak_extra_bytes"])
        cpu = ", ".join(f"{c:.1f}" for c in r["cpu_seconds"])
        print(f"{run:>10}: {r['procs']} proc x {r['threads']} thr  {r['seconds']:8.2f} s  {r['gflops']:6.1f} GFLOP/s  "
              f"CPU s per process: {cpu}  peak extra MiB per process: {mib}", flush=True)
    by = {r["run"]: r for r in results}
    summary = {}
    if "single" in by:
        for lay in ("contiguous", "balanced"):
            if lay in by:
                summary[f"{lay} throughput vs single"] = by["single"]["seconds"] / by[lay]["seconds"]
                summary[f"{lay} peak extra memory vs single (worst rank)"] = max(by[lay]["peak_extra_bytes"]) / max(1, by["single"]["peak_extra_bytes"][0])
    if "contiguous" in by and "balanced" in by:
        summary["balanced speed-up over contiguous"] = by["contiguous"]["seconds"] / by["balanced"]["seconds"]
        # the same from CPU seconds: the ring is as slow as its busiest rank
        summary["balanced speed-up over contiguous (busiest rank's CPU seconds)"] = max(by["contiguous"]["cpu_seconds"]) / max(by["balanced"]["cpu_seconds"])
    for name, val in summary.items():
        print(f"{name}: {val:.2f}x")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"shape": [1, args.heads, args.length, args.dim], "dtype": "float32", "mask": "causal",
                   "machine": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
                   "results": results, "summary": summary}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
