"""Two processes under torchrun (gloo, localhost) reach the same losses as one process with the same global batch.

Tolerance (STYLE.md rule 6): one process in float64 is the reference, one process in float32 its
low-precision twin; the 2-process float32 run (gradients summed by all-reduce in another order)
must stay within 3x the float32 run's own error, step by step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from selfattn import checkpoint
from selfattn.training import make_config, train
from selfattn.training.distributed import World
from selfattn.training.loop import LOG_JSONL

from tolerance import assert_close

RUN = dict(pairs=8, keys=8, values=8, dim=32, heads=2, batch=8, steps=8, lr=3e-3, warmup=2, target_acc=None,
           eval_every=4, eval_size=32, stats_every=1, checkpoint_every=1000, seed=5)


def _flags(cfg: dict) -> list:
    out = []
    for k, v in cfg.items():
        out += [f"--{k.replace('_', '-')}", "none" if v is None else str(v)]
    return out


def _rows(path):
    return [json.loads(line) for line in (path / LOG_JSONL).read_text().splitlines()]


def test_two_processes_match_one(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "selfattn.cli", "train", *_flags(RUN), "--out", str(tmp_path / "ddp"), "--no-progress", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, f"torchrun failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "2 processes on cpu" in r.stdout

    one32 = train(make_config(dict(RUN, out=str(tmp_path / "one32"))))
    one64 = train(make_config(dict(RUN, dtype="float64", out=str(tmp_path / "one64"))))
    rows2 = _rows(tmp_path / "ddp")
    assert [r["step"] for r in rows2] == list(range(1, RUN["steps"] + 1))
    got = torch.tensor([r["loss"] for r in rows2], dtype=torch.float64)
    ref64 = torch.tensor([l for _, l in one64.losses], dtype=torch.float64)
    low = torch.tensor([l for _, l in one32.losses], dtype=torch.float64)
    assert_close("2-process loss curve", got, ref64, low, factor=3.0, dtype=torch.float32)
    held2 = torch.tensor([r["heldout_loss"] for r in rows2 if "heldout_loss" in r], dtype=torch.float64)
    held64 = torch.tensor([r["heldout_loss"] for r in one64.rows if "heldout_loss" in r], dtype=torch.float64)
    held32 = torch.tensor([r["heldout_loss"] for r in one32.rows if "heldout_loss" in r], dtype=torch.float64)
    assert_close("2-process held-out loss", held2, held64, held32, factor=3.0, dtype=torch.float32)
    # per-head statistics were gathered from both ranks; the checkpoint rank 0 wrote loads
    assert all(len(r["heads"]) == 2 for r in rows2)
    ckpt = checkpoint.load(tmp_path / "ddp")
    assert ckpt.config["training"]["world_size"] == 2 and ckpt.config["training"]["step"] == RUN["steps"]
    ckpt.build()


def test_shard_splits_the_global_batch():
    ids = torch.arange(8)[:, None].expand(8, 3)  # (8, 3)
    parts = [World(rank=r, size=2).shard(ids) for r in range(2)]
    assert torch.equal(torch.cat(parts), ids)
    try:
        World(rank=0, size=3).shard(ids)
    except ValueError as e:
        assert "8 sequences" in str(e) and "3 processes" in str(e)
    else:
        raise AssertionError("an uneven split must be refused")
