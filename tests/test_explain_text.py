"""`selfattn.explain(text, ...)`: tokens, embeddings, a SelfAttention run, long input; every number vs the reference."""

import io
import json
import math
import re
from unittest import mock

import pytest
import torch
from rich.console import Console

import selfattn
from selfattn import reference
from selfattn.explain import FULL_MATRIX_MAX_TOKENS, MAX_TOKENS, embed, explain, tokenize
from selfattn.explain import trace as trace_mod
from selfattn.explain.labels import fmt
from selfattn.explain.terminal import render
from selfattn.layers import SelfAttention

try:  # issue 11 gives mask resolution its public name
    from selfattn.request import resolve_mask as _resolve_mask
except ImportError:
    from selfattn.functional import _resolve_mask

from tolerance import assert_close

TEXT = "The cat sat on the mat, and the cat slept."


def _layer(dim, qk, v, init, seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SelfAttention(dim, qk, v, init=init)


def _reference(tr, causal=False, window=None, scale=None):
    # the float64 reference on the trace's own embeddings and weights, step by step
    x = tr.steps["embeddings"]  # (L, E)
    q, k, v = (x @ tr.steps[w] for w in ("W_Q", "W_K", "W_V"))  # (L, d)
    mask = _resolve_mask(None, causal, window)
    rec = reference.Trace()
    out, stats = reference.attention(q[None, None], k[None, None], v[None, None], mask=mask, scale=scale, trace=rec)
    return rec, out[0, 0], stats


def test_tokenizer_rule():
    assert tokenize("The cat sat.") == ["The", "cat", "sat", "."]
    assert tokenize("Don't stop!!") == ["Don", "'", "t", "stop", "!", "!"]
    assert tokenize("x_1 = 2.5") == ["x_1", "=", "2", ".", "5"]
    assert tokenize("  \n\t ") == []
    assert tokenize("naïve café, 東京") == ["naïve", "café", ",", "東京"]


def test_embeddings_are_deterministic_per_token():
    a = embed(["cat", "sat", "cat"], 6, seed=3)
    b = embed(["dog", "cat"], 6, seed=3)
    assert a.shape == (3, 6) and a.dtype == torch.float64
    assert torch.equal(a[0], a[2]) and torch.equal(a[0], b[1])  # same token, same vector, whatever the text
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(embed(["cat"], 6, seed=4)[0], a[0])  # the seed picks another set
    with pytest.raises(ValueError, match="dim"):
        embed(["cat"], 0)


@pytest.mark.parametrize("init,qk,v", [("identity", None, None), ("default", 5, 3)])
def test_text_run_is_a_selfattention_run_and_matches_the_reference(init, qk, v):
    tr = explain(TEXT, dim=6, seed=2, init=init, qk_dim=qk, v_dim=v, causal=True)
    tokens = tokenize(TEXT)
    assert tr.tokens == tokens and tr.full and tr.d_k == (qk or 6)
    layer = _layer(6, qk, v, init, 2)
    for name in ("W_Q", "W_K", "W_V"):
        assert torch.equal(tr.steps[name], getattr(layer, name).detach().double())
    assert torch.equal(tr.steps["embeddings"], embed(tokens, 6, seed=2))
    rec, out, stats = _reference(tr, causal=True)
    for name in ("Q", "K", "V", "scores", "scaled", "masked", "weights", "output"):
        assert torch.equal(tr.steps[name], rec[name][0, 0]), name
    assert torch.equal(tr.stats.entropy, stats.entropy[0, 0]) and torch.equal(tr.stats.max_logit, stats.max_logit[0, 0])
    # the layer itself, run by the fast path in float32, gives the same contextual embeddings
    x32 = tr.steps["embeddings"].float()
    got = layer(x32, causal=True)  # (L, v)
    q, k, v = (x32 @ getattr(layer, w).detach() for w in ("W_Q", "W_K", "W_V"))  # (L, d) float32
    low = reference.attention(q[None, None], k[None, None], v[None, None], mask=selfattn.masks.causal(), upcast=False)[0][0, 0]
    assert_close("layer output", got.detach(), tr.output, low)


def test_options_change_the_run():
    tokens = tokenize(TEXT)
    n = len(tokens)
    causal = explain(TEXT, causal=True)
    assert torch.all(causal.weights.triu(1) == 0) and "masked" in causal.steps
    win = explain(TEXT, window=2)
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    assert torch.all(win.weights[(i - j).abs() > 2] == 0) and torch.all(win.weights[(i - j).abs() <= 2] > 0)
    both = explain(TEXT, window=2, causal=True)
    assert torch.all(both.weights[(i - j > 2) | (j > i)] == 0)
    raw = explain(TEXT, scale=False)
    assert raw.scale == 1.0 and torch.equal(raw.steps["scaled"], raw.steps["scores"])
    rec, _, _ = _reference(raw, scale=1.0)
    assert torch.equal(raw.weights, rec["weights"][0, 0])
    plain = explain(TEXT)
    assert plain.scale == 1 / math.sqrt(8) and "masked" not in plain.steps
    # without scaling the softmax is sharper: lower entropy on every row of this text
    assert torch.all(raw.stats.entropy <= plain.stats.entropy + 1e-12)


def _long_text(n):
    words = ["alpha", "beta", "gamma", "delta", "eps", ",", "zeta", "eta", "."]
    return " ".join(words[(i * 7) % len(words)] + str(i % 5) for i in range(n))


def test_long_input_shows_rows_from_attention_probs_not_a_matrix():
    text = _long_text(FULL_MATRIX_MAX_TOKENS + 28)
    real = selfattn.attention_probs
    with mock.patch.object(trace_mod, "attention_probs", side_effect=real) as spy:
        tr = explain(text, causal=True, rows="0,7,-1", init="default", seed=5)
    n = len(tr.tokens)
    assert not tr.full and "weights" not in tr.steps and "scores" not in tr.steps
    assert tr.rows == [0, 7, n - 1] and tr.row_weights.shape == (3, n)
    assert spy.call_count == 1 and list(spy.call_args.kwargs["rows"]) == [0, 7, n - 1]
    with pytest.raises(ValueError, match="row_weights"):
        tr.weights
    # against the float64 reference on the same embeddings and weights (float32 fast path: derived tolerance)
    rec, out64, st64 = _reference(tr, causal=True)
    x32 = tr.steps["embeddings"].float()
    q, k, v = (x32 @ tr.steps[w].float() for w in ("W_Q", "W_K", "W_V"))
    low_out, low_st = reference.attention(q[None, None], k[None, None], v[None, None], mask=selfattn.masks.causal(), upcast=False)
    low_w = torch.softmax((q @ k.T / math.sqrt(8)).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf), -1)
    assert_close("rows", tr.row_weights, rec["weights"][0, 0][tr.rows], low_w[tr.rows])
    assert_close("output", tr.output, out64, low_out[0, 0])
    for f in ("entropy", "max_logit", "lse"):
        assert_close(f, getattr(tr.stats, f), getattr(st64, f)[0, 0], getattr(low_st, f)[0, 0])
    # default rows for long input: first, middle, last
    assert explain(text).rows == [0, n // 2, n - 1]


def test_limits_and_bad_arguments():
    with pytest.raises(ValueError, match="no tokens"):
        explain("   \n ")
    too_long = " ".join(["w"] * (MAX_TOKENS + 1))
    with pytest.raises(ValueError, match=str(MAX_TOKENS)):
        explain(too_long)
    with pytest.raises(ValueError, match="out of range"):
        explain(TEXT, rows="40")
    with pytest.raises(ValueError, match="rows"):
        explain(TEXT, rows="a-b")
    with pytest.raises(ValueError, match="identity"):
        explain(TEXT, init="identity", qk_dim=3)
    with pytest.raises(ValueError, match="needs a text"):
        explain(dim=4)
    with pytest.raises(ValueError, match="window"):
        explain(TEXT, window=-1)
    with pytest.raises(TypeError, match="causal"):
        explain(TEXT, causal=1)


def test_rows_parsing():
    assert trace_mod.parse_rows("0,3-5,-1", 10) == [0, 3, 4, 5, 9]
    assert trace_mod.parse_rows([2, 2, -2], 10) == [2, 8]
    assert trace_mod.parse_rows(None, 10) == []


def test_no_text_is_the_notes_example_and_takes_mask_options():
    tr = explain(causal=True)
    assert tr.tokens == ["The", "cat", "sat"] and torch.all(tr.weights.triu(1) == 0)
    assert not trace_mod.is_plain_notes_example(tr) and trace_mod.is_plain_notes_example(explain())


def _numbers(text):
    return set(re.findall(r"-?\d+\.\d{4}(?!\d)", text))


def _trace_numbers(tr):
    vals = [fmt(float(x)) for t in tr.steps.values() for x in t.flatten()]
    vals += [fmt(float(x)) for f in ("entropy", "max_logit") for x in getattr(tr.stats, f)]
    vals += [fmt(math.log(len(tr.tokens))), fmt(tr.scale)]
    if tr.row_weights is not None:
        vals += [fmt(float(x)) for x in tr.row_weights.flatten()]
    return set(vals)


@pytest.mark.parametrize("text,kw", [(TEXT, {"causal": True, "rows": "1,3"}), (_long_text(50), {"rows": "2,-1"})])
def test_every_number_in_the_terminal_comes_from_the_trace(text, kw):
    tr = explain(text, **kw)
    buf = io.StringIO()
    render(tr, Console(file=buf, width=100, color_system=None), notes_check=True)
    out = buf.getvalue()
    shown = _numbers(out)
    allowed = _trace_numbers(tr)
    if not tr.full:  # the summary table shows the mean of each statistic too
        allowed |= {fmt(s["mean"]) for s in trace_mod.stats_summary(tr).values()}
    assert shown and shown <= allowed, f"numbers not from the trace: {sorted(shown - allowed)[:10]}"
    if tr.full:
        for x in tr.weights.flatten():
            assert fmt(float(x)) in out
        assert "*" + fmt(float(tr.weights[1].max())) in out  # the largest weight in a row is marked
    for i, r in enumerate(tr.rows):
        assert fmt(float(tr.stats.entropy[r])) in out
        j = int(tr.row_weights[i].argmax())
        assert fmt(float(tr.row_weights[i, j])) in out


def test_json_is_every_number_of_the_trace():
    tr = explain(TEXT, causal=True, rows="2")
    d = json.loads(json.dumps(tr.to_dict()))
    assert d["tokens"] == tr.tokens and d["full"] and d["rows"] == [2]
    for step in d["steps"]:
        got = torch.tensor([[float(x) for x in row] for row in step["value"]], dtype=torch.float64)
        assert torch.equal(got, tr.steps[step["name"]]), step["name"]
    assert [s["name"] for s in d["steps"]] == list(tr.steps)
    for f in ("lse", "max_logit", "entropy"):
        assert torch.equal(torch.tensor([float(x) for x in d["stats"][f]], dtype=torch.float64), getattr(tr.stats, f))
    assert torch.equal(torch.tensor(d["row_weights"], dtype=torch.float64), tr.weights[[2]])
    # -inf (masked scores) is written as a string, since JSON has no infinity
    masked = next(s for s in d["steps"] if s["name"] == "masked")
    assert masked["value"][0][1] == "-inf"
