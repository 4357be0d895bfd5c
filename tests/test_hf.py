"""selfattn as a transformers attention implementation (issue 13), on tiny random models.

Every comparison is against transformers' own ``eager`` implementation of the same model with
the same weights, in float32: logits where the attention mask is 1 (no padding, left, right),
greedy generation with dynamic and static caches, one training step's gradients, and
``output_attentions``. The masks must reach selfattn structured (``mask_counts``: no dense mask,
no function mask) for causal, sliding-window, padded and packed batches.

The same tests run against the oldest transformers the package declares with
``pytest -m slow tests/test_hf_oldest.py`` (it installs that version into a folder of its own).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import selfattn.integrations.transformers as sa_hf  # noqa: E402

# -- tiny random models (no weights downloaded) ---------------------------------------------------
VOCAB = 101


def _config(family: str, **over):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if family == "llama":
        cfg = tf.LlamaConfig(**common)
    elif family == "mistral":
        cfg = tf.MistralConfig(**common, sliding_window=5)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**common, use_sliding_window=True, sliding_window=5, max_window_layers=1,
                             layer_types=["full_attention", "sliding_attention"])
    elif family == "gemma2":
        cfg = tf.Gemma2Config(**common, head_dim=8, sliding_window=5, attn_logit_softcapping=5.0,
                              final_logit_softcapping=30.0, query_pre_attn_scalar=6)
    elif family == "gpt_oss":
        cfg = tf.GptOssConfig(**{**common, "intermediate_size": 32}, head_dim=8, sliding_window=5,
                              num_local_experts=4, num_experts_per_tok=2,
                              layer_types=["sliding_attention", "full_attention"])
    elif family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256)
    elif family == "bert":
        cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=256)
    else:
        raise ValueError(family)
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def _model(family: str, attn: str = "eager", seed: int = 0, **over):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = _config(family, **over)
    cls = tf.AutoModelForMaskedLM if family == "bert" else tf.AutoModelForCausalLM
    m = cls.from_config(cfg, attn_implementation=attn)
    # no dropout anywhere: eager and selfattn must see the same network
    for mod in m.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    for attr in ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob"):
        if hasattr(m.config, attr):
            setattr(m.config, attr, 0.0)
    return m.eval()


def _batch(padding: str, b: int = 2, length: int = 11, seed: int = 1):
    """(input_ids, attention_mask) with no padding, or the first row padded on the left/right."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, length), generator=g)
    am = torch.ones(b, length, dtype=torch.long)
    if padding == "left":
        am[0, :4] = 0
    elif padding == "right":
        am[0, -4:] = 0
    ids = ids.masked_fill(am == 0, 0)
    return ids, am


TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
# BERT calls transformers' AttentionInterface from transformers 5 on (4.x builds its eager/sdpa classes)
FAMILIES = ["llama", "mistral", "qwen2", "gemma2", "gpt2"] + (["bert"] if TRANSFORMERS_MAJOR >= 5 else [])
if hasattr(transformers, "GptOssConfig"):
    FAMILIES.append("gpt_oss")
DECODERS = [f for f in FAMILIES if f != "bert"]
STRUCTURED = {"causal", "sliding_window", "bidirectional", "packed"}

# issue 13's targets
LOGIT_TOL = 1e-4
WEIGHT_TOL = 1e-5
GRAD_TOL = 1e-4  # relative to the largest gradient of the step


@pytest.fixture(scope="module", autouse=True)
def _registered():
    sa_hf.register()
    sa_hf.register("selfattn-math", backend="math")


def _structured_only():
    counts = sa_hf.mask_counts()
    assert counts, "the mask builder was not called"
    assert set(counts) <= STRUCTURED, f"masks left the structured routes: {counts}"
    return counts


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_weights_match_eager(family, padding):
    model = _model(family)
    ids, am = _batch(padding)
    if family == "gpt2" and TRANSFORMERS_MAJOR < 5:
        # GPT-2 on transformers 4.x keeps output_attentions from its attention function: the
        # documented workaround is the config flag, which the function reads
        model.config.output_attentions = True
    with torch.no_grad():
        ref = model(ids, attention_mask=am, output_attentions=True)
        model.set_attn_implementation("selfattn")
        sa_hf.reset_mask_counts()
        got = model(ids, attention_mask=am, output_attentions=True)
    counts = _structured_only()
    real = am.bool()  # (B, L): compare where the attention mask is 1
    diff = (ref.logits - got.logits)[real].abs()
    print(f"{family} {padding}: logits max {diff.max():.2e} mean {diff.mean():.2e}; masks {counts}")
    assert diff.max() <= LOGIT_TOL
    assert len(got.attentions) == len(ref.attentions) > 0
    pairs = real[:, None, :, None] & real[:, None, None, :]  # (B, 1, Lq, Lk) real query and real key
    for layer, (r, g) in enumerate(zip(ref.attentions, got.attentions)):
        assert g.shape == r.shape
        wd = (r - g).abs()[pairs.expand_as(r)]
        assert wd.max() <= WEIGHT_TOL, (layer, wd.max().item())


# CI runs every decoder with a dynamic cache and the static cache on Llama (full attention) and
# Gemma 2 (full and sliding layers); the other static runs are slow-marked (pytest -m slow)
_CI_STATIC = {"llama", "gemma2"}
GENERATE = [pytest.param(f, c, marks=() if c == "dynamic" or f in _CI_STATIC else pytest.mark.slow)
            for f in DECODERS for c in ("dynamic", "static")]


@pytest.mark.parametrize("family,cache", GENERATE)
def test_greedy_generate_matches_eager(family, cache):
    model = _model(family)
    ids, am = _batch("left")
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    if cache == "static":
        kw["cache_implementation"] = "static"
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=am, **kw)
        model.set_attn_implementation("selfattn")
        sa_hf.reset_mask_counts()
        got = model.generate(ids, attention_mask=am, **kw)
    counts = _structured_only()
    print(f"{family} {cache}: {ref[:, ids.shape[1]:].tolist()} masks {counts}")
    assert torch.equal(ref, got)


def _step_grads(model, ids, am):
    model.zero_grad(set_to_none=True)
    model.train()
    labels = ids.masked_fill(am == 0, -100)
    model(ids, attention_mask=am, labels=labels).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_gradients_match_eager(family):
    model = _model(family)  # dropout already 0: both runs see the same network
    ids, am = _batch("right")
    ref = _step_grads(model, ids, am)
    model.set_attn_implementation("selfattn")
    sa_hf.reset_mask_counts()
    got = _step_grads(model, ids, am)
    _structured_only()
    assert ref.keys() == got.keys()
    largest = max(g.abs().max() for g in ref.values())
    worst = max(((ref[n] - got[n]).abs().max() / largest).item() for n in ref)
    print(f"{family}: largest gradient {largest:.3e}, worst difference / largest {worst:.2e}")
    assert worst <= GRAD_TOL


def test_packed_sequences_reach_selfattn_as_documents():
    # two sequences packed in one row, told apart by position_ids (how collators pack without padding;
    # transformers looks for packing only without a cache)
    model = _model("llama")
    ids, _ = _batch("none", b=1, length=12)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        ref = model(ids, position_ids=position_ids, use_cache=False).logits
        model.set_attn_implementation("selfattn")
        sa_hf.reset_mask_counts()
        got = model(ids, position_ids=position_ids, use_cache=False).logits
    assert sa_hf.mask_counts() == {"packed": 1}
    assert (ref - got).abs().max() <= LOGIT_TOL
    # the second sequence must not see the first: its logits equal those of the sequence alone
    with torch.no_grad():
        alone = model(ids[:, 5:], position_ids=position_ids[:, 5:], use_cache=False).logits
    assert (alone - got[:, 5:]).abs().max() <= LOGIT_TOL


def test_sinks_on_an_explicit_backend():
    # gpt-oss's sinks through the math backend, whatever auto picks
    if "gpt_oss" not in FAMILIES:
        pytest.skip("this transformers has no gpt-oss")
    model = _model("gpt_oss")
    ids, am = _batch("none")
    with torch.no_grad():
        ref = model(ids, attention_mask=am).logits
        model.set_attn_implementation("selfattn-math")
        got = model(ids, attention_mask=am).logits
    assert (ref - got).abs().max() <= LOGIT_TOL


# -- the mask builder's routes, called directly ---------------------------------------------------

def _dense_reference(**kw):
    import transformers.masking_utils as tm

    return tm.sdpa_mask(**{**kw, "allow_is_causal_skip": False, "allow_is_bidirectional_skip": False})


def _builder_kwargs(mask_function, attention_mask=None, q_length=9, kv_length=9, q_offset=0, kv_offset=0, **extra):
    import inspect

    import transformers.masking_utils as tm

    kw = dict(batch_size=2, kv_length=kv_length, kv_offset=kv_offset, mask_function=mask_function,
              attention_mask=attention_mask, **extra)
    if "q_length" in inspect.signature(tm.sdpa_mask).parameters:
        kw.update(q_length=q_length, q_offset=q_offset)
    else:  # transformers 4.x: the query positions
        kw.update(cache_position=torch.arange(q_length) + q_offset)
    return kw


def _allowed(hf_mask, batch, heads=1):
    """bool (B, 1, Lq, Lk) that selfattn computes for an HFMask (through attention_probs on q = k = 0)."""
    lq, lk = hf_mask.shape[2], hf_mask.shape[3]
    q = torch.zeros(batch, heads, lq, 4, dtype=torch.float64)
    k = torch.zeros(batch, heads, lk, 4, dtype=torch.float64)
    _, stats = sa_hf.attention(q, k, k, return_stats=True, backend="reference", **hf_mask.kwargs())
    p = sa_hf.attention_probs(q, k, stats, **hf_mask.kwargs())
    return p > 0


@pytest.mark.parametrize("case", ["chunked", "static-cache-window", "custom"])
def test_mask_routes_equal_transformers_dense_mask(case):
    import transformers.masking_utils as tm

    am = torch.ones(2, 16, dtype=torch.bool)
    am[0, :3] = False
    if case == "chunked":  # chunked attention (Llama 4): chunks are documents, read off the function
        fn, want = tm.chunked_causal_mask_function(4, torch.tensor([3, 0])), "packed"
        kw = _builder_kwargs(fn, am[:, :9])
    elif case == "static-cache-window":  # decoding one token at position 10 of a 16-slot cache
        fn, want = tm.sliding_window_causal_mask_function(4), "sliding_window"
        kw = _builder_kwargs(fn, am[:, :11], q_length=1, kv_length=16, q_offset=10, local_size=4)
    else:  # any index-based predicate
        def fn(b, h, q, kv):
            return (kv % 3 == 0) | (kv == q)

        want = "function"
        kw = _builder_kwargs(fn, am[:, :9])
    sa_hf.reset_mask_counts()
    built = sa_hf.build_mask(**kw)
    assert built.kind == want and sa_hf.mask_counts() == {want: 1}
    dense = _dense_reference(**kw)  # transformers' own (B, 1, Lq, Lk) mask
    got = _allowed(built, 2)
    # rows with no allowed key: selfattn gives probability 0 everywhere (nothing to compare)
    assert torch.equal(got, dense.expand_as(got) & dense.any(-1, keepdim=True))


def test_vmap_only_function_becomes_a_counted_dense_mask():
    def fn(b, h, q, kv):  # written for scalars: works under transformers' vmap, not on broadcast indices
        return (kv - q).reshape(()) <= 0

    kw = _builder_kwargs(fn, use_vmap=True, q_length=5, kv_length=5)
    sa_hf.reset_mask_counts()
    built = sa_hf.build_mask(**kw)
    assert built.kind == "dense" and sa_hf.mask_counts() == {"dense": 1}
    assert torch.equal(_allowed(built, 2)[0, 0], torch.ones(5, 5, dtype=torch.bool).tril())


def test_a_wrong_structured_guess_is_caught():
    # local_size says "window 4", but the function is plain causal: the exact check must refuse the window
    import transformers.masking_utils as tm

    def causal_copy(b, h, q, kv):
        return tm.causal_mask_function(b, h, q, kv)

    built = sa_hf.build_mask(**_builder_kwargs(causal_copy, local_size=4))
    assert built.kind == "causal" and built.window is None


# -- bad input ------------------------------------------------------------------------------------

def test_register_rejects_an_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'flash9'.*math"):
        sa_hf.register("x", backend="flash9")
    with pytest.raises(ValueError, match="transformers' own"):
        sa_hf.register("sdpa")


def test_unsupported_argument_is_refused_by_name():
    fn = sa_hf.make_attention_function("auto")
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(NotImplementedError, match="position_bias.*T5Attention"):
        fn(type("T5Attention", (torch.nn.Module,), {})(), q, q, q, None, position_bias=torch.zeros(1, 2, 3, 3))


def test_model_with_unsupported_argument_raises_clearly():
    # a model whose attention passes position_bias: the error names the argument and the module
    class BiasAttention(torch.nn.Module):
        config = None

        def forward(self, x):
            from transformers import AttentionInterface

            f = AttentionInterface()["selfattn"]
            return f(self, x, x, x, None, position_bias=torch.zeros(1, 1, x.shape[2], x.shape[2]))[0]

    with pytest.raises(NotImplementedError, match="'position_bias'.*BiasAttention"):
        BiasAttention()(torch.randn(1, 1, 3, 4))


def test_statistics_only_when_the_weights_are_wanted(monkeypatch):
    # the attention function asks selfattn for statistics only to make the weights (output_attentions):
    # without them a decoding step takes the row kernel (backends.cpu._masked_rows) and any backend serves
    from selfattn.backends import cpu as cpu_backend

    sa_hf.register()
    asked, rows = [], []
    real, real_rows = sa_hf.attention, cpu_backend._masked_rows
    monkeypatch.setattr(sa_hf, "attention", lambda *a, **kw: asked.append(kw["return_stats"]) or real(*a, **kw))
    monkeypatch.setattr(cpu_backend, "_masked_rows", lambda *a: rows.append(1) or real_rows(*a))
    model = _model("llama", "selfattn")
    ids, am = _batch("left")
    ref = _model("llama", "eager")
    with torch.no_grad():
        got = model.generate(ids, attention_mask=am, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
        want = ref.generate(ids, attention_mask=am, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
        assert asked and not any(asked) and torch.equal(got, want)
        assert rows, "the decoding steps reached the row kernel's route"
        asked.clear()
        out = model(ids, attention_mask=am, output_attentions=True)
    assert asked and all(asked) and out.attentions[0].shape == (2, 4, 11, 11)
