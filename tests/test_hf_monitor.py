"""selfattn.observe (calls with the module that made them) and selfattn.monitor.Monitor (issue 13).

No transformers needed: a stack of selfattn's MultiHeadAttention layers; tests/test_hf.py's
models go through the same hooks.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch import nn

import selfattn
from selfattn.monitor import Monitor


class Stack(nn.Module):
    def __init__(self, layers=3, dim=32, heads=4):
        super().__init__()
        self.blocks = nn.ModuleList(selfattn.MultiHeadAttention(dim, heads, num_kv_heads=2) for _ in range(layers))

    def forward(self, x, fail_at=None):
        for i, b in enumerate(self.blocks):
            if i == fail_at:
                raise RuntimeError("boom")
            x = x + b(x, causal=True)
        return x


def _model():
    torch.manual_seed(0)
    return Stack().eval()


def test_observe_names_each_layer_and_hands_its_statistics():
    model, x = _model(), torch.randn(2, 9, 32)
    seen = []
    with selfattn.observe(seen.append, model):
        model(x)
    assert [(c.name, c.index) for c in seen] == [("blocks.0", 0), ("blocks.1", 1), ("blocks.2", 2)]
    assert all(c.module is model.blocks[c.index] for c in seen)
    # the statistics are those of the call itself: recompute layer 1's from its own query and key
    c = seen[1]
    _, ref = selfattn.attention(c.query, c.key, c.value, causal=True, return_stats=True, backend="reference")
    assert torch.allclose(c.stats.entropy, ref.entropy.float(), atol=1e-5)
    assert torch.allclose(c.stats.max_logit, ref.max_logit.float(), atol=1e-5)
    seen.clear()
    model(x)
    assert seen == []  # nothing outside the context


def test_observe_without_a_model_names_by_class_and_survives_an_exception():
    model, x = _model(), torch.randn(1, 5, 32)
    seen = []
    with selfattn.observe(seen.append):
        with pytest.raises(RuntimeError, match="boom"):
            model(x, fail_at=1)  # the module stack must unwind
        model(x)
    assert [c.name for c in seen] == ["MultiHeadAttention"] * 4
    assert [c.index for c in seen] == [0, 0, 1, 2]
    q = torch.randn(1, 2, 4, 8)
    with selfattn.observe(seen.append):
        selfattn.attention(q, q, q)  # outside any module
    assert (seen[-1].name, seen[-1].index, seen[-1].module) == ("", -1, None)


def test_monitor_rows_are_per_layer_per_head_means():
    model = _model()
    xs = [torch.randn(2, 9, 32) for _ in range(3)]
    mon = Monitor(model)
    for step, x in enumerate(xs):
        with mon.collect(step * 10):
            model(x)
        mon.record(loss=float(step))
    assert mon.layers == ["blocks.0", "blocks.1", "blocks.2"]
    assert [r["step"] for r in mon.rows] == [0, 10, 20] and mon.rows[2]["loss"] == 2.0
    # independent expectation for step 1, layer 2: its call's statistics, averaged per head
    seen = []
    with selfattn.observe(seen.append, model):
        model(xs[1])
    st = seen[2].stats
    heads = mon.rows[1]["heads"][2]
    assert len(heads) == 4
    for h in range(4):
        assert math.isclose(heads[h]["entropy"], st.entropy[:, h].double().mean().item(), rel_tol=1e-6)
        assert math.isclose(heads[h]["max_logit"], st.max_logit[:, h].double().mean().item(), rel_tol=1e-6)
        assert math.isclose(heads[h]["max_logit_max"], st.max_logit[:, h].max().item(), rel_tol=1e-6)


def test_monitor_leaves_fully_masked_rows_out():
    q = torch.randn(1, 2, 4, 8)
    keep = torch.tensor([[False, True, True, True]])
    mon = Monitor()
    with mon.collect():
        # query 0 sees only key 0, which is padding: a fully-masked row
        selfattn.attention(q, q, q, causal=True, mask=selfattn.masks.key_padding(keep))
    _, st = selfattn.attention(q, q, q, causal=True, mask=selfattn.masks.key_padding(keep), return_stats=True)
    h0 = mon.rows[0]["heads"][0][0]
    assert math.isclose(h0["max_logit"], st.max_logit[0, 0, 1:].double().mean().item(), rel_tol=1e-6)


def test_monitor_plot(tmp_path):
    pytest.importorskip("matplotlib")
    model, mon = _model(), Monitor(_model())
    for step in range(3):
        with mon.collect(step):
            mon.model(torch.randn(1, 7, 32))
    path = tmp_path / "attention.png"
    mon.plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="nothing collected"):
        Monitor(model).plot(tmp_path / "x.png")


def test_monitor_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    mon = Monitor(_model())
    with mon.collect(0):
        mon.model(torch.randn(1, 3, 32))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises
    with pytest.raises(ModuleNotFoundError, match=r"selfattn\[cli\]"):
        mon.plot(tmp_path / "x.png")
