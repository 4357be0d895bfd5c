"""An adversarial review of selfattn as a transformers attention implementation: what tests/test_hf.py
does not cover.

Every comparison is against transformers' own implementations of the same tiny random model with the
same weights. Forward tolerances come from eager's own error (STYLE.md rule 6):
``|selfattn - ref64| <= 2 |eager32 - ref64| + floor``, where ref64 is the same model run in float64.
ref64 is the float64 ``sdpa`` run: transformers' float64 ``eager`` turns left-padded rows into NaN
(its padded query rows attend to nothing, and the NaN reaches every position through the next layer's
``0 * NaN``), so it cannot be the reference for padded batches.

Covered here: more families (Phi-3, Qwen3, Cohere, OLMo 2, Gemma 3, Gemma 4 with KV sharing,
ModernBERT, RoBERTa, DistilBERT, BART, Whisper; T5, DeepSeek-V3.2 and models that bypass the attention
interface refused clearly), mixed left and right padding, chunked prefill through dynamic and static
caches shorter than the sequence (sliding layers), greedy, beam and prompt-lookup generation on
encoder-decoders and more decoders, attention weights during generation, left-padded and packed
training steps (the flattening collator), 4-D masks, dropout (eval, training, with weights, under
gradient checkpointing), gradients through the returned weights, bfloat16, float64, torch.autocast,
torch.inference_mode, selfattn's own cpu kernels at many tiles, seeded differential sweeps of the mask
builder and the attention function, register's names, save/load and switching implementations.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:  # the families below use AttentionInterface from 5.x on
    pytest.skip("the review covers transformers 5.x", allow_module_level=True)

import selfattn.integrations.transformers as sa_hf  # noqa: E402
from tolerance import floor_for  # noqa: E402

VOCAB = 100
STRUCTURED = {"causal", "sliding_window", "bidirectional", "packed"}


@pytest.fixture(scope="module", autouse=True)
def _registered():
    sa_hf.register()


def _common(**over):
    d = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
    d.update(over)
    return d


def _config(family: str, dropout: float = 0.0):
    tf = transformers
    if family == "llama":
        cfg = tf.LlamaConfig(**_common())
    elif family == "mistral":
        cfg = tf.MistralConfig(**_common(sliding_window=5))
    elif family == "gemma2":
        cfg = tf.Gemma2Config(**_common(head_dim=8, sliding_window=5, attn_logit_softcapping=5.0,
                                        final_logit_softcapping=30.0, query_pre_attn_scalar=6))
    elif family == "gpt_oss":
        cfg = tf.GptOssConfig(**_common(intermediate_size=32, head_dim=8, sliding_window=5, num_local_experts=4,
                                        num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"]))
    elif family == "phi3":  # sliding window on every layer, fused qkv
        cfg = tf.Phi3Config(**_common(sliding_window=5, pad_token_id=0))
    elif family == "qwen3":  # q/k norms, one full and one sliding layer
        cfg = tf.Qwen3Config(**_common(head_dim=8, use_sliding_window=True, sliding_window=5, max_window_layers=1,
                                       layer_types=["full_attention", "sliding_attention"]))
    elif family == "cohere":  # parallel attention + MLP, q/k layer norms
        cfg = tf.CohereConfig(**_common(use_qk_norm=True, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    elif family == "olmo2":
        cfg = tf.Olmo2Config(**_common(pad_token_id=0, bos_token_id=1, eos_token_id=2))
    elif family == "gemma3":  # softcap, query_pre_attn_scalar, sliding and full layers
        cfg = tf.Gemma3TextConfig(**_common(head_dim=8, sliding_window=5, query_pre_attn_scalar=6,
                                            attn_logit_softcapping=5.0, layer_types=["sliding_attention", "full_attention"]))
    elif family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    elif family == "bert":
        cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64)
    elif family == "modernbert":  # bidirectional sliding window (local layers) and global layers
        cfg = tf.ModernBertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                  num_attention_heads=4, local_attention=4, global_attn_every_n_layers=2,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    elif family == "roberta":
        cfg = tf.RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, pad_token_id=1)
    elif family == "distilbert":
        cfg = tf.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64)
    elif family == "bart":
        cfg = tf.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64)
    elif family == "whisper":
        cfg = tf.WhisperConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
                               max_source_positions=16, max_target_positions=32, pad_token_id=0, bos_token_id=1,
                               eos_token_id=2, decoder_start_token_id=1, begin_suppress_tokens=None, suppress_tokens=None)
    elif family == "t5":
        cfg = tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    else:
        raise ValueError(family)
    for attr in ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob"):
        if hasattr(cfg, attr):
            setattr(cfg, attr, dropout)
    for attr in ("dropout", "hidden_dropout_prob", "resid_pdrop", "embd_pdrop", "activation_dropout", "embedding_dropout",
                 "mlp_dropout", "hidden_dropout", "dropout_rate", "qa_dropout", "seq_classif_dropout"):
        if hasattr(cfg, attr):
            setattr(cfg, attr, 0.0)
    return cfg


ENCODERS = ("bert", "modernbert", "roberta", "distilbert")
SEQ2SEQ = ("bart", "whisper", "t5")


def _model(family: str, attn: str = "eager", dropout: float = 0.0, seed: int = 0):
    tf = transformers
    cfg = _config(family, dropout)
    torch.manual_seed(seed)
    if family in ENCODERS:
        cls = tf.AutoModelForMaskedLM
    elif family in SEQ2SEQ:
        cls = tf.WhisperForConditionalGeneration if family == "whisper" else tf.AutoModelForSeq2SeqLM
    else:
        cls = tf.AutoModelForCausalLM
    make = cls._from_config if family == "whisper" else cls.from_config  # no auto class for Whisper's generation head
    m = make(cfg, attn_implementation=attn)
    return m.eval()


def _batch(padding: str = "both", b: int = 2, length: int = 11, seed: int = 1):
    """(input_ids, attention_mask): 'left' pads row 0 on the left, 'both' also row 1 on the right."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, length), generator=g)
    am = torch.ones(b, length, dtype=torch.long)
    if padding in ("left", "both"):
        am[0, :4] = 0
    if padding in ("right", "both"):
        am[-1, -3:] = 0
    return ids.masked_fill(am == 0, 0), am


def _inputs(family: str, padding: str = "both", dtype=torch.float32):
    """(model kwargs, bool (B, Lq) of real query positions)."""
    ids, am = _batch(padding)
    if family not in SEQ2SEQ:
        return dict(input_ids=ids, attention_mask=am), am.bool()
    dec, dam = _batch("right" if padding != "none" else "none", length=7, seed=3)
    kw = dict(decoder_input_ids=dec, decoder_attention_mask=dam)
    if family == "whisper":
        kw["input_features"] = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(5)).to(dtype)
    else:
        kw.update(input_ids=ids, attention_mask=am)
    return kw, dam.bool()


def _with_cache(model, cache):
    """The cache as the forward's keyword (``cache`` in newer 5.x, ``past_key_values`` before)."""
    import inspect

    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


def _switch(model, impl):
    model.set_attn_implementation(impl)
    assert model.config._attn_implementation == impl
    sa_hf.reset_mask_counts()


def _structured_only():
    counts = sa_hf.mask_counts()
    assert counts and set(counts) <= STRUCTURED, f"masks left the structured routes: {counts}"
    return counts


def _within_eagers_error(name, got, ref64, eager, real, dtype=torch.float32):
    """STYLE rule 6 on the real positions: |got - ref64| <= 2 |eager - ref64| + floor."""
    err = (got.double() - ref64)[real].abs()
    base = (eager.double() - ref64)[real].abs().max().item()
    tol = 2 * base + floor_for(dtype, ref64[real])
    print(f"{name}: max|diff| {err.max():.3e} mean {err.mean():.3e}; eager's own {base:.3e}; tol {tol:.3e}")
    assert torch.isfinite(got[real]).all() and err.max().item() <= tol


# -- more families, in float32 and float64 -------------------------------------------------------

FAMILIES = ["phi3", "qwen3", "cohere", "olmo2", "gemma3", "modernbert", "roberta", "distilbert", "bart", "whisper"]


@pytest.mark.parametrize("family", FAMILIES)
def test_more_families_match_eager_within_its_own_error(family):
    model = _model(family)
    kw, real = _inputs(family)
    with torch.no_grad():
        eager = model(**kw).logits
        _switch(model, "selfattn")
        got = model(**kw).logits
        counts = _structured_only()
        model.double()
        kw64 = {k: (v.double() if v.is_floating_point() else v) for k, v in kw.items()}
        _switch(model, "sdpa")
        ref64 = model(**kw64).logits
        _switch(model, "selfattn")
        got64 = model(**kw64).logits
    print(family, counts)
    _within_eagers_error(f"{family} float32", got, ref64, eager, real)
    # float64: eager's float32 error scaled to float64's precision
    scale = torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps
    _within_eagers_error(f"{family} float64", got64, ref64, ref64 + (eager.double() - ref64) * scale, real, torch.float64)


@pytest.mark.parametrize("family", ["phi3", "qwen3", "gemma3", "modernbert", "bart", "whisper"])
def test_more_families_training_step_within_eagers_error(family):
    # gradients: |selfattn - ref64| <= 3 |eager - ref64| + floor, per parameter (STYLE rule 6 for gradients)
    kw, _ = _inputs(family, "right")
    labels = kw.get("decoder_input_ids", kw.get("input_ids"))
    real = kw.get("decoder_attention_mask", kw.get("attention_mask"))
    kw["labels"] = labels.masked_fill(real == 0, -100)
    model = _model(family)
    _, eager = _grads(model, **kw)
    _switch(model, "selfattn")
    _, got = _grads(model, **kw)
    _structured_only()
    model.double()
    _switch(model, "sdpa")
    _, ref64 = _grads(model, **{k: (v.double() if v.is_floating_point() else v) for k, v in kw.items()})
    assert eager.keys() == got.keys() == ref64.keys()
    worst = 0.0
    for n, r in ref64.items():
        err = (got[n].double() - r).abs().max().item()
        tol = 3 * (eager[n].double() - r).abs().max().item() + floor_for(torch.float32, r)
        worst = max(worst, err / tol)
    print(f"{family}: worst gradient error / tolerance {worst:.3f}")
    assert worst <= 1.0


@pytest.mark.parametrize("family", ["gemma3", "modernbert", "bart", "gpt_oss"])
def test_the_cpu_kernels_serve_the_models(family):
    # auto may hand tiny calls to torch's sdpa: the same checks on selfattn's own fused kernels (backend "cpu"),
    # logits (left+right padding) and a right-padded training step's gradients
    name = sa_hf.register("selfattn-cpu-review", backend="cpu")
    kw, real = _inputs(family)
    model = _model(family)
    with torch.no_grad():
        eager = model(**kw).logits
        _switch(model, name)
        got = model(**kw).logits
    if family == "gpt_oss":  # no float64 run (its experts' grouped matmul): eager itself, at eager's float32 level
        assert (got - eager)[real].abs().max() <= 1e-5
    else:
        with torch.no_grad():
            model.double()
            _switch(model, "sdpa")
            ref64 = model(**{k: (v.double() if v.is_floating_point() else v) for k, v in kw.items()}).logits
            model.float()
        _within_eagers_error(f"{family} cpu", got, ref64, eager, real)
    kw, real = _inputs(family, "right")
    kw["labels"] = kw.get("decoder_input_ids", kw.get("input_ids")).masked_fill(~real, -100)
    _switch(model, "eager")
    _, ref = _grads(model, **kw)
    _switch(model, name)
    _, grads = _grads(model, **kw)
    _structured_only()
    print(f"{family} cpu: worst grad diff / largest {_worst(ref, grads):.2e}")
    assert _worst(ref, grads) <= 1e-5


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_many_tiles_on_the_cpu_kernels(family):
    # 300 tokens, window 64, head dim 32: the fused kernels' tiled paths (skipped, partial and full tiles, several
    # query blocks) under left and right padding, and a prefill in three chunks through a static cache
    tf = transformers
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32, max_position_embeddings=512, sliding_window=64)
    cfg = (tf.MistralConfig(**common) if family == "mistral" else
           tf.Gemma2Config(**common, attn_logit_softcapping=20.0, query_pre_attn_scalar=32))
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    name = sa_hf.register("selfattn-cpu-review", backend="cpu")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 300), generator=g)
    am = torch.ones_like(ids)
    am[0, :37] = 0
    am[1, -50:] = 0
    labels = ids.masked_fill(am == 0, -100)
    labels[0, 37] = -100  # predicted from a pad position (eager and selfattn differ there by design)
    _, ref = _grads(model, input_ids=ids, attention_mask=am, labels=labels)
    model.eval()
    with torch.no_grad():
        ref_logits = model(input_ids=ids, attention_mask=am).logits
    _switch(model, name)
    _, got = _grads(model, input_ids=ids, attention_mask=am, labels=labels)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=am).logits
    assert (logits - ref_logits)[am.bool()].abs().max() <= 1e-5 and _worst(ref, got) <= 1e-5

    left = am.clone()
    left[1] = 1  # chunked prefill: left padding only

    def chunked():
        cache = tf.StaticCache(config=model.config, max_cache_len=320)
        with torch.no_grad():
            return torch.cat([model(input_ids=ids[:, a:b], attention_mask=left[:, :b], **_with_cache(model, cache),
                                    use_cache=True).logits for a, b in ((0, 200), (200, 290), (290, 300))], 1)

    got = chunked()
    _switch(model, "eager")
    assert (chunked() - got)[left.bool()].abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_oss", "bert"])
def test_autocast_training_step_within_eagers_error(family):
    # mixed precision as people train: a float32 model under torch.autocast(bfloat16). RoPE and q/k norms hand
    # the attention float32 queries and keys with bfloat16 values (eager's matmuls and torch's sdpa cast them
    # under autocast); logits and gradients within 2x / 3x eager's own error against the float32 step
    ids, am = _batch("right", length=40)
    labels = ids.masked_fill(am == 0, -100)
    model = _model(family)
    kw = dict(input_ids=ids, attention_mask=am, labels=labels)

    def step():
        model.zero_grad(set_to_none=True)
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**kw)
        out.loss.backward()
        return out.logits.detach().float(), {n: p.grad.detach().double() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    ref = model(**kw)
    ref.loss.backward()
    ref_logits, ref_grads = ref.logits.detach().double(), {n: p.grad.detach().double() for n, p in model.named_parameters()}
    eager_logits, eager_grads = step()
    _switch(model, "selfattn")
    logits, grads = step()
    real = am.bool()
    _within_eagers_error(f"{family} autocast", logits, ref_logits, eager_logits, real, torch.bfloat16)
    assert grads.keys() == eager_grads.keys()
    worst = max(((grads[n] - ref_grads[n]).abs().max() / (3 * (eager_grads[n] - ref_grads[n]).abs().max()
                                                         + floor_for(torch.bfloat16, ref_grads[n]))).item() for n in grads)
    print(f"{family} autocast: worst gradient error / tolerance {worst:.3f}")
    assert worst <= 1.0


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_oss", "bert", "bart"])
def test_inference_mode(family):
    # torch.inference_mode() (pipelines, servers): the masks built in it are inference tensors, which keep no
    # version counter (what selfattn's mask caches key on); forward with weights, generate with a static cache,
    # and a caller's 4-D mask
    ids, am = _batch("left")
    kw = dict(input_ids=ids, attention_mask=am)
    if family == "bart":
        kw["decoder_input_ids"] = ids
    gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static")
    model = _model(family)
    runs = {}
    for impl in ("eager", "selfattn"):
        _switch(model, impl)
        with torch.inference_mode():
            out = model(**kw, output_attentions=True)
            tokens = None if family == "bert" else model.generate(ids, attention_mask=am, **gen)
            n = ids.shape[1]
            four_d = torch.zeros(2, 1, n, n).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -1e9)
            four = None if family in ("bert", "bart") else model(input_ids=ids, attention_mask=four_d).logits
        runs[impl] = (out.logits, tokens, four)
    real = am.bool() if family != "bart" else torch.ones_like(am, dtype=torch.bool)
    (ref, ref_tokens, ref_four), (got, tokens, four) = runs["eager"], runs["selfattn"]
    assert (ref - got)[real].abs().max() <= 1e-5
    assert ref_tokens is None or torch.equal(ref_tokens, tokens)
    assert ref_four is None or (ref_four - four).abs().max() <= 1e-5
    if family == "llama":  # a bfloat16 model given a float32 4-D mask: converted, still a normal tensor
        model.to(torch.bfloat16)
        with torch.inference_mode():
            got = model(input_ids=ids, attention_mask=four_d).logits
            _switch(model, "eager")
            ref = model(input_ids=ids, attention_mask=four_d).logits
        assert (ref.float() - got.float()).abs().max() <= 0.1  # bfloat16 logits, two orders of rounding


@pytest.mark.parametrize("backend", ["auto", "cpu"])
def test_attention_with_a_mask_made_in_inference_mode(backend):
    # what the integration works around (build_mask makes its tensors outside inference mode), for direct calls:
    # a mask tensor made under torch.inference_mode(), then changed in place there (no stale cached plan)
    import selfattn

    q = torch.randn(1, 2, 5, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        keep = torch.tensor([[True, True, False, True, True]])
        for _ in range(2):
            for _ in range(2):  # the second call may take a cached plan
                got = selfattn.attention(q, q, q, mask=selfattn.masks.key_padding(keep), backend=backend)
                ref = selfattn.attention(q, q, q, mask=selfattn.masks.key_padding(keep), backend="reference")
                assert (got - ref).abs().max() <= 1e-6
            keep[0, 0] = False


@pytest.mark.parametrize("how", ["bfloat16 model", "autocast"])
def test_a_float32_four_d_mask_with_bfloat16_attention(how):
    # a caller's float32 4-D mask with finfo(float32).min entries (transformers' own convention) meeting bfloat16
    # queries: eager adds it in float32 (type promotion), so a row all at the minimum is the mean of the values;
    # rounded to bfloat16 the minimum is -inf and the row would be empty (0)
    ids, _ = _batch("none")
    n = ids.shape[1]
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    allowed[2] = False
    mask = torch.zeros(2, 1, n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)
    model = _model("llama")
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits.double()  # float32 stands for the exact one
        runs = {}
        for impl in ("eager", "selfattn"):
            _switch(model, impl)
            if how == "autocast":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    runs[impl] = model(input_ids=ids, attention_mask=mask).logits
            else:
                runs[impl] = model.to(torch.bfloat16)(input_ids=ids, attention_mask=mask).logits
                model.float()
    real = torch.ones(2, n, dtype=torch.bool)
    _within_eagers_error(f"float32 4-D mask, {how}", runs["selfattn"], ref, runs["eager"], real, torch.bfloat16)


def test_bfloat16_within_eagers_error():
    for family in ("llama", "gemma2"):
        kw, real = _inputs(family)
        model = _model(family)
        with torch.no_grad():
            ref = model(**kw).logits.double()  # the float32 model stands for the exact one here
            model.to(torch.bfloat16)
            eager = model(**kw).logits
            _switch(model, "selfattn")
            got = model(**kw).logits
        _within_eagers_error(f"{family} bfloat16", got, ref, eager, real, torch.bfloat16)


# -- caches: chunked prefill, generation --------------------------------------------------------

@pytest.mark.parametrize("family", ["mistral", "gpt_oss", "gemma3"])
def test_chunked_prefill_through_a_dynamic_cache_matches_eager(family):
    # 16 tokens fed as 9 + 4 + 3 into one DynamicCache: the sliding layers' caches keep only the last
    # window - 1 keys, so later chunks see kv_offset > 0 and keys that start mid-sequence
    ids, am = _batch("left", length=16)

    def run(model):
        cache = transformers.DynamicCache(config=model.config)
        out = []
        with torch.no_grad():
            for a, b in ((0, 9), (9, 13), (13, 16)):
                out.append(model(input_ids=ids[:, a:b], attention_mask=am[:, :b], **_with_cache(model, cache),
                                 use_cache=True).logits)
        return torch.cat(out, 1)

    model = _model(family)
    ref = run(model)
    _switch(model, "selfattn")
    got = run(model)
    _structured_only()
    diff = (ref - got)[am.bool()].abs().max().item()
    print(f"{family}: chunked prefill max diff {diff:.2e}")
    assert diff <= 1e-5


GENERATE = [("phi3", "static"), ("qwen3", "static"), ("gemma3", "static"), ("cohere", "dynamic"), ("olmo2", "dynamic"),
            ("bart", "dynamic"), ("bart", "static"), ("whisper", "dynamic"), ("whisper", "static")]


@pytest.mark.parametrize("family,cache", GENERATE)
def test_greedy_generate_matches_eager(family, cache):
    model = _model(family)
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    if cache == "static":
        kw["cache_implementation"] = "static"
    if family == "whisper":
        kw["input_features"] = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(5))
    else:
        ids, am = _batch("left")
        kw.update(inputs=ids, attention_mask=am, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(**kw)
        _switch(model, "selfattn")
        got = model.generate(**kw)
    print(family, cache, sa_hf.mask_counts())
    _structured_only()
    assert torch.equal(ref, got)


def test_beam_search_matches_eager():
    model = _model("gemma2")
    ids, am = _batch("left")
    kw = dict(max_new_tokens=5, min_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=am, **kw)
        _switch(model, "selfattn")
        got = model.generate(ids, attention_mask=am, **kw)
    assert torch.equal(ref, got)


@pytest.mark.parametrize("family", ["mistral", "gpt_oss"])
def test_prompt_lookup_decoding_matches_eager(family):
    # assisted decoding: several candidate tokens per step against the cache (q_length > 1 with an offset),
    # then the cache cropped back to the accepted ones; a prompt that repeats itself so candidates are found
    ids, _ = _batch("none", b=1)
    ids = torch.cat([ids, ids[:, 2:8], ids[:, 2:8]], 1)
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0, prompt_lookup_num_tokens=3)
    model = _model(family)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        _switch(model, "selfattn")
        got = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    _structured_only()
    assert torch.equal(ref, got)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_weights_during_generation_match_eager(cache):
    # gpt-oss: sinks, a sliding and a full layer; every step's weights, (B, H, 1, cache length) with a static cache
    model = _model("gpt_oss")
    ids, am = _batch("left")
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0, output_attentions=True,
              return_dict_in_generate=True)
    if cache == "static":
        kw["cache_implementation"] = "static"
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=am, **kw)
        _switch(model, "selfattn")
        got = model.generate(ids, attention_mask=am, **kw)
    assert torch.equal(ref.sequences, got.sequences)
    real = am.bool()
    for step, (r_layers, g_layers) in enumerate(zip(ref.attentions, got.attentions)):
        for r, g in zip(r_layers, g_layers):
            assert r.shape == g.shape
            if step == 0:  # the prompt: compare real queries against real keys (eager's padded rows differ)
                keys = torch.nn.functional.pad(real, (0, r.shape[-1] - real.shape[1]), value=True)  # static: unused slots
                pairs = (real[:, None, :, None] & keys[:, None, None, :]).expand_as(r)
                r, g = r[pairs], g[pairs]
            assert (r - g).abs().max().item() <= 1e-5, step


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_gemma4_with_kv_shared_layers_matches_eager(cache):
    # Gemma 4's KV-sharing layers run only the last query rows once the shared keys exist: the model slices
    # every mask's query rows (mask[:, :, -n:, :]) before them, in the prompt's forward inside generate
    cfg = transformers.Gemma4TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=5, vocab_size_per_layer_input=VOCAB,
        hidden_size_per_layer_input=8, max_position_embeddings=128, num_kv_shared_layers=2,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
    torch.manual_seed(0)
    model = transformers.Gemma4ForCausalLM(cfg).eval()
    ids, am = _batch("both")
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation=cache)
    with torch.no_grad():
        ref_logits = model(input_ids=ids, attention_mask=am).logits
        ref = model.generate(ids, attention_mask=am, **kw)
        _switch(model, "selfattn")
        got_logits = model(input_ids=ids, attention_mask=am).logits
        got = model.generate(ids, attention_mask=am, **kw)
    _structured_only()
    assert (ref_logits - got_logits)[am.bool()].abs().max() <= 1e-5
    assert torch.equal(ref, got)
    with torch.inference_mode():  # the sliced masks under inference mode too
        assert torch.equal(model.generate(ids, attention_mask=am, **kw), ref)


@pytest.mark.parametrize("case", ["causal-padded", "packed", "function", "dense"])
def test_mask_rows_sliced_equal_transformers_mask_sliced(case):
    import transformers.masking_utils as tm

    from test_hf import _allowed, _builder_kwargs, _dense_reference

    am = torch.ones(2, 9, dtype=torch.bool)
    am[0, :3] = False
    if case == "causal-padded":
        kw = _builder_kwargs(tm.causal_mask_function, am)
    elif case == "packed":
        seg = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2], [0, 0, 0, 0, 0, 1, 1, 1, 1]])
        kw = _builder_kwargs(tm.and_masks(tm.causal_mask_function, tm.packed_sequence_mask_function(seg)))
    elif case == "function":
        kw = _builder_kwargs(lambda b, h, q, kv: (kv % 3 == 0) | (kv == q), am)
    else:
        kw = _builder_kwargs(lambda b, h, q, kv: (kv - q).reshape(()) <= 0, am, use_vmap=True)
    built = sa_hf.build_mask(**kw)
    want = _dense_reference(**kw).expand(2, 1, 9, 9)
    for rows in (slice(-1, None), slice(-4, None), slice(2, 7), slice(0, None)):
        for index in ((slice(None), slice(None), rows, slice(None)), (Ellipsis, rows, slice(None))):
            part = built[index]
            assert part.kind == built.kind and part.shape == (2, 1, len(range(9)[rows]), 9)
            got = _allowed(part, 2)
            w = want[:, :, rows]
            assert torch.equal(got, w & w.any(-1, keepdim=True)), (case, rows)
    with pytest.raises(TypeError, match="indexing"):  # anything but a slice of query rows
        built[:, :, :, :4]
    with pytest.raises(AttributeError, match="'dtype'.*cannot serve"):  # tensor attributes it does not have
        built.dtype
    assert not hasattr(built, "masked_fill") and hasattr(built, "shape")


def test_random_masks_and_row_slices_equal_transformers_dense_masks():
    # a seeded differential sweep of the mask builder: transformers' own mask functions (causal, bidirectional,
    # sliding both ways, chunked, packed, blockwise overlays, a padding function) at random sizes, query and key
    # offsets (caches) and padding patterns (left, right, a hole, a mask shorter than the keys), and random
    # query-row slices of each, against transformers' dense mask (rows with no key: selfattn gives 0 everywhere)
    import random

    import transformers.masking_utils as tm

    from test_hf import _allowed, _dense_reference

    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    kinds = {}
    for _ in range(120):
        b, kv_length = rng.randint(1, 3), rng.randint(1, 20)
        kv_offset = rng.choice([0, 0, rng.randint(0, 8)])
        q_length = rng.randint(1, kv_length + 2)
        q_offset = max(0, rng.choice([kv_offset + kv_length - q_length, rng.randint(0, kv_offset + kv_length)]))
        total = max(kv_offset + kv_length, q_offset + q_length)
        kind, w = rng.choice(["causal", "bidir", "swc", "swb", "chunk", "packed", "block", "pad_fn"]), rng.randint(1, 6)
        am = None
        if rng.random() < 0.7:
            n = rng.choice([total, kv_offset + kv_length, max(1, total - rng.randint(0, 3))])
            am = torch.ones(b, n, dtype=torch.bool)
            for row in range(b):
                r = rng.random()
                if r < 0.3:
                    am[row, :rng.randint(0, n)] = False
                elif r < 0.6:
                    am[row, rng.randint(0, n):] = False
                elif r < 0.7:
                    am[row, rng.randint(0, n - 1)] = False
        fn = {"causal": lambda: tm.causal_mask_function,
              "bidir": lambda: tm.bidirectional_mask_function,
              "swc": lambda: tm.sliding_window_causal_mask_function(w),
              "swb": lambda: tm.sliding_window_bidirectional_mask_function(w),
              "chunk": lambda: tm.chunked_causal_mask_function(w, torch.randint(0, 3, (b,), generator=g)),
              "packed": lambda: tm.and_masks(tm.causal_mask_function, tm.packed_sequence_mask_function(
                  torch.cumsum((torch.rand(b, total, generator=g) < 0.25).long(), 1))),
              "block": lambda: tm.or_masks(tm.causal_mask_function, tm.blockwise_overlay(
                  torch.randint(-1, 3, (b, total), generator=g))),
              "pad_fn": lambda: tm.and_masks(tm.causal_mask_function, tm.padding_mask_function(
                  torch.rand(b, total, generator=g) < 0.8))}[kind]()
        kw = dict(batch_size=b, q_length=q_length, q_offset=q_offset, kv_length=kv_length, kv_offset=kv_offset,
                  mask_function=fn, attention_mask=am, local_size=w if kind in ("swc", "swb") else None)
        want = _dense_reference(**kw)
        built = sa_hf.build_mask(**kw)
        kinds[built.kind] = kinds.get(built.kind, 0) + 1
        want = want.expand(b, 1, q_length, kv_length)
        rows = slice(rng.randint(-q_length, q_length - 1), None, rng.choice([1, 1, 2]))
        for mask, ref in ((built, want), (built[:, :, rows, :], want[:, :, rows])):
            assert torch.equal(_allowed(mask, b), ref & ref.any(-1, keepdim=True)), (kind, kw, rows)
    print("routes", kinds)
    assert {"causal", "bidirectional", "sliding_window", "packed", "function"} <= set(kinds)


# -- training batches ---------------------------------------------------------------------------

def _grads(model, **kw):
    model.zero_grad(set_to_none=True)
    model.train()
    out = model(**kw)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _worst(ref, got):
    assert ref.keys() == got.keys()
    largest = max(g.abs().max() for g in ref.values())
    return max(((ref[n] - got[n]).abs().max() / largest).item() for n in ref)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_left_padded_training_step(family):
    # Left padding puts queries with no key to see at the front (a padded query sees only padded keys).
    # transformers disagrees with itself on them: eager attends uniformly to every key, sdpa (torch >= 2.5)
    # gives 0, as selfattn does. With the usual labels (pads -100) the last pad position predicts the first
    # real token, so its output reaches the loss: selfattn matches sdpa there, and eager once those
    # predictions are left out of the loss.
    ids, am = _batch("both")
    labels = ids.masked_fill(am == 0, -100)
    model = _model(family, "sdpa")
    loss_sdpa, ref = _grads(model, input_ids=ids, attention_mask=am, labels=labels)
    _switch(model, "selfattn")
    loss, got = _grads(model, input_ids=ids, attention_mask=am, labels=labels)
    _structured_only()
    print(f"{family}: loss sdpa {loss_sdpa:.7f} selfattn {loss:.7f}; worst grad diff / largest {_worst(ref, got):.2e}")
    assert abs(loss - loss_sdpa) <= 1e-6 and _worst(ref, got) <= 1e-5
    labels[0, 4] = -100  # the first real token of the left-padded row: predicted from a pad position
    _switch(model, "eager")
    loss_eager, ref = _grads(model, input_ids=ids, attention_mask=am, labels=labels)
    _switch(model, "selfattn")
    loss, got = _grads(model, input_ids=ids, attention_mask=am, labels=labels)
    assert abs(loss - loss_eager) <= 1e-6 and _worst(ref, got) <= 1e-5


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_packed_training_step_from_the_flattening_collator(family):
    # DataCollatorWithFlattening's format (one row, position_ids restarting, FlashAttention's cu_seq_lens
    # kwargs that eager and selfattn ignore); transformers detects packing only without a cache
    feats = [{"input_ids": list(range(3, 10))}, {"input_ids": list(range(20, 24))}, {"input_ids": list(range(40, 51))}]
    batch = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True)(feats)
    model = _model(family)
    _, ref = _grads(model, use_cache=False, **batch)
    _switch(model, "selfattn")
    _, got = _grads(model, use_cache=False, **batch)
    assert sa_hf.mask_counts() == {"packed": 1}
    print(f"{family}: worst grad diff / largest {_worst(ref, got):.2e}")
    assert _worst(ref, got) <= 1e-5


def test_packed_rows_of_a_batch_are_packed_differently():
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 6, 7, 8],
                        [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0]])
    ids, _ = _batch("none", length=16)
    model = _model("mistral")  # window 5 inside each sequence
    with torch.no_grad():
        ref = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        _switch(model, "selfattn")
        got = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        assert sa_hf.mask_counts() == {"packed": 1}
        alone = model(input_ids=ids[1:, 4:15], use_cache=False).logits  # row 1's second sequence by itself
    assert (ref - got).abs().max().item() <= 1e-5
    assert (alone[0] - got[1, 4:15]).abs().max().item() <= 1e-5


# -- 4-D masks handed in by the caller ------------------------------------------------------------

@pytest.mark.parametrize("backend", ["auto", "cpu"])
def test_four_d_masks_from_the_caller(backend):
    # transformers passes a 4-D mask through untouched. A float mask is added to the scores (eager and sdpa
    # agree, also on row 2, all at finfo.min: the mean of the values); a bool mask means "may attend" for
    # sdpa (row 2, all False: 0), while eager adds it to the scores as 0/1, so bool masks are compared with sdpa
    name = sa_hf.register(f"selfattn-{backend}-4d", backend=backend)
    ids, _ = _batch("none")
    n = ids.shape[1]
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    allowed[5:, :3] = False
    allowed[2] = False
    for family in ("llama", "bert"):
        as_bool = allowed[None, None].expand(2, 1, n, n)
        as_float = torch.zeros(2, 1, n, n).masked_fill(~as_bool, torch.finfo(torch.float32).min)
        for mask, against in ((as_float, "eager"), (as_bool, "sdpa")):
            model = _model(family, against)
            with torch.no_grad():
                ref = model(input_ids=ids, attention_mask=mask).logits
                _switch(model, name)
                got = model(input_ids=ids, attention_mask=mask).logits
            assert sa_hf.mask_counts() == {"dense": 2}  # one per layer, counted
            diff = (ref - got).abs().max().item()
            print(family, mask.dtype, against, f"{diff:.2e}")
            assert diff <= 1e-5


# -- dropout, and the weights' gradients ----------------------------------------------------------

def test_dropout_is_off_in_eval_and_unbiased_in_training():
    ids, am = _batch("both")
    model = _model("gemma2", dropout=0.5)  # softcap: auto cannot hand this call to torch's sdpa
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=am).logits
        _switch(model, "selfattn")
        assert (model(input_ids=ids, attention_mask=am).logits - ref)[am.bool()].abs().max() <= 1e-5
    # one attention call, many draws: the mean is the undropped output (4.5 standard errors)
    fn = sa_hf.make_attention_function("auto")
    module = torch.nn.Module()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 6, 8, generator=g) for h in (4, 2, 2))
    exact = fn(module, q, k, v, None, scaling=0.3, softcap=5.0)[0]
    torch.manual_seed(0)  # fixed draws: no flake (the bound holds for this seed and is ~1e-3 likely to fail by chance)
    draws = torch.stack([fn(module, q, k, v, None, dropout=0.5, scaling=0.3, softcap=5.0)[0] for _ in range(3000)])
    z = (draws.mean(0) - exact).abs() / (draws.std(0) / len(draws) ** 0.5).clamp(min=1e-6)
    print(f"dropout: max z {z.max():.2f}; a draw differs from the exact output by {(draws[0] - exact).abs().max():.2e}")
    assert z.max() <= 4.5 and (draws[0] - exact).abs().max() > 0.05


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_oss", "bert"])
def test_weights_under_dropout_are_the_ones_applied(family):
    # eager returns the weights after dropout, the ones it multiplied the values by: with the same seed
    # selfattn must give the same weights and the same output
    ids, am = _batch("right")
    model = _model(family, dropout=0.3)
    model.train()
    torch.manual_seed(11)
    ref = model(input_ids=ids, attention_mask=am, output_attentions=True)
    _switch(model, "selfattn")
    torch.manual_seed(11)
    got = model(input_ids=ids, attention_mask=am, output_attentions=True)
    real = am.bool()
    pairs = real[:, None, :, None] & real[:, None, None, :]
    for r, g in zip(ref.attentions, got.attentions):
        w = (r - g).abs()[pairs.expand_as(r)].max().item()
        assert w <= 1e-5, w
    diff = (ref.logits - got.logits)[real].abs().max().item()
    print(f"{family}: logits under dropout max diff {diff:.2e}")
    assert diff <= 1e-5


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_oss", "bert"])
def test_gradients_through_the_returned_weights_match_eager(family):
    # a loss on the weights themselves (attention distillation, entropy regularisers): the gradient must
    # include the softmax normaliser's, as eager's does
    ids, am = _batch("right")
    real = am.bool()
    pairs = real[:, None, :, None] & real[:, None, None, :]
    grads = {}
    for impl in ("eager", "selfattn"):
        model = _model(family, impl)
        model.train()
        out = model(input_ids=ids, attention_mask=am, output_attentions=True)
        loss = sum(((w * pairs) ** 2).sum() for w in out.attentions) + out.logits[real].square().mean()
        loss.backward()
        grads[impl] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    worst = _worst(grads["eager"], grads["selfattn"])
    print(f"{family}: worst grad diff / largest {worst:.2e}")
    assert worst <= 1e-5


@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_weights_and_output_pass_gradcheck(dropout):
    # float64 gradcheck of (output, weights) in q, k, v and the sinks, through a causal, left-padded HFMask
    # with softcap and GQA (the dropout path reseeds so every evaluation draws the same mask)
    import transformers.masking_utils as tm

    am = torch.ones(2, 4, dtype=torch.bool)
    am[0, :2] = False
    hf_mask = sa_hf.build_mask(batch_size=2, q_length=4, q_offset=0, kv_length=4, kv_offset=0,
                               mask_function=tm.causal_mask_function, attention_mask=am)
    fn = sa_hf.make_attention_function("auto")
    module = torch.nn.Module()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 4, 2, dtype=torch.float64, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 1, 4, 2, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    sinks = torch.randn(2, dtype=torch.float64, generator=g, requires_grad=True)

    def f(q, k, v, sinks):
        torch.manual_seed(3)
        out, w = fn(module, q, k, v, hf_mask, dropout=dropout, scaling=0.7, softcap=2.0, s_aux=sinks, output_attentions=True)
        return out, w

    assert torch.autograd.gradcheck(f, (q, k, v, sinks))


def test_random_attention_calls_equal_a_float64_softmax():
    # the attention function itself, seeded sweep in float64: GQA groups 1-3, odd head dims, windows, left
    # padding, softcap, sinks, scaling; output, weights and the gradients of a loss on both (q, k, v, sinks)
    # against the softmax written out (transformers' eager runs its softmax in float32, so not it), on rows
    # with a key to see
    import random

    import transformers.masking_utils as tm

    rng = random.Random(1)
    g = torch.Generator().manual_seed(1)
    module = torch.nn.Module()
    for _ in range(40):
        b, hkv, groups = rng.randint(1, 2), rng.randint(1, 2), rng.randint(1, 3)
        hq, d, lk = hkv * groups, rng.choice([4, 5, 8]), rng.randint(1, 12)
        lq = rng.randint(1, lk)
        am = torch.ones(b, lk, dtype=torch.bool)
        if rng.random() < 0.5:
            am[0, :rng.randint(0, lk - 1)] = False
        fn, local = rng.choice([(tm.causal_mask_function, None), (tm.sliding_window_causal_mask_function(3), 3),
                                (tm.bidirectional_mask_function, None)])
        kw = dict(batch_size=b, q_length=lq, q_offset=lk - lq, kv_length=lk, kv_offset=0, mask_function=fn,
                  attention_mask=am, local_size=local)
        hf_mask = sa_hf.build_mask(**kw)
        allowed = tm.sdpa_mask(**{**kw, "allow_is_causal_skip": False, "allow_is_bidirectional_skip": False})
        allowed = allowed.expand(b, 1, lq, lk)
        softcap, scaling = rng.choice([None, 2.0]), rng.choice([None, 0.3])
        q = torch.randn(b, hq, lq, d, dtype=torch.float64, generator=g, requires_grad=True)
        k, v = (torch.randn(b, hkv, lk, d, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
        sinks = torch.randn(hq, dtype=torch.float64, generator=g, requires_grad=True) if rng.random() < 0.5 else None

        s = (q @ k.repeat_interleave(groups, 1).transpose(-1, -2)) * (scaling or d ** -0.5)  # (B, Hq, Lq, Lk)
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        s = s.masked_fill(~allowed, torch.finfo(torch.float64).min)  # finite: no NaN from rows with no key
        if sinks is not None:
            s = torch.cat([s, sinks.view(1, -1, 1, 1).expand(b, hq, lq, 1)], -1)
        w_ref = torch.softmax(s, -1)[..., :lk]
        out_ref = (w_ref @ v.repeat_interleave(groups, 1)).transpose(1, 2)  # (B, Lq, Hq, D)

        fn_sa = sa_hf.make_attention_function(rng.choice(["auto", "math"]))
        out, w = fn_sa(module, q, k, v, hf_mask, scaling=scaling, softcap=softcap, s_aux=sinks, output_attentions=True)
        rows = allowed.any(-1)  # (B, 1, Lq)
        keep_o, keep_w = rows[:, 0, :, None, None].double(), rows[..., None].double()
        assert (out - out_ref)[rows[:, 0]].abs().max() <= 1e-12 and (w - w_ref)[rows.expand(b, hq, lq)].abs().max() <= 1e-12
        go, gw = torch.randn(out.shape, dtype=torch.float64, generator=g), torch.randn(w.shape, dtype=torch.float64, generator=g)
        params = [t for t in (q, k, v, sinks) if t is not None]
        ref_grads = torch.autograd.grad((out_ref * go * keep_o).sum() + (w_ref * gw * keep_w).sum(), params)
        grads = torch.autograd.grad((out * go * keep_o).sum() + (w * gw * keep_w).sum(), params)
        for r, got in zip(ref_grads, grads):
            assert (r - got).abs().max() <= 1e-12, (hf_mask, softcap, scaling, sinks is not None)


def test_dropout_under_gradient_checkpointing_recomputes_the_same_mask():
    ids, am = _batch("right")
    labels = ids.masked_fill(am == 0, -100)
    runs = []
    for checkpointing in (False, True):
        model = _model("llama", "selfattn", dropout=0.3)
        if checkpointing:
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        torch.manual_seed(7)
        runs.append(_grads(model, input_ids=ids, attention_mask=am, labels=labels, use_cache=False))
    assert runs[0][0] == runs[1][0] and _worst(runs[0][1], runs[1][1]) == 0


# -- what selfattn cannot serve -----------------------------------------------------------------

def test_t5_relative_bias_is_refused_by_name():
    model = _model("t5", "selfattn")
    ids, am = _batch("none")
    with pytest.raises(NotImplementedError, match="'position_bias'.*T5Attention.*eager"):
        model(input_ids=ids, attention_mask=am, decoder_input_ids=ids)


def test_a_model_that_bypasses_the_attention_interface_fails_clearly():
    # BLOOM accepts attn_implementation="selfattn" but computes attention itself (ALiBi, its own softmax),
    # adding transformers' mask to its scores: the mask it gets from selfattn must say why it cannot serve
    cfg = transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="selfattn")
    ids, am = _batch("left")
    with pytest.raises(TypeError, match="'bloom' model.*AttentionInterface.*eager"):
        model(input_ids=ids, attention_mask=am)


def test_a_model_that_reads_the_mask_as_a_tensor_fails_clearly():
    # DeepSeek-V3.2 calls AttentionInterface, but its sparse-attention indexer reads the 4-D mask first
    cfg = transformers.DeepseekV32Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
        index_topk=4, index_n_heads=2, index_head_dim=16, first_k_dense_replace=1, max_position_embeddings=64)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="selfattn")
    ids, _ = _batch("none")
    with pytest.raises(TypeError, match="'deepseek_v32' model.*indexing.*reads or edits the mask.*eager"):
        model(input_ids=ids)


@pytest.mark.parametrize("name", ["indices", "block_indices", "sinks"])
def test_sparse_indices_and_per_query_sinks_are_refused_by_name(name):
    # implementations other than eager and sdpa get a sparse indexer's chosen keys only as `indices`
    # (their mask allows every key): ignoring them would compute dense attention instead
    fn = sa_hf.make_attention_function("auto")
    q = torch.randn(1, 2, 3, 4)
    module = type("DeepseekV32Attention", (torch.nn.Module,), {})()
    with pytest.raises(NotImplementedError, match=f"'{name}'.*DeepseekV32Attention"):
        fn(module, q, q, q, None, **{name: torch.zeros(1, 3, 2, dtype=torch.int32)})


# -- registration -------------------------------------------------------------------------------

def test_save_load_and_switching(tmp_path):
    model = _model("gemma2", "selfattn")
    ids, am = _batch("left")
    real = am.bool()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=am).logits
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="selfattn").eval()
    assert loaded.config._attn_implementation == "selfattn"
    sa_hf.reset_mask_counts()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=am).logits, ref)
        assert sa_hf.mask_counts() == {"causal": 1, "sliding_window": 1}
        for impl in ("eager", "selfattn", "eager", "selfattn"):
            _switch(loaded, impl)
            got = loaded(input_ids=ids, attention_mask=am).logits
            assert (got - ref)[real].abs().max() <= 1e-5
            assert bool(sa_hf.mask_counts()) == (impl == "selfattn")
    # the name set on a config (transformers does not write it to config.json: a plain reload takes its default)
    cfg = transformers.AutoConfig.from_pretrained(tmp_path, attn_implementation="selfattn")
    again = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    again.load_state_dict(loaded.state_dict())
    assert again.config._attn_implementation == "selfattn"
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation != "selfattn"
    sa_hf.reset_mask_counts()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, attention_mask=am).logits, ref)
    assert sa_hf.mask_counts() == {"causal": 1, "sliding_window": 1}
    # an encoder-decoder switched with the dict form reaches every attention
    bart = _model("bart")
    bart.set_attn_implementation({"": "selfattn"})
    kw, _ = _inputs("bart")
    sa_hf.reset_mask_counts()
    with torch.no_grad():
        bart(**kw)
    assert sa_hf.mask_counts() == {"bidirectional": 2, "causal": 1}


@pytest.mark.parametrize("name", ["flash_attention_4", "paged|eager", "eager", "kernels-community/flash-attn", "paged|selfattn"])
def test_register_refuses_names_transformers_owns_or_parses(name):
    # transformers' own implementations (registering over them would replace them for every model in the
    # process), hub kernel names ("org/repo") and the "paged|" prefix, which transformers parses away
    from transformers import AttentionInterface

    before = AttentionInterface._global_mapping.get(name)
    with pytest.raises(ValueError, match=f"register: {name!r}"):
        sa_hf.register(name)
    assert AttentionInterface._global_mapping.get(name) is before


def test_register_again_replaces_selfattns_own_name():
    from transformers import AttentionInterface

    try:
        sa_hf.register("selfattn", backend="math")
        assert AttentionInterface()["selfattn"].__name__ == "selfattn_attention_math"
    finally:
        sa_hf.register("selfattn")
    assert AttentionInterface()["selfattn"].__name__ == "selfattn_attention_auto"

