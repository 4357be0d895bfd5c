"""Short sequences: the fused `cpu` backend against torch SDPA where a call is small (issue 7).

    python benchmarks/bench_short.py                     # 1 and 2 threads, numba's default threading layer
    python benchmarks/bench_short.py --threads 1 --layer workqueue --json benchmarks/results/bench_short.json

The shapes of small models (the default `selfattn train` model is B*H = 64 heads of 48 x 32):
B*H in {1, 8, 64}, L in {8, 16, 32, 48, 96, 128}, head dim 32 and 64, causal, float32; a forward
without gradients and a forward + backward. Each number is the best of 5 repeats of a timed loop;
cpu and sdpa are timed back to back for every shape, so each ratio compares two numbers of the same
moment. These ratios set `auto`'s choice between the two (backends/cpu.py, CPUBackend.rank).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))


def best_time(fn, n: int) -> float:
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n)
    return min(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", default="1,2", help="torch thread counts to run (comma-separated)")
    p.add_argument("--layer", default=None, help="numba threading layer (default: numba's own choice)")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    if args.layer:
        os.environ["NUMBA_THREADING_LAYER"] = args.layer
    import numba
    import torch

    from selfattn import attention

    rows = []
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, numba {numba.__version__}, "
          f"threading layer {args.layer or 'default'}\n")
    print("| threads | pass | B*H | L | D | cpu (us) | sdpa (us) | sdpa / cpu |")
    print("|---|---|---|---|---|---|---|---|")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for grad in (False, True):
            for bh in (1, 8, 64):
                for L in (8, 16, 32, 48, 96, 128):
                    for D in (32, 64):
                        q, k, v, g = (torch.randn(bh, 1, L, D, requires_grad=grad) for _ in range(4))

                        def run(backend):
                            if grad:
                                attention(q, k, v, causal=True, backend=backend).backward(g)
                            else:
                                with torch.no_grad():
                                    attention(q, k, v, causal=True, backend=backend)

                        run("cpu"), run("sdpa")  # warm-up (numba loads its kernels)
                        n = max(5, int(2e7 / (bh * L * L * D * (3 if grad else 1) + 2e5)))
                        t_cpu, t_sdpa = best_time(lambda: run("cpu"), n), best_time(lambda: run("sdpa"), n)
                        name = "fwd+bwd" if grad else "fwd"
                        print(f"| {threads} | {name} | {bh} | {L} | {D} | {t_cpu * 1e6:.1f} | {t_sdpa * 1e6:.1f} | {t_sdpa / t_cpu:.2f} |",
                              flush=True)
                        rows.append({"threads": threads, "pass": name, "bh": bh, "L": L, "D": D,
                                     "cpu_s": t_cpu, "sdpa_s": t_sdpa})
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "layer": args.layer,
                       "load_end": os.getloadavg(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
