"""Backend `triton`: fused flash attention written in Triton (issues 6, 11, 12).

Serves CUDA tensors in float16, bfloat16 and float32 (float32 multiplies in full float32, no
TF32), head dims up to 256, every mask of :mod:`selfattn.masks` (tile skipping from the lowered
tile map), positions, ALiBi, attention sinks, GQA, Lq != Lk, softcap, any scale,
``return_stats`` from the same pass, and a backward (gradients for the sinks too).

On CPU tensors it serves only under Triton's interpreter: ``TRITON_INTERPRET=1`` must be set
before triton is first imported in the process (triton decorates its own helpers then) and
still be set when the call is made; the variable is read at each call. This module does not
import triton itself: the kernel module :mod:`selfattn.kernels.triton_flash` is executed on
first use, in the mode triton is in. The interpreter is slow: ``auto`` never prefers this
backend on CPU.

How a request reaches the kernels. The mask, positions and ALiBi slopes are lowered once by
:func:`selfattn.lowering.lower` at exactly the block sizes the kernels run with
(``kernels.triton_flash.fwd_blocks`` / ``bwd_blocks`` / ``dq_blocks``): block sizes are fixed per head dim and
dtype instead of autotuned, because the tile map and a mask function's partial-tile bits are
per tile, and tiles of another size would need another lowering (``lower`` caches each). The
record is then put in the form the kernels read (:class:`KernelMask`): the tile map as int32
with the function-tile index folded in, per block the range of tiles to visit and the run of
full ones, and one int32 table per side (queries, keys) of position, live flag and document ids.

Layers (flash-attn style): the launchers in ``kernels/triton_flash.py``; two ``torch.library``
custom ops (``selfattn::triton_fwd``, ``selfattn::triton_bwd``) so ``torch.compile`` sees opaque
calls with known output shapes; :class:`_FlashAttention`, a ``torch.autograd.Function`` that
saves the row max and 1/row sum (the recomputed probabilities carry no row-wide rounding of a
stored lse) and the float32 output; :class:`TritonBackend`. The public functions with this
backend's own options live above the backends, in :mod:`selfattn.gpu`; the options reach the
backend as ``req.backend_options`` (``deterministic``, ``num_splits``).

Attention sinks need no kernel change (:func:`selfattn.lowering.sink_stats` / ``sink_grad``): the
kernel's output and 1/row sum are scaled by the keys' share of the mass, exp(lse_k - lse).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from .. import masks as _masks
from ..lowering import lower, sink_grad, sink_stats
from ..stats import AttentionStats
from .base import Backend, Request

__all__ = ["TritonBackend", "KernelMask", "kernel_mask", "interpreter_active"]

_HAVE_TRITON = importlib.util.find_spec("triton") is not None
_KERNEL_MODULE = "selfattn.kernels.triton_flash"
_KERNELS: dict = {}  # interpret flag -> kernels module executed in that mode
_POS_LIMIT = 1 << 29  # |position| below this: kv_pos - q_pos fits int32 inside the kernel
_UNBOUNDED = 1 << 30  # a window side that never binds
_LOWERABLE = (_masks.Causal, _masks.Window, _masks.Padding, _masks.KeyPadding, _masks.Documents, _masks.Dense,
              _masks.Function)


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def _triton_interpreted() -> bool:
    # triton decorates its own jit helpers (tl.sum, tl.max, ...) when it is imported: the whole
    # process runs interpreted or compiled from then on, whatever TRITON_INTERPRET says later
    std = sys.modules.get("triton.language.standard")
    if std is None:
        return _env_interpret()
    return type(std.cdiv).__name__ == "InterpretedFunction"


def interpreter_active() -> bool:
    """True if Triton's CPU interpreter can run now: TRITON_INTERPRET is set (1/true/on/yes)
    and was already set when triton was first imported in this process (or triton is not
    imported yet)."""
    return _env_interpret() and _triton_interpreted()


def _kernels(interpret: bool):
    # triton.jit picks interpreted or compiled when the kernel module executes: keep one copy per mode
    if interpret not in _KERNELS:
        mod = importlib.import_module(_KERNEL_MODULE)
        if mod.INTERPRET != interpret:
            spec = importlib.util.find_spec(_KERNEL_MODULE)
            mod = importlib.util.module_from_spec(spec)
            old = os.environ.get("TRITON_INTERPRET")
            os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
            try:
                spec.loader.exec_module(mod)
            finally:
                if old is None:
                    del os.environ["TRITON_INTERPRET"]
                else:
                    os.environ["TRITON_INTERPRET"] = old
        _KERNELS[interpret] = mod
    return _KERNELS[interpret]


def _kernels_for(device: torch.device):
    return _kernels(_triton_interpreted())


# -- the lowered mask as the kernels read it ---------------------------------------------------


@dataclass(frozen=True, eq=False)
class KernelMask:
    """A :class:`selfattn.lowering.LoweredMask` in the kernels' form (tensors on the inputs' device)."""

    block_q: int  # query rows per tile (the kernels' BLOCK_M)
    block_k: int  # keys per tile (BLOCK_N)
    tiles: torch.Tensor  # int32 (B|1, H|1, nQ, nK): TileKind + 4 * (fn_index + 1)
    row_span: torch.Tensor  # int32 (B|1, H|1, nQ, 4): key tiles start <= fs <= fe <= end per query block
    col_span: torch.Tensor  # int32 (B|1, H|1, nK, 4): query tiles likewise per key block
    rows: torch.Tensor  # int32 (2 + ND, B|1, Lq): position, live (not padding), document ids
    cols: torch.Tensor  # int32 (2 + ND, B|1, Lk): the same for keys (live: padding and key_padding)
    allow: Optional[torch.Tensor]  # bool (B|1, H|1, Lq|1, Lk|1): dense bool masks AND-ed
    bias: Optional[torch.Tensor]  # float (B|1, H|1, Lq|1, Lk|1): dense float masks summed
    fn_bits: Optional[torch.Tensor]  # bool (nP, block_q, block_k): a mask function's partial tiles
    slopes: Optional[torch.Tensor]  # float32 (B|1, Hq): ALiBi
    win_left: int  # band: kv_pos - q_pos >= -win_left (huge when unbounded)
    win_right: int  # band: kv_pos - q_pos <= win_right
    band: bool  # causal or a window is part of the mask
    live_rows: bool  # rows[1] matters (padding() with query lengths)
    live_cols: bool  # cols[1] matters (padding(), key_padding())
    n_ids: int  # document id fields in rows / cols

    # the op schema carries the record as two lists: these names fix their order, in one place
    TENSORS = ("tiles", "row_span", "col_span", "rows", "cols", "allow", "bias", "fn_bits", "slopes")
    INTS = ("block_q", "block_k", "win_left", "win_right", "band", "live_rows", "live_cols", "n_ids")

    def to_lists(self):
        return [getattr(self, f) for f in self.TENSORS], [int(getattr(self, f)) for f in self.INTS]

    @classmethod
    def from_lists(cls, tensors, ints):
        kw = dict(zip(cls.TENSORS, tensors))
        kw.update({f: (bool(x) if f in ("band", "live_rows", "live_cols") else int(x)) for f, x in zip(cls.INTS, ints)})
        return cls(**kw)


def _spans(kinds: torch.Tensor, full_limit: int) -> torch.Tensor:
    """Per row of a tile map (..., n_outer, n_inner): [start, fs, fe, end) int32 (..., n_outer, 4).

    Tiles outside [start, end) are empty; [fs, fe) is the longest run of FULL tiles below
    ``full_limit`` (tiles past it are ragged and must be masked).
    """
    n = kinds.shape[-1]
    idx = torch.arange(n, device=kinds.device)
    live = (kinds != int(_masks.EMPTY)).to(torch.int32)  # (..., n_outer, n_inner)
    any_ = live.amax(-1) > 0
    start = torch.where(any_, live.argmax(-1), 0)
    end = torch.where(any_, n - live.flip(-1).argmax(-1), 0)
    full = (kinds == int(_masks.FULL)) & (idx < full_limit)
    last_break = torch.cummax(torch.where(full, -1, idx), dim=-1).values  # last non-full tile at or before each
    run = torch.where(full, idx - last_break, 0)  # length of the full run ending at each tile
    best = run.amax(-1)
    fe = run.argmax(-1) + 1
    fs = fe - best
    has = best > 0
    return torch.stack([start, torch.where(has, fs, end), torch.where(has, fe, end), end], -1).to(torch.int32).contiguous()


def _side(pos, live, ids, length, device):
    """One side's int32 table (2 + ND, B|1, L): position, live flag, document ids."""
    fields = [pos]
    fields.append(torch.ones(1, length, dtype=torch.int64, device=device) if live is None else live.long())
    fields.extend(ids)
    bsz = max(f.shape[0] for f in fields)
    return torch.stack([f.expand(bsz, length) for f in fields]).to(torch.int32).contiguous()


def _dense_ids(q_ids, kv_ids):
    # document ids only need equality: rank them jointly so that any int64 id fits int32
    out_q, out_k = [], []
    for d in range(q_ids.shape[0]):
        qd, kd = q_ids[d], kv_ids[d]  # (B|1, Lq), (B|1, Lk)
        _, inv = torch.unique(torch.cat([qd.reshape(-1), kd.reshape(-1)]), return_inverse=True)
        out_q.append(inv[:qd.numel()].reshape(qd.shape))
        out_k.append(inv[qd.numel():].reshape(kd.shape))
    return out_q, out_k


def _bound(x):
    return _UNBOUNDED if x is None else min(int(x), _UNBOUNDED)


_KM_CACHE: dict = {}  # id(LoweredMask) -> (LoweredMask, KernelMask); lower() caches the records


def kernel_mask(req: Request, block_q: int, block_k: int) -> KernelMask:
    """``_kernel_mask`` under ``torch.compiler.disable``, wrapped on the first call: the decorator imports
    torch._dynamo (~3 s of CPU in every process that imports selfattn, also where triton never runs)."""
    fn = _KERNEL_MASK_OUTSIDE_GRAPHS[0]
    if fn is None:
        fn = _KERNEL_MASK_OUTSIDE_GRAPHS[0] = torch.compiler.disable(_kernel_mask)
    return fn(req, block_q, block_k)


_KERNEL_MASK_OUTSIDE_GRAPHS = [None]


def _kernel_mask(req: Request, block_q: int, block_k: int) -> KernelMask:
    """The request's lowered mask at ``block_q`` x ``block_k`` tiles, in the kernels' form.

    Runs outside ``torch.compile`` graphs (a graph break): lowering is Python work with caches
    keyed on tensor identities, done once per call like FlexAttention's ``create_block_mask``."""
    low = lower(req, block_q, block_k)
    hit = _KM_CACHE.get(id(low))
    if hit is not None and hit[0] is low:
        return hit[1]
    dev = req.device
    lq, lk = req.q_len, req.kv_len
    tiles = low.tiles.to(torch.int32)
    if low.fn_index is not None:
        tiles = tiles + 4 * (low.fn_index.to(torch.int32) + 1)
    kinds = low.tiles
    row_span = _spans(kinds, lk // block_k)
    col_span = _spans(kinds.transpose(-1, -2), lq // block_q)
    q_live = None if low.q_lens is None else torch.arange(lq, device=dev)[None] < low.q_lens[:, None]  # (B, Lq)
    kv_live = None if low.kv_lens is None else torch.arange(lk, device=dev)[None] < low.kv_lens[:, None]  # (B, Lk)
    if low.kv_keep is not None:
        kv_live = low.kv_keep if kv_live is None else kv_live & low.kv_keep
    q_ids, kv_ids = ([], []) if low.q_ids is None else _dense_ids(low.q_ids, low.kv_ids)
    bias = low.bias
    if bias is not None and bias.dtype == torch.float64:
        bias = bias.to(torch.float32)
    km = KernelMask(
        block_q=block_q, block_k=block_k, tiles=tiles.contiguous(), row_span=row_span, col_span=col_span,
        rows=_side(low.q_pos, q_live, q_ids, lq, dev), cols=_side(low.kv_pos, kv_live, kv_ids, lk, dev),
        allow=None if low.allow is None else low.allow.detach(), bias=None if bias is None else bias.detach(),
        fn_bits=low.fn_bits, slopes=None if low.alibi is None else low.alibi.detach().contiguous(),
        win_left=_bound(low.win_left), win_right=_bound(low.win_right), band=low.banded,
        live_rows=q_live is not None, live_cols=kv_live is not None, n_ids=len(q_ids))
    _KM_CACHE[id(low)] = (low, km)
    if len(_KM_CACHE) > 32:
        _KM_CACHE.pop(next(iter(_KM_CACHE)))
    return km


# -- torch.library custom ops -----------------------------------------------------------------


@torch.library.custom_op("selfattn::triton_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_tensors: list[Optional[torch.Tensor]],
            mask_ints: list[int], scale: float, softcap: float, stats: bool, pack: int, num_splits: int,
            f32_out: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # (out, row statistics (5, B, Hq, Lq): lse, row max, 1/row sum, max_logit, entropy)
    km = KernelMask.from_lists(mask_tensors, mask_ints)
    return _kernels_for(q.device).forward(q, k, v, km, scale=scale, softcap=softcap if softcap > 0 else None,
                                          stats=stats, pack=pack, num_splits=num_splits, f32_out=f32_out)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, mask_tensors, mask_ints, scale, softcap, stats, pack, num_splits, f32_out):
    B, Hq, Lq, _ = q.shape
    out = q.new_empty(B, Hq, Lq, v.shape[-1], dtype=torch.float32 if f32_out else q.dtype)
    return out, q.new_empty(5, B, Hq, Lq, dtype=torch.float32)


@torch.library.custom_op("selfattn::triton_bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out32: torch.Tensor,
            row_m: torch.Tensor, row_l: torch.Tensor, mask_tensors: list[Optional[torch.Tensor]], mask_ints: list[int],
            dq_mask_tensors: list[Optional[torch.Tensor]], dq_mask_ints: list[int], scale: float,
            softcap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # the dQ mask lists are empty unless dQ runs as its own deterministic pass
    km = KernelMask.from_lists(mask_tensors, mask_ints)
    km_dq = KernelMask.from_lists(dq_mask_tensors, dq_mask_ints) if dq_mask_ints else None
    return _kernels_for(q.device).backward(dout, q, k, v, out32, row_m, row_l, km, km_dq, scale=scale,
                                           softcap=softcap if softcap > 0 else None)


@_bwd_op.register_fake
def _bwd_fake(dout, q, k, v, out32, row_m, row_l, mask_tensors, mask_ints, dq_mask_tensors, dq_mask_ints, scale, softcap):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@dataclass(frozen=True)
class _Plan:
    """One call's launch choices (everything the autograd function needs besides tensors)."""

    fwd_mask: KernelMask  # lowered at the forward's block sizes
    bwd_blocks: tuple  # (block_q, block_k) of the dK/dV pass
    dq_blocks: tuple  # (block_q, block_k) of the deterministic dQ pass
    req: Request
    scale: float
    softcap: float  # 0.0 = none
    stats: bool
    pack: int  # query heads per forward program (GQA decoding)
    num_splits: int
    deterministic: bool
    f32_out: bool  # the forward writes a float32 output (kept for the backward's Delta)


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, plan: _Plan):
        t, i = plan.fwd_mask.to_lists()
        out, rs = torch.ops.selfattn.triton_fwd(q, k, v, t, i, plan.scale, plan.softcap, plan.stats, plan.pack,
                                                plan.num_splits, plan.f32_out)
        lse, row_m, row_l, maxl, ent = rs.unbind(0)  # each (B, Hq, Lq)
        if sinks is not None:
            lse, ent_s, mass = sink_stats(lse, ent if plan.stats else None, sinks)
            ent = ent_s if plan.stats else ent
            out = out * mass[..., None]  # float32 here: the kernel normalised over the keys alone
            row_l = row_l * mass  # the backward's P = exp2(s - row max) * row_l, now over keys + sink
        result = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, row_m, row_l, lse, sinks)
        ctx.plan = plan
        ctx.mark_non_differentiable(lse, maxl, ent)
        return result, lse, maxl, ent

    @staticmethod
    def backward(ctx, dout, _dlse, _dmax, _dent):
        q, k, v, out32, row_m, row_l, lse, sinks = ctx.saved_tensors
        plan = ctx.plan
        t, i = kernel_mask(plan.req, *plan.bwd_blocks).to_lists()
        tq, iq = kernel_mask(plan.req, *plan.dq_blocks).to_lists() if plan.deterministic else ([], [])
        dq, dk, dv = torch.ops.selfattn.triton_bwd(dout.contiguous(), q, k, v, out32, row_m, row_l, t, i, tq, iq,
                                                   plan.scale, plan.softcap)
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[3]:
            dsinks = sink_grad(sinks, lse, dout, out32)
        return dq, dk, dv, dsinks, None


# -- the backend ------------------------------------------------------------------------------


def _options(req: Request) -> tuple[bool, int | None]:
    """(deterministic, num_splits) from ``req.backend_options``, checked."""
    opts = req.backend_options
    deterministic = opts.get("deterministic", False)
    num_splits = opts.get("num_splits")
    if not isinstance(deterministic, bool):
        raise TypeError(f"backend_options['deterministic'] must be a bool, got {type(deterministic).__name__}")
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"backend_options['num_splits'] must be None or an int >= 1, got {num_splits!r}")
    return deterministic, num_splits


class TritonBackend(Backend):
    name = "triton"
    summary = "fused flash attention in Triton: CUDA GPUs (CPU only under TRITON_INTERPRET=1)"
    features = {
        "masks": "all, with tile skipping from the lowered tile map; partial tiles masked element-wise",
        "dtypes": "float16, bfloat16, float32 (full float32 products, no TF32); float64 refused",
        "head_dim": "1-256 (padded to a power of two inside the kernel)",
        "stats": "yes, from the same pass",
        "softcap": "yes",
        "positions": "yes (|position| < 2**29); ALiBi inside the kernel in float32; sinks (with gradients)",
        "dropout": "no (refused)",
        "backward": "fused: dK/dV pass + dQ (atomic, or a separate pass with deterministic=True)",
        "options": "backend_options: deterministic (bool), num_splits (int >= 1, split-KV forward)",
        "memory": "O(L)",
        "devices": "cuda; cpu under the Triton interpreter",
    }
    options = frozenset({"deterministic", "num_splits"})
    capabilities = Backend.capabilities.replace(
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}), devices=frozenset({"cuda"}),
        interpreted_devices=frozenset({"cpu"}), dropout=False, generator=False, float_mask_grad=False,
        max_head_dim=256, requires=("triton",))

    def unsupported(self, q, k, v, req: Request):
        dev = req.device
        if not _HAVE_TRITON:
            return f"triton is not installed (pip install triton), so device {dev.type} cannot be served"
        if dev.type == "cpu":
            if not _env_interpret():
                return (f"device {dev} (the triton backend runs on CUDA GPUs; on CPU only under "
                        "Triton's interpreter, TRITON_INTERPRET=1 set before triton is imported)")
            if not _triton_interpreted():
                return (f"device {dev} (TRITON_INTERPRET=1 was set after triton was imported in this "
                        "process; set it before the first import of triton)")
        elif dev.type != "cuda":
            return f"device {dev} (the triton backend runs on CUDA GPUs)"
        if req.dtype == torch.float64:
            return "dtype float64 (the triton kernels take float16, bfloat16 or float32)"
        if req.head_dim > 256:
            return f"head_dim {req.head_dim} (at most 256)"
        if req.v_dim > 256:
            return f"v_dim {req.v_dim} (at most 256)"
        if req.dropout_p > 0:
            return f"dropout (dropout_p={req.dropout_p}); use backend='math' for dropout"
        if req.requires_grad and any(isinstance(p, _masks.Dense) and p.tensor.requires_grad for p in _masks.parts(req.mask)):
            return "gradient with respect to a float mask (detach the dense mask or use backend='math')"
        for p in _masks.parts(req.mask):
            if not isinstance(p, _LOWERABLE):
                return f"mask {type(p).__name__} (a Mask subclass that selfattn.lowering cannot lower)"
        for name, pos in (("q_positions", req.q_positions), ("kv_positions", req.kv_positions)):
            if pos is not None and pos.numel() and int(pos.abs().max()) >= _POS_LIMIT:
                return f"{name} of magnitude 2**29 or more (positions are int32 inside the kernel)"
        return None

    def rank(self, req: Request) -> float:
        # on CUDA ahead of torch SDPA (10); under the CPU interpreter behind everything but the reference
        return 5.0 if req.device.type == "cuda" else 500.0

    def forward(self, q, k, v, req: Request):
        deterministic, num_splits = _options(req)
        kern = _kernels_for(q.device)
        B, Hq, Lq, D = q.shape
        Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
        pack = kern.plan_pack(Hq, Hkv, Lq)
        km = kernel_mask(req, *kern.fwd_blocks(pack, Lq, D, Dv, q.dtype))
        if pack > 1 and km.tiles.shape[1] > 1:  # heads of one program must share the tile map
            pack = 1
            km = kernel_mask(req, *kern.fwd_blocks(pack, Lq, D, Dv, q.dtype))
        plan = _Plan(
            fwd_mask=km, bwd_blocks=kern.bwd_blocks(D, Dv, q.dtype), dq_blocks=kern.dq_blocks(D, Dv, q.dtype), req=req, scale=float(req.scale),
            softcap=float(req.softcap or 0.0), stats=bool(req.return_stats), pack=pack,
            num_splits=kern.plan_splits(B, Hq, pack, Lq, Lk, q.device, num_splits), deterministic=deterministic,
            f32_out=req.requires_grad or kern.INTERPRET or req.sinks is not None)
        out, lse, maxl, ent = _FlashAttention.apply(q, k, v, req.sinks, plan)
        return out, (AttentionStats(lse, maxl, ent) if req.return_stats else None)


from . import register  # noqa: E402  (the registry defines register before importing this module)

register(TritonBackend())
