"""A transformers Llama with eager, sdpa and selfattn attention, forward and forward + backward (issue 13).

    python benchmarks/bench_hf.py                 # hidden 512, 8 layers, 8 q / 2 kv heads, 1024 tokens, batch 1
    python benchmarks/bench_hf.py --rounds 7      # writes benchmarks/results/bench_hf.json (--json PATH elsewhere)
    python benchmarks/bench_hf.py --smoke --json /tmp/x.json   # a 1-layer Llama of width 64 on 32 tokens, once

A random LlamaForCausalLM from a config (no weights downloaded), float32, in train mode with
dropout 0 for forward + backward (loss on the logits, all parameters' gradients), in eval mode
under no_grad for forward alone. Implementations run interleaved, round by round, so a shared
machine's load drifts hit them alike; the table gives the median wall time over rounds and each
implementation's speed relative to sdpa within the same rounds (CPU seconds of the process are
recorded too). "selfattn+stats" is selfattn with a :class:`selfattn.monitor.Monitor` collecting
every layer's per-head entropy and max logit from the same forward.

Then the attention call alone at the model's shape (B, 8, L, 64) / (B, 2, L, 64), causal: torch's
sdpa (grouped-query, no repeated heads), ``selfattn.attention`` on contiguous tensors, and the
transformers attention function of selfattn on the strided tensors a Llama layer hands it (the
difference is the integration's own cost: layout copies, the request). From these: attention's
share of sdpa's model step, and the step speed selfattn's attention alone can give (Amdahl).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

import torch  # noqa: E402

import selfattn  # noqa: E402
import selfattn.integrations.transformers as sa_hf  # noqa: E402
from selfattn.monitor import Monitor  # noqa: E402


SMOKE_MODEL = dict(hidden=64, layers=1, heads=4, kv_heads=2, vocab=128)  # --smoke: a Llama small enough to check the script runs


def model_arguments(p) -> None:
    """The random Llama's sizes as options (bench_decode.py takes the same), and --smoke."""
    p.add_argument("--smoke", action="store_true", help=f"a tiny Llama ({SMOKE_MODEL}), short inputs, one round: "
                                                         "checks the script runs (numbers meaningless)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)


def build(args, positions: int = 0):
    """A random LlamaForCausalLM of the sizes in ``args`` (float32, eager attention to start with)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=max(2048, positions),
                      attention_dropout=0.0)
    return LlamaForCausalLM._from_config(cfg, attn_implementation="eager")


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_hf.json")


def timed(fn) -> tuple:
    """(wall seconds, CPU seconds of the process: every thread)."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def attention_alone(args, rounds: int) -> dict:
    """Median wall seconds of one attention call at the model's shape, forward and forward + backward:
    torch sdpa, selfattn.attention (contiguous inputs), selfattn's transformers function (Llama's strided inputs)."""
    import torch.nn.functional as F

    B, L, H, Hkv = args.batch, args.tokens, args.heads, args.kv_heads
    D = args.hidden // H
    g = torch.Generator().manual_seed(2)
    # as LlamaAttention hands them over: projections viewed as (B, L, H, D), then transposed
    q = torch.randn(B, L, H, D, generator=g).transpose(1, 2).requires_grad_()  # (B, H, L, D) strided
    k = torch.randn(B, L, Hkv, D, generator=g).transpose(1, 2).requires_grad_()  # (B, Hkv, L, D) strided
    v = torch.randn(B, L, Hkv, D, generator=g).transpose(1, 2).requires_grad_()
    grad = torch.randn(B, H, L, D, generator=g)  # (B, H, L, D)
    qc, kc, vc = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    fn = sa_hf.make_attention_function("auto")
    module = torch.nn.Module()
    module.is_causal = True
    mask = sa_hf.build_mask(B, cache_position=torch.arange(L), kv_length=L, kv_offset=0, attention_mask=None)
    scale = 1.0 / math.sqrt(D)

    calls = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True),
        "selfattn.attention": lambda: selfattn.attention(qc, kc, vc, causal=True, scale=scale),
        "selfattn (transformers fn)": lambda: fn(module, q, k, v, mask, scaling=scale)[0],  # (B, L, H, D)
    }

    grad_blhd = grad.transpose(1, 2).contiguous()  # (B, L, H, D): what the output projection sends back

    def run(name, backward):
        out = calls[name]()
        if backward:
            out.backward(grad_blhd if name.endswith("(transformers fn)") else grad)

    times = {(n, m): [] for n in calls for m in ("forward", "forward+backward")}
    for name in calls:  # warm-up
        run(name, True)
    for _ in range(rounds):
        for name in calls:
            with torch.no_grad():
                times[(name, "forward")].append(timed(lambda: run(name, False))[0])
            times[(name, "forward+backward")].append(timed(lambda: run(name, True))[0])
    return {n: {m: statistics.median(times[(n, m)]) for m in ("forward", "forward+backward")} for n in calls}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model_arguments(p)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--numba-layer", choices=("default", "omp", "workqueue", "tbb"), default="default",
                   help="numba's threading layer for the cpu kernels (default: numba's choice, as a user gets it; "
                        "its OpenMP layer spins between calls, next to torch's own threads; selfattn train uses workqueue)")
    p.add_argument("--json", metavar="PATH", help=f"where the results go (default {RESULTS}; --smoke: the temporary directory)")
    p.add_argument("--attention-rounds", type=int, default=20, help="rounds of the attention-alone timings")
    args = p.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE_MODEL, tokens=32, rounds=1, attention_rounds=1)
    args.json = args.json or (os.path.join(tempfile.gettempdir(), "bench_hf_smoke.json") if args.smoke else RESULTS)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.numba_layer != "default":
        import numba

        numba.config.THREADING_LAYER = args.numba_layer  # read when numba first starts its threads
    sa_hf.register()
    model = build(args, args.tokens)
    ids = torch.randint(0, args.vocab, (args.batch, args.tokens), generator=torch.Generator().manual_seed(1))
    impls = ["eager", "sdpa", "selfattn", "selfattn+stats"]
    monitor = Monitor(model)

    def forward(impl):
        model.set_attn_implementation(impl.split("+")[0])
        model.eval()
        with torch.no_grad():
            if impl.endswith("+stats"):
                with monitor.collect():
                    model(ids)
            else:
                model(ids)

    def train_step(impl):
        model.set_attn_implementation(impl.split("+")[0])
        model.train()
        model.zero_grad(set_to_none=True)
        if impl.endswith("+stats"):
            with monitor.collect():
                logits = model(ids).logits
        else:
            logits = model(ids).logits
        torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).backward()

    for impl in impls:  # warm-up: numba's kernels load (or compile) here
        forward(impl)
        train_step(impl)
    sa_hf.reset_mask_counts()
    forward("selfattn")
    masks_seen = sa_hf.mask_counts()
    times = {(i, m): [] for i in impls for m in ("forward", "forward+backward")}
    cpu = {(i, m): [] for i in impls for m in ("forward", "forward+backward")}
    for r in range(args.rounds):
        for impl in impls:
            for m, f in (("forward", forward), ("forward+backward", train_step)):
                wall, c = timed(lambda: f(impl))
                times[(impl, m)].append(wall)
                cpu[(impl, m)].append(c)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{i} {times[(i, 'forward+backward')][-1]:.3f}s" for i in impls),
              file=sys.stderr)
    alone = attention_alone(args, args.attention_rounds)

    load = os.getloadavg()
    try:
        import numba

        layer = numba.threading_layer()
    except (ImportError, ValueError):  # ValueError: numba never started its threads (one-thread kernels)
        layer = "not started"
    print(f"# numba threading layer: {layer}")
    print(f"# Llama hidden {args.hidden}, {args.layers} layers, {args.heads} q / {args.kv_heads} kv heads, "
          f"{args.tokens} tokens, batch {args.batch}, float32; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores, load {load[0]:.1f}; median of {args.rounds} rounds (speed: per-round ratio to sdpa, median)")
    print(f"# selfattn masks in one forward: {masks_seen}")
    print(f"{'':16s} {'forward':>9s} {'vs sdpa':>8s} {'fwd+bwd':>9s} {'vs sdpa':>8s} {'(CPU s)':>8s}")
    result = {}
    for impl in impls:
        row = {}
        for m in ("forward", "forward+backward"):
            med = statistics.median(times[(impl, m)])
            # speed relative to sdpa, per round, then the median (drifts hit both alike)
            ratio = statistics.median(s / t for s, t in zip(times[("sdpa", m)], times[(impl, m)]))
            row[m] = {"median_s": med, "speed_vs_sdpa": ratio, "all_s": times[(impl, m)],
                      "cpu_median_s": statistics.median(cpu[(impl, m)]), "cpu_all_s": cpu[(impl, m)]}
        result[impl] = row
        print(f"{impl:16s} {row['forward']['median_s']:8.3f}s {row['forward']['speed_vs_sdpa']:7.2f}x "
              f"{row['forward+backward']['median_s']:8.3f}s {row['forward+backward']['speed_vs_sdpa']:7.2f}x "
              f"{row['forward+backward']['cpu_median_s']:7.2f}s")
    for m in ("forward", "forward+backward"):
        cost = statistics.median(a / b - 1 for a, b in zip(times[("selfattn+stats", m)], times[("selfattn", m)]))
        print(f"# statistics from every layer, {m}: {100 * cost:+.1f} % (target <= 5 %)")
        result[f"stats_cost_{m}"] = cost
    print(f"# one attention call at ({args.batch}, {args.heads}/{args.kv_heads}, {args.tokens}, {args.hidden // args.heads}), "
          f"causal, median of {args.attention_rounds}:")
    for name, row in alone.items():
        print(f"{name:28s} forward {1e3 * row['forward']:7.2f} ms   forward+backward {1e3 * row['forward+backward']:7.2f} ms")
    fn, inner = alone["selfattn (transformers fn)"], alone["selfattn.attention"]
    sd = alone["sdpa"]
    step = result["sdpa"]["forward+backward"]["median_s"]
    share = args.layers * sd["forward+backward"] / step
    bound = step / (step - args.layers * (sd["forward+backward"] - fn["forward+backward"]))
    print(f"# the integration's own cost per call (strided inputs, request, output layout): forward "
          f"{1e3 * (fn['forward'] - inner['forward']):+.2f} ms, forward+backward {1e3 * (fn['forward+backward'] - inner['forward+backward']):+.2f} ms")
    print(f"# attention is {100 * share:.0f} % of sdpa's forward+backward step: with these attention times alone selfattn's "
          f"step would be {bound:.2f}x sdpa's; 1.1x needs the attention call "
          f"{sd['forward+backward'] / max(1e-9, sd['forward+backward'] - step * (1 - 1 / 1.1) / args.layers):.2f}x faster than sdpa's"
          if step * (1 - 1 / 1.1) < args.layers * sd["forward+backward"] else
          f"# attention is {100 * share:.0f} % of sdpa's step: even free attention cannot make the step 1.1x faster")
    result["attention_alone_s"] = alone
    result["attention_share_of_sdpa_step"] = share
    result["step_speed_from_attention_alone"] = bound
    if args.json:
        meta = dict(vars(args), torch=torch.__version__, threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
                    load=load, machine=platform.machine(), processor=platform.processor(), masks=masks_seen,
                    numba_threading_layer=layer,
                    date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), selfattn=selfattn.__version__)
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "result": result}, f, indent=1)
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
