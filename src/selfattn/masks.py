"""Declarative attention masks, and the positions they read.

A mask says which (query i, key j) pairs may attend. Each mask is a small value that
answers two questions:

* ``allowed(lq, lk)`` -- "may query i see key j?" as a bool tensor of shape
  ``(B or 1, H or 1, Lq, Lk)``, for the unfused paths;
* ``block_map(lq, lk, block_q, block_k)`` / ``tile(r0, r1, c0, c1, lq, lk)`` -- "is this tile
  empty, full or partial?", for fused kernels that skip what the mask rules out.

Masks combine with ``&``.

**Positions.** Every query and key sits at an integer position. By default queries sit at
``arange(Lq) + Lk - Lq`` and keys at ``arange(Lk)`` (bottom-right alignment: what decoding
with a KV cache needs, and the usual top-left alignment when ``Lq == Lk``). Pass
``q_positions`` / ``kv_positions`` (``(L,)`` or per batch ``(B, L)``) for anything else:
per-sequence alignment, left padding, cache offsets, packed documents. ``causal`` and
``window`` read positions; ``padding``, ``key_padding``, ``documents``, ``dense`` and
``function`` read indices. Lq = 2, Lk = 5, default positions (q at 3, 4)::

    causal()            window(1, 0)
    key 0 1 2 3 4       key 0 1 2 3 4
    q3  1 1 1 1 0       q3  0 0 1 1 0
    q4  1 1 1 1 1       q4  0 0 0 1 1
"""

from __future__ import annotations

import enum
import functools
import operator
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

__all__ = [
    "Mask",
    "TileKind",
    "Geometry",
    "causal",
    "window",
    "padding",
    "key_padding",
    "documents",
    "dense",
    "function",
    "varlen",
    "left_padded",
    "packed",
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


@dataclass(frozen=True)
class Geometry:
    """The sizes and positions a mask is applied to."""

    batch: int
    heads: int  # query heads
    lq: int
    lk: int
    q_positions: torch.Tensor | None = None  # int64 (B|1, Lq); None = arange(Lq) + Lk - Lq
    kv_positions: torch.Tensor | None = None  # int64 (B|1, Lk); None = arange(Lk)
    device: torch.device | str | None = None

    @property
    def default_positions(self) -> bool:
        return self.q_positions is None and self.kv_positions is None

    def q_pos(self) -> torch.Tensor:
        if self.q_positions is not None:
            return self.q_positions.to(self.device)
        return (torch.arange(self.lq, device=self.device) + (self.lk - self.lq))[None]  # (1, Lq)

    def kv_pos(self) -> torch.Tensor:
        if self.kv_positions is not None:
            return self.kv_positions.to(self.device)
        return torch.arange(self.lk, device=self.device)[None]  # (1, Lk)

    def q_bounds(self, starts, ends):
        """(min, max) query position of each row block [start, end): each (B|1, n)."""
        if self.q_positions is None:
            off = self.lk - self.lq
            return (starts + off)[None], (ends - 1 + off)[None]
        return _block_minmax(self.q_pos(), starts, ends)

    def kv_bounds(self, starts, ends):
        """(min, max) key position of each key block: each (B|1, n)."""
        if self.kv_positions is None:
            return starts[None], (ends - 1)[None]
        return _block_minmax(self.kv_pos(), starts, ends)


def _geometry(lq, lk, device, batch=1, heads=1, q_positions=None, kv_positions=None) -> Geometry:
    qp = None if q_positions is None else _as_pos(q_positions)
    kp = None if kv_positions is None else _as_pos(kv_positions)
    return Geometry(batch, heads, lq, lk, qp, kp, device)


def _as_pos(p) -> torch.Tensor:
    t = torch.as_tensor(p)
    return (t[None] if t.dim() == 1 else t).long()


def _block_minmax(pos: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor):
    # per-block min and max of pos[:, start:end] (pos (B|1, L)) -> (B|1, n) each
    starts, ends = starts.reshape(-1), ends.reshape(-1)
    n, length = starts.numel(), pos.shape[1]
    block = int(ends[0] - starts[0]) if n else 1
    if n and bool((starts == torch.arange(n, device=starts.device) * block).all()) and int(ends[-1]) == length:
        # a regular block grid: pad the last block with its own last value, then reduce
        padded = torch.cat([pos, pos[:, -1:].expand(-1, n * block - length)], dim=1)
        blocks = padded.reshape(pos.shape[0], n, block)
        return blocks.amin(-1), blocks.amax(-1)
    mins = [pos[:, s:e].amin(dim=1) for s, e in zip(starts.tolist(), ends.tolist())]
    maxs = [pos[:, s:e].amax(dim=1) for s, e in zip(starts.tolist(), ends.tolist())]
    return torch.stack(mins, dim=1), torch.stack(maxs, dim=1)


def _broadcast_shapes(*shapes) -> torch.Size:
    # torch.broadcast_shapes (the same result; RuntimeError where shapes do not broadcast) without its import
    # of sympy on first use (torch.fx's symbolic shapes): ~1.5 s CPU of a process's first masked call where
    # Python writes no bytecode cache (PYTHONDONTWRITEBYTECODE), ~13 % of the float32 first-call time
    n = max(len(s) for s in shapes)
    out = [1] * n
    for s in shapes:
        for i, d in enumerate(s, n - len(s)):
            if d != 1:
                if out[i] != 1 and out[i] != d:
                    raise RuntimeError(f"shapes {[tuple(s) for s in shapes]} do not broadcast")
                out[i] = d
    return torch.Size(out)


def _combine_kinds(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # empty if either is empty, full if both are full, partial otherwise
    out = torch.full(_broadcast_shapes(a.shape, b.shape), int(PARTIAL), dtype=torch.int8, device=a.device)
    out = torch.where((a == FULL) & (b == FULL), torch.tensor(int(FULL), dtype=torch.int8, device=a.device), out)
    out = torch.where((a == EMPTY) | (b == EMPTY), torch.tensor(int(EMPTY), dtype=torch.int8, device=a.device), out)
    return out


def _kinds(empty: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    empty, full = torch.broadcast_tensors(empty, full)
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

    Subclasses implement ``_allowed``, ``_tile_kinds`` and optionally ``_bias`` and ``check``;
    each takes a :class:`Geometry` (sizes and positions).
    """

    #: names of the atomic mask kinds inside this mask (backends name missing features by them)
    kinds: frozenset = frozenset()

    # -- public interface -------------------------------------------------------------------
    def allowed(self, lq: int, lk: int, *, rows=None, device=None, batch=1, heads=1, q_positions=None, kv_positions=None) -> torch.Tensor:
        """Bool tensor ``(B|1, H|1, R, Lk)``: True where query ``rows[r]`` may see key ``j``."""
        g = _geometry(lq, lk, device, batch, heads, q_positions, kv_positions)
        return self.allowed_in(g, rows)

    def bias(self, lq: int, lk: int, *, rows=None, device=None, batch=1, heads=1, q_positions=None, kv_positions=None):
        """Float tensor added to the scores at allowed positions, or None (only float dense masks)."""
        g = _geometry(lq, lk, device, batch, heads, q_positions, kv_positions)
        return self.bias_in(g, rows)

    def allowed_in(self, g: Geometry, rows=None) -> torch.Tensor:
        """:meth:`allowed` for a :class:`Geometry`."""
        return self._allowed(g, _rows(g.lq, rows, g.device))

    def bias_in(self, g: Geometry, rows=None):
        """:meth:`bias` for a :class:`Geometry`."""
        return self._bias(g, _rows(g.lq, rows, g.device))

    def block_map(self, lq: int, lk: int, block_q: int, block_k: int, *, device=None, batch=1, heads=1,
                  q_positions=None, kv_positions=None) -> torch.Tensor:
        """int8 tensor ``(B|1, H|1, ceil(Lq/block_q), ceil(Lk/block_k))`` of :class:`TileKind` values."""
        return self.block_map_in(_geometry(lq, lk, device, batch, heads, q_positions, kv_positions), block_q, block_k)

    def block_map_in(self, g: Geometry, block_q: int, block_k: int) -> torch.Tensor:
        """:meth:`block_map` for a :class:`Geometry`."""
        r0, r1 = _block_bounds(g.lq, block_q, g.device)
        c0, c1 = _block_bounds(g.lk, block_k, g.device)
        return self._tile_kinds(g, r0[:, None], r1[:, None], c0[None, :], c1[None, :])

    def tile(self, r0: int, r1: int, c0: int, c1: int, lq: int, lk: int, *, batch=1, heads=1,
             q_positions=None, kv_positions=None) -> TileKind:
        """Kind of the tile rows ``r0..r1-1`` x cols ``c0..c1-1``, over every batch and head.

        A tile is EMPTY (or FULL) only if it is so for every batch element and head.
        """
        if not (0 <= r0 < r1 <= lq and 0 <= c0 < c1 <= lk):
            raise ValueError(f"tile: need 0 <= r0 < r1 <= Lq and 0 <= c0 < c1 <= Lk, got rows {r0}..{r1}, cols {c0}..{c1} with Lq={lq}, Lk={lk}")
        t = lambda x: torch.tensor([[x]])  # noqa: E731
        g = _geometry(lq, lk, None, batch, heads, q_positions, kv_positions)
        k = self._tile_kinds(g, t(r0), t(r1), t(c0), t(c1))
        if bool((k == EMPTY).all()):
            return EMPTY
        if bool((k == FULL).all()):
            return FULL
        return PARTIAL

    def check(self, batch: int, heads: int, lq: int, lk: int, device) -> None:
        """Raise ValueError if this mask cannot apply to inputs of these sizes."""

    def to_dense(self, lq: int, lk: int, *, device=None, batch=1, heads=1, q_positions=None, kv_positions=None) -> torch.Tensor:
        """The mask as torch SDPA takes it: bool (True = may attend) or float (added to scores)."""
        return self.to_dense_in(_geometry(lq, lk, device, batch, heads, q_positions, kv_positions))

    def to_dense_in(self, g: Geometry) -> torch.Tensor:
        """:meth:`to_dense` for a :class:`Geometry`."""
        allowed = self.allowed_in(g)
        bias = self.bias_in(g)
        if bias is None:
            return allowed
        return torch.where(allowed, bias, torch.tensor(float("-inf"), dtype=bias.dtype, device=bias.device))

    def __and__(self, other: "Mask") -> "Mask":
        if isinstance(other, torch.Tensor):
            other = dense(other)  # a tensor combines as attention(mask=tensor) takes it
        if not isinstance(other, Mask):
            return NotImplemented
        return And(self, other)

    def __rand__(self, other) -> "Mask":
        if isinstance(other, torch.Tensor):
            return And(dense(other), self)
        return NotImplemented

    def cache_key(self):
        """A hashable value equal for masks that allow the same pairs (structural masks), else identity."""
        return ("id", id(self))

    # -- for subclasses ---------------------------------------------------------------------
    def _allowed(self, g: Geometry, rows):
        raise NotImplementedError

    def _bias(self, g: Geometry, rows):
        return None

    def _tile_kinds(self, g: Geometry, r0, r1, c0, c1):
        raise NotImplementedError


def _tile_bounds(g: Geometry, r0, r1, c0, c1):
    # per-tile query and key position bounds, shaped to broadcast to (B|1, 1, nR, nC)
    qmin, qmax = g.q_bounds(r0[:, 0], r1[:, 0])  # (B|1, nR)
    kmin, kmax = g.kv_bounds(c0[0], c1[0])  # (B|1, nC)
    return qmin[:, None, :, None], qmax[:, None, :, None], kmin[:, None, None, :], kmax[:, None, None, :]


class Causal(Mask):
    """Query at position p sees keys at positions <= p."""

    kinds = frozenset({"causal"})

    def _allowed(self, g, rows):
        qp, kp = g.q_pos()[:, rows], g.kv_pos()  # (B|1, R), (B|1, Lk)
        return kp[:, None, None, :] <= qp[:, None, :, None]  # (B|1, 1, R, Lk)

    def _tile_kinds(self, g, r0, r1, c0, c1):
        qmin, qmax, kmin, kmax = _tile_bounds(g, r0, r1, c0, c1)
        empty = kmin > qmax  # every key of the tile sits after every query
        full = kmax <= qmin  # every key sits at or before every query
        return _kinds(empty, full)

    def cache_key(self):
        return ("causal",)

    def __repr__(self):
        return "causal()"


class Window(Mask):
    """Query at position p sees keys at positions p - left .. p + right (None = unbounded)."""

    kinds = frozenset({"window"})

    def __init__(self, left: int | None, right: int | None = 0):
        sides = []
        for name, val in (("left", left), ("right", right)):
            if val is not None:
                # any integer (a numpy or 0-dim torch integer too), as a Python int
                try:
                    if isinstance(val, (bool, float)) or getattr(val, "dtype", None) == torch.bool:
                        raise TypeError
                    val = operator.index(val)
                except TypeError:
                    raise TypeError(f"window: {name} must be an int, got {type(val).__name__} ({val!r}); None means unbounded") from None
                if val < 0:
                    raise ValueError(f"window: {name} must be >= 0, got {val} (None means unbounded)")
            sides.append(val)
        left, right = sides
        if left is None and right is None:
            raise ValueError("window: left and right cannot both be None (that bounds nothing; use causal() for a causal mask)")
        self.left, self.right = left, right

    def _allowed(self, g, rows):
        qp, kp = g.q_pos()[:, rows], g.kv_pos()
        d = kp[:, None, None, :] - qp[:, None, :, None]  # (B|1, 1, R, Lk) key position minus query position
        ok = torch.ones_like(d, dtype=torch.bool)
        if self.left is not None:
            ok = ok & (d >= -self.left)
        if self.right is not None:
            ok = ok & (d <= self.right)
        return ok

    def _tile_kinds(self, g, r0, r1, c0, c1):
        qmin, qmax, kmin, kmax = _tile_bounds(g, r0, r1, c0, c1)
        dmin, dmax = kmin - qmax, kmax - qmin
        empty = torch.zeros_like(dmin, dtype=torch.bool)
        full = torch.ones_like(dmin, dtype=torch.bool)
        if self.right is not None:
            empty, full = empty | (dmin > self.right), full & (dmax <= self.right)
        if self.left is not None:
            empty, full = empty | (dmax < -self.left), full & (dmin >= -self.left)
        return _kinds(empty, full)

    def cache_key(self):
        return ("window", self.left, self.right)

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
    """Batch element b has ``kv_lengths[b]`` real keys (and ``q_lengths[b]`` real queries), at the start."""

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

    def _allowed(self, g, rows):
        kv, q = self._lens(g.device)
        cols = torch.arange(g.lk, device=g.device)
        ok = cols[None, None, None, :] < kv[:, None, None, None]  # (B, 1, 1, Lk)
        if q is not None:
            ok = ok & (rows[None, None, :, None] < q[:, None, None, None])  # (B, 1, R, Lk)
        return ok.expand(-1, -1, rows.numel(), -1)

    def _tile_kinds(self, g, r0, r1, c0, c1):
        kv, q = self._lens(g.device)
        kv = kv[:, None, None, None]
        empty = c0 >= kv
        full = c1 <= kv
        if q is not None:
            q = q[:, None, None, None]
            empty = empty | (r0 >= q)
            full = full & (r1 <= q)
        empty, full, _ = torch.broadcast_tensors(empty, full, r0 + c0)  # (B, 1, nQ, nK) even without q_lengths
        return _kinds(empty, full)

    def cache_key(self):
        return ("padding", id(self.kv_lengths), id(self.q_lengths))

    def __repr__(self):
        return f"padding(kv_lengths={self.kv_lengths.tolist()}, q_lengths={None if self.q_lengths is None else self.q_lengths.tolist()})"


class KeyPadding(Mask):
    """``keep`` (B, Lk) bool: True = a real key. Any pattern: left or right padding, holes."""

    kinds = frozenset({"key_padding"})

    def __init__(self, keep):
        if not isinstance(keep, torch.Tensor):
            raise TypeError(f"key_padding: keep must be a bool torch.Tensor of shape (B, Lk), got {type(keep).__name__}")
        if keep.dtype != torch.bool:
            raise TypeError(f"key_padding: keep must be bool (True = a real key), got dtype {keep.dtype}")
        if keep.dim() != 2:
            raise ValueError(f"key_padding: keep must have shape (B, Lk), got {tuple(keep.shape)}")
        self.keep = keep

    def check(self, batch, heads, lq, lk, device):
        if tuple(self.keep.shape) != (batch, lk):
            raise ValueError(f"key_padding: keep has shape {tuple(self.keep.shape)}, expected (B, Lk) = ({batch}, {lk})")
        if device is not None and self.keep.device != torch.device(device):
            raise ValueError(f"key_padding: keep is on device {self.keep.device} but query is on {device}")

    def _allowed(self, g, rows):
        return self.keep.to(g.device)[:, None, None, :].expand(-1, -1, rows.numel(), -1)  # (B, 1, R, Lk)

    def _tile_kinds(self, g, r0, r1, c0, c1):
        keep = self.keep.to(g.device).to(torch.int32)
        csum = torch.nn.functional.pad(keep.cumsum(1), (1, 0))  # (B, Lk + 1) prefix counts
        count = csum[:, c1[0]] - csum[:, c0[0]]  # (B, nC) real keys per key block
        count = count[:, None, None, :]
        empty = count == 0
        full = count == (c1 - c0)[None, None]
        empty, full, _ = torch.broadcast_tensors(empty, full, (r0 + c0)[None, None])
        return _kinds(empty, full)

    def cache_key(self):
        return ("key_padding", id(self.keep))

    def __repr__(self):
        return f"key_padding(keep of shape {tuple(self.keep.shape)})"


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

    def ids(self, lq, lk, device):
        """(query ids (B|1, Lq), key ids (B|1, Lk))."""
        kv = self.kv_ids.to(device)
        q = kv[:, lk - lq:] if self.q_ids is None else self.q_ids.to(device)
        return q, kv

    def _allowed(self, g, rows):
        q, kv = self.ids(g.lq, g.lk, g.device)
        return (q[:, rows][:, None, :, None] == kv[:, None, None, :])  # (B|1, 1, R, Lk)

    def _tile_kinds(self, g, r0, r1, c0, c1):
        q, kv = self.ids(g.lq, g.lk, g.device)
        qmin, qmax = _block_minmax(q, r0[:, 0], r1[:, 0])  # (B, nR)
        kmin, kmax = _block_minmax(kv, c0[0], c1[0])  # (B, nC)
        qmin, qmax = qmin[:, None, :, None], qmax[:, None, :, None]
        kmin, kmax = kmin[:, None, None, :], kmax[:, None, None, :]
        empty = (qmax < kmin) | (kmax < qmin)  # id ranges disjoint: no equal pair
        full = (qmin == qmax) & (kmin == kmax) & (qmin == kmin)
        return _kinds(empty, full)

    def cache_key(self):
        return ("documents", id(self.kv_ids), id(self.q_ids))

    def __repr__(self):
        return f"documents(segment_ids of shape {tuple(self.kv_ids.shape)})"


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

    def t4(self):
        """The tensor with 4 dims (B|1, H|1, Lq|1, Lk|1)."""
        t = self.tensor
        return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))

    def check(self, batch, heads, lq, lk, device):
        t = self.t4()
        try:
            ok = _broadcast_shapes(t.shape, (batch, heads, lq, lk)) == (batch, heads, lq, lk)  # no dim may grow
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"mask: shape {tuple(self.tensor.shape)} does not broadcast to (B, H, Lq, Lk) = ({batch}, {heads}, {lq}, {lk})")
        if device is not None and t.device != torch.device(device):
            raise ValueError(f"mask: is on device {t.device} but query is on {device}")

    def _full(self, g):
        t = self.t4().to(g.device)
        return t.expand(t.shape[0], t.shape[1], g.lq, g.lk)

    def _allowed(self, g, rows):
        t = self._full(g)[:, :, rows]
        return t if t.dtype == torch.bool else t != float("-inf")

    def _bias(self, g, rows):
        t = self._full(g)
        if t.dtype == torch.bool:
            return None
        t = t[:, :, rows]
        return torch.where(t == float("-inf"), torch.zeros((), dtype=t.dtype, device=t.device), t)

    def block_map_in(self, g, block_q, block_k):
        t = self.t4().to(g.device)  # (B|1, H|1, Lq|1, Lk|1) broadcast dims stay size 1
        kinds = dense_block_kinds(t if t.dtype == torch.bool else t != float("-inf"), g.lq, g.lk, block_q, block_k)
        return kinds.expand(kinds.shape[0], kinds.shape[1], -(-g.lq // block_q), -(-g.lk // block_k))

    def _tile_kinds(self, g, r0, r1, c0, c1):
        # arbitrary tile bounds (tile()); block_map_in above is the vectorised path for block grids
        return _tiles_by_loop(self._allowed(g, torch.arange(g.lq, device=g.device)), r0, r1, c0, c1)

    def cache_key(self):
        return ("dense", id(self.tensor))

    def __repr__(self):
        return f"dense({self.tensor.dtype} tensor of shape {tuple(self.tensor.shape)})"


def _tiles_by_loop(a, r0, r1, c0, c1):
    # TileKind of arbitrary tiles of a bool (B|1, H|1, Lq, Lk) tensor
    rs, re, cs, ce = r0[:, 0].tolist(), r1[:, 0].tolist(), c0[0].tolist(), c1[0].tolist()
    out = torch.empty(a.shape[0], a.shape[1], len(rs), len(cs), dtype=torch.int8, device=a.device)
    for i, (s, e) in enumerate(zip(rs, re)):
        for j, (cs_, ce_) in enumerate(zip(cs, ce)):
            blk = a[:, :, s:e, cs_:ce_]
            out[:, :, i, j] = _kinds(~blk.any(-1).any(-1), blk.all(-1).all(-1))
    return out


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


class Function(Mask):
    """FlexAttention's ``mask_mod``: ``fn(b, h, q_idx, kv_idx) -> bool`` on broadcast int32 index tensors.

    ``fn`` is called with int32 tensors b (B, 1, 1, 1), h (1, H, 1, 1), q_idx (1, 1, R, 1) and
    kv_idx (1, 1, 1, C) and must return a bool tensor that broadcasts to (B, H, R, C) (True =
    may attend). Fused kernels evaluate it once per call, a block of rows at a time, and keep
    only the bits of partial tiles.

    Its tile map and bits are cached per mask object across calls, and made again when what ``fn``
    reads changes: the tensors it reads (by identity and in-place version) and the numbers and
    strings, among its closure cells, defaults and the globals its code names, and the same of the
    Python functions it reaches that way (:meth:`reads`). Data it reaches another way (an attribute
    of an object, an element of a list) is not seen: build a new ``masks.function`` when that changes.
    """

    kinds = frozenset({"function"})

    def __init__(self, fn: Callable):
        if not callable(fn):
            raise TypeError(f"function: fn must be callable as fn(b, h, q_idx, kv_idx), got {type(fn).__name__}")
        self.fn = fn

    @property
    def name(self) -> str:
        return getattr(self.fn, "__name__", type(self.fn).__name__)

    def reads(self) -> tuple:
        """(tensors, values): the tensors ``fn`` reads besides its arguments, and the numbers, strings and
        None it reads, as far as Python shows them (closure cells, defaults, the globals its code names,
        three functions deep). Caches of the lowered mask hold both: a change makes the mask again."""
        tensors, values = [], []
        _collect_reads(self.fn, 3, set(), tensors, values)
        return tuple(tensors), tuple(values)

    def cache_key(self):
        # identity, plus the plain values fn reads (a closure's int that moved changes the key)
        return ("id", id(self), self.reads()[1])

    def evaluate(self, g: Geometry, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """bool (B|1, H|1, R, C): fn on the given query rows and key columns."""
        dev, i32 = g.device, torch.int32  # int32 indices (as FlexAttention passes them): half the memory traffic
        b = torch.arange(g.batch, device=dev, dtype=i32).view(-1, 1, 1, 1)
        h = torch.arange(g.heads, device=dev, dtype=i32).view(1, -1, 1, 1)
        qi = rows.to(dev, i32).view(1, 1, -1, 1)
        ki = cols.to(dev, i32).view(1, 1, 1, -1)
        try:
            out = self.fn(b, h, qi, ki)
        except Exception as e:  # a user's function: say whose error it is
            raise ValueError(f"mask function {self.name!r} raised {type(e).__name__}: {e}") from e
        if isinstance(out, bool):
            out = torch.tensor(out, device=dev)
        if not isinstance(out, torch.Tensor) or out.dtype != torch.bool:
            got = f"dtype {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise TypeError(f"mask function {self.name!r} must return a bool tensor, got {got}")
        want = (g.batch, g.heads, rows.numel(), cols.numel())
        if out.dim() > 4:
            raise ValueError(f"mask function {self.name!r} returned shape {tuple(out.shape)}; it must broadcast to (B, H, R, C) = {want}")
        out = out.reshape((1,) * (4 - out.dim()) + tuple(out.shape))
        try:
            ok = _broadcast_shapes(out.shape, want) == want
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"mask function {self.name!r} returned shape {tuple(out.shape)}; it must broadcast to (B, H, R, C) = {want}")
        return out.expand(out.shape[0], out.shape[1], want[2], want[3])

    def _allowed(self, g, rows):
        return self.evaluate(g, rows, torch.arange(g.lk, device=g.device))

    def block_map_in(self, g, block_q, block_k):
        return torch.cat([dense_block_kinds(bits, r1 - r0, g.lk, block_q, block_k) for r0, r1, bits in self.chunks(g, block_q)], dim=2)

    def chunks_bounds(self, g, block_q):
        # row ranges of about 2**20 evaluated pairs each, whole query blocks: a function's int temporaries
        # (8 bytes a pair) stay near 8 MiB, so its extra memory stays near the structured masks'
        rows = max(block_q, (1 << 20) // max(1, g.lk * g.batch * g.heads) // block_q * block_q)
        return [(r0, min(r0 + rows, g.lq)) for r0 in range(0, g.lq, rows)]

    def chunks(self, g, block_q):
        """(r0, r1, bits (B|1, H|1, r1 - r0, Lk)) for row ranges that cover Lq in whole query blocks."""
        cols = torch.arange(g.lk, device=g.device)
        for r0, r1 in self.chunks_bounds(g, block_q):
            yield r0, r1, self.evaluate(g, torch.arange(r0, r1, device=g.device), cols)

    def _tile_kinds(self, g, r0, r1, c0, c1):
        return _tiles_by_loop(self._allowed(g, torch.arange(g.lq, device=g.device)), r0, r1, c0, c1)

    def __repr__(self):
        return f"function({self.name})"


_PLAIN_VALUES = (int, float, complex, str, bytes, bool, type(None))


def _collect_reads(fn, depth, seen, tensors, values):
    # what fn reads besides its arguments (Function.reads): tensors into `tensors`, plain values into `values`
    if isinstance(fn, functools.partial):
        objs = list(fn.args) + list((fn.keywords or {}).values()) + [fn.func]
    elif isinstance(fn, types.MethodType):
        objs = [fn.__func__]
    elif isinstance(fn, types.FunctionType):
        if id(fn) in seen:
            return
        seen.add(id(fn))
        objs = []
        for cell in fn.__closure__ or ():
            try:
                objs.append(cell.cell_contents)
            except ValueError:  # an empty cell (a name bound later)
                objs.append(None)
        objs.extend(fn.__defaults__ or ())
        objs.extend((fn.__kwdefaults__ or {}).values())
        glob = fn.__globals__
        objs.extend(glob[n] for n in fn.__code__.co_names if n in glob)
    else:
        return
    for o in objs:
        if isinstance(o, torch.Tensor):
            tensors.append(o)
        elif isinstance(o, _PLAIN_VALUES):
            values.append(o)
        elif depth > 1 and isinstance(o, (types.FunctionType, functools.partial, types.MethodType)):
            _collect_reads(o, depth - 1, seen, tensors, values)


class And(Mask):
    """Pairs allowed by every part; float biases add up."""

    def __init__(self, *parts: Mask):
        flat: list[Mask] = []
        for p in parts:
            flat.extend(p.parts if isinstance(p, And) else [p])
        self.parts = tuple(flat)
        self.kinds = frozenset().union(*(p.kinds for p in self.parts))

    def block_map_in(self, g, block_q, block_k):
        out = self.parts[0].block_map_in(g, block_q, block_k)
        for p in self.parts[1:]:
            out = _combine_kinds(out, p.block_map_in(g, block_q, block_k))
        return out

    def check(self, batch, heads, lq, lk, device):
        for p in self.parts:
            p.check(batch, heads, lq, lk, device)

    def _allowed(self, g, rows):
        out = self.parts[0]._allowed(g, rows)
        for p in self.parts[1:]:
            out = out & p._allowed(g, rows)
        return out

    def _bias(self, g, rows):
        out = None
        for p in self.parts:
            b = p._bias(g, rows)
            if b is not None:
                out = b if out is None else out + b
        return out

    def _tile_kinds(self, g, r0, r1, c0, c1):
        out = self.parts[0]._tile_kinds(g, r0, r1, c0, c1)
        for p in self.parts[1:]:
            out = _combine_kinds(out, p._tile_kinds(g, r0, r1, c0, c1))
        return out

    def cache_key(self):
        return ("and",) + tuple(p.cache_key() for p in self.parts)

    def __repr__(self):
        return " & ".join(repr(p) for p in self.parts)


def parts(mask: Mask | None) -> tuple:
    """The atomic masks inside ``mask`` (an ``And`` flattened), or () for None."""
    if mask is None:
        return ()
    return mask.parts if isinstance(mask, And) else (mask,)


# -- constructors: the public way to build masks --------------------------------------------


def causal() -> Mask:
    """Causal mask: a query at position p sees keys at positions <= p (bottom-right aligned by default)."""
    return Causal()


def window(left: int | None, right: int | None = 0) -> Mask:
    """Sliding window: a query at position p sees keys at p - left .. p + right (None = unbounded; ``right=0``: causal window)."""
    return Window(left, right)


def padding(kv_lengths: Sequence[int] | torch.Tensor, q_lengths: Sequence[int] | torch.Tensor | None = None) -> Mask:
    """Right padding: batch element b has ``kv_lengths[b]`` real keys and ``q_lengths[b]`` real queries.

    Padded query rows are fully masked, so their output is 0.
    """
    return Padding(kv_lengths, q_lengths)


def key_padding(keep: torch.Tensor) -> Mask:
    """Key padding in any pattern: ``keep`` (B, Lk) bool, True = a real key."""
    return KeyPadding(keep)


def documents(segment_ids, q_segment_ids=None) -> Mask:
    """Packed documents: a query sees only keys with the same segment id. Combine with ``causal()``."""
    return Documents(segment_ids, q_segment_ids)


def dense(tensor: torch.Tensor) -> Mask:
    """An explicit mask: bool (True = may attend) or float (added to the scores)."""
    return Dense(tensor)


def function(fn: Callable) -> Mask:
    """A mask from ``fn(b, h, q_idx, kv_idx) -> bool tensor`` (FlexAttention's ``mask_mod``).

    Example (prefix-LM with a 16-token prefix)::

        masks.function(lambda b, h, q, kv: (kv <= q) | (kv < 16))
    """
    return Function(fn)


# -- layouts: positions and masks for the common batch shapes ------------------------------------


class Layout(Mapping):
    """Positions and a mask for one batch layout; pass as ``attention(q, k, v, **layout)``.

    Fields ``mask``, ``q_positions``, ``kv_positions``. Combine the mask with others through
    ``layout.mask & masks.causal()`` (or pass ``causal=True``).
    """

    def __init__(self, mask, q_positions, kv_positions):
        self.mask, self.q_positions, self.kv_positions = mask, q_positions, kv_positions

    def __getitem__(self, name):
        if name not in ("mask", "q_positions", "kv_positions"):
            raise KeyError(name)
        return getattr(self, name)

    def __iter__(self):
        return iter(("mask", "q_positions", "kv_positions"))

    def __len__(self):
        return 3

    def __repr__(self):
        return f"Layout(mask={self.mask!r}, q_positions {tuple(self.q_positions.shape)}, kv_positions {tuple(self.kv_positions.shape)})"


def _lengths_tensor(name, x) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dim() != 1:
        raise TypeError(f"{name} must be a 1-D integer tensor of shape (B,), got dtype {t.dtype} and shape {tuple(t.shape)}")
    return t.long()


def varlen(q_lengths, kv_lengths, lq: int, lk: int) -> Layout:
    """FlashAttention's variable-length alignment on a right-padded batch.

    Sequence b has ``q_lengths[b]`` queries and ``kv_lengths[b]`` keys at the start of its rows;
    its query i sits at position i + kv_lengths[b] - q_lengths[b] (bottom-right per sequence).
    The mask rules out padded keys and padded query rows.
    """
    ql, kl = _lengths_tensor("q_lengths", q_lengths), _lengths_tensor("kv_lengths", kv_lengths)
    if ql.shape != kl.shape:
        raise ValueError(f"varlen: q_lengths {tuple(ql.shape)} and kv_lengths {tuple(kl.shape)} must both be (B,)")
    if ql.numel() and (int(ql.min()) < 0 or int(ql.max()) > lq or int(kl.min()) < 0 or int(kl.max()) > lk):
        raise ValueError(f"varlen: lengths must lie in [0, Lq={lq}] and [0, Lk={lk}], got q_lengths {ql.tolist()}, kv_lengths {kl.tolist()}")
    q_pos = torch.arange(lq, device=ql.device)[None] + (kl - ql)[:, None]  # (B, Lq)
    kv_pos = torch.arange(lk, device=ql.device)[None].expand(ql.shape[0], -1)  # (B, Lk)
    return Layout(padding(kl, ql), q_pos, kv_pos.contiguous())


def left_padded(lengths, lk: int, lq: int | None = None) -> Layout:
    """A left-padded batch (how transformers batches prompts): sequence b's ``lengths[b]`` real keys
    are the last ones of its row, at positions 0 .. lengths[b] - 1.

    Queries are the last ``lq`` rows (default ``lq = lk``; fewer when decoding with a cache), at
    the positions of the keys in the same slots. Padded keys are masked (``key_padding``).
    """
    lens = _lengths_tensor("lengths", lengths)
    lq = lk if lq is None else lq
    if lens.numel() and (int(lens.min()) < 0 or int(lens.max()) > lk):
        raise ValueError(f"left_padded: lengths must lie in [0, {lk}], got {lens.tolist()}")
    if not 0 <= lq <= lk:
        raise ValueError(f"left_padded: lq must lie in [0, Lk={lk}], got {lq}")
    kv_pos = torch.arange(lk, device=lens.device)[None] - (lk - lens)[:, None]  # (B, Lk) negative = padding
    keep = kv_pos >= 0
    return Layout(key_padding(keep), kv_pos[:, lk - lq:].contiguous(), kv_pos)


def packed(cu_seqlens_q, cu_seqlens_k=None) -> Layout:
    """Packed sequences from cumulative lengths (FlashAttention's ``cu_seqlens``), batch size 1.

    Document d holds rows ``cu[d] .. cu[d+1] - 1``; positions restart at 0 in each document,
    and with separate ``cu_seqlens_k`` the queries of a document are aligned bottom-right on
    its keys. The mask keeps each query inside its own document.
    """
    cq = _lengths_tensor("cu_seqlens_q", cu_seqlens_q)
    ck = cq if cu_seqlens_k is None else _lengths_tensor("cu_seqlens_k", cu_seqlens_k)
    for name, c in (("cu_seqlens_q", cq), ("cu_seqlens_k", ck)):
        if c.numel() < 1 or int(c[0]) != 0 or bool((c[1:] < c[:-1]).any()):
            raise ValueError(f"packed: {name} must start at 0 and never decrease, got {c.tolist()}")
    if cq.numel() != ck.numel():
        raise ValueError(f"packed: cu_seqlens_q and cu_seqlens_k must have the same length, got {cq.numel()} and {ck.numel()}")

    def seg(c):
        total = int(c[-1])
        idx = torch.arange(total, device=c.device)
        ids = torch.searchsorted(c[1:], idx, right=True)  # document of each row
        return ids, idx - c[ids]

    q_ids, q_off = seg(cq)
    kv_ids, kv_off = seg(ck)
    q_len, k_len = cq[1:] - cq[:-1], ck[1:] - ck[:-1]
    q_pos = q_off + (k_len - q_len)[q_ids]  # bottom-right inside each document
    return Layout(documents(kv_ids, q_ids), q_pos[None], kv_off[None])
