"""Masks given only as dense tensors: the fused `cpu` backend against torch SDPA (issue 12).

    python benchmarks/bench_dense_mask.py            # the table behind CPUBackend.rank's dense-mask rule
    python benchmarks/bench_dense_mask.py --json benchmarks/results/bench_dense_mask.json
    python benchmarks/bench_dense_mask.py --smoke --json /tmp/x.json   # one tiny shape, once: checks the script runs

SDPA takes a dense (B|1, H|1, Lq, Lk) mask as it is; `cpu` classifies its tiles first (empty tiles
skipped, full ones unmasked) and reads the mask's bits in partial tiles. Forward alone and forward
+ backward, a causal mask written as a dense bool tensor and the same as a float tensor (0 / -inf),
float32, all the threads torch uses, the median of a few runs after a warm-up; cpu and sdpa back
to back per shape, so each ratio compares two numbers of the same run.
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

import torch  # noqa: E402

import selfattn  # noqa: E402
from bench_cpu import _median_time  # noqa: E402  (the benchmarks' one timing rule)

SHAPES = [(1, 8, 256, 64), (1, 8, 1024, 64), (1, 8, 2048, 64), (4, 8, 512, 64)]  # (B, H, L, D)
SMOKE_SHAPES = [(1, 2, 96, 64)]


def _case(backend, q, k, v, go, mask, backward):
    def run():
        if backward:
            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
            selfattn.attention(qq, kk, vv, mask=mask, backend=backend).backward(go)
        else:
            with torch.no_grad():
                selfattn.attention(q, k, v, mask=mask, backend=backend)
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", help="write the raw numbers here")
    ap.add_argument("--smoke", action="store_true", help=f"only {SMOKE_SHAPES[0]}, one run: checks the script runs")
    args = ap.parse_args(argv)
    if args.smoke:
        args.reps = 1
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}")
    print("| shape (B, H, L, D) | mask | pass | cpu ms | sdpa ms | sdpa / cpu |")
    print("|---|---|---|---|---|---|")
    for b, h, L, d in SMOKE_SHAPES if args.smoke else SHAPES:
        g = torch.Generator().manual_seed(0)
        q, k, v, go = (torch.randn(b, h, L, d, generator=g) for _ in range(4))
        causal = torch.ones(L, L, dtype=torch.bool).tril()  # (L, L)
        for kind, mask in (("bool", causal), ("float", torch.zeros(L, L).masked_fill(~causal, float("-inf")))):
            for backward in (False, True):
                t_cpu = _median_time(_case("cpu", q, k, v, go, mask, backward), args.reps)
                t_sdpa = _median_time(_case("sdpa", q, k, v, go, mask, backward), args.reps)
                pas = "fwd+bwd" if backward else "fwd"
                rows.append(dict(shape=(b, h, L, d), mask=kind, backward=backward, cpu_s=t_cpu, sdpa_s=t_sdpa))
                print(f"| {(b, h, L, d)} | dense {kind} causal | {pas} | {t_cpu * 1e3:.1f} | {t_sdpa * 1e3:.1f} | {t_sdpa / t_cpu:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(torch=torch.__version__, threads=torch.get_num_threads(), date=time.strftime("%Y-%m-%d %H:%M"),
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
