"""A small decoder-only transformer built from the library's layers.

    token ids -> embedding -> n_layers x Block -> final norm -> linear head -> logits

    Block:  x = x + MultiHeadAttention(norm1(x), causal, RoPE)
            x = x + MLP(norm2(x))                       MLP = Linear -> GELU -> Linear

Positions come only from rotary embeddings inside the attention layers (no learned position
table), so the model runs on any length up to ``context`` and decodes with a KV cache.
Attention goes through :func:`selfattn.attention`, so ``backend=`` picks any registered
backend and ``return_stats=True`` hands back each layer's per-head statistics from the same
forward pass.

The model registers itself with :mod:`selfattn.checkpoint` as ``"transformer"``: a checkpoint
written by ``selfattn train`` rebuilds it with ``selfattn.checkpoint.load(path).build()``.
:class:`AttentionStack` (type ``"attention-stack"``) is the plainer model: an embedding and a
stack of attention layers, nothing else.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import checkpoint as _checkpoint
from .layers import KVCache, MultiHeadAttention, RMSNorm, SelfAttention

__all__ = ["TransformerConfig", "Transformer", "Block", "MLP", "AttentionStack"]

NORMS = ("rms", "layer")


@dataclass
class TransformerConfig:
    vocab_size: int  # number of token ids
    dim: int = 64  # width of the residual stream (embedding width)
    n_layers: int = 2  # number of blocks
    n_heads: int = 4  # attention heads per block; head_dim = dim // n_heads (must be even for RoPE)
    mlp_ratio: int = 4  # the MLP's hidden width is mlp_ratio * dim
    norm: str = "rms"  # "rms" (RMSNorm) or "layer" (LayerNorm), applied before attention and MLP
    context: int = 128  # longest sequence the model is meant for (KV cache capacity when sampling)
    rope_base: float = 10000.0  # RoPE base frequency

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "mlp_ratio", "context"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head_dim = dim // n_heads = {self.dim} // {self.n_heads} = {self.dim // self.n_heads} must be even (RoPE)")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")


def _check_ids(ids, vocab_size: int) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        got = f"shape {tuple(ids.shape)}, dtype {ids.dtype}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"ids must be an integer tensor of shape (B, L), got {got}")
    # a data check: skipped while torch.compile traces (as the backends' data checks are)
    if ids.numel() and not torch.compiler.is_compiling() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"ids must lie in [0, {vocab_size}), got values in [{int(ids.min())}, {int(ids.max())}]")


def _norm(cfg: TransformerConfig) -> nn.Module:
    return RMSNorm(cfg.dim) if cfg.norm == "rms" else nn.LayerNorm(cfg.dim)


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.up = nn.Linear(cfg.dim, cfg.mlp_ratio * cfg.dim)
        self.act = nn.GELU()
        self.down = nn.Linear(cfg.mlp_ratio * cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))  # (B, L, dim)


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.norm1 = _norm(cfg)
        self.attn = MultiHeadAttention(cfg.dim, cfg.n_heads, bias=False, rope=True, rope_base=cfg.rope_base)
        self.norm2 = _norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, *, backend="auto", return_stats=False, need_weights=False, kv_cache=None):
        res = self.attn(self.norm1(x), causal=True, backend=backend, return_stats=return_stats,
                        need_weights=need_weights, average_attn_weights=False, kv_cache=kv_cache)
        res = res if isinstance(res, tuple) else (res,)
        a, extra = res[0], res[1:]  # a: (B, L, dim); extra: weights (B, H, L, Lk) and/or stats
        x = x + a  # (B, L, dim)
        x = x + self.mlp(self.norm2(x))  # (B, L, dim)
        return x, extra


class Transformer(nn.Module):
    """Decoder-only transformer: ``logits = model(ids)``.

    Args:
        config: a :class:`TransformerConfig` (or its fields as keyword arguments).

    ``forward(ids, *, backend="auto", return_stats=False, need_weights=False, kv_caches=None)``:
        ids (B, L) int64 -> logits (B, L, vocab_size). With ``return_stats`` also a list (one
        per layer) of :class:`selfattn.AttentionStats`, each field (B, n_heads, L); with
        ``need_weights`` a list of attention weights (B, n_heads, L, Lk) per layer (detached,
        from the saved log-sum-exp). Returns ``logits``, ``(logits, stats)``,
        ``(logits, weights)`` or ``(logits, weights, stats)``. ``kv_caches`` (from
        :meth:`new_kv_caches`) appends this call's keys and values to each layer's cache,
        positions continuing after the cached ones.

    Example:
        >>> model = Transformer(TransformerConfig(vocab_size=32))
        >>> logits, stats = model(torch.randint(0, 32, (8, 64)), return_stats=True)
        >>> stats[1].entropy.shape  # (8, 4, 64): layer 1, every head and query
    """

    def __init__(self, config: TransformerConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = TransformerConfig(**kwargs)
        elif kwargs:
            raise TypeError(f"give a TransformerConfig or keyword arguments, not both (got {sorted(kwargs)})")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = _norm(config)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=1.0)  # unit-size token vectors: token identity stays visible in the residual stream
        nn.init.normal_(self.head.weight, std=0.02)

    def checkpoint_config(self) -> dict:
        """The ``model`` entry of a checkpoint's config.json for this model."""
        return {"type": "transformer", "module": __name__, **asdict(self.config)}

    def new_kv_caches(self, batch_size: int, capacity: int | None = None) -> list:
        """One empty :class:`selfattn.KVCache` per layer, for incremental decoding."""
        cap = self.config.context if capacity is None else capacity
        p = self.head.weight
        return [KVCache(batch_size, b.attn.num_kv_heads, cap, b.attn.head_dim, dtype=p.dtype, device=p.device)
                for b in self.blocks]

    def forward(self, ids: torch.Tensor, *, backend: str = "auto", return_stats: bool = False,
                need_weights: bool = False, kv_caches: list | None = None):
        _check_ids(ids, self.config.vocab_size)
        if kv_caches is not None and len(kv_caches) != len(self.blocks):
            raise ValueError(f"kv_caches must hold one KVCache per layer ({len(self.blocks)}), got {len(kv_caches)}")
        x = self.embed(ids)  # (B, L, dim)
        weights, stats = [], []
        for i, block in enumerate(self.blocks):
            x, extra = block(x, backend=backend, return_stats=return_stats, need_weights=need_weights,
                             kv_cache=None if kv_caches is None else kv_caches[i])
            if need_weights:
                weights.append(extra[0])  # (B, H, L, Lk)
            if return_stats:
                stats.append(extra[-1])  # AttentionStats, each (B, H, L)
        logits = self.head(self.norm(x))  # (B, L, vocab_size)
        out = (logits,) + ((weights,) if need_weights else ()) + ((stats,) if return_stats else ())
        return out if len(out) > 1 else logits


@_checkpoint.register_model("transformer")
def _build(**config) -> Transformer:
    return Transformer(TransformerConfig(**config))


# -- a plain stack of attention layers (checkpoint type "attention-stack") -------------------


class AttentionStack(nn.Module):
    """Token ids -> embedding -> attention layers (each ``SelfAttention`` or ``MultiHeadAttention``).

    Args:
        vocab_size: number of token ids.
        embed_dim: embedding width E.
        layers: one dict per layer: ``{"type": "SelfAttention", ...SelfAttention kwargs}``
            or ``{"type": "MultiHeadAttention", "num_heads": H, ...kwargs}``.
        causal: every layer attends causally.
        residual: ``x = x + layer(x)`` (needs each layer's output width to be E).
    """

    def __init__(self, vocab_size: int, embed_dim: int, layers: list, *, causal: bool = False, residual: bool = False):
        super().__init__()
        kinds = {"SelfAttention": SelfAttention, "MultiHeadAttention": MultiHeadAttention}
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.layers = nn.ModuleList()
        for i, spec in enumerate(layers):
            spec = dict(spec)
            kind = spec.pop("type", None)
            if kind not in kinds:
                raise ValueError(f"layers[{i}]['type'] must be one of {sorted(kinds)}, got {kind!r}")
            if kind == "SelfAttention":
                layer = SelfAttention(embed_dim, **spec)
                if residual and layer.v_dim != embed_dim:
                    raise ValueError(f"layers[{i}]: residual=True adds each layer's output to its input, so v_dim must "
                                     f"equal embed_dim; got v_dim={layer.v_dim}, embed_dim={embed_dim}")
            else:
                layer = MultiHeadAttention(embed_dim, **spec)
            self.layers.append(layer)
        self.causal, self.residual = bool(causal), bool(residual)
        self.vocab_size = vocab_size
        self.config = {"type": "attention-stack", "vocab_size": vocab_size, "embed_dim": embed_dim,
                       "layers": [dict(s) for s in layers], "causal": self.causal, "residual": self.residual}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        _check_ids(ids, self.vocab_size)
        x = self.embedding(ids)  # (B, L, E)
        for layer in self.layers:
            y = layer(x, causal=self.causal)  # (B, L, E or v_dim)
            x = x + y if self.residual else y
        return x


_checkpoint.register_model("attention-stack")(AttentionStack)
