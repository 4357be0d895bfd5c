"""Context parallelism for ``selfattn train --context-parallel N``: one sequence split over N processes.

The world of W processes is cut into W / N context-parallel (cp) groups of N consecutive ranks;
ranks with the same place in their cp group form a data-parallel (dp) group (W = 8, N = 2)::

    cp groups:  {0 1} {2 3} {4 5} {6 7}        each holds one share of the global batch
    dp groups:  {0 2 4 6} {1 3 5 7}            each holds one shard of every sequence

A cp group takes rows ``dp_rank * b ... (dp_rank + 1) * b - 1`` of the global batch, and each of
its ranks keeps its shard of every sequence in the balanced layout (chunks r and 2N-1-r of 2N:
every rank has the same causal work; :mod:`selfattn.distributed`). Tokens keep their global
positions: RoPE rotates each query and key by its position in the whole sequence, and attention
is :func:`selfattn.distributed.ring_attention` over the cp group, so the model computes exactly
what one process computes on the whole sequence. Everything else in the model acts on one token
at a time and needs no communication.

Gradients: each rank's loss is the sum over its own scored positions divided by the global
count, so the global loss is the sum over all ranks. Ring attention's backward returns every
key/value gradient to the rank that owns the token, so a parameter's gradient is the sum over
all ranks of their local gradients: one all-reduce (sum) over the world, i.e. over the cp group
and the dp group together.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..distributed import _global_index, ring_attention
from ..layers import apply_rope, rope_cos_sin

LAYOUT = "balanced"


class ContextParallel:
    """This rank's place in the cp x dp grid and its cp process group."""

    def __init__(self, size: int, rank: int, world: int, timeout_s: float | None = None):
        if world % size:
            raise ValueError(f"context_parallel: {size} processes per sequence must divide the number of processes "
                             f"({world}); start a multiple of {size} processes, or choose a divisor of {world}")
        self.size, self.world = size, world  # processes per sequence, all processes
        self.cp_rank, self.dp_rank = rank % size, rank // size  # place in the cp group, index of the cp group
        self.dp_size = world // size
        self.timeout_s = timeout_s
        self.group = None  # the cp process group, from join()

    def join(self) -> "ContextParallel":
        """Create the cp process groups (every rank creates every group, in the same order) and keep ours."""
        if self.size == self.world:
            self.group = dist.group.WORLD
        else:
            for g in range(self.dp_size):
                grp = dist.new_group(list(range(g * self.size, (g + 1) * self.size)))
                if g == self.dp_rank:
                    self.group = grp
        return self

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """This cp group's rows of a global batch (every rank of the group takes the same rows)."""
        if t.shape[0] % self.dp_size:
            raise ValueError(f"batch: the global batch of {t.shape[0]} sequences does not split evenly over "
                             f"{self.dp_size} data-parallel groups")
        b = t.shape[0] // self.dp_size
        return t[self.dp_rank * b:(self.dp_rank + 1) * b]

    def split_rows(self, t: torch.Tensor) -> torch.Tensor:
        """A near-even share of rows for evaluation, per cp group (shares may differ by one row)."""
        n = t.shape[0]
        return t[self.dp_rank * n // self.dp_size:(self.dp_rank + 1) * n // self.dp_size]

    def index(self, length: int, device=None) -> torch.Tensor:
        """int64 (length / size,): global positions of this rank's tokens of a sequence of ``length``."""
        if length % (2 * self.size):
            raise ValueError(f"context_parallel: the sequence length {length} must be divisible by 2 x {self.size} = "
                             f"{2 * self.size} (the balanced layout cuts it into 2 chunks per process)")
        return _global_index(length // self.size, LAYOUT, self.cp_rank, self.size, device)

    def shard(self, t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Columns ``positions`` (from :meth:`index`) of a (B, L) batch."""
        return t[:, positions.to(t.device)]


def _attention(attn, x, positions, cp: ContextParallel, backend: str, return_stats: bool):
    """``Block.attn(x, causal=True)`` of a :class:`selfattn.layers.MultiHeadAttention`, on a shard.

    x: (B, n, E) this rank's tokens; positions: (n,) their global positions.
    """
    B, n, _ = x.shape
    if attn.qk_norm or not attn.rope:
        raise ValueError("context parallelism supports the training model's attention (RoPE, no QK-norm)")
    q = attn._heads(x, attn.q_proj, attn.num_heads)  # (B, Hq, n, Dh)
    k = attn._heads(x, attn.k_proj, attn.num_kv_heads)  # (B, Hkv, n, Dh)
    v = attn._heads(x, attn.v_proj, attn.num_kv_heads)  # (B, Hkv, n, Dh)
    cos, sin = rope_cos_sin(positions, attn.head_dim, attn.rope_base, q.dtype)  # (n, Dh) at global positions
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (B, Hq, n, Dh), (B, Hkv, n, Dh)
    res = ring_attention(q, k, v, group=cp.group, causal=True, layout=LAYOUT, return_stats=return_stats,
                         backend=backend, timeout=cp.timeout_s)
    o, stats = res if return_stats else (res, None)  # (B, Hq, n, Dh)
    return attn.out_proj(o.transpose(1, 2).reshape(B, n, attn.embed_dim)), stats  # (B, n, E)


def forward(model, ids: torch.Tensor, positions: torch.Tensor, cp: ContextParallel, *, backend: str = "auto",
            return_stats: bool = False):
    """The :class:`selfattn.model.Transformer`'s forward on this rank's shard of each sequence.

    ids: (B, n) the tokens at global ``positions`` (n,). Returns logits (B, n, vocab) or
    ``(logits, stats)`` with one :class:`selfattn.AttentionStats` (B, H, n) per layer.
    """
    x = model.embed(ids)  # (B, n, dim)
    stats = []
    for block in model.blocks:
        a, st = _attention(block.attn, block.norm1(x), positions, cp, backend, return_stats)
        x = x + a  # (B, n, dim)
        x = x + block.mlp(block.norm2(x))  # (B, n, dim)
        stats.append(st)
    logits = model.head(model.norm(x))  # (B, n, vocab)
    return (logits, stats) if return_stats else logits


def all_reduce_grads(params, world_size: int) -> None:
    """Sum every parameter's gradient over all processes (one flat buffer, one all-reduce)."""
    if world_size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])  # (n_params,)
    dist.all_reduce(flat)
    i = 0
    for p, g in zip(params, grads):
        p.grad = flat[i:i + g.numel()].view_as(p).clone() if p.grad is None else p.grad.copy_(flat[i:i + g.numel()].view_as(p))
        i += g.numel()
