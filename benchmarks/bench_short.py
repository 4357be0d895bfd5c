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

``--fixed``: the fixed cost of one call on tiny shapes -- (1, 1, 8, 8, 16), a decoding step
(1, 4, 1, 128, 64) and (1, 8, 64, 64, 64) -- forward and forward + backward, for selfattn's `cpu`,
`sdpa` and `auto` backends and torch's scaled_dot_product_attention called directly; best of 9
repeats of a timed loop, in this thread's CPU time with one thread (steady on a busy machine), wall
time with more. "torch direct / cpu" >= 1 is issue 14's target (cpu's call at or below SDPA's).
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


def best_time(fn, n: int, repeats: int = 5, clock=time.perf_counter) -> float:
    times = []
    for _ in range(repeats):
        t0 = clock()
        for _ in range(n):
            fn()
        times.append((clock() - t0) / n)
    return min(times)


FIXED_SHAPES = [(1, 1, 8, 8, 16), (1, 4, 1, 128, 64), (1, 8, 64, 64, 64)]  # (B, H, Lq, Lk, D)


def fixed_cost(threads: int, rows: list) -> None:
    """Per-call cost on tiny shapes: cpu and sdpa through selfattn, and torch's SDPA directly."""
    import torch
    import torch.nn.functional as F

    from selfattn import attention

    clock = time.thread_time if threads == 1 else time.perf_counter
    print(f"\nfixed cost per call, {threads} thread(s), {'thread CPU' if threads == 1 else 'wall'} time, best of 9\n")
    print("| pass | (B, H, Lq, Lk, D) | cpu (us) | sdpa (us) | auto (us) | torch SDPA direct (us) | sdpa / cpu "
          "| torch direct / cpu | torch direct / sdpa |")
    print("|---|---|---|---|---|---|---|---|---|")
    for grad in (False, True):
        for B, H, Lq, Lk, D in FIXED_SHAPES:
            g = torch.Generator().manual_seed(0)
            q = torch.randn(B, H, Lq, D, generator=g, requires_grad=grad)
            k, v = (torch.randn(B, H, Lk, D, generator=g, requires_grad=grad) for _ in range(2))
            do = torch.randn(B, H, Lq, D, generator=g)
            causal = Lq == Lk  # a decoding step (one query) sees every key

            def run(backend):
                if backend == "torch":
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

            names = ("cpu", "sdpa", "auto", "torch")
            for b in names:
                run(b), run(b)  # warm-up (auto: its calibration, once per process)
            n = max(20, int(2e6 / (B * H * Lq * Lk * D * (3 if grad else 1) + 1e4)))
            t = {}
            for _ in range(9):  # interleaved rounds: every backend sees the machine of the same moment
                for b in names:
                    t[b] = min(t.get(b, float("inf")), best_time(lambda: run(b), n, repeats=1, clock=clock))
            name = "fwd+bwd" if grad else "fwd"
            print(f"| {name} | {(B, H, Lq, Lk, D)} | {t['cpu'] * 1e6:.1f} | {t['sdpa'] * 1e6:.1f} | {t['auto'] * 1e6:.1f} "
                  f"| {t['torch'] * 1e6:.1f} | {t['sdpa'] / t['cpu']:.2f} | {t['torch'] / t['cpu']:.2f} "
                  f"| {t['torch'] / t['sdpa']:.2f} |", flush=True)
            rows.append({"threads": threads, "pass": name, "shape": [B, H, Lq, Lk, D], "cpu_s": t["cpu"],
                         "sdpa_s": t["sdpa"], "auto_s": t["auto"], "torch_sdpa_s": t["torch"],
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
    p.add_argument("--fixed", action="store_true", help="only the per-call fixed cost on tiny shapes (issue 14)")
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
    if args.fixed:
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            fixed_cost(threads, rows)
            print_calibration()
        return _write(args, rows)
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
