"""selfattn: scaled dot-product self-attention you can read, run fast, and look inside."""

from . import backends, checkpoint, masks, monitor, reference
from .explain import ExplainTrace, ModelTrace, explain
from .backends import BackendUnavailable, use_backend
from .functional import attention, attention_probs
from .layers import KVCache, MultiHeadAttention, SelfAttention
from .monitor import observe
from .stats import AttentionStats

__version__ = "0.1.0"

__all__ = [
    "attention",
    "attention_probs",
    "AttentionStats",
    "BackendUnavailable",
    "ExplainTrace",
    "ModelTrace",
    "explain",
    "checkpoint",
    "backends",
    "masks",
    "monitor",
    "observe",
    "reference",
    "use_backend",
    "SelfAttention",
    "MultiHeadAttention",
    "KVCache",
]
