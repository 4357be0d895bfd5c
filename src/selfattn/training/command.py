"""Arguments and output of ``selfattn train`` and ``selfattn sample`` (cli.py wires them in)."""

from __future__ import annotations

import argparse
import shlex
import sys

from .._cliutil import UsageError, check_memory, check_output_dir, seed_arg
from .._cliutil import float_arg as _float
from .._cliutil import int_arg as _int
from .loop import LOG_CSV, LOG_JSONL, PLOT_FILE, TEXT_DEFAULTS, TrainConfig

_D = TrainConfig()


def _default(field: str, fmt: str = "{}") -> str:
    """'default X' for the recall task, and '; Y with --text' where a --text run uses another value."""
    base = getattr(_D, field)
    text = TEXT_DEFAULTS.get(field, base)
    say = (lambda v: "none" if v is None else fmt.format(v))  # noqa: E731
    return f"default {say(base)}" + (f"; {say(text)} with --text" if text != base else "")


# (flag, TrainConfig field, type, help)
_TRAIN_OPTIONS = [
    ("--text", "text", str, "train a character-level model on this UTF-8 text file instead of the recall task"),
    ("--keys", "keys", _int("--keys"), f"recall task: distinct keys (default {_D.keys})"),
    ("--values", "values", _int("--values"), f"recall task: distinct values (default {_D.values})"),
    ("--pairs", "pairs", _int("--pairs"), f"recall task: key/value pairs per sequence (default {_D.pairs})"),
    ("--seq-len", "seq_len", _int("--seq-len"), f"--text: characters per training window (default {_D.seq_len})"),
    ("--dim", "dim", _int("--dim"), f"model width ({_default('dim')})"),
    ("--layers", "layers", _int("--layers"), f"transformer blocks ({_default('layers')})"),
    ("--heads", "heads", _int("--heads"), f"attention heads per block ({_default('heads')})"),
    ("--mlp-ratio", "mlp_ratio", _int("--mlp-ratio"), f"MLP width / model width (default {_D.mlp_ratio})"),
    ("--norm", "norm", str, "normalisation: rms or layer (default rms)"),
    ("--seed", "seed", seed_arg(), "seed of the initialisation, the batches and the held-out set (default 0)"),
    ("--steps", "steps", _int("--steps"), f"most optimizer steps ({_default('steps')})"),
    ("--batch", "batch", _int("--batch"), f"sequences per step, over all processes ({_default('batch')})"),
    ("--lr", "lr", _float("--lr", positive=True), f"peak learning rate ({_default('lr', '{:g}')})"),
    ("--warmup", "warmup", _int("--warmup", 0), f"warm-up steps ({_default('warmup')})"),
    ("--weight-decay", "weight_decay", _float("--weight-decay"), "AdamW weight decay (default 0)"),
    ("--grad-clip", "grad_clip", _float("--grad-clip"), f"gradient-norm clipping, 0 = off (default {_D.grad_clip:g})"),
    ("--target-acc", "target_acc", _float("--target-acc", positive=True, allow_none=True),
     f"stop when held-out accuracy reaches this; 'none' = run every step ({_default('target_acc', '{:g}')})"),
    ("--eval-every", "eval_every", _int("--eval-every"), f"steps between held-out evaluations ({_default('eval_every')})"),
    ("--eval-size", "eval_size", _int("--eval-size"), f"held-out sequences ({_default('eval_size')})"),
    ("--stats-every", "stats_every", _int("--stats-every"), f"steps between log rows with attention statistics ({_default('stats_every')})"),
    ("--checkpoint-every", "checkpoint_every", _int("--checkpoint-every"), f"steps between checkpoints (default {_D.checkpoint_every})"),
    ("--backend", "backend", str, "attention backend: auto, math, sdpa, cpu, ... (see `selfattn backends`; default auto)"),
    ("--device", "device", str, "auto, cpu or cuda (default auto)"),
    ("--threads", "threads", _int("--threads"), "torch threads per process (default 1: the model is small)"),
    ("--dtype", "dtype", str, "float32 (default) or float64 (slow; for checking backends against each other)"),
    ("--init", "init", str, "start from the weights of this checkpoint (step 0, a fresh optimizer): e.g. continue a "
                            "short-context model at --long's 4096 tokens; the model options must match"),
    ("--context-parallel", "context_parallel", _int("--context-parallel"),
     "split each sequence over N processes (ring attention, balanced layout). Under torchrun N must divide the "
     "number of processes (the rest is data parallel); otherwise selfattn starts N processes itself (default 1)"),
    ("--qk-clip", "qk_clip", _float("--qk-clip", positive=True),
     "QK-clip (MuonClip): after each step scale the query and key projections of every head whose max logit "
     "exceeded TAU back to TAU (default off)"),
    ("--out", "out", str, f"output directory: checkpoint, {LOG_CSV}, {LOG_JSONL}, {PLOT_FILE} (default {_D.out}; "
                          "with --resume: the resumed directory)"),
]


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    metavars = {"text": "FILE", "out": "DIR", "backend": "NAME", "device": "DEVICE", "norm": "{rms,layer}",
                "dtype": "{float32,float64}", "target_acc": "ACC", "qk_clip": "TAU", "init": "DIR"}
    p.add_argument("--long", dest="long", action="store_true", default=None,
                   help="the recall task's long variant: 4096-token sequences (2048 pairs, 8 keys, 8 values, batch 2); "
                        "made for --context-parallel")
    for flag, dest, typ, help_ in _TRAIN_OPTIONS:
        p.add_argument(flag, dest=dest, type=typ, default=None, help=help_, metavar=metavars.get(dest, "N"))
    p.add_argument("--resume", metavar="PATH", help="continue from a checkpoint written by selfattn train "
                                                     "(weights, optimizer, RNG state, step)")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar (a line per evaluation instead)")
    p.add_argument("--force", action="store_true", help="overwrite --out when it already holds another run's checkpoint or logs")


def _given(args) -> dict:
    given = {dest: getattr(args, dest) for _, dest, _, _ in _TRAIN_OPTIONS}
    given["long"] = getattr(args, "long", None)
    if given.get("target_acc") == -1.0:
        given["target_acc"] = None
        given["_no_target"] = True
    return given


def run_train(args) -> int:
    import os
    import sys

    from .distributed import _env_int

    if (_env_int("WORLD_SIZE") or 1) == 1:
        cfg = _config(args)  # every check before any process starts
        if cfg.context_parallel > 1:  # not under torchrun: start the processes here (training/launch.py)
            from .launch import spawn

            return spawn(cfg.context_parallel, run_train, args)
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

    from .._progress import compile_notice
    from .distributed import _env_int
    from .loop import train

    cfg = _config(args)
    console = Console(highlight=False, soft_wrap=True)
    with compile_notice(enabled=(_env_int("RANK") or 0) == 0):
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


def _config(args):
    """The run's TrainConfig from the arguments (and the resumed checkpoint), checked before any work."""
    from .loop import make_config, resume_config
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
    _check_run(cfg, args)
    return cfg


# files that mark a directory as holding a run (checkpoint or logs)
_RUN_FILES = ("config.json", "model.safetensors", LOG_JSONL, LOG_CSV)


def _check_run(cfg, args) -> None:
    """Refuse, before any work or output folder, what would fail later or destroy a run."""
    from pathlib import Path

    import torch

    from .distributed import _env_int

    if cfg.text is not None and args.resume is None:
        from .data import TextDataset

        TextDataset.from_file(cfg.text, cfg.seq_len)  # unreadable, not UTF-8, empty or too short: said now
    if cfg.init is not None:
        if args.resume is not None:
            raise UsageError("--init starts a new run from a checkpoint's weights; --resume continues one: give one of them")
        from .loop import build_dataset, init_weights

        init_weights(cfg, build_dataset(cfg))  # a checkpoint that cannot start this model: said now
    check_output_dir("--out", cfg.out)
    out = Path(cfg.out)
    same = False
    if args.resume is not None:  # resuming into the run's own folder continues it
        r = Path(args.resume)
        same = out.resolve() == (r.parent if r.is_file() else r).resolve()
    held = [f for f in _RUN_FILES if (out / f).exists()]
    # under torchrun only rank 0 writes, and only it judges --out (the others could see its first files);
    # if it refuses, torchrun stops the other workers
    if held and not same and not args.force and (_env_int("RANK") or 0) == 0:
        step = ""
        try:
            import json

            step = f" (trained to step {json.loads((out / 'config.json').read_text())['training']['step']})"
        except (OSError, ValueError, KeyError, TypeError):
            pass
        raise UsageError(f"--out {cfg.out} already holds another run{step}: {', '.join(held)}; continue it with --resume {cfg.out}, "
                         "choose another --out, or pass --force to overwrite it")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA device on this machine (use --device cpu or auto)")
    device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    if cfg.backend != "auto":
        from .. import backends
        from .._backends_cli import build, parse_call

        head_dim = cfg.dim // cfg.heads
        call = parse_call(f"B=1 H={cfg.heads} L=16 D={head_dim} dtype={cfg.dtype} device={device} causal grad")
        q, k, v, req = build(call)
        missing = backends.get(cfg.backend).unsupported(q, k, v, req)
        if missing:
            raise UsageError(f"--backend {cfg.backend} cannot train here: {missing}. `selfattn backends` lists what runs on "
                             "this machine; --backend auto picks one that does")
    seq = cfg.seq_len if cfg.text is not None else 2 * cfg.pairs
    vocab = 256 if cfg.text is not None else cfg.keys + cfg.values + 2
    params = 2 * vocab * cfg.dim + cfg.layers * (4 + 2 * cfg.mlp_ratio) * cfg.dim * cfg.dim
    width = 8 if cfg.dtype == "float64" else 4
    # weights, gradients, two AdamW moments; per layer activations (the MLP's are mlp_ratio wider) and
    # an L x L matrix per head for the unfused backends; logits and their gradient
    acts = cfg.batch * seq * (cfg.layers * (12 + 3 * cfg.mlp_ratio) * cfg.dim + cfg.layers * cfg.heads * seq * 2 + 3 * vocab)
    check_memory(width * (4 * params + acts), f"train with --dim {cfg.dim}, --layers {cfg.layers}, --batch {cfg.batch}",
                 "use a smaller --dim, --layers or --batch")


# -- sample ------------------------------------------------------------------------------------


def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a checkpoint written by selfattn train")
    p.add_argument("--prompt", help="text to continue (default: the example stored in the checkpoint)")
    p.add_argument("--tokens", type=_int("--tokens"), default=40, help="tokens to generate (default 40)")
    p.add_argument("--temperature", type=_float("--temperature"), default=1.0, help="sampling temperature; 0 = greedy (default 1)")
    p.add_argument("--top-k", type=_int("--top-k"), default=None, help="sample among the k most likely tokens only")
    p.add_argument("--seed", type=seed_arg(), default=0, help="sampling seed (default 0)")
    p.add_argument("--backend", default="auto", help="attention backend (default auto)")


def _marker(stream) -> str:
    # between the prompt and what the model wrote: an arrow where the terminal can show one
    try:
        "\u2192".encode(getattr(stream, "encoding", None) or "ascii")
        return " \u2192 "
    except (UnicodeEncodeError, LookupError):
        return " -> "


def run_sample(args) -> int:
    from .._progress import compile_notice
    from .sample import prepare

    out = sys.stdout
    tty = out.isatty()
    dim, colour, reset = ("\x1b[2m", "\x1b[1;36m", "\x1b[0m") if tty else ("", "", "")
    job = prepare(args.checkpoint, args.prompt, backend=args.backend)  # every check before the first token
    if args.backend != "auto":
        _check_sample_backend(job, args.backend)
    out.write(f"{dim}{job.prompt}{reset}{_marker(out)}{colour}")
    out.flush()

    def show(piece: str) -> None:
        out.write(piece)
        out.flush()

    try:
        with compile_notice(enabled=True):
            job.run(args.tokens, temperature=args.temperature, top_k=args.top_k, seed=args.seed, on_text=show)
    finally:
        out.write(f"{reset}\n")
        out.flush()
    return 0


def _check_sample_backend(job, name: str) -> None:
    from .. import backends
    from .._backends_cli import build, parse_call

    p = job.model.head.weight
    attn = job.model.blocks[0].attn
    dtype = {"torch.float32": "float32", "torch.float64": "float64"}.get(str(p.dtype), "float32")
    call = parse_call(f"B=1 H={attn.num_heads} Hkv={attn.num_kv_heads} L=16 D={attn.head_dim} dtype={dtype} "
                      f"device={p.device.type} causal")
    q, k, v, req = build(call)
    missing = backends.get(name).unsupported(q, k, v, req)
    if missing:
        raise UsageError(f"--backend {name} cannot run here: {missing}. `selfattn backends` lists what runs on this machine; "
                         "--backend auto picks one that does")
