"""Short sequences: the fused `cpu` backend against torch SDPA where a call is small (issue 7).

    python benchmarks/bench_short.py                     # 1 and 2 threads, numba's default threading layer
    python benchmarks/bench_short.py --threads 1 --layer workqueue --json benchmarks/results/bench_short.json

The shapes of small models (the default `selfattn train` model is B*H = 64 heads of 48 x 32):
B*H in {1, 8, 64}, L in {8, 16, 32, 48, 96, 128}, head dim 32 and 64, causal, float32; a forward
without gradients and a forward + backward. Each number is the best of 5 repeats of a timed loop;
cpu and sdpa are timed back to back for every shape, so each ratio compares two numbers of the same
moment. `auto`'s choice between the two is calibrated at run time (backends/cpu.py, calibration()):
the run prints the calibration it made.

    python benchmarks/bench_short.py --fixed --threads 1      # the per-call fixed cost alone (issue 14)
    python benchmarks/bench_short.py --fixed --threads 1 --row-kernel off   # without cpu_short's row kernel
    python benchmarks/bench_short.py --serving --threads 1    # decoding steps of real serving sizes alone
    python benchmarks/bench_short.py --smoke --threads 1 --json /tmp/x.json   # one table shape, then --fixed's
                                                              # tables: checks the script runs

``--fixed``: the fixed cost of one call on tiny shapes -- (1, 1, 8, 8, 16), a decoding step
(1, 4, 1, 128, 64) and (1, 8, 64, 64, 64) -- forward and forward + backward, for selfattn's `cpu`,
`sdpa` and `auto` backends and torch's scaled_dot_product_attention called directly; best of 9
repeats of a timed loop, in this thread's CPU time with one thread (steady on a busy machine), wall
time with more. "torch direct / cpu" >= 1 is issue 14's target (cpu's call at or below SDPA's); the
A/A column times torch's direct call twice in the same rounds (the bias of the method, ideally 1.00).
Then decoding steps of serving sizes -- (1, 4, 1, 128, 64), (1, 32, 1, 1024, 128), (1, 8, 1, 4096, 64),
no gradients -- through attention() (the short path's row kernel on one thread), the general path
forced, and torch's SDPA directly (``--serving`` runs these alone).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))


def best_time(fn, n: int, repeats: int = 5, clock=time.perf_counter) -> float:
    times = []
    for _ in range(repeats):
        t0 = clock()
        for _ in range(n):
            fn()
        times.append((clock() - t0) / n)
    return min(times)


FIXED_SHAPES = [(1, 1, 8, 8, 16), (1, 4, 1, 128, 64), (1, 8, 64, 64, 64)]  # (B, H, Lq, Lk, D)
SERVING_SHAPES = [(1, 4, 1, 128, 64), (1, 32, 1, 1024, 128), (1, 8, 1, 4096, 64)]  # decoding steps of real models


def fixed_cost(threads: int, rows: list, rounds: int = 9, min_calls: int = 20) -> None:
    """Per-call cost on tiny shapes: cpu and sdpa through selfattn, and torch's SDPA directly."""
    import torch
    import torch.nn.functional as F

    from selfattn import attention

    clock = time.thread_time if threads == 1 else time.perf_counter
    print(f"\nfixed cost per call, {threads} thread(s), {'thread CPU' if threads == 1 else 'wall'} time, best of 9\n")
    print("| pass | (B, H, Lq, Lk, D) | cpu (us) | sdpa (us) | auto (us) | torch SDPA direct (us) | sdpa / cpu "
          "| torch direct / cpu | torch direct / sdpa | A/A (torch direct twice) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for grad in (False, True):
        for B, H, Lq, Lk, D in FIXED_SHAPES:
            g = torch.Generator().manual_seed(0)
            q = torch.randn(B, H, Lq, D, generator=g, requires_grad=grad)
            k, v = (torch.randn(B, H, Lk, D, generator=g, requires_grad=grad) for _ in range(2))
            do = torch.randn(B, H, Lq, D, generator=g)
            causal = Lq == Lk  # a decoding step (one query) sees every key

            def run(backend):
                if backend.startswith("torch"):
                    call = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
                elif backend == "auto":
                    call = lambda: attention(q, k, v, causal=causal)  # noqa: E731
                else:
                    call = lambda: attention(q, k, v, causal=causal, backend=backend)  # noqa: E731
                if grad:
                    torch.autograd.grad(call(), (q, k, v), do)
                else:
                    with torch.no_grad():
                        call()

            names = ("cpu", "sdpa", "auto", "torch", "torch A/A")
            for b in names:
                run(b), run(b)  # warm-up (auto: its calibration, once per process)
            n = max(min_calls, int(2e6 / (B * H * Lq * Lk * D * (3 if grad else 1) + 1e4))) if min_calls > 1 else 1
            t = {}
            for _ in range(rounds):  # interleaved rounds: every backend sees the machine of the same moment
                for b in names:
                    t[b] = min(t.get(b, float("inf")), best_time(lambda: run(b), n, repeats=1, clock=clock))
            name = "fwd+bwd" if grad else "fwd"
            print(f"| {name} | {(B, H, Lq, Lk, D)} | {t['cpu'] * 1e6:.1f} | {t['sdpa'] * 1e6:.1f} | {t['auto'] * 1e6:.1f} "
                  f"| {t['torch'] * 1e6:.1f} | {t['sdpa'] / t['cpu']:.2f} | {t['torch'] / t['cpu']:.2f} "
                  f"| {t['torch'] / t['sdpa']:.2f} | {t['torch A/A'] / t['torch']:.2f} |", flush=True)
            rows.append({"threads": threads, "pass": name, "shape": [B, H, Lq, Lk, D], "cpu_s": t["cpu"],
                         "sdpa_s": t["sdpa"], "auto_s": t["auto"], "torch_sdpa_s": t["torch"],
                         "torch_sdpa_aa_s": t["torch A/A"], "clock": "thread" if threads == 1 else "wall"})


def serving_cost(threads: int, rows: list, rounds: int = 15, min_calls: int = 5) -> None:
    """Decoding steps of real serving sizes (no gradients): the cpu backend as attention() runs it
    (the short path's row kernel where it serves the call, else the general path), the general path
    forced (CPUBackend.forward on a built request: the tile kernels) and torch's SDPA directly."""
    import torch
    import torch.nn.functional as F

    from selfattn import attention
    from selfattn.backends import cpu
    from selfattn.request import build_request

    clock = time.thread_time if threads == 1 else time.perf_counter
    print(f"\ndecoding steps, no grad, {threads} thread(s), {'thread CPU' if threads == 1 else 'wall'} time, best of 15 "
          "interleaved rounds (shuffled)\n")
    print("| (B, H, Lq, Lk, D) | path attention() takes | cpu (us) | cpu general path (us) | torch SDPA direct (us) "
          "| torch direct / cpu | torch direct / general | A/A (torch direct twice) |")
    print("|---|---|---|---|---|---|---|---|")
    backend, rng = cpu.CPUBackend(), random.Random(0)
    for B, H, Lq, Lk, D in SERVING_SHAPES:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(B, H, Lq, D, generator=g)
        k, v = (torch.randn(B, H, Lk, D, generator=g) for _ in range(2))
        req = build_request(q, k, v, requires_grad=False)
        calls = {"general": lambda: backend.forward(q, k, v, req), "cpu": lambda: attention(q, k, v, backend="cpu"),
                 "torch": lambda: F.scaled_dot_product_attention(q, k, v),
                 "torch A/A": lambda: F.scaled_dot_product_attention(q, k, v)}
        with torch.no_grad():
            path = "short (row kernel)" if cpu.fast_forward(q, k, v, False, None) is not None else "general"
            for c in calls.values():
                c(), c()  # warm-up (numba loads its kernels)
            n = max(min_calls, int(2e6 / (B * H * Lq * Lk * D + 1e4))) if min_calls > 1 else 1
            t, order = {}, list(calls)
            for _ in range(rounds):  # interleaved rounds, in a new order each round
                rng.shuffle(order)
                for name in order:
                    t[name] = min(t.get(name, float("inf")), best_time(calls[name], n, repeats=1, clock=clock))
        print(f"| {(B, H, Lq, Lk, D)} | {path} | {t['cpu'] * 1e6:.1f} | {t['general'] * 1e6:.1f} | {t['torch'] * 1e6:.1f} "
              f"| {t['torch'] / t['cpu']:.2f} | {t['torch'] / t['general']:.2f} | {t['torch A/A'] / t['torch']:.2f} |", flush=True)
        rows.append({"threads": threads, "pass": "fwd (decoding)", "shape": [B, H, Lq, Lk, D], "path": path, "cpu_s": t["cpu"],
                     "cpu_general_s": t["general"], "torch_sdpa_s": t["torch"], "torch_sdpa_aa_s": t["torch A/A"],
                     "clock": "thread" if threads == 1 else "wall"})


def print_calibration() -> None:
    import torch

    from selfattn.backends import cpu

    if not hasattr(cpu, "calibration"):  # a tree from before the calibration (the same script on an old commit)
        return
    print("\nauto's calibration in this process (backends/cpu.py; cpu ranks 10 x predicted cpu/sdpa time, sdpa 10; "
          "within 1.3x of each other the recorded table decides):")
    for dtype in (torch.float32, torch.bfloat16):
        for grad in (False, True):
            cal = cpu.calibration(dtype, grad)
            name = f"{str(dtype).replace('torch.', '')} {'fwd+bwd' if grad else 'fwd'}"
            if cal is None:
                print(f"  {name}: none (not measured here)")
                continue
            if hasattr(cpu, "_measured"):  # the probes' times (the calibration predicts along them)
                print(f"  {name}: {cpu._measured(cal)} ({cal.source})")
            else:
                print(f"  {name}: cpu {cal.cpu.fixed * 1e6:.0f} us + {cal.cpu.per_work * 1e9:.3g} ns/work, sdpa "
                      f"{cal.sdpa.fixed * 1e6:.0f} us + {cal.sdpa.per_work * 1e9:.3g} ns/work ({cal.source})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", default="1,2", help="torch thread counts to run (comma-separated)")
    p.add_argument("--layer", default=None, help="numba threading layer (default: numba's own choice)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--fixed", action="store_true", help="only the per-call fixed cost on tiny shapes and decoding steps (issue 14)")
    p.add_argument("--serving", action="store_true", help="only the decoding steps of serving sizes")
    p.add_argument("--smoke", action="store_true",
                   help="one shape of the table (B*H 1, L 8, D 32), then the fixed-cost and serving tables: checks the script runs")
    p.add_argument("--row-kernel", choices=("on", "off"), default=None,
                   help="switch cpu_short's row kernel (decoding steps, tiny heads) on or off (default: as the tree has it)")
    args = p.parse_args(argv)
    if args.layer:
        os.environ["NUMBA_THREADING_LAYER"] = args.layer
    import numba
    import torch

    from selfattn import attention

    if args.row_kernel is not None:
        from selfattn.backends import cpu

        cpu.USE_ROW_KERNEL = args.row_kernel == "on"

    rows = []
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, numba {numba.__version__}, "
          f"threading layer {args.layer or 'default'}, row kernel {args.row_kernel or 'as in the tree'}\n")
    if args.serving:
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            serving_cost(threads, rows)
        return _write(args, rows)
    if args.fixed:
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            fixed_cost(threads, rows)
            serving_cost(threads, rows)
            print_calibration()
        return _write(args, rows)
    print("| threads | pass | B*H | L | D | cpu (us) | sdpa (us) | sdpa / cpu |")
    print("|---|---|---|---|---|---|---|---|")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for grad in (False, True):
            for bh in (1,) if args.smoke else (1, 8, 64):
                for L in (8,) if args.smoke else (8, 16, 32, 48, 96, 128):
                    for D in (32,) if args.smoke else (32, 64):
                        q, k, v, g = (torch.randn(bh, 1, L, D, requires_grad=grad) for _ in range(4))

                        def run(backend):
                            if grad:
                                attention(q, k, v, causal=True, backend=backend).backward(g)
                            else:
                                with torch.no_grad():
                                    attention(q, k, v, causal=True, backend=backend)

                        run("cpu"), run("sdpa")  # warm-up (numba loads its kernels)
                        n = 1 if args.smoke else max(5, int(2e7 / (bh * L * L * D * (3 if grad else 1) + 2e5)))
                        t_cpu, t_sdpa = best_time(lambda: run("cpu"), n), best_time(lambda: run("sdpa"), n)
                        name = "fwd+bwd" if grad else "fwd"
                        print(f"| {threads} | {name} | {bh} | {L} | {D} | {t_cpu * 1e6:.1f} | {t_sdpa * 1e6:.1f} | {t_sdpa / t_cpu:.2f} |",
                              flush=True)
                        rows.append({"threads": threads, "pass": name, "bh": bh, "L": L, "D": D,
                                     "cpu_s": t_cpu, "sdpa_s": t_sdpa})
        if args.smoke:  # each table once, one call per round
            fixed_cost(threads, rows, rounds=1, min_calls=1)
            serving_cost(threads, rows, rounds=1, min_calls=1)
    print_calibration()
    return _write(args, rows)


def _write(args, rows) -> int:
    import torch

    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "layer": args.layer,
                       "load_end": os.getloadavg(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
