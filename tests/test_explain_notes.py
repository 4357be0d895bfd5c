"""The notes' example through `selfattn explain`: every number comes from the reference trace."""

import math
import re

import torch
from _cli import run_cli

import selfattn
from selfattn import reference
from selfattn.explain import compare_with_notes, notes_example
from selfattn.explain.labels import fmt


def _by_hand():
    # the notes' setup, recomputed independently with plain torch ops in float64
    x = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 1], [1, 1, 1, 1]], dtype=torch.float64)
    scores = x @ x.T
    weights = torch.softmax(scores / math.sqrt(4), dim=-1)
    return x, scores, weights, weights @ x


def test_notes_example_matches_plain_torch():
    tr = notes_example()
    x, scores, weights, out = _by_hand()
    assert tr.tokens == ["The", "cat", "sat"]
    assert torch.equal(tr.steps["embeddings"], x)
    for name in ("Q", "K", "V"):
        assert torch.equal(tr.steps[name], x)  # W = I
    assert torch.equal(tr.steps["scores"], scores)
    assert torch.allclose(tr.steps["scaled"], scores / 2, rtol=0, atol=1e-15)
    assert torch.allclose(tr.weights, weights, rtol=0, atol=1e-15)
    assert torch.allclose(tr.output, out, rtol=0, atol=1e-15)
    assert tr.scale == 0.5 and tr.d_k == 4


def test_explain_api_is_the_reference():
    tr = selfattn.explain()
    x = tr.steps["embeddings"][None, None]
    out, stats = reference.attention(x, x, x)
    assert torch.equal(tr.output, out[0, 0])
    assert torch.equal(tr.stats.entropy, stats.entropy[0, 0])


def test_notes_discrepancy_is_diagnosed():
    c = compare_with_notes(notes_example())
    # the computed output differs from the notes' figure by one repeated term: sat's
    assert c["repeated_terms"] == [2]
    assert not torch.allclose(c["claimed"], c["computed"], atol=1e-3)


def test_cli_prints_every_step_with_computed_numbers():
    r = run_cli("explain", env={"COLUMNS": "160", "PATH": ""}, timeout=600)  # a process of its own (tests/_cli.py)
    assert r.returncode == 0, r.stderr
    text = r.stdout
    tr = notes_example()
    for title in ("Token embeddings", "Scores", "Scaled scores", "Softmax", "contextual embeddings"):
        assert title in text
    for name in ("weights", "output", "scaled"):
        for v in tr.steps[name].flatten().tolist():
            assert fmt(v) in text, f"{name} value {fmt(v)} not printed"
    # the largest weight in each row is marked
    assert len(re.findall(r"\*" + re.escape(fmt(float(tr.weights[0].max()))), text)) >= 2
    assert fmt(float(tr.output[0, 0])) in text and "twice" in text
