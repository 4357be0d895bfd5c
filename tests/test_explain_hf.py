"""`selfattn explain --hf DIR` on a tiny random transformers model saved with save_pretrained.

The report's weights are checked against transformers' own ``eager`` implementation of the same
saved model (``output_attentions``), loaded separately; its tokens against the saved tokenizer.
Every refusal (not a directory, not a transformers model, no or damaged weights, too big for the
machine, attention selfattn cannot serve) is one line with exit status 2, made before loading
wherever the directory alone shows it.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from selfattn import cli  # noqa: E402
from selfattn.explain import FULL_MATRIX_MAX_TOKENS  # noqa: E402

WORDS = ["[UNK]", "the", "cat", "sat", "on", "mat", ".", "a", "dog"]
TEXT = "the cat sat on the mat ."
TOL = 1e-5  # issue 13: output_attentions within 1e-5 of eager's weights


def _llama(seed=0):
    cfg = transformers.LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger weights than the initialisation: weights far from uniform
        for p in model.parameters():
            p.mul_(8.0)
    return model


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(directory with tokenizer, directory without one): the same random Llama."""
    root = tmp_path_factory.mktemp("hf")
    model = _llama()
    with_tok, bare = root / "llama", root / "llama-no-tokenizer"
    model.save_pretrained(with_tok)
    _tokenizer().save_pretrained(with_tok)
    model.save_pretrained(bare)
    return with_tok, bare


def _main(capsys, *args):
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _eager_attentions(path, ids, dtype=torch.float32):
    """Independent weights: transformers' eager attention on the saved model, (layers) x (H, L, L)."""
    model = transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="eager", local_files_only=True,
                                                          dtype=dtype).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_attentions=True)
    return [a[0].to(torch.float64) for a in out.attentions], out.logits[0]


def _tensor(x):  # JSON writes inf and nan as strings
    num = lambda v: float(v) if isinstance(v, str) else v  # noqa: E731
    return torch.tensor([[num(v) for v in row] for row in x] if x and isinstance(x[0], list) else [num(v) for v in x],
                        dtype=torch.float64)


def _entropy(w):  # (..., L) nats, 0 log 0 = 0
    return -torch.where(w > 0, w * w.log(), torch.zeros_like(w)).sum(-1)


def test_every_head_equals_eager_output_attentions(saved, capsys, tmp_path):
    path, _ = saved
    out_json, out_png, out_html = tmp_path / "t.json", tmp_path / "t.png", tmp_path / "t.html"
    code, out, err = _main(capsys, "explain", "--hf", path, TEXT, "--json", out_json, "--png", out_png, "--html", out_html)
    assert code == 0, err
    tr = json.loads(out_json.read_text())
    ids = _tokenizer()(TEXT)["input_ids"]
    assert tr["tokens"] == [WORDS[i] for i in ids]
    eager, logits = _eager_attentions(path, ids)
    assert [layer["name"] for layer in tr["layers"]] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    worst = 0.0
    for layer, want in zip(tr["layers"], eager, strict=True):
        assert layer["kind"] == "LlamaAttention" and len(layer["heads"]) == 4
        for h, head in enumerate(layer["heads"]):
            got = _tensor(next(s["value"] for s in head["steps"] if s["name"] == "weights"))  # (L, L)
            diff = (got - want[h]).abs().max().item()
            worst = max(worst, diff)
            assert diff <= TOL, (layer["name"], h, diff)
            assert (_tensor(head["stats"]["entropy"]) - _entropy(want[h])).abs().max().item() <= 1e-4
    print(f"max |weights - eager| = {worst:.3g}")
    # the weights are not trivially uniform (a test that a uniform answer would pass catches nothing)
    L = len(ids)
    uniform = torch.ones(L, L, dtype=torch.float64).tril() / torch.arange(1, L + 1, dtype=torch.float64)[:, None]  # (L, L)
    assert max((w - uniform).abs().max().item() for w in eager[0]) > 0.05
    # predictions: the model's most likely next token at each position
    first = [row[0][0] for row in tr["predictions"]]
    assert first == [WORDS[int(i)] for i in logits.argmax(-1)]
    assert "model.layers.1.self_attn head 3" in out and "LlamaForCausalLM" in out
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = out_html.read_text()
    assert "model.layers.0.self_attn" in html and "<html" in html.lower()


def test_long_input_rows_and_statistics_from_ids(saved, capsys, tmp_path):
    """Beyond FULL_MATRIX_MAX_TOKENS: no L x L matrix, statistics of every row and the rows asked for."""
    _, bare = saved
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, len(WORDS), (FULL_MATRIX_MAX_TOKENS + 9,), generator=g).tolist()
    out_json = tmp_path / "long.json"
    code, out, err = _main(capsys, "explain", "--hf", bare, "--ids", ",".join(map(str, ids)), "--rows=0,17,-1", "--json", out_json)
    assert code == 0, err
    tr = json.loads(out_json.read_text())
    assert tr["tokens"] == [str(i) for i in ids]
    L = len(ids)
    eager, _ = _eager_attentions(bare, ids)
    eager64, _ = _eager_attentions(bare, ids, torch.float64)
    rows = [0, 17, L - 1]
    for i, (layer, want, want64) in enumerate(zip(tr["layers"], eager, eager64, strict=True)):
        for h, head in enumerate(layer["heads"]):
            assert not head["full"] and head["rows"] == rows
            got = _tensor(head["row_weights"])  # (3, L)
            if i == 0:  # the same inputs as eager's: issue 13's tolerance against eager's weights
                assert (got - want[h][rows]).abs().max().item() <= TOL
            else:
                # deeper layers see inputs that two float32 pipelines rounded differently upstream (one
                # was 1.3e-5 from eager, whose own distance to the float64 model there is 3.3e-5): held to
                # the float64 model within twice eager's own distance to it (STYLE rule 6), plus TOL
                own = (want[h][rows] - want64[h][rows]).abs().max().item()
                assert (got - want64[h][rows]).abs().max().item() <= 2 * own + TOL, (layer["name"], h, own)
            # every row's entropy, held to the float64 model's within twice eager float32's own distance to it
            # (STYLE rule 6), plus TOL: the kernel's float64 scores at large logits (max logit ~140 here) put it
            # nearer the float64 model than eager float32 is, so eager float32 is not the reference
            ent64 = _entropy(want64[h])
            own = (_entropy(want[h]) - ent64).abs().max().item()
            assert (_tensor(head["stats"]["entropy"]) - ent64).abs().max().item() <= 2 * own + TOL, (layer["name"], h, own)
            assert torch.isfinite(_tensor(head["stats"]["max_logit"])).all()
    assert "tokens (41)" in out


def test_without_a_tokenizer_text_is_refused_with_what_to_do(saved, capsys):
    _, bare = saved
    code, _, err = _main(capsys, "explain", "--hf", bare, TEXT)
    assert code == 2 and "has no tokenizer" in err and "--ids" in err
    assert err.strip().splitlines()[-1].startswith("selfattn explain: error:") and "Traceback" not in err


def test_nothing_is_downloaded(saved, capsys, monkeypatch):
    import socket

    def refuse(*a, **k):
        raise AssertionError(f"explain --hf opened a network connection: {a[1:]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    from selfattn.explain.hf import explain_hf

    mt = explain_hf(saved[0], TEXT)  # the library: local_files_only alone
    assert len(mt.layers) == 2 and mt.tokens == TEXT.split()
    code, out, err = _main(capsys, "explain", "--hf", saved[0], TEXT)
    assert code == 0, err
    assert "model.layers.1.self_attn head 3" in out


def test_terminal_report_from_ids(saved, capsys):
    _, bare = saved
    code, out, err = _main(capsys, "explain", "--hf", bare, "--ids", "1 2 3 4")
    assert code == 0, err
    assert "model.layers.0.self_attn head 0" in out and "no tokenizer" in out


# -- refusals --------------------------------------------------------------------------------------

def _error(capsys, *args):
    code, out, err = _main(capsys, *args)
    lines = [x for x in err.strip().splitlines() if x.startswith("selfattn explain: error:")]
    assert code == 2, (code, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _copy(src, dst, skip=()):
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if anything tries to load a model (the checks must come first)."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the check refused it")

    monkeypatch.setattr(transformers.LlamaForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.GPTNeoForCausalLM, "from_pretrained", refuse)


def test_missing_directory(capsys, tmp_path, no_loading):
    line = _error(capsys, "explain", "--hf", tmp_path / "nowhere", TEXT)
    assert "--hf" in line and "does not exist" in line


def test_a_file_is_not_a_directory(saved, capsys, no_loading):
    line = _error(capsys, "explain", "--hf", saved[0] / "config.json", TEXT)
    assert "not a directory" in line


def test_no_config(saved, capsys, tmp_path, no_loading):
    d = _copy(saved[0], tmp_path / "m", skip=("config.json",))
    line = _error(capsys, "explain", "--hf", d, TEXT)
    assert "no config.json" in line and "not a saved transformers model" in line


@pytest.mark.parametrize("config,want", [
    ({"format": "selfattn-checkpoint", "version": 1}, "use --checkpoint"),
    ({"model_type": "no-such-model"}, "'no-such-model'"),
    ([1, 2], "not a transformers config"),
])
def test_config_that_is_not_a_transformers_model(saved, capsys, tmp_path, no_loading, config, want):
    d = _copy(saved[0], tmp_path / "m")
    (d / "config.json").write_text(json.dumps(config))
    line = _error(capsys, "explain", "--hf", d, TEXT)
    assert want in line


def test_config_not_json(saved, capsys, tmp_path, no_loading):
    d = _copy(saved[0], tmp_path / "m")
    (d / "config.json").write_text('{"model_type": "llama", ')
    assert "not valid JSON" in _error(capsys, "explain", "--hf", d, TEXT)


def test_no_weights_file(saved, capsys, tmp_path, no_loading):
    d = _copy(saved[0], tmp_path / "m", skip=("model.safetensors",))
    assert "no *.safetensors weights file" in _error(capsys, "explain", "--hf", d, TEXT)
    (d / "pytorch_model.bin").write_bytes(b"pickle")
    line = _error(capsys, "explain", "--hf", d, TEXT)
    assert "pytorch_model.bin" in line and "never loads" in line


def _corrupt(path, how):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    if how == "cut":  # the file ends inside the data section
        path.write_bytes(raw[: 8 + n + 100])
    elif how == "short":
        path.write_bytes(raw[:5])
    elif how == "length":  # a header length past the end of the file
        path.write_bytes(struct.pack("<Q", len(raw) * 4) + raw[8:])
    elif how == "json":
        path.write_bytes(raw[:8] + b"{" * n + raw[8 + n:])
    elif how == "offsets":  # valid JSON whose tensor sizes disagree with their offsets
        header = json.loads(raw[8:8 + n])
        name = next(k for k in header if k != "__metadata__")
        header[name]["shape"] = [s * 2 for s in header[name]["shape"]]
        new = json.dumps(header).encode()
        new += b" " * (-len(new) % 8)
        path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


@pytest.mark.parametrize("how,want", [("cut", "cut short or damaged"), ("short", "shorter than"),
                                      ("length", "header claims"), ("json", "not valid JSON"),
                                      ("offsets", "cut short or damaged")])
def test_corrupt_safetensors(saved, capsys, tmp_path, no_loading, how, want):
    d = _copy(saved[0], tmp_path / "m")
    _corrupt(d / "model.safetensors", how)
    line = _error(capsys, "explain", "--hf", d, TEXT)
    assert "model.safetensors is not a readable safetensors file" in line and want in line


def test_too_big_for_the_machine_is_refused_before_loading(saved, capsys, monkeypatch, no_loading):
    import selfattn._cliutil as cu

    from selfattn.explain import hf

    md = hf.check_model_dir(saved[0])
    n_params = sum(p.numel() for p in _llama().parameters())
    assert md.parameters == n_params  # counted from the safetensors header, before loading
    need = hf.memory_needed(md, len(TEXT.split()))  # the tokenizer makes one token per word
    assert need >= 4 * n_params
    monkeypatch.setattr(cu, "available_memory", lambda: need - 1)
    line = _error(capsys, "explain", "--hf", saved[0], TEXT)
    assert "needs about" in line and f"{n_params:,} parameters" in line and "available" in line


def test_attention_selfattn_cannot_serve_is_refused_before_loading(capsys, tmp_path, no_loading):
    # GPT-Neo builds its own attention classes: no attn_implementation can replace them
    cfg = transformers.GPTNeoConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=4,
                                    attention_types=[[["global"], 1]], max_position_embeddings=64)
    transformers.GPTNeoForCausalLM(cfg).save_pretrained(tmp_path / "neo")
    line = _error(capsys, "explain", "--hf", tmp_path / "neo", "--ids", "1,2,3")
    assert "GPTNeoForCausalLM" in line and "AttentionInterface" in line


def test_an_argument_selfattn_cannot_serve_is_named(capsys, tmp_path):
    # T5 passes a relative position bias tensor to its attention function
    cfg = transformers.T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4,
                                decoder_start_token_id=0)
    torch.manual_seed(0)
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(tmp_path / "t5")
    line = _error(capsys, "explain", "--hf", tmp_path / "t5", "--ids", "1,2,3")
    import inspect

    import transformers.models.t5.modeling_t5 as t5

    if "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(t5):  # transformers 5: T5 calls the attention interface
        assert "position_bias" in line and "T5Attention" in line
    else:  # transformers 4.x: T5 builds its own attention, refused before loading
        assert "T5ForConditionalGeneration" in line and "AttentionInterface" in line


@pytest.mark.parametrize("args,want", [
    (("--ids", "1,2,99"), "out of range"),
    (("--ids", "1,x"), "--ids must be integers"),
    (("--ids", "1,2", TEXT), "not both"),
    (("--causal", TEXT), "--causal cannot be combined with --hf"),
    ((), "needs a TEXT"),
    (("--rows", "50", TEXT), "out of range"),
])
def test_bad_arguments_with_hf(saved, capsys, args, want):
    line = _error(capsys, "explain", "--hf", saved[0], *args)
    assert want in line


def test_layers_pick_what_is_traced(saved, capsys, tmp_path):
    out_json = tmp_path / "l.json"
    code, out, err = _main(capsys, "explain", "--hf", saved[1], "--ids", "1,2,3", "--layers=-1", "--json", out_json)
    assert code == 0, err
    tr = json.loads(out_json.read_text())
    assert [layer["name"] for layer in tr["layers"]] == ["model.layers.1.self_attn"]
    eager, _ = _eager_attentions(saved[1], [1, 2, 3])
    for h, head in enumerate(tr["layers"][0]["heads"]):
        got = _tensor(next(s["value"] for s in head["steps"] if s["name"] == "weights"))
        assert (got - eager[1][h]).abs().max().item() <= TOL
    assert "model.layers.0.self_attn head" not in out


@pytest.mark.parametrize("spec,want", [("5", "layer 5 is out of range: the model has 2"), ("0-x", "--layers must be indices")])
def test_bad_layers_are_refused_before_loading(saved, capsys, no_loading, spec, want):
    assert want in _error(capsys, "explain", "--hf", saved[0], TEXT, f"--layers={spec}")


def test_without_transformers_installed(saved, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    line = _error(capsys, "explain", "--hf", saved[0], TEXT)
    assert "needs transformers" in line and "selfattn[hf]" in line


def test_ids_without_hf(capsys):
    assert "--ids needs --hf" in _error(capsys, "explain", "--ids", "1,2")


def test_json_too_large_is_refused_before_loading(saved, capsys, monkeypatch, no_loading):
    monkeypatch.setattr(cli, "JSON_MAX_NUMBERS", 100)
    line = _error(capsys, "explain", "--hf", saved[0], TEXT, "--json", "/tmp/x.json")
    assert "--json" in line and "numbers" in line


# -- other families: sliding windows, softcap, GPT-2's and BERT's module names, bidirectional masks --

@pytest.mark.parametrize("family", ["mistral", "gemma2", "gpt2", "bert"])
def test_other_families_equal_eager(family, tmp_path):
    from selfattn.explain.hf import HFModelError, explain_hf
    from test_hf import FAMILIES, _config

    cfg = _config(family)
    torch.manual_seed(0)
    cls = transformers.BertForMaskedLM if family == "bert" else transformers.AutoModelForCausalLM
    model = cls(cfg) if family == "bert" else cls.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    model.save_pretrained(tmp_path / family)
    ids = list(range(1, 12))  # 11 tokens: longer than the sliding windows (5)
    if family not in FAMILIES:  # transformers 4.x: BERT builds its own attention classes, selfattn cannot serve them
        with pytest.raises(HFModelError, match="AttentionInterface|no attention calls"):
            explain_hf(tmp_path / family, ids=ids)
        return
    mt = explain_hf(tmp_path / family, ids=ids)
    eager = cls.from_pretrained(tmp_path / family, attn_implementation="eager", local_files_only=True).eval()
    with torch.no_grad():
        att = eager(torch.tensor([ids]), output_attentions=True).attentions
    assert len(mt.layers) == len(att) == cfg.num_hidden_layers
    for layer, want in zip(mt.layers, att, strict=True):
        assert len(layer.heads) == want.shape[1]
        for h, tr in enumerate(layer.heads):
            assert (tr.weights - want[0, h].double()).abs().max().item() <= TOL, (layer.name, h)


SINKS = (-2.0, 0.0, 1.5, 3.0)  # one sink logit per head: from a small share to most of a row


@pytest.fixture(scope="module")
def oss(tmp_path_factory):
    """A tiny random gpt-oss (layer 0 sliding window, layer 1 full), sinks set to SINKS: its directory and eager twin."""
    from test_hf import FAMILIES, _config

    if "gpt_oss" not in FAMILIES:
        pytest.skip("this transformers has no gpt-oss")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config("gpt_oss"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.mul_(4.0)
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.tensor(SINKS))
    path = tmp_path_factory.mktemp("oss") / "oss"
    model.save_pretrained(path)
    eager = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", local_files_only=True,
                                                              dtype=torch.float32).eval()
    return path, eager


def _eager_of(eager, ids):
    with torch.no_grad():
        att = eager(input_ids=torch.tensor([ids]), output_attentions=True).attentions  # keys only: gpt-oss drops the sink column
    return [a[0].to(torch.float64) for a in att]


def test_gpt_oss_sinks_every_head_and_its_sink_share_equal_eager(oss, capsys, tmp_path):
    """Attention sinks: each head's weights and each row's sink share (1 - the row's sum in eager) within 1e-5."""
    path, eager = oss
    ids = list(range(1, 12))  # 11 tokens: longer than layer 0's window (5)
    out_json, out_png, out_html = tmp_path / "s.json", tmp_path / "s.png", tmp_path / "s.html"
    code, out, err = _main(capsys, "explain", "--hf", path, "--ids", ",".join(map(str, ids)), "--json", out_json,
                           "--png", out_png, "--html", out_html)
    assert code == 0, err
    tr = json.loads(out_json.read_text())
    want = _eager_of(eager, ids)
    worst, shares = 0.0, []
    for layer, w in zip(tr["layers"], want, strict=True):
        assert len(layer["heads"]) == 4
        for h, head in enumerate(layer["heads"]):
            got = _tensor(next(s["value"] for s in head["steps"] if s["name"] == "weights"))  # (L, L) keys only
            share = _tensor(head["sink_share"])  # (L,)
            assert head["sink_logit"] == SINKS[h]
            worst = max(worst, (got - w[h]).abs().max().item(), (share - (1 - w[h].sum(-1))).abs().max().item())
            assert (got.sum(-1) + share - 1).abs().max().item() < 1e-9  # rows sum to 1 - p_sink, no more
            shares.append(share)
    print(f"max |weights or sink share - eager| = {worst:.3g}")
    assert worst <= TOL
    assert max(float(s.max()) for s in shares) > 0.5 and min(float(s.min()) for s in shares) < 0.01  # the sink matters here
    words = " ".join(out.split())  # the terminal wraps at 80 columns
    assert "sink (logit 3, a column with no value)" in words and "so a row's weights on the keys sum to 1 minus that share" in words
    assert all(f"{s:.4f}" in out for s in shares[-1].tolist())  # the last head's sink column
    html = out_html.read_text()
    assert "sink logit" in html and "sink share" in html
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpt_oss_heatmap_draws_the_sink_as_a_labelled_first_column(oss):
    """What the PNG draws: each head's first column is its sink share, labelled 'sink', then the keys' weights."""
    import matplotlib.pyplot as plt
    import numpy as np

    from selfattn.explain.hf import explain_hf

    path, _ = oss
    mt = explain_hf(path, ids=list(range(1, 8)))
    fig = mt.plot()
    axes = [ax for ax in fig.axes if ax.get_title().startswith("head")]  # (not the colour bar)
    assert len(axes) == len(mt.heads)
    firsts = {ax.get_xticklabels()[0].get_text() for ax in axes}
    assert "sink" in firsts and firsts <= {"sink", ""}  # labelled under the bottom panels of each layer
    for ax, tr in zip(axes, mt.heads):
        drawn = np.ma.filled(ax.images[0].get_array(), np.nan)  # (L, 1 + L)
        assert np.allclose(drawn[:, 0], tr.sink_share.numpy())
        keys = np.nan_to_num(drawn[:, 1:], nan=0.0)
        assert np.allclose(keys, tr.weights.numpy()) and f"sink logit {tr.sink:.3g}" in ax.get_title()
    plt.close(fig)


def test_gpt_oss_sinks_on_long_input(oss):
    """Beyond FULL_MATRIX_MAX_TOKENS: the rows asked for and every row's sink share, from the saved log-sum-exp."""
    from selfattn.explain.hf import explain_hf

    path, eager = oss
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 100, (FULL_MATRIX_MAX_TOKENS + 7,), generator=g).tolist()
    mt = explain_hf(path, ids=ids, rows=[0, 20, -1])
    L = len(ids)
    want = _eager_of(eager, ids)
    for layer, w in zip(mt.layers, want, strict=True):
        for h, tr in enumerate(layer.heads):
            assert not tr.full and tr.sink == SINKS[h]
            assert (tr.row_weights.double() - w[h][[0, 20, L - 1]]).abs().max().item() <= TOL
            assert (tr.sink_share - (1 - w[h].sum(-1))).abs().max().item() <= TOL  # every row, not only those asked for
    d = mt.to_dict()["layers"][1]["heads"][3]
    assert d["sink_logit"] == SINKS[3] and len(d["sink_share"]) == L


def test_progress_reports_each_stage(saved):
    from selfattn.explain.hf import explain_hf

    seen = []
    explain_hf(saved[1], ids=[1, 2, 3], progress=lambda stage, done, total: seen.append((stage, done, total)))
    stages = list(dict.fromkeys(s for s, _, _ in seen))
    assert stages == ["loading the model", "running the model (attention calls)", "tracing every head"]
    running = [(d, t) for s, d, t in seen if s.startswith("running")]
    assert running == [(0, 2), (1, 2), (2, 2)]  # one attention call per layer, 2 layers
    assert seen[-1] == ("tracing every head", 2, 2)


def test_a_model_larger_than_memory_is_refused_from_its_headers(saved, capsys, tmp_path, no_loading):
    """No monkeypatching: a 1 TiB float32 tensor declared in the header (a sparse file on disk)."""
    import selfattn._cliutil as cu

    have = cu.available_memory()
    assert have is not None and have < 4 * 2 ** 40, "this machine has more memory than the test model needs (4 TiB)"
    d = _copy(saved[0], tmp_path / "big", skip=("model.safetensors",))
    header = json.dumps({"model.embed_tokens.weight": {"dtype": "F32", "shape": [2 ** 38], "data_offsets": [0, 2 ** 40]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(d / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 2 ** 40)  # sparse: no disk space used
    line = _error(capsys, "explain", "--hf", d, TEXT)
    assert f"{2 ** 38:,} parameters" in line and "needs about" in line and "TB" in line
