"""selfattn inside Hugging Face transformers models: ``attn_implementation="selfattn"``.

    import selfattn.integrations.transformers as sa_hf
    sa_hf.register()                                   # once per process
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="selfattn")
    model.set_attn_implementation("selfattn")          # or switch a loaded model

:func:`register` puts two functions into transformers' registries under one name:

* a **mask builder** (``AttentionMaskInterface``). transformers calls it once per forward and
  mask kind with the query positions, the key count and offset, its index-based mask
  function and the 2-D padding mask. It returns a :class:`HFMask`: the mask as selfattn's
  structured values (positions, causal, a window, ``key_padding``, ``documents`` for packed
  sequences), shared by every layer. Registering an attention function alone is not enough:
  transformers then builds no mask at all, and left-padded batches come out wrong.
* an **attention function** (``AttentionInterface``) that calls :func:`selfattn.attention`
  with that mask, the module's scaling, softcap (Gemma 2) and sinks (``s_aux``, gpt-oss), key
  and value heads as they are (grouped-query attention without repeating them), and returns
  exact weights from :func:`selfattn.attention_probs` when ``output_attentions`` is asked for.

How a mask is recognised, without reading transformers' private closures: transformers'
``causal_mask_function`` and ``bidirectional_mask_function`` (public names) are taken as they
are; any other mask function is compared, exactly, with a few structured candidates (causal,
causal with the ``local_size`` window, bidirectional window, packed sequences whose boundaries
are read off the function along the diagonal) by evaluating both on every (query, key) pair a
block of rows at a time (never the whole L x L at once; the function once per block, whatever
the number of candidates). That is L x L work, ~1-3 s at 16k tokens, so the answer is
remembered: transformers makes a new function object every forward, so the memory keys on what
a function computes -- its code and the values it captured (numbers, strings, tensors by value,
nested functions), with the batch size, query and key positions and ``local_size`` -- and a
later forward's function with the same key costs a hash of those values
(:func:`recognition_counts`). A function capturing anything else (a dict, an object) is
evaluated every time; masks under 65,536 pairs are not remembered. What matches none goes to
selfattn as ``masks.function`` (tiles evaluated once, only partial tiles' bits kept). A function
that fails on broadcast indices, and every function transformers marks for ``torch.vmap`` (a model's
``or_mask_function``/``and_mask_function``: Gemma 3's image blocks, EmbeddingGemma's bidirectional
window), go as transformers' own dense mask, not recognised. :func:`mask_counts` reports how many
masks took each route; ``"dense"`` counts every L x L mask built or received.

Not served, and refused by name: ``position_bias`` (T5-style relative bias tensors), ``head_mask``,
sparse attention's ``indices``/``block_indices`` and per-query ``sinks``. Models whose attention
does not call ``AttentionInterface`` (BLOOM), or that read the mask as a tensor first (DeepSeek-V3.2's
indexer), still accept ``attn_implementation="selfattn"`` from transformers; the :class:`HFMask`
they then receive says so (``TypeError``, ``AttributeError``) as soon as the model uses it as a
tensor. The one tensor use it serves is slicing query rows (``mask[:, :, -n:, :]``, Gemma 4's
KV-sharing layers). :func:`register` refuses the names transformers owns or parses.

Sinks whose model applies them after the softmax (Granite SWA scales the output by
``sigmoid(lse - sink)``) give the same output; its eager weights are the softmax without the
sink, selfattn's (as gpt-oss's eager) leave the sink's share out of each row.

Weights (``output_attentions``) are exact and differentiable as eager's are (a loss on them gets the
softmax's gradient, sinks included). Under attention dropout they are, as eager's, the weights after
dropout, and the output is made from them (eager's random draws under the same seed).

Query rows with no key to see (the padded queries of a left-padded batch) give 0, as ``sdpa``;
transformers' ``eager`` gives them the mean of every value instead. Only the loss of a left-padded
batch sees the difference (the last pad position predicts the first real token), so a training step
there matches ``sdpa``'s, and ``eager``'s once those predictions are left out.

Under ``torch.autocast`` the attention function casts query, key and value to the autocast dtype, as
eager's matmuls and torch's sdpa do (RoPE and q/k norms hand over float32 queries and keys with
bfloat16 values), and runs selfattn with autocast off. A caller's float 4-D mask keeps its dtype
(added in the accumulation dtype, as eager's float32 promotion: a float32 ``finfo.min`` rounded to
bfloat16 would be -inf). Under ``torch.inference_mode()`` the masks' tensors are made as normal tensors
(selfattn's mask caches key on version counters, which inference tensors lack).

Versions: transformers 4.56 (the first with both interfaces) to 5.x. On 4.x, models that build
their own attention classes instead of calling ``AttentionInterface`` (BERT) cannot use any
registered implementation, and GPT-2 keeps ``output_attentions`` from the attention function:
set ``model.config.output_attentions = True`` there to get weights.

Positions follow transformers: query i sits at ``cache_position[i]`` (``q_offset + i``), key j
at ``kv_offset + j``. With a static cache the key count is the cache size; unused slots lie
after every query position, so the causal test rules them out.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from dataclasses import dataclass, field

import torch

from .. import masks as _masks
from ..functional import attention, attention_probs

# refused by name: selfattn has no such input (other keyword arguments transformers passes to every
# implementation, such as position_ids or cache_position, are carried by the mask and positions).
# indices / block_indices: the keys a sparse-attention indexer chose (DeepSeek-V3.2, MiniMax-M3), handed
# only to implementations other than eager and sdpa, whose masks then allow every key; sinks: per-query sink
# logits (B, H, Lq, 1), not gpt-oss's per-head s_aux that selfattn serves
_UNSUPPORTED = ("position_bias", "head_mask", "layer_head_mask", "alibi", "indices", "block_indices", "sinks")

_counts = collections.Counter()
_lock = threading.Lock()


def mask_counts() -> dict:
    """How many masks took each route since the last :func:`reset_mask_counts`.

    Keys: ``causal``, ``sliding_window``, ``bidirectional``, ``packed`` (structured: no L x L
    tensor), ``function`` (selfattn's tile-wise function mask), ``dense`` (an L x L tensor:
    built here for a function that needs ``torch.vmap``, or handed to the attention function
    by a model that builds its own masks; counted per call).
    """
    with _lock:
        return dict(_counts)


def reset_mask_counts() -> None:
    """Zero :func:`mask_counts` and :func:`recognition_counts`, and forget every remembered mask function."""
    with _lock:
        _counts.clear()
        _recognition.clear()
        _recognised.clear()


def _count(kind: str) -> None:
    with _lock:
        _counts[kind] += 1


@dataclass(eq=False)
class HFMask:
    """The mask transformers hands to the attention function when ``attn_implementation="selfattn"``.

    It says which (query, key) pairs may attend for the whole batch, as selfattn's arguments:
    ``selfattn.attention(q, k, v, **hf_mask.kwargs())``. ``shape`` is that of the equivalent
    dense mask, (B, 1, Lq, Lk), for code that only looks at sizes, and ``mask[:, :, rows, :]``
    slices query rows as the dense mask would (Gemma 4's KV-sharing layers keep the last rows);
    any other tensor use raises a ``TypeError`` that says selfattn cannot serve the model.
    """

    kind: str  # causal | sliding_window | bidirectional | packed | function | dense
    batch: int
    q_positions: torch.Tensor  # int64 (Lq,): position of each query (cache_position)
    kv_positions: torch.Tensor  # int64 (Lk,): kv_offset + arange(Lk)
    causal: bool = False
    window: tuple | None = None  # (left, right), None = unbounded on that side
    mask: _masks.Mask | None = None  # key padding, documents, function or dense parts, AND-ed
    model_type: str = ""  # config.model_type of the model that asked for it (named in errors)
    _kwargs: dict | None = field(default=None, repr=False)  # selfattn.attention's arguments, made once

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.batch, 1, self.q_positions.numel(), self.kv_positions.numel()))

    @property
    def ndim(self) -> int:
        return 4

    def dim(self) -> int:
        return 4

    @property
    def device(self) -> torch.device:
        return self.q_positions.device

    # A model whose attention does not go through AttentionInterface (BLOOM, Falcon's own classes)
    # accepts attn_implementation="selfattn" and then treats the mask as a tensor (adds it to its
    # scores, slices it): say so, instead of "unsupported operand type(s) for +: 'Tensor' and 'HFMask'".
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        model_type = next((a.model_type for a in (*args, *(kwargs or {}).values()) if isinstance(a, HFMask)), "")
        raise TypeError(_bypass_message(model_type, getattr(func, "__name__", str(func))))

    def __getitem__(self, index):
        """``mask[:, :, rows, :]`` (or ``mask[..., rows, :]``) for a slice of query rows: the mask of those
        queries, as transformers' dense mask sliced so (Gemma 4's KV-sharing layers keep only the last rows).
        Any other index is refused."""
        rows = self._row_slice(index)
        if rows is None:
            raise TypeError(_bypass_message(self.model_type, "indexing"))
        with _normal_tensors():
            idx = torch.arange(self.q_positions.numel(), device=self.q_positions.device)[rows]  # (Lq',) old row of each
            parts = [_part_rows(p, idx, self.q_positions.numel(), self.kv_positions.numel()) for p in _masks.parts(self.mask)]
            q_positions = self.q_positions[idx]
        if any(p is None for p in parts):
            raise TypeError(_bypass_message(self.model_type, "indexing"))
        return HFMask(self.kind, self.batch, q_positions, self.kv_positions, causal=self.causal,
                      window=self.window, mask=_and(parts), model_type=self.model_type)

    def _row_slice(self, index):
        """The slice of query rows ``index`` selects with every other dim whole, or None."""
        index = index if isinstance(index, tuple) else (index,)
        if sum(i is Ellipsis for i in index) > 1:
            return None
        if Ellipsis in index:
            at = index.index(Ellipsis)
            index = index[:at] + (slice(None),) * (4 - len(index) + 1) + index[at + 1:]
        index = index + (slice(None),) * (4 - len(index))
        if len(index) != 4 or not all(isinstance(i, slice) for i in index):
            return None
        whole = [range(*i.indices(n)) == range(n) for i, n in zip(index, self.shape)]
        return index[2] if whole[0] and whole[1] and whole[3] else None

    def __getattr__(self, name):  # only for names the mask lacks: mask.dtype, mask.to(...), mask.masked_fill(...)
        if name.startswith("__") or name in ("model_type", "_kwargs"):
            raise AttributeError(name)
        raise AttributeError(f"'HFMask' has no attribute {name!r}. " + _bypass_message(self.model_type, f"attribute {name!r}"))

    def _as_operand(self, *_):  # tensor + mask: Tensor.__add__ gives up, Python asks the mask (__radd__)
        raise TypeError(_bypass_message(self.model_type, "arithmetic"))

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _as_operand
    __and__ = __rand__ = __or__ = __ror__ = __invert__ = __neg__ = _as_operand

    def kwargs(self) -> dict:
        """selfattn.attention's mask arguments. Every part of the mask depends on position
        differences or on indices only, so positions are counted from the first key; they are
        left out where they equal selfattn's defaults (queries at the end of the keys: no cache,
        or a dynamic one), which keeps every backend, and the fastest, able to serve the call."""
        if self._kwargs is None:
            lq, lk = self.q_positions.numel(), self.kv_positions.numel()
            call = dict(mask=self.mask, causal=self.causal, window=self.window)
            if lk:
                q = self.q_positions - self.kv_positions[0]  # (Lq,): keys then sit at arange(Lk)
                if not torch.equal(q, torch.arange(lk - lq, lk, device=q.device)):
                    call["q_positions"] = q
            self._kwargs = call
        return dict(self._kwargs)

    def __repr__(self):
        return (f"HFMask({self.kind}, B={self.batch}, Lq={self.q_positions.numel()}, Lk={self.kv_positions.numel()}, "
                f"causal={self.causal}, window={self.window}, mask={self.mask!r})")


def _part_rows(part, idx, lq, lk):
    """One part of an HFMask's mask for the query rows ``idx`` (old row of each new one), or None."""
    if isinstance(part, _masks.KeyPadding) or (isinstance(part, _masks.Padding) and part.q_lengths is None):
        return part  # keys only
    if isinstance(part, _masks.Documents):
        q_ids = part.kv_ids[:, lk - lq:] if part.q_ids is None else part.q_ids  # (B|1, Lq)
        return _masks.documents(part.kv_ids, q_ids[:, idx.to(q_ids.device)])
    if isinstance(part, _masks.Dense):
        t = part.t4()  # (B|1, H|1, Lq|1, Lk|1)
        return part if t.shape[2] == 1 else _masks.dense(t[:, :, idx.to(t.device)])
    if isinstance(part, _masks.Function):
        fn = part.fn

        def rows_of(b, h, q_idx, kv_idx):
            return fn(b, h, idx.to(q_idx.device)[q_idx.long()], kv_idx)

        rows_of.__name__ = getattr(fn, "__name__", "mask_function")
        return _masks.function(rows_of)
    return None


def _bypass_message(model_type: str, op: str) -> str:
    model = f"this {model_type!r} model" if model_type else "this model"
    return (f"attn_implementation='selfattn': {model} used its attention mask as a tensor ({op}); selfattn's mask is a "
            "structured value that only its attention function reads, so it cannot serve a model that computes attention "
            "itself instead of calling transformers' AttentionInterface, or reads or edits the mask first (transformers "
            "accepts the name all the same); load it with attn_implementation='eager' or 'sdpa'")


# -- the mask builder ---------------------------------------------------------------------------

def _positions(kwargs, device):
    """(q_positions (Lq,), kv_positions (Lk,)) from either transformers signature."""
    kv_length, kv_offset = int(kwargs["kv_length"]), kwargs.get("kv_offset", 0) or 0
    cache_position = kwargs.get("cache_position")
    if cache_position is not None:  # transformers 4.x: the query positions themselves
        q_pos = cache_position.to(device=device, dtype=torch.long).reshape(-1)
    else:  # 5.x: q_length and q_offset (an int, or a 0-d tensor for static caches)
        q_off = kwargs.get("q_offset", 0)
        q_off = q_off.to(device) if isinstance(q_off, torch.Tensor) else int(q_off)
        q_pos = torch.arange(int(kwargs["q_length"]), device=device, dtype=torch.long) + q_off
    if isinstance(kv_offset, torch.Tensor):
        kv_offset = kv_offset.to(device)
    kv_pos = torch.arange(kv_length, device=device, dtype=torch.long) + kv_offset
    return q_pos, kv_pos


def _keep(attention_mask, kv_pos, batch):
    """(B, Lk) bool key padding, or None when every key is real. Keys past the 2-D mask are padding."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"selfattn mask builder: expected a 2-D padding mask (B, keys), got shape {tuple(attention_mask.shape)}")
    am = attention_mask.to(device=kv_pos.device, dtype=torch.bool)
    idx = kv_pos.clamp(min=0)
    inside = kv_pos < am.shape[1]
    keep = am[:, idx.clamp(max=max(am.shape[1] - 1, 0))] & inside  # (B, Lk)
    if keep.shape[0] != batch:
        keep = keep.expand(batch, -1)
    if bool(keep.all()):
        return None
    return keep


def _padding_mask(keep):
    """Right padding (every row a run of real keys, then padding) as ``masks.padding(lengths)``,
    which every backend lowers; any other pattern as ``masks.key_padding(keep)``."""
    lengths = keep.sum(dim=1)  # (B,)
    prefix = torch.arange(keep.shape[1], device=keep.device)[None, :] < lengths[:, None]  # (B, Lk)
    if torch.equal(prefix, keep):
        return _masks.padding(lengths)
    return _masks.key_padding(keep)


def _candidate(q_pos, kv_pos, causal, window, seg_q, seg_k, b_rows, r0, r1):
    """bool (B|1, 1, r1 - r0, Lk): a structured candidate on rows r0:r1, in transformers' index terms."""
    q = q_pos[r0:r1].view(1, 1, -1, 1)
    k = kv_pos.view(1, 1, 1, -1)
    conds = []  # each (1|B, 1, r, Lk); AND-ed in place into the first (no all-True tensor to start from)
    if causal:
        conds.append(lambda: k <= q)
    if window is not None:
        left, right = window
        if left is not None:
            conds.append(lambda: k >= q - left)
        if right is not None:
            conds.append(lambda: k <= q + right)
    if seg_q is not None:
        conds.append(lambda: seg_q[:, r0:r1].view(b_rows, 1, -1, 1) == seg_k.view(b_rows, 1, 1, -1))
    if not conds:
        return torch.ones((1, 1, 1, 1), dtype=torch.bool, device=q_pos.device).expand(1, 1, r1 - r0, kv_pos.numel())
    ok = conds[0]()
    for c in conds[1:]:
        part = c()
        ok = ok.logical_and_(part) if ok.shape == torch.broadcast_shapes(ok.shape, part.shape) else ok & part
    return ok


def _evaluate(fn, batch, q_pos, kv_pos, r0, r1):
    b = torch.arange(batch, device=q_pos.device).view(-1, 1, 1, 1)
    h = torch.zeros((1, 1, 1, 1), dtype=torch.long, device=q_pos.device)
    out = fn(b, h, q_pos[r0:r1].view(1, 1, -1, 1), kv_pos.view(1, 1, 1, -1))
    if not isinstance(out, torch.Tensor) or out.dtype != torch.bool:
        raise TypeError("not a bool tensor")
    return out


def _first_match(fn, batch, q_pos, kv_pos, candidates, seg=None):
    """The first of ``candidates`` [(kind, causal, window)] that ``fn`` equals on every (batch, query,
    key), or None. One pass over the rows, a block at a time (never L x L at once): ``fn`` is
    evaluated once per block and candidates drop out at their first difference."""
    lq, lk = q_pos.numel(), kv_pos.numel()
    step = max(1, (1 << 22) // max(1, lk * batch))
    b_rows = batch if seg is not None else 1
    alive = list(candidates)
    for r0 in range(0, lq, step):
        r1 = min(lq, r0 + step)
        got = _evaluate(fn, batch, q_pos, kv_pos, r0, r1)  # (B|1, 1, r, Lk)
        still = []
        for c in alive:
            want = _candidate(q_pos, kv_pos, c[1], c[2], seg, seg, b_rows, r0, r1)
            try:
                same = torch.equal(got, want) if got.shape == want.shape else torch.equal(*torch.broadcast_tensors(got, want))
            except RuntimeError:  # shapes that do not broadcast: not this candidate
                same = False
            if same:
                still.append(c)
        alive = still
        if not alive:
            return None
    return alive[0] if alive else None


def _packed_segments(fn, batch, q_pos, kv_pos):
    """Segment ids (B, L) read off a causal mask function: a new segment starts at query i when
    it may not see key i - 1. Only for square masks without a cache (how packing arrives)."""
    if q_pos.numel() != kv_pos.numel() or q_pos.numel() < 2 or not torch.equal(q_pos, kv_pos):
        return None
    dev = q_pos.device
    b = torch.arange(batch, device=dev).view(-1, 1, 1, 1)
    h = torch.zeros((1, 1, 1, 1), dtype=torch.long, device=dev)
    sees_prev = fn(b, h, q_pos[1:].view(1, 1, 1, -1), kv_pos[:-1].view(1, 1, 1, -1))  # (B|1, 1, 1, L-1)
    sees_prev = sees_prev.expand(batch, 1, 1, -1).reshape(batch, -1)
    if bool(sees_prev.all()):
        return None  # one segment: plain causal, tried already
    starts = torch.cat([torch.zeros((batch, 1), dtype=torch.long, device=dev), (~sees_prev).long()], dim=1)
    return starts.cumsum(dim=1)  # (B, L)


def _recognise(fn, batch, q_pos, kv_pos, local_size, transformers_masks):
    """(kind, causal, window, segments) for a mask function, or None when no candidate matches."""
    if fn is transformers_masks.causal_mask_function:
        return "causal", True, None, None
    if fn is getattr(transformers_masks, "bidirectional_mask_function", None):  # transformers 5 only
        return "bidirectional", False, None, None
    candidates = []
    if local_size is not None:
        # transformers' sliding window: kv > q - local_size (causal), |q - kv| <= local_size (bidirectional)
        candidates.append(("sliding_window", True, (int(local_size) - 1, 0)))
        candidates.append(("sliding_window", False, (int(local_size), int(local_size))))
    candidates += [("causal", True, None), ("bidirectional", False, None)]
    try:
        found = _first_match(fn, batch, q_pos, kv_pos, candidates)
        if found is not None:
            return found[0], found[1], found[2], None
        seg = _packed_segments(fn, batch, q_pos, kv_pos)
        if seg is not None:
            found = _first_match(fn, batch, q_pos, kv_pos, [c for c in candidates if c[1]], seg)
            if found is not None:
                return "packed", found[1], found[2], seg
    except Exception:  # a function written for torch.vmap only: no candidate can be checked
        return None
    return None


# -- remembering what a mask function was ---------------------------------------------------------
#
# Recognising a function exactly evaluates it on every (query, key) pair: ~1-3 s per forward at
# 16k tokens. transformers builds a new mask function object every forward (and_masks, the
# sliding-window closure), so the cache below keys on what the function computes instead of its
# identity: its code and the values it captured (closure cells, defaults), recursively -- two
# functions with the same code and the same captured numbers, strings and tensors (by value)
# give the same mask. A function capturing anything else is not cached (recognised every call).
# The key also holds the batch size, the query and key positions and local_size.

_CACHE_MIN_PAIRS = 1 << 16  # below this many (query, key) pairs recognising costs less than remembering
_CACHE_SIZE = 32
_TENSOR_FINGERPRINT_MAX = 1 << 20  # captured tensors larger than this (elements) are not hashed: no caching
_recognised: collections.OrderedDict = collections.OrderedDict()  # key -> route, least recently used first
_recognition = collections.Counter()  # "evaluated" (the function ran on every pair), "remembered" (cache hit)


def _tensor_digest(t: torch.Tensor):
    import hashlib

    flat = t.detach().reshape(-1).contiguous().cpu()
    raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return ("tensor", str(t.dtype), tuple(t.shape), t.device.type, hashlib.blake2b(raw, digest_size=16).hexdigest())


def _fingerprint(value, depth: int = 0):
    """A hashable stand-in for what ``value`` computes or holds, or None when it cannot be told."""
    import types

    if depth > 12:
        return None
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return (type(value).__name__, value)
    if isinstance(value, (tuple, list)):
        parts = tuple(_fingerprint(v, depth + 1) for v in value)
        return None if any(p is None for p in parts) else (type(value).__name__, parts)
    if isinstance(value, torch.Tensor):
        return _tensor_digest(value) if value.numel() <= _TENSOR_FINGERPRINT_MAX else None
    if isinstance(value, types.FunctionType):
        cells = []
        for cell in value.__closure__ or ():
            try:
                contents = cell.cell_contents
            except ValueError:  # an empty cell
                return None
            cells.append(contents)
        parts = _fingerprint((tuple(cells), value.__defaults__, tuple(sorted((value.__kwdefaults__ or {}).items()))), depth + 1)
        return None if parts is None else ("function", value.__code__, parts)
    return None


def _positions_key(pos: torch.Tensor):
    n = pos.numel()
    if n and bool((pos == pos[0] + torch.arange(n, device=pos.device)).all()):
        return ("arange", n, int(pos[0]))
    return _tensor_digest(pos)


def _route(fn, batch, q_pos, kv_pos, local_size, use_vmap, tm):
    """("structured", (kind, causal, window, segments)) | ("function", None) | ("dense", None), remembered
    per (what the function computes, batch, positions, local_size) for large masks."""
    key = None
    if q_pos.numel() * kv_pos.numel() >= _CACHE_MIN_PAIRS and fn is not tm.causal_mask_function:
        fp = _fingerprint(fn)
        if fp is not None:
            key = (fp, batch, _positions_key(q_pos), _positions_key(kv_pos), local_size, bool(use_vmap))
            with _lock:
                if key in _recognised:
                    _recognised.move_to_end(key)
                    _recognition["remembered"] += 1
                    return _recognised[key]
    found = None if use_vmap else _recognise(fn, batch, q_pos, kv_pos, local_size, tm)
    if found is not None:
        route = ("structured", found)
    elif not use_vmap and _index_based(fn, batch, q_pos, kv_pos):
        route = ("function", None)
    else:
        route = ("dense", None)
    with _lock:
        _recognition["evaluated"] += 1
        if key is not None:
            _recognised[key] = route
            while len(_recognised) > _CACHE_SIZE:
                _recognised.popitem(last=False)
    return route


def recognition_counts() -> dict:
    """How often a mask function was recognised by evaluating it (``"evaluated"``) and how often a
    function computing the same mask at the same positions was recognised before (``"remembered"``)."""
    with _lock:
        return dict(_recognition)


def _fn_by_index(fn, q_pos, kv_pos):
    """transformers' mask function (positions) as selfattn's masks.function (indices)."""

    def by_index(b, h, q_idx, kv_idx):
        return fn(b, torch.zeros_like(h), q_pos[q_idx], kv_pos[kv_idx])

    by_index.__name__ = f"transformers:{getattr(fn, '__name__', 'mask_function')}"
    return by_index


def _index_based(fn, batch, q_pos, kv_pos) -> bool:
    try:
        r = min(q_pos.numel(), 4)
        _evaluate(fn, batch, q_pos, kv_pos, 0, r)
        return True
    except Exception:
        return False


def _normal_tensors():
    """A context in which new tensors are normal ones: under torch.inference_mode() they would be inference
    tensors, which keep no version counter, and selfattn's mask caches key on it (a mask's tensors only)."""
    return torch.inference_mode(False) if torch.is_inference_mode_enabled() else contextlib.nullcontext()


def build_mask(batch_size: int, **kwargs) -> HFMask | None:
    """transformers' mask-interface entry point (``AttentionMaskInterface``): see the module docstring."""
    with _normal_tensors():
        return _build_mask(batch_size, **kwargs)


def _build_mask(batch_size: int, **kwargs) -> HFMask | None:
    import transformers.masking_utils as tm

    attention_mask = kwargs.get("attention_mask")
    if isinstance(attention_mask, HFMask):
        # built already (generate prepares the mask of a static cache before the forward): as
        # transformers returns a ready 4-D mask unchanged
        return attention_mask
    device = kwargs.get("device")
    if device is None:
        cp = kwargs.get("cache_position")
        device = attention_mask.device if attention_mask is not None else (cp.device if cp is not None else "cpu")
    q_pos, kv_pos = _positions(kwargs, torch.device(device))
    model_type = str(getattr(kwargs.get("config"), "model_type", "") or "")
    fn = kwargs.get("mask_function", tm.causal_mask_function)
    keep = _keep(attention_mask, kv_pos, batch_size)
    route, found = _route(fn, batch_size, q_pos, kv_pos, kwargs.get("local_size"), kwargs.get("use_vmap", False), tm)
    parts = [] if keep is None else [_padding_mask(keep)]
    if route == "structured":
        kind, causal, window, seg = found
        if seg is not None:
            parts.append(_masks.documents(seg))
        _count(kind)
        return HFMask(kind, batch_size, q_pos, kv_pos, causal=causal, window=window, mask=_and(parts), model_type=model_type)
    if route == "function":
        _count("function")
        parts.append(_masks.function(_fn_by_index(fn, q_pos, kv_pos)))
        return HFMask("function", batch_size, q_pos, kv_pos, mask=_and(parts), model_type=model_type)
    # only transformers can evaluate it (vmap): its own dense boolean mask, counted
    dense = tm.sdpa_mask(batch_size=batch_size, **{**kwargs, "allow_is_causal_skip": False,
                                                    "allow_is_bidirectional_skip": False})
    _count("dense")
    return HFMask("dense", batch_size, q_pos, kv_pos, mask=_masks.dense(dense.to(torch.bool)), model_type=model_type)


def _and(parts):
    if not parts:
        return None
    m = parts[0]
    for p in parts[1:]:
        m = m & p
    return m


# -- the attention function ---------------------------------------------------------------------

def _wants_weights(module, kwargs) -> bool:
    """Whether the caller asked for attention weights (they cost Lq x Lk memory, so only then)."""
    if kwargs.get("output_attentions"):
        return True
    config = getattr(module, "config", None)
    if getattr(config, "output_attentions", False):
        return True
    # models that keep output_attentions to themselves (GPT-2) still record weights through
    # transformers' output collector, whose active keys say what this forward collects
    try:
        from transformers.utils.output_capturing import _active_collector

        active = _active_collector.get()
    except (ImportError, LookupError):  # older transformers, or no collector in this forward
        return False
    return isinstance(active, dict) and "attentions" in active


def _weights(query, key, stats, call, scaling, softcap, sinks):
    """Exact weights (B, Hq, Lq, Lk), differentiable as a softmax is (``attention_probs`` puts the
    normaliser's part of the gradient back itself, sinks included)."""
    return attention_probs(query, key, stats, scale=scaling, softcap=softcap, sinks=sinks, **call)


def make_attention_function(backend: str = "auto"):
    """The ``AttentionInterface`` function for one backend (``register`` calls this)."""

    def selfattn_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                           softcap=None, s_aux=None, **kwargs):
        for name in _UNSUPPORTED:
            if kwargs.get(name) is not None:
                raise NotImplementedError(
                    f"attn_implementation='selfattn' cannot serve the argument {name!r} that "
                    f"{type(module).__name__} passes (selfattn has no {name}); use attn_implementation='eager' for this model")
        device_type = query.device.type
        if torch.is_autocast_enabled(device_type):
            # as eager's matmuls and torch's sdpa under autocast: the autocast dtype for all three (RoPE and q/k
            # norms hand over float32 queries and keys with bfloat16 values); then selfattn's own precision
            # rules, autocast off (it would round selfattn's float32 steps and a float32 mask to bfloat16)
            dtype = torch.get_autocast_dtype(device_type)
            with torch.autocast(device_type, enabled=False):
                return selfattn_attention(module, query.to(dtype), key.to(dtype), value.to(dtype), attention_mask,
                                          dropout=dropout, scaling=scaling, softcap=softcap, s_aux=s_aux, **kwargs)
        if isinstance(attention_mask, HFMask):
            call = attention_mask.kwargs()
        elif attention_mask is None:
            # as transformers' sdpa: causal only for more than one query and a causal module
            is_causal = kwargs.get("is_causal")
            is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
            lq = query.shape[2]
            call = dict(causal=bool(is_causal and lq > 1))
            if call["causal"] and lq != key.shape[2]:
                call["q_positions"] = torch.arange(lq, device=query.device)  # top-left, as torch's is_causal
        elif isinstance(attention_mask, torch.Tensor):
            # a model that builds its own (B|1, 1|H, Lq, Lk) mask: bool = may attend, float = added, in its own
            # dtype (selfattn adds it in the accumulation dtype, as eager's float32 promotion does: a float32
            # finfo.min rounded to bfloat16 would be -inf, and a row all at it empty instead of eager's mean)
            _count("dense")
            m = attention_mask
            if m.is_inference():
                with _normal_tensors():  # a normal copy of a mask made under torch.inference_mode()
                    m = m.clone()
            call = dict(mask=_masks.dense(m))
        else:
            raise TypeError(f"attn_implementation='selfattn': unexpected attention_mask of type {type(attention_mask).__name__} "
                            "(register() installs the mask builder that makes HFMask values; was it replaced?)")
        sinks = None
        if s_aux is not None:
            sinks = s_aux.reshape(-1)
        want_weights = _wants_weights(module, kwargs)
        dropout_p = float(dropout or 0.0)
        if not want_weights:
            # statistics only for the weights: without them a call can take the short paths (decoding steps:
            # the row kernel) and any backend (torch SDPA has none); a Monitor's observers still get them
            out = attention(query, key, value, scale=scaling, softcap=softcap, sinks=sinks, dropout_p=dropout_p,
                            return_stats=False, backend=backend, **call)
            return out.transpose(1, 2).contiguous(), None  # (B, Lq, Hq, Dv)
        out, stats = attention(query, key, value, scale=scaling, softcap=softcap, sinks=sinks,
                               dropout_p=0.0, return_stats=True, backend=backend, **call)
        weights = _weights(query, key, stats, call, scaling, softcap, sinks).to(value.dtype)  # (B, Hq, Lq, Lk)
        if dropout_p:
            # as eager: the weights returned are the ones applied, dropout included (the same random draws
            # as eager's under the same seed), so the output is made from them (the L x L weights exist anyway)
            weights = torch.nn.functional.dropout(weights, p=dropout_p, training=True)
            groups = query.shape[1] // value.shape[1]
            out = weights @ value.repeat_interleave(groups, dim=1)  # (B, Hq, Lq, Dv)
        return out.transpose(1, 2).contiguous(), weights  # (B, Lq, Hq, Dv), (B, Hq, Lq, Lk)

    selfattn_attention.__name__ = f"selfattn_attention_{backend}"
    return selfattn_attention


# -- registration -------------------------------------------------------------------------------

MIN_TRANSFORMERS = "4.56"


def register(name: str = "selfattn", backend: str = "auto") -> str:
    """Register selfattn with transformers as ``attn_implementation=name``, running ``backend``.

    Registers both the attention function and the mask builder (transformers builds no mask
    for an implementation that has only the former). Returns ``name``. Call it again with
    another name to have several backends side by side (``register("selfattn-cpu", "cpu")``).

    Raises:
        ImportError: transformers is not installed (``pip install 'selfattn[hf]'``) or is older
            than 4.56 (no mask interface).
        ValueError: ``backend`` is not a selfattn backend name.
    """
    from .. import backends as _backends

    if not isinstance(name, str) or not name:
        raise ValueError(f"register: name must be a non-empty string, got {name!r}")
    known = list(_backends.names())
    if backend not in known:
        raise ValueError(f"register: unknown backend {backend!r}; selfattn has {', '.join(known)}")
    try:
        import transformers
    except ImportError as e:
        raise ImportError("selfattn.integrations.transformers needs transformers: pip install 'selfattn[hf]'") from e
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:
        raise ImportError(f"selfattn.integrations.transformers needs transformers>={MIN_TRANSFORMERS} (its attention "
                          f"and mask interfaces); found {transformers.__version__}: pip install 'selfattn[hf]'") from e
    # names transformers owns (registering over one would replace it for every model in the process; the
    # ones registered now, as future versions add some, and those it resolves by name) or parses itself
    theirs = {"eager", "sdpa", "flex_attention", "paged|eager"}
    for interface in (AttentionInterface, AttentionMaskInterface):
        theirs |= {n for n, f in getattr(interface, "_global_mapping", {}).items() if getattr(f, "__module__", None) != __name__}
    if name in theirs or name.startswith("flash_attention"):
        raise ValueError(f"register: {name!r} is one of transformers' own implementations (or another library's, "
                         "registered already); choose another name")
    if "/" in name or "|" in name:
        raise ValueError(f"register: {name!r} would not reach selfattn: transformers reads 'org/repo' names as hub kernels "
                         "and strips a 'paged|' prefix; choose a name without '/' or '|'")
    AttentionInterface.register(name, make_attention_function(backend))
    AttentionMaskInterface.register(name, build_mask)
    return name
