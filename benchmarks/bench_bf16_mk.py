"""The bfloat16 tile products (cpu_bf16.mm_bf16, mm_amx) against the float32 one (cpu_flash._mm), one thread (issue 14).

    python benchmarks/bench_bf16_mk.py [--json benchmarks/results/bench_bf16_mk.json]

Flash-attention tile shapes (m x k x n): 64x64x64 (Q K^T and P V at head dim 64), 64x128x64 (Q K^T
at head dim 128) and 64x64x128 (P V at head dim 128), each looped in cache. Alongside, in the same
run: the float32 FMA ceiling (benchmarks/peak.py's loop of independent FMAs), the vdpbf16ps ceiling
(cpu_bf16.dot_ceiling_loop: the same kind of loop of independent vdpbf16ps, 64 FLOPs each), the AMX
product where the CPU has AMX-BF16 (tile configuration loaded once for the loop, and again around
every call: AMX+cfg), what the flash loop pays per tile around the bfloat16 product (converting a
64x64 float32 P, packing a 64x64 block), and an Amdahl estimate of the dense forward: the `cpu`
backend's float32 forward (1, 1, L, L, 64) less its float32 tile products plus the bfloat16 ones
(with P's conversion).

All times are CPU time of this thread (time.thread_time: the machine is shared), best of 5;
ratios compare numbers of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

SHAPES = [(64, 64, 64), (64, 128, 64), (64, 64, 128)]


def _cpu_time(fn, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t0)
    return best


def _forward_estimate(L: int, amx: bool) -> dict:
    # Amdahl: the float32 `cpu` dense forward (1, 1, L, L, 64) on one thread, less its 2 x 64x64x64
    # float32 products per tile, plus what the bfloat16 products (and P's conversion) would take instead
    import torch
    from numba import njit

    import selfattn
    from selfattn.kernels import cpu_bf16, cpu_flash

    D, T = 64, 64
    q, k, v = (torch.randn(1, 1, L, D) for _ in range(3))
    selfattn.attention(q, k, v, backend="cpu")
    total = _cpu_time(lambda: selfattn.attention(q, k, v, backend="cpu"))
    tiles = (L // T) ** 2

    @njit
    def f32_products(a, b, c, it):
        for _ in range(it):
            cpu_flash._mm(a, b, c, T, D, T)
            cpu_flash._mm(a, b, c, T, T, D)

    @njit
    def dot_products(ab, bp, c, x, xb, it):
        for _ in range(it):
            cpu_bf16.mm_bf16(ab, bp, c, T, D, T)
            cpu_bf16.to_bf16_rows(x, xb, T, T)
            cpu_bf16.mm_bf16(xb, bp, c, T, T, D)

    @njit
    def amx_products(ab, bp, c, x, xb, it):
        cpu_bf16.amx_begin()
        for _ in range(it):
            cpu_bf16.mm_amx(ab, bp, c, T, D, T)
            cpu_bf16.to_bf16_rows(x, xb, T, T)
            cpu_bf16.mm_amx_add(xb, bp, c, T, T, D)  # P V added into the rescaled accumulator
        cpu_bf16.amx_end()

    a = np.random.default_rng(1).random((T, T)).astype(np.float32)
    c = np.zeros((T, T), np.float32)
    ab, xb = np.zeros((T, T), np.uint16), np.zeros((T, T), np.uint16)
    cpu_bf16.to_bf16(a, ab)
    bp = np.zeros((T // 2, T, 2), np.uint16)
    cpu_bf16.pack_pairs(a, bp)
    f32_products(a, a, c, 1)
    dot_products(ab, bp, c, a, xb, 1)
    t_f32 = _cpu_time(lambda: f32_products(a, a, c, tiles))
    t_dot = _cpu_time(lambda: dot_products(ab, bp, c, a, xb, tiles))
    out = {"L": L, "forward_ms": total * 1e3, "f32_products_ms": t_f32 * 1e3, "dot_products_ms": t_dot * 1e3}
    line = (f"dense forward (1, 1, {L}, {L}, 64), 1 thread: float32 {total * 1e3:.1f} ms, of which its products {t_f32 * 1e3:.1f} ms"
            f" ({t_f32 / total:.0%}); with mm_bf16: {(total - t_f32 + t_dot) * 1e3:.1f} ms ({total / (total - t_f32 + t_dot):.2f}x)")
    if amx:
        amx_products(ab, bp, c, a, xb, 1)
        t_amx = _cpu_time(lambda: amx_products(ab, bp, c, a, xb, tiles))
        out["amx_products_ms"] = t_amx * 1e3
        line += f"; with mm_amx: {(total - t_f32 + t_amx) * 1e3:.1f} ms ({total / (total - t_f32 + t_amx):.2f}x)"
    print("Amdahl estimate, " + line)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--seconds", type=float, default=0.3, help="CPU time per measurement (about)")
    p.add_argument("--length", type=int, default=2048, help="sequence length of the forward estimate (0: skip it)")
    args = p.parse_args(argv)
    import numba
    import torch
    from numba import njit

    import peak
    from selfattn.kernels import cpu_bf16, cpu_flash

    torch.set_num_threads(1)
    numba.set_num_threads(1)
    print(f"machine: {platform.processor() or platform.machine()}, numba {numba.__version__}, "
          f"AVX512-BF16: {cpu_bf16.host_has_bf16_dot()} (has_bf16_dot: {cpu_bf16.has_bf16_dot()})")
    if not cpu_bf16.host_has_bf16_dot():
        print("this CPU has no AVX512-BF16: nothing to measure")
        return 0

    # -- the two ceilings --
    n_iter = 2_000_000
    peak.fma_loop(1000, np.float32(1.0))
    fma = n_iter * peak.flops_per_iter() / _cpu_time(lambda: peak.fma_loop(n_iter, np.float32(1.0))) / 1e9
    cpu_bf16.dot_ceiling_loop(1000)
    dot = n_iter * cpu_bf16.CEILING_CHAINS * 64 / _cpu_time(lambda: cpu_bf16.dot_ceiling_loop(n_iter)) / 1e9
    print(f"ceilings, 1 thread, CPU time: float32 FMA {fma:6.1f} GFLOP/s, vdpbf16ps {dot:6.1f} GFLOP/s "
          f"({dot / fma:.2f}x the FMA ceiling); peak.measure(1) (wall time) {peak.measure(1, seconds=0.2, repeats=3):6.1f}")
    print(f"cpu_bf16.bf16_dot_speedup() = {cpu_bf16.bf16_dot_speedup():.2f} -> bf16_dot_pays() = {cpu_bf16.bf16_dot_pays()}; "
          f"has_amx_bf16() = {cpu_bf16.has_amx_bf16()}")

    @njit
    def loop_bf16(a, bp, c, m, k, n, it):
        for _ in range(it):
            cpu_bf16.mm_bf16(a, bp, c, m, k, n)

    @njit
    def loop_amx_each(a, bp, c, m, k, n, it):
        # tile configuration loaded and released around every product
        for _ in range(it):
            cpu_bf16.amx_begin()
            cpu_bf16.mm_amx(a, bp, c, m, k, n)
            cpu_bf16.amx_end()

    @njit
    def loop_amx(a, bp, c, m, k, n, it):
        # once around the whole sequence, as a flash task would
        cpu_bf16.amx_begin()
        for _ in range(it):
            cpu_bf16.mm_amx(a, bp, c, m, k, n)
        cpu_bf16.amx_end()

    amx = cpu_bf16.host_has_amx_bf16()

    @njit
    def loop_f32(a, b, c, m, k, n, it):
        for _ in range(it):
            cpu_flash._mm(a, b, c, m, k, n)

    rng = np.random.default_rng(0)
    rows = []
    print(f"{'m x k x n':>12} {'bf16 GF/s':>10} {'f32 GF/s':>10} {'bf16/f32':>9} {'bf16/dot':>9} {'bf16/FMA':>9} {'f32/FMA':>8}"
          f" {'AMX GF/s':>9} {'AMX/f32':>8} {'AMX+cfg':>8}")
    for m, k, n in SHAPES:
        af = rng.standard_normal((m, k)).astype(np.float32)
        bf = rng.standard_normal((k, n)).astype(np.float32)
        a = np.empty((m, k), np.uint16)
        cpu_bf16.to_bf16(af, a)
        bp = np.empty(((k + 1) // 2, n, 2), np.uint16)
        cpu_bf16.pack_pairs(bf, bp)
        c = np.empty((m, n), np.float32)
        loop_bf16(a, bp, c, m, k, n, 1)
        loop_f32(af, bf, c, m, k, n, 1)
        flops = 2 * m * k * n
        it = max(100, int(args.seconds * 60e9 / flops))
        g_bf16 = flops * it / _cpu_time(lambda: loop_bf16(a, bp, c, m, k, n, it)) / 1e9
        g_f32 = flops * it / _cpu_time(lambda: loop_f32(af, bf, c, m, k, n, it)) / 1e9
        row = {"m": m, "k": k, "n": n, "bf16_gflops": g_bf16, "f32_gflops": g_f32}
        line = f"{m:>4}x{k}x{n:<4} {g_bf16:10.1f} {g_f32:10.1f} {g_bf16 / g_f32:9.2f} {g_bf16 / dot:9.2f} {g_bf16 / fma:9.2f} {g_f32 / fma:8.2f}"
        if amx:  # the shapes are whole tiles: no padding needed
            loop_amx(a, bp, c, m, k, n, 1)
            loop_amx_each(a, bp, c, m, k, n, 1)
            row["amx_gflops"] = flops * it / _cpu_time(lambda: loop_amx(a, bp, c, m, k, n, it)) / 1e9
            row["amx_cfg_each_gflops"] = flops * it / _cpu_time(lambda: loop_amx_each(a, bp, c, m, k, n, it)) / 1e9
            line += f" {row['amx_gflops']:9.1f} {row['amx_gflops'] / g_f32:8.2f} {row['amx_cfg_each_gflops']:8.1f}"
        rows.append(row)
        print(line)

    # -- what a flash tile pays around the product --
    @njit
    def loop_cvt(x, out, it):
        for _ in range(it):
            cpu_bf16.to_bf16(x, out)

    @njit
    def loop_pack(x, out, it):
        for _ in range(it):
            cpu_bf16.pack_pairs(x, out)

    @njit
    def loop_pack_t(x, out, it):
        for _ in range(it):
            cpu_bf16.pack_pairs_t(x, out)

    @njit
    def loop_pack_rows(x, out, it):
        for _ in range(it):
            cpu_bf16.pack_pairs_rows(x, out, 64, 64)

    @njit
    def loop_cvt_t(x, out, it):
        for _ in range(it):
            cpu_bf16.to_bf16_t(x, out)

    @njit
    def loop_cvt_rows(x, out, it):
        for _ in range(it):
            cpu_bf16.to_bf16_rows(x, out, 64, 64)

    x = rng.random((64, 64)).astype(np.float32)
    xb = np.empty((64, 64), np.uint16)
    cpu_bf16.to_bf16(x, xb)
    packed = np.empty((32, 64, 2), np.uint16)
    it = 20_000
    extra = {}
    product = f"64x64x64 product: mm_bf16 {2 * 64 ** 3 / rows[0]['bf16_gflops'] / 1e3:.3f} us"
    if amx:
        product += f", mm_amx {2 * 64 ** 3 / rows[0]['amx_gflops'] / 1e3:.3f} us"
    for name, fn, src in (("to_bf16 64x64 float32", loop_cvt, (x, xb)), ("to_bf16_rows 64x64 float32", loop_cvt_rows, (x, xb)),
                          ("to_bf16_t 64x64 float32", loop_cvt_t, (x, xb)),
                          ("pack_pairs_rows 64x64 float32", loop_pack_rows, (x, packed)),
                          ("pack_pairs 64x64 bf16", loop_pack, (xb, packed)), ("pack_pairs_t 64x64 bf16", loop_pack_t, (xb, packed))):
        fn(*src, 1)
        us = _cpu_time(lambda: fn(*src, it)) / it * 1e6
        extra[name] = us
        print(f"{name:>30}: {us:6.3f} us per tile ({product})")
    estimate = _forward_estimate(args.length, amx) if args.length else None
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "numba": numba.__version__, "fma_gflops": fma,
                       "vdpbf16ps_gflops": dot, "amx": amx, "tiles": rows, "per_tile_us": extra,
                       "forward_estimate": estimate}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
