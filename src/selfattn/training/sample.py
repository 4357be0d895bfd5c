"""Generation with the KV cache: the prompt goes through the model once (prefill), then one token per step.

Each layer keeps its keys and values in a :class:`selfattn.KVCache`; because causal masks
align bottom-right, a new token's query attends to every cached position, and RoPE positions
continue after the cached ones, so each step costs one token's work instead of a full pass.
"""

from __future__ import annotations

import torch

from .. import checkpoint as _checkpoint
from ..explain.tokenize import TOKENIZERS


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
             seed: int = 0, backend: str = "auto") -> list:
    """Continue ``prompt_ids`` (a list of ints, at least one) by ``max_new_tokens`` tokens; returns the new ids.

    ``temperature`` 0 picks the most likely token (greedy); otherwise tokens are drawn from
    softmax(logits / temperature), restricted to the ``top_k`` most likely when given.
    """
    if not prompt_ids:
        raise ValueError("prompt: at least one token is needed to start generating")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    vocab = model.config.vocab_size
    if top_k is not None and not 1 <= top_k:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    model.eval()
    device = model.head.weight.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    caches = model.new_kv_caches(1, capacity=len(prompt_ids) + max_new_tokens)
    x = torch.tensor([prompt_ids], dtype=torch.int64, device=device)  # (1, Lp) the prompt: prefill
    new = []
    for _ in range(max_new_tokens):
        logits = model(x, backend=backend, kv_caches=caches)[0, -1].float().cpu()  # (V,) next-token logits
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k is not None and top_k < vocab:
                kth = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        new.append(nxt)
        x = torch.tensor([[nxt]], dtype=torch.int64, device=device)  # (1, 1) one new token per step
    return new


def sample_text(path, prompt: str | None, *, max_new_tokens: int = 40, temperature: float = 1.0, top_k=None,
                seed: int = 0, backend: str = "auto") -> tuple:
    """(prompt, continuation) as text, from a checkpoint written by ``selfattn train``."""
    ckpt = _checkpoint.load(path)
    if ckpt.vocab is None:
        raise _checkpoint.CheckpointError(f"{ckpt.path / _checkpoint.CONFIG_FILE} has no 'vocab': cannot turn text into token ids")
    model = ckpt.build()
    if not hasattr(model, "new_kv_caches"):
        raise _checkpoint.CheckpointError(f"{ckpt.path}: model type {ckpt.model_config.get('type')!r} cannot generate "
                                          "(selfattn sample needs a checkpoint written by selfattn train)")
    if prompt is None:
        training = ckpt.config.get("training") if isinstance(ckpt.config.get("training"), dict) else {}
        prompt = training.get("example") or ckpt.vocab[0]
    tokens = TOKENIZERS[ckpt.tokenizer](prompt)
    index = {t: i for i, t in enumerate(ckpt.vocab)}
    unknown = sorted({t for t in tokens if t not in index})
    if unknown:
        raise ValueError(f"prompt: tokens not in the checkpoint's vocabulary ({len(ckpt.vocab)} tokens, {ckpt.tokenizer} "
                         f"tokenizer): {unknown[:20]}; known tokens include {ckpt.vocab[:20]}")
    if not tokens:
        raise ValueError(f"prompt: {prompt!r} has no tokens")
    new = generate(model, [index[t] for t in tokens], max_new_tokens, temperature=temperature, top_k=top_k,
                   seed=seed, backend=backend)
    sep = " " if ckpt.tokenizer == "words" else ""
    words = [ckpt.vocab[i] for i in new]
    return sep.join(tokens), (sep + sep.join(words)) if words and sep else "".join(words)
