"""selfattn train --context-parallel N: one sequence split over processes computes what one process computes.

One training step on gloo processes (each sequence sharded in the balanced layout, ring attention,
global RoPE positions, gradients summed over the world) against the single-process step on the
same global batch, both float64: loss and every parameter's gradient within 1e-10 relative. The
single-process step runs the `math` backend (the model's ordinary forward); the sharded one runs
ring attention with the fused cpu kernel on the pieces it serves.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _cli import run_cli

from selfattn.training import make_config
from selfattn.training.context import ContextParallel
from selfattn.training.distributed import World
from selfattn.training.loop import LOG_JSONL, build_dataset, build_model, step_gradients

CLI = [sys.executable, "-m", "selfattn.cli"]
# 64 tokens: balanced chunks of 16 on 2 processes; targets spread over every chunk
STEP = dict(pairs=32, keys=6, values=6, dim=32, heads=2, layers=2, batch=4, seed=3, dtype="float64")


def _assert_rel(label, got, ref, rel=1e-10):
    err = (got - ref).abs().max().item()
    scale = max(1e-300, ref.abs().max().item())
    print(f"{label}: max|diff| {err:.3e}, max|ref| {scale:.3e}")
    assert err <= rel * scale, f"{label}: max|diff| {err:.3e} > {rel:g} x {scale:.3e}"


def _one_step(cfg, world, cp, backend, with_stats):
    data = build_dataset(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data).to(torch.float64)
    ids, targets = data.batch(cfg.batch, cfg.seed, 7)  # (batch, L) the same global batch everywhere
    cfg.backend = backend
    loss, correct, stats = step_gradients(model, model, ids, targets, cfg, world, cp, with_stats)
    total = world.sum(torch.stack([loss, correct.double()]))
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return total, grads, stats


def _step_worker(rank, world_size, cp_size, init, errors):
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=60))
        try:
            cfg = make_config(dict(STEP, context_parallel=cp_size))
            world = World(rank=rank, size=world_size, backend="gloo")
            cp = ContextParallel(cp_size, rank, world_size).join()
            got, got_grads, stats = _one_step(cfg, world, cp, "auto", True)
            ref, ref_grads, ref_stats = _one_step(make_config(STEP), World(), None, "math", True)  # one process, whole batch
            n = int((build_dataset(cfg).batch(cfg.batch, cfg.seed, 7)[1] != -100).sum())
            assert n > 0
            _assert_rel(f"rank {rank}: loss sum", got[0], ref[0])
            assert got[1] == ref[1], f"rank {rank}: correct predictions {got[1]} != {ref[1]}"
            for name, g in ref_grads.items():
                assert float(g.abs().max()) > 0, f"{name}: the reference gradient is zero (a test that checks nothing)"
                _assert_rel(f"rank {rank}: grad {name}", got_grads[name], g)
            # the statistics QK-clip reads: this rank's rows of the unsharded call's max logits
            pos = cp.index(ref_stats[0].max_logit.shape[-1])
            rows = cp.rows(torch.arange(cfg.batch))
            for layer, (a, b) in enumerate(zip(stats, ref_stats)):
                _assert_rel(f"rank {rank}: layer {layer} max_logit", a.max_logit, b.max_logit[rows][:, :, pos])
        finally:
            dist.destroy_process_group()
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise


@pytest.mark.parametrize("world_size, cp_size", [(2, 2), (4, 2)])
def test_context_parallel_step_matches_one_process(tmp_path, world_size, cp_size):
    # (2, 2): one sequence over both processes; (4, 2): two cp groups of 2, data parallel between them
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    try:
        mp.spawn(_step_worker, args=(world_size, cp_size, f"file://{tmp_path}/rdv", errors), nprocs=world_size, join=True)
    except mp.ProcessRaisedException:
        msgs = []
        while not errors.empty():
            msgs.append("rank %d:\n%s" % errors.get())
        pytest.fail("\n".join(msgs) or "a rank failed")


def _flags(cfg: dict) -> list:
    out = []
    for k, v in cfg.items():
        out += [f"--{k.replace('_', '-')}", "none" if v is None else str(v)]
    return out


# with QK-clip below the initial max logits: the clip's MAX over ranks decides every rank's scaling (a rank clipping
# by its own statistics would drift from the others and from one process)
RUN = dict(pairs=16, keys=6, values=6, dim=32, heads=2, batch=4, steps=2, lr=3e-3, warmup=1, target_acc=None, eval_every=2,
           eval_size=6, stats_every=1, seed=1, dtype="float64", device="cpu", qk_clip=3.0)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def test_cli_starts_its_processes_and_matches_one_process(tmp_path):
    # `selfattn train --context-parallel 2` outside torchrun starts 2 processes itself; its loss curve and held-out
    # losses (float64) are those of one process on the whole sequences, step by step
    r = subprocess.run(CLI + ["train", *_flags(RUN), "--context-parallel", "2", "--out", str(tmp_path / "cp"), "--no-progress"],
                       capture_output=True, text=True, timeout=600, env=_env())  # a hang guard: 3 processes, kernels may compile
    assert r.returncode == 0, f"failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "split over 2 processes (16 tokens each" in r.stdout
    # the one-process run: a process of its own without a whole interpreter's start (tests/_cli.py)
    one = run_cli("train", *_flags(RUN), "--backend", "math", "--out", tmp_path / "one", "--no-progress", env=_env(), timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    rows = [[json.loads(x) for x in (tmp_path / d / LOG_JSONL).read_text().splitlines()] for d in ("cp", "one")]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]] == [1, 2]
    for key in ("loss", "heldout_loss"):
        got = torch.tensor([r[key] for r in rows[0] if key in r], dtype=torch.float64)
        ref = torch.tensor([r[key] for r in rows[1] if key in r], dtype=torch.float64)
        assert got.numel() == ref.numel() > 0
        _assert_rel(key, got, ref, rel=1e-9)  # two AdamW steps of float64 rounding differences
    got = torch.tensor([[h["max_logit_max"] for layer in r["heads"] for h in layer] for r in rows[0]], dtype=torch.float64)
    ref = torch.tensor([[h["max_logit_max"] for layer in r["heads"] for h in layer] for r in rows[1]], dtype=torch.float64)
    _assert_rel("max logit per head", got, ref, rel=1e-9)
    assert sum(r["heads_clipped"] for r in rows[0]) > 0  # the clip acted


def test_bad_context_parallel_is_refused_before_any_process_starts(tmp_path):
    # 2 x 9 = 18 tokens cannot be cut into 2 x 2 equal chunks
    r = run_cli("train", "--pairs", "9", "--context-parallel", "2", "--out", tmp_path / "x", env=_env(), timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "divisible by 2 x 2 = 4" in r.stderr and "2 x pairs = 18" in r.stderr, r.stderr
    r = run_cli("train", "--context-parallel", "0", env=_env(), timeout=60)
    assert r.returncode == 2 and "--context-parallel must be a positive integer, got 0" in r.stderr, r.stderr
    with pytest.raises(ValueError, match="log-sum-exp, which backend 'sdpa' does not return"):
        make_config(dict(pairs=8, context_parallel=2, backend="sdpa"))
    assert not (tmp_path / "x").exists()


def test_context_parallel_not_dividing_the_world_fails_on_every_rank(tmp_path):
    # under torchrun with 2 processes, 4 per sequence cannot be arranged: every rank says so and exits, none waits
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "selfattn.cli",
           "train", "--pairs", "8", "--context-parallel", "4", "--out", str(tmp_path / "x"), "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())  # a hang guard
    assert r.returncode != 0
    want = "4 processes per sequence must divide the number of processes (2)"
    assert r.stderr.count(want) == 2, r.stderr[-3000:]  # one line from each rank


def test_grid_of_ranks():
    # 8 processes, 2 per sequence: cp groups {0 1} {2 3} ..., dp groups {0 2 4 6} {1 3 5 7}
    seen = {}
    for rank in range(8):
        cp = ContextParallel(2, rank, 8)  # no groups joined: only the arithmetic
        batch = torch.arange(8)[:, None].expand(8, 8)  # (8, 8) row i holds i
        seen[rank] = (cp.rows(batch)[:, 0].tolist(), cp.index(8).tolist())
    assert seen[0] == ([0, 1], [0, 1, 6, 7]) and seen[1] == ([0, 1], [2, 3, 4, 5])
    assert seen[6] == ([6, 7], [0, 1, 6, 7]) and seen[7] == ([6, 7], [2, 3, 4, 5])
    with pytest.raises(ValueError, match=r"must divide the number of processes \(6\)"):
        ContextParallel(4, 0, 6)
    with pytest.raises(ValueError, match="divisible by 2 x 2 = 4"):
        ContextParallel(2, 0, 2).index(10)


def test_init_continues_a_short_model_and_refuses_one_that_does_not_fit(tmp_path):
    from selfattn.training import train
    from selfattn.training.loop import init_weights

    short = make_config(dict(pairs=8, keys=8, values=8, dim=32, steps=2, eval_every=1000, eval_size=4, target_acc=None,
                             out=str(tmp_path / "short")))
    train(short)
    # the --long task at 8 keys and values (4096 tokens) starts from the short model's weights, unchanged
    longer = make_config(dict(long=True, dim=32, init=str(tmp_path / "short")))
    assert longer.pairs == 2048 and longer.lr == 1e-3
    w = init_weights(longer, build_dataset(longer))
    from selfattn import checkpoint

    ref = checkpoint.load(tmp_path / "short").state_dict
    assert all(torch.equal(w[n], ref[n]) for n in ref)
    with pytest.raises(ValueError, match="vocabulary"):
        other = make_config(dict(long=True, keys=6, dim=32, init=str(tmp_path / "short")))
        init_weights(other, build_dataset(other))
    with pytest.raises(ValueError, match="does not match --dim 64"):
        wide = make_config(dict(long=True, init=str(tmp_path / "short")))
        init_weights(wide, build_dataset(wide))
