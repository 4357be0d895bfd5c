"""bfloat16 forward on AMX (selfattn.kernels.cpu_amx) against the float32 ``cpu`` kernel and torch SDPA.

One thread, CPU time (time.thread_time: the machine is shared, wall time is not meaningful), every
variant timed in turn within one run, best of N rounds. Dense (no mask) and causal forward at
(B, H, L, L, D), and causal forward + backward; the issue 14 targets are bf16 dense forward >= 1.6x
the float32 kernel and bf16 causal forward + backward >= 1.3x. The backward alone is reported as
the difference of the fwd+bwd and forward best times of the same run.

Writes benchmarks/results/bench_amx.json. Run: .venv/bin/python benchmarks/bench_amx.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numba
import numpy as np
import torch

import selfattn
from selfattn.kernels import cpu_amx, cpu_bf16, cpu_flash


def _cpu_time(fn, rounds):
    best = float("inf")
    for _ in range(rounds):
        t0 = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t0)
    return best


def _fwd_bwd(fn, q, k, v, do):
    leafs = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leafs)
    out.backward(do.to(out.dtype))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shapes", default="1,4,2048,64;1,4,2048,128")
    args = ap.parse_args()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    rows = []
    print(f"AMX: {cpu_amx.available()} ({cpu_amx.describe()})")
    for shape in args.shapes.split(";"):
        b, h, L, d = (int(x) for x in shape.split(","))
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(b, h, L, d, generator=g) for _ in range(3))
        qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
        for causal in (False, True):
            flops = 4.0 * b * h * L * L * d * (0.5 if causal else 1.0)
            variants = {
                "cpu bf16 (AMX)": lambda: selfattn.attention(qb, kb, vb, backend="cpu", causal=causal),
                "cpu float32": lambda: selfattn.attention(q, k, v, backend="cpu", causal=causal),
                "sdpa bf16": lambda: sdpa(qb, kb, vb, is_causal=causal),
                "sdpa float32": lambda: sdpa(q, k, v, is_causal=causal),
            }
            if cpu_amx.available():
                opts = cpu_flash.make_opts(np.float32, d ** -0.5, 0.0, False)
                variants["AMX packing only"] = lambda: cpu_amx.prepare(qb, kb, vb, opts)
            if causal:  # forward + backward (issue 14: bf16 causal fwd+bwd >= 1.3x float32)
                do = torch.randn(b, h, L, d, generator=g)
                variants["cpu bf16 fwd+bwd"] = lambda: _fwd_bwd(lambda *t: selfattn.attention(*t, backend="cpu", causal=True), qb, kb, vb, do)
                variants["cpu float32 fwd+bwd"] = lambda: _fwd_bwd(lambda *t: selfattn.attention(*t, backend="cpu", causal=True), q, k, v, do)
                variants["sdpa bf16 fwd+bwd"] = lambda: _fwd_bwd(lambda *t: sdpa(*t, is_causal=True), qb, kb, vb, do)
                variants["sdpa float32 fwd+bwd"] = lambda: _fwd_bwd(lambda *t: sdpa(*t, is_causal=True), q, k, v, do)
            for fn in variants.values():
                fn()  # compile / warm up
            best = {name: float("inf") for name in variants}
            for _ in range(args.rounds):  # interleaved: load changes hit every variant alike
                for name, fn in variants.items():
                    best[name] = min(best[name], _cpu_time(fn, 1))
            if causal:  # the backward alone, as the difference of two best times (same run)
                best["cpu bf16 bwd (fwd+bwd - fwd)"] = best["cpu bf16 fwd+bwd"] - best["cpu bf16 (AMX)"]
                best["cpu float32 bwd (fwd+bwd - fwd)"] = best["cpu float32 fwd+bwd"] - best["cpu float32"]
            for name, t in best.items():
                fb = "fwd+bwd" in name or "bwd (" in name
                bwd = "bwd (" in name
                base = best["cpu float32 bwd (fwd+bwd - fwd)" if bwd else "cpu float32 fwd+bwd" if fb else "cpu float32"]
                fl = flops * (2.5 if bwd else 3.5 if fb else 1.0)  # backward: 2.5x the forward's FLOPs (DESIGN.md's count)
                row = dict(shape=[b, h, L, L, d], causal=causal, variant=name, ms=t * 1e3,
                           gflops=fl / t / 1e9, vs_cpu_float32=base / t)
                rows.append(row)
                print(f"({b},{h},{L},{L},{d}) {'causal' if causal else 'dense '} {name:<18} {t * 1e3:8.2f} ms "
                      f"{fl / t / 1e9:7.1f} GFLOP/s  {base / t:5.2f}x cpu float32{' bwd' if bwd else ' fwd+bwd' if fb else ''}")
    out = dict(machine=platform.processor() or platform.machine(), threads=1, timing="thread_time, best of rounds",
               rounds=args.rounds, amx=cpu_amx.available(), amx_host=cpu_bf16.host_has_amx_bf16(), rows=rows)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_amx.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
