"""The machine's float32 FMA ceiling, measured the way the `cpu` kernels are compiled (issue 14).

    python benchmarks/peak.py                # GFLOP/s on 1 thread and on every core, plus torch.mm
    python benchmarks/peak.py --smoke        # the same in milliseconds (checks the script runs; numbers meaningless)

A numba intrinsic emits one LLVM loop that keeps ``CHAINS`` independent accumulators of the
widest float32 vector register the host has (<16 x float> with AVX-512, <8 x float> with AVX2,
found at run time from LLVM's host features) and updates each with one fused multiply-add per
iteration: no loads, no stores, nothing but FMAs. Enough independent chains cover the FMA
latency on both pipes, and few enough fit the register file (16 ymm with AVX2, 32 zmm with
AVX-512), so the loop runs at the issue rate.
FLOPs = iterations x CHAINS x 16 lanes x 2. Several threads run the same loop (numba releases
the GIL), each on its own core.

Other benchmarks import :func:`measure` and report their attention figures as a share of it.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic



def _host_has(feature: str) -> bool:
    import llvmlite.binding as ll

    return f"+{feature}" in ll.get_host_cpu_features().flatten().split(",")


AVX512 = _host_has("avx512f")
LANES = 16 if AVX512 else 8  # float32 lanes of the widest vector register
CHAINS = 16 if AVX512 else 12  # independent accumulators: FMA latency 4 x 2 pipes needs >= 8; all in registers


@intrinsic
def _fma_loop(typingctx, n_iter, seed):
    # n_iter iterations of CHAINS independent vector FMAs acc = acc * m + a; returns the lane sum
    if n_iter != types.int64 or seed != types.float32:
        return None
    sig = types.float32(types.int64, types.float32)

    def codegen(context, builder, signature, args):
        n, s = args
        f32 = ir.FloatType()
        vec = ir.VectorType(f32, LANES)
        name = f"llvm.fma.v{LANES}f32"
        fma = builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(vec, [vec, vec, vec]), name=name)
        splat = lambda x: builder.insert_element(ir.Constant(vec, ir.Undefined), x, ir.Constant(ir.IntType(32), 0))  # noqa: E731
        zero_mask = ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES)
        base = builder.shuffle_vector(splat(s), ir.Constant(vec, ir.Undefined), zero_mask)  # seed in every lane
        m = ir.Constant(vec, [0.999999] * LANES)  # |acc| stays bounded: acc -> a / (1 - m)
        a = ir.Constant(vec, [1e-6] * LANES)
        inits = [builder.fadd(base, ir.Constant(vec, [float(c)] * LANES)) for c in range(CHAINS)]
        entry = builder.block
        loop = builder.append_basic_block("fma_loop")
        done = builder.append_basic_block("fma_done")
        builder.branch(loop)
        builder.position_at_end(loop)
        i = builder.phi(ir.IntType(64))
        i.add_incoming(ir.Constant(ir.IntType(64), 0), entry)
        accs = []
        for init in inits:
            phi = builder.phi(vec)
            phi.add_incoming(init, entry)
            accs.append(phi)
        new = [builder.call(fma, [acc, m, a]) for acc in accs]
        for phi, val in zip(accs, new):
            phi.add_incoming(val, loop)
        nxt = builder.add(i, ir.Constant(ir.IntType(64), 1))
        i.add_incoming(nxt, loop)
        builder.cbranch(builder.icmp_signed("<", nxt, n), loop, done)
        builder.position_at_end(done)
        total = new[0]
        for val in new[1:]:
            total = builder.fadd(total, val)
        out = builder.extract_element(total, ir.Constant(ir.IntType(32), 0))
        for lane in range(1, LANES):
            out = builder.fadd(out, builder.extract_element(total, ir.Constant(ir.IntType(32), lane)))
        return out

    return sig, codegen


@njit(nogil=True, cache=True)
def fma_loop(n_iter, seed):
    """Run the FMA loop ``n_iter`` times; returns a number that depends on every FMA."""
    return _fma_loop(np.int64(n_iter), np.float32(seed))


def flops_per_iter() -> int:
    return CHAINS * LANES * 2


def _one_thread(n_iter, out, slot, barrier):
    barrier.wait()
    t0 = time.perf_counter()
    fma_loop(n_iter, np.float32(slot + 1))
    out[slot] = time.perf_counter() - t0


def measure(threads: int = 1, seconds: float = 0.5, repeats: int = 5) -> float:
    """Best-of-``repeats`` GFLOP/s of the FMA loop on ``threads`` threads, each running ~``seconds``."""
    fma_loop(1000, np.float32(1.0))  # compile (or load from the cache) outside the timing
    t0 = time.perf_counter()
    fma_loop(10_000_000, np.float32(1.0))
    per_iter = (time.perf_counter() - t0) / 10_000_000
    n_iter = max(1_000_000, int(seconds / per_iter))
    best = 0.0
    for _ in range(repeats):
        out = [0.0] * threads
        barrier = threading.Barrier(threads)
        workers = [threading.Thread(target=_one_thread, args=(n_iter, out, s, barrier)) for s in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, threads * n_iter * flops_per_iter() / max(out) / 1e9)
    return best


def cpu_model() -> str:
    """The CPU as /proc/cpuinfo names it, with its vendor family and model numbers (AMD family 25 model 17 is
    Zen 4 EPYC, family 26 Zen 5): "AMD EPYC (AuthenticAMD family 25 model 17)"; the platform's word elsewhere."""
    import platform

    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, val = line.partition(":")
                info.setdefault(key.strip(), val.strip())
    except OSError:
        pass
    name = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info:
        name += f" ({info.get('vendor_id', '?')} family {info['cpu family']} model {info.get('model', '?')})"
    return name


def mm_gflops(n: int = 2048, threads: int | None = None, repeats: int = 5) -> float:
    """torch.mm n x n x n in float32 on torch's threads: best-of-``repeats`` GFLOP/s."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for the all-core figure (default: every core)")
    ap.add_argument("--smoke", action="store_true", help="a few milliseconds per figure and torch.mm at 256: checks the script runs")
    args = ap.parse_args(argv)
    seconds, repeats, n = (0.01, 1, 256) if args.smoke else (0.5, 5, 2048)
    one = measure(1, seconds, repeats)
    many = measure(args.threads, seconds, repeats)
    isa = "AVX-512" if AVX512 else "AVX2 (no AVX-512 on this host)"
    print(f"CPU: {cpu_model()}")
    print(f"FMA peak, {isa}, <{LANES} x float> x {CHAINS} chains: 1 thread {one:7.1f} GFLOP/s, {args.threads} threads {many:7.1f} GFLOP/s")
    print(f"torch.mm {n}^3 float32: 1 thread {mm_gflops(n, 1, repeats):7.1f} GFLOP/s, "
          f"{args.threads} threads {mm_gflops(n, args.threads, repeats):7.1f} GFLOP/s")


if __name__ == "__main__":
    main()
