"""A mask lowered once per call into the record both fused backends read.

In the spirit of FlexAttention's ``BlockMask``: the tile map (which (query block, key block)
tiles are empty, full or partial) plus the element-wise parameters that a partial tile
needs. A fused kernel skips EMPTY tiles, runs FULL tiles with no masking, and applies the
element-wise tests below only inside PARTIAL tiles::

    band       -left <= kv_pos - q_pos <= right      (causal is right = 0; None = unbounded)
    padding    key index j < kv_lens[b], query index i < q_lens[b]
    key_keep   kv_keep[b, j]
    documents  q_ids[d, b, i] == kv_ids[d, b, j] for every d
    dense      allow[b, h, i, j] and bias[b, h, i, j] != -inf
    function   fn_bits[fn_index[b, h, qb, kb], i % block_q, j % block_k] (when fn_index >= 0)

Every pair also gets ``bias`` added (float dense masks) and ``-alibi[b, h] * |q_pos - kv_pos|``
(ALiBi) after the scale and the softcap, in float32 (float64 for float64 inputs).

:func:`lower` caches its records per (mask, sizes, positions, block size): a training step
or a decoding loop that asks again gets the same record back without recomputing it.
Attention sinks are not part of the mask; :func:`sink_stats` and :func:`sink_grad` give the
fused backends the few lines they need around an unchanged kernel.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from . import masks as _masks
from .masks import EMPTY, FULL, PARTIAL, Geometry
from .request import Request

__all__ = ["LoweredMask", "lower", "allowed", "clear_cache", "sink_stats", "sink_grad"]


@dataclass(frozen=True, eq=False)
class LoweredMask:
    """One call's mask as fused kernels read it (tensors on the inputs' device; None = absent)."""

    block_q: int  # query rows per tile
    block_k: int  # keys per tile
    tiles: torch.Tensor  # int8 (B|1, H|1, nQ, nK): TileKind of the whole mask per tile
    q_pos: torch.Tensor  # int64 (B|1, Lq): position of each query
    kv_pos: torch.Tensor  # int64 (B|1, Lk): position of each key
    default_positions: bool  # q_pos = arange(Lq) + Lk - Lq and kv_pos = arange(Lk)
    win_left: int | None  # band: kv_pos - q_pos >= -win_left (None = unbounded)
    win_right: int | None  # band: kv_pos - q_pos <= win_right (causal: 0; None = unbounded)
    kv_lens: torch.Tensor | None  # int64 (B,): keys j < kv_lens[b] are real (padding())
    q_lens: torch.Tensor | None  # int64 (B,): queries i < q_lens[b] are real
    kv_keep: torch.Tensor | None  # bool (B, Lk): key_padding() masks AND-ed
    q_ids: torch.Tensor | None  # int64 (ND, B|1, Lq): documents() query ids
    kv_ids: torch.Tensor | None  # int64 (ND, B|1, Lk): documents() key ids
    allow: torch.Tensor | None  # bool (B|1, H|1, Lq|1, Lk|1): dense bool masks AND-ed
    bias: torch.Tensor | None  # float (B|1, H|1, Lq|1, Lk|1): dense float masks summed (-inf = ruled out)
    fn_index: torch.Tensor | None  # int32 (B|1, H|1, nQ, nK): index into fn_bits of a partial function tile, else -1
    fn_bits: torch.Tensor | None  # bool (nP, block_q, block_k): the function's bits in its partial tiles only
    alibi: torch.Tensor | None  # float32 (B|1, Hq): ALiBi slopes

    @property
    def banded(self) -> bool:
        return self.win_left is not None or self.win_right is not None

    @property
    def elementwise(self) -> frozenset:
        """Names of the element-wise tests a partial tile needs."""
        f = set()
        if self.banded:
            f.add("band")
        for name in ("kv_lens", "q_lens", "kv_keep", "q_ids", "allow", "bias", "fn_index"):
            if getattr(self, name) is not None:
                f.add(name)
        return frozenset(f)

    def tile_counts(self) -> dict:
        """How many tiles (over batch and heads as stored) are empty, partial and full."""
        return {k.name.lower(): int((self.tiles == int(k)).sum()) for k in (EMPTY, PARTIAL, FULL)}


# -- the cache --------------------------------------------------------------------------------

_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_CACHE_SIZE = 32


def clear_cache() -> None:
    """Forget every lowered mask (they are also dropped, oldest first, past 32 entries)."""
    _CACHE.clear()
    _PLAIN.clear()


def tensor_version(t):
    """``t._version``, or for an inference tensor (made under torch.inference_mode(), which keeps no version
    counter and may still be changed in place there) a new object each time: never equal, never a cache hit."""
    return object() if t.is_inference() else t._version


def _tensor_key(t):
    return None if t is None else (id(t), tensor_version(t), t.data_ptr(), tuple(t.shape))


def _mask_tensors(mask):
    for p in _masks.parts(mask):
        if isinstance(p, _masks.Padding):
            yield p.kv_lengths
            yield p.q_lengths
        elif isinstance(p, _masks.KeyPadding):
            yield p.keep
        elif isinstance(p, _masks.Documents):
            yield p.kv_ids
            yield p.q_ids
        elif isinstance(p, _masks.Dense):
            yield p.tensor
        elif isinstance(p, _masks.Function):
            yield from p.reads()[0]  # the tensors the function reads (a document-id tensor the next batch rewrites)


def _cache_key(req: Request, what):
    mkey = None if req.mask is None else req.mask.cache_key()
    tensors = tuple(_tensor_key(t) for t in _mask_tensors(req.mask))
    # positions are compared by value on a hit (a per-call positions tensor is a new object each time)
    shapes = tuple(None if t is None else tuple(t.shape) for t in (req.q_positions, req.kv_positions))
    return (mkey, tensors, req.batch, req.q_heads, req.q_len, req.kv_len, what, str(req.device),
            shapes, _tensor_key(req.alibi_slopes))


def _same(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and a.shape == b.shape and bool(torch.equal(a, b)))


#: the plain calls' records (no mask, or causal alone; default positions, no ALiBi) by their sizes:
#: their lowering depends on nothing else, so the general key (a few microseconds) is not needed
_PLAIN: "OrderedDict[tuple, LoweredMask]" = OrderedDict()


def lower(req: Request, block_q: int, block_k: int) -> LoweredMask:
    """The request's mask, positions and ALiBi slopes as one :class:`LoweredMask` for tiles of
    ``block_q`` x ``block_k`` (cached)."""
    mask = req.mask
    if (mask is None or type(mask) is _masks.Causal) and req.q_positions is None and req.kv_positions is None \
            and req.alibi_slopes is None:
        key = (mask is None, req.batch, req.q_heads, req.q_len, req.kv_len, block_q, block_k, req.device)
        low = _PLAIN.get(key)
        if low is None:
            low = _PLAIN[key] = _lower(req, block_q, block_k)
            while len(_PLAIN) > _CACHE_SIZE:
                _PLAIN.popitem(last=False)
        return low
    return _cached(req, (block_q, block_k), lambda: _lower(req, block_q, block_k))


def allowed(req: Request) -> torch.Tensor:
    """The request's mask (not None) as bits, ``(B|1, H|1, Lq, Lk)`` bool, contiguous; cached as :func:`lower`
    is, so the layers of one model forward, which share their mask, compute it once. Read-only."""
    return _cached(req, "allowed", lambda: req.mask.allowed_in(req.geometry).contiguous())


def _cached(req: Request, what, build):
    # build() for the request's mask, positions and ALiBi slopes, kept in _CACHE under `what`
    key = _cache_key(req, what)
    hit = _CACHE.get(key)
    # identity keys could be reused by a new object after the old one is freed: the entry keeps
    # the objects it was built from and must still hold the very same mask, and equal positions
    if hit is not None and (hit[1] is req.mask or _by_value(req.mask)) \
            and _same(hit[2], req.q_positions) and _same(hit[3], req.kv_positions):
        _CACHE.move_to_end(key)
        return hit[0]
    value = build()
    kept = [None if t is None else t.clone() for t in (req.q_positions, req.kv_positions)]
    # the entry keeps the mask's tensors alive (a function's globals too), so their ids in the key are not reused
    _CACHE[key] = (value, req.mask, *kept, req.alibi_slopes, tuple(_mask_tensors(req.mask)))
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return value


def _by_value(mask) -> bool:
    # masks whose cache keys are their values (causal, windows) or the identity of their tensors
    # (dense, padding, key_padding, documents): a new object with the same key is the same mask.
    # Tensor identities are safe: the cached entry keeps the old mask, so its tensors, alive, and
    # the key holds each tensor's version (an in-place change misses). Functions compare by identity.
    return all(p.cache_key()[0] != "id" for p in _masks.parts(mask))


def _min_bound(a, b):
    # the tighter of two window sides; None = unbounded
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def _lower(req: Request, block_q: int, block_k: int) -> LoweredMask:
    g = req.geometry
    dev = req.device
    lq, lk = req.q_len, req.kv_len
    nq, nk = -(-lq // block_q), -(-lk // block_k)
    left = right = None
    banded = False
    kv_lens = q_lens = keep = allow = bias = None
    q_ids, kv_ids, functions, structural = [], [], [], []
    for part in _masks.parts(req.mask):
        if isinstance(part, _masks.Causal):
            right, banded = _min_bound(right, 0), True
        elif isinstance(part, _masks.Window):
            left, right, banded = _min_bound(left, part.left), _min_bound(right, part.right), True
        elif isinstance(part, _masks.Padding):
            kv = part.kv_lengths.to(dev)
            kv_lens = kv if kv_lens is None else torch.minimum(kv_lens, kv)
            if part.q_lengths is not None:
                ql = part.q_lengths.to(dev)
                q_lens = ql if q_lens is None else torch.minimum(q_lens, ql)
            structural.append(part)
        elif isinstance(part, _masks.KeyPadding):
            keep = part.keep.to(dev) if keep is None else keep & part.keep.to(dev)
            structural.append(part)
        elif isinstance(part, _masks.Documents):
            qi, ki = part.ids(lq, lk, dev)
            q_ids.append(qi)
            kv_ids.append(ki)
            structural.append(part)
        elif isinstance(part, _masks.Dense):
            t = part.t4().to(dev)  # (B|1, H|1, Lq|1, Lk|1)
            if t.dtype == torch.bool:
                allow = t if allow is None else allow & t
            else:
                bias = t if bias is None else bias + t
        elif isinstance(part, _masks.Function):
            functions.append(part)
        else:
            raise TypeError(f"mask: cannot lower a {type(part).__name__} (a Mask subclass the fused kernels do not know)")
    if banded:
        # causal and windows AND-ed are one band; None on both sides happens only for causal & window(None, x)
        structural.append(_masks.Window(left, right) if (left, right) != (None, None) else _masks.Causal())
        if left is None and right is None:
            right = 0
    tiles = torch.full((1, 1, nq, nk), int(FULL), dtype=torch.int8, device=dev)
    for part in structural:
        tiles = _masks._combine_kinds(tiles, part.block_map_in(g, block_q, block_k))
    dense = allow
    if bias is not None:
        finite = bias != float("-inf")  # -inf entries of a float mask rule pairs out
        dense = finite if dense is None else dense & finite
    if dense is not None:
        tiles = _masks._combine_kinds(tiles, _masks.dense_block_kinds(dense, lq, lk, block_q, block_k))
    fn_index = fn_bits = None
    if functions:
        tiles, fn_index, fn_bits = _lower_functions(functions, g, tiles, block_q, block_k)
    tiles = tiles.expand(tiles.shape[0], tiles.shape[1], nq, nk).contiguous()
    return LoweredMask(
        block_q=block_q, block_k=block_k, tiles=tiles, q_pos=g.q_pos(), kv_pos=g.kv_pos(),
        default_positions=g.default_positions, win_left=left, win_right=right,
        kv_lens=kv_lens, q_lens=q_lens, kv_keep=keep,
        q_ids=_stack_ids(q_ids), kv_ids=_stack_ids(kv_ids), allow=allow, bias=bias,
        fn_index=fn_index, fn_bits=fn_bits, alibi=req.alibi_slopes,
    )


def _stack_ids(ids):
    if not ids:
        return None
    bd = max(t.shape[0] for t in ids)
    return torch.stack([t.expand(bd, -1) for t in ids]).long()  # (ND, B|1, L)


def _lower_functions(functions, g: Geometry, tiles, block_q, block_k):
    """Evaluate the function masks a block of query rows at a time; keep the bits of partial tiles.

    Only the key blocks that the other parts leave open in those rows are evaluated (a function
    AND-ed with ``causal()`` costs half). Returns the combined tile map, fn_index
    (B|1, H|1, nQ, nK) int32 and fn_bits (nP, block_q, block_k).
    """
    dev = g.device
    nk = -(-g.lk // block_k)
    kinds_rows, index_rows, bits = [], [], []
    n_stored = 0
    for r0, r1 in functions[0].chunks_bounds(g, block_q):
        rows, qb0 = r1 - r0, r0 // block_q
        nqc = -(-rows // block_q)
        other = tiles[:, :, qb0:qb0 + nqc]  # (Bt, Ht, nqc, nK) what the other parts allow here
        live = torch.nonzero((other != EMPTY).reshape(-1, nk).any(0)).flatten()
        if live.numel() == 0:
            kinds_rows.append(torch.full((1, 1, nqc, nk), int(EMPTY), dtype=torch.int8, device=dev))
            index_rows.append(torch.full((1, 1, nqc, nk), -1, dtype=torch.int32, device=dev))
            continue
        kb0, kb1 = int(live[0]), int(live[-1]) + 1
        c0, c1 = kb0 * block_k, min(kb1 * block_k, g.lk)
        row_idx, col_idx = torch.arange(r0, r1, device=dev), torch.arange(c0, c1, device=dev)
        chunk = functions[0].evaluate(g, row_idx, col_idx)  # (Bf, Hf, rows, c1 - c0) bool
        for fn in functions[1:]:
            chunk = chunk & fn.evaluate(g, row_idx, col_idx)
        bf, hf, ncb = chunk.shape[0], chunk.shape[1], kb1 - kb0
        padded = torch.nn.functional.pad(chunk, (0, ncb * block_k - (c1 - c0), 0, nqc * block_q - rows), value=False)
        blocks = padded.reshape(bf, hf, nqc, block_q, ncb, block_k)  # tile (qb, kb) = blocks[:, :, qb, :, kb, :]
        count = blocks.sum(dim=(3, 5), dtype=torch.int32)  # (Bf, Hf, nqc, ncb) allowed pairs per tile
        size = (torch.clamp(rows - torch.arange(nqc, device=dev) * block_q, max=block_q)[:, None]
                * torch.clamp((c1 - c0) - torch.arange(ncb, device=dev) * block_k, max=block_k)[None, :])  # (nqc, ncb)
        fk = torch.full((bf, hf, nqc, nk), int(EMPTY), dtype=torch.int8, device=dev)
        fk[..., kb0:kb1] = _masks._kinds(count == 0, count == size)
        kinds = _masks._combine_kinds(fk, other)
        partial = ((fk == PARTIAL) & (kinds != EMPTY)).expand(kinds.shape)  # tiles others rule out need no bits
        index = torch.full(partial.shape, -1, dtype=torch.int32, device=dev)
        n = int(partial.sum())
        if n:
            index[partial] = torch.arange(n_stored, n_stored + n, dtype=torch.int32, device=dev)
            sel = partial[..., kb0:kb1]  # (B', H', nqc, ncb)
            tiles_bits = blocks.permute(0, 1, 2, 4, 3, 5).expand(sel.shape[0], sel.shape[1], nqc, ncb, block_q, block_k)
            bits.append(tiles_bits[sel].contiguous())  # (n, bq, bk) in the order of the indices
            n_stored += n
        kinds_rows.append(kinds)
        index_rows.append(index)
    shape0 = max(k.shape[0] for k in kinds_rows)
    shape1 = max(k.shape[1] for k in kinds_rows)
    tiles = torch.cat([k.expand(shape0, shape1, -1, -1) for k in kinds_rows], dim=2)
    fn_index = torch.cat([i.expand(shape0, shape1, -1, -1) for i in index_rows], dim=2).contiguous()
    fn_bits = torch.cat(bits) if bits else torch.zeros(0, block_q, block_k, dtype=torch.bool, device=dev)
    return tiles, fn_index, fn_bits


# -- attention sinks around an unchanged kernel ----------------------------------------------------


def sink_stats(lse_k: torch.Tensor, ent_k: torch.Tensor | None, sinks: torch.Tensor):
    """Fold sinks into a kernel's statistics over keys.

    ``lse_k``/``ent_k`` (B, Hq, Lq) over the keys alone (nats, accumulation dtype), ``sinks`` (Hq,).
    Returns (lse, entropy or None, keys_mass) with lse = log(exp(lse_k) + exp(sink)), the entropy
    of the (keys + sink) distribution, and keys_mass = exp(lse_k - lse): multiply the kernel's
    output by it (its weights were normalised over the keys alone).
    """
    s = sinks.detach().to(lse_k.dtype)[None, :, None]  # (1, Hq, 1)
    lse = torch.logaddexp(lse_k, s.expand_as(lse_k))  # (B, Hq, Lq) finite even for a fully-masked row
    mass = torch.exp(lse_k - lse)  # (B, Hq, Lq) probability on the keys; 0 for a fully-masked row
    ent = None
    if ent_k is not None:
        p_sink = torch.exp(s - lse)  # (B, Hq, Lq)
        xlogx = lambda p: torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))  # noqa: E731
        ent = mass * ent_k - xlogx(mass) - xlogx(p_sink)
        ent = torch.where(torch.isnan(ent_k), ent_k, ent.clamp_min(0))
    return lse, ent, mass


def sink_grad(sinks: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor, out: torch.Tensor,
              delta: torch.Tensor | None = None) -> torch.Tensor:
    """d loss / d sinks (Hq,): -sum over batch and rows of p_sink * rowsum(dO * O).

    ``lse`` is the full log-sum-exp (sink included), ``out`` the full output, unrounded where the caller
    has it (a bfloat16 output's rounding reaches d sinks: rowsum(dO * O) is a difference of near terms).
    ``delta`` (B, Hq, Lq): rowsum(dO * O) computed already (a backward kernel's rowsum(P * dP)); then
    ``out`` is not read.
    """
    acc = lse.dtype
    p_sink = torch.exp(sinks.detach().to(acc)[None, :, None] - lse)  # (B, Hq, Lq)
    if delta is None:
        delta = (grad_out.to(acc) * out.to(acc)).sum(-1)  # (B, Hq, Lq)
    else:
        p_sink = p_sink.to(torch.promote_types(delta.dtype, acc))
        delta = delta.to(p_sink.dtype)
    return -(p_sink * delta).sum(dim=(0, 2)).to(sinks.dtype)  # (Hq,)
