"""bfloat16 forward and backward of the ``cpu`` backend (selfattn.kernels.cpu_amx) against its float32 kernel and torch SDPA (issue 14).

    python benchmarks/bench_amx.py                    # issue 14's bfloat16 targets: 2 threads, the engine the backend picks
    python benchmarks/bench_amx.py --engine dot       # products on AVX512-BF16 vdpbf16ps (AMD Zen 4/5; Intel with AVX512-BF16)
    python benchmarks/bench_amx.py --engine amx       # products on the AMX tile unit (Intel Sapphire Rapids and later)
    python benchmarks/bench_amx.py --threads 1 --dense 1,4,2048,128 --causal ""   # one thread, one dense shape
    python benchmarks/bench_amx.py --smoke --json /tmp/amx.json   # tiny shapes, one round: checks the script runs

The bfloat16 kernels run their block products on one of two engines (``cpu_amx.engine()``): AMX where the CPU
and OS grant it, else vdpbf16ps where it beats float32 (``cpu_bf16.bf16_dot_pays``), else bfloat16 inputs take
the float32 kernels ("float32 fallback"). ``--engine auto`` (the default) measures what the backend uses in this
environment (``SELFATTN_CPU_BF16_ENGINE``, ``SELFATTN_CPU_BF16=0`` as set); ``amx`` / ``dot`` set
``SELFATTN_CPU_BF16_ENGINE`` for this run and stop with exit code 2 where the CPU lacks that engine. The output
and the JSON name the engine, the CPU, and the calls each engine took during the run (``cpu_amx.AMX_CALLS``:
a bfloat16 row that never reached the engine says so).

Cases, at (B, H, L, L, D) with the same random inputs in both dtypes: dense forward (``--dense``), and causal
forward and forward + backward (``--causal``); the backward alone is the difference of the fwd+bwd and forward
best times of the same run. Variants: the ``cpu`` backend in bfloat16 and in float32, torch SDPA in bfloat16
and float32 (``--no-sdpa`` leaves them out), and the bfloat16 operands' packing alone. Every variant is timed in
turn within one round and the rounds are interleaved, so load changes hit every variant alike; each figure is the
best of ``--rounds``, and each ratio to the float32 kernel is given both as best / best and as the median of the
per-round ratios. One thread: this thread's CPU time (time.thread_time; the machine is shared). More threads:
wall time (the kernels' workers are other threads), the process's CPU time recorded beside it. FLOPs as DESIGN.md
counts them: 4*B*H*L*L*D, halved for causal, x2.5 for the backward (fwd+bwd = 3.5x).

Targets (issue 14, 2 threads): bfloat16 dense forward (1, 16, 2048, 2048, 64) >= 1.6x the float32 kernel;
bfloat16 causal forward + backward (1, 16, 4096, 4096, 64) >= 1.3x.

Writes benchmarks/results/bench_amx.json (``--json PATH`` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import peak  # noqa: E402
import selfattn  # noqa: E402
from selfattn.kernels import cpu_amx, cpu_bf16, cpu_flash  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "bench_amx.json")
TARGETS = {"dense fwd": 1.6, "causal fwd+bwd": 1.3}  # issue 14: bfloat16 / float32 speed, 2 threads
TARGET_SHAPES = {"dense fwd": (1, 16, 2048, 64), "causal fwd+bwd": (1, 16, 4096, 64)}  # (B, H, L, D)
SMOKE_SHAPE = "1,2,256,64"


def engine_name(eng=None) -> str:
    """'amx', 'dot' or 'float32 fallback': what cpu_amx.engine() (or ``eng``) computes bfloat16 products on."""
    eng = cpu_amx.engine() if eng is None else eng
    if eng is None:
        return "float32 fallback"
    return "amx" if eng is cpu_amx.ENGINE_AMX else "dot"


def _shapes(text: str) -> list:
    out = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        dims = tuple(int(x) for x in part.split(","))
        if len(dims) != 4:
            raise SystemExit(f"bench_amx: a shape is B,H,L,D (four integers), got {part!r}")
        out.append(dims)
    return out


def _fwd_bwd(fn, q, k, v, do):
    def run():
        leafs = [t.detach().requires_grad_() for t in (q, k, v)]
        fn(*leafs).backward(do)
    return run


def _variants(q, k, v, qb, kb, vb, causal: bool, backward: bool, sdpa: bool, eng) -> dict:
    """name -> (callable, dtype, pass) for one case."""
    F = torch.nn.functional

    def ours(*t):
        return selfattn.attention(*t, backend="cpu", causal=causal)

    def theirs(*t):
        return F.scaled_dot_product_attention(*t, is_causal=causal)

    out = {}
    for dt, (a, b, c) in (("bfloat16", (qb, kb, vb)), ("float32", (q, k, v))):
        fwd = {"cpu": lambda a=a, b=b, c=c: torch.no_grad()(ours)(a, b, c)}
        if sdpa:
            fwd["sdpa"] = lambda a=a, b=b, c=c: torch.no_grad()(theirs)(a, b, c)
        for impl, fn in fwd.items():
            out[f"{impl} {dt} fwd"] = (fn, dt, "fwd")
        if backward:
            g = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(a.dtype)
            out[f"cpu {dt} fwd+bwd"] = (_fwd_bwd(ours, a, b, c, g), dt, "fwd+bwd")
            if sdpa:
                out[f"sdpa {dt} fwd+bwd"] = (_fwd_bwd(theirs, a, b, c, g), dt, "fwd+bwd")
    if eng is not None and not backward:
        opts = cpu_flash.make_opts(np.float32, q.shape[-1] ** -0.5, 0.0, False)
        out["bf16 operand packing only"] = (lambda: cpu_amx.prepare(qb, kb, vb, opts, eng), "bfloat16", "pack")
    return out


def run_case(name: str, shape, causal: bool, backward: bool, args, eng, clock) -> list:
    b, h, L, d = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, L, d, generator=g) for _ in range(3))
    qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
    q, k, v = (t.to(torch.float32) for t in (qb, kb, vb))  # the same values in both dtypes
    variants = _variants(q, k, v, qb, kb, vb, causal, backward, not args.no_sdpa, eng)
    calls0 = dict(cpu_amx.AMX_CALLS)
    for fn, _, _ in variants.values():
        fn()  # compile / load the kernels, warm up
    calls = {key: cpu_amx.AMX_CALLS[key] - calls0.get(key, 0) for key in cpu_amx.AMX_CALLS}
    times = {n: [] for n in variants}
    cpu = {n: [] for n in variants}
    for _ in range(args.rounds):  # interleaved: load changes hit every variant alike
        for n, (fn, _, _) in variants.items():
            c0, t0 = time.process_time(), clock()
            fn()
            times[n].append(clock() - t0)
            cpu[n].append(time.process_time() - c0)
    flops = 4.0 * b * h * L * L * d * (0.5 if causal else 1.0)
    best = {n: min(t) for n, t in times.items()}
    # the backward alone, as the difference of two best times of the same run
    bwd = {dt: best[f"cpu {dt} fwd+bwd"] - best[f"cpu {dt} fwd"] for dt in ("bfloat16", "float32")} if backward else {}
    entries = [(n, dt, pas, best[n], times[n], min(cpu[n])) for n, (_, dt, pas) in variants.items()]
    entries += [(f"cpu {dt} bwd (fwd+bwd - fwd)", dt, "bwd", t, None, None) for dt, t in bwd.items()]
    rows = []
    for n, dt, pas, t, per_round, cpu_s in entries:
        fl = flops * {"fwd": 1.0, "fwd+bwd": 3.5, "bwd": 2.5}.get(pas, 0.0)
        row = dict(case=name, shape=[b, h, L, L, d], causal=causal, variant=n, dtype=dt, ms=t * 1e3,
                   gflops=fl / t / 1e9 if fl else None, cpu_ms=None if cpu_s is None else cpu_s * 1e3)
        row["pass"] = pas
        base = bwd.get("float32") if pas == "bwd" else best.get(f"cpu float32 {pas}")
        if base is not None:
            row["vs_cpu_float32"] = base / t
            if per_round is not None:
                row["vs_cpu_float32_round_median"] = statistics.median(
                    a / x for a, x in zip(times[f"cpu float32 {pas}"], per_round))
        rows.append(row)
    return rows, calls


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=("auto", "amx", "dot"), default="auto",
                   help="bfloat16 product engine (default auto: what the backend uses here)")
    p.add_argument("--threads", type=int, default=2, help="torch (and kernel) threads (default 2: issue 14's targets)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; each figure is the best of them")
    p.add_argument("--dense", default="1,16,2048,64;1,16,2048,128", help="dense forward shapes B,H,L,D;... ('' for none)")
    p.add_argument("--causal", default="1,16,4096,64", help="causal forward and fwd+bwd shapes B,H,L,D;... ('' for none)")
    p.add_argument("--no-sdpa", action="store_true", help="leave torch SDPA out")
    p.add_argument("--smoke", action="store_true", help=f"tiny shapes ({SMOKE_SHAPE}), one round: checks the script runs")
    p.add_argument("--json", metavar="PATH", help=f"where the results go (default {RESULTS}; --smoke: the temporary directory)")
    args = p.parse_args(argv)
    if args.smoke:
        args.dense = args.causal = SMOKE_SHAPE
        args.rounds = 1
    args.json = args.json or (os.path.join(tempfile.gettempdir(), "bench_amx_smoke.json") if args.smoke else RESULTS)
    if args.engine != "auto":
        os.environ[cpu_amx.ENGINE_ENV] = args.engine
    eng = cpu_amx.engine()
    ename = engine_name(eng)
    # what the cpu backend's features line says (cpu_amx.describe(), read now: the class attribute
    # features["bfloat16"] was made at import, before --engine set the environment)
    features = cpu_amx.describe()
    if args.engine != "auto" and eng is None:
        print(f"bench_amx: --engine {args.engine}: not on this CPU ({peak.cpu_model()}): {cpu_amx.describe()}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    timing = ("thread_time (this thread's CPU time)" if args.threads == 1 else "wall time (perf_counter)") + ", best of rounds"
    cpu_name = peak.cpu_model()
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M:%S"), cpu=cpu_name, cores=os.cpu_count(), torch=torch.__version__,
                numba=numba.__version__, threads=args.threads, timing=timing, rounds=args.rounds, engine=ename,
                engine_requested=args.engine, engine_env=os.environ.get(cpu_amx.ENGINE_ENV),
                bf16_env=os.environ.get(cpu_bf16.ENV_FLAG), cpu_features_bfloat16=features,
                amx_host=cpu_bf16.host_has_amx_bf16(), avx512_bf16_host=cpu_bf16.host_has_bf16_dot(),
                loadavg_start=os.getloadavg(), command=" ".join(["python", "benchmarks/bench_amx.py", *(argv if argv is not None else sys.argv[1:])]))
    print(f"{meta['date']}  CPU: {cpu_name}, {os.cpu_count()} cores  torch {torch.__version__}  threads {args.threads}  "
          f"load {meta['loadavg_start'][0]:.2f}")
    print(f"bfloat16 engine: {ename} (--engine {args.engine}); cpu backend: {features}")
    print(f"timing: {timing} of {args.rounds}; ratios: to the cpu float32 kernel of the same pass, best/best "
          f"(median of per-round ratios)")
    rows, calls = [], {}
    cases = [("dense fwd", s, False, False) for s in _shapes(args.dense)]
    cases += [("causal fwd+bwd", s, True, True) for s in _shapes(args.causal)]
    for name, shape, causal, backward in cases:
        case_rows, case_calls = run_case(name, shape, causal, backward, args, eng, clock)
        rows += case_rows
        for key, n in case_calls.items():
            calls[key] = calls.get(key, 0) + n
        b, h, L, d = shape
        print(f"\n{name} ({b}, {h}, {L}, {L}, {d})")
        for r in case_rows:
            gf = f"{r['gflops']:7.1f} GFLOP/s" if r["gflops"] else " " * 15
            ratio = ""
            if "vs_cpu_float32" in r:
                med = r.get("vs_cpu_float32_round_median")
                ratio = f"  {r['vs_cpu_float32']:5.2f}x cpu float32 {r['pass']}" + (f" ({med:.2f})" if med else "")
            print(f"  {r['variant']:<30} {r['ms']:9.2f} ms {gf}{ratio}")
    # did the bfloat16 calls run on the engine named above?
    meta["engine_calls"] = calls
    took = calls.get("amx", 0) + calls.get("dot", 0)
    print(f"\nbfloat16 calls on the engines during warm-up: forward amx {calls.get('amx', 0)}, dot {calls.get('dot', 0)}; "
          f"backward amx {calls.get('amx_backward', 0)}, dot {calls.get('dot_backward', 0)}")
    if eng is not None and calls.get(ename, 0) != took:
        print(f"WARNING: bfloat16 calls ran on another engine than {ename}: {calls}")
    if eng is not None and not took:
        print(f"WARNING: no bfloat16 call reached the {ename} engine: the bfloat16 rows measure another path")
    summary = []
    for name, target in TARGETS.items():
        pas = "fwd" if name == "dense fwd" else "fwd+bwd"
        for r in rows:
            if r["case"] == name and r["variant"] == f"cpu bfloat16 {pas}":
                shape = r["shape"]
                at_target = (shape[0], shape[1], shape[2], shape[4]) == TARGET_SHAPES[name] and args.threads == 2
                s = dict(case=name, shape=shape, engine=ename, threads=args.threads, ratio=r["vs_cpu_float32"],
                         ratio_round_median=r.get("vs_cpu_float32_round_median"), target=target,
                         met=r["vs_cpu_float32"] >= target, met_round_median=r["vs_cpu_float32_round_median"] >= target,
                         issue_shape_and_threads=at_target)
                summary.append(s)
                # both readings must agree for a plain verdict (they differ on a loaded machine)
                verdict = {(True, True): "met", (False, False): "NOT met", (True, False): "met by best/best only",
                           (False, True): "met by the rounds' median only"}[(s["met"], s["met_round_median"])]
                print(f"issue 14: bfloat16 {name} {tuple(shape)} on {ename}, {args.threads} threads: "
                      f"{s['ratio']:.2f}x float32 (rounds' median {s['ratio_round_median']:.2f}x); target >= {target}x: "
                      f"{verdict}" + ("" if at_target else "  (not the issue's shape/threads)"))
    meta["loadavg_end"] = os.getloadavg()
    print(f"load average at the end: {meta['loadavg_end'][0]:.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(dict(meta, rows=rows, targets=summary), f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
