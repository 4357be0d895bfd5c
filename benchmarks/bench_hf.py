"""A transformers Llama with eager, sdpa and selfattn attention, forward and forward + backward (issue 13).

    python benchmarks/bench_hf.py                         # hidden 512, 8 layers, 8 q / 2 kv heads, 1024 tokens, batch 1
    python benchmarks/bench_hf.py --rounds 7 --json benchmarks/results/bench_hf.json

A random LlamaForCausalLM from a config (no weights downloaded), float32, in train mode with
dropout 0 for forward + backward (loss on the logits, all parameters' gradients), in eval mode
under no_grad for forward alone. Implementations run interleaved, round by round, so a shared
machine's load drifts hit them alike; the table gives the median time over rounds and each
implementation's speed relative to sdpa within the same rounds. "selfattn+stats" is selfattn
with a :class:`selfattn.monitor.Monitor` collecting every layer's per-head entropy and max logit
from the same forward. Also prints the masks selfattn received (none dense: mask_counts).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

import torch  # noqa: E402

import selfattn  # noqa: E402
import selfattn.integrations.transformers as sa_hf  # noqa: E402
from selfattn.monitor import Monitor  # noqa: E402


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=max(2048, args.tokens),
                      attention_dropout=0.0)
    return LlamaForCausalLM._from_config(cfg, attn_implementation="eager")


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sa_hf.register()
    model = build(args)
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
    for r in range(args.rounds):
        for impl in impls:
            times[(impl, "forward")].append(timed(lambda: forward(impl)))
            times[(impl, "forward+backward")].append(timed(lambda: train_step(impl)))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{i} {times[(i, 'forward+backward')][-1]:.3f}s" for i in impls),
              file=sys.stderr)

    load = os.getloadavg()
    print(f"# Llama hidden {args.hidden}, {args.layers} layers, {args.heads} q / {args.kv_heads} kv heads, "
          f"{args.tokens} tokens, batch {args.batch}, float32; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores, load {load[0]:.1f}; median of {args.rounds} rounds")
    print(f"# selfattn masks in one forward: {masks_seen}")
    print("| implementation | forward (s) | vs sdpa | forward + backward (s) | vs sdpa |")
    print("|---|---|---|---|---|")
    result = {}
    for impl in impls:
        row = {}
        for m in ("forward", "forward+backward"):
            med = statistics.median(times[(impl, m)])
            # speed relative to sdpa, per round, then the median (drifts hit both alike)
            ratio = statistics.median(s / t for s, t in zip(times[("sdpa", m)], times[(impl, m)]))
            row[m] = {"median_s": med, "speed_vs_sdpa": ratio, "all_s": times[(impl, m)]}
        result[impl] = row
        print(f"| {impl} | {row['forward']['median_s']:.3f} | {row['forward']['speed_vs_sdpa']:.2f}x | "
              f"{row['forward+backward']['median_s']:.3f} | {row['forward+backward']['speed_vs_sdpa']:.2f}x |")
    for m in ("forward", "forward+backward"):
        cost = statistics.median(a / b - 1 for a, b in zip(times[("selfattn+stats", m)], times[("selfattn", m)]))
        print(f"# cost of collecting statistics from every layer, {m}: {100 * cost:+.1f} % (median per round)")
        result[f"stats_cost_{m}"] = cost
    if args.json:
        meta = dict(vars(args), torch=torch.__version__, threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
                    load=load, machine=platform.machine(), processor=platform.processor(), masks=masks_seen,
                    date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), selfattn=selfattn.__version__)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "result": result}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
