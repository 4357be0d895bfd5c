"""Declarative attention masks.

A mask says which (query i, key j) pairs may attend. Each mask is a small value that
answers two questions:

* ``allowed(lq, lk)`` -- "may query i see key j?" as a bool tensor of shape
  ``(B or 1, H or 1, Lq, Lk)``, for the unfused paths;
* ``block_map(lq, lk, block_q, block_k)`` / ``tile(r0, r1, c0, c1, lq, lk)`` -- "is this tile
  empty, full or partial?", for fused kernels that skip what the mask rules out.

Masks combine with ``&``. Positions are aligned bottom-right: query ``i`` of ``Lq`` sits at
absolute position ``i + (Lk - Lq)`` among the keys, which is what decoding with a KV cache
needs and equals the usual top-left alignment when ``Lq == Lk``.
"""

from __future__ import annotations

import enum
from typing import Sequence

import torch

__all__ = [
    "Mask",
    "TileKind",
    "causal",
    "window",
    "padding",
    "documents",
    "dense",
    "EMPTY",
    "PARTIAL",
    "FULL",
]


class TileKind(enum.IntEnum):
    """What a mask allows inside a (rows x cols) tile."""

    EMPTY = 0  # no pair may attend: skip the tile
    PARTIAL = 1  # some pairs may attend: compute and mask element-wise
    FULL = 2  # every pair may attend: compute with no masking


EMPTY, PARTIAL, FULL = TileKind.EMPTY, TileKind.PARTIAL, TileKind.FULL


def _combine_kinds(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # empty if either is empty, full if both are full, partial otherwise
    out = torch.full(torch.broadcast_shapes(a.shape, b.shape), int(PARTIAL), dtype=torch.int8, device=a.device)
    out = torch.where((a == FULL) & (b == FULL), torch.tensor(int(FULL), dtype=torch.int8, device=a.device), out)
    out = torch.where((a == EMPTY) | (b == EMPTY), torch.tensor(int(EMPTY), dtype=torch.int8, device=a.device), out)
    return out


def _kinds(empty: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    out = torch.full(empty.shape, int(PARTIAL), dtype=torch.int8, device=empty.device)
    out[full] = int(FULL)
    out[empty] = int(EMPTY)
    return out


def _rows(lq: int, rows, device) -> torch.Tensor:
    if rows is None:
        return torch.arange(lq, device=device)
    return torch.as_tensor(rows, device=device).reshape(-1)


def _block_bounds(length: int, block: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.arange(0, length, block, device=device)
    ends = torch.clamp(starts + block, max=length)
    return starts, ends  # (n,), (n,)


class Mask:
    """Base class: a rule deciding which (query, key) pairs may attend.

    Subclasses implement ``_allowed``, ``_tile_kinds`` and optionally ``_bias`` and ``check``.
    """

    #: names of the atomic mask kinds inside this mask (backends name missing features by them)
    kinds: frozenset = frozenset()

    # -- public interface -------------------------------------------------------------------
    def allowed(self, lq: int, lk: int, *, rows=None, device=None) -> torch.Tensor:
        """Bool tensor ``(B|1, H|1, R, Lk)``: True where query ``rows[r]`` may see key ``j``."""
        return self._allowed(lq, lk, _rows(lq, rows, device), device)

    def bias(self, lq: int, lk: int, *, rows=None, device=None):
        """Float tensor added to the scores at allowed positions, or None (only float dense masks)."""
        return self._bias(lq, lk, _rows(lq, rows, device), device)

    def block_map(self, lq: int, lk: int, block_q: int, block_k: int, *, device=None) -> torch.Tensor:
        """int8 tensor ``(B|1, H|1, ceil(Lq/block_q), ceil(Lk/block_k))`` of :class:`TileKind` values."""
        r0, r1 = _block_bounds(lq, block_q, device)
        c0, c1 = _block_bounds(lk, block_k, device)
        return self._tile_kinds(lq, lk, r0[:, None], r1[:, None], c0[None, :], c1[None, :], device)

    def tile(self, r0: int, r1: int, c0: int, c1: int, lq: int, lk: int) -> TileKind:
        """Kind of the tile rows ``r0..r1-1`` x cols ``c0..c1-1``, over every batch and head.

        A tile is EMPTY (or FULL) only if it is so for every batch element and head.
        """
        if not (0 <= r0 < r1 <= lq and 0 <= c0 < c1 <= lk):
            raise ValueError(f"tile: need 0 <= r0 < r1 <= Lq and 0 <= c0 < c1 <= Lk, got rows {r0}..{r1}, cols {c0}..{c1} with Lq={lq}, Lk={lk}")
        t = lambda x: torch.tensor([[x]])  # noqa: E731
        k = self._tile_kinds(lq, lk, t(r0), t(r1), t(c0), t(c1), None)
        if bool((k == EMPTY).all()):
            return EMPTY
        if bool((k == FULL).all()):
            return FULL
        return PARTIAL

    def check(self, batch: int, heads: int, lq: int, lk: int, device) -> None:
        """Raise ValueError if this mask cannot apply to inputs of these sizes."""

    def to_dense(self, lq: int, lk: int, *, device=None) -> torch.Tensor:
        """The mask as torch SDPA takes it: bool (True = may attend) or float (added to scores)."""
        allowed = self.allowed(lq, lk, device=device)
        bias = self.bias(lq, lk, device=device)
        if bias is None:
            return allowed
        return torch.where(allowed, bias, torch.tensor(float("-inf"), dtype=bias.dtype, device=bias.device))

    def __and__(self, other: "Mask") -> "Mask":
        if not isinstance(other, Mask):
            return NotImplemented
        return And(self, other)

    # -- for subclasses ---------------------------------------------------------------------
    def _allowed(self, lq, lk, rows, device):
        raise NotImplementedError

    def _bias(self, lq, lk, rows, device):
        return None

    def _tile_kinds(self, lq, lk, r0, r1, c0, c1, device):
        raise NotImplementedError


class Causal(Mask):
    """Query i sees keys j <= i + (Lk - Lq) (bottom-right aligned)."""

    kinds = frozenset({"causal"})

    def _allowed(self, lq, lk, rows, device):
        cols = torch.arange(lk, device=device)
        return (cols[None, :] <= rows[:, None] + (lk - lq))[None, None]  # (1, 1, R, Lk)

    def _tile_kinds(self, lq, lk, r0, r1, c0, c1, device):
        off = lk - lq
        empty = c0 > (r1 - 1) + off  # the tile's first key is after every row's last visible key
        full = (c1 - 1) <= r0 + off  # the tile's last key is visible from its first row
        return _kinds(empty, full)[None, None]

    def __repr__(self):
        return "causal()"


class Window(Mask):
    """Query i (at absolute position p = i + Lk - Lq) sees keys j with p - left <= j <= p + right."""

    kinds = frozenset({"window"})

    def __init__(self, left: int, right: int = 0):
        for name, val in (("left", left), ("right", right)):
            if isinstance(val, bool) or not isinstance(val, int):
                raise TypeError(f"window: {name} must be an int, got {type(val).__name__} ({val!r})")
            if val < 0:
                raise ValueError(f"window: {name} must be >= 0, got {val}")
        self.left, self.right = left, right

    def _allowed(self, lq, lk, rows, device):
        cols = torch.arange(lk, device=device)
        d = cols[None, :] - (rows[:, None] + (lk - lq))  # (R, Lk) key offset from the query's position
        return ((d >= -self.left) & (d <= self.right))[None, None]

    def _tile_kinds(self, lq, lk, r0, r1, c0, c1, device):
        off = lk - lq
        dmin = c0 - (r1 - 1) - off
        dmax = (c1 - 1) - r0 - off
        empty = (dmin > self.right) | (dmax < -self.left)
        full = (dmin >= -self.left) & (dmax <= self.right)
        return _kinds(empty, full)[None, None]

    def __repr__(self):
        return f"window({self.left}, {self.right})"


def _as_lengths(name: str, x) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"padding: {name} must hold integers, got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"padding: {name} must be 1-D of shape (B,), got shape {tuple(t.shape)}")
    return t.long()


class Padding(Mask):
    """Batch element b has ``kv_lengths[b]`` real keys (and ``q_lengths[b]`` real queries)."""

    kinds = frozenset({"padding"})

    def __init__(self, kv_lengths, q_lengths=None):
        self.kv_lengths = _as_lengths("kv_lengths", kv_lengths)
        self.q_lengths = None if q_lengths is None else _as_lengths("q_lengths", q_lengths)

    def check(self, batch, heads, lq, lk, device):
        for name, lens, limit in (("kv_lengths", self.kv_lengths, lk), ("q_lengths", self.q_lengths, lq)):
            if lens is None:
                continue
            if lens.shape[0] != batch:
                raise ValueError(f"padding: {name} has shape {tuple(lens.shape)} but the batch size is {batch}")
            if lens.numel() and (int(lens.min()) < 0 or int(lens.max()) > limit):
                raise ValueError(f"padding: {name} must lie in [0, {limit}], got values {lens.tolist()}")

    def _lens(self, device):
        kv = self.kv_lengths.to(device)
        q = None if self.q_lengths is None else self.q_lengths.to(device)
        return kv, q

    def _allowed(self, lq, lk, rows, device):
        kv, q = self._lens(device)
        cols = torch.arange(lk, device=device)
        ok = cols[None, None, None, :] < kv[:, None, None, None]  # (B, 1, 1, Lk)
        if q is not None:
            ok = ok & (rows[None, None, :, None] < q[:, None, None, None])  # (B, 1, R, Lk)
        return ok.expand(-1, -1, rows.numel(), -1)

    def _tile_kinds(self, lq, lk, r0, r1, c0, c1, device):
        kv, q = self._lens(device)
        kv = kv[:, None, None, None]
        empty = c0 >= kv
        full = c1 <= kv
        if q is not None:
            q = q[:, None, None, None]
            empty = empty | (r0 >= q)
            full = full & (r1 <= q)
        empty, full, _ = torch.broadcast_tensors(empty, full, r0 + c0)  # (B, 1, nQ, nK) even without q_lengths
        return _kinds(empty, full)

    def __repr__(self):
        return f"padding(kv_lengths={self.kv_lengths.tolist()}, q_lengths={None if self.q_lengths is None else self.q_lengths.tolist()})"


def _as_ids(name, x) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"documents: {name} must hold integers, got dtype {t.dtype}")
    if t.dim() not in (1, 2):
        raise ValueError(f"documents: {name} must be (L,) or (B, L), got shape {tuple(t.shape)}")
    return t.long() if t.dim() == 2 else t.long()[None]


class Documents(Mask):
    """Packed sequences: a query sees only keys of its own document (equal segment id).

    ``segment_ids`` labels the keys, shape ``(L,)`` or ``(B, L)``; queries take the labels of the
    last ``Lq`` keys (bottom-right alignment) unless ``q_segment_ids`` is given.
    """

    kinds = frozenset({"documents"})

    def __init__(self, segment_ids, q_segment_ids=None):
        self.kv_ids = _as_ids("segment_ids", segment_ids)
        self.q_ids = None if q_segment_ids is None else _as_ids("q_segment_ids", q_segment_ids)

    def check(self, batch, heads, lq, lk, device):
        if self.kv_ids.shape[0] not in (1, batch) or self.kv_ids.shape[1] != lk:
            raise ValueError(f"documents: segment_ids has shape {tuple(self.kv_ids.shape)}, expected (Lk,) or (B, Lk) = ({batch}, {lk})")
        if self.q_ids is not None and (self.q_ids.shape[0] not in (1, batch) or self.q_ids.shape[1] != lq):
            raise ValueError(f"documents: q_segment_ids has shape {tuple(self.q_ids.shape)}, expected (Lq,) or (B, Lq) = ({batch}, {lq})")
        if self.q_ids is None and lq > lk:
            raise ValueError(f"documents: with Lq={lq} > Lk={lk} pass q_segment_ids of shape (B, Lq)")

    def _ids(self, lq, lk, device):
        kv = self.kv_ids.to(device)
        q = kv[:, lk - lq:] if self.q_ids is None else self.q_ids.to(device)
        return q, kv  # (B|1, Lq), (B|1, Lk)

    def _allowed(self, lq, lk, rows, device):
        q, kv = self._ids(lq, lk, device)
        return (q[:, rows][:, None, :, None] == kv[:, None, None, :])  # (B|1, 1, R, Lk)

    def _tile_kinds(self, lq, lk, r0, r1, c0, c1, device):
        q, kv = self._ids(lq, lk, device)
        qmin, qmax = _segment_range(q, r0[:, 0], r1[:, 0])  # (B, nR)
        kmin, kmax = _segment_range(kv, c0[0], c1[0])  # (B, nC)
        qmin, qmax = qmin[:, None, :, None], qmax[:, None, :, None]
        kmin, kmax = kmin[:, None, None, :], kmax[:, None, None, :]
        empty = (qmax < kmin) | (kmax < qmin)  # id ranges disjoint: no equal pair
        full = (qmin == qmax) & (kmin == kmax) & (qmin == kmin)
        return _kinds(*torch.broadcast_tensors(empty, full))

    def __repr__(self):
        return f"documents(segment_ids of shape {tuple(self.kv_ids.shape)})"


def _segment_range(ids: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor):
    # per-block min and max of ids[:, start:end]; blocks here are small in number
    mins, maxs = [], []
    for s, e in zip(starts.tolist(), ends.tolist()):
        mins.append(ids[:, s:e].amin(dim=1))
        maxs.append(ids[:, s:e].amax(dim=1))
    return torch.stack(mins, dim=1), torch.stack(maxs, dim=1)


class Dense(Mask):
    """An explicit mask tensor broadcastable to (B, H, Lq, Lk).

    bool: True = may attend. float: added to the scores; -inf entries are masked out.
    """

    def __init__(self, tensor: torch.Tensor):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"dense: mask must be a torch.Tensor, got {type(tensor).__name__}")
        if not (tensor.dtype == torch.bool or tensor.dtype.is_floating_point):
            raise TypeError(f"dense: mask must be bool (True = may attend) or floating point (added to scores), got dtype {tensor.dtype}")
        if tensor.dim() > 4:
            raise ValueError(f"dense: mask must have at most 4 dims (B, H, Lq, Lk), got shape {tuple(tensor.shape)}")
        self.tensor = tensor
        self.kinds = frozenset({"dense_bool" if tensor.dtype == torch.bool else "dense_float"})

    def _t4(self):
        t = self.tensor
        return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))

    def check(self, batch, heads, lq, lk, device):
        t = self._t4()
        try:
            ok = torch.broadcast_shapes(t.shape, (batch, heads, lq, lk)) == (batch, heads, lq, lk)  # no dim may grow
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"mask: shape {tuple(self.tensor.shape)} does not broadcast to (B, H, Lq, Lk) = ({batch}, {heads}, {lq}, {lk})")
        if device is not None and t.device != torch.device(device):
            raise ValueError(f"mask: is on device {t.device} but query is on {device}")

    def _full(self, lq, lk, device):
        t = self._t4().to(device)
        return t.expand(t.shape[0], t.shape[1], lq, lk)

    def _allowed(self, lq, lk, rows, device):
        t = self._full(lq, lk, device)[:, :, rows]
        return t if t.dtype == torch.bool else t != float("-inf")

    def _bias(self, lq, lk, rows, device):
        t = self._full(lq, lk, device)
        if t.dtype == torch.bool:
            return None
        t = t[:, :, rows]
        return torch.where(t == float("-inf"), torch.zeros((), dtype=t.dtype, device=t.device), t)

    def block_map(self, lq, lk, block_q, block_k, *, device=None):
        t = self._t4().to(device)  # (B|1, H|1, Lq|1, Lk|1) broadcast dims stay size 1
        kinds = dense_block_kinds(t if t.dtype == torch.bool else t != float("-inf"), lq, lk, block_q, block_k)
        return kinds.expand(kinds.shape[0], kinds.shape[1], -(-lq // block_q), -(-lk // block_k))

    def _tile_kinds(self, lq, lk, r0, r1, c0, c1, device):
        # arbitrary tile bounds (tile()); block_map above is the vectorised path for block grids
        a = self._allowed(lq, lk, torch.arange(lq, device=device), device)
        rs, re, cs, ce = r0[:, 0].tolist(), r1[:, 0].tolist(), c0[0].tolist(), c1[0].tolist()
        out = torch.empty(a.shape[0], a.shape[1], len(rs), len(cs), dtype=torch.int8, device=a.device)
        for i, (s, e) in enumerate(zip(rs, re)):
            for j, (cs_, ce_) in enumerate(zip(cs, ce)):
                blk = a[:, :, s:e, cs_:ce_]
                any_, all_ = blk.any(-1).any(-1), blk.all(-1).all(-1)
                kind = torch.full_like(any_, int(PARTIAL), dtype=torch.int8)
                kind[all_] = int(FULL)
                kind[~any_] = int(EMPTY)
                out[:, :, i, j] = kind
        return out

    def __repr__(self):
        return f"dense({self.tensor.dtype} tensor of shape {tuple(self.tensor.shape)})"


def dense_block_kinds(allowed: torch.Tensor, lq: int, lk: int, block_q: int, block_k: int) -> torch.Tensor:
    """TileKind per block of a bool mask (B|1, H|1, Lq|1, Lk|1), without expanding size-1 dims.

    Returns int8 (B|1, H|1, nQ|1, nK|1): a size-1 input dim gives a size-1 output dim.
    """
    any_ = all_ = allowed.to(torch.uint8)
    for dim, length, block in ((2, lq, block_q), (3, lk, block_k)):
        if allowed.shape[dim] == 1:
            continue
        n = -(-length // block)
        pad = [0, 0] * (3 - dim) + [0, n * block - length]
        shape = any_.shape[:dim] + (n, block) + any_.shape[dim + 1:]
        any_ = torch.nn.functional.pad(any_, pad, value=0).reshape(shape).amax(dim + 1)  # padding never counts as allowed
        all_ = torch.nn.functional.pad(all_, pad, value=1).reshape(shape).amin(dim + 1)  # nor as disallowed
    return _kinds(any_ == 0, all_ == 1)


class And(Mask):
    """Pairs allowed by every part; float biases add up."""

    def block_map(self, lq, lk, block_q, block_k, *, device=None):
        out = self.parts[0].block_map(lq, lk, block_q, block_k, device=device)
        for p in self.parts[1:]:
            out = _combine_kinds(out, p.block_map(lq, lk, block_q, block_k, device=device))
        return out

    def __init__(self, *parts: Mask):
        flat: list[Mask] = []
        for p in parts:
            flat.extend(p.parts if isinstance(p, And) else [p])
        self.parts = tuple(flat)
        self.kinds = frozenset().union(*(p.kinds for p in self.parts))

    def check(self, batch, heads, lq, lk, device):
        for p in self.parts:
            p.check(batch, heads, lq, lk, device)

    def _allowed(self, lq, lk, rows, device):
        out = self.parts[0]._allowed(lq, lk, rows, device)
        for p in self.parts[1:]:
            out = out & p._allowed(lq, lk, rows, device)
        return out

    def _bias(self, lq, lk, rows, device):
        out = None
        for p in self.parts:
            b = p._bias(lq, lk, rows, device)
            if b is not None:
                out = b if out is None else out + b
        return out

    def _tile_kinds(self, lq, lk, r0, r1, c0, c1, device):
        out = self.parts[0]._tile_kinds(lq, lk, r0, r1, c0, c1, device)
        for p in self.parts[1:]:
            out = _combine_kinds(out, p._tile_kinds(lq, lk, r0, r1, c0, c1, device))
        return out

    def __repr__(self):
        return " & ".join(repr(p) for p in self.parts)


# -- constructors: the public way to build masks --------------------------------------------


def causal() -> Mask:
    """Causal mask, bottom-right aligned: query i sees keys up to i + Lk - Lq."""
    return Causal()


def window(left: int, right: int = 0) -> Mask:
    """Sliding window: query at position p sees keys p - left .. p + right (``right=0``: causal window)."""
    return Window(left, right)


def padding(kv_lengths: Sequence[int] | torch.Tensor, q_lengths: Sequence[int] | torch.Tensor | None = None) -> Mask:
    """Right padding: batch element b has ``kv_lengths[b]`` real keys and ``q_lengths[b]`` real queries.

    Padded query rows are fully masked, so their output is 0.
    """
    return Padding(kv_lengths, q_lengths)


def documents(segment_ids, q_segment_ids=None) -> Mask:
    """Packed documents: a query sees only keys with the same segment id. Combine with ``causal()``."""
    return Documents(segment_ids, q_segment_ids)


def dense(tensor: torch.Tensor) -> Mask:
    """An explicit mask: bool (True = may attend) or float (added to the scores)."""
    return Dense(tensor)
