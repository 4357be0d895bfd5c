"""Generation with the KV cache computes what full forward passes compute."""

from __future__ import annotations

import copy

import pytest
import torch

from selfattn.model import Transformer, TransformerConfig
from selfattn.training import generate

from tolerance import assert_close


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = Transformer(TransformerConfig(vocab_size=11, dim=32, n_layers=2, n_heads=2, context=40)).double().eval()
    return m


def _greedy_without_cache(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids]))  # (1, L, V) the whole sequence again
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("backend", ["math", "cpu"])
def test_cached_greedy_equals_full_recompute(model, backend):
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    cached = generate(model, prompt, 20, temperature=0, backend=backend)
    full = _greedy_without_cache(model, prompt, 20)
    assert cached == full


def test_cached_logits_match_the_full_forward(model):
    # STYLE.md rule 6: float32 decoding with the cache vs the float64 full forward, within 2x the
    # float32 full forward's own error
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3]])
    m32 = copy.deepcopy(model).float()
    with torch.no_grad():
        full64, full32 = model(ids), m32(ids)  # (1, 10, V) each
        caches = m32.new_kv_caches(1)
        parts = [m32(ids[:, :4], kv_caches=caches)] + [m32(ids[:, i:i + 1], kv_caches=caches) for i in range(4, 10)]
    assert_close("cached logits", torch.cat(parts, dim=1), full64, full32)


def test_sampling_is_seeded_and_respects_top_k(model):
    prompt = [1, 2, 3]
    a = generate(model, prompt, 15, temperature=1.0, seed=7)
    b = generate(model, prompt, 15, temperature=1.0, seed=7)
    assert a == b
    # top_k=1 is greedy whatever the temperature
    assert generate(model, prompt, 15, temperature=2.0, top_k=1, seed=1) == generate(model, prompt, 15, temperature=0)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [], 3)
