"""Look inside attention: a step-by-step trace of a run, as terminal tables, heatmaps, HTML, JSON."""

from __future__ import annotations

import math

import torch

from .capture import AttentionCall, capture_attention
from .embed import embed
from .tokenize import characters, tokenize
from .trace import (FULL_MATRIX_MAX_TOKENS, MAX_TOKENS, ExplainTrace, LayerTrace, ModelTrace, compare_with_notes,
                    default_rows, heads_of_call, long_head, notes_example, parse_rows, run)

__all__ = [
    "explain", "ExplainTrace", "ModelTrace", "LayerTrace", "compare_with_notes", "notes_example", "run",
    "tokenize", "characters", "embed", "capture_attention", "AttentionCall", "FULL_MATRIX_MAX_TOKENS", "MAX_TOKENS",
]

DEFAULT_DIM = 8

WINDOW_MAX = 2**63 - 1  # the largest window the masks' int64 distances hold


def explain(
    text: str | None = None,
    *,
    dim: int | None = None,
    seed: int | None = None,
    init: str | None = None,
    qk_dim: int | None = None,
    v_dim: int | None = None,
    causal: bool = False,
    window: int | None = None,
    scale: bool = True,
    rows=None,
    checkpoint=None,
    layers=None,
):
    """Run self-attention on some text and record every step.

    With no ``text`` (and no checkpoint): the notes' worked example ("The cat sat",
    W_Q = W_K = W_V = I, d_k = 4); ``causal``, ``window`` and ``scale`` still apply.

    Args:
        text: the input; split by :func:`selfattn.explain.tokenize` (words and single
            punctuation marks, whitespace dropped). At most ``MAX_TOKENS`` tokens.
        dim: embedding width (default 8); each token gets a deterministic vector
            (:func:`selfattn.explain.embed`).
        seed: picks the embeddings and the "default" initialisation (default 0).
        init: "identity" (W = I as in the notes; the default when the widths allow) or
            "default" (``SelfAttention``'s standard initialisation).
        qk_dim, v_dim: widths of queries/keys and of values/output (default ``dim``).
        causal: each token attends only to itself and earlier tokens.
        window: each token attends only to keys at most ``window`` positions away (before
            it, and after it too unless ``causal``).
        scale: False skips the division by sqrt(d_k) -- what the notes warn about.
        rows: query rows to pick out (ints, or a string like "0,5-7,-1"); for input longer
            than ``FULL_MATRIX_MAX_TOKENS`` only these rows' weights are computed (default
            first, middle and last).
        checkpoint: a checkpoint directory (:mod:`selfattn.checkpoint`); the model runs on
            ``text`` and every attention layer and head is traced.
        layers: with a checkpoint, the attention layers to trace (indices in call order, or a
            string like "0,3-5,-1"; default all).

    Returns:
        :class:`ExplainTrace` (one head), or :class:`ModelTrace` (every layer and head) for a
        checkpoint. Both have ``to_html()``, ``plot()``, ``to_dict()`` and ``render()``.

    Example:
        >>> tr = explain("The cat sat on the mat.", causal=True)
        >>> tr.weights  # (7, 7)
        >>> tr.to_html("report.html"); tr.plot("weights.png")
    """
    for name, flag in (("causal", causal), ("scale", scale)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__} ({flag!r})")
    # a window is an int64 distance in the masks; 2**63 - 1 is already "every key"
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or not 0 <= window <= WINDOW_MAX):
        raise ValueError(f"window must be a non-negative int no larger than {WINDOW_MAX:,}, got {window!r}")
    win = None if window is None else (window, 0 if causal else window)
    scale_value = None if scale else 1.0
    if checkpoint is not None:
        given = [n for n, v in (("dim", dim), ("seed", seed), ("init", init), ("qk_dim", qk_dim), ("v_dim", v_dim),
                                ("window", window)) if v is not None] + (["causal"] if causal else []) + ([] if scale else ["no-scale"])
        if given:
            raise ValueError(f"{', '.join(given)} cannot be combined with a checkpoint: the checkpoint's model decides its own "
                             "embeddings, widths and masks")
        return _explain_checkpoint(text, checkpoint, rows, layers)
    if layers is not None:
        raise ValueError("layers picks from a model's attention layers: give a checkpoint")
    if text is None:
        given = [n for n, v in (("dim", dim), ("seed", seed), ("init", init), ("qk_dim", qk_dim), ("v_dim", v_dim)) if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} needs a text: the notes' example has fixed 4-wide embeddings and W = I")
        tr = notes_example(causal=causal, window=win, scale=scale_value)
        if rows is not None:
            picked = parse_rows(rows, len(tr.tokens))
            tr.rows, tr.row_weights = picked, tr.weights[picked]
        return tr
    tokens = _tokens(text, tokenize)
    dim = DEFAULT_DIM if dim is None else dim
    seed = 0 if seed is None else seed
    x = embed(tokens, dim, seed)  # (L, dim)
    if init is None:
        init = "identity" if (qk_dim in (None, dim) and v_dim in (None, dim)) else "default"
    layer = _layer(dim, qk_dim, v_dim, init, seed)
    opts = {"init": init, "dim": dim, "seed": seed, "qk_dim": layer.qk_dim, "v_dim": layer.v_dim, "scaled": scale}
    picked = parse_rows(rows, len(tokens))
    if len(tokens) <= FULL_MATRIX_MAX_TOKENS:
        return run(tokens, x, layer.W_Q.detach(), layer.W_K.detach(), layer.W_V.detach(), causal=causal, window=win,
                   scale=scale_value, options=opts, rows=picked or None)
    # long input: the SelfAttention layer itself runs (statistics on), rows come from attention_probs
    with capture_attention(layer) as calls, torch.no_grad():
        layer(x.to(torch.float32), causal=causal, window=win, scale=scale_value)
    c = calls[0]
    # the embeddings this run used (float32): with W = I the Q table then equals them digit for digit
    pre = {"embeddings": x.to(torch.float32).to(torch.float64), "W_Q": layer.W_Q.detach().double(), "W_K": layer.W_K.detach().double(), "W_V": layer.W_V.detach().double()}
    notes = {"embeddings": "one fixed vector per token, from the embedding layer",
             "W_Q": "learned matrix that turns embeddings into queries", "W_K": "learned matrix that turns embeddings into keys",
             "W_V": "learned matrix that turns embeddings into values; its width sets the output width"}
    used = 1.0 / math.sqrt(layer.qk_dim) if scale else 1.0
    return long_head(tokens, c.query, c.key, c.value, c.output, c.stats, 0, c.options, picked or default_rows(len(tokens)),
                     pre, notes, used, dict(opts, causal=causal, window=win))


def _tokens(text, tokenizer) -> list:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    tokens = tokenizer(text)
    if not tokens:
        raise ValueError(f"the text {text!r} has no tokens (tokens are words and punctuation marks; whitespace is dropped)")
    if len(tokens) > MAX_TOKENS:
        raise ValueError(f"the text has {len(tokens)} tokens; selfattn explain takes at most {MAX_TOKENS} "
                         f"(full matrices are shown up to {FULL_MATRIX_MAX_TOKENS}, statistics and chosen rows beyond)")
    return tokens


def _layer(dim, qk_dim, v_dim, init, seed):
    from ..layers import SelfAttention

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SelfAttention(dim, qk_dim, v_dim, init=init)


def _explain_checkpoint(text, path, rows, pick=None) -> ModelTrace:
    from .. import checkpoint as _ckpt
    from .tokenize import TOKENIZERS

    ckpt = _ckpt.load(path)
    if text is None:
        raise ValueError("a checkpoint needs a TEXT to run its model on")
    tokens = _tokens(text, TOKENIZERS[ckpt.tokenizer])
    if ckpt.vocab is None:
        raise _ckpt.CheckpointError(f"{ckpt.path / _ckpt.CONFIG_FILE} has no 'vocab': cannot turn text into token ids")
    index = {t: i for i, t in enumerate(ckpt.vocab)}
    unknown = sorted({t for t in tokens if t not in index})
    if unknown:
        raise ValueError(f"tokens not in the checkpoint's vocabulary ({len(ckpt.vocab)} tokens, {ckpt.tokenizer} tokenizer): "
                         f"{unknown[:20]}; known tokens include {ckpt.vocab[:20]}")
    model = ckpt.build()
    ids = torch.tensor([[index[t] for t in tokens]])  # (1, L)
    with capture_attention(model) as calls, torch.no_grad():
        try:
            result = model(ids)
        except (RuntimeError, ValueError, IndexError) as e:
            raise ValueError(f"the checkpoint's model failed on this input of {len(tokens)} tokens: {e}") from None
    if not calls:
        raise ValueError(f"the checkpoint's model ({ckpt.model_config.get('type')}) made no selfattn attention calls: nothing to show")
    picked = parse_rows(rows, len(tokens)) or default_rows(len(tokens))
    options = {"checkpoint": str(ckpt.path), "model": ckpt.model_config.get("type"), "tokenizer": ckpt.tokenizer}
    layers = []
    chosen = set(range(len(calls)))
    if pick is not None:
        from .hf import parse_layers

        chosen = set(parse_layers(pick, len(calls)))
    for i, c in enumerate(calls):
        if i not in chosen:
            continue
        name = c.layer or f"call {i}"
        opts = dict(options, causal=bool(c.options.get("causal")), window=c.options.get("window"))
        layers.append(LayerTrace(name, c.kind, heads_of_call(tokens, c, picked, opts, prefix=f"{name} "), i))
    lm = ckpt.model_config.get("type") == "transformer"  # its output is next-token logits
    return ModelTrace(tokens, layers, options, _predictions(result, ckpt.vocab) if lm else [])


def _predictions(result, vocab) -> list:
    """Per position, the TOP_PREDICTIONS most likely next tokens and their probabilities -- when the
    model's output is next-token logits over the checkpoint's vocabulary (else [])."""
    from .trace import TOP_PREDICTIONS

    logits = result[0] if isinstance(result, tuple) else result
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[-1] != len(vocab) or logits.shape[0] != 1:
        return []
    probs = torch.softmax(logits[0].to(torch.float64), dim=-1)  # (L, V)
    top = torch.topk(probs, min(TOP_PREDICTIONS, len(vocab)), dim=-1)
    return [[(vocab[int(j)], float(p)) for p, j in zip(ps, js)] for ps, js in zip(top.values, top.indices)]
