"""The `selfattn` command line: one ``_add_<command>`` function per subcommand."""

from __future__ import annotations

import argparse
import json
import os
import sys


class UsageError(ValueError):
    """Bad input on the command line: reported as one line, exit status 2."""


def int_arg(name: str, minimum: int = 1):
    """An argparse ``type`` for an integer option of at least ``minimum`` (1: positive, 0:
    non-negative) whose error names the option and the value seen."""
    what = {1: "a positive integer", 0: "a non-negative integer"}.get(minimum, f"an integer >= {minimum}")

    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {what}, got {s!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be {what}, got {v}")
        return v
    return parse


def _positive(name):
    return int_arg(name, 1)


def _non_negative(name):
    return int_arg(name, 0)


# -- explain ---------------------------------------------------------------------------------


def _cmd_explain(args) -> int:
    from rich.console import Console

    from .explain import explain
    from .explain.terminal import render

    text = args.text
    if args.file is not None:
        if text is not None:
            raise UsageError("give TEXT or --file, not both")
        try:
            text = sys.stdin.read() if args.file == "-" else open(args.file, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read --file {args.file}: {e}") from None
    trace = explain(text, dim=args.dim, seed=args.seed, init=args.init, qk_dim=args.qk_dim, v_dim=args.v_dim,
                    causal=args.causal, window=args.window, scale=not args.no_scale, rows=args.rows, checkpoint=args.checkpoint)
    console = Console()
    render(trace, console, notes_check=True, all_rows_table=args.rows is not None)
    _write_outputs(trace, args, console)
    return 0


def _write_outputs(trace, args, console) -> None:
    if args.png:
        from .explain.plot import png_size

        trace.plot(args.png)
        w, h = png_size(trace)
        console.print(f"wrote the heatmap to {args.png} ({w} x {h} px)")
    if args.html:
        trace.to_html(args.html)
        console.print(f"wrote the HTML report to {args.html}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(trace.to_dict(), f, indent=1)
        console.print(f"wrote the trace as JSON to {args.json}")


def _add_explain(sub) -> None:
    from .explain.trace import FULL_MATRIX_MAX_TOKENS, MAX_TOKENS

    e = sub.add_parser(
        "explain",
        help="walk self-attention step by step (default: the notes' \"The cat sat\" example)",
        description="Walk self-attention step by step. Without TEXT: the notes' example (\"The cat sat\", W = I, d_k = 4), "
                    "checked against the notes. With TEXT: words and punctuation marks become tokens (whitespace is dropped), "
                    "each gets a deterministic embedding, and a SelfAttention layer runs on them. "
                    f"Up to {FULL_MATRIX_MAX_TOKENS} tokens every step is shown in full; beyond that (up to {MAX_TOKENS}) "
                    "the statistics of every row and the rows asked for (--rows), computed without an L x L matrix.",
    )
    e.add_argument("text", nargs="?", metavar="TEXT", help="the input text (default: the notes' example)")
    e.add_argument("--file", metavar="PATH", help="read the text from a file ('-' = standard input)")
    e.add_argument("--dim", type=_positive("--dim"), help="embedding width (default 8)")
    e.add_argument("--seed", type=int, help="seed of the embeddings and of --init default (default 0)")
    e.add_argument("--init", choices=("identity", "default"),
                   help="W_Q, W_K, W_V: identity as in the notes (default when the widths allow) or SelfAttention's default initialisation")
    e.add_argument("--qk-dim", type=_positive("--qk-dim"), help="width of queries and keys (default --dim)")
    e.add_argument("--v-dim", type=_positive("--v-dim"), help="width of values and of the output (default --dim)")
    e.add_argument("--causal", action="store_true", help="each token attends only to itself and earlier tokens")
    e.add_argument("--window", type=_non_negative("--window"), metavar="N",
                   help="each token attends only to keys at most N positions away (before it, and after it unless --causal)")
    e.add_argument("--no-scale", action="store_true", help="do not divide the scores by sqrt(d_k) (what the notes warn about)")
    e.add_argument("--checkpoint", metavar="PATH", help="a trained model's checkpoint directory: show every layer and head")
    e.add_argument("--rows", metavar="ROWS", help="query rows to list, e.g. '0,5-7,-1' (write --rows=-1,... when the first is negative); "
                        "for long input only these rows' weights are computed (default: first, middle, last)")
    e.add_argument("--png", metavar="FILE", help="write a heatmap of the attention weights")
    e.add_argument("--html", metavar="FILE", help="write a self-contained HTML report")
    e.add_argument("--json", metavar="FILE", help="write the whole trace as JSON")
    e.set_defaults(func=_cmd_explain)


# -- scaling ---------------------------------------------------------------------------------


def _cmd_scaling(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from .explain import scaling

    if args.max_dk < 4:
        raise UsageError(f"--max-dk must be at least 4, got {args.max_dk}")
    d_ks = [d for d in scaling.D_KS if d <= args.max_dk]
    notes = scaling.notes_numbers()
    with Progress(TextColumn("measuring d_k"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("sweep", total=len(d_ks))
        rows = scaling.sweep(d_ks, n_keys=args.keys, n_queries=args.queries, seed=args.seed, progress=lambda d: bar.advance(task))
    console = Console()
    scaling.render(notes, rows, console, n_keys=args.keys)
    if args.png:
        scaling.plot(rows, args.png, n_keys=args.keys)
        console.print(f"wrote the plot to {args.png}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"notes": notes, "sweep": rows, "n_keys": args.keys, "n_queries": args.queries, "seed": args.seed,
                       "verdict": scaling.verdict(rows, args.keys)}, f, indent=1)
        console.print(f"wrote the numbers as JSON to {args.json}")
    return 0


def _add_scaling(sub) -> None:
    s = sub.add_parser("scaling", help="why scores are divided by sqrt(d_k): the notes' numbers, then a sweep over d_k",
                       description="Recompute the notes' scaling example, then measure, for d_k from 4 to 4096, what happens "
                                   "to the softmax with and without scaling: score spread, largest weight, entropy, gradient size.")
    s.add_argument("--png", metavar="FILE", help="write a plot of the sweep")
    s.add_argument("--json", metavar="FILE", help="write every number as JSON")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--keys", type=_positive("--keys"), default=32, help="keys per query (default 32)")
    s.add_argument("--queries", type=_positive("--queries"), default=512, help="random queries per d_k (default 512)")
    s.add_argument("--max-dk", type=_positive("--max-dk"), default=4096, help="largest d_k of the sweep (default 4096)")
    s.set_defaults(func=_cmd_scaling)


# -- backends --------------------------------------------------------------------------------


def _cmd_backends(args) -> int:
    from . import backends

    print(backends.table())
    return 0


def _add_backends(sub) -> None:
    b = sub.add_parser("backends", help="list the attention backends and what each supports")
    b.set_defaults(func=_cmd_backends)


# -- train, sample (issue 7; the work is in selfattn.training) --------------------------------


def _cmd_train(args) -> int:
    from .training.command import run_train

    return run_train(args)


def _add_train(sub) -> None:
    from .training.command import add_train_arguments

    t = sub.add_parser("train", help="train a small transformer (default: the recall task an induction head solves)",
                       description="Train a small decoder-only transformer built from selfattn's layers. Default: associative "
                                   "recall (predict the token that followed the previous occurrence of the current token), "
                                   "generated on the fly, stopping at 99% held-out accuracy. --text FILE: a character-level "
                                   "model of any text. Data-parallel: torchrun --standalone --nproc_per_node N -m selfattn.cli train ...")
    add_train_arguments(t)
    t.set_defaults(func=_cmd_train)


def _cmd_sample(args) -> int:
    from .training.command import run_sample

    return run_sample(args)


def _add_sample(sub) -> None:
    from .training.command import add_sample_arguments

    s = sub.add_parser("sample", help="generate from a checkpoint of selfattn train, with the KV cache")
    add_sample_arguments(s)
    s.set_defaults(func=_cmd_sample)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="selfattn", description="Scaled dot-product self-attention you can read, run fast and look inside.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    _add_explain(sub)
    _add_scaling(sub)
    _add_backends(sub)
    _add_train(sub)
    _add_sample(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ValueError, TypeError) as e:  # bad input: one clear line, no traceback (SELFATTN_DEBUG=1 shows it)
        if os.environ.get("SELFATTN_DEBUG"):
            raise
        print(f"selfattn {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if os.environ.get("SELFATTN_DEBUG"):
            raise
        print(f"selfattn {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"selfattn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
