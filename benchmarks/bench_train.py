"""Training throughput of `selfattn train` per attention backend, on the default model and task.

    python benchmarks/bench_train.py                       # math, sdpa, cpu, auto; 3 rounds of 150 steps
    python benchmarks/bench_train.py --steps 300 --rounds 5 --json benchmarks/results/bench_train.json
    python benchmarks/bench_train.py --smoke --json /tmp/x.json   # sdpa and cpu, 1 step, one round: checks the script runs

Each measurement is a fresh training run (`selfattn.training.train`, default recall task and
model: 2 layers x 4 heads, width 64, 32 sequences of 48 tokens per step, 1 thread) for
``--steps`` steps without evaluation; the number is training tokens per second (forward,
backward, optimizer step; evaluation excluded), as `selfattn train` reports it. Two modes:
"stats" logs per-head statistics every 25 steps as the default run does (sdpa has none and
skips them), "plain" never asks for statistics. Backends run interleaved, round by round, so
slow drifts of a shared machine's load hit them alike; the table gives the median over rounds
and each backend's ratio to sdpa within the same rounds. A warm-up run per backend first
(numba's kernels load or compile there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

import torch  # noqa: E402

from selfattn.training import make_config, train  # noqa: E402


def run(backend: str, steps: int, stats: bool, out: str) -> float:
    cfg = make_config(dict(backend=backend, steps=steps, target_acc=None, eval_every=10 * steps,
                           stats_every=25 if stats else 10 * steps, checkpoint_every=10 * steps, out=out))
    return train(cfg).train_tokens_per_s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--backends", default="math,sdpa,cpu,auto")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--warmup-steps", type=int, default=20, help="steps of the warm-up run per backend")
    p.add_argument("--smoke", action="store_true", help="backends sdpa,cpu, 1 step, 1 round, 1 warm-up step: checks the script runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.rounds, args.warmup_steps, args.backends = 1, 1, 1, "sdpa,cpu"
    backends = args.backends.split(",")
    modes = ("stats", "plain")
    tps = {(b, m): [] for b in backends for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        for b in backends:
            run(b, args.warmup_steps, True, os.path.join(tmp, "warm"))
        for r in range(args.rounds):
            for m in modes:
                for b in backends:
                    tps[(b, m)].append(run(b, args.steps, m == "stats", os.path.join(tmp, f"{b}-{m}")))
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{b}/{m} {tps[(b, m)][-1]:,.0f}" for m in modes for b in backends),
                  file=sys.stderr)
    load = os.getloadavg()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; load average {load[0]:.2f} "
          f"(1 min) {load[1]:.2f} (5 min) at the end; {args.rounds} rounds x {args.steps} steps\n")
    print("| backend | mode | tokens/s (median) | min - max | vs sdpa (median of per-round ratios) |")
    print("|---|---|---|---|---|")
    rows = []
    for m in modes:
        for b in backends:
            v = tps[(b, m)]
            ratio = statistics.median(x / s for x, s in zip(v, tps[("sdpa", m)])) if "sdpa" in backends else float("nan")
            print(f"| {b} | {m} | {statistics.median(v):,.0f} | {min(v):,.0f} - {max(v):,.0f} | {ratio:.2f} |")
            rows.append({"backend": b, "mode": m, "tokens_per_s": v, "ratio_vs_sdpa": ratio})
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "steps": args.steps, "rounds": args.rounds, "load_end": load,
                       "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
