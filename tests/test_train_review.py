"""Adversarial review of `selfattn train` / `selfattn sample` (issue 7) against independent computations.

Every run here is tiny (1 layer or 2, width 16, sequences of 8-16 tokens, a few steps) so the file takes
seconds. What is checked, each against something computed here and not by the training loop:
- the loss and the per-head attention statistics a log row reports equal a float64 cross-entropy and a
  float64 softmax of the captured queries/keys, computed from the checkpoint the step started from;
- the held-out loss/accuracy of the last step equal the saved checkpoint's on the held-out set;
- resuming continues bit for bit (losses, log rows with statistics, final weights), also for --text;
- the same seed gives the same run, another seed another run;
- a checkpoint loads into a fresh model with identical outputs;
- sampling: the distribution drawn from is softmax(logits / T) over the top k of the model's own full-forward
  logits, the KV cache draws what full recomputation draws with the same generator, top_k 1 = argmax.
"""

from __future__ import annotations

import io
import json
import math
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch
import torch.nn.functional as F

from selfattn import checkpoint
from selfattn.monitor import observe
from selfattn.training import IGNORE, make_config, resume_config, train
from selfattn.training.loop import LOG_JSONL, build_dataset
from selfattn.training.sample import generate

TINY = dict(pairs=4, keys=4, values=4, dim=16, heads=2, layers=2, batch=4, steps=6, warmup=2, eval_every=3,
            eval_size=16, stats_every=1, target_acc=None, seed=3, backend="math", dtype="float64")


def _rows(out):
    return [json.loads(line) for line in (out / LOG_JSONL).read_text().splitlines()]


def _stop_at(n):
    return lambda s, l: s == n


def _independent_step(ckpt_dir, cfg, step):
    """(mean loss, per layer per head [entropy mean, max logit mean, max logit max]) of the weights saved in
    ckpt_dir on the training batch of ``step`` (0-based), all in float64 from captured q/k."""
    ckpt = checkpoint.load(ckpt_dir)
    model = ckpt.build().double().eval()
    data = build_dataset(cfg)
    ids, targets = data.batch(cfg.batch, cfg.seed, step)
    calls = []
    with torch.no_grad(), observe(calls.append, model):
        logits = model(ids, backend="math")
    scored = targets != IGNORE
    loss = F.cross_entropy(logits[scored].double(), targets[scored], reduction="mean")
    acc = float((logits.argmax(-1)[scored] == targets[scored]).double().mean())
    heads = []
    for c in calls:
        q, k = c.query.double(), c.key.double()  # (B, H, L, D)
        scale = c.options.get("scale") or 1 / math.sqrt(q.shape[-1])
        s = q @ k.transpose(-1, -2) * scale  # (B, H, L, L)
        L = s.shape[-1]
        s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), -math.inf)
        p = torch.softmax(s, -1)
        ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)  # (B, H, L)
        mx = s.amax(-1)  # (B, H, L)
        heads.append([[float(ent[:, h].mean()), float(mx[:, h].mean()), float(mx[:, h].max())] for h in range(q.shape[1])])
    return float(loss), acc, heads


@pytest.mark.parametrize("task,backend,dtype,tol", [("recall", "math", "float64", 1e-10), ("text", "math", "float64", 1e-10),
                                                      ("recall", "cpu", "float32", 2e-5)])
def test_logged_loss_and_head_stats_equal_an_independent_computation(tmp_path, task, backend, dtype, tol):
    # a run stopped after step 2 saved the weights step 3 starts from; the resumed run's log row of step 3
    # reports the loss and statistics of its forward pass on batch 2 with exactly those weights
    out = tmp_path / "run"
    opts = dict(TINY, out=str(out), backend=backend, dtype=dtype)
    if task == "text":
        (tmp_path / "t.txt").write_text("a man, a plan, a canal: panama. " * 8, encoding="utf-8")
        opts.update(text=str(tmp_path / "t.txt"), seq_len=12, eval_size=4)
    cfg = make_config(opts)
    assert train(cfg, on_step=_stop_at(2)).steps == 2
    loss, acc, heads = _independent_step(out, cfg, 2)
    train(cfg, resume=out, on_step=_stop_at(3))
    row = next(r for r in _rows(out) if r["step"] == 3)
    assert row["loss"] == pytest.approx(loss, rel=tol, abs=tol / 100)
    assert row["acc"] == pytest.approx(acc, abs=1e-15)
    assert len(row["heads"]) == len(heads) == cfg.layers
    for got_layer, want_layer in zip(row["heads"], heads):
        assert len(got_layer) == cfg.heads
        for got, (ent, mxl, top) in zip(got_layer, want_layer):
            assert got["entropy"] == pytest.approx(ent, rel=tol, abs=tol / 100)
            assert got["max_logit"] == pytest.approx(mxl, rel=tol, abs=tol / 100)
            assert got["max_logit_max"] == pytest.approx(top, rel=tol, abs=tol / 100)


@pytest.mark.parametrize("backend,dtype,tol", [("math", "float64", 1e-12), ("cpu", "float32", 2e-5)])
def test_heldout_numbers_of_the_last_step_are_the_checkpoints(tmp_path, backend, dtype, tol):
    out = tmp_path / "run"
    cfg = make_config(dict(TINY, out=str(out), backend=backend, dtype=dtype))
    res = train(cfg)
    model = checkpoint.load(out).build().double().eval()
    ids, targets = build_dataset(cfg).heldout(cfg.eval_size, cfg.seed)
    with torch.no_grad():
        logits = model(ids, backend="math")
    scored = targets != IGNORE
    loss = float(F.cross_entropy(logits[scored], targets[scored]))
    acc = float((logits.argmax(-1)[scored] == targets[scored]).double().mean())
    assert res.heldout_loss == pytest.approx(loss, rel=tol, abs=tol)
    assert res.heldout_acc == pytest.approx(acc, abs=1e-12) or backend != "math"
    last = _rows(out)[-1]
    assert last["step"] == cfg.steps and last["heldout_loss"] == res.heldout_loss


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_checkpoint_loads_into_a_fresh_model_with_identical_outputs(tmp_path, dtype):
    # a --dtype float64 run's checkpoint must build a float64 model (it was built in float32: its weights
    # rounded silently, so `selfattn sample`/`explain --checkpoint` ran another model than the one trained)
    out = tmp_path / "run"
    cfg = make_config(dict(TINY, out=str(out), dtype=dtype, steps=2))
    train(cfg)
    ckpt = checkpoint.load(out)
    assert all(t.dtype == getattr(torch, dtype) for t in ckpt.state_dict.values())
    a, b = ckpt.build().eval(), checkpoint.load(out).build().eval()
    built = a.state_dict()
    assert built.keys() == ckpt.state_dict.keys()
    for n, r in ckpt.state_dict.items():
        assert built[n].dtype == r.dtype and torch.equal(built[n], r), n
    ids, _ = build_dataset(cfg).batch(4, 9, 0)
    with torch.no_grad():
        assert torch.equal(a(ids, backend="math"), b(ids, backend="math"))
    cfgj = json.loads((out / "config.json").read_text())
    assert cfgj["model"]["type"] == "transformer" and cfgj["training"]["step"] == 2
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in out.iterdir())  # never pickle


def _weights(out):
    return checkpoint.load(out).state_dict


def test_resume_is_bit_for_bit_losses_stats_and_weights(tmp_path):
    full = []
    cfg = make_config(dict(TINY, out=str(tmp_path / "full"), dtype="float32", backend="cpu"))
    train(cfg, on_step=lambda s, l: full.append((s, l)))
    cfgp = make_config(dict(TINY, out=str(tmp_path / "part"), dtype="float32", backend="cpu"))
    part = []
    train(cfgp, on_step=lambda s, l: (part.append((s, l)), s == 4)[1])
    saved = checkpoint.load(tmp_path / "part").config["training"]["options"]
    rest = []
    train(resume_config(saved, {}, "part"), resume=tmp_path / "part", on_step=lambda s, l: rest.append((s, l)))
    assert part + rest == full
    wf, wp = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert wf.keys() == wp.keys() and all(torch.equal(wf[n], wp[n]) for n in wf)
    drop = ("seconds", "tokens_per_s")
    rf = [{k: v for k, v in r.items() if k not in drop} for r in _rows(tmp_path / "full")]
    rp = [{k: v for k, v in r.items() if k not in drop} for r in _rows(tmp_path / "part")]
    assert rf == rp  # the same rows: losses, held-out numbers and every head's statistics


def test_resume_of_a_text_run_continues_its_data_order(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20, encoding="utf-8")
    base = dict(text=str(text), seq_len=8, dim=16, heads=2, layers=1, batch=4, steps=5, warmup=1, eval_every=5,
                eval_size=4, stats_every=1, seed=5, backend="math", dtype="float64")
    full, part, rest = [], [], []
    train(make_config(dict(base, out=str(tmp_path / "full"))), on_step=lambda s, l: full.append((s, l)))
    train(make_config(dict(base, out=str(tmp_path / "part"))), on_step=lambda s, l: (part.append((s, l)), s == 2)[1])
    saved = checkpoint.load(tmp_path / "part").config["training"]["options"]
    train(resume_config(saved, {}, "part"), resume=tmp_path / "part", on_step=lambda s, l: rest.append((s, l)))
    assert part + rest == full
    wf, wp = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert all(torch.equal(wf[n], wp[n]) for n in wf)


def test_seed_reproducibility(tmp_path):
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        losses = []
        train(make_config(dict(TINY, out=str(tmp_path / name), seed=seed, steps=3)), on_step=lambda s, l: losses.append(l))
        runs[name] = (losses, _weights(tmp_path / name))
    assert runs["a"][0] == runs["b"][0]
    assert all(torch.equal(runs["a"][1][n], runs["b"][1][n]) for n in runs["a"][1])
    assert runs["a"][0] != runs["c"][0]


# -- sampling ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm():
    from selfattn.model import Transformer, TransformerConfig

    torch.manual_seed(1)
    m = Transformer(TransformerConfig(vocab_size=13, dim=16, n_layers=2, n_heads=2, context=32)).double().eval()
    with torch.no_grad():
        m.head.weight.mul_(100)  # logits of order 1-10: temperature and top-k change the distribution visibly
    return m


def _full_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]), backend="math")[0, -1].double()  # (V,)


@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.5, None), (2.0, 3), (0.7, 1), (1.3, 13), (1.0, 50)])
def test_sampling_draws_from_softmax_over_top_k_of_the_models_logits(lm, monkeypatch, temperature, top_k):
    prompt = [1, 5, 2, 7]
    seen = []
    real = torch.multinomial

    def spy(probs, n, **kw):
        seen.append(probs.detach().double().clone())
        return real(probs, n, **kw)

    monkeypatch.setattr(torch, "multinomial", spy)
    new = generate(lm, prompt, 5, temperature=temperature, top_k=top_k, seed=11, backend="math")
    monkeypatch.undo()
    assert len(seen) == 5
    ids = list(prompt)
    for probs, tok in zip(seen, new):
        z = _full_logits(lm, ids) / temperature
        k = z.numel() if top_k is None else min(top_k, z.numel())
        keep = torch.zeros_like(z, dtype=torch.bool)
        keep[torch.argsort(z, descending=True)[:k]] = True
        want = torch.where(keep, torch.softmax(z.masked_fill(~keep, -math.inf), -1), torch.zeros_like(z))
        assert torch.allclose(probs, want, rtol=1e-5, atol=1e-7), (probs, want)
        assert keep[tok]
        ids.append(tok)


def test_top_k_one_and_temperature_zero_are_the_argmax_of_the_full_forward(lm):
    prompt = [3, 3, 8]
    for new in (generate(lm, prompt, 8, temperature=0, backend="math"),
                generate(lm, prompt, 8, temperature=1.7, top_k=1, seed=4, backend="math")):
        ids = list(prompt)
        for tok in new:
            assert tok == int(_full_logits(lm, ids).argmax())
            ids.append(tok)


@pytest.mark.parametrize("backend", ["math", "cpu"])
def test_cached_sampling_draws_what_full_recomputation_draws(lm, backend):
    prompt, seed, temperature, top_k = [2, 9, 4], 21, 1.0, 5
    new = generate(lm, prompt, 12, temperature=temperature, top_k=top_k, seed=seed, backend=backend)
    gen = torch.Generator().manual_seed(seed)
    ids = list(prompt)
    for _ in range(12):
        z = _full_logits(lm, ids).float().double()  # the float32 logits the model gives, shifted and scaled in float64
        z = (z - z.max()) / temperature
        kth = torch.topk(z, top_k).values[-1]
        z = z.masked_fill(z < kth, -math.inf)
        ids.append(int(torch.multinomial(torch.softmax(z, -1), 1, generator=gen)))
    assert new == ids[len(prompt):]
    again = generate(lm, prompt, 12, temperature=temperature, top_k=top_k, seed=seed, backend=backend)
    assert again == new
    assert generate(lm, prompt, 12, temperature=temperature, top_k=top_k, seed=seed + 1, backend=backend) != new


def test_sample_cli_with_a_seed_is_reproducible(tmp_path):
    from selfattn.cli import main

    out = tmp_path / "run"
    train(make_config(dict(TINY, out=str(out), steps=2)))
    texts = []
    for seed in ("5", "5", "6"):
        o = io.StringIO()
        with redirect_stdout(o):
            assert main(["sample", "--checkpoint", str(out), "--tokens", "20", "--seed", seed, "--backend", "math"]) == 0
        texts.append(o.getvalue())
    assert texts[0] == texts[1] and texts[0] != texts[2]


def test_generate_rejects_bad_arguments_by_name(lm):
    for kw, name in ((dict(temperature=float("nan")), "temperature"), (dict(temperature=-1.0), "temperature"),
                     (dict(top_k=0), "top_k"), (dict(top_k=2.5), "top_k"),
                     (dict(temperature=math.inf), "temperature"), (dict(top_k=True), "top_k"), (dict(max_new_tokens=-1), "max_new_tokens")):
        args = dict(max_new_tokens=2)
        args.update(kw)
        with pytest.raises(ValueError, match=name):
            generate(lm, [1, 2], args.pop("max_new_tokens"), **args)
    with pytest.raises(ValueError, match="prompt"):
        generate(lm, [], 2)


# -- the Monitor API (selfattn.monitor) ----------------------------------------------------------------------


def _captured_head_stats(model, batches):
    """Per layer, per head [mean entropy, mean max logit, largest max logit] over every query row of every
    batch, in float64 from the queries and keys the layers pass to attention."""
    sums = {}
    for ids in batches:
        calls = []
        with torch.no_grad(), observe(calls.append, model):
            model(ids, backend="math")
        for layer, c in enumerate(calls):
            q, k = c.query.double(), c.key.double()
            s = q @ k.transpose(-1, -2) * (c.options.get("scale") or 1 / math.sqrt(q.shape[-1]))
            L = s.shape[-1]
            s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), -math.inf)
            p = torch.softmax(s, -1)
            ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)  # (B, H, L)
            mx = s.amax(-1)
            acc = sums.setdefault(layer, [0.0, 0.0, -math.inf, 0])
            acc[0] = acc[0] + ent.sum(dim=(0, 2))
            acc[1] = acc[1] + mx.sum(dim=(0, 2))
            acc[2] = torch.maximum(torch.as_tensor(acc[2], dtype=torch.float64), mx.amax(dim=(0, 2)))
            acc[3] += ent.shape[0] * ent.shape[2]
    return [[[float(a[0][h] / a[3]), float(a[1][h] / a[3]), float(a[2][h])] for h in range(a[0].numel())]
            for _, a in sorted(sums.items())]


def test_monitor_rows_equal_statistics_computed_from_the_attention(lm):
    from selfattn.monitor import Monitor

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 13, (3, 9), generator=gen), torch.randint(0, 13, (2, 5), generator=gen)]
    mon = Monitor(lm)
    with mon.collect(7):
        for ids in batches:  # two forwards in one step: the row covers the rows of both
            with torch.no_grad():
                lm(ids, backend="math")
    mon.record(loss=1.5, acc=0.25)
    want = _captured_head_stats(lm, batches)
    row = mon.rows[-1]
    assert row["step"] == 7 and row["loss"] == 1.5 and row["acc"] == 0.25
    assert mon.layers == ["blocks.0.attn", "blocks.1.attn"]
    assert len(row["heads"]) == len(want)
    for got_layer, want_layer in zip(row["heads"], want):
        assert len(got_layer) == len(want_layer)
        for got, (ent, mxl, top) in zip(got_layer, want_layer):
            assert got["entropy"] == pytest.approx(ent, rel=1e-10)
            assert got["max_logit"] == pytest.approx(mxl, rel=1e-10)
            assert got["max_logit_max"] == pytest.approx(top, rel=1e-10)


def test_monitor_leaves_fully_masked_rows_out_of_the_means():
    from selfattn.layers import MultiHeadAttention
    from selfattn.monitor import Monitor

    torch.manual_seed(0)
    m = MultiHeadAttention(8, 2).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[1] = True  # the second sequence has no key: its rows are fully masked
    mon = Monitor(m)
    for backend in ("math", "cpu"):
        with mon.collect():
            m(x, x, x, key_padding_mask=kpm, backend=backend)
    with mon.collect():
        m(x[:1], x[:1], x[:1], backend="math")  # the first sequence alone
    for row in mon.rows[:2]:
        for got, want in zip(row["heads"][0], mon.rows[2]["heads"][0]):
            for k in ("entropy", "max_logit", "max_logit_max"):
                assert got[k] == pytest.approx(want[k], rel=1e-12), k


def test_resume_from_a_periodic_checkpoint_continues_the_run(tmp_path):
    # a run that dies after its step-2 checkpoint (checkpoint_every 2) and is resumed from it computes what
    # the run that did not die computed: losses, log rows and final weights, bit for bit
    import shutil

    cfg = make_config(dict(TINY, out=str(tmp_path / "full"), checkpoint_every=2, dtype="float32", backend="cpu"))
    full = []

    def on_step(s, l):
        full.append((s, l))
        if s == 3:  # the step-2 checkpoint is on disk, the step-4 one is not yet
            shutil.copytree(tmp_path / "full", tmp_path / "crashed")

    train(cfg, on_step=on_step)
    assert checkpoint.load(tmp_path / "crashed").config["training"]["step"] == 2
    saved = checkpoint.load(tmp_path / "crashed").config["training"]["options"]
    rest = []
    train(resume_config(saved, {"out": str(tmp_path / "crashed")}, "crashed"), resume=tmp_path / "crashed",
          on_step=lambda s, l: rest.append((s, l)))
    assert rest == full[2:]
    wf, wc = _weights(tmp_path / "full"), _weights(tmp_path / "crashed")
    assert all(torch.equal(wf[n], wc[n]) for n in wf)
    drop = ("seconds", "tokens_per_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in _rows(tmp_path / "full")] == \
        [{k: v for k, v in r.items() if k not in drop} for r in _rows(tmp_path / "crashed")]


# -- damaged checkpoints: exit status 2, one line naming the file, no traceback ------------------------------


def _damaged(tmp_path, name, edit_config=None, edit_training=None):
    import shutil

    from safetensors.torch import load_file, save_file

    src = tmp_path / "good"
    if not src.exists():
        train(make_config(dict(TINY, out=str(src), steps=2)))
    d = tmp_path / name
    shutil.copytree(src, d)
    if edit_config is not None:
        c = json.loads((d / "config.json").read_text())
        edit_config(c)
        (d / "config.json").write_text(json.dumps(c))
    if edit_training is not None:
        t = load_file(str(d / "training.safetensors"))
        edit_training(t)
        save_file(t, str(d / "training.safetensors"))
    return d


def _cli(argv):
    from selfattn.cli import main

    err, out = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(out):
        code = main(argv)
    return code, err.getvalue()


def _first_moment(t):
    return sorted(k for k in t if k.endswith(".exp_avg"))[0]


@pytest.mark.parametrize("case", ["optimizer_tensor_missing", "optimizer_tensor_shape", "rng_state", "negative_step",
                                  "vocab_shorter_than_model"])
def test_damaged_training_checkpoints_are_refused_clearly(tmp_path, case):
    edits = {
        "optimizer_tensor_missing": dict(edit_training=lambda t: t.pop(_first_moment(t))),
        "optimizer_tensor_shape": dict(edit_training=lambda t: t.__setitem__(_first_moment(t), t[_first_moment(t)].reshape(-1)[:3].clone())),
        "rng_state": dict(edit_training=lambda t: t.__setitem__("rng.torch", t["rng.torch"][:10].clone())),
        "negative_step": dict(edit_config=lambda c: c["training"].__setitem__("step", -3)),
        "vocab_shorter_than_model": dict(edit_config=lambda c: c.__setitem__("vocab", c["vocab"][:3])),
    }
    d = _damaged(tmp_path, case, **edits[case])
    argvs = [["train", "--resume", str(d), "--steps", "3", "--no-progress"]]
    if case == "vocab_shorter_than_model":
        argvs.append(["sample", "--checkpoint", str(d), "--tokens", "30", "--temperature", "3"])
    for argv in argvs:
        code, err = _cli(argv)
        assert code == 2 and "Traceback" not in err and "bug in selfattn" not in err, (argv, code, err)
        assert len(err.strip().splitlines()) == 1 and str(d) in err, err


def test_top_k_one_is_greedy_even_when_logits_tie():
    from selfattn.model import Transformer, TransformerConfig

    torch.manual_seed(0)
    m = Transformer(TransformerConfig(vocab_size=9, dim=16, n_layers=1, n_heads=2, context=16)).double().eval()
    with torch.no_grad():
        m.head.weight.zero_()  # every logit 0: argmax is token 0; a threshold at the k-th value keeps all 9
    for seed in range(5):
        assert generate(m, [1, 2], 4, temperature=1.0, top_k=1, seed=seed, backend="math") == [0, 0, 0, 0]
    for seed in range(10):  # ties broken as argmax breaks them: the lowest ids
        assert set(generate(m, [1, 2], 4, temperature=1.0, top_k=2, seed=seed, backend="math")) <= {0, 1}


@pytest.mark.parametrize("temperature", [1e-30, 1e-300, 5e-324])
def test_tiny_temperature_is_greedy_not_an_error(lm, temperature):
    prompt = [3, 3, 8]
    assert generate(lm, prompt, 6, temperature=temperature, seed=1, backend="math") == \
        generate(lm, prompt, 6, temperature=0, backend="math")


def test_log_csv_holds_the_jsonl_rows(tmp_path):
    import csv

    from selfattn.training.loop import LOG_CSV

    out = tmp_path / "run"
    train(make_config(dict(TINY, out=str(out), steps=3, stats_every=2)))
    rows = _rows(out)
    assert [r["step"] for r in rows] == [2, 3]  # every stats_every steps, and the last (with its evaluation)
    with open(out / LOG_CSV, newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    for r, t in zip(rows, table):
        for k in ("step", "loss", "acc", "lr", "tokens"):
            assert float(t[k]) == pytest.approx(r[k], rel=1e-15)
        for l, layer in enumerate(r["heads"]):
            for h, s in enumerate(layer):
                for k in ("entropy", "max_logit", "max_logit_max"):
                    assert float(t[f"L{l}H{h}_{k}"]) == pytest.approx(s[k], rel=1e-15)
    assert float(table[-1]["heldout_loss"]) == pytest.approx(rows[-1]["heldout_loss"], rel=1e-15)


def test_monitor_step_after_a_failed_forward_is_its_own_row():
    # a forward that raised inside collect(1) (a skipped batch) left the row open: collect(2) then added its
    # statistics to row 1 and no row 2 existed. A failed collection is dropped; nesting is refused by name.
    from selfattn.layers import MultiHeadAttention
    from selfattn.monitor import Monitor

    torch.manual_seed(0)
    m = MultiHeadAttention(8, 2).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    mon, alone = Monitor(m), Monitor(m)
    with pytest.raises(RuntimeError, match="skip"):
        with mon.collect(1):
            m(x, x, x, backend="math")
            raise RuntimeError("skip this batch")
    with mon.collect(2):
        m(x[:1], x[:1], x[:1], backend="math")
    with alone.collect(2):
        m(x[:1], x[:1], x[:1], backend="math")
    assert mon.rows == alone.rows
    with pytest.raises(RuntimeError, match="collect"):
        with mon.collect(3):
            with mon.collect(4):
                pass
    with mon.collect(5):  # still usable
        m(x, x, x, backend="math")
    assert [r["step"] for r in mon.rows] == [2, 5]


def test_recall_targets_are_the_token_after_the_previous_occurrence():
    from selfattn.training import RecallTask

    task = RecallTask(keys=5, values=7, pairs=9)
    ids, targets = task.batch(16, 3, 4)
    assert torch.equal(ids, task.batch(16, 3, 4)[0]) and not torch.equal(ids, task.batch(16, 3, 5)[0])
    assert not torch.equal(ids, task.heldout(16, 3)[0][:16])
    scored = 0
    for row, trow in zip(ids.tolist(), targets.tolist()):
        for t, tok in enumerate(row):
            prev = [s for s in range(t) if row[s] == tok]
            if t % 2 == 0 and prev:  # a key seen before: the next token is what followed its last occurrence
                assert trow[t] == row[prev[-1] + 1] == row[t + 1]
                scored += 1
            else:
                assert trow[t] == IGNORE
    assert scored > 30


def test_generation_feeds_one_token_per_step_to_the_cache(lm, monkeypatch):
    from selfattn.model import Transformer

    lengths = []
    real = Transformer.forward

    def spy(self, ids, **kw):
        lengths.append((ids.shape[1], kw.get("kv_caches") is not None))
        return real(self, ids, **kw)

    monkeypatch.setattr(Transformer, "forward", spy)
    generate(lm, [1, 2, 3, 4, 5], 6, temperature=0, backend="math")
    assert lengths == [(5, True)] + [(1, True)] * 5  # the prompt once, then one token per step (the last is not fed)


def test_statistics_come_from_the_training_forward_no_extra_pass(tmp_path, monkeypatch):
    from selfattn.model import Transformer

    calls = []
    real = Transformer.forward

    def spy(self, ids, **kw):
        calls.append((tuple(ids.shape), bool(kw.get("return_stats")), torch.is_grad_enabled()))
        return real(self, ids, **kw)

    monkeypatch.setattr(Transformer, "forward", spy)
    train(make_config(dict(TINY, out=str(tmp_path / "run"), steps=3, eval_every=3, stats_every=2)))
    L = 2 * TINY["pairs"]
    step = (TINY["batch"], L)
    assert calls == [(step, False, True), (step, True, True), (step, True, True), ((TINY["eval_size"], L), False, False)]


def test_a_torn_save_is_refused_on_resume(tmp_path):
    # the three files are replaced one by one (weights, training state, config): a save killed between two
    # replacements leaves files of two steps; resuming them would continue step 2 with step 3's weights
    import shutil

    cfg = make_config(dict(TINY, out=str(tmp_path / "run"), steps=3))
    train(cfg, on_step=_stop_at(2))
    shutil.copytree(tmp_path / "run", tmp_path / "torn")
    train(cfg, resume=tmp_path / "run")  # now at step 3
    shutil.copy(tmp_path / "run" / "model.safetensors", tmp_path / "torn" / "model.safetensors")
    code, err = _cli(["train", "--resume", str(tmp_path / "torn"), "--no-progress"])
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "model.safetensors" in err and "interrupted" in err, err
    code, _ = _cli(["train", "--resume", str(tmp_path / "run"), "--steps", "4", "--no-progress"])  # a whole save resumes
    assert code == 0


def test_equal_runs_write_equal_checkpoint_files(tmp_path):
    for name in ("a", "b"):
        train(make_config(dict(TINY, out=str(tmp_path / name), steps=2)))
    from safetensors import safe_open

    for f in ("model.safetensors", "training.safetensors"):  # (not bytes: safetensors orders header keys by a hash map)
        with safe_open(str(tmp_path / "a" / f), "pt") as fa, safe_open(str(tmp_path / "b" / f), "pt") as fb:
            assert fa.metadata() == fb.metadata() and sorted(fa.keys()) == sorted(fb.keys()), f
            assert all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys()), f
    ca, cb = (json.loads((tmp_path / n / "config.json").read_text()) for n in "ab")
    for c in (ca, cb):
        c["training"].pop("seconds")
        c["training"]["options"].pop("out")
    assert ca == cb
