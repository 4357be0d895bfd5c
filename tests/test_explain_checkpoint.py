"""Checkpoints (safetensors + JSON config) and `explain(checkpoint=...)`: every layer and head vs the layers themselves."""

import json

import pytest
import torch

from selfattn import checkpoint as ckpt_mod
from selfattn import reference
from selfattn.checkpoint import CheckpointError, load, save
from selfattn.explain import FULL_MATRIX_MAX_TOKENS, ModelTrace, explain
from selfattn.model import AttentionStack

try:  # issue 11 gives mask resolution its public name
    from selfattn.request import resolve_mask as _resolve_mask
except ImportError:
    from selfattn.functional import _resolve_mask

from tolerance import assert_close

VOCAB = ["the", "cat", "sat", "on", "mat", ".", "a", "dog"]
LAYERS = [{"type": "SelfAttention", "qk_dim": 6},
          {"type": "MultiHeadAttention", "num_heads": 4, "num_kv_heads": 2, "rope": True, "qk_norm": True}]


@pytest.fixture
def stack_ckpt(tmp_path):
    torch.manual_seed(7)
    model = AttentionStack(len(VOCAB), 8, LAYERS, causal=True, residual=True)
    with torch.no_grad():
        for p in model.parameters():  # a "trained" model: not the initial values
            p.add_(0.3 * torch.randn_like(p))
    save(tmp_path / "ck", model, model.config, vocab=VOCAB, extra={"step": 12})
    return tmp_path / "ck", model


def test_save_load_round_trip(stack_ckpt):
    path, model = stack_ckpt
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["format"] == "selfattn-checkpoint" and cfg["version"] == 1 and cfg["vocab"] == VOCAB and cfg["step"] == 12
    for p in (path, path / "config.json", path / "model.safetensors"):
        c = load(p)
        assert c.path == path and c.vocab == VOCAB and c.tokenizer == "words" and c.model_config == model.config
    built = load(path).build()
    sd = model.state_dict()
    assert set(built.state_dict()) == set(sd)
    for k, v in built.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert not built.training


def _layer_inputs(model, ids):
    # the input of each attention layer, recomputed by hand from the model's own forward
    xs = []
    x = model.embedding(ids)
    for layer in model.layers:
        xs.append(x)
        y = layer(x, causal=model.causal)
        x = x + y if model.residual else y
    return xs


def test_every_head_matches_the_layers_own_weights(stack_ckpt):
    path, model = stack_ckpt
    text = "the cat sat on the mat . a dog sat"
    mt = explain(text, checkpoint=path)
    assert isinstance(mt, ModelTrace) and mt.full
    assert [(layer.name, layer.kind, len(layer.heads)) for layer in mt.layers] == [
        ("layers.0", "SelfAttention", 1), ("layers.1", "MultiHeadAttention", 4)]
    ids = torch.tensor([[VOCAB.index(t) for t in text.split()]])
    model = model.eval()
    with torch.no_grad():
        xs = _layer_inputs(model, ids)
        _, w0 = model.layers[0](xs[0], causal=True, need_weights=True)  # (1, L, L)
        _, w1 = model.layers[1](xs[1], causal=True, need_weights=True, average_attn_weights=False)  # (1, 4, L, L)
    theirs = [w0[0][None], w1[0]]
    for layer, w in zip(mt.layers, theirs):
        for h, tr in enumerate(layer.heads):
            assert tr.label == f"{layer.name} head {h}"
            # the trace is the float64 reference on the layer's own q, k, v; the layer's weights come from its fast path
            q, k = tr.steps["Q"].float(), tr.steps["K"].float()  # exactly the float32 values the layer passed
            rec = reference.Trace()
            reference.attention(q[None, None], k[None, None], k[None, None], mask=_resolve_mask(None, True, None), upcast=False, trace=rec)
            assert_close(tr.label, w[h], tr.weights, rec["weights"][0, 0])
            assert torch.all(tr.weights.triu(1) == 0)  # the model is causal
            assert torch.allclose(tr.weights.sum(-1), torch.ones(len(mt.tokens), dtype=torch.float64))


def test_long_input_per_head_rows(stack_ckpt):
    path, model = stack_ckpt
    words = [VOCAB[(i * 5) % len(VOCAB)] for i in range(FULL_MATRIX_MAX_TOKENS + 8)]
    mt = explain(" ".join(words), checkpoint=path, rows="1,-1")
    n = len(words)
    assert not mt.full and len(mt.heads) == 5
    for tr in mt.heads:
        assert tr.rows == [1, n - 1] and tr.row_weights.shape == (2, n) and "weights" not in tr.steps
        q, k = tr.steps["Q"], tr.steps["K"]  # (L, d) float32 as passed to attention()
        rec64, rec_low = reference.Trace(), reference.Trace()
        m = _resolve_mask(None, True, None)
        reference.attention(q[None, None], k[None, None], k[None, None], mask=m, trace=rec64)
        reference.attention(q[None, None], k[None, None], k[None, None], mask=m, upcast=False, trace=rec_low)
        assert_close(tr.label, tr.row_weights, rec64["weights"][0, 0][[1, n - 1]], rec_low["weights"][0, 0][[1, n - 1]])


def test_character_checkpoint(tmp_path):
    torch.manual_seed(1)
    chars = sorted(set("hello world"))
    model = AttentionStack(len(chars), 4, [{"type": "MultiHeadAttention", "num_heads": 2}])
    save(tmp_path, model, model.config, vocab=chars, tokenizer="chars")
    mt = explain("hello world", checkpoint=tmp_path)
    assert mt.tokens == list("hello world") and len(mt.heads) == 2
    assert not torch.all(mt.heads[0].weights.triu(1) == 0)  # not causal: attends both ways


def _write(path, config=None, weights=b"", raw_config=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(raw_config if raw_config is not None else json.dumps(config))
    (path / "model.safetensors").write_bytes(weights)


def test_checkpoint_errors(tmp_path, stack_ckpt):
    good, _ = stack_ckpt
    good_cfg = json.loads((good / "config.json").read_text())
    good_weights = (good / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="not found"):
        load(tmp_path / "nope")
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "config.json").write_text(json.dumps(good_cfg))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load(tmp_path / "only")
    _write(tmp_path / "badjson", weights=good_weights, raw_config="{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load(tmp_path / "badjson")
    _write(tmp_path / "fmt", dict(good_cfg, format="something-else"), good_weights)
    with pytest.raises(CheckpointError, match="format"):
        load(tmp_path / "fmt")
    _write(tmp_path / "ver", dict(good_cfg, version=99), good_weights)
    with pytest.raises(CheckpointError, match="version 99"):
        load(tmp_path / "ver")
    _write(tmp_path / "garbage", good_cfg, b"\x00\x01garbage bytes, not a safetensors file")
    with pytest.raises(CheckpointError, match="safetensors"):
        load(tmp_path / "garbage")
    _write(tmp_path / "cut", good_cfg, good_weights[: len(good_weights) // 2])
    with pytest.raises(CheckpointError, match="safetensors"):
        load(tmp_path / "cut")
    _write(tmp_path / "type", dict(good_cfg, model=dict(good_cfg["model"], type="no-such-model")), good_weights)
    with pytest.raises(CheckpointError, match="unknown model type 'no-such-model'"):
        load(tmp_path / "type").build()
    _write(tmp_path / "shape", dict(good_cfg, model=dict(good_cfg["model"], vocab_size=9)), good_weights)
    with pytest.raises(CheckpointError, match="does not fit"):
        load(tmp_path / "shape").build()
    with pytest.raises(ValueError, match="not in the checkpoint's vocabulary.*'zebra'"):
        explain("the zebra", checkpoint=good)
    with pytest.raises(ValueError, match="cannot be combined with a checkpoint"):
        explain("the cat", checkpoint=good, causal=True)
    with pytest.raises(ValueError, match="needs a TEXT"):
        explain(checkpoint=good)
    assert "attention-stack" in ckpt_mod.model_types()


def test_cli_and_json_for_a_checkpoint(stack_ckpt, tmp_path, capsys):
    from selfattn import cli
    from selfattn.explain.labels import fmt

    path, _ = stack_ckpt
    text = "a dog sat on the mat"
    js = tmp_path / "m.json"
    assert cli.main(["explain", text, "--checkpoint", str(path), "--json", str(js)]) == 0
    out = capsys.readouterr().out
    mt = explain(text, checkpoint=path)
    d = json.loads(js.read_text())
    assert d["tokens"] == mt.tokens and [layer["name"] for layer in d["layers"]] == ["layers.0", "layers.1"]
    for layer, lt in zip(d["layers"], mt.layers):
        for hd, tr in zip(layer["heads"], lt.heads):
            assert hd["label"] == tr.label and tr.label in out
            w = next(s for s in hd["steps"] if s["name"] == "weights")["value"]
            assert torch.equal(torch.tensor(w, dtype=torch.float64), tr.weights)
            for x in tr.weights[-1]:
                assert fmt(float(x)) in out


# -- issue 16: head patterns, whitespace labels, AttentionStack moved to selfattn.model --------------


def test_head_patterns_are_the_weight_on_the_pattern_keys():
    from selfattn.explain.trace import head_patterns, pattern_keys, recognised

    toks = list("abcabcabx")
    L = len(toks)
    torch.manual_seed(0)
    w = torch.softmax(torch.randn(L, L, dtype=torch.float64).masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf")), -1)
    keys = pattern_keys(toks)
    assert keys["induction"][4] == [2] and keys["induction"][7] == [2, 5] and keys["induction"][8] is None
    assert keys["earlier copy"][6] == [0, 3] and keys["previous token"][0] is None and keys["same token"][0] is None
    got = head_patterns(toks, [(list(range(4)), w[:4]), (list(range(4, L)), w[4:])])
    for name, per in keys.items():  # one row at a time, by hand
        ms = [float(w[i, per[i]].sum()) for i in range(L) if per[i] is not None]
        even = [len(per[i]) / (i + 1) for i in range(L) if per[i] is not None]  # causal: row i sees i + 1 keys
        want = (sum(ms) / len(ms), len(ms), sum(m >= 0.5 for m in ms), sum(even) / len(even))
        assert got[name][1:3] == want[1:3], name
        assert abs(got[name][0] - want[0]) < 1e-12 and abs(got[name][3] - want[3]) < 1e-12, name
    # a head that looks one token back in every row is recognised as that, and only that
    prev = torch.zeros(L, L, dtype=torch.float64)
    prev[0, 0] = 1.0
    prev[torch.arange(1, L), torch.arange(0, L - 1)] = 1.0
    found = recognised(head_patterns(toks, [(list(range(L)), prev)]))
    assert [f[0] for f in found] == ["previous token"] and found[0][2] == found[0][3] == L - 1


def test_whitespace_tokens_get_visible_labels(tmp_path):
    from selfattn.explain.labels import show_token, token_label

    assert show_token(" ") == "\u2423" and show_token("\n") == "\u21b5" and show_token("a") == "a"
    torch.manual_seed(1)
    chars = sorted(set("a b\nc"))
    model = AttentionStack(len(chars), 4, [{"type": "MultiHeadAttention", "num_heads": 2}])
    save(tmp_path, model, model.config, vocab=chars, tokenizer="chars")
    mt = explain("a b\nc", checkpoint=tmp_path)
    labels = [token_label(mt.heads[0], j) for j in range(len(mt.tokens))]
    assert labels == ["a", "\u2423", "b", "\u21b5", "c"]
    doc = mt.to_html()
    assert "\u2423" in doc and "\u21b5" in doc
    assert mt.predictions == []  # an attention stack's output is not next-token logits


def test_attention_stack_lives_in_model_and_old_checkpoints_load(tmp_path):
    import importlib
    import subprocess
    import sys

    from selfattn import model as model_mod

    assert ckpt_mod.AttentionStack is model_mod.AttentionStack  # the old import path still works
    m = model_mod.AttentionStack(3, 4, [{"type": "SelfAttention"}])
    save(tmp_path, m, m.config, vocab=["a", "b", "c"])
    # a fresh interpreter that imports only the checkpoint module can still build it
    code = (f"from selfattn import checkpoint; m = checkpoint.load({str(tmp_path)!r}).build(); "
            "print(type(m).__module__, type(m).__name__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["selfattn.model", "AttentionStack"]
    assert importlib.import_module("selfattn.checkpoint").__dict__.get("AttentionStack") is None  # not defined there
