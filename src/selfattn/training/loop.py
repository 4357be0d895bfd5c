"""The training loop behind ``selfattn train``.

One step: the global batch for this step (a pure function of seed and step) -> this rank's
rows -> forward (with ``return_stats=True`` every ``stats_every`` steps: per-layer, per-head
attention entropy and max logit come from the same forward pass) -> cross-entropy over the
scored positions -> backward -> gradient clipping -> AdamW with warm-up and cosine decay.
Every ``eval_every`` steps: loss and accuracy on a fixed held-out set; the recall task stops
as soon as the held-out accuracy reaches ``target_acc``.

Outputs in ``out``: the checkpoint (``model.safetensors``, ``config.json``,
``training.safetensors``), ``log.csv`` and ``log.jsonl`` (one row per logged step) and, at the
end, ``training.png``. Ctrl-C (SIGINT, or SIGTERM as torchrun sends it) finishes the current
step, saves a checkpoint and stops; a second Ctrl-C aborts at once.
"""

from __future__ import annotations

import csv
import json
import math
import signal
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import backends as _backends
from ..model import Transformer, TransformerConfig
from . import context as _context
from . import qkclip as _qkclip
from . import distributed as _dist
from . import state as _state
from .data import IGNORE, RecallTask, TextDataset

LOG_CSV, LOG_JSONL, PLOT_FILE = "log.csv", "log.jsonl", "training.png"


@dataclass
class TrainConfig:
    # -- data ---------------------------------------------------------------------------------
    text: str | None = None  # a UTF-8 text file: train a character-level model on it; None = the recall task
    long: bool = False  # the recall task's long variant: 4096 tokens and the other LONG_DEFAULTS
    keys: int = 16  # recall task: distinct key tokens
    values: int = 16  # recall task: distinct value tokens
    pairs: int = 24  # recall task: key/value pairs per sequence (sequence length 2 * pairs)
    seq_len: int = 128  # text: characters per training window
    # -- model --------------------------------------------------------------------------------
    dim: int = 64  # residual stream width
    layers: int = 2  # transformer blocks
    heads: int = 2  # attention heads per block (head width 32: measured to learn the recall task faster and more reliably than 4 x 16)
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * dim
    norm: str = "rms"  # "rms" or "layer"
    # -- optimisation -------------------------------------------------------------------------
    seed: int = 0  # model initialisation, batches and held-out set
    steps: int = 3000  # most optimizer steps
    batch: int = 32  # sequences per step, over all processes together
    lr: float = 3e-3  # peak learning rate (AdamW)
    warmup: int = 50  # steps of linear warm-up
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # clip the gradient norm to this (0 = off)
    # -- evaluation, logging, checkpoints -----------------------------------------------------
    target_acc: float | None = 0.99  # stop once held-out accuracy reaches this; None = run every step
    eval_every: int = 50  # steps between held-out evaluations
    eval_size: int = 512  # held-out sequences
    stats_every: int = 25  # steps between log rows (attention statistics come with them)
    checkpoint_every: int = 500  # steps between checkpoints (one is always written at the end)
    # -- where and how ------------------------------------------------------------------------
    backend: str = "auto"  # attention backend (selfattn.backends.names())
    device: str = "auto"  # "auto", "cpu" or "cuda"
    threads: int = 1  # torch CPU threads per process
    dtype: str = "float32"  # parameters and activations: "float32", or "float64" (slow; to check backends against each other)
    init: str | None = None  # start from this checkpoint's weights (step 0, fresh optimizer), e.g. a short-context model
    context_parallel: int = 1  # processes per sequence (ring attention, balanced layout); more processes: data parallel too
    qk_clip: float | None = None  # QK-clip threshold tau on each head's max logit (MuonClip); None = off
    out: str = "selfattn-train"  # output directory (checkpoint, logs, plot)


# defaults that differ for --text (a bigger model, longer windows, no accuracy target)
TEXT_DEFAULTS = {"dim": 128, "layers": 4, "heads": 4, "lr": 2e-3, "steps": 2000, "batch": 32, "warmup": 100,
                 "target_acc": None, "eval_every": 100, "eval_size": 64, "stats_every": 50}

# --long: the recall task at 4096 tokens (8 keys, 8 values). From scratch it learns slowly on a small CPU
# machine (attention spread over thousands of keys); continued from a short-context model (--init, trained with
# --keys 8 --values 8) it reaches the target in minutes, as long-context models are usually trained
LONG_DEFAULTS = {"pairs": 2048, "keys": 8, "values": 8, "batch": 2, "steps": 300, "warmup": 5, "lr": 1e-3,
                 "eval_every": 10, "eval_size": 4, "stats_every": 5, "target_acc": 0.99}

# options that may change when resuming; every other option must match the checkpoint
RUN_OPTIONS = {"steps", "target_acc", "eval_every", "stats_every", "checkpoint_every", "backend", "device", "threads", "out",
               "context_parallel", "qk_clip"}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def make_config(given: dict) -> TrainConfig:
    """A TrainConfig from the options given (None = default for the task), validated."""
    names = {f.name for f in fields(TrainConfig)}
    unknown = set(given) - names
    if unknown:
        raise TypeError(f"unknown training options: {sorted(unknown)}")
    vals = {k: v for k, v in given.items() if v is not None}
    if vals.get("text") is not None:
        vals = {**TEXT_DEFAULTS, **vals}
    elif vals.get("long"):
        vals = {**LONG_DEFAULTS, **vals}
    cfg = TrainConfig(**vals)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    for name in ("keys", "values", "pairs", "seq_len", "dim", "layers", "heads", "mlp_ratio", "steps", "batch",
                 "eval_every", "eval_size", "stats_every", "checkpoint_every", "threads"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not isinstance(cfg.warmup, int) or cfg.warmup < 0:
        raise ValueError(f"warmup must be a non-negative integer, got {cfg.warmup!r}")
    if not (isinstance(cfg.lr, (int, float)) and math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ValueError(f"lr must be a positive number, got {cfg.lr!r}")
    if not (isinstance(cfg.weight_decay, (int, float)) and cfg.weight_decay >= 0):
        raise ValueError(f"weight_decay must be a non-negative number, got {cfg.weight_decay!r}")
    if not (isinstance(cfg.grad_clip, (int, float)) and cfg.grad_clip >= 0):
        raise ValueError(f"grad_clip must be a non-negative number (0 = off), got {cfg.grad_clip!r}")
    if cfg.target_acc is not None and not (0 < cfg.target_acc <= 1):
        raise ValueError(f"target_acc must be in (0, 1], got {cfg.target_acc!r}")
    if cfg.backend not in _backends.names():
        raise ValueError(f"backend: unknown backend {cfg.backend!r}; choose one of {_backends.names()}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
    if cfg.norm not in ("rms", "layer"):
        raise ValueError(f"norm must be 'rms' or 'layer', got {cfg.norm!r}")
    if cfg.dim % cfg.heads or (cfg.dim // cfg.heads) % 2:
        raise ValueError(f"dim ({cfg.dim}) must be a multiple of heads ({cfg.heads}) with an even head width (RoPE), "
                         f"got head width {cfg.dim / cfg.heads:g}")
    RecallTask(cfg.keys, cfg.values, cfg.pairs)  # checks the task's own limits
    if cfg.long and cfg.text is not None:
        raise ValueError("long is a variant of the recall task; it cannot be combined with text")
    cp = cfg.context_parallel
    if isinstance(cp, bool) or not isinstance(cp, int) or cp < 1:
        raise ValueError(f"context_parallel must be a positive integer (processes per sequence), got {cp!r}")
    seq = cfg.seq_len if cfg.text is not None else 2 * cfg.pairs
    if cp > 1 and seq % (2 * cp):
        what = f"seq_len ({seq})" if cfg.text is not None else f"the sequence length 2 x pairs = {seq}"
        raise ValueError(f"context_parallel {cp}: {what} must be divisible by 2 x {cp} = {2 * cp} (the balanced layout "
                         f"gives each process two equal chunks of every sequence)")
    if cp > 1 and not stats_capable(cfg.backend):
        raise ValueError(f"context_parallel {cp}: ring attention merges the shards' partial results through their "
                         f"log-sum-exp, which backend {cfg.backend!r} does not return; use --backend auto, cpu or math")
    if cfg.qk_clip is not None and not (isinstance(cfg.qk_clip, (int, float)) and not isinstance(cfg.qk_clip, bool)
                                        and math.isfinite(cfg.qk_clip) and cfg.qk_clip > 0):
        raise ValueError(f"qk_clip must be a positive number (the max-logit threshold tau) or None, got {cfg.qk_clip!r}")
    if cfg.qk_clip is not None and not stats_capable(cfg.backend):
        raise ValueError(f"qk_clip needs each head's max logit from the attention kernels, and backend {cfg.backend!r} "
                         "returns no statistics; use --backend auto, cpu or math")


def resume_config(saved: dict, given: dict, where: str) -> TrainConfig:
    """The saved options, with the run options given now; other options must agree with the checkpoint."""
    names = {f.name for f in fields(TrainConfig)}
    base = {k: v for k, v in saved.items() if k in names}
    conflicts = [f"{k}={v!r} (checkpoint: {base.get(k)!r})" for k, v in given.items()
                 if v is not None and k not in RUN_OPTIONS and base.get(k) != v]
    if conflicts:
        raise ValueError(f"--resume {where}: these options cannot change when resuming: {', '.join(conflicts)}; "
                         f"only {', '.join(sorted(RUN_OPTIONS))} can")
    base.update({k: v for k, v in given.items() if v is not None and k in RUN_OPTIONS})
    cfg = TrainConfig(**base)
    validate(cfg)
    return cfg


def build_dataset(cfg: TrainConfig, vocab=None):
    if cfg.text is None:
        return RecallTask(cfg.keys, cfg.values, cfg.pairs)
    return TextDataset.from_file(cfg.text, cfg.seq_len, vocab=vocab)


def init_weights(cfg: TrainConfig, data) -> dict:
    """The weights of ``cfg.init``, checked against the model ``cfg`` builds: same shapes, same vocabulary."""
    from .. import checkpoint as _checkpoint

    ckpt = _checkpoint.load(cfg.init)
    where = f"init {cfg.init}"
    if ckpt.vocab is not None and list(ckpt.vocab) != list(data.vocab):
        raise ValueError(f"{where}: the checkpoint's vocabulary ({len(ckpt.vocab)} tokens: {' '.join(ckpt.vocab[:12])}...) is not "
                         f"this task's ({len(data.vocab)} tokens: {' '.join(data.vocab[:12])}...); train it with the same "
                         "--keys/--values (or text)")
    want = {n: tuple(p.shape) for n, p in build_model(cfg, data).named_parameters()}
    got = {n: tuple(t.shape) for n, t in ckpt.state_dict.items()}
    if got != want:
        diff = sorted(n for n in set(want) | set(got) if want.get(n) != got.get(n))[:4]
        raise ValueError(f"{where}: the checkpoint's model does not match --dim {cfg.dim} --layers {cfg.layers} --heads {cfg.heads} "
                         f"--mlp-ratio {cfg.mlp_ratio} --norm {cfg.norm}: " +
                         ", ".join(f"{n} {got.get(n)} here {want.get(n)}" for n in diff))
    return ckpt.state_dict


def build_model(cfg: TrainConfig, data) -> Transformer:
    seq = data.seq_len
    return Transformer(TransformerConfig(vocab_size=len(data.vocab), dim=cfg.dim, n_layers=cfg.layers, n_heads=cfg.heads,
                                         mlp_ratio=cfg.mlp_ratio, norm=cfg.norm, context=seq))


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up to ``lr``, then cosine decay to lr / 10 at ``steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t)))


def stats_capable(backend: str) -> bool:
    """Whether this backend returns attention statistics (its features say so; sdpa does not)."""
    if backend == "auto":
        return True  # auto picks a backend that can
    return not str(_backends.get(backend).features.get("stats", "yes")).startswith("no")


def configure_threads(threads: int) -> None:
    """torch's CPU threads per process, and numba's threading layer for the cpu backend's float64
    kernels (float32 and bfloat16 run on the backend's own pool of sleeping Python threads).

    numba's default OpenMP layer keeps its worker threads spinning between kernel calls; next to
    torch's own threads on a small, busy machine that made whole training steps 25x slower
    (BENCHMARKS.md, "Training throughput"). The workqueue layer sleeps instead. Only when the user
    set no layer (NUMBA_THREADING_LAYER) and none has started yet: numba reads this at first launch.
    """
    import os

    torch.set_num_threads(threads)
    if "NUMBA_THREADING_LAYER" not in os.environ:
        try:
            import numba
        except ImportError:
            return
        numba.config.THREADING_LAYER = "workqueue"


class _Interrupt:
    """SIGINT/SIGTERM -> a flag checked between steps; a second SIGINT raises KeyboardInterrupt."""

    def __init__(self, on_first):
        self.flag = False
        self.on_first = on_first
        self.old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, Ctrl-C behaves as usual
                pass
        return self

    def _handle(self, signum, frame):
        if self.flag and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.flag = True
        self.on_first(signum)

    def __exit__(self, *exc):
        for sig, h in self.old.items():
            signal.signal(sig, h)
        return False


@dataclass
class Result:
    steps: int  # the step counter at the end (steps done in this and earlier runs)
    stopped: str  # "target", "steps" or "interrupted"
    heldout_acc: float | None  # the last held-out accuracy
    heldout_loss: float | None
    train_tokens_per_s: float  # training tokens per second in this run (evaluation excluded)
    seconds: float  # wall time of this run
    total_seconds: float  # wall time over this run and the runs it resumed
    losses: list  # (step, training loss) of every step in this run
    out: Path  # the output directory
    rows: list  # the log rows (this run and the resumed ones)
    example: str  # an input to try with `selfattn explain --checkpoint`


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))  # float16/bfloat16 -> float32; float64 stays


def _head_stats(stats_list, world, top=None) -> list:
    """Per layer, per head: [mean entropy, mean max logit, largest max logit], reduced over ranks.

    ``top``: the largest max logits (layers, H) when already reduced (:func:`qkclip.head_max_logits`).
    """
    ent = torch.stack([s.entropy.detach().double().sum(dim=(0, 2)).cpu() for s in stats_list])  # (layers, H)
    mxl = torch.stack([s.max_logit.detach().double().sum(dim=(0, 2)).cpu() for s in stats_list])  # (layers, H)
    count = torch.tensor([float(stats_list[0].entropy[:, 0].numel())], dtype=torch.float64)
    packed = world.sum(torch.cat([ent.flatten(), mxl.flatten(), count]))
    if top is None:
        top = _qkclip.head_max_logits(stats_list, world)
    n = packed[-1]
    ent, mxl = packed[:ent.numel()].view_as(ent) / n, packed[ent.numel():-1].view_as(mxl) / n
    return [[{"entropy": float(ent[l, h]), "max_logit": float(mxl[l, h]), "max_logit_max": float(top[l, h])}
             for h in range(ent.shape[1])] for l in range(ent.shape[0])]


@torch.no_grad()
def evaluate(model, data, cfg: TrainConfig, world, heldout, cp=None) -> tuple:
    """(held-out loss, held-out accuracy) over the scored positions of the fixed held-out set."""
    ids, targets = heldout
    positions = None
    if cp is None:
        ids, targets = world.split(ids).to(world.device), world.split(targets).to(world.device)
    else:  # each cp group takes a share of the sequences, each of its ranks a shard of every one
        positions = cp.index(ids.shape[1], world.device)
        ids, targets = cp.split_rows(ids).to(world.device), cp.split_rows(targets).to(world.device)
        ids, targets = cp.shard(ids, positions), cp.shard(targets, positions)
    was = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)
    rows = 128 if cp is None and data.seq_len <= 1024 else 4
    for i in range(0, ids.shape[0], rows):
        x, y = ids[i:i + rows], targets[i:i + rows]
        if cp is None:
            logits = model(x, backend=cfg.backend)  # (b, L, V)
        else:
            logits = _context.forward(model, x, positions, cp, backend=cfg.backend)  # (b, L / cp, V)
        scored = y != IGNORE  # (b, L)
        sums[0] += float(F.cross_entropy(_upcast(logits[scored]), y[scored], reduction="sum"))
        sums[1] += float((logits.argmax(-1)[scored] == y[scored]).sum())
        sums[2] += float(scored.sum())
    model.train(was)
    sums = world.sum(sums)
    n = max(1.0, float(sums[2]))
    return float(sums[0]) / n, float(sums[1]) / n


def data_seq_len(cfg: TrainConfig) -> int:
    return cfg.seq_len if cfg.text is not None else 2 * cfg.pairs


def step_gradients(model, ddp, ids, targets, cfg: TrainConfig, world, cp=None, with_stats: bool = False) -> tuple:
    """Forward and backward of this rank's part of one global batch (ids, targets (batch, L)).

    Leaves in every parameter's ``.grad`` the gradient of the global batch's mean loss over its
    scored positions, the same on every rank. Returns (this rank's loss sum (float64 scalar),
    its correct predictions, per-layer stats or None).
    """
    n_scored = int((targets != IGNORE).sum())  # over the global batch
    if cp is None:
        x, y = world.shard(ids).to(world.device), world.shard(targets).to(world.device)  # (batch / world, L)
        res = ddp(x, backend=cfg.backend, return_stats=with_stats)
        mult = world.size  # DDP averages over ranks: this gives the global mean
    else:
        positions = cp.index(ids.shape[1], world.device)  # (L / cp,) global positions of this rank's tokens
        x, y = cp.rows(ids).to(world.device), cp.rows(targets).to(world.device)  # (batch / dp, L)
        x, y = cp.shard(x, positions), cp.shard(y, positions)  # (batch / dp, L / cp)
        res = _context.forward(model, x, positions, cp, backend=cfg.backend, return_stats=with_stats)
        mult = 1  # summed over all ranks below
    logits, stats = res if with_stats else (res, None)  # (b, n, V)
    scored = y != IGNORE  # (b, n)
    loss_sum = F.cross_entropy(_upcast(logits[scored]), y[scored], reduction="sum")
    (loss_sum * (mult / max(1, n_scored))).backward()
    if cp is not None:
        _context.all_reduce_grads(list(model.parameters()), world.size)
    with torch.no_grad():
        correct = (logits.detach().argmax(-1)[scored] == y[scored]).sum()
    return loss_sum.detach().double(), correct, stats


def _example(data, cfg: TrainConfig) -> str:
    """A short held-out input for `selfattn explain` / `selfattn sample`."""
    ids, targets = data.heldout(8, cfg.seed)
    if isinstance(data, RecallTask):
        # the shortest prefix of a held-out sequence that ends at a key seen before, at least 9 tokens long
        ends = [(t, row) for row in range(ids.shape[0]) for t in range(8, ids.shape[1]) if targets[row, t] != IGNORE]
        t, row = min(ends) if ends else (ids.shape[1] - 1, 0)
        return " ".join(data.vocab[i] for i in ids[row, :t + 1].tolist())
    return "".join(data.vocab[i] for i in ids[0, :min(48, ids.shape[1])].tolist())


class _Log:
    """log.csv and log.jsonl, appended as rows come; rows from a resumed run are kept up to its step."""

    def __init__(self, out: Path, resume_from: Path | None, step: int, main: bool):
        self.out, self.main = out, main
        self.rows: list = []
        if resume_from is not None and (resume_from / LOG_JSONL).is_file():
            for line in (resume_from / LOG_JSONL).read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                    self.rows.append(row)
        if main:
            with open(out / LOG_JSONL, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.rows)
            self._write_csv()

    def _csv_row(self, r: dict) -> dict:
        flat = {k: r.get(k) for k in ("step", "tokens", "seconds", "lr", "loss", "acc", "heldout_loss", "heldout_acc", "tokens_per_s")}
        for l, layer in enumerate(r.get("heads") or []):
            for h, s in enumerate(layer):
                flat[f"L{l}H{h}_entropy"] = s["entropy"]
                flat[f"L{l}H{h}_max_logit"] = s["max_logit"]
                flat[f"L{l}H{h}_max_logit_max"] = s["max_logit_max"]
        return flat

    def _write_csv(self) -> None:
        flat = [self._csv_row(r) for r in self.rows]
        cols = []
        for r in flat:
            cols.extend(k for k in r if k not in cols)
        with open(self.out / LOG_CSV, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=cols or ["step"])
            w.writeheader()
            w.writerows(flat)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if not self.main:
            return
        with open(self.out / LOG_JSONL, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        self._write_csv()


class Reporter:
    """The progress bar (rank 0, on a terminal) or one printed line per evaluation.

    The bar fits the terminal: below ``WIDE`` columns it drops the throughput (printed at the
    end instead) and shortens its labels, so step count and times are never cut off at 80.
    """

    WIDE = 110

    def __init__(self, console, total: int, start: int, show_bar: bool):
        self.console = console
        self.bar = None
        if show_bar:
            from rich.progress import Progress

            self.bar = Progress(*self.columns(console.width), console=console)
            self.task = self.bar.add_task("train", total=total, completed=start, loss="-", acc="-", heldout="-", tps="-")
            self.bar.start()

    @classmethod
    def columns(cls, width: int) -> list:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        if width >= cls.WIDE:
            return [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}  held-out {task.fields[heldout]}"
                               "  {task.fields[tps]} tok/s"),
                    TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn()]
        return [TextColumn("[bold]train"), BarColumn(bar_width=max(4, min(20, width - 74))), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]} acc {task.fields[acc]} ho {task.fields[heldout]}"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(compact=True)]

    def step(self, step, loss, acc, tps, heldout=None):
        if self.bar is not None:
            kw = dict(loss=f"{loss:.3f}", acc=f"{acc:.1%}", tps=f"{tps:,.0f}")
            if heldout is not None:
                kw["heldout"] = f"{heldout:.1%}"
            self.bar.update(self.task, completed=step, **kw)

    def line(self, text: str):
        if self.bar is not None:
            self.bar.console.print(text)
        elif self.console is not None:
            self.console.print(text, highlight=False)

    def stop(self):
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def train(cfg: TrainConfig, *, resume=None, console=None, progress: bool | None = None, on_step=None) -> Result:
    """Train (or continue training) a :class:`selfattn.model.Transformer` as ``cfg`` says.

    Args:
        cfg: the options (:func:`make_config` / :func:`resume_config` build and check them).
        resume: a checkpoint directory written by a previous run: weights, optimizer and RNG
            state and the step counter are restored, so the following steps compute exactly
            what the uninterrupted run would have computed.
        console: a ``rich.console.Console`` for the progress bar and messages (None: silent).
        progress: show a live progress bar (default: when the console is a terminal).
        on_step: called as ``on_step(step, loss)`` after every step; if it returns True the run
            stops there as after Ctrl-C (checkpoint saved, ``stopped == "interrupted"``).

    Returns a :class:`Result`.
    """
    world = _dist.setup(cfg.device)
    threads = torch.get_num_threads()
    try:
        return _train(cfg, world, resume, console if world.main else None, progress, on_step)
    finally:
        torch.set_num_threads(threads)
        _dist.cleanup(world)


def _train(cfg, world, resume, console, progress, on_step) -> Result:
    cp = None
    if cfg.context_parallel > 1:
        cp = _context.ContextParallel(cfg.context_parallel, world.rank, world.size)  # raises on every rank alike
        if cfg.batch % cp.dp_size:
            raise ValueError(f"batch: the global batch ({cfg.batch}) must be divisible by the number of data-parallel groups "
                             f"({world.size} processes / context_parallel {cfg.context_parallel} = {cp.dp_size})")
        cp.index(data_seq_len(cfg))  # the sequence splits into 2 chunks per process (validate() said so too)
        cp.join()
    elif cfg.batch % world.size:
        raise ValueError(f"batch: the global batch ({cfg.batch}) must be divisible by the number of processes ({world.size})")
    configure_threads(cfg.threads)
    out = Path(cfg.out)
    start, prev_seconds, prev_tokens, tensors, training = 0, 0.0, 0, None, None
    vocab = None
    if resume is not None:
        ckpt, training, tensors = _state.load(resume)
        vocab = ckpt.vocab
        start = training["step"]
        prev_seconds, prev_tokens = float(training.get("seconds", 0.0)), int(training.get("tokens", 0))
    data = build_dataset(cfg, vocab)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data).to(device=world.device, dtype=DTYPES[cfg.dtype])
    if resume is not None:
        try:
            model.load_state_dict(ckpt.state_dict)
        except RuntimeError as e:
            raise _state._checkpoint.CheckpointError(f"{ckpt.path}: the weights do not fit the model of its options: {e}") from None
    elif cfg.init is not None:
        with torch.no_grad():
            for name, t in init_weights(cfg, data).items():
                model.get_parameter(name).copy_(t)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    if resume is not None:
        _state.optimizer_from_safe(opt, tensors, training.get("optimizer"), str(ckpt.path))
        _state.rng_from_safe(tensors, str(ckpt.path))
    ddp = _dist.wrap(model, world) if cp is None else model  # context parallel: gradients summed by step_gradients
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
    world.barrier()

    heldout = data.heldout(cfg.eval_size, cfg.seed)
    example = _example(data, cfg)
    tokenizer = "chars" if cfg.text is not None else "words"
    want_stats = stats_capable(cfg.backend)
    log = _Log(out, Path(resume) if resume is not None else None, start, world.main)
    show_bar = bool(progress if progress is not None else (console is not None and console.is_terminal))
    rep = Reporter(console, cfg.steps, start, show_bar and console is not None)

    def save(step, seconds, tokens, last_eval):
        if world.main:
            training_json = {"step": step, "options": asdict(cfg), "seconds": seconds, "tokens": tokens,
                             "heldout": last_eval, "example": example, "world_size": world.size}
            _state.save(out, model, model.checkpoint_config(), vocab=list(data.vocab), tokenizer=tokenizer,
                        training=training_json, optimizer=opt)
        world.barrier()

    if console is not None:
        console.print(f"{data.describe()}", highlight=False)
        n_params = sum(p.numel() for p in model.parameters())
        console.print(f"model: {cfg.layers} layers x {cfg.heads} heads, width {cfg.dim}, {n_params:,} parameters; "
                      f"backend {cfg.backend}, {world.size} process{'es' if world.size > 1 else ''} on {world.device.type}, "
                      f"{cfg.threads} thread{'s' if cfg.threads > 1 else ''} each" + (f"; resuming at step {start}" if start else ""),
                      highlight=False)
        if cp is not None:
            console.print(f"context parallel: each sequence split over {cp.size} processes ({data.seq_len // cp.size} tokens each, "
                          f"ring attention, balanced layout) x {cp.dp_size} data-parallel group{'s' if cp.dp_size > 1 else ''}",
                          highlight=False)
        if cfg.qk_clip is not None:
            console.print(f"QK-clip: after each step, heads whose max logit exceeded {cfg.qk_clip:g} have their query and key "
                          "projections scaled back to it", highlight=False)
        if not want_stats:
            console.print(f"note: backend {cfg.backend!r} returns no attention statistics; the log has loss and accuracy only",
                          highlight=False)

    def on_signal(signum):
        rep.line(f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint (Ctrl-C again to abort)")

    seq_tokens = data.seq_len
    losses, step = [], start
    last_eval = training.get("heldout") if training else None
    heldout_loss = heldout_acc = None
    if isinstance(last_eval, dict):
        heldout_loss, heldout_acc = last_eval.get("loss"), last_eval.get("acc")
    stopped = "steps"
    t_run = time.perf_counter()
    train_time, tokens_run = 0.0, 0
    tps_recent = 0.0
    clipped = 0  # heads clipped since the last log row
    ddp.train()
    with _Interrupt(on_signal) as intr:
        try:
            while step < cfg.steps:
                t0 = time.perf_counter()
                lr = lr_at(cfg, step)
                for g in opt.param_groups:
                    g["lr"] = lr
                ids, targets = data.batch(cfg.batch, cfg.seed, step)  # (batch, L) global
                n_scored = int((targets != IGNORE).sum())  # over the global batch
                log_now = (step + 1) % cfg.stats_every == 0 or step + 1 == cfg.steps
                with_stats = want_stats and (log_now or cfg.qk_clip is not None)
                loss_sum, correct, stats = step_gradients(model, ddp, ids, targets, cfg, world, cp, with_stats)
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                top = _qkclip.head_max_logits(stats, world) if stats is not None else None  # (layers, H) over all ranks
                if cfg.qk_clip is not None:
                    clipped += _qkclip.clip(model, top, cfg.qk_clip)
                red = world.sum(torch.tensor([float(loss_sum), float(correct), float(intr.flag)], dtype=torch.float64))
                loss, acc = float(red[0]) / max(1, n_scored), float(red[1]) / max(1, n_scored)
                step += 1
                dt = time.perf_counter() - t0
                train_time += dt
                tokens_run += cfg.batch * seq_tokens
                tps_recent = cfg.batch * seq_tokens / dt if tps_recent == 0 else 0.9 * tps_recent + 0.1 * cfg.batch * seq_tokens / dt
                losses.append((step, loss))
                if on_step is not None and on_step(step, loss):
                    intr.flag = True

                evaluated = False
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    heldout_loss, heldout_acc = evaluate(model, data, cfg, world, heldout, cp)
                    last_eval = {"step": step, "loss": heldout_loss, "acc": heldout_acc}
                    evaluated = True
                if log_now or evaluated:
                    row = {"step": step, "tokens": prev_tokens + tokens_run, "seconds": prev_seconds + time.perf_counter() - t_run,
                           "lr": lr, "loss": loss, "acc": acc, "tokens_per_s": tokens_run / max(train_time, 1e-9)}
                    if evaluated:
                        row.update(heldout_loss=heldout_loss, heldout_acc=heldout_acc)
                    if stats is not None and log_now:
                        row["heads"] = _head_stats(stats, world, top)
                    if cfg.qk_clip is not None:
                        row.update(qk_clip=cfg.qk_clip, heads_clipped=clipped)
                        clipped = 0
                    log.add(row)
                rep.step(step, loss, acc, tps_recent, heldout_acc if evaluated else None)
                if evaluated and rep.bar is None:
                    rep.line(f"step {step}/{cfg.steps}  loss {loss:.4f}  acc {acc:.1%}  held-out loss {heldout_loss:.4f} "
                             f"acc {heldout_acc:.2%}  {tokens_run / max(train_time, 1e-9):,.0f} tok/s  "
                             f"{time.perf_counter() - t_run:.1f} s")
                if red[2] > 0 or (intr.flag and not world.distributed):  # ranks stop together, on the reduced flag
                    stopped = "interrupted"
                    break
                if evaluated and cfg.target_acc is not None and heldout_acc >= cfg.target_acc:
                    stopped = "target"
                    break
                if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                    save(step, prev_seconds + time.perf_counter() - t_run, prev_tokens + tokens_run, last_eval)
        finally:
            rep.stop()
        seconds = time.perf_counter() - t_run
        save(step, prev_seconds + seconds, prev_tokens + tokens_run, last_eval)
    if world.main:
        from .plot import plot_log

        try:
            plot_log(log.rows, out / PLOT_FILE, title=data.describe(), qk_clip=cfg.qk_clip)
        except Exception as e:  # a plot must never lose a finished run
            if console is not None:
                console.print(f"note: could not draw {out / PLOT_FILE}: {e}", highlight=False)
    return Result(step, stopped, heldout_acc, heldout_loss, tokens_run / max(train_time, 1e-9), seconds,
                  prev_seconds + seconds, losses, out, log.rows, example)
