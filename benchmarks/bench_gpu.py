"""GPU benchmark of the `triton` backend against torch SDPA (default and cuDNN) and FlexAttention.

    python benchmarks/bench_gpu.py                 # on a CUDA machine: the issue-6 table
    python benchmarks/bench_gpu.py --dry-run       # anywhere: shapes, FLOP counts, argument parsing
    python benchmarks/bench_gpu.py --compile       # anywhere: build every kernel for sm_90 offline
                                                   # (triton's ptxas), report registers/spills/smem

All timings are bfloat16, taken with ``triton.testing.do_bench`` (L2 flushed between runs), and
each ratio compares two numbers from the same run. FLOPs as DESIGN.md counts them: 4*B*H*Lq*Lk*D
for a forward, halved for causal, x2.5 more for the backward (forward + backward = 3.5x); for the
sliding window, 4*B*H*D times the number of allowed (query, key) pairs. Decoding is memory-bound:
it reports the bytes of K and V read divided by the time, as a share of a device-to-device copy
measured in the same run (and of the card's nominal bandwidth where the card is known).

Results: one compact table on stdout and, with ``--json PATH``, the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

import torch  # noqa: E402


@dataclass
class Case:
    name: str
    shape: tuple  # (B, H, Lq, Lk, D)
    causal: bool = False
    window: int | None = None  # left window (causal sliding window), None = none
    backward: bool = False
    stats_pair: bool = False  # time ours with return_stats on and off
    baselines: tuple = ("sdpa", "cudnn")  # among "sdpa", "cudnn", "flex"
    target: str = ""
    notes: list = field(default_factory=list)


CASES = [
    Case("dense fwd", (4, 16, 4096, 4096, 128), target=">=1.1x SDPA, >=0.9x cuDNN"),
    Case("causal fwd+bwd", (2, 16, 8192, 8192, 128), causal=True, backward=True, target=">=1.0x SDPA"),
    Case("causal fwd d64", (8, 32, 2048, 2048, 64), causal=True, target=">=1.0x SDPA"),
    Case("window 1024 fwd+bwd", (1, 16, 32768, 32768, 128), window=1024, backward=True, baselines=("flex",),
         target=">=0.9x Flex"),
    Case("decode 1 vs 32768", (4, 32, 1, 32768, 128), baselines=("sdpa", "cudnn"), target="% of bandwidth"),
    Case("stats on vs off", (4, 16, 4096, 4096, 128), stats_pair=True, baselines=(), target="<=3% slower"),
]

NOMINAL_TBPS = {"H100": 3.35, "H200": 4.8}  # HBM bandwidth of the SXM cards, TB/s


def allowed_pairs(lq, lk, causal, window):
    if window is not None:  # query at position p sees keys p - window .. p (causal window), bottom-right
        off = lk - lq
        total = 0
        for i in range(lq):  # closed form would do; lengths here are small enough for a loop of ints
            p = i + off
            total += max(0, min(p, lk - 1) - max(0, p - window) + 1)
        return total
    return lq * lk // 2 if causal else lq * lk  # DESIGN.md: halved for causal


def flops(case: Case) -> float:
    b, h, lq, lk, d = case.shape
    fwd = 4.0 * b * h * d * allowed_pairs(lq, lk, case.causal, case.window)
    return fwd * 3.5 if case.backward else fwd


def kv_bytes(case: Case) -> int:
    b, h, lq, lk, d = case.shape
    return 2 * b * h * lk * d * 2  # K and V, bfloat16


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="no GPU: print the cases, shapes and FLOP counts")
    p.add_argument("--compile", action="store_true", help="no GPU: compile every kernel variant for sm_90 offline")
    p.add_argument("--quick", action="store_true", help="with --compile: the first config of a few variants only")
    p.add_argument("--cases", default="", help="comma-separated substrings of case names to run (default all)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply sequence lengths by this (quick looks)")
    p.add_argument("--rep", type=int, default=100, help="do_bench rep (ms) per timing")
    p.add_argument("--json", default="", help="write the raw results here")
    args = p.parse_args(argv)
    if args.scale <= 0:
        p.error(f"--scale must be > 0, got {args.scale}")
    return args


def selected(args) -> list:
    wanted = [w.strip() for w in args.cases.split(",") if w.strip()]
    out = []
    for c in CASES:
        if wanted and not any(w in c.name for w in wanted):
            continue
        b, h, lq, lk, d = c.shape
        if args.scale != 1.0:
            lq = max(1, int(lq * args.scale)) if lq > 1 else 1
            lk = max(1, int(lk * args.scale))
            c = Case(**{**c.__dict__, "shape": (b, h, lq, lk, d), "notes": list(c.notes)})
        out.append(c)
    if not out:
        raise SystemExit(f"--cases {args.cases!r} matches none of {[c.name for c in CASES]}")
    return out


# -- timing on the GPU --------------------------------------------------------------------------


def _bench(fn, rep):
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=max(10, rep // 4), rep=rep))


def _inputs(case, requires_grad):
    b, h, lq, lk, d = case.shape
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda L: torch.randn(b, h, L, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(requires_grad)  # noqa: E731
    return mk(lq), mk(lk), mk(lk)


def _fwd_bwd(fn, q, k, v, backward):
    if not backward:
        return lambda: fn(q, k, v)
    do = torch.randn_like(q)

    def run():
        out = fn(q, k, v)
        torch.autograd.grad(out, (q, k, v), do)
    return run


def _ours(case, stats=False):
    from selfattn.gpu import flash_attention

    kw = {}
    if case.causal:
        kw["causal"] = True
    if case.window is not None:
        kw["window"] = case.window
    if stats:
        return lambda q, k, v: flash_attention(q, k, v, return_stats=True, **kw)[0]
    return lambda q, k, v: flash_attention(q, k, v, **kw)


def _sdpa(case, backend=None):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(q, k, v):
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=case.causal)
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=case.causal)
    return run


def _flex(case):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    b, h, lq, lk, d = case.shape
    off = lk - lq
    w = case.window

    def mask_mod(bi, hi, qi, ki):
        ok = ki <= qi + off
        if w is not None:
            ok = ok & (ki >= qi + off - w)
        return ok
    if not case.causal and w is None:
        mask_mod = None
    bm = None if mask_mod is None else create_block_mask(mask_mod, None, None, lq, lk, device="cuda")
    compiled = torch.compile(flex_attention)
    return lambda q, k, v: compiled(q, k, v, block_mask=bm)


def _copy_bandwidth(rep):
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = _bench(lambda: y.copy_(x), rep)
    return 2 * x.numel() / (ms * 1e-3) / 1e12  # TB/s, bytes read + written


def run_gpu(args) -> list:
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}; torch {torch.__version__}", flush=True)
    copy_tbps = _copy_bandwidth(args.rep)
    nominal = next((v for k, v in NOMINAL_TBPS.items() if k in dev), None)
    print(f"device-to-device copy: {copy_tbps:.2f} TB/s (read + write)" + (f"; nominal {nominal} TB/s" if nominal else ""), flush=True)
    rows = []
    for case in selected(args):
        t0 = time.time()
        row = {"case": case.name, "shape": case.shape, "target": case.target}
        q, k, v = _inputs(case, case.backward)
        try:
            row["ours_ms"] = _bench(_fwd_bwd(_ours(case), q, k, v, case.backward), args.rep)
            if case.stats_pair:
                row["stats_ms"] = _bench(_fwd_bwd(_ours(case, stats=True), q, k, v, case.backward), args.rep)
            for name in case.baselines:
                try:
                    fn = {"sdpa": lambda: _sdpa(case), "cudnn": lambda: _sdpa(case, "cudnn"), "flex": lambda: _flex(case)}[name]()
                    row[f"{name}_ms"] = _bench(_fwd_bwd(fn, q, k, v, case.backward), args.rep)
                except Exception as e:  # a baseline missing on this torch/card: say so, keep going
                    row[f"{name}_ms"] = None
                    row.setdefault("notes", []).append(f"{name}: {type(e).__name__}: {str(e)[:120]}")
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        if row.get("ours_ms"):
            row["tflops"] = flops(case) / (row["ours_ms"] * 1e-3) / 1e12
            if case.shape[2] == 1:
                tbps = kv_bytes(case) / (row["ours_ms"] * 1e-3) / 1e12
                row["tbps"] = tbps
                row["pct_copy_bw"] = 100 * tbps / copy_tbps
                if nominal:
                    row["pct_nominal_bw"] = 100 * tbps / nominal
        row["seconds"] = time.time() - t0
        rows.append(row)
        print(f"  {case.name}: done in {row['seconds']:.0f}s {row.get('error', '')}", flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def table(rows) -> str:
    head = "| case | shape (B,H,Lq,Lk,D) | ours ms | SDPA ms | cuDNN ms | Flex ms | ours TFLOP/s | SDPA/ours | cuDNN/ours | Flex/ours | note |"
    lines = [head, "|" + "---|" * 11]
    f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    r = lambda a, b: "-" if (a is None or b is None) else f"{a / b:.2f}x"  # noqa: E731
    for row in rows:
        o = row.get("ours_ms")
        note = row.get("error") or ""
        if "stats_ms" in row and o:
            note = f"stats on {row['stats_ms']:.3f} ms: {100 * (row['stats_ms'] / o - 1):+.1f}%"
        if "tbps" in row:
            note = f"{row['tbps']:.2f} TB/s = {row['pct_copy_bw']:.0f}% of copy" + (
                f", {row['pct_nominal_bw']:.0f}% of nominal" if "pct_nominal_bw" in row else "")
        if row.get("notes"):
            note = (note + "; " if note else "") + "; ".join(row["notes"])
        lines.append(f"| {row['case']} | {tuple(row['shape'])} | {f(o)} | {f(row.get('sdpa_ms'))} | {f(row.get('cudnn_ms'))} | "
                     f"{f(row.get('flex_ms'))} | {'-' if 'tflops' not in row else format(row['tflops'], '.0f')} | "
                     f"{r(row.get('sdpa_ms'), o)} | {r(row.get('cudnn_ms'), o)} | {r(row.get('flex_ms'), o)} | {note} |")
    return "\n".join(lines)


# -- offline compile (no GPU) ------------------------------------------------------------------


_TORCH_TO_TRITON = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def run_compile(args) -> int:
    """Compile kernel variants for sm_90 with triton's bundled ptxas; print registers and spills."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET for --compile")
        return 2
    import triton
    from triton import knobs

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import create_function_from_signature
        target = GPUTarget("cuda", 90, 32)
        backend = make_backend(target)
    except Exception as e:  # the API moves between triton versions; this is a development aid
        print(f"offline compile unavailable with triton {triton.__version__}: {type(e).__name__}: {e}")
        return 3
    from selfattn.kernels import triton_flash as tf

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    results = []

    def compile_launch(kernel, tuned, grid, kwargs, fixed=False):
        a = ()
        configs = [None] if fixed else ([tf.first_fitting_config(tuned, kwargs)] if args.quick else
                                        tuned.early_config_prune(tuned.configs, {}, **kwargs))
        for cfg in configs:
            kw = dict(kwargs, debug=False, instrumentation_mode=knobs.compilation.instrumentation_mode,
                      fpsan_homomorphic_casts=knobs.compilation.fpsan_homomorphic_casts)
            if cfg is not None:
                kw.update(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            binder = create_function_from_signature(kernel.signature, kernel.params, backend)
            bound, spec, opts = binder(*a, **kw)
            opts, sig, consts, attrs = kernel._pack_args(backend, kw, bound, spec, opts)
            t = time.time()
            ck = triton.compile(ASTSource(kernel, sig, consts, attrs), target=target, options=opts.__dict__)
            usage = ""
            if os.path.exists(cuobjdump):
                with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as fh:
                    fh.write(ck.asm["cubin"])
                out = subprocess.run([cuobjdump, "--dump-resource-usage", fh.name], capture_output=True, text=True).stdout
                os.unlink(fh.name)
                usage = " ".join(w for w in out.split() if w.startswith(("REG:", "STACK:")))
            blocks = f"M{kwargs['BLOCK_M']}" + (f" N{kwargs['BLOCK_N']}" if "BLOCK_N" in kwargs else "")
            desc = blocks + ("" if cfg is None else f" w{cfg.num_warps} s{cfg.num_stages}")
            results.append((kernel.fn.__name__, variant, desc, ck.metadata.shared, usage, time.time() - t))
            print(f"compiled {kernel.fn.__name__:<16} {variant:<28} {desc:<18} smem {ck.metadata.shared:>6} {usage} ({time.time() - t:.1f}s)", flush=True)

    tf._launch = compile_launch
    from selfattn.backends.triton_gpu import kernel_mask
    from selfattn.request import build_request

    for variant, dtype, shape, kw in _compile_variants(args.quick):
        b, hq, hkv, lq, lk, d = shape
        q = torch.zeros(b, hq, lq, d, dtype=dtype)
        k = torch.zeros(b, hkv, lk, d, dtype=dtype)
        v = torch.zeros(b, hkv, lk, d, dtype=dtype)
        opts = {x: y for x, y in kw.items() if x not in ("stats", "num_splits", "deterministic")}
        req = build_request(q, k, v, requires_grad=False, **opts)
        pack = tf.plan_pack(hq, hkv, lq)
        km = kernel_mask(req, *tf.fwd_blocks(pack, lq, d, d, dtype))
        tf.forward(q, k, v, km, scale=0.125, softcap=kw.get("softcap"), stats=kw.get("stats", False), pack=pack,
                   num_splits=kw.get("num_splits", 1), f32_out=True)
        if kw.get("stats") or kw.get("num_splits"):
            continue  # forward-only variants
        kb = kernel_mask(req, *tf.bwd_blocks(d, d, dtype))
        kq = kernel_mask(req, *tf.dq_blocks(d, d, dtype)) if kw.get("deterministic") else None
        rows = torch.zeros(b, hq, lq)
        tf.backward(q, q, k, v, q.float(), rows, rows, kb, kq, scale=0.125, softcap=kw.get("softcap"))
    spills = [r for r in results if "STACK:0" not in r[4] and r[4]]
    print(f"compiled {len(results)} kernels; {len(spills)} with a stack frame (register spills)")
    return 0


def _compile_variants(quick):
    from selfattn import masks

    g = torch.Generator().manual_seed(0)
    every = dict(mask=masks.padding([50, 128], [128, 3]) & masks.documents(torch.zeros(128, dtype=torch.long))
                 & masks.key_padding(torch.rand(2, 128, generator=g) < 0.9)
                 & masks.function(lambda b, h, q, kv: (q + kv) % 5 != 0)
                 & masks.dense(torch.rand(1, 1, 128, 128, generator=g) < 0.9),
                 window=(8, 0), softcap=30.0, alibi_slopes=torch.rand(4), q_positions=torch.arange(128) + 3)
    variants = [
        ("plain bf16 d128", torch.bfloat16, (2, 4, 4, 128, 128, 128), {}),
        ("causal fp16 d64 +stats", torch.float16, (2, 4, 4, 128, 128, 64), dict(causal=True, stats=True)),
        ("every mask bf16 d24", torch.bfloat16, (2, 4, 2, 128, 128, 24), every),
        ("dense float fp16 d256", torch.float16, (2, 4, 4, 128, 128, 256), dict(mask=torch.zeros(128, 128))),
        ("decode gqa split bf16", torch.bfloat16, (2, 8, 2, 1, 128, 128), dict(num_splits=4, stats=True)),
        ("deterministic bf16 d128", torch.bfloat16, (2, 4, 2, 128, 128, 128), dict(causal=True, deterministic=True)),
        ("float32 ieee d64", torch.float32, (2, 4, 4, 128, 128, 64), dict(causal=True)),
    ]
    return variants[:3] + variants[5:6] if quick else variants


def main(argv=None) -> int:
    args = parse(argv)
    if args.compile:
        return run_compile(args)
    cases = selected(args)
    if args.dry_run or not torch.cuda.is_available():
        if not args.dry_run:
            print("no CUDA device: printing the plan only (use --dry-run to say so, --compile to build offline)")
        for c in cases:
            extra = f", K+V {kv_bytes(c) / 1e9:.2f} GB" if c.shape[2] == 1 else ""
            print(f"{c.name:<22} shape {c.shape} causal={c.causal} window={c.window} backward={c.backward} "
                  f"baselines={list(c.baselines) + (['ours+stats'] if c.stats_pair else [])} "
                  f"FLOPs {flops(c) / 1e12:.2f} T{extra}  target {c.target}")
        return 0
    rows = run_gpu(args)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
