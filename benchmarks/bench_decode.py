"""Decoding with a cache: a transformers Llama's generate() on a left-padded batch, eager / sdpa / selfattn.

    python benchmarks/bench_decode.py                    # batch 4 of prompts 1024, 900, 700, 512 tokens, 32 new
    python benchmarks/bench_decode.py --threads 1 --rounds 7 --json benchmarks/results/bench_decode_1t.json
    python benchmarks/bench_decode.py --smoke --json /tmp/x.json   # bench_hf's tiny Llama, prompts 24 and 16, 2 new tokens

A random LlamaForCausalLM from a config (no weights downloaded; hidden 512, 8 layers, 8 q / 2 kv heads,
float32, eval mode, greedy). Each round times, per implementation, generate() of 1 new token (the prompt's
forward: prefill) and of 1 + N new tokens; the decode time per token is their difference / N -- every step a
(B, H, 1, keys) attention over the cache under the batch's padding mask and positions, which selfattn's cpu
backend serves with its row kernel (kernels/cpu_short.py) on torch's threads. Implementations run
interleaved, round by round (a shared machine's drift hits them alike); the table gives medians and each
implementation's decode speed relative to sdpa within the same rounds. Then the attention call of one
decode step alone at the last step's shape, with the same mask, as each implementation runs it.
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import bench_hf  # noqa: E402 -- the same random Llama
import selfattn  # noqa: E402
import selfattn.integrations.transformers as sa_hf  # noqa: E402
from selfattn import masks  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_decode.json")
IMPLS = ("eager", "sdpa", "selfattn")


def build(args):
    model = bench_hf.build(args, 4096).eval()
    model.generation_config.pad_token_id = 0
    return model


def prompts(args):
    """(ids, attention_mask): a left-padded batch of the given prompt lengths."""
    lens = [int(x) for x in args.prompts.split(",")]
    L = max(lens)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, args.vocab, (len(lens), L), generator=g)
    keep = torch.arange(L)[None] >= torch.tensor([L - n for n in lens])[:, None]  # (B, L) left padding
    return ids.masked_fill(~keep, 0), keep.long()


def attention_step(args, rounds: int) -> dict:
    """Median wall seconds of one decode step's attention at the last step's shape (B, H, 1, keys), the
    batch's left padding as a mask: torch sdpa with the dense bool mask, selfattn.attention with
    masks.left_padded."""
    import torch.nn.functional as F

    lens = torch.tensor([int(x) for x in args.prompts.split(",")]) + args.new_tokens
    B, Lk, H, Hkv = len(lens), int(lens.max()), args.heads, args.kv_heads
    D = args.hidden // H
    g = torch.Generator().manual_seed(2)
    q = torch.randn(B, H, 1, D, generator=g)
    k, v = (torch.randn(B, Hkv, Lk, D, generator=g) for _ in range(2))
    layout = masks.left_padded(lens, Lk, 1)
    dense = layout.mask.allowed(1, Lk, batch=B, heads=1, q_positions=layout.q_positions,
                                kv_positions=layout.kv_positions)  # (B, 1, 1, Lk)
    calls = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True),
             "selfattn": lambda: selfattn.attention(q, k, v, causal=True, **layout)}
    times = {n: [] for n in calls}
    with torch.no_grad():
        for fn in calls.values():
            fn()
        n = 20
        for _ in range(rounds):
            for name, fn in calls.items():
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                times[name].append((time.perf_counter() - t0) / n)
    return {"shape": [B, H, 1, Lk, D], "median_s": {n: statistics.median(t) for n, t in times.items()},
            "speed_vs_sdpa": statistics.median(s / t for s, t in zip(times["sdpa"], times["selfattn"]))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bench_hf.model_arguments(p)
    p.add_argument("--prompts", default="1024,900,700,512", help="prompt lengths of the batch (left-padded)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--json", metavar="PATH", help=f"where the results go (default {RESULTS}; --smoke: the temporary directory)")
    args = p.parse_args(argv)
    if args.smoke:
        vars(args).update(bench_hf.SMOKE_MODEL, prompts="24,16", new_tokens=2, rounds=1)
    args.json = args.json or (os.path.join(tempfile.gettempdir(), "bench_decode_smoke.json") if args.smoke else RESULTS)
    if args.threads:
        torch.set_num_threads(args.threads)
    sa_hf.register()
    model = build(args)
    ids, keep = prompts(args)

    def generate(impl, new):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            return model.generate(ids, attention_mask=keep, max_new_tokens=new, min_new_tokens=new, do_sample=False)

    outs = {impl: generate(impl, 4) for impl in IMPLS}  # warm-up (numba's kernels load here)
    same = all(torch.equal(outs["eager"], o) for o in outs.values())  # greedy tokens of random weights: a check, not a test
    prefill = {i: [] for i in IMPLS}
    decode = {i: [] for i in IMPLS}
    for r in range(args.rounds):
        for impl in IMPLS:
            t0 = time.perf_counter()
            generate(impl, 1)
            t1 = time.perf_counter()
            generate(impl, 1 + args.new_tokens)
            t2 = time.perf_counter()
            prefill[impl].append(t1 - t0)
            decode[impl].append(((t2 - t1) - (t1 - t0)) / args.new_tokens)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{i} {decode[i][-1] * 1e3:.2f} ms/token" for i in IMPLS),
              file=sys.stderr)
    alone = attention_step(args, 1 if args.smoke else 9)
    load = os.getloadavg()
    print(f"# Llama hidden {args.hidden}, {args.layers} layers, {args.heads} q / {args.kv_heads} kv heads, float32, "
          f"prompts {args.prompts} (left-padded), {args.new_tokens} new tokens; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} cores, load {load[0]:.1f}; median of {args.rounds} rounds")
    print(f"# the three produced the same greedy tokens: {same}")
    print(f"{'':10s} {'prefill':>9s} {'decode/token':>13s} {'decode vs sdpa':>15s}")
    result = {}
    for impl in IMPLS:
        speed = statistics.median(s / t for s, t in zip(decode["sdpa"], decode[impl]))
        result[impl] = {"prefill_s": statistics.median(prefill[impl]), "decode_s_per_token": statistics.median(decode[impl]),
                        "decode_speed_vs_sdpa": speed, "decode_all_s": decode[impl], "prefill_all_s": prefill[impl]}
        print(f"{impl:10s} {result[impl]['prefill_s']:8.3f}s {result[impl]['decode_s_per_token'] * 1e3:10.2f} ms "
              f"{speed:14.2f}x")
    print(f"# one decode step's attention alone {tuple(alone['shape'])}, left padding: sdpa "
          f"{alone['median_s']['sdpa'] * 1e6:.0f} us, selfattn {alone['median_s']['selfattn'] * 1e6:.0f} us "
          f"({alone['speed_vs_sdpa']:.2f}x sdpa)")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump({"machine": platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
                   "threads": torch.get_num_threads(), "load": load[0], "args": vars(args), "same_tokens": same,
                   "generate": result, "attention_step": alone}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
