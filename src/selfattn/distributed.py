"""Ring (context-parallel) attention on torch.distributed: one sequence split across processes.

Each rank of a process group holds one shard of the sequence: its queries, keys and values
(B, H, L/W, D). Key/value shards (only the Hkv heads: grouped-query attention never repeats
them) travel around the ring, rank r sending to r + 1 and receiving from r - 1, while each
rank runs attention of its own queries against the shard it holds now. The partial results
merge through the log-sum-exp (float32, float64 for float64 inputs), so the output and the
statistics are those of the unsharded call, not an approximation:

    lse  = log sum_k exp(lse_k)                       w_k = exp(lse_k - lse)
    out  = sum_k w_k out_k
    max  = max_k max_k
    H    = sum_k w_k (H_k - log w_k)                  (entropy: -sum p log p with p = w_k p^(k))

Global positions make each shard's piece exact: the queries and keys of a piece carry their
positions in the whole sequence, so causal and window masks read the right distances, and
``documents`` / ``key_padding`` / ``padding`` masks (given over the whole sequence) are
sliced to the piece. A piece that a mask rules out entirely is skipped; a piece the mask
allows entirely runs with no mask at all. Pieces aligned like an unsharded causal call (the
diagonal) run with default positions; only the others pass positions (a backend without
positions then hands them to ``math`` under ``backend="auto"``). With ALiBi every piece off
the diagonal passes positions (the bias reads each pair's distance).

Sinks (per-head logits with a zero value) join each row's softmax once, after the last shard:
one more part of the merge with lse = sink, output 0, entropy 0 and no max_logit. Their
gradient, -sum_rows exp(sink - lse) delta, is this rank's queries' share.

Layouts (W = 4 ranks, sequence in 8 chunks)::

    contiguous  rank 0: 0 1 | rank 1: 2 3 | rank 2: 4 5 | rank 3: 6 7
    balanced    rank 0: 0 7 | rank 1: 1 6 | rank 2: 2 5 | rank 3: 3 4   (head-tail / zigzag)

With a causal mask the contiguous layout leaves rank 0 almost idle (its queries see only its
own keys) while rank W-1 sees everything; the balanced layout gives every rank the same work.

The backward is a ``torch.autograd.Function``: the key/value shards travel the ring once
more, and their gradients travel with them (float32/float64 accumulators) back to their owners.
Each piece's gradient needs the *global* statistics: P_ij = exp(s_ij - lse_i) with the
global lse, dS = P * (dP - delta) with delta_i = rowsum(dO_i * O_i) of the merged output.
With the cpu backend (``backend="auto"`` or ``"cpu"`` on CPU tensors) each piece's share comes from
the fused kernels (``selfattn.backends.cpu.shard_backward``, which takes that global lse and
delta); otherwise from torch ops in blocks of 256 query rows x 1024 keys (memory O(block), never
O(shard length^2)).

Errors: every rank checks its own call (and resolves the backend of every piece it will run),
then the ranks compare one small summary (shapes, dtype, layout, mask, scale, softcap, grad)
with one ``all_gather``; a bad call raises on every rank instead of leaving some ranks waiting
for the others. Collectives and transfers are bounded by the group's timeout
(``init_process_group(timeout=)``) and, for the agreement and the transfers, by ``timeout=``
seconds when given.

Example (under ``torchrun --nproc_per_node 2``)::

    dist.init_process_group("gloo")
    q, k, v = (shard(t, 2, "balanced") for t in (q_full, k_full, v_full))
    out, stats = ring_attention(q, k, v, causal=True, return_stats=True, layout="balanced")
    full = unshard(out, 2, "balanced")
"""

from __future__ import annotations

import datetime
import math
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import backends as _backends
from . import masks as _masks
from .functional import run
from .masks import Geometry
from .request import FLOAT_DTYPES, acc_dtype, build_request, check_qkv, resolve_mask, resolve_scale
from .stats import AttentionStats

__all__ = ["ring_attention", "shard", "unshard", "LAYOUTS"]

LAYOUTS = ("contiguous", "balanced")

# the backward's score blocks: _BWD_ROWS x _BWD_COLS scores (1 MiB in float32) over all batches and heads
_BWD_ROWS, _BWD_COLS = 256, 1024
# each run of queries and of keys is cut into _SPLIT pieces (of at least _SPLIT_MIN rows): the kernels allocate
# their outputs (forward: O; backward: dQ/dK/dV) and transposed K/V per call, so pieces keep that a fraction of a shard
_SPLIT, _SPLIT_MIN = 4, 256


# -- the group ----------------------------------------------------------------------------------


def _group(group, who):
    """(group, rank, world); raises on every rank when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{who}: torch.distributed is not initialised; call torch.distributed.init_process_group "
            "('gloo' for CPU tensors, 'nccl' for CUDA) first, or start the script under torchrun")
    g = dist.group.WORLD if group is None else group
    try:
        rank = dist.get_rank(g)
    except (ValueError, RuntimeError, TypeError, AttributeError) as e:
        raise ValueError(f"{who}: group must be a process group (torch.distributed.new_group) or None for the world, "
                         f"got {group!r} ({e})") from e
    if rank < 0:
        raise ValueError(f"{who}: this process (global rank {dist.get_rank()}) is not a member of the given group")
    return g, rank, dist.get_world_size(g)


def _global_rank(g, r):
    return r if g is dist.group.WORLD else dist.get_global_rank(g, r)


def _check_layout(layout, who):
    if layout not in LAYOUTS:
        raise ValueError(f"{who}: layout must be one of {LAYOUTS}, got {layout!r}")


def _chunks(n: int, layout: str, rank: int, world: int):
    """[(local start, local end, global start)] of rank's contiguous runs of the sequence."""
    if layout == "contiguous":
        return [(0, n, rank * n)]
    c = n // 2
    return [(0, c, rank * c), (c, n, (2 * world - 1 - rank) * c)]


def _global_index(n: int, layout: str, rank: int, world: int, device=None) -> torch.Tensor:
    """int64 (n,): the global index (= position) of each of rank's n local rows."""
    return torch.cat([torch.arange(g0, g0 + (e - s), device=device) for s, e, g0 in _chunks(n, layout, rank, world)])


# -- shard / unshard ----------------------------------------------------------------------------


def shard(x: torch.Tensor, dim: int, layout: str = "contiguous", group=None) -> torch.Tensor:
    """This rank's part of ``x`` (the whole sequence along ``dim``, the same on every rank).

    ``contiguous``: rank r takes rows [r L/W, (r+1) L/W). ``balanced``: the sequence is cut into
    2W chunks and rank r takes chunks r and 2W-1-r, in that order (see the module docstring).
    L must be divisible by W (by 2W for ``balanced``). Returns a contiguous copy.
    """
    _check_layout(layout, "shard")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"shard: x must be a torch.Tensor, got {type(x).__name__}")
    _, rank, world = _group(group, "shard")
    dim = dim % x.dim() if x.dim() else dim
    length = x.shape[dim]
    parts = world if layout == "contiguous" else 2 * world
    if length % parts:
        raise ValueError(f"shard: sequence length {length} (dim {dim} of shape {tuple(x.shape)}) must be divisible by "
                         f"{'the world size' if layout == 'contiguous' else '2 x the world size'} {parts} for layout {layout!r}")
    n = length // world
    return torch.cat([x.narrow(dim, g0, e - s) for s, e, g0 in _chunks(n, layout, rank, world)], dim=dim).contiguous()


def unshard(x: torch.Tensor, dim: int, layout: str = "contiguous", group=None) -> torch.Tensor:
    """The whole sequence from every rank's shard ``x`` (the inverse of :func:`shard`), on every rank.

    Every rank must pass a shard of the same shape; a mismatch raises on every rank.
    """
    _check_layout(layout, "unshard")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"unshard: x must be a torch.Tensor, got {type(x).__name__}")
    g, rank, world = _group(group, "unshard")
    dim = dim % x.dim()
    shape = torch.tensor([x.dim(), *x.shape, *([0] * (8 - x.dim()))], dtype=torch.int64, device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape, group=g)
    if any(not torch.equal(s, shape) for s in shapes):
        seen = [tuple(s[1:1 + int(s[0])].tolist()) for s in shapes]
        raise ValueError(f"unshard: every rank must pass a shard of the same shape, got {seen} (rank order)")
    if layout == "balanced" and x.shape[dim] % 2:
        raise ValueError(f"unshard: a balanced shard holds two equal chunks, but its length along dim {dim} is {x.shape[dim]}")
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=g)
    if layout == "contiguous":
        return torch.cat(parts, dim=dim)
    heads = [p.chunk(2, dim=dim)[0] for p in parts]  # chunk r of rank r
    tails = [p.chunk(2, dim=dim)[1] for p in parts]  # chunk 2W-1-r of rank r
    return torch.cat(heads + tails[::-1], dim=dim)


# -- the plan: one call's options, resolved once ------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    rank: int
    world: int
    group: object
    layout: str
    n: int  # local sequence length
    batch: int
    q_heads: int
    kv_heads: int
    scale: float
    softcap: float | None
    band: tuple | None  # (left, right) of causal/window on positions (None = unbounded side), or None
    structural: tuple  # ("documents", kv_ids (B|1, L), q_ids (B|1, L)) / ("keep", (B, L)) / ("padding", kv_lens, q_lens)
    backend: str
    acc: torch.dtype
    timeout: datetime.timedelta | None
    alibi: torch.Tensor | None = None  # ALiBi slopes (Hq,) or (B, Hq): every piece off the diagonal then needs positions

    @property
    def length(self) -> int:
        return self.n * self.world


_REFUSED = {
    _masks.Dense: "a dense mask (bool/float tensor) over the whole sequence",
    _masks.Function: "a function mask (masks.function)",
}


def _plan_mask(mask, causal, window, batch, length, device):
    """(band, structural parts) of the combined mask, or ValueError for masks the ring cannot carry."""
    m = resolve_mask(mask, causal, window)
    left = right = None
    band = False
    structural = []
    for part in _masks.parts(m):
        if isinstance(part, _masks.Causal):
            right, band = (0 if right is None else min(right, 0)), True
        elif isinstance(part, _masks.Window):
            band = True
            if part.left is not None:
                left = part.left if left is None else min(left, part.left)
            if part.right is not None:
                right = part.right if right is None else min(right, part.right)
        elif isinstance(part, _masks.Documents):
            kv = part.kv_ids
            q = kv if part.q_ids is None else part.q_ids
            for name, ids in (("segment_ids", kv), ("q_segment_ids", q)):
                if ids.shape[0] not in (1, batch) or ids.shape[1] != length:
                    raise ValueError(f"ring_attention: documents {name} must cover the whole sequence, shape (L,) or (B, L) = "
                                     f"({batch}, {length}), got {tuple(ids.shape)}")
            structural.append(("documents", kv.to(device), q.to(device)))
        elif isinstance(part, _masks.KeyPadding):
            if tuple(part.keep.shape) != (batch, length):
                raise ValueError(f"ring_attention: key_padding keep must cover the whole sequence, (B, L) = ({batch}, {length}), "
                                 f"got {tuple(part.keep.shape)}")
            structural.append(("keep", part.keep.to(device)))
        elif isinstance(part, _masks.Padding):
            part.check(batch, 1, length, length, None)
            q = None if part.q_lengths is None else part.q_lengths.to(device)
            structural.append(("padding", part.kv_lengths.to(device), q))
        else:
            what = next((v for k, v in _REFUSED.items() if isinstance(part, k)), f"a {type(part).__name__} mask")
            raise ValueError(
                f"ring_attention: cannot carry {what} around the ring: each rank sees only its shard of the keys. "
                "Supported: causal, window, masks.documents, masks.key_padding and masks.padding, given over the whole "
                "sequence (positions are the global ones)")
    if band and left is None and right is None:
        right = 0
    return ((left, right) if band else None), tuple(structural)


def _fingerprint(t: torch.Tensor) -> int:
    # a cheap checksum of a small integer/bool tensor, to compare masks across ranks
    return zlib.crc32(t.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()) & 0x7FFFFFFF


def _signature(q, k, v, layout, band, structural, scale, softcap, grad, stats, sinks=None, alibi=None):
    """int64 summary of one call that every rank must share (decoded by _describe)."""
    sig = [*q.shape, *k.shape, *v.shape, FLOAT_DTYPES.index(q.dtype), LAYOUTS.index(layout)]
    sig += [-2, -2] if band is None else [-1 if b is None else b for b in band]
    fp = 0
    for part in structural:
        for t in part[1:]:
            fp = zlib.crc32(str((part[0], None if t is None else _fingerprint(t))).encode(), fp)
    sig += [fp, torch.tensor(scale, dtype=torch.float64).view(torch.int64).item(),
            -1 if softcap is None else torch.tensor(softcap, dtype=torch.float64).view(torch.int64).item(), int(grad), int(stats)]
    for t in (sinks, alibi):
        sig += [-1 if t is None else zlib.crc32(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes()) & 0x7FFFFFFF]
    return sig


_SIG_FIELDS = [("query shape", 0, 4), ("key shape", 4, 8), ("value shape", 8, 12), ("dtype", 12, 13), ("layout", 13, 14),
               ("window/causal band", 14, 16), ("mask contents", 16, 17), ("scale", 17, 18), ("softcap", 18, 19),
               ("requires grad", 19, 20), ("return_stats", 20, 21), ("sinks (checksum; -1: none)", 21, 22),
               ("alibi_slopes (checksum; -1: none)", 22, 23)]
_SIG_LEN = 23


def _describe(sigs):
    diffs = []
    for name, a, b in _SIG_FIELDS:
        vals = [tuple(s[a:b]) for s in sigs]
        if len(set(vals)) > 1:
            if name == "dtype":
                vals = [str(FLOAT_DTYPES[v[0]]).replace("torch.", "") for v in vals]
            elif name == "layout":
                vals = [LAYOUTS[v[0]] for v in vals]
            elif name in ("scale", "softcap"):
                vals = [None if v[0] == -1 else torch.tensor(v[0]).view(torch.float64).item() for v in vals]
            diffs.append(f"{name}: {vals}")
    return "; ".join(diffs)


def _wait(work, timeout, what):
    """Wait for one collective or transfer; a timeout raises a RuntimeError that says what was awaited."""
    try:
        if timeout is None:
            work.wait()
        else:
            work.wait(timeout)
    except RuntimeError as e:
        limit = "the group's timeout" if timeout is None else f"timeout={timeout.total_seconds():g} s"
        raise RuntimeError(f"ring_attention: {what} failed or ran past {limit} (a rank that failed, or did not make "
                           f"the same call or run the backward, leaves the others waiting): {e}") from e


def _as_timedelta(timeout):
    """``timeout=`` seconds as a timedelta; None (the group's timeout) for None and for 1e9 s or more (inf)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"ring_attention: timeout must be a positive number of seconds or None, got {timeout!r}")
    if timeout >= 1e9:  # 31 years; timedelta overflows near 1e14 s, and torch's waits count milliseconds
        return None
    return datetime.timedelta(seconds=timeout)


def _agree(g, world, error, error_type, sig, device, timeout=None):
    """One all_gather: raise on every rank if any rank's call is bad or the ranks' calls differ.

    The rank that found the problem raises its own error (its type); the others a ValueError naming it.
    ``timeout`` (a timedelta, or None for the group's) bounds the wait for the other ranks.
    """
    row = torch.tensor([1 if error else 0] + (sig if sig is not None else [0] * _SIG_LEN), dtype=torch.int64, device=device)
    rows = [torch.empty_like(row) for _ in range(world)]
    _wait(dist.all_gather(rows, row, group=g, async_op=True), timeout, "agreeing on the call with the other ranks")
    rows = [r.tolist() for r in rows]
    if any(r[0] for r in rows):
        msgs = [None] * world
        dist.all_gather_object(msgs, error, group=g)
        if error:
            raise error_type(error)
        bad = next(i for i, m in enumerate(msgs) if m)
        raise ValueError(f"ring_attention: rank {bad} refused the call: {msgs[bad]}")
    sigs = [r[1:] for r in rows]
    if any(s != sigs[0] for s in sigs):
        raise ValueError(f"ring_attention: the ranks' shards or options differ (one value per rank, in rank order): {_describe(sigs)}. "
                         "Every rank must pass shards of one shape and dtype and the same mask, layout, scale, softcap, sinks and alibi_slopes")


# -- pieces: one contiguous run of queries against one of keys --------------------------------


@dataclass
class _Piece:
    mask: object  # Mask for the piece (local indices, global positions) or None: every pair allowed
    q_positions: torch.Tensor | None  # int64 (1, nq) or None for the default alignment
    kv_positions: torch.Tensor | None
    cols: object  # callable (r0, r1) -> (c0, c1): the key range the band allows for query rows r0..r1-1


def _slice_structural(part, qidx, kidx):
    kind = part[0]
    if kind == "documents":
        return _masks.documents(part[1][:, kidx], part[2][:, qidx])
    if kind == "keep":
        return _masks.key_padding(part[1][:, kidx])
    kv_lens, q_lens = part[1], part[2]
    keep = kidx[None, :] < kv_lens[:, None]  # (B, nk) key index j < kv_len[b]
    m = _masks.key_padding(keep)
    if q_lens is not None:  # padded query rows see nothing: give them a document id no key has
        q_ids = torch.where(qidx[None, :] < q_lens[:, None], 0, -1)  # (B, nq)
        m = m & _masks.documents(torch.zeros_like(keep, dtype=torch.int64), q_ids)
    return m


def _piece(plan: _Plan, qs: int, nq: int, ks: int, nk: int, device):
    """The piece of queries at global positions qs..qs+nq-1 against keys ks..ks+nk-1, or None to skip it."""
    parts = []
    positions = None, None
    cols = lambda r0, r1: (0, nk)  # noqa: E731
    if plan.band is not None:
        left, right = plan.band
        dmin, dmax = ks - (qs + nq - 1), (ks + nk - 1) - qs  # smallest and largest kv_pos - q_pos
        if (right is not None and dmin > right) or (left is not None and dmax < -left):
            return None  # the band rules out every pair
        if not ((right is None or dmax <= right) and (left is None or dmin >= -left)):
            parts.append(_masks.causal() if (left, right) == (None, 0) else _masks.window(left, right))
            if qs - ks != nk - nq:  # not the default bottom-right alignment: say where each token sits
                positions = (torch.arange(qs, qs + nq, device=device)[None], torch.arange(ks, ks + nk, device=device)[None])

            def cols(r0, r1, left=left, right=right):  # keys a row block [r0, r1) can see, from position bounds
                c0 = 0 if left is None else max(0, qs + r0 - left - ks)
                c1 = nk if right is None else min(nk, qs + r1 - 1 + right - ks + 1)
                return c0, max(c0, c1)
    if plan.alibi is not None and positions[0] is None and qs - ks != nk - nq:  # ALiBi reads every pair's distance
        positions = (torch.arange(qs, qs + nq, device=device)[None], torch.arange(ks, ks + nk, device=device)[None])
    if plan.structural:
        qidx, kidx = torch.arange(qs, qs + nq, device=device), torch.arange(ks, ks + nk, device=device)
        sliced = [_slice_structural(p, qidx, kidx) for p in plan.structural]
        m = sliced[0] if len(sliced) == 1 else _masks.And(*sliced)
        kinds = m.block_map_in(Geometry(plan.batch, plan.q_heads, nq, nk, device=device), nq, nk)  # (B|1, H|1, 1, 1)
        if bool((kinds == _masks.EMPTY).all()):
            return None
        if not bool((kinds == _masks.FULL).all()):
            parts.append(m)
    mask = None if not parts else parts[0] if len(parts) == 1 else _masks.And(*parts)
    return _Piece(mask, positions[0], positions[1], cols)


def _split(runs, parts: int):
    """Each (local start, local end, global start) run cut into ``parts`` runs of at least _SPLIT_MIN rows."""
    out = []
    for a, b, g in runs:
        step = max(_SPLIT_MIN, -(-(b - a) // parts))
        out.extend((s, min(b, s + step), g + s - a) for s in range(a, b, step))
    return out


def _pieces(plan: _Plan, src: int, device, split: int = 1):
    """[(q rows slice, kv rows slice, piece)] of this rank's queries against rank src's keys.

    ``split``: cut each contiguous run of queries and of keys into that many (the backward's
    pieces: the fused kernels' per-call buffers grow with a piece's size, not the ring's)."""
    out = []
    q_runs = _chunks(plan.n, plan.layout, plan.rank, plan.world)
    k_runs = _chunks(plan.n, plan.layout, src, plan.world)
    if split > 1:
        q_runs, k_runs = _split(q_runs, split), _split(k_runs, split)
    for qa, qb, qg in q_runs:
        for ka, kb, kg in k_runs:
            p = _piece(plan, qg, qb - qa, kg, kb - ka, device)
            if p is not None:
                out.append((slice(qa, qb), slice(ka, kb), p))
    return out


# -- the forward ---------------------------------------------------------------------------------


def _backend_for(plan: _Plan, q, k, v, req):
    b = _backends.choose(plan.backend, q, k, v, req)
    if (req.q_positions is not None or req.kv_positions is not None) and not b.capabilities.positions:
        if plan.backend != "auto":
            raise _backends.BackendUnavailable(f"ring_attention: backend {plan.backend!r} does not support positions, "
                                               "which this mask needs for pieces off the diagonal; use backend='auto' or 'math'")
        b = _backends.get("math")
    return b.name


def _preflight(plan: _Plan, q, k, v):
    """Resolve the backend of every piece this rank will compute, before any transfer starts.

    A backend that refuses a piece would otherwise fail on one rank in the middle of the ring
    while the others wait for it. The keys of other ranks are stood in for by this rank's.
    """
    acc = plan.acc
    qa, ka, va = q.detach().to(acc), k.detach().to(acc), v.detach().to(acc)
    for src in range(plan.world):
        for qs, ks, piece in _pieces(plan, src, q.device, split=_SPLIT):  # the pieces the ring will run
            req = build_request(qa[:, :, qs], ka[:, :, ks], va[:, :, ks], mask=piece.mask, scale=plan.scale, softcap=plan.softcap,
                                alibi_slopes=plan.alibi, q_positions=piece.q_positions, kv_positions=piece.kv_positions,
                                return_stats=True, requires_grad=False)
            _backend_for(plan, qa[:, :, qs], ka[:, :, ks], va[:, :, ks], req)


def _piece_forward(plan: _Plan, q, k, v, piece: _Piece):
    """(out (B, Hq, nq, Dv), AttentionStats) of one piece, in the accumulation dtype."""
    req = build_request(q, k, v, mask=piece.mask, scale=plan.scale, softcap=plan.softcap, alibi_slopes=plan.alibi,
                        q_positions=piece.q_positions, kv_positions=piece.kv_positions, return_stats=True, requires_grad=False)
    return run(q, k, v, req, _backend_for(plan, q, k, v, req))


def _merge(state, rows, out_b, st: AttentionStats):
    """Fold one piece's (out, stats) into the running (out, lse, max, entropy) of query rows ``rows``."""
    out, lse, mx, ent = state
    lse_a = lse[:, :, rows]  # (B, Hq, r)
    lse_b = st.lse.to(lse.dtype)
    new = torch.logaddexp(lse_a, lse_b)  # (B, Hq, r); -inf only if both are
    ref = torch.where(torch.isfinite(new), new, torch.zeros_like(new))
    wa, wb = torch.exp(lse_a - ref), torch.exp(lse_b - ref)  # each part's share of the row (0 for an empty part)
    # H = sum_k w_k (H_k - log w_k), log w_k = lse_k - lse; a part with no share adds nothing
    ha = torch.where(wa > 0, wa * (ent[:, :, rows] - (lse_a - ref)), torch.zeros_like(wa))
    hb = torch.where(wb > 0, wb * (st.entropy.to(ent.dtype) - (lse_b - ref)), torch.zeros_like(wb))
    o = out[:, :, rows]  # (B, Hq, r, Dv) a view: rescaled and added to in place (no whole-piece temporaries)
    o.mul_(wa[..., None]).add_(out_b.to(out.dtype).mul_(wb[..., None]))  # out_b is this call's own: scaled in place
    ent[:, :, rows] = (ha + hb).clamp_min(0)
    mx[:, :, rows] = torch.maximum(mx[:, :, rows], st.max_logit.to(mx.dtype))
    lse[:, :, rows] = new


class _Ring:
    """Point-to-point transfers to the next rank and from the previous one (overlapped with compute)."""

    def __init__(self, plan: _Plan):
        g = plan.group
        self.group, self.timeout = g, plan.timeout
        self.next = _global_rank(g, (plan.rank + 1) % plan.world)
        self.prev = _global_rank(g, (plan.rank - 1) % plan.world)
        self.alone = plan.world == 1

    def start(self, sends, recvs):
        """Send each tensor of ``sends`` on and receive into ``recvs`` (same shapes); returns the works."""
        if self.alone:  # a ring of one: gloo cannot send to itself
            for r, t in zip(recvs, sends):
                r.copy_(t)
            return []
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in sends]
        ops += [dist.P2POp(dist.irecv, r, self.prev, self.group) for r in recvs]
        return dist.batch_isend_irecv(ops)

    def exchange_(self, tensors, pieces: int = 8):
        """Replace each tensor by the previous rank's, sending it to the next rank: in ``pieces`` slices
        through one slice-sized buffer (two whole buffers would be live otherwise). Blocks."""
        if self.alone:
            return
        flat = [t.view(-1) for t in tensors]  # contiguous
        step = max(1, -(-max(f.numel() for f in flat) // pieces))
        tmp = torch.empty(step, dtype=flat[0].dtype, device=flat[0].device)
        for f in flat:
            for a in range(0, f.numel(), step):
                part, into = f[a:a + step], tmp[:min(step, f.numel() - a)]
                self.wait(self.start([part], [into]))
                part.copy_(into)

    def wait(self, works):
        for w in works:
            _wait(w, self.timeout, f"a ring transfer (to rank {self.next}, from rank {self.prev})")


def _ring_forward(plan: _Plan, q, k, v, sinks=None):
    """(out, lse, max_logit, entropy) of this rank's queries against every rank's keys (and the sinks), in plan.acc
    (lse in float64)."""
    acc = plan.acc
    B, Hq, n, _ = q.shape
    qa = q.detach().to(acc)  # (B, Hq, n, D) low precision computes in float32
    out = torch.zeros(B, Hq, n, v.shape[-1], dtype=acc, device=q.device)  # (B, Hq, n, Dv)
    # the running lse in float64 whatever the inputs: each merge's weights exp(lse_k - lse) read it, and the backward's
    # P = exp(s - lse) too; in float32 a 3-rank float32 ring's output, dQ and dV were 2-2.5x the error of the one-process
    # call (returned as float32, as the stats always are for float32/bfloat16 inputs)
    lse = torch.full((B, Hq, n), float("-inf"), dtype=torch.float64, device=q.device)  # (B, Hq, n)
    mx, ent = torch.full((B, Hq, n), float("-inf"), dtype=acc, device=q.device), torch.zeros((B, Hq, n), dtype=acc, device=q.device)
    state = (out, lse, mx, ent)
    ring = _Ring(plan)
    # the shard held now, in the input dtype (Hkv heads only); this rank's own first: sent as it is, not copied
    kv = (k.detach().contiguous(), v.detach().contiguous())  # (B, Hkv, n, D), (B, Hkv, n, Dv)
    for step in range(plan.world):
        src = (plan.rank - step) % plan.world
        works = None
        if step < plan.world - 1:
            nxt = tuple(torch.empty_like(t) for t in kv)
            works = ring.start(kv, nxt)  # the next shard arrives while this one is computed
        kc, vc = (t.to(acc) for t in kv)  # (B, Hkv, n, D), (B, Hkv, n, Dv)
        for qs, ks, piece in _pieces(plan, src, q.device, split=_SPLIT):
            o, st = _piece_forward(plan, qa[:, :, qs], kc[:, :, ks], vc[:, :, ks], piece)
            _merge(state, qs, o, st)
            del o, st
        del kc, vc
        if works is not None:
            ring.wait(works)
            kv = nxt
            del nxt
    if sinks is not None:  # the sink: one more part of each row's softmax, with a zero value and no max_logit
        sink_lse = sinks.detach().to(acc)[None, :, None].expand(B, Hq, n)  # (B, Hq, n)
        sink = AttentionStats(sink_lse, torch.full_like(lse, float("-inf")), torch.zeros_like(lse))
        _merge(state, slice(None), torch.zeros_like(out), sink)
    return out, lse, mx, ent


# -- the backward --------------------------------------------------------------------------------
def _piece_backward(plan: _Plan, q, do, lse, delta, k, v, piece: _Piece, dq, dk, dv):
    """Add one piece's share to dq (B, Hq, nq, D), dk (B, Hkv, nk, D), dv (B, Hkv, nk, Dv), in torch ops.

    P_ij = exp(s_ij - lse_i) with the global lse, dS = P * (dP - delta) with the global delta.
    Blocks of query rows x keys (``_BWD_ROWS`` x ``_BWD_COLS`` scores per query head), so memory
    stays two such blocks; keys the band rules out for a row block are never touched.
    """
    B, Hq, nq, D = q.shape
    Hkv, nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = Hq // Hkv
    geom = None
    if piece.mask is not None:
        geom = Geometry(B, Hq, nq, nk, piece.q_positions, piece.kv_positions, q.device)
    cols_per = _BWD_COLS
    rows_per = max(1, _BWD_ROWS * _BWD_COLS // (B * Hq * cols_per))
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf")))  # fully-masked rows: P = 0
    slopes = None
    if plan.alibi is not None:  # distances from the piece's positions (default: bottom-right aligned, as the forward)
        slopes = plan.alibi.to(torch.float32).to(q.dtype).reshape(-1, Hq, 1, 1)  # (B|1, Hq, 1, 1) float32 values, as the forward
        qpos = piece.q_positions[0] if piece.q_positions is not None else torch.arange(nq, device=q.device) + nk - nq  # (nq,)
        kpos = piece.kv_positions[0] if piece.kv_positions is not None else torch.arange(nk, device=q.device)  # (nk,)
    for r0 in range(0, nq, rows_per):
        r1 = min(nq, r0 + rows_per)
        R = r1 - r0
        qg = q[:, :, r0:r1].reshape(B, Hkv, G * R, D)  # (B, Hkv, G*R, D) query heads of one kv head as rows
        dog = do[:, :, r0:r1].reshape(B, Hkv, G * R, Dv)  # (B, Hkv, G*R, Dv)
        lse_r = lse_safe[:, :, r0:r1, None]  # (B, Hq, R, 1)
        delta_r = delta[:, :, r0:r1].reshape(B, Hkv, G * R, 1)  # (B, Hkv, G*R, 1)
        allowed = None
        if geom is not None:
            allowed = piece.mask.allowed_in(geom, torch.arange(r0, r1, device=q.device))  # (B|1, H|1, R, nk)
        dq_r = None
        lo, hi = piece.cols(r0, r1)
        for c0 in range(lo, hi, cols_per):
            c1 = min(hi, c0 + cols_per)
            C = c1 - c0
            kk, vv = k[:, :, c0:c1], v[:, :, c0:c1]  # (B, Hkv, C, D), (B, Hkv, C, Dv)
            p = (qg @ kk.transpose(-2, -1)).mul_(plan.scale)  # (B, Hkv, G*R, C) scaled scores
            t = None
            if plan.softcap is not None:
                t = p.div_(plan.softcap).tanh_()  # p is t now
                p = t * plan.softcap
            p = p.view(B, Hq, R, C)
            if slopes is not None:  # ALiBi after the softcap: - slope |q_pos - kv_pos|
                p = p - slopes * (qpos[r0:r1, None] - kpos[None, c0:c1]).abs().to(q.dtype)  # (B, Hq, R, C)
            p = p.sub_(lse_r).exp_()  # (B, Hq, R, C) global probabilities
            if allowed is not None:
                p.masked_fill_(~allowed[..., c0:c1], 0.0)
            pg = p.view(B, Hkv, G * R, C)
            dv[:, :, c0:c1] += pg.transpose(-2, -1) @ dog  # (B, Hkv, C, Dv)
            ds = (dog @ vv.transpose(-2, -1)).sub_(delta_r).mul_(pg)  # (B, Hkv, G*R, C) P * (dP - delta)
            if t is not None:
                ds.mul_(1 - t * t)  # d(c tanh(x/c))/dx
            dq_r = ds @ kk if dq_r is None else dq_r.add_(ds @ kk)  # (B, Hkv, G*R, D)
            dk[:, :, c0:c1] += (ds.transpose(-2, -1) @ qg).mul_(plan.scale)  # (B, Hkv, C, D)
        if dq_r is not None:
            dq[:, :, r0:r1] += dq_r.view(B, Hq, R, D) * plan.scale  # (B, Hq, R, D)


def _fused_backward(plan: _Plan, q, k, v, piece: _Piece):
    """The cpu backend's ``shard_backward`` when it serves this piece's gradient, else None (torch ops)."""
    name = _backends.current() if plan.backend == "auto" else plan.backend
    if name not in ("auto", "cpu") or q.device.type != "cpu" or "cpu" not in _backends.names():
        return None
    from .backends import cpu as _cpu

    if getattr(_cpu, "_k", None) is None:  # numba missing
        return None
    req = build_request(q, k, v, mask=piece.mask, scale=plan.scale, softcap=plan.softcap, alibi_slopes=plan.alibi,
                        q_positions=piece.q_positions,
                        kv_positions=piece.kv_positions, requires_grad=True)
    if _backends.get("cpu").unsupported(q, k, v, req) is not None:
        return None
    return _cpu.shard_backward


def _ring_backward(plan: _Plan, dout, q, k, v, out, lse, sinks=None):
    """(dq, dk, dv, dsinks): dsinks (Hq,) is this rank's queries' share (None without sinks)."""
    acc = plan.acc
    qa, do = q.detach().to(acc), dout.to(acc)  # (B, Hq, n, D), (B, Hq, n, Dv)
    delta = (do * out).sum(-1)  # (B, Hq, n) rowsum(dO * O) of the merged output
    dq = torch.zeros_like(qa)
    ring = _Ring(plan)
    kv = (k.detach().contiguous(), v.detach().contiguous())  # the shard held now; this rank's own first
    # the dK/dV accumulator of the shard held now. After each step it moves one rank on, in place (the
    # previous rank's arrives in its buffer): it reaches the shard's owner after the last step
    dk, dv = torch.zeros(k.shape, dtype=acc, device=q.device), torch.zeros(v.shape, dtype=acc, device=q.device)
    for step in range(plan.world):
        src = (plan.rank - step) % plan.world
        works = None
        if step < plan.world - 1:
            nxt = tuple(torch.empty_like(t) for t in kv)
            works = ring.start(kv, nxt)
        kc, vc = (t.to(acc) for t in kv)
        for qs, ks, piece in _pieces(plan, src, q.device, split=_SPLIT):
            args = (qa[:, :, qs], kc[:, :, ks], vc[:, :, ks])
            fused = _fused_backward(plan, *args, piece)
            if fused is None:
                _piece_backward(plan, qa[:, :, qs], do[:, :, qs], lse[:, :, qs], delta[:, :, qs],
                                kc[:, :, ks], vc[:, :, ks], piece, dq[:, :, qs], dk[:, :, ks], dv[:, :, ks])
                continue
            # the fused kernels, from the global lse and delta: this piece's share of dQ, dK, dV
            dq_p, dk_p, dv_p = fused(*args, do[:, :, qs], lse[:, :, qs], delta[:, :, qs], mask=piece.mask,
                                     q_positions=piece.q_positions, kv_positions=piece.kv_positions,
                                     scale=plan.scale, softcap=plan.softcap, alibi_slopes=plan.alibi)
            dq[:, :, qs] += dq_p  # (B, Hq, nq, D)
            dk[:, :, ks] += dk_p  # (B, Hkv, nk, D)
            dv[:, :, ks] += dv_p  # (B, Hkv, nk, Dv)
            del dq_p, dk_p, dv_p
        del kc, vc
        if works is not None:
            ring.wait(works)
            kv = nxt
            del nxt
        else:
            del kv  # the last shard: not needed while the gradients travel
        # pass the accumulated gradient on; after the last step it reaches the shard's owner
        ring.exchange_((dk, dv))
    dsinks = None
    if sinks is not None:  # d sink = -sum_rows p_sink * delta, p_sink = exp(sink - lse) (lse includes the sink)
        p_sink = torch.exp(sinks.detach().to(acc)[None, :, None] - lse)  # (B, Hq, n)
        p_sink = torch.where(torch.isfinite(lse), p_sink, torch.zeros_like(p_sink))
        dsinks = -(p_sink * delta).sum((0, 2)).to(sinks.dtype)  # (Hq,)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsinks


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, plan):
        out, lse, mx, ent = _ring_forward(plan, q, k, v, sinks)
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, sinks, out, lse)
        lse = lse.to(plan.acc)
        result = out.to(q.dtype)
        ctx.mark_non_differentiable(lse, mx, ent)
        return result, lse, mx, ent

    @staticmethod
    def backward(ctx, dout, _lse, _mx, _ent):
        q, k, v, sinks, out, lse = ctx.saved_tensors
        dq, dk, dv, dsinks = _ring_backward(ctx.plan, dout, q, k, v, out, lse, sinks)
        return dq, dk, dv, dsinks, None


# -- the public entry point ------------------------------------------------------------------------


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group=None,
    causal: bool = False,
    window=None,
    mask=None,
    scale: float | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    return_stats: bool = False,
    layout: str = "contiguous",
    backend: str = "auto",
    timeout: float | None = None,
):
    """Attention over a sequence split across the ranks of ``group``; each rank passes its shard.

    Equal to ``selfattn.attention`` on the whole sequence (default positions, Lq == Lk), with
    this rank's rows of the output and statistics returned.

    Args:
        q: (B, Hq, n, D), this rank's queries: rows ``shard(x, 2, layout)`` of the whole sequence.
        k: (B, Hkv, n, D) and v: (B, Hkv, n, Dv), this rank's keys and values (same rows).
            Hq must be a multiple of Hkv; only the Hkv heads travel.
        group: the process group (default: the world). One rank per shard, in rank order.
        causal, window: as in ``selfattn.attention``, on global positions.
        mask: ``masks.documents`` (segment ids over the whole sequence, (L,) or (B, L)),
            ``masks.key_padding`` ((B, L)), ``masks.padding`` (global lengths), or those combined
            with ``&``. Dense and function masks are refused (they would need the whole L x L).
        scale, softcap: as in ``selfattn.attention``.
        sinks: (Hq,) per-head sink logits, as in ``selfattn.attention`` (gpt-oss): the same on
            every rank. lse includes the sink, max_logit is over keys only, entropy is of keys
            plus sink. Gets a gradient: on each rank, its own queries' share (sum it over the
            group, as context-parallel training sums every parameter's gradient, for the
            whole sequence's).
        alibi_slopes: (Hq,) or (B, Hq), as in ``selfattn.attention`` (FlashAttention's
            convention: - slope |i - j| after the softcap), on global positions; the same on
            every rank. No gradient.
        return_stats: also return this rank's :class:`AttentionStats` rows (lse, max_logit,
            entropy), exactly those of the unsharded call.
        layout: ``"contiguous"`` or ``"balanced"`` (rank r holds chunks r and 2W-1-r of 2W;
            even work under a causal mask). Must match how the shards were cut (:func:`shard`).
        backend: the backend for each shard's forward piece ("auto": the fastest capable one);
            the backward runs in the cpu backend's fused kernels when it is "auto" or "cpu" and
            the cpu backend serves the piece, else in torch ops (see the module docstring).
        timeout: seconds to wait for the other ranks: for the agreement on the call and for each
            ring transfer (default: the group's timeout). Running out raises a RuntimeError.

    Returns:
        output (B, Hq, n, Dv) in the input dtype, or ``(output, stats)`` with stats (B, Hq, n)
        in float32 (float64 for float64 inputs). Fully-masked rows: output 0, lse -inf,
        max_logit -inf, entropy 0, zero gradients (with sinks: lse = the sink's logit).

    Raises:
        RuntimeError on every rank when torch.distributed is not initialised; ValueError on
        every rank when any rank's call is bad or the ranks' shards/options differ.
    """
    g, rank, world = _group(group, "ring_attention")
    error, error_type, sig, plan, wait_for = None, None, None, None, None
    try:
        wait_for = _as_timedelta(timeout)  # first: it bounds the agreement below too
        check_qkv(q, k, v)
        _check_layout(layout, "ring_attention")
        B, Hq, n, D = q.shape
        if k.shape[2] != n:
            raise ValueError(f"ring_attention: query and key shards must have the same length (self-attention), "
                             f"got query {tuple(q.shape)}, key {tuple(k.shape)}")
        if n == 0 or (layout == "balanced" and n % 2):
            raise ValueError(f"ring_attention: a {layout} shard must hold {'an even number of rows' if layout == 'balanced' else 'at least one row'} "
                             f" (the sequence length must be divisible by {'2 x ' if layout == 'balanced' else ''}the world size "
                             f"{world}), got shard length {n}")
        if not isinstance(return_stats, bool):
            raise TypeError(f"return_stats must be a bool, got {type(return_stats).__name__}")
        band, structural = _plan_mask(mask, causal, window, B, n * world, q.device)
        sc = resolve_scale(scale, D)
        req = build_request(q[:, :, :1], k[:, :, :1], v[:, :, :1], scale=sc, softcap=softcap, sinks=sinks,
                            alibi_slopes=alibi_slopes)  # checks softcap, sinks, slopes
        grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, sinks))
        sig = _signature(q, k, v, layout, band, structural, sc, req.softcap, grad, return_stats, sinks, alibi_slopes)
        plan = _Plan(rank=rank, world=world, group=g, layout=layout, n=n, batch=B, q_heads=Hq, kv_heads=k.shape[1],
                     scale=sc, softcap=req.softcap, band=band, structural=structural, backend=backend, acc=acc_dtype(q.dtype),
                     timeout=wait_for, alibi=None if alibi_slopes is None else alibi_slopes.detach())
        _preflight(plan, q, k, v)
    except (TypeError, ValueError, _backends.BackendUnavailable) as e:
        error, error_type = (str(e) if str(e).startswith("ring_attention") else f"ring_attention: {e}"), type(e)
    device = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
    _agree(g, world, error, error_type, sig, device, wait_for)
    if grad:
        out, lse, mx, ent = _RingAttention.apply(q, k, v, sinks, plan)
    else:
        with torch.no_grad():
            out, lse, mx, ent = _ring_forward(plan, q, k, v, sinks)
        out, lse = out.to(q.dtype), lse.to(plan.acc)
    if return_stats:
        return out, AttentionStats(lse, mx, ent)
    return out
