"""Review of `selfattn explain` / `selfattn scaling` against an independent float64 computation.

Written from the notes (shared/seed/self-attention-notes.md), not from selfattn.reference: every
number the --json trace and the terminal tables show is recomputed here with plain torch from the
trace's own embeddings and W matrices (Q = E W_Q, scores = Q K^T, x 1/sqrt(d_k), mask, softmax,
weights V), and the bad-input rules of issue 16 (exit 2, one line naming the argument).
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from selfattn import cli


def _run(capsys, argv):
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own usage errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def _f(x):
    if isinstance(x, list):
        return [_f(y) for y in x]
    return float(x) if isinstance(x, str) else x  # JSON writes -inf as "-inf"


def _t(x):
    return torch.tensor(_f(x), dtype=torch.float64)


def _independent(d, causal, window, scaled):
    st = {s["name"]: _t(s["value"]) for s in d["steps"]}
    e = st["embeddings"]  # (L, E)
    q, k, v = e @ st["W_Q"], e @ st["W_K"], e @ st["W_V"]  # (L, d_k), (L, d_k), (L, d_v)
    n = e.shape[0]
    d_k = q.shape[1]
    scale = 1 / math.sqrt(d_k) if scaled else 1.0
    s = q @ k.T  # (L, L)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    ok = torch.ones(n, n, dtype=torch.bool)
    if causal:
        ok &= j <= i
    if window is not None:
        ok &= (i - j) <= window
        if not causal:
            ok &= (j - i) <= window
    m = (s * scale).masked_fill(~ok, -math.inf)  # (L, L)
    p = torch.softmax(m, -1)  # (L, L)
    ent = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(-1)  # (L,)
    return st, dict(Q=q, K=k, V=v, scores=s, scaled=s * scale, masked=m, weights=p, output=p @ v), ok, scale, dict(
        lse=torch.logsumexp(m, -1), max_logit=m.amax(-1), entropy=ent)


CASES = [
    ([], False, None, True),
    (["Hello, world! the cat"], False, None, True),
    (["Hello, world! the cat", "--dim", "6", "--seed", "3", "--init", "default", "--qk-dim", "5", "--v-dim", "3", "--causal"], True, None, True),
    (["a b c d e f g a b", "--window", "2"], False, 2, True),
    (["a b c d e f g a b", "--window", "2", "--causal", "--no-scale"], True, 2, False),
    (["x y z", "--qk-dim", "7", "--dim", "5", "--v-dim", "2", "--init", "default", "--seed", "9"], False, None, True),
    (["a b c d", "--window", "0"], False, 0, True),
]


@pytest.mark.parametrize("argv,causal,window,scaled", CASES, ids=lambda c: str(c)[:30])
def test_json_trace_matches_independent_float64(tmp_path, capsys, monkeypatch, argv, causal, window, scaled):
    monkeypatch.setenv("COLUMNS", "250")
    path = tmp_path / "t.json"
    rc, out, err = _run(capsys, ["explain", *argv, "--json", str(path)])
    assert rc == 0, err
    d = json.loads(path.read_text())
    st, mine, ok, scale, stats = _independent(d, causal, window, scaled)
    assert d["scale"] == pytest.approx(scale, abs=1e-15) and d["d_k"] == st["W_Q"].shape[1]
    for name, want in mine.items():
        if name not in st:
            assert name != "masked" or ok.all(), f"{argv}: masked step missing with a mask"
            continue
        got = st[name]
        assert torch.equal(torch.isfinite(got), torch.isfinite(want)), name
        fin = torch.isfinite(want)
        err_ = (got[fin] - want[fin]).abs().max().item() if fin.any() else 0.0
        assert err_ <= 1e-12, (name, err_)
    assert (st["weights"].sum(-1) - 1).abs().max() <= 1e-12
    for name, want in stats.items():
        assert (_t(d["stats"][name]) - want).abs().max() <= 1e-12, name
    rows = d["rows"]
    assert (_t(d["row_weights"]) - mine["weights"][rows]).abs().max() <= 1e-12
    if d["row_masked"] is not None:
        assert torch.equal(torch.tensor(d["row_masked"]), ~ok[rows])
    # the terminal shows the same numbers rounded to 4 decimals, in the same places
    titles = [("Token embeddings", "embeddings"), ("Q = E", "Q"), ("K = E", "K"), ("V = E", "V"), ("Scores Q", "scores"),
              ("Scaled scores", "scaled"), ("Masked scores", "masked"), ("Softmax", "weights"), ("Weighted sum", "output")]
    cli.main(["explain", *argv, "--full"])
    text = capsys.readouterr().out
    checked = 0
    for block in re.split(r"\n(?=\d+\. )", text):
        head = block.split("\n")[0]
        name = next((nm for pre, nm in titles if re.sub(r"^\d+\. ", "", head).startswith(pre)), None)
        if name is None:
            continue
        ref = st[name]
        for i, line in enumerate(x for x in block.split("\n") if x.startswith("│")):
            raw = [c.strip() for c in line.strip("│").split("│")][1:]
            cells = [c.lstrip("*").strip() for c in raw[:ref.shape[1]]]
            for jj, c in enumerate(cells):
                if name in ("weights", "masked"):  # masked pairs: "·" among the weights, -inf among the scores
                    assert (c in ("·", "-inf")) == (not ok[i, jj].item()), (name, i, jj, c)
                if c in ("·", "-inf", "…", ""):
                    continue
                assert float(c) == pytest.approx(ref[i, jj].item(), abs=5.01e-5), (name, i, jj, c)
                checked += 1
            if name == "weights":  # the largest weight of each row starred (ties: each), then entropy and max logit
                row = ref[i]
                starred = [jj for jj, c in enumerate(raw[:ref.shape[1]]) if c.startswith("*")]
                assert starred == [jj for jj in range(ref.shape[1]) if row[jj] >= row.max() - 5e-5], (i, raw)
                assert float(raw[-2]) == pytest.approx(stats["entropy"][i].item(), abs=5.01e-5)
                assert float(raw[-1]) == pytest.approx(stats["max_logit"][i].item(), abs=5.01e-5)
    assert checked >= 4 * len(d["tokens"])


def test_notes_example_numbers(tmp_path, capsys):
    """The notes' example: E = [[1,0,1,0],[0,1,0,1],[1,1,1,1]], W = I, d_k = 4."""
    path = tmp_path / "n.json"
    assert _run(capsys, ["explain", "--json", str(path)])[0] == 0
    d = json.loads(path.read_text())
    st = {s["name"]: _t(s["value"]) for s in d["steps"]}
    e = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1], [1, 1, 1, 1]], dtype=torch.float64)
    assert d["tokens"] == ["The", "cat", "sat"] and torch.equal(st["embeddings"], e)
    p = torch.softmax(e @ e.T / 2, -1)
    assert (st["weights"] - p).abs().max() <= 1e-15
    assert (st["output"][0] - torch.tensor([0.8446, 0.5777, 0.8446, 0.5777], dtype=torch.float64)).abs().max() < 1e-4


def test_scaling_json_notes_and_sweep(tmp_path, capsys):
    path = tmp_path / "s.json"
    rc, out, err = _run(capsys, ["scaling", "--queries", "64", "--keys", "16", "--max-dk", "1024", "--json", str(path)])
    assert rc == 0, err
    d = json.loads(path.read_text())
    q = torch.tensor([2.0, 3, 4, 1], dtype=torch.float64)
    k = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.float64)
    for name, f in (("unscaled", 1.0), ("scaled", 0.5)):
        s = k @ q * f
        p = torch.softmax(s, -1)
        jac = torch.diag(p) - torch.outer(p, p)
        got = d["notes"][name]
        assert _t(got["scores"]).sub(s).abs().max() < 1e-14 and _t(got["weights"]).sub(p).abs().max() < 1e-14
        assert got["jacobian_norm"] == pytest.approx(torch.linalg.matrix_norm(jac).item(), rel=1e-12)
    assert [r["d_k"] for r in d["sweep"]] == [4, 8, 16, 32, 64, 128, 256, 512, 1024]
    for r in d["sweep"]:
        assert r["unscaled"]["std"] == pytest.approx(math.sqrt(r["d_k"]), rel=0.2)
        assert r["scaled"]["std"] == pytest.approx(1.0, rel=0.2)
        for v in ("unscaled", "scaled"):
            assert 1 / 16 <= r[v]["max_weight"] <= 1 and 0 <= r[v]["entropy"] <= math.log(16) + 1e-12
    u = [r["unscaled"]["max_weight"] for r in d["sweep"]]
    assert u[-1] > u[0] + 0.4  # saturation grows with d_k without scaling


def test_scaling_max_dk_is_the_largest_d_k(tmp_path, capsys):
    """--max-dk is "the largest d_k of the sweep": above 4096 it must not be silently cut to 4096."""
    path = tmp_path / "s.json"
    rc, out, err = _run(capsys, ["scaling", "--queries", "16", "--keys", "4", "--max-dk", "8192", "--json", str(path)])
    assert rc == 0, err
    assert json.loads(path.read_text())["sweep"][-1]["d_k"] == 8192


@pytest.mark.parametrize("argv,names", [
    (["explain", "a b", "--dim", "0"], ("--dim", "0")),
    (["explain", "a b", "--window", "x"], ("--window", "x")),
    (["scaling", "--keys", "-2"], ("--keys", "-2")),
    (["explain", "a b", "--png", "x.jpg"], ("--png", "x.jpg")),
])
def test_bad_value_is_one_line_naming_argument(capsys, argv, names):
    with pytest.raises(SystemExit) as ex:
        rc = cli.main(argv)
        raise SystemExit(rc)
    assert ex.value.code == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert all(n in lines[0] for n in names) and "Traceback" not in err


@pytest.mark.parametrize("rows", ["2-0", ",", "5--1"])
def test_rows_that_name_no_row_are_refused(capsys, rows):
    """An explicit --rows that selects nothing (a downward range, only commas) is bad input, not the default rows."""
    rc, out, err = _run(capsys, ["explain", "a b c d e f", f"--rows={rows}"])
    assert rc == 2 and "rows" in err and repr(rows) in err and len(err.strip().splitlines()) == 1, (rc, err)


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self"), reason="needs Linux /proc")
@pytest.mark.parametrize("argv", [["explain", "a b", "--json", "/proc/selfattn_review.json"],
                                  ["explain", "a b", "--html", "/proc/selfattn_review.html"],
                                  ["explain", "a b", "--png", "/proc/selfattn_review.png"],
                                  ["scaling", "--max-dk", "8", "--queries", "4", "--json", "/proc/selfattn_review.json"]])
def test_unwritable_output_names_the_option(capsys, argv):
    # /proc looks writable to root but no file can be created there: the failure comes at the write, after the work
    rc, out, err = _run(capsys, argv)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and argv[-2] in lines[0] and argv[-1] in lines[0], err


@pytest.mark.parametrize("argv,out", [(["explain", "the cat sat on the mat"], "r.json"), (["scaling", "--max-dk", "8", "--queries", "8"], "s.json")])
def test_reader_closing_stdout_still_gets_the_files(tmp_path, argv, out):
    """`selfattn explain ... --json r.json | head -1`: the reader stops early; the files asked for are still written."""
    import subprocess
    import sys

    path = tmp_path / out
    code = "import sys; from selfattn import cli; sys.exit(cli.main(sys.argv[1:]))"
    p = subprocess.Popen([sys.executable, "-c", code, *argv, "--json", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.readline()
    p.stdout.close()  # like head -1
    err = p.stderr.read().decode()
    rc = p.wait(timeout=120)
    assert rc == 0 and "Traceback" not in err and path.exists() and json.loads(path.read_text()), (rc, err)


def test_checkpoint_heads_and_predictions_independently(tmp_path, capsys):
    """--checkpoint of a Transformer: each head's scores/weights/output from its own Q, K, V (causal, 1/sqrt(d_k)),
    the 'previous token' pattern weight, and the top-3 next-token guesses against the model's own logits."""
    from selfattn.checkpoint import save
    from selfattn.model import Transformer, TransformerConfig

    vocab = ["the", "cat", "sat", "on", "mat", ".", "a", "dog"]
    torch.manual_seed(3)
    model = Transformer(TransformerConfig(vocab_size=len(vocab), dim=16, n_layers=2, n_heads=2, context=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    save(tmp_path / "ck", model, model.checkpoint_config(), vocab=vocab)
    text = "the cat sat on the mat . a dog sat"
    path = tmp_path / "c.json"
    rc, out, err = _run(capsys, ["explain", text, "--checkpoint", str(tmp_path / "ck"), "--json", str(path)])
    assert rc == 0, err
    d = json.loads(path.read_text())
    heads = [h for layer in d["layers"] for h in layer["heads"]]
    assert len(heads) == 4
    for h in heads:
        st = {s["name"]: _t(s["value"]) for s in h["steps"]}
        q, k, v = st["Q"], st["K"], st["V"]  # (L, d_k), (L, d_k), (L, d_v)
        n = q.shape[0]
        assert h["scale"] == pytest.approx(1 / math.sqrt(q.shape[1]), abs=1e-15)
        ok = torch.arange(n)[None, :] <= torch.arange(n)[:, None]
        m = (q @ k.T * h["scale"]).masked_fill(~ok, -math.inf)  # (L, L)
        p = torch.softmax(m, -1)
        assert (st["weights"] - p).abs().max() <= 1e-12 and (st["output"] - p @ v).abs().max() <= 1e-12
        assert torch.equal(torch.isneginf(st["masked"]), ~ok)
        prev = h["patterns"]["previous token"]["weight"]
        assert prev == pytest.approx(torch.stack([p[r, r - 1] for r in range(1, n)]).mean().item(), abs=1e-12)
    ids = torch.tensor([[vocab.index(t) for t in text.split()]])
    with torch.no_grad():
        logits = model(ids)
    logits = logits[0] if isinstance(logits, tuple) else logits
    probs = torch.softmax(logits[0].double(), -1)  # (L, V)
    for pos, preds in enumerate(d["predictions"]):
        top = torch.topk(probs[pos], 3)
        assert [t for t, _ in preds] == [vocab[j] for j in top.indices.tolist()]
        assert [pr for _, pr in preds] == pytest.approx(top.values.tolist(), abs=1e-6)
    assert len(d["predictions"]) == len(text.split())


def test_one_token_note_reads_right(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    rc, out, err = _run(capsys, ["explain", "a"])
    assert rc == 0 and "uniform over 1 token would be 0.0000" in out and "1 tokens" not in out


def test_huge_window_is_one_line_not_a_traceback(capsys):
    rc, out, err = _run(capsys, ["explain", "a b", "--window", "99999999999999999999999"])
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1 and "--window" in err, err
    with pytest.raises(ValueError, match="window"):
        __import__("selfattn").explain("a b", window=10**30)


def test_scaling_with_one_key_is_refused(capsys):
    """With one key every softmax weight is 1: nothing to measure (it printed nan stds, a torch warning and
    'NOT steady, unlike what the theory predicts')."""
    rc, out, err = _run(capsys, ["scaling", "--keys", "1", "--max-dk", "8", "--queries", "4"])
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--keys" in err and "1" in err, err


def test_long_input_q_equals_e_when_w_is_identity(tmp_path, capsys):
    """Long input (> 32 tokens) runs in float32: the embeddings shown must be the ones used, so that with
    W_Q = I the table "Q = E W_Q" equals the embeddings table (it showed 1.9011 under an embedding of 1.9012)."""
    text = " ".join(["the", "cat", "sat", "on", "mat", ".", ",", "dog"][i % 8] + str(i % 5) for i in range(40))
    path = tmp_path / "l.json"
    rc, out, err = _run(capsys, ["explain", text, "--json", str(path)])
    assert rc == 0, err
    st = {s["name"]: _t(s["value"]) for s in json.loads(path.read_text())["steps"]}
    assert torch.equal(st["W_Q"], torch.eye(8, dtype=torch.float64))
    assert torch.equal(st["Q"], st["embeddings"]) and torch.equal(st["V"], st["embeddings"])
