"""selfattn train on the recall task: it learns, the induction circuit is there, resume and Ctrl-C work."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from _cli import run_cli

import selfattn
from selfattn import checkpoint
from selfattn.training import IGNORE, RecallTask, make_config, resume_config, train
from selfattn.training.loop import LOG_CSV, LOG_JSONL, PLOT_FILE

# a small recall task that trains to 99 % held-out accuracy in a few seconds
SMALL = dict(pairs=12, keys=8, values=8, eval_every=25, stats_every=25, seed=0)
CLI = [sys.executable, "-m", "selfattn.cli"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("recall")
    cfg = make_config(dict(SMALL, out=str(out)))
    res = train(cfg)
    return cfg, res


def test_short_run_learns_far_below_chance(trained):
    cfg, res = trained
    chance = math.log(cfg.values)
    final = res.losses[-1][1]
    print(f"stopped: {res.stopped} at step {res.steps}; loss {final:.4f} (chance {chance:.3f}); held-out {res.heldout_acc:.4f}")
    assert res.stopped == "target" and res.heldout_acc >= 0.99
    assert final < 0.1 * chance, f"training loss {final} is not well below chance {chance}"
    assert res.losses[0][1] > 0.5 * chance, "the first step should be near chance (nothing learned yet)"
    # log rows with per-layer, per-head statistics from the training forward pass
    rows = [json.loads(line) for line in (res.out / LOG_JSONL).read_text().splitlines()]
    with_heads = [r for r in rows if "heads" in r]
    assert with_heads and all(len(r["heads"]) == cfg.layers and all(len(l) == cfg.heads for l in r["heads"]) for r in with_heads)
    for r in with_heads:
        for layer in r["heads"]:
            for h in layer:
                assert 0.0 <= h["entropy"] <= math.log(2 * cfg.pairs) + 1e-6  # at most log(number of keys seen)
                assert math.isfinite(h["max_logit"]) and h["max_logit"] <= h["max_logit_max"]
    header = (res.out / LOG_CSV).read_text().splitlines()[0].split(",")
    assert {"step", "loss", "acc", "heldout_acc", "L0H0_entropy", f"L{cfg.layers - 1}H{cfg.heads - 1}_max_logit"} <= set(header)
    png = (res.out / PLOT_FILE).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def _after_earlier_occurrence(ids):
    """(B, Lq, Lk) True where key j is right after an earlier occurrence of query i's token."""
    L = ids.shape[1]
    earlier = (ids[:, :, None] == ids[:, None, :]) & torch.ones(L, L, dtype=torch.bool).tril(-1)  # (B, Lq, Lk)
    after = torch.zeros_like(earlier)
    after[:, :, 1:] = earlier[:, :, :-1]
    return after


def test_learned_induction_head(trained):
    cfg, res = trained
    model = checkpoint.load(res.out).build()
    task = RecallTask(cfg.keys, cfg.values, cfg.pairs)
    ids, targets = task.heldout(256, cfg.seed)
    with torch.no_grad():
        logits, weights = model(ids, need_weights=True)  # weights: per layer (B, H, L, L)
    scored = targets != IGNORE  # queries whose token occurred before
    after = _after_earlier_occurrence(ids)
    L = ids.shape[1]
    hits = []  # [layer][head]: fraction of scored queries whose largest weight is right after an earlier occurrence
    prev = []  # [layer][head]: fraction of value positions whose largest weight is on the previous token (the key)
    for w in weights:
        top = w.argmax(-1)  # (B, H, L)
        hits.append([float(after.gather(2, top[:, h, :, None])[..., 0][scored].float().mean()) for h in range(w.shape[1])])
        prev.append([float((top[:, h, 1::2] == torch.arange(1, L, 2)[None] - 1).float().mean()) for h in range(w.shape[1])])
    print("induction (argmax right after an earlier occurrence):", [[round(x, 3) for x in l] for l in hits])
    print("previous token at value positions:", [[round(x, 3) for x in l] for l in prev])
    # what happens: layer 0 has a previous-token head (each value looks at its key), layer 1 an
    # induction head (a repeated key looks at the value after its earlier occurrence); layer 0 cannot
    assert max(hits[1]) >= 0.9
    assert max(prev[0]) >= 0.7
    assert max(hits[0]) < 0.5
    # and explain --checkpoint shows that same head: the explain trace's weights agree
    ex = res.example
    tr = selfattn.explain(ex, checkpoint=str(res.out))
    assert [layer.name for layer in tr.layers] == ["blocks.0.attn", "blocks.1.attn"]
    tokens = ex.split(" ")
    vocab = {t: i for i, t in enumerate(task.vocab)}
    x = torch.tensor([[vocab[t] for t in tokens]])
    with torch.no_grad():
        _, w_model = model(x, need_weights=True)
    best = max(range(cfg.heads), key=lambda h: hits[1][h])
    w_explain = torch.as_tensor(tr.layers[1].heads[best].weights, dtype=torch.float64)  # (L, L)
    torch.testing.assert_close(w_explain, w_model[1][0, best].double(), rtol=1e-4, atol=1e-5)
    q = len(tokens) - 1  # the example ends at a key seen before
    j = int(w_explain[q].argmax())
    assert tokens[j - 1] == tokens[q] and j - 1 < q, f"layer 1 head {best}: query {tokens[q]}@{q} attends to {tokens[j]}@{j}"


def test_sample_from_trained_recalls_the_value(trained):
    cfg, res = trained
    from selfattn.training import sample_text

    prompt, cont = sample_text(res.out, res.example, max_new_tokens=1, temperature=0)
    tokens = prompt.split(" ")
    expected = next(tokens[i + 1] for i in range(len(tokens) - 1) if tokens[i] == tokens[-1])
    assert cont.strip() == expected, f"{prompt!r} -> {cont!r}, expected {expected!r}"


def test_explain_names_the_induction_head_and_shows_predictions(trained):
    """`selfattn explain --checkpoint` on the trained model: the recall answers among its guesses, and a
    layer-1 head named as an induction head (issue 16). Four held-out sequences: a single one has only
    5-8 scored positions."""
    cfg, res = trained
    from selfattn.explain import explain
    from selfattn.explain.trace import recognised

    task = RecallTask(cfg.keys, cfg.values, cfg.pairs)
    ids, targets = task.heldout(4, cfg.seed)
    top1 = top3 = total = induction = 0
    for s in range(4):
        mt = explain(" ".join(task.vocab[i] for i in ids[s].tolist()), checkpoint=res.out)
        assert len(mt.predictions) == len(mt.tokens) and all(len(p) == 3 for p in mt.predictions)
        for t in range(len(mt.tokens)):
            if targets[s, t] != IGNORE:
                answer = task.vocab[int(targets[s, t])]
                top1 += mt.predictions[t][0][0] == answer
                top3 += answer in [g for g, _ in mt.predictions[t]]
                total += 1
        named = {h.label: [f[0] for f in recognised(h.patterns)] for h in mt.heads}
        print(s, named)
        induction += any("induction" in pats for label, pats in named.items() if label.startswith("blocks.1"))
        assert not any("induction" in pats for label, pats in named.items() if label.startswith("blocks.0")), named
        # the induction keys get more weight from layer 1's heads than from any head of layer 0
        best = {layer: max(h.patterns["induction"][0] for h in mt.heads if h.label.startswith(layer))
                for layer in ("blocks.0", "blocks.1")}
        assert best["blocks.1"] > best["blocks.0"], best
    assert top1 >= 0.75 * total and top3 >= 0.9 * total, (top1, top3, total)
    assert induction >= 1, "no induction head named in any of 4 sequences"


TINY = dict(pairs=8, keys=8, values=8, dim=32, heads=2, batch=8, steps=24, target_acc=None, eval_every=8,
            stats_every=4, checkpoint_every=1000, seed=3)


def test_resume_gives_the_same_next_losses(tmp_path):
    full = []
    train(make_config(dict(TINY, out=str(tmp_path / "full"))), on_step=lambda s, l: full.append((s, l)))
    # the same run stopped after step 10 (as Ctrl-C stops it), then resumed
    part = []
    res = train(make_config(dict(TINY, out=str(tmp_path / "part"))), on_step=lambda s, l: (part.append((s, l)), s == 10)[1])
    assert res.stopped == "interrupted" and res.steps == 10
    ckpt = checkpoint.load(tmp_path / "part")
    assert ckpt.config["training"]["step"] == 10
    cfg = resume_config(ckpt.config["training"]["options"], {}, str(tmp_path / "part"))
    rest = []
    res2 = train(cfg, resume=tmp_path / "part", on_step=lambda s, l: rest.append((s, l)))
    assert res2.steps == TINY["steps"] and res2.stopped == "steps"
    print("uninterrupted:", full[10:14], "resumed:", rest[:4])
    assert part == full[:10]
    assert rest == full[10:], "resumed losses differ from the uninterrupted run"
    # the log of the resumed run continues the first one
    steps = [json.loads(line)["step"] for line in (tmp_path / "part" / LOG_JSONL).read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[0] == 4 and steps[-1] == TINY["steps"]


def _run(args):
    # a process of its own (tests/_cli.py), this process's environment; 600 s: a hang guard, not a speed
    # bound (a training run whose kernels numba must compile first takes minutes on a loaded machine)
    return run_cli(*args, timeout=600)


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--no-progress", "--pairs", "8", "--dim", "32", "--heads", "2", "--batch", "8",
            "--steps", "100000", "--target-acc", "none", "--eval-every", "20", "--eval-size", "32"]
    p = subprocess.Popen(CLI + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        # wait for the event, not a clock: a loaded machine can take minutes to import and start; a run that
        # never prints the line ends (EOF: asserted) or hangs until pytest's --timeout
        line = ""
        while "step 20/" not in line:  # wait until it trains
            line = p.stdout.readline()
            assert line or p.poll() is None, f"train exited early: {p.stderr.read()}"
        p.send_signal(signal.SIGINT)
        stdout, stderr = p.communicate(timeout=600)  # saving the checkpoint and plot: a hang guard only
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, (p.returncode, stdout, stderr)
    assert "Traceback" not in stderr and "Traceback" not in stdout
    assert "interrupted at step" in stdout and "--resume" in stdout
    ckpt = checkpoint.load(out)
    step = ckpt.config["training"]["step"]
    assert step >= 20
    assert (out / "training.safetensors").is_file() and (out / PLOT_FILE).is_file()
    # it resumes from there
    r = _run(["train", "--resume", str(out), "--steps", str(step + 2), "--no-progress"])
    assert r.returncode == 0, r.stderr
    assert checkpoint.load(out).config["training"]["step"] == step + 2


def test_bad_checkpoints_and_options_fail_clearly(trained, tmp_path):
    _, res = trained
    good = res.out
    # missing checkpoint
    r = _run(["train", "--resume", str(tmp_path / "nope")])
    assert r.returncode == 2 and "checkpoint not found" in r.stderr and "Traceback" not in r.stderr
    # corrupt weights
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("config.json", "training.safetensors"):
        (bad / name).write_bytes((good / name).read_bytes())
    (bad / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:100])
    r = _run(["sample", "--checkpoint", str(bad)])
    assert r.returncode == 2 and "not a readable safetensors file" in r.stderr and "Traceback" not in r.stderr
    # bad options: one line each, exit status 2, no traceback
    from selfattn.cli import main

    cases = [
        (["train", "--backend", "nope"], "unknown backend"),
        (["train", "--dim", "30", "--heads", "4"], "must be a multiple of heads"),
        (["train", "--resume", str(good), "--dim", "128"], "cannot change when resuming"),
        (["train", "--text", str(tmp_path / "missing.txt")], "cannot read --text"),
        (["train", "--dtype", "float16"], "dtype must be one of"),
        (["sample", "--checkpoint", str(good), "--prompt", "a b zz"], "not in the checkpoint's vocabulary"),
    ]
    (tmp_path / "nt").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "nt" / name).write_bytes((good / name).read_bytes())
    cases.append((["train", "--resume", str(tmp_path / "nt")], "not resumed"))
    for argv, msg in cases:
        import io
        from contextlib import redirect_stderr

        err = io.StringIO()
        with redirect_stderr(err):
            code = main(argv)
        print(argv, "->", code, err.getvalue().strip())
        assert code in (1, 2) and msg in err.getvalue(), (argv, code, err.getvalue())
    r = _run(["train", "--steps", "0"])
    assert r.returncode == 2 and "--steps must be a positive integer" in r.stderr and "Traceback" not in r.stderr
