"""Deterministic token embeddings for `selfattn explain` on any text.

Each distinct token string gets one vector of ``dim`` independent standard-normal entries,
drawn from a generator seeded by a hash of (seed, token). So the same token always gets the
same vector -- within a text, across texts and across runs and machines -- and ``--seed``
picks another set. With unit-variance entries ``|x|^2`` is about ``dim``, so with W = I a
token's score with itself is about ``dim`` before scaling: the diagonal the notes' example
shows, and what ``--no-scale`` lets grow out of hand.
"""

from __future__ import annotations

import hashlib

import torch


def token_vector(token: str, dim: int, seed: int = 0) -> torch.Tensor:
    digest = hashlib.sha256(f"{seed}\0{token}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.randn(dim, generator=g, dtype=torch.float64)  # (dim,)


def embed(tokens, dim: int, seed: int = 0) -> torch.Tensor:
    """(L, dim) float64 embeddings, one deterministic vector per distinct token string."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    cache = {}
    rows = [cache.setdefault(t, token_vector(t, dim, seed)) for t in tokens]
    return torch.stack(rows) if rows else torch.zeros(0, dim, dtype=torch.float64)  # (L, dim)
