"""Arguments and output of ``selfattn train`` and ``selfattn sample`` (cli.py wires them in)."""

from __future__ import annotations

import argparse
import math
import shlex

from ..cli import int_arg as _int
from .loop import LOG_CSV, LOG_JSONL, PLOT_FILE, TEXT_DEFAULTS, TrainConfig

_D = TrainConfig()


def _float(name, *, positive=False, allow_none=False):
    def parse(s):
        if allow_none and s.lower() in ("none", "off"):
            return -1.0  # sentinel: no target
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {s!r}") from None
        if not math.isfinite(v) or v < 0 or (positive and v == 0):
            raise argparse.ArgumentTypeError(f"{name} must be a {'positive' if positive else 'non-negative'} number, got {s!r}")
        return v
    return parse


# (flag, TrainConfig field, type, help)
_TRAIN_OPTIONS = [
    ("--text", "text", str, "train a character-level model on this UTF-8 text file instead of the recall task"),
    ("--keys", "keys", _int("--keys"), f"recall task: distinct keys (default {_D.keys})"),
    ("--values", "values", _int("--values"), f"recall task: distinct values (default {_D.values})"),
    ("--pairs", "pairs", _int("--pairs"), f"recall task: key/value pairs per sequence (default {_D.pairs})"),
    ("--seq-len", "seq_len", _int("--seq-len"), f"--text: characters per training window (default {_D.seq_len})"),
    ("--dim", "dim", _int("--dim"), f"model width (default {_D.dim}; {TEXT_DEFAULTS['dim']} with --text)"),
    ("--layers", "layers", _int("--layers"), f"transformer blocks (default {_D.layers}; {TEXT_DEFAULTS['layers']} with --text)"),
    ("--heads", "heads", _int("--heads"), f"attention heads per block (default {_D.heads})"),
    ("--mlp-ratio", "mlp_ratio", _int("--mlp-ratio"), f"MLP width / model width (default {_D.mlp_ratio})"),
    ("--norm", "norm", str, "normalisation: rms or layer (default rms)"),
    ("--seed", "seed", _int("--seed", 0), "seed of the initialisation, the batches and the held-out set (default 0)"),
    ("--steps", "steps", _int("--steps"), f"most optimizer steps (default {_D.steps}; {TEXT_DEFAULTS['steps']} with --text)"),
    ("--batch", "batch", _int("--batch"), f"sequences per step, over all processes (default {_D.batch})"),
    ("--lr", "lr", _float("--lr", positive=True), f"peak learning rate (default {_D.lr:g}; {TEXT_DEFAULTS['lr']:g} with --text)"),
    ("--warmup", "warmup", _int("--warmup", 0), f"warm-up steps (default {_D.warmup})"),
    ("--weight-decay", "weight_decay", _float("--weight-decay"), "AdamW weight decay (default 0)"),
    ("--grad-clip", "grad_clip", _float("--grad-clip"), f"gradient-norm clipping, 0 = off (default {_D.grad_clip:g})"),
    ("--target-acc", "target_acc", _float("--target-acc", positive=True, allow_none=True),
     f"stop when held-out accuracy reaches this; 'none' = run every step (default {_D.target_acc:g}; none with --text)"),
    ("--eval-every", "eval_every", _int("--eval-every"), f"steps between held-out evaluations (default {_D.eval_every})"),
    ("--eval-size", "eval_size", _int("--eval-size"), f"held-out sequences (default {_D.eval_size})"),
    ("--stats-every", "stats_every", _int("--stats-every"), f"steps between log rows with attention statistics (default {_D.stats_every})"),
    ("--checkpoint-every", "checkpoint_every", _int("--checkpoint-every"), f"steps between checkpoints (default {_D.checkpoint_every})"),
    ("--backend", "backend", str, "attention backend: auto, math, sdpa, cpu, ... (see `selfattn backends`; default auto)"),
    ("--device", "device", str, "auto, cpu or cuda (default auto)"),
    ("--threads", "threads", _int("--threads"), "torch threads per process (default 1: the model is small)"),
    ("--dtype", "dtype", str, "float32 (default) or float64 (slow; for checking backends against each other)"),
    ("--out", "out", str, f"output directory: checkpoint, {LOG_CSV}, {LOG_JSONL}, {PLOT_FILE} (default {_D.out}; "
                          "with --resume: the resumed directory)"),
]


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    metavars = {"text": "FILE", "out": "DIR", "backend": "NAME", "device": "DEVICE", "norm": "{rms,layer}",
                "dtype": "{float32,float64}", "target_acc": "ACC"}
    for flag, dest, typ, help_ in _TRAIN_OPTIONS:
        p.add_argument(flag, dest=dest, type=typ, default=None, help=help_, metavar=metavars.get(dest, "N"))
    p.add_argument("--resume", metavar="PATH", help="continue from a checkpoint written by selfattn train "
                                                     "(weights, optimizer, RNG state, step)")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar (a line per evaluation instead)")


def _given(args) -> dict:
    given = {dest: getattr(args, dest) for _, dest, _, _ in _TRAIN_OPTIONS}
    if given.get("target_acc") == -1.0:
        given["target_acc"] = None
        given["_no_target"] = True
    return given


def run_train(args) -> int:
    import os
    import sys

    from .distributed import _env_int

    code = _run_train(args)
    if (_env_int("WORLD_SIZE") or 1) > 1:
        # under torchrun: leave without native teardown. A worker that ran the numba `cpu` kernels
        # and gloo sometimes aborted in a C++ destructor after Python had finished ("terminate
        # called without an active exception", about 1 run in 6 on a loaded 2-core machine;
        # never in one process, never with sdpa). Everything is written and closed by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _run_train(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .distributed import _env_int
    from .loop import make_config, resume_config, train
    from .state import load as load_state

    given = _given(args)
    no_target = given.pop("_no_target", False)
    if args.resume is not None:
        _, training, _ = load_state(args.resume)
        if given.get("out") is None:
            given["out"] = args.resume
        cfg = resume_config(training["options"], given, args.resume)
    else:
        cfg = make_config(given)
    if no_target:
        cfg.target_acc = None
    console = Console(highlight=False, soft_wrap=True)
    res = train(cfg, resume=args.resume, console=console, progress=False if args.no_progress else None)
    if (_env_int("RANK") or 0) != 0:
        return 130 if res.stopped == "interrupted" else 0
    c = console
    acc = "-" if res.heldout_acc is None else f"{res.heldout_acc:.2%}"
    if res.stopped == "target":
        c.print(f"[bold green]reached held-out accuracy {acc} (target {cfg.target_acc:.0%}) at step {res.steps} "
                f"in {res.seconds:.1f} s[/]")
    elif res.stopped == "interrupted":
        c.print(f"[bold yellow]interrupted at step {res.steps}[/]: checkpoint saved; continue with "
                f"selfattn train --resume {shlex.quote(str(res.out))}")
    else:
        target = f" (target {cfg.target_acc:.0%} not reached)" if cfg.target_acc is not None else ""
        c.print(f"finished {res.steps} steps in {res.seconds:.1f} s: held-out accuracy {acc}{target}, "
                f"held-out loss {res.heldout_loss if res.heldout_loss is None else round(res.heldout_loss, 4)}")
    c.print(f"throughput: {res.train_tokens_per_s:,.0f} training tokens/s (backend {cfg.backend}, "
            f"{cfg.threads} thread(s) per process; evaluation excluded)")
    last = next((r for r in reversed(res.rows) if r.get("heads")), None)
    if last is not None:
        t = Table(title=f"attention per head at step {last['step']} (training batch)", title_justify="left")
        t.add_column("layer")
        t.add_column("head")
        t.add_column("entropy (nats)", justify="right")
        t.add_column("max logit (mean)", justify="right")
        t.add_column("max logit (max)", justify="right")
        for l, layer in enumerate(last["heads"]):
            for h, s in enumerate(layer):
                t.add_row(str(l), str(h), f"{s['entropy']:.3f}", f"{s['max_logit']:.2f}", f"{s['max_logit_max']:.2f}")
        c.print(t)
    out = shlex.quote(str(res.out))
    c.print(f"checkpoint: {res.out}/  log: {res.out}/{LOG_CSV}, {res.out}/{LOG_JSONL}  plot: {res.out}/{PLOT_FILE}")
    c.print(f"look at the heads:  selfattn explain --checkpoint {out} {shlex.quote(res.example)}")
    c.print(f"generate:           selfattn sample --checkpoint {out}")
    return 130 if res.stopped == "interrupted" else 0


# -- sample ------------------------------------------------------------------------------------


def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a checkpoint written by selfattn train")
    p.add_argument("--prompt", help="text to continue (default: the example stored in the checkpoint)")
    p.add_argument("--tokens", type=_int("--tokens"), default=40, help="tokens to generate (default 40)")
    p.add_argument("--temperature", type=_float("--temperature"), default=1.0, help="sampling temperature; 0 = greedy (default 1)")
    p.add_argument("--top-k", type=_int("--top-k"), default=None, help="sample among the k most likely tokens only")
    p.add_argument("--seed", type=_int("--seed", 0), default=0, help="sampling seed (default 0)")
    p.add_argument("--backend", default="auto", help="attention backend (default auto)")


def run_sample(args) -> int:
    from rich.console import Console
    from rich.text import Text

    from .sample import sample_text

    prompt, new = sample_text(args.checkpoint, args.prompt, max_new_tokens=args.tokens, temperature=args.temperature,
                              top_k=args.top_k, seed=args.seed, backend=args.backend)
    console = Console(highlight=False, soft_wrap=True)
    t = Text(prompt)
    t.append(new, style="bold cyan")
    console.print(t)
    return 0
