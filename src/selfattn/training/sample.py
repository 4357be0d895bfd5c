"""Generation with the KV cache: the prompt goes through the model once (prefill), then one token per step.

Each layer keeps its keys and values in a :class:`selfattn.KVCache`; because causal masks
align bottom-right, a new token's query attends to every cached position, and RoPE positions
continue after the cached ones, so each step costs one token's work instead of a full pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import checkpoint as _checkpoint
from ..explain.tokenize import TOKENIZERS


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
             seed: int = 0, backend: str = "auto", on_token=None) -> list:
    """Continue ``prompt_ids`` (a list of ints, at least one) by ``max_new_tokens`` tokens; returns the new ids.

    ``temperature`` 0 picks the most likely token (greedy); otherwise tokens are drawn from
    softmax(logits / temperature), restricted to the ``top_k`` most likely when given.
    ``on_token(id)`` is called with each new id as soon as it is drawn (to stream the output).
    """
    if not prompt_ids:
        raise ValueError("prompt: at least one token is needed to start generating")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (0 <= temperature < math.inf):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    vocab = model.config.vocab_size
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
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
            # shifted by the largest logit first: a tiny temperature gives 0 and -inf (greedy), not inf - inf = nan
            # (in float64: a float32 division by a temperature below float32's range would be by 0)
            logits = (logits.double() - logits.max()) / temperature
            if top_k is not None and top_k < vocab:
                # exactly k tokens, ties broken as argmax breaks them (lowest id): a threshold at the k-th value
                # kept every tied token, so top_k 1 was not greedy where logits tie
                keep = torch.sort(logits, descending=True, stable=True).indices[:top_k]
                logits = torch.full_like(logits, float("-inf")).index_copy_(0, keep, logits[keep])
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        new.append(nxt)
        if on_token is not None:
            on_token(nxt)
        x = torch.tensor([[nxt]], dtype=torch.int64, device=device)  # (1, 1) one new token per step
    return new


@dataclass
class SampleJob:
    """A checked sampling request: the model, the prompt as tokens and ids, ready to :meth:`run`."""

    model: torch.nn.Module
    vocab: list  # token strings, index = id
    tokenizer: str  # "words" or "chars"
    prompt: str  # the prompt as the model sees it (tokens joined back)
    ids: list  # the prompt's token ids
    backend: str = "auto"

    @property
    def sep(self) -> str:
        return " " if self.tokenizer == "words" else ""

    def run(self, max_new_tokens: int, *, temperature: float = 1.0, top_k=None, seed: int = 0, on_text=None) -> str:
        """Generate; returns the continuation as text. ``on_text(piece)`` gets each token's text as it comes."""
        first = [True]

        def emit(i: int) -> None:
            piece = self.vocab[i] if first[0] else self.sep + self.vocab[i]  # the caller puts a marker before the first
            first[0] = False
            on_text(piece)

        new = generate(self.model, self.ids, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                       backend=self.backend, on_token=emit if on_text is not None else None)
        words = [self.vocab[i] for i in new]
        return (self.sep + self.sep.join(words)) if words and self.sep else "".join(words)


def prepare(path, prompt: str | None, *, backend: str = "auto") -> SampleJob:
    """Load a checkpoint written by ``selfattn train`` and check the prompt against its vocabulary."""
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
    sep = " " if ckpt.tokenizer == "words" else ""
    return SampleJob(model, list(ckpt.vocab), ckpt.tokenizer, sep.join(tokens), [index[t] for t in tokens], backend)


def sample_text(path, prompt: str | None, *, max_new_tokens: int = 40, temperature: float = 1.0, top_k=None,
                seed: int = 0, backend: str = "auto", on_text=None) -> tuple:
    """(prompt, continuation) as text, from a checkpoint written by ``selfattn train``."""
    job = prepare(path, prompt, backend=backend)
    new = job.run(max_new_tokens, temperature=temperature, top_k=top_k, seed=seed, on_text=on_text)
    return job.prompt, new
