"""Training works: small models built from the layers learn tasks that need attention.

Each task is learned with attention and fails, in the same step budget, when attention is
masked to the current token only (``window=0``), so attention is what does the work.
"""

import pytest
import torch
from torch import nn

import selfattn

VOCAB, SEQ, WIDTH = 16, 10, 64


@pytest.fixture(autouse=True)
def _one_thread_sdpa():
    # tiny matrices: one thread is as fast, and the CI machine has two cores shared by workers.
    # The backend is pinned so the cost does not depend on which fused backends are registered
    # (backends are held to the reference elsewhere; here the question is whether training works)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with selfattn.use_backend("sdpa"):
        yield
    torch.set_num_threads(n)


def induction_batch(n, gen):
    """SEQ distinct tokens, then a repeat of one of them (not the last); target: the token that followed it."""
    seq = torch.rand(n, VOCAB, generator=gen).argsort(-1)[:, :SEQ]  # (n, SEQ)
    pick = torch.randint(0, SEQ - 1, (n,), generator=gen)  # (n,)
    query = seq.gather(1, pick[:, None])  # (n, 1)
    target = seq.gather(1, (pick + 1)[:, None])[:, 0]  # (n,)
    return torch.cat([seq, query], dim=1), target  # (n, SEQ + 1), (n,)


class InductionModel(nn.Module):
    # two causal attention layers with RoPE: a previous-token head, then an induction head
    def __init__(self, window):
        super().__init__()
        self.window = window
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.layers = nn.ModuleList(selfattn.MultiHeadAttention(WIDTH, 4, num_kv_heads=2, rope=True) for _ in range(2))
        self.readout = nn.Sequential(nn.LayerNorm(WIDTH), nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(), nn.Linear(2 * WIDTH, VOCAB))

    def forward(self, tokens):
        h = self.embed(tokens)  # (B, L, E)
        for attn in self.layers:
            h = h + attn(h, causal=True, window=self.window)  # (B, L, E)
        return self.readout(h[:, -1])  # (B, VOCAB)


def recall_batch(n, gen, pairs=8):
    """(key, value) pairs as single positions, then a query key; target: its value."""
    keys = torch.rand(n, VOCAB, generator=gen).argsort(-1)[:, :pairs]  # (n, P) distinct keys
    vals = torch.randint(0, VOCAB, (n, pairs), generator=gen)  # (n, P)
    pick = torch.randint(0, pairs, (n,), generator=gen)
    query = keys.gather(1, pick[:, None])  # (n, 1)
    target = vals.gather(1, pick[:, None])[:, 0]  # (n,)
    no_value = torch.full((n, 1), VOCAB)  # the query position carries no value
    return (torch.cat([keys, query], 1), torch.cat([vals, no_value], 1)), target


class RecallModel(nn.Module):
    # the notes' single head: one SelfAttention layer between embeddings and a readout
    def __init__(self, window):
        super().__init__()
        self.window = window
        self.key_embed = nn.Embedding(VOCAB, WIDTH)
        self.value_embed = nn.Embedding(VOCAB + 1, WIDTH)
        self.attn = selfattn.SelfAttention(WIDTH, qk_dim=32)
        self.readout = nn.Sequential(nn.LayerNorm(WIDTH), nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(), nn.Linear(2 * WIDTH, VOCAB))

    def forward(self, inputs):
        k, v = inputs
        h = self.key_embed(k) + self.value_embed(v)  # (B, L, E)
        h = h + self.attn(h, causal=True, window=self.window)  # (B, L, E)
        return self.readout(h[:, -1])  # (B, VOCAB)


def train(model, make_batch, *, max_steps, target_acc, seed):
    """Adam on fresh batches; every 50 steps, accuracy on a fixed held-out set. Returns (accuracy, steps)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    held_in, held_y = make_batch(1000, torch.Generator().manual_seed(seed + 2))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    acc = 0.0
    for step in range(1, max_steps + 1):
        x, y = make_batch(64, gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            with torch.no_grad():
                acc = (model(held_in).argmax(-1) == held_y).float().mean().item()
            if acc >= target_acc:
                return acc, step
    return acc, max_steps


@pytest.mark.parametrize("task", ["induction", "recall"])
def test_attention_learns_the_task_and_current_token_only_cannot(task):
    make_model, make_batch, budget = {
        "induction": (InductionModel, induction_batch, 400),
        "recall": (RecallModel, recall_batch, 200),
    }[task]
    torch.manual_seed(0)
    acc, steps = train(make_model(window=None), make_batch, max_steps=budget, target_acc=0.95, seed=0)
    print(f"{task}: attention reached accuracy {acc:.3f} after {steps} steps")
    assert acc >= 0.95, f"{task}: accuracy {acc:.3f} after {steps} steps"

    # the same model and budget, each token attending to itself only: near chance (1/15 or 1/16)
    torch.manual_seed(0)
    acc0, _ = train(make_model(window=0), make_batch, max_steps=budget, target_acc=2.0, seed=0)
    print(f"{task}: current-token-only attention: accuracy {acc0:.3f} after {budget} steps")
    assert acc0 <= 0.15, f"{task}: without attention to other tokens accuracy reached {acc0:.3f}"
