"""The `selfattn` command line: one ``_add_<command>`` function per subcommand, one error boundary (:func:`main`).

Shared pieces (the usage error, option parsers, the up-front checks of sizes and output paths)
live in :mod:`selfattn._cliutil`, which ``selfattn.training`` imports too; nothing imports this module.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


from ._cliutil import UsageError, check_memory, check_output_file, human_bytes, int_arg, seed_arg, writing

# the one place that says how to report a bug (internal errors print a traceback, then this)
REPORT = ("this is a bug in selfattn, not in what you typed: please report it with the command line above and this "
          "traceback (SELFATTN_DEBUG=1 shows the traceback of the one-line errors too)")


def _positive(name):
    return int_arg(name, 1)


def _non_negative(name):
    return int_arg(name, 0)


def _version() -> str:
    from . import __version__

    return f"selfattn {__version__}"


def _add_version(p: argparse.ArgumentParser) -> None:
    # importing selfattn (torch) only when --version is actually asked for
    class _Version(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(_version())
            parser.exit()

    p.add_argument("--version", action=_Version, nargs=0, help="print the version and exit")


# -- explain ---------------------------------------------------------------------------------


# the most numbers --json writes: more takes minutes and gigabytes (every matrix of every step)
JSON_MAX_NUMBERS = 20_000_000
# the most work explain takes on (floating-point operations): about half a minute on one core
EXPLAIN_MAX_FLOP = 2e11


def _stdout_console():
    """A rich Console on stdout that survives a reader closing the pipe (`selfattn explain ... | head`):
    rich's default exits 1 there, before the --png/--html/--json files are written; this one stops
    printing (stdout goes to /dev/null) and lets the command finish its work and its files."""
    from rich.console import Console

    class _PipeConsole(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())

    return _PipeConsole()


def _read_text(args):
    text = args.text
    if args.file is not None:
        if text is not None:
            raise UsageError("give TEXT or --file, not both")
        try:
            text = sys.stdin.read() if args.file == "-" else open(args.file, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read --file {args.file}: {e}") from None
    return text


def _check_explain(args, text) -> None:
    """Everything about an explain run that can be refused before any work: sizes, outputs."""
    from .explain import tokenize
    from .explain.terminal import FULL_MAX_CELLS
    from .explain.trace import FULL_MATRIX_MAX_TOKENS

    for opt, kind in (("png", "png"), ("html", "html"), ("json", "json")):
        if getattr(args, opt):
            check_output_file(f"--{opt}", getattr(args, opt), kind)
    if args.ids is not None and args.hf is None:
        raise UsageError("--ids needs --hf (token ids of a transformers model's vocabulary)")
    if args.checkpoint is not None or args.hf is not None:
        return
    if args.layers is not None:
        raise UsageError("--layers needs --hf or --checkpoint (it picks from a model's attention layers)")
    n = 3 if text is None else len(tokenize(text))
    dim = 4 if text is None else (args.dim or 8)
    qk, v = args.qk_dim or dim, args.v_dim or dim
    wide = max(qk, v, dim)
    # float64: the three W (and their float64 copies), L x d steps, L x L steps when shown in full
    full = n <= FULL_MATRIX_MAX_TOKENS
    need = 8 * (2 * dim * (2 * qk + v) + 4 * n * (dim + 2 * qk + 2 * v) + (8 * n * n if full else 0)) + 8 * dim * wide
    check_memory(need, f"explain with --dim {dim}" + (f", --qk-dim {qk}" if qk != dim else "") + (f", --v-dim {v}" if v != dim else ""),
                 "use a smaller --dim")
    # long input runs a real attention call: L x L x d multiply-adds for the scores and the weighted sum,
    # plus the projections; beyond EXPLAIN_MAX_FLOP that takes minutes on a laptop core
    flop = 2 * n * n * (qk + v) + 2 * n * dim * (2 * qk + v)
    if flop > EXPLAIN_MAX_FLOP:
        raise UsageError(f"explain with {n} tokens and --dim {dim} would take about {flop / 1e9:,.0f} GFLOP, minutes here; "
                         f"at most {EXPLAIN_MAX_FLOP / 1e9:,.0f} GFLOP: use a smaller --dim (or --qk-dim / --v-dim) or less text")
    if args.full and dim * wide > FULL_MAX_CELLS:
        raise UsageError(f"--full with --dim {dim} would print {dim * wide:,} cells for one matrix (W_Q is {dim} x {qk}), which "
                         f"takes minutes; at most {FULL_MAX_CELLS:,} cells print with --full. Leave out --full to see the "
                         "matrices trimmed, or use --json for every number")
    if args.json:
        numbers = dim * (2 * qk + v) + n * (dim + 2 * qk + 2 * v) + (5 * n * n if full else 0)
        if numbers > JSON_MAX_NUMBERS:
            raise UsageError(f"--json with --dim {dim} would write about {numbers:,} numbers (~{human_bytes(numbers * 20)}); "
                             f"at most {JSON_MAX_NUMBERS:,}: use a smaller --dim")


def _cmd_explain(args) -> int:
    from ._progress import compile_notice
    from .explain import explain
    from .explain.terminal import render

    text = _read_text(args)
    _check_explain(args, text)
    if args.hf is not None:
        return _cmd_explain_hf(args, text)
    with compile_notice(enabled=True):
        trace = explain(text, dim=args.dim, seed=args.seed, init=args.init, qk_dim=args.qk_dim, v_dim=args.v_dim,
                        causal=args.causal, window=args.window, scale=not args.no_scale, rows=args.rows,
                        checkpoint=args.checkpoint, layers=args.layers)
    console = _stdout_console()
    render(trace, console, notes_check=True, all_rows_table=args.rows is not None, full=args.full)
    _write_outputs(trace, args, console)
    return 0


def _cmd_explain_hf(args, text) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: nothing is downloaded
    from ._progress import compile_notice
    from .explain.hf import explain_hf, json_numbers
    from .explain.terminal import render

    given = [f"--{n.replace('_', '-')}" for n in ("checkpoint", "dim", "seed", "init", "qk_dim", "v_dim", "window")
             if getattr(args, n) is not None] + [f for f, on in (("--causal", args.causal), ("--no-scale", args.no_scale)) if on]
    if given:
        raise UsageError(f"{', '.join(given)} cannot be combined with --hf: the model decides its own embeddings, widths and masks")

    def check(md, n, rows):
        if args.json:
            numbers = json_numbers(md, n, len(rows), args.layers)
            if numbers > JSON_MAX_NUMBERS:
                raise UsageError(f"--json for {md.architecture} on {n} tokens would write about {numbers:,} numbers "
                                 f"(~{human_bytes(numbers * 20)}); at most {JSON_MAX_NUMBERS:,}: give fewer tokens")

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  console=Console(stderr=True), transient=True) as bar:
        tasks: dict = {}

        def progress(stage, done, total):
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        with compile_notice(enabled=True):
            trace = explain_hf(args.hf, text, ids=args.ids, rows=args.rows, layers=args.layers, progress=progress, check=check)
    console = _stdout_console()
    render(trace, console, full=args.full)
    _write_outputs(trace, args, console)
    return 0


def _write_outputs(trace, args, console) -> None:
    if args.png:
        from rich.markup import escape

        from .explain.plot import left_out, left_out_note, png_size

        with writing("--png", args.png):
            trace.plot(args.png)
        w, h = png_size(trace)
        console.print(f"wrote the heatmap to {args.png} ({w} x {h} px)")
        if left_out(trace):
            console.print(f"[yellow]{escape(left_out_note(trace, left_out(trace)))}[/yellow]")
    if args.html:
        with writing("--html", args.html):
            trace.to_html(args.html)
        console.print(f"wrote the HTML report to {args.html}")
    if args.json:
        with writing("--json", args.json), open(args.json, "w", encoding="utf-8") as f:
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
    e.add_argument("--dim", type=_positive("--dim"), help="embedding width (default 8; the notes' example: 4)")
    e.add_argument("--seed", type=seed_arg(), help="seed of the embeddings and of --init default (default 0)")
    e.add_argument("--init", choices=("identity", "default"),
                   help="W_Q, W_K, W_V: identity as in the notes (default when the widths allow) or SelfAttention's default initialisation")
    e.add_argument("--qk-dim", type=_positive("--qk-dim"), help="width of queries and keys (default --dim)")
    e.add_argument("--v-dim", type=_positive("--v-dim"), help="width of values and of the output (default --dim)")
    e.add_argument("--causal", action="store_true", help="each token attends only to itself and earlier tokens")
    e.add_argument("--window", type=int_arg("--window", 0, 2**63 - 1), metavar="N",
                   help="each token attends only to keys at most N positions away (before it, and after it unless --causal)")
    e.add_argument("--no-scale", action="store_true", help="do not divide the scores by sqrt(d_k) (what the notes warn about)")
    e.add_argument("--checkpoint", metavar="PATH", help="a trained model's checkpoint directory: show every layer and head")
    e.add_argument("--hf", metavar="DIR", help="a transformers model saved with save_pretrained (config.json + *.safetensors, "
                                              "its tokenizer if saved): show every layer and head; nothing is downloaded")
    e.add_argument("--ids", metavar="IDS", help="with --hf: token ids instead of TEXT, e.g. '1,5,9' (for a model saved without "
                                                "a tokenizer)")
    e.add_argument("--layers", metavar="LAYERS", help="with --hf or --checkpoint: the attention layers to show, e.g. '0,3-5,-1' (default: "
                                                      "every layer; write --layers=-1 when the first is negative)")
    e.add_argument("--rows", metavar="ROWS", help="query rows to list, e.g. '0,5-7,-1' (write --rows=-1,... when the first is negative); "
                        "for long input only these rows' weights are computed (default: first, middle, last)")
    e.add_argument("--full", action="store_true",
                   help="print every column and row of wide matrices (default: trimmed to the terminal, first and last columns)")
    e.add_argument("--png", metavar="FILE.png", help="write a heatmap of the attention weights (PNG)")
    e.add_argument("--html", metavar="FILE.html", help="write a self-contained HTML report")
    e.add_argument("--json", metavar="FILE.json", help="write the whole trace as JSON")
    _add_version(e)
    e.set_defaults(func=_cmd_explain)


# -- scaling ---------------------------------------------------------------------------------


def _cmd_scaling(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from .explain import scaling

    if args.max_dk < 4:
        raise UsageError(f"--max-dk must be at least 4, got {args.max_dk}")
    if args.keys < 2:  # one key: every softmax weight is 1, nothing to measure (the score std is undefined)
        raise UsageError(f"--keys must be at least 2 (with one key every softmax weight is 1), got {args.keys}")
    if args.png:
        check_output_file("--png", args.png, "png")
    if args.json:
        check_output_file("--json", args.json, "json")
    # powers of two from 4 up to --max-dk (above 4096 too: --max-dk is the sweep's largest d_k, not cut to the default)
    d_ks = [2 ** i for i in range(2, args.max_dk.bit_length())]
    check_memory(8.0 * 2 * args.queries * args.keys * d_ks[-1] * 3, "scaling with these --keys, --queries and --max-dk",
                 "use fewer --keys or --queries, or a smaller --max-dk")
    notes = scaling.notes_numbers()
    with Progress(TextColumn("measuring d_k"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("sweep", total=len(d_ks))
        rows = scaling.sweep(d_ks, n_keys=args.keys, n_queries=args.queries, seed=args.seed, progress=lambda d: bar.advance(task))
    console = _stdout_console()
    scaling.render(notes, rows, console, n_keys=args.keys)
    if args.png:
        with writing("--png", args.png):
            scaling.plot(rows, args.png, n_keys=args.keys)
        console.print(f"wrote the plot to {args.png}")
    if args.json:
        with writing("--json", args.json), open(args.json, "w", encoding="utf-8") as f:
            json.dump({"notes": notes, "sweep": rows, "n_keys": args.keys, "n_queries": args.queries, "seed": args.seed,
                       "verdict": scaling.verdict(rows, args.keys)}, f, indent=1)
        console.print(f"wrote the numbers as JSON to {args.json}")
    return 0


def _add_scaling(sub) -> None:
    s = sub.add_parser("scaling", help="why scores are divided by sqrt(d_k): the notes' numbers, then a sweep over d_k",
                       description="Recompute the notes' scaling example, then measure, for d_k from 4 to 4096, what happens "
                                   "to the softmax with and without scaling: score spread, largest weight, entropy, gradient size.")
    s.add_argument("--png", metavar="FILE.png", help="write a plot of the sweep (PNG)")
    s.add_argument("--json", metavar="FILE.json", help="write every number as JSON")
    s.add_argument("--seed", type=seed_arg(), default=0, help="random seed (default 0)")
    s.add_argument("--keys", type=_positive("--keys"), default=32, help="keys per query, at least 2 (default 32)")
    s.add_argument("--queries", type=_positive("--queries"), default=512, help="random queries per d_k (default 512)")
    s.add_argument("--max-dk", type=_positive("--max-dk"), default=4096, help="largest d_k of the sweep, which runs over the powers of two from 4 up to it (default 4096)")
    _add_version(s)
    s.set_defaults(func=_cmd_scaling)


# -- backends --------------------------------------------------------------------------------


def _cmd_backends(args) -> int:
    from ._backends_cli import availability, which

    if args.which is not None:
        print(which(args.which))
        return 0
    print(availability(verbose=args.features))
    return 0


def _add_backends(sub) -> None:
    b = sub.add_parser("backends", help="the attention backends: which are available here and why not; which one auto takes",
                       description="List the attention backends, whether each can run on this machine (and why not), and "
                                   "with --which, which backend backend='auto' picks for a described call and why.")
    b.add_argument("--which", metavar="CALL",
                   help="describe a call as space-separated key=value pairs and flags, e.g. "
                        "'B=1 H=8 L=1024 D=64 dtype=float32 causal grad' (also: Hkv=, Lq=, Lk=, Dv=, device=, window=N, "
                        "stats, softcap=C, dropout=P); prints auto's choice and why each other backend is or is not used")
    b.add_argument("--features", action="store_true", help="also list what each backend supports, feature by feature")
    _add_version(b)
    b.set_defaults(func=_cmd_backends)


# -- compile: the cpu backend's kernels into numba's disk cache, ahead of the first call ----------


def _cmd_compile(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from . import backends
    from .backends import BackendUnavailable
    from .kernels import numba_cache_dir, warm

    names = [n.strip() for n in args.dtypes.split(",") if n.strip()]
    unknown = [n for n in names if n not in warm.GROUPS]
    if not names or unknown:
        raise UsageError(f"--dtypes must be a comma-separated list of {', '.join(warm.GROUPS)}, got {args.dtypes!r}")
    if "cpu" not in backends.names():
        raise BackendUnavailable("the cpu backend is not available here (it needs numba: pip install numba), "
                                 "so there is nothing to compile")
    console = Console(stderr=True)
    with Progress(TextColumn("compiling the cpu kernels"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=not args.verbose) as bar:
        task = bar.add_task("", total=warm.steps(names))

        def on_line(kind, label, detail):
            if args.verbose:
                bar.console.print(f"{kind} {label}" + (f" ({detail} s)" if kind == "done" else f": {detail}"))
            bar.update(task, advance=1, description=label)

        result = warm.compile_kernels(names, jobs=args.jobs, on_line=on_line)
    where = os.environ.get("NUMBA_CACHE_DIR") or numba_cache_dir() or os.path.join(os.path.dirname(warm.__file__), "__pycache__")
    print(f"cpu kernels for {', '.join(names)} ready in {result['seconds']:.0f} s ({len(result['done'])} calls compiled "
          f"them or loaded them from the cache: {where}); later processes load them from there")
    if result["failed"]:
        for line in result["failed"]:
            print(f"selfattn compile: failed: {line}", file=sys.stderr)
        return 1
    return 0


def _add_compile(sub) -> None:
    from .kernels.warm import GROUPS

    c = sub.add_parser("compile", help="compile the cpu backend's kernels now (once per install), not on the first call",
                       description="numba compiles the cpu backend's kernels the first time a call needs them (~25-60 s "
                                   "of one core per dtype) and caches them on disk. This makes those first calls now, "
                                   "in parallel processes, so that every later process starts in well under a second.")
    c.add_argument("--dtypes", default=",".join(GROUPS), metavar="LIST",
                   help=f"comma-separated compute dtypes (default all: {','.join(GROUPS)}; float16 runs the float32 kernels)")
    c.add_argument("--jobs", type=_positive("--jobs"), default=min(2, os.cpu_count() or 1),
                   help="processes compiling at once (default: 2, or 1 on a one-core machine)")
    c.add_argument("--verbose", action="store_true", help="print each finished step and its time")
    _add_version(c)
    c.set_defaults(func=_cmd_compile)


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
                                   "model of any text. Data-parallel: torchrun --standalone --nproc_per_node N -m selfattn.cli train ... "
                                   "Long context: --long --context-parallel N splits each 4096-token sequence over N "
                                   "processes (started here, or by torchrun); --qk-clip TAU caps each head's max logit.")
    add_train_arguments(t)
    _add_version(t)
    t.set_defaults(func=_cmd_train)


def _cmd_sample(args) -> int:
    from .training.command import run_sample

    return run_sample(args)


def _add_sample(sub) -> None:
    from .training.command import add_sample_arguments

    s = sub.add_parser("sample", help="generate from a checkpoint of selfattn train, with the KV cache",
                       description="Continue a prompt with a model trained by selfattn train: the prompt goes through the model "
                                   "once, then one token at a time with the KV cache, each printed as soon as it is drawn. "
                                   "The prompt is shown dimmed, then a marker, then the generated continuation.")
    add_sample_arguments(s)
    _add_version(s)
    s.set_defaults(func=_cmd_sample)


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors in one line (issue 16), not the usage block above the message."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="selfattn", description="Scaled dot-product self-attention you can read, run fast and look inside.",
                                epilog="Each command has its own --help. Bad input is reported in one line with exit status 2.")
    _add_version(p)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    _add_explain(sub)
    _add_scaling(sub)
    _add_backends(sub)
    _add_compile(sub)
    _add_train(sub)
    _add_sample(sub)
    return p


# packages of the [cli] extra and what the command line uses each for
_EXTRAS = {"rich": "terminal tables and progress bars", "matplotlib": "heatmaps and plots",
           "safetensors": "checkpoints"}


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split())  # one line, whatever the message held


def main(argv=None) -> int:
    """The single error boundary of the command line.

    Bad input and environment problems (``UsageError`` and the library's ``ValueError`` /
    ``TypeError``, an unavailable backend, a file that cannot be read or written, a size the
    machine cannot hold): one line on stderr, exit status 2. Ctrl-C: 130. Anything else is a bug:
    its traceback, a request to report it, exit status 1. ``SELFATTN_DEBUG=1`` re-raises everything.
    """
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named with the command they were given to, and where its options are listed
        where = f"selfattn {args.command}" if getattr(args, "command", None) else "selfattn"
        print(f"{where}: error: unrecognized arguments: {' '.join(unknown)} (see {where} --help)", file=sys.stderr)
        return 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = bool(os.environ.get("SELFATTN_DEBUG"))
    prefix = f"selfattn {args.command}: error:"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"selfattn {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        user = _user_error(e)
        if user is None:
            import traceback

            traceback.print_exc()
            print(f"{prefix} {_one_line(e)}\n{REPORT}", file=sys.stderr)
            return 1
        print(f"{prefix} {user}", file=sys.stderr)
        return 2


def _user_error(e: BaseException) -> str | None:
    """The one-line message for an error that is the input's or the machine's, not a bug (else None)."""
    if isinstance(e, (ValueError, TypeError)):
        return _one_line(e)
    if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] in _EXTRAS:
        return (f"this command needs {e.name} ({_EXTRAS[e.name.split('.')[0]]}), which is not installed: "
                "pip install 'selfattn[cli]' (or scripts/setup.sh)")
    if isinstance(e, OSError):  # a file that cannot be read or written, a full disk
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        return f"{e.strerror or _one_line(e)}{':' if where else ''}{where}"
    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e)):
        return "out of memory: use smaller sizes"
    if isinstance(e, ModuleNotFoundError) and e.name in ("rich", "matplotlib", "safetensors"):
        # the [cli] extra (pyproject.toml): the library itself needs none of these
        return f"this needs {e.name}, part of the command line's extra: pip install 'selfattn[cli]'"
    try:
        import torch

        if isinstance(e, torch.OutOfMemoryError):
            return f"out of memory on the device: use smaller sizes ({_one_line(e)[:200]})"
    except (ImportError, AttributeError):
        pass
    try:
        from .backends import BackendUnavailable

        if isinstance(e, BackendUnavailable):
            return _one_line(e)
    except ImportError:
        pass
    return None


if __name__ == "__main__":
    sys.exit(main())
