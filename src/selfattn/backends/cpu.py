"""Backend `cpu`: fused flash-style CPU kernel (issues 5, 11, 12).

Three layers, as flash-attn has them:

* ``_launch_forward`` / ``_launch_backward``: private launchers. The request's mask, positions
  and ALiBi slopes arrive lowered once (``selfattn.lowering.lower``: tile map + element-wise
  parameters, cached), are converted once into the kernels' :class:`~selfattn.kernels.cpu_flash.KernelMask`
  record (numpy arrays), and the numba kernels in ``selfattn.kernels.cpu_flash`` run with all
  the threads torch uses (or in the calling thread when that is one). The backward is two
  passes (dQ, then dK/dV), or one when all keys fit one block. Attention sinks need no kernel
  change: the forward folds exp(sink) into the kernel's log-sum-exp and rescales its output,
  the backward runs on that full log-sum-exp, and d sink = -sum p_sink rowsum(dO O)
  (``lowering.sink_grad``);
* ``selfattn::cpu_flash_attention`` and ``selfattn::cpu_flash_attention_backward``:
  ``torch.library`` custom ops, so ``torch.compile`` traces a call as one node. Lowering runs
  torch code that cannot be traced, so the ops take the request's mask as a layout string and
  its tensors (``_op_args``) and lower inside. The forward op's autograd saves q, k, v, the
  output and the log-sum-exp only (as row max + log of the row sum: one float32 lse would cost
  p its precision at huge scores). Eager calls take ``_EagerFlash``, the same two steps as an
  ``autograd.Function`` without the dispatcher's per-call cost;
* ``CPUBackend.forward``: a validated ``Request`` to the ops' arguments.

Short calls (issue 14) skip all of that: ``attention()`` hands a no-grad float32 call without mask
or with causal alone (bfloat16: decoding steps and tiny heads) to ``fast_forward``, which validates
and lowers once per (shapes, dtype, causal, scale) and then calls the tile kernel's compiled entry
point with the records kept from the first call (the same bits as the general way), or for
decoding steps and tiny heads ``kernels/cpu_short.py``'s ``fwd_small`` on the tensors' addresses,
row by row (within the float32 reference's error, not bit-equal to the tile kernels). Two more
kinds of call keep what their first call validated and decided: a decoding step under a Mask object
(``fast_masked``: the model's layers share the mask, so they share its bits and the backend's choice)
and a plain call that needs gradients (``fast_grad``: the general path's autograd function on the kept
request). Anything else, and every error, goes the general way.

``auto`` ranks this backend against sdpa from measurements of this host where sdpa serves a call
natively (``calibration``: both timed once per process on four probes as ``attention()`` runs them, a
call's time predicted along the lines joining them; ``SELFATTN_AUTO_CALIBRATE=0`` keeps the recorded table), and by structural
reasons elsewhere (tiles a mask rules out, features sdpa lacks); ``CPUBackend.rank_reason`` says which.

Memory is O(L): the L x L matrix never exists, only (BLOCK_M x BLOCK_N) tiles per thread.
Dropout is not supported (``BackendUnavailable`` names "dropout"); statistics carry no
gradient; a float mask gets no gradient (refused if it requires one).
"""

from __future__ import annotations

import _thread
import os
import sys
import threading
import time
from collections import OrderedDict
from typing import NamedTuple, Optional

import torch

from .. import lowering
from .. import masks as _masks
from ..request import Request, acc_dtype, build_request
from ..stats import AttentionStats
from . import _GENERATION as _CHOICE_GENERATION
from .base import Backend
from .sdpa import _plan as _sdpa_plan
from .sdpa import planned as _sdpa_planned
from .sdpa import fast_forward as _sdpa_fast

try:
    import numba
    import numpy as np

    from ..kernels import cpu_flash as _k
    from ..kernels import cpu_fwd as _fwd  # the float32 forward in the transposed layout (issue 14)
    from ..kernels import cpu_bwd as _bwd  # the float32 backward in the transposed layout (issue 14)
except ImportError:  # numba missing: the backend stays registered and says why it cannot serve
    _k = None
try:  # the short calls' entry points (issue 14's fixed cost); without them every call takes the launchers
    from ..kernels import cpu_short as _short
except Exception:  # noqa: BLE001 -- numba missing or its internals changed: the general path serves
    _short = None
try:  # bfloat16 kernels on AMX or vdpbf16ps (issue 14); without an engine bfloat16 runs the float32 kernels
    from ..kernels import cpu_amx as _amx
except Exception:  # noqa: BLE001 -- numba, its LLVM or the CPU lacking anything: the float32 fallback
    _amx = None

#: tile products computed by the kernels since import (or the last reset); deterministic.
#: "backward_one_pass": backward passes with one key block, where flash_bwd_kv also computes dQ
TILE_PRODUCTS = {"forward": 0, "backward_kv": 0, "backward_q": 0, "backward_one_pass": 0}


def reset_tile_products() -> None:
    for name in TILE_PRODUCTS:
        TILE_PRODUCTS[name] = 0


# -- the lowered mask as the kernels read it ---------------------------------------------------


def _np(t: Optional[torch.Tensor], dtype, empty_shape):
    # a tensor as a contiguous numpy array of `dtype` (bool read as uint8 without a copy), or an
    # empty array of the same rank when absent
    if t is None:
        return torch.zeros(empty_shape, dtype=dtype).numpy()
    t = t.detach()
    t = t.view(torch.uint8) if t.dtype == torch.bool and dtype == torch.uint8 else t.to(dtype)
    return t.contiguous().numpy()


def _flat(t: Optional[torch.Tensor], dtype, per_unit=1.0):
    # a (B|1, H|1, Lq|1, Lk|1) tensor as a flat numpy array and its element strides (0 broadcasts)
    if t is None:
        return _np(None, dtype, (0,)), np.zeros(4, dtype=np.int64)
    t = t.detach().contiguous()
    strides = np.array([t.stride(i) if t.shape[i] > 1 else 0 for i in range(4)], dtype=np.int64)
    if t.dtype == torch.bool:
        return t.view(dtype).reshape(-1).numpy(), strides
    flat = t.to(dtype).reshape(-1).numpy()
    if per_unit == 1.0:
        return flat, strides
    # a finite entry stays finite in score units: a float mask's finfo.min (transformers' masks) times
    # log2(e) overflowed float32 to -inf and ruled the pair out (a row of them: output 0, not the mean of v)
    return _short.to_score_units(flat, flat.dtype.type(per_unit), flat.dtype.type(np.finfo(flat.dtype).max)), strides


def _bound(side) -> int:
    return _k.UNBOUNDED if side is None else int(side)


def _build_kernel_mask(low: lowering.LoweredMask, acc: torch.dtype):
    """A :class:`~selfattn.lowering.LoweredMask` as the kernels' ``KernelMask`` (numpy, compute dtype
    ``acc``; the bias and the ALiBi slopes in score units)."""
    per_nat = _k.LOG2E if acc == torch.float32 else 1.0
    allow, allow_strides = _flat(low.allow, torch.uint8)
    bias, bias_strides = _flat(low.bias, acc, per_nat)
    alibi = None if low.alibi is None else low.alibi.to(acc) * per_nat  # (B|1, Hq) score units
    with_alibi = alibi is not None
    q_pos_f = kv_pos_f = None
    if with_alibi:
        # ALiBi reads only q_pos - kv_pos: shift each sequence's positions so the smallest is 0 before they
        # become floats (float32 holds every integer only below 2**24; a long cache's or ring attention's
        # global positions pass that, and the distances came out wrong by up to the float spacing there)
        lo = torch.minimum(low.q_pos.amin(1, keepdim=True), low.kv_pos.amin(1, keepdim=True))  # (B|1, 1)
        q_pos_f, kv_pos_f = low.q_pos - lo, low.kv_pos - lo
    return _k.KernelMask(
        tiles=low.tiles.contiguous().numpy(), q_pos=_np(low.q_pos, torch.int64, None),
        kv_pos=_np(low.kv_pos, torch.int64, None), banded=low.banded,
        win_left=_bound(low.win_left), win_right=_bound(low.win_right),
        kv_lens=_np(low.kv_lens, torch.int64, (0,)), q_lens=_np(low.q_lens, torch.int64, (0,)),
        kv_keep=_np(low.kv_keep, torch.uint8, (0, 0)),
        q_ids=_np(low.q_ids, torch.int64, (0, 1, 1)), kv_ids=_np(low.kv_ids, torch.int64, (0, 1, 1)),
        allow=allow, allow_strides=allow_strides, bias=bias, bias_strides=bias_strides,
        fn_index=_np(low.fn_index, torch.int32, (0, 1, 1, 1)),
        fn_bits=_np(low.fn_bits, torch.uint8, (0, _k.BLOCK_M, _k.BLOCK_N)),
        alibi=_np(alibi, acc, (0, 0)),
        q_pos_f=_np(q_pos_f, acc, (0, 0)),
        kv_pos_f=_np(kv_pos_f, acc, (0, 0)),
    )


#: KernelMask records by (LoweredMask, dtype): lowering caches its records, so a training step or a
#: decoding loop that meets the same mask again converts nothing
_KERNEL_MASKS: "OrderedDict[tuple, tuple]" = OrderedDict()


def _kernel_mask(low: lowering.LoweredMask, acc: torch.dtype):
    key = (id(low), acc)
    hit = _KERNEL_MASKS.get(key)
    if hit is not None and hit[0] is low:
        _KERNEL_MASKS.move_to_end(key)
        return hit[1]
    km = _build_kernel_mask(low, acc)
    _KERNEL_MASKS[key] = (low, km)  # the entry keeps `low` alive, so its id is not reused meanwhile
    while len(_KERNEL_MASKS) > 32:
        _KERNEL_MASKS.popitem(last=False)
    return km


class _Call(NamedTuple):
    """What a launcher needs besides the tensors: the lowered mask and the scalar options."""

    low: "lowering.LoweredMask"
    scale: float
    softcap: float  # 0.0: none
    want_stats: bool
    # True: return row_max, row_log, max_logit, entropy; "lse": row_max and row_log only (what a backward
    # reads: max_logit and the entropy None); False: only out is read (the rows may be None)
    rows: object = True


# -- launchers --------------------------------------------------------------------------------


#: calls of fewer FLOPs run on one thread: measured on the 2-core VM, quiet, a forward with stats on 1 and 2
#: threads (blocks of 40 calls each, medians): 2 threads took 1.61x / 1.27x / 1.10x the time at 2.1 / 4.2 /
#: 8.4 MFLOP and 0.91x / 0.81x / 0.74x at 16.8 / 33.6 / 67 MFLOP. Waking the idle pool thread and waiting
#: for it (_on_threads) costs ~26 us there (9-17 us when the other core is busy; threading.Event 15-25 us,
#: a ThreadPoolExecutor 21-30 us, loaded), and at 2 threads torch's own ops around the kernel wake its
#: threads as well.
THREADS_MIN_FLOPS = 12e6


def _threads(tasks: int, flops: float) -> int:
    # all the threads torch uses, but no more than there are tasks, and one for small calls
    return min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS, tasks) if flops >= THREADS_MIN_FLOPS else 1


def _kernel(name: str, threads: int):
    """cpu_flash's (float64) numba kernel ``name`` for ``threads`` threads: its ``_serial`` twin for one
    (numba's pool is not woken, nor even started), else the parallel kernel with the pool set to that.
    The float32 and bfloat16 kernels run on :func:`_on_threads` instead."""
    if threads <= 1:
        return getattr(_k, name + "_serial")
    torch_threads = torch.get_num_threads()
    numba.set_num_threads(threads)
    if torch.get_num_threads() != torch_threads:
        # starting numba's OpenMP pool (first call) sets the OpenMP thread count torch shares to
        # NUMBA_NUM_THREADS: give torch its own setting back
        torch.set_num_threads(torch_threads)
    # tasks are whole query (or key) blocks of uneven cost under causal/window masks: hand them out
    # one at a time rather than in equal static slices (results do not depend on the schedule). Only
    # numba's tbb and workqueue layers do so: its OpenMP layer (the one on this machine) splits the
    # tasks into contiguous equal ranges whatever the chunk size (measured: 32 tasks of unequal cost
    # on 2 threads, chunk 0, 1 or 4: tasks 0-15 on one thread, 16-31 on the other)
    numba.set_parallel_chunksize(1)
    return getattr(_k, name)


# -- the float32 and bfloat16 kernels on several threads ---------------------------------------------
# The calling thread and threads - 1 pool threads (started on first use, kept, daemon) each run one call
# of a compiled nogil kernel; the calls share a counter (an int64 array) from which every thread takes
# its next work unit, so a core slowed by another process takes fewer. One compiled kernel serves one
# thread and many (numba's prange kernels compiled the whole serial kernel into themselves again: ~100 s
# of a first call), and the pool does not split the work into fixed halves as numba's OpenMP layer does.


class _Worker:
    """A pool thread: runs one job at a time, handed over through two locks (the cheapest wake-up
    CPython has: no Condition, no queue)."""

    def __init__(self):
        self.go, self.done = _thread.allocate_lock(), _thread.allocate_lock()
        self.go.acquire()  # released by the caller when a job is set
        self.done.acquire()  # released by the worker when the job is over
        self.job, self.error = None, None
        threading.Thread(target=self._loop, name="selfattn-cpu-worker", daemon=True).start()

    def _loop(self):
        while True:
            self.go.acquire()
            fn, args = self.job
            self.job = None
            try:
                fn(*args)
            except BaseException as e:  # noqa: BLE001 -- re-raised in the caller (_on_threads)
                self.error = e
            self.done.release()


_WORKERS: list = []
_POOL = threading.Lock()  # held by the one call using the workers


def _reset_pool():
    # a forked child has none of the parent's threads
    global _POOL
    _WORKERS.clear()
    _POOL = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_pool)


def _on_threads(calls) -> None:
    """Run ``fn(*args)`` for every (fn, args) of ``calls`` at once: the first in this thread, the others
    on pool threads; return when all are done, raising the first error any of them raised (this
    thread's first). While another thread's call holds the pool they run one after the other here
    (kernels that share a counter: the first takes every unit)."""
    if len(calls) == 1 or not _POOL.acquire(blocking=False):
        for fn, args in calls:
            fn(*args)
        return
    try:
        while len(_WORKERS) < len(calls) - 1:
            _WORKERS.append(_Worker())
        workers = _WORKERS[:len(calls) - 1]
        for w, job in zip(workers, calls[1:]):
            w.job = job
            w.go.release()
        error = None
        try:
            fn, args = calls[0]
            fn(*args)
        except BaseException as e:  # noqa: BLE001 -- raised below, after the workers are done
            error = e
        try:
            for w in workers:
                w.done.acquire()
                if error is None:
                    error = w.error
                w.error = None
        except BaseException:
            # interrupted (KeyboardInterrupt) while a worker still runs: it is left behind (it blocks when done),
            # new ones serve the next calls
            _WORKERS[:] = [w for w in _WORKERS if w not in workers]
            raise
        if error is not None:
            raise error
    finally:
        _POOL.release()


def _entry(kernel, args):
    """The compiled entry point of numba ``kernel`` for ``args`` (compiled or loaded from the cache in
    this thread), as :func:`_run` keeps them: pool threads call it without the dispatcher."""
    key = (kernel, getattr(args[0], "dtype", None), getattr(args[1], "dtype", None))  # cpu_amx: args[1] is out
    entry = _ENTRIES.get(key)
    if entry is None:
        signature = tuple(kernel.typeof_pyval(a) for a in args)
        kernel.compile(signature)
        entry = _ENTRIES[key] = kernel.overloads[signature].entry_point
        _SIGNATURES[key] = signature
    return entry


def _ready(t, acc):
    # the tensor as the kernels read it: detached, in the accumulation dtype, contiguous (no copy
    # when it already is all three)
    if t.requires_grad:
        t = t.detach()
    if t.dtype != acc:
        t = t.to(acc)
    return t if t.is_contiguous() else t.contiguous()


#: KernelOpts by (dtype, scale, softcap, want_stats): building the record costs microseconds a call
_OPTS: dict = {}


def _opts(acc, call: _Call):
    key = (acc, call.scale, call.softcap, call.want_stats)
    opts = _OPTS.get(key)
    if opts is None:
        if len(_OPTS) >= 256:
            _OPTS.clear()
        opts = _OPTS[key] = _k.make_opts(np.float32 if acc == torch.float32 else np.float64, call.scale,
                                         call.softcap, call.want_stats)
    return opts


#: compiled entry points by (numba dispatcher, compute dtype), and the argument types each was
#: compiled for (tests compare them with every call's): see _run
_ENTRIES: dict = {}
_SIGNATURES: dict = {}


def _run(kernel, *args):
    """``kernel(*args)`` for a numba kernel whose first argument is a (B, H, L, D) numpy array.

    numba's dispatcher finds the compiled version for each call by typing every argument, and the
    two records (KernelMask, KernelOpts: ~35 fields) cost ~4 us a call that way. The launchers pass
    every array C-contiguous, writable and of one dtype per compute dtype (the records' absent parts
    are empty arrays of the same rank), so the types of a call follow from the dispatcher and
    ``args[0].dtype``: after the first call the compiled entry point is called directly (it unboxes
    the arguments without typing them). tests/test_cpu_features.py holds the launchers to this.
    """
    key = (kernel, args[0].dtype)
    entry = _ENTRIES.get(key)
    if entry is not None:
        return entry(*args)
    result = kernel(*args)  # compiles or loads from the cache, and runs
    signature = tuple(kernel.typeof_pyval(a) for a in args)
    compiled = kernel.overloads.get(signature)
    if compiled is not None:
        _ENTRIES[key], _SIGNATURES[key] = compiled.entry_point, signature
    return result


def _tiles(counts) -> int:
    # sum of a kernel's per-task tile counts (numpy's sum costs ~1 us more on a handful)
    return sum(counts.tolist()) if len(counts) <= 512 else int(counts.sum())


#: empty (1, 1, D, 0) arrays standing for "no transposed keys" by (D, numpy dtype)
_NO_KT: dict = {}


def _no_kt(d: int, dtype):
    a = _NO_KT.get((d, dtype))
    if a is None:
        a = _NO_KT[(d, dtype)] = np.empty((1, 1, d, 0), dtype)
    return a


class _FwdBuffers(NamedTuple):
    """A forward's outputs: ``out`` (B, Hq, Lq, Dv) and ``rows`` four (B, Hq, Lq) tensors = row_max,
    row_log, max_logit, entropy (separate allocations: the custom op's returns may not alias each
    other, which torch.compile checks); ``arrays`` the kernels' numpy views (out, row_max, row_log,
    ent), in their argument order."""

    out: torch.Tensor
    rows: Optional[tuple]
    arrays: tuple


def _forward_buffers(B: int, Hq: int, Lq: int, Dv: int, acc, rows: object = True) -> _FwdBuffers:
    """``rows`` False (``call.rows`` False and no sinks): the rows are scratch numpy, no tensor; "lse"
    (``call.rows`` "lse"): row_max and row_log tensors, max_logit None and the entropy scratch numpy."""
    out = torch.empty(B, Hq, Lq, Dv, dtype=acc)
    if rows == "lse":
        t = (torch.empty(B, Hq, Lq, dtype=acc), torch.empty(B, Hq, Lq, dtype=acc), None, None)
        scratch = np.empty((B, Hq, Lq), np.float32 if acc == torch.float32 else np.float64)
        return _FwdBuffers(out, t, (out.numpy(), t[0].numpy(), t[1].numpy(), scratch))
    if rows:
        t = tuple(torch.empty(B, Hq, Lq, dtype=acc) for _ in range(4))
        r = [x.numpy() for x in t]
    else:
        t, r = None, np.empty((4, B, Hq, Lq), np.float32 if acc == torch.float32 else np.float64)
    return _FwdBuffers(out, t, (out.numpy(), r[0], r[1], r[3]))


def _forward_result(q, bufs: _FwdBuffers, sinks, call: _Call, opts):
    """The kernel launchers' 5-tuple from filled buffers: max_logit in nats, sinks folded, out in the
    accumulation dtype (``_launch_forward`` converts it to q's); without ``call.rows`` (and sinks) the
    four row tensors are None (a no-grad call without stats)."""
    out = bufs.out
    if call.rows or sinks is not None:
        rows = bufs.rows
        if rows[2] is not None:  # (None: buffers for "lse")
            np.multiply(bufs.arrays[1], opts.nat, out=rows[2].numpy())  # max_logit: (B, Hq, Lq) nats, keys only
        row_max, row_log, max_logit, ent = rows[0], rows[1], rows[2], rows[3]
        if sinks is not None:
            out, row_max, row_log, ent = _fold_sinks(out, row_max, row_log, ent, sinks, opts)
    else:
        row_max = row_log = max_logit = ent = None
    return out, row_max, row_log, max_logit, ent


def _transposed(x, lq):
    # (B, H, L, d) -> (B, H, d, L) for the block products; queries in blocks of < 4 rows use dot
    # products on x itself, and with Lq < 4 every block does
    if lq < 4:
        return x.new_empty((1, 1, x.shape[3], 0))
    return x.transpose(-1, -2).contiguous()


def _fold_sinks(out, row_max, row_log, ent, sinks, opts):
    """Add exp(sink_h) to every row's softmax denominator after a kernel that saw only the keys.

    The output is rescaled by the keys' share exp(lse_k - lse); the lse halves become those of the
    full denominator (the backward reads them: its P then sums to 1 - p_sink, as it should); the
    entropy becomes that of the keys-plus-sink distribution (``lowering.sink_stats``). In float64,
    so the halves keep their precision.
    """
    per_nat, nat = float(opts.units), float(opts.nat)
    lse_k = (row_max.double() + row_log.double()) * nat  # (B, Hq, Lq) nats, -inf for a fully-masked row
    lse, ent64, mass = lowering.sink_stats(lse_k, ent.double() if opts.want_stats else None, sinks)
    sink_u = sinks.detach().double()[None, :, None] * per_nat  # (1, Hq, 1) score units
    acc = row_max.dtype
    new_max = torch.maximum(row_max.double(), sink_u).to(acc)  # (B, Hq, Lq) rounded as it is stored ...
    new_log = lse * per_nat - new_max.double()  # (B, Hq, Lq) ... and the rest against that: the lse keeps it
    out = out * mass.to(acc)[..., None]  # (B, Hq, Lq, Dv)
    ent = ent64.to(acc) if ent64 is not None else ent
    return out, new_max, new_log.to(acc), ent


def _bf16_engine(q, call: _Call):
    """The engine (``cpu_amx.engine``: AMX or vdpbf16ps) of the bfloat16 kernels when they take this call
    (forward and backward alike), else None; the launchers hand it down, so a call reads it once. Scale 0
    stays off them: their tiles hold raw q.k and take score units as |scale| log2(e) = 0, so their lazy
    running max never leaves -inf ((s - m) * 0 is NaN there): 0.8-1.6 off for a padded or causal row; the
    float32 kernels average the allowed values as they should."""
    return _amx.engine() if q.dtype == torch.bfloat16 and call.scale != 0.0 and _amx is not None else None


def _launch_forward(q, k, v, sinks, call: _Call, acc_out: bool = False):
    """(out, row_max, row_log, max_logit, entropy): out in q's dtype (``acc_out``: as the kernel left it,
    float32 for bfloat16/float16 inputs, before rounding to q's dtype); the lse (sink included) as
    row_max + row_log in score units; max_logit over the keys and the entropy in nats (both
    meaningful only with call.want_stats)."""
    eng = _bf16_engine(q, call)
    if eng is not None:
        res = _amx.launch_forward(q, k, v, sinks, call, eng)  # same outputs; bfloat16 products
    elif _fwd.serves(q):
        res = _fwd.launch_forward(q, k, v, sinks, call)  # same outputs; float32, >= 4 query rows
    else:
        res = _launch_flash(q, k, v, sinks, call)
    if acc_out or res[0].dtype == q.dtype:
        return res
    return (res[0].to(q.dtype),) + res[1:]


def _launch_flash(q, k, v, sinks, call: _Call):
    # _launch_forward on cpu_flash.flash_fwd (float64, and the calls of fewer than 4 query rows)
    acc = acc_dtype(q.dtype)
    B, Hq, Lq, D = q.shape
    Lk, Dv = k.shape[2], v.shape[3]
    mask = _kernel_mask(call.low, acc)
    opts = _opts(acc, call)
    q_, k_, v_ = (_ready(t, acc) for t in (q, k, v))
    # (B, Hkv, D, Lk); none when the kernel transposes each tile's keys itself (one key block) or
    # takes dot products (fewer than 4 queries)
    kt = _no_kt(D, opts.zero.dtype) if Lk <= _k.BLOCK_N or Lq < 4 else _transposed(k_, Lq).numpy()
    bufs = _forward_buffers(B, Hq, Lq, Dv, acc, call.rows or sinks is not None)
    counts = np.zeros(B * Hq * (-(-Lq // _k.BLOCK_M)), np.int64)  # one per task
    flash_fwd = _kernel("flash_fwd", _threads(len(counts), 4.0 * B * Hq * Lq * Lk * D))
    _run(flash_fwd, q_.numpy(), k_.numpy(), kt, v_.numpy(), *bufs.arrays, counts, mask, opts)
    TILE_PRODUCTS["forward"] += _tiles(counts)
    return _forward_result(q, bufs, sinks, call, opts)


def _launch_backward(grad_out, q, k, v, out, row_max, row_log, call: _Call, delta=None, sinks=None, sinks_known=False):
    """(dq, dk, dv) from the saved output and lse halves (sink included, when there is one).

    With ``delta`` (B, Hq, Lq) given, ``out`` is ignored (None) and the kernels use that delta
    instead of computing rowsum(P * dP) themselves (``shard_backward``). ``sinks_known``: the caller
    passes the forward's sinks (None: there were none), so the float32 kernel may normalise its delta
    by rowsum(P) + p_sink (rows of a few keys); callers that do not know keep the plain delta."""
    eng = None if delta is not None else _bf16_engine(q, call)
    if eng is not None:
        return _amx.launch_backward(grad_out, q, k, v, out, row_max, row_log, call, eng)  # bfloat16 products
    if _bwd.serves(q):
        s = sinks if sinks_known else _bwd.SINKS_UNKNOWN
        return _bwd.launch_backward(grad_out, q, k, v, out, row_max, row_log, call, delta, sinks=s)  # float32: one kernel
    acc = acc_dtype(q.dtype)
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    mask = _kernel_mask(call.low, acc)
    opts = _opts(acc, call)
    q_, k_, v_, do = (_ready(t, acc) for t in (q, k, v, grad_out))
    qn, kn, vn, don = q_.numpy(), k_.numpy(), v_.numpy(), do.numpy()
    external = delta is not None
    # empty: flash_bwd_q reads delta
    out_ = np.empty((0, 1, 1, 1), qn.dtype) if external else _ready(out, acc).numpy()
    row_max, row_log = row_max.detach().contiguous().numpy(), row_log.detach().contiguous().numpy()
    dq = torch.empty(B, Hq, Lq, D, dtype=acc)
    dk = torch.empty(B, Hkv, Lk, D, dtype=acc)
    dv = torch.empty(B, Hkv, Lk, Dv, dtype=acc)
    counts_q = np.zeros(B * Hq * (-(-Lq // _k.BLOCK_M)), np.int64)  # one per task of flash_bwd_q
    counts_kv = np.zeros(B * Hkv * (-(-Lk // _k.BLOCK_N)), np.int64)  # ... and of flash_bwd_kv
    threads = _threads(max(len(counts_q), len(counts_kv)), 10.0 * B * Hq * Lq * Lk * D)
    flash_bwd_kv = _kernel("flash_bwd_kv", threads)
    if Lk <= _k.BLOCK_N and len(counts_kv) >= threads:
        # one key block (and a task per kv head keeps every thread busy): flash_bwd_kv alone does the
        # whole backward pass, dQ included, without recomputing P and dP in a second pass
        no_delta = _ready(delta, acc).numpy() if external else np.empty((0, 0, 0), row_max.dtype)
        _run(flash_bwd_kv, qn, kn, vn, don, row_max, row_log, no_delta, dk.numpy(), dv.numpy(), dq.numpy(),
             counts_kv, mask, opts)
        TILE_PRODUCTS["backward_one_pass"] += _tiles(counts_kv)
        return _as(dq, q.dtype), _as(dk, k.dtype), _as(dv, v.dtype)
    # (B, Hq, Lq) rowsum(P * dP), from flash_bwd_q, or the caller's
    delta = (_ready(delta, acc) if external else torch.empty(B, Hq, Lq, dtype=acc)).numpy()
    kt, vt = _transposed(k_, Lq), _transposed(v_, 4)  # (B, Hkv, D, Lk), (B, Hkv, Dv, Lk) (dP needs it)
    flash_bwd_q = _kernel("flash_bwd_q", threads)
    _run(flash_bwd_q, qn, kn, kt.numpy(), vn, vt.numpy(), don, out_, row_max, row_log, delta, dq.numpy(), counts_q,
         mask, opts)
    no_dq = np.empty((0, 0, 0, 0), row_max.dtype)  # dQ came from flash_bwd_q
    _run(flash_bwd_kv, qn, kn, vn, don, row_max, row_log, delta, dk.numpy(), dv.numpy(), no_dq, counts_kv, mask, opts)
    TILE_PRODUCTS["backward_kv"] += _tiles(counts_kv)
    TILE_PRODUCTS["backward_q"] += _tiles(counts_q)
    return _as(dq, q.dtype), _as(dk, k.dtype), _as(dv, v.dtype)


def _as(t, dtype):
    return t if t.dtype == dtype else t.to(dtype)


def shard_backward(q, k, v, grad_out, lse, delta, *, mask=None, causal=False, window=None, q_positions=None,
                   kv_positions=None, scale=None, softcap=None, alibi_slopes=None):
    """Gradients of one (query shard, key shard) pair of a larger attention, from *global* statistics.

    For ring (context-parallel) attention: the queries ``q`` see many key shards, and the softmax
    of a row runs over all of them. Given the row's log-sum-exp over every key (``lse``, nats,
    as ``AttentionStats.lse`` or a merge of shards' lse) and delta = rowsum(dO * O) of the merged
    output O, this computes the pair's share with the fused kernels::

        P  = exp(s - lse)                      (B, Hq, Lq, Lk) never stored, per tile
        dS = P * (dO V^T - delta)
        dq = dS K * scale,  dk = dS^T Q * scale,  dv = P^T dO      (times the softcap's factor)

    Summing ``dq`` over the key shards gives the full dQ; ``dk``/``dv`` are the shard's keys'
    gradients from these queries (sum them over the query shards).

    Args:
        q: (B, Hq, Lq, D) queries of the shard. k, v: (B, Hkv, Lk, D), (B, Hkv, Lk, Dv) keys and
            values of the shard (Hq a multiple of Hkv). grad_out: (B, Hq, Lq, Dv) dO.
        lse: (B, Hq, Lq) global log-sum-exp in nats; -inf for a row that sees no key anywhere
            (its gradients are 0). A float64 lse keeps more than float32 precision for the kernel.
        delta: (B, Hq, Lq) rowsum(grad_out * out) of the whole merged output.
        mask, causal, window, q_positions, kv_positions, scale, softcap, alibi_slopes: as in
            ``selfattn.attention``; positions place the shard in the global sequence (a causal
            mask compares them), scale defaults to 1/sqrt(D) of this D.

    Returns:
        (dq, dk, dv) in the dtypes of q, k, v. float32 and float64 compute as they are;
        float16/bfloat16 in float32.

    Example:
        >>> dq, dk, dv = shard_backward(q_i, k_j, v_j, do_i, lse_i, delta_i, causal=True,
        ...                             q_positions=pos_i, kv_positions=pos_j)
    """
    if _k is None:
        raise RuntimeError("shard_backward needs numba (not installed)")
    req = build_request(q, k, v, mask=mask, causal=causal, window=window, scale=scale, softcap=softcap,
                        q_positions=q_positions, kv_positions=kv_positions, alibi_slopes=alibi_slopes,
                        requires_grad=False)
    problem = CPUBackend().unsupported(q, k, v, req)
    if problem is not None:
        raise ValueError(f"shard_backward: the cpu kernels do not support {problem}")
    B, Hq, Lq, _ = q.shape
    for name, t in (("lse", lse), ("delta", delta)):
        if tuple(t.shape) != (B, Hq, Lq):
            raise ValueError(f"shard_backward: {name} must have shape {(B, Hq, Lq)} (B, Hq, Lq), got {tuple(t.shape)}")
    if tuple(grad_out.shape) != (B, Hq, Lq, v.shape[3]):
        raise ValueError(f"shard_backward: grad_out must have shape {(B, Hq, Lq, v.shape[3])}, got {tuple(grad_out.shape)}")
    acc = acc_dtype(q.dtype)
    call = _Call(lowering.lower(req, _k.BLOCK_M, _k.BLOCK_N), req.scale, 0.0 if req.softcap is None else req.softcap, False)
    # the lse as the kernels' two halves in score units: row_max the rounded value, row_log what
    # rounding left (0 in float64); -inf rows stay -inf with a zero remainder
    lse_u = lse.detach().double() * (_k.LOG2E if acc == torch.float32 else 1.0)  # (B, Hq, Lq)
    row_max = lse_u.to(acc)
    rest = lse_u - row_max.double()
    row_log = torch.where(torch.isfinite(lse_u), rest, torch.zeros_like(rest)).to(acc)
    return _launch_backward(grad_out, q, k, v, None, row_max.contiguous(), row_log.contiguous(), call,
                            delta=delta.detach().to(acc))


def _lse(row_max, row_log):
    # the log-sum-exp in nats from the kernels' halves in score units (base 2 for float32)
    nat = _k.LN2 if row_max.dtype == torch.float32 else 1.0
    return ((row_max.double() + row_log.double()) * nat).to(row_max.dtype)  # (B, Hq, Lq)


def _sinks_grad(sinks, grad_out, out, row_max, row_log, delta=None):
    # ``out``: the forward's output before rounding to q's dtype where the forward kept it (bfloat16/float16
    # calls whose sinks have a gradient): rowsum(dO * O) of a rounded O carries its 8 (11) bits; ``delta``
    # (B, Hq, Lq): that rowsum as the backward kernel had it, when it gave it (then ``out`` is not read)
    return lowering.sink_grad(sinks, _lse(row_max, row_log), grad_out, out, delta)  # (Hq,)


def _grads(grad_out, q, k, v, out, row_max, row_log, call: _Call, sinks, want_dsinks: bool):
    """(dq, dk, dv, d sinks or None) of a forward's saved tensors (``out`` as :func:`_eager_forward` keeps it).
    On the bfloat16 kernels d sinks takes the backward's own delta = rowsum(P * dP) (float64, from the unrounded
    P; ``delta_out``): their output is bf16(P) V, too coarse for rowsum(dO * O) (4 of 300 small calls outside the
    bfloat16 rule, worst 21.7x, against 0 of 300 this way)."""
    eng = _bf16_engine(q, call) if want_dsinks else None
    if eng is not None:
        delta = torch.empty(q.shape[:3], dtype=torch.float64)  # (B, Hq, Lq)
        dq, dk, dv = _amx.launch_backward(grad_out, q, k, v, out, row_max, row_log, call, eng, delta_out=delta.numpy())
        return dq, dk, dv, _sinks_grad(sinks, grad_out, None, row_max, row_log, delta)
    dq, dk, dv = _launch_backward(grad_out, q, k, v, out, row_max, row_log, call, sinks=sinks, sinks_known=True)
    return dq, dk, dv, (_sinks_grad(sinks, grad_out, out, row_max, row_log) if want_dsinks else None)


# -- torch.library custom ops -------------------------------------------------------------------
# An op takes tensors, numbers and strings, not Mask objects: the request's mask, positions and
# ALiBi slopes travel as a layout string (one entry per part, ";"-separated) and the list of their
# tensors, and the op rebuilds the request and lowers it. Mask functions (Python callables) cannot
# travel so: under torch.compile the backend refuses them.

#: layout name -> (mask class, the part's tensors in the order its constructor takes them)
_OP_PARTS = {
    "causal": (_masks.Causal, lambda p: []),
    "padding": (_masks.Padding, lambda p: [p.kv_lengths, p.q_lengths]),
    "key_padding": (_masks.KeyPadding, lambda p: [p.keep]),
    "documents": (_masks.Documents, lambda p: [p.kv_ids, p.q_ids]),
    "dense": (_masks.Dense, lambda p: [p.tensor]),
}
_OP_REQUEST_TENSORS = ("q_positions", "kv_positions", "alibi_slopes")  # Request fields that travel too


def _op_args(req: Request):
    """(layout, tensors) of the request's mask parts, positions and ALiBi slopes, for the ops.

    Layout entries: ``window:<left>:<right>``, ``<part name>:<number of tensors>``, or a Request
    field name (one tensor)."""
    layout, tensors = [], []
    for part in _masks.parts(req.mask):
        if isinstance(part, _masks.Window):
            layout.append(f"window:{part.left}:{part.right}")
            continue
        name = next((n for n, (cls, _) in _OP_PARTS.items() if type(part) is cls), None)
        if name is None:
            raise TypeError(f"cpu backend: a {type(part).__name__} mask cannot be passed to the custom op")
        ts = _OP_PARTS[name][1](part)
        layout.append(f"{name}:{len(ts)}")
        tensors += ts
    for field in _OP_REQUEST_TENSORS:
        if getattr(req, field) is not None:
            layout.append(field)
            tensors.append(getattr(req, field))
    return ";".join(layout), tensors


def _op_call(q, k, v, layout: str, tensors, scale, softcap, want_stats) -> _Call:
    """The :class:`_Call` of an op call: the request rebuilt from ``_op_args`` and lowered."""
    parts, fields, it = [], {}, iter(tensors)
    for entry in filter(None, layout.split(";")):
        name, *args = entry.split(":")
        if name == "window":
            left, right = (None if a == "None" else int(a) for a in args)
            parts.append(_masks.Window(left, right))
        elif name in _OP_PARTS:
            parts.append(_OP_PARTS[name][0](*(next(it) for _ in range(int(args[0])))))
        else:
            fields[name] = next(it)
    mask = None if not parts else parts[0] if len(parts) == 1 else _masks.And(*parts)
    B, Hq, Lq, D = q.shape
    req = Request(mask=mask, scale=scale, softcap=softcap or None, dropout_p=0.0, generator=None,
                  return_stats=want_stats, batch=B, q_heads=Hq, kv_heads=k.shape[1], q_len=Lq,
                  kv_len=k.shape[2], head_dim=D, v_dim=v.shape[3], dtype=q.dtype, device=q.device,
                  requires_grad=False, **fields)
    return _Call(lowering.lower(req, _k.BLOCK_M, _k.BLOCK_N), scale, softcap, want_stats)


@torch.library.custom_op("selfattn::cpu_flash_attention", mutates_args=(), device_types="cpu")
def _flash_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: Optional[torch.Tensor],
    layout: str, mask_tensors: list[Optional[torch.Tensor]], scale: float, softcap: float, want_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    call = _op_call(q, k, v, layout, mask_tensors, scale, softcap, want_stats)
    return _launch_forward(q, k, v, sinks, call, acc_out=sinks is not None)


@_flash_op.register_fake
def _flash_op_fake(q, k, v, sinks, layout, mask_tensors, scale, softcap, want_stats):
    B, Hq, Lq, _ = q.shape
    acc = acc_dtype(q.dtype)
    rows = [q.new_empty((B, Hq, Lq), dtype=acc) for _ in range(4)]  # row_max, row_log, max_logit, entropy
    # with sinks the output in the accumulation dtype (the caller rounds it; the backward's d sinks reads it)
    return (q.new_empty((B, Hq, Lq, v.shape[3]), dtype=q.dtype if sinks is None else acc), *rows)


@torch.library.custom_op("selfattn::cpu_flash_attention_backward", mutates_args=(), device_types="cpu")
def _flash_backward_op(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, row_max: torch.Tensor, row_log: torch.Tensor, sinks: Optional[torch.Tensor],
    layout: str, mask_tensors: list[Optional[torch.Tensor]], scale: float, softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # (dq, dk, dv, d sinks): d sinks (Hq,) with sinks, else an empty tensor
    call = _op_call(q, k, v, layout, mask_tensors, scale, softcap, False)
    dq, dk, dv, dsinks = _grads(grad_out, q, k, v, out, row_max, row_log, call, sinks, sinks is not None)
    return dq, dk, dv, q.new_empty(0, dtype=torch.float32) if dsinks is None else dsinks


@_flash_backward_op.register_fake
def _flash_backward_op_fake(grad_out, q, k, v, out, row_max, row_log, sinks, layout, mask_tensors, scale, softcap):
    dsinks = q.new_empty(0, dtype=torch.float32) if sinks is None else torch.empty_like(sinks)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dsinks


def _setup_context(ctx, inputs, output):
    q, k, v, sinks, layout, mask_tensors, scale, softcap, _ = inputs
    out, row_max, row_log, max_logit, ent = output
    ctx.mark_non_differentiable(row_max, row_log, max_logit, ent)
    ctx.save_for_backward(q, k, v, out, row_max, row_log, sinks, *mask_tensors)
    ctx.layout, ctx.scale, ctx.softcap = layout, scale, softcap


def _backward(ctx, grad_out, *_stats_grads):
    q, k, v, out, row_max, row_log, sinks, *mask_tensors = ctx.saved_tensors
    dq, dk, dv, dsinks = torch.ops.selfattn.cpu_flash_attention_backward(
        grad_out, q, k, v, out, row_max, row_log, sinks, ctx.layout, mask_tensors, ctx.scale, ctx.softcap)
    dsinks = None if sinks is None else dsinks
    return dq, dk, dv, dsinks, None, [None] * len(mask_tensors), None, None, None  # one entry per input


torch.library.register_autograd("selfattn::cpu_flash_attention", _backward, setup_context=_setup_context)


class _EagerFlash(torch.autograd.Function):
    """The op and its autograd formula without torch.library's dispatch, for eager calls: the same
    launchers, so the same numbers, with less overhead per call (which matters for the small heads
    of ``selfattn train``). Under torch.compile the custom ops are used. Calls that read only the
    output take :class:`_EagerFlashOut`."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, call: _Call):
        outs = _eager_forward(ctx, q, k, v, sinks, call)
        ctx.mark_non_differentiable(*outs[1:])
        return outs

    @staticmethod
    def backward(ctx, grad_out, *_stats_grads):
        return _eager_backward(ctx, grad_out)


class _EagerFlashOut(torch.autograd.Function):
    """:class:`_EagerFlash` returning the output alone (the row statistics saved, not returned): four
    outputs fewer for autograd to track (~4 us of a tiny call's forward + backward). Its calls ask the
    launchers for the lse halves only (``_Call.rows`` "lse": no max_logit, no entropy tensor)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, call: _Call):
        return _eager_forward(ctx, q, k, v, sinks, call)[0]

    @staticmethod
    def backward(ctx, grad_out):
        return _eager_backward(ctx, grad_out)


def _eager_forward(ctx, q, k, v, sinks, call: _Call):
    acc = acc_dtype(q.dtype)
    # bfloat16 reaches the launcher as it is (it may take the AMX forward); the backward converts
    ready = [t.detach() if q.dtype == torch.bfloat16 else _ready(t, acc) for t in (q, k, v)]
    out_acc, row_max, row_log, max_logit, ent = _launch_forward(*ready, sinks, call, acc_out=True)
    # keep the kernels' copies (strided heads made contiguous) when they have the inputs' dtype:
    # the backward pass reads them as they are, for the memory the inputs would have taken
    keep = [r if r.dtype == t.dtype else t for r, t in zip(ready, (q, k, v))]
    out = _as(out_acc, q.dtype)
    # sinks with a gradient: the output as the kernel left it (float32 for bfloat16/float16 calls), for
    # d sinks = -sum p_sink rowsum(dO * O) without O's rounding (the backward kernels do not read it; the
    # bfloat16 kernels' backward gives its own delta instead: _grads)
    acc_out = sinks is not None and ctx.needs_input_grad[3] and out_acc.dtype != q.dtype and _bf16_engine(q, call) is None
    ctx.save_for_backward(*keep, out_acc if acc_out else out, row_max, row_log, sinks)
    ctx.call = call
    ctx.set_materialize_grads(False)  # (the statistics never have gradients: no zeros made for them)
    return out, row_max, row_log, max_logit, ent


def _eager_backward(ctx, grad_out):
    if grad_out is None:  # (no gradient reached the output: none for the inputs either)
        return None, None, None, None, None
    q, k, v, out, row_max, row_log, sinks = ctx.saved_tensors
    dq, dk, dv, dsinks = _grads(grad_out, q, k, v, out, row_max, row_log, ctx.call, sinks, ctx.needs_input_grad[3])
    return dq, dk, dv, dsinks, None


# -- short calls (issue 14's fixed cost) ------------------------------------------------------------
# A no-grad float32 forward without mask (or with causal alone), statistics or other options spends
# most of its time around the kernel when it is short: validation, lowering, numpy views, records.
# attention() hands such calls here first (functional._fast). The first call of each (shapes, causal,
# scale) runs the full validation and lowering once and keeps a plan; later calls check only what can
# differ between calls with the same plan (types, dtype, device, gradients, contiguity, the thread
# count) and run the same task functions through cpu_short's entry points. Anything else returns None
# and the general path runs -- with its full checks and messages.


class _Plan(NamedTuple):
    """What a short call of one (q, k, v shapes, causal, scale) needs, validated and lowered once."""

    kernel: object  # cpu_short.fwd_small(_bf16) or cpu_fwd.flash_fwd_t: its compiled entry point
    args: tuple  # the kernel's arguments after q, k, v and out
    out_shape: tuple  # (B, Hq, Lq, Dv)
    like_q: bool  # Dv == D: the output is allocated like q (contiguous, float32)
    tiles: int  # the tiles the general kernels compute for this call (the tile map's non-empty ones)
    rows: bool  # cpu_fwd's tile kernel (numpy arguments): counted in cpu_fwd.CALLS as its launcher counts
    one_thread: bool  # the launchers would run this with every torch thread: served only with one
    split: bool  # the row kernel's units shared among torch's threads (_row_units)
    low: object  # the LoweredMask (keeps the record's arrays alive)
    auto: dict  # auto's decisions for this call: torch threads -> _AutoChoice
    plain: bool  # the row kernel in the calling thread, the output like q (not rows, split nor one_thread)


class _AutoChoice(NamedTuple):
    generation: int  # backends._GENERATION when decided (registrations, calibrations)
    registry: dict  # the registry it ranked
    key: tuple  # the calibration key it read
    cal: object  # the calibration it read (None: none, then env is what decided)
    env_off: bool  # SELFATTN_AUTO_CALIBRATE was "0"
    backend: Optional[str]  # "cpu" or "sdpa" when it ranks strictly first, else None (the general path)
    sdpa: object = None  # backend "sdpa": its short path's keywords for torch (sdpa._plan; False: not served there)


_PACKAGE = sys.modules[__package__]  # selfattn.backends: its registry as it is at call time
# (module globals: ~0.1 us less a short call than torch's attributes)
_TENSOR, _F32, _BF16, _grad_enabled = torch.Tensor, torch.float32, torch.bfloat16, torch.is_grad_enabled
_PLANS: dict = {}
_NO_PLAN = (None,)  # cached "not a short call": the general path


def fast_forward(q, k, v, causal: bool, scale, auto: bool = False):
    """The output of ``attention(q, k, v, causal=causal, scale=scale, backend="cpu")`` (or "auto" when
    ``auto``) for a short no-grad float32 call (bfloat16: decoding steps and tiny heads), or None: the general path must run (anything this
    does not serve, every error, auto choosing another backend). ``scale`` is None or a float."""
    if type(q) is not _TENSOR or type(k) is not _TENSOR or type(v) is not _TENSOR or _short is None:
        return None  # (no numba: nothing here runs)
    dt = q.dtype
    if (dt is not _F32 and dt is not _BF16) or k.dtype is not dt or v.dtype is not dt \
            or not (q.is_cpu and k.is_cpu and v.is_cpu):
        return None
    if _grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return None  # (fast_grad's)
    if not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()):
        return None
    key = (q.shape, k.shape, v.shape, dt, causal, scale, _fwd.serves)  # (a patched serves is another plan)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _plan(q, k, v, causal, scale, key)
    if plan is _NO_PLAN:
        return None
    if plan.plain and not auto:  # (the common case: the row kernel in this thread, the output like q)
        out = torch.empty_like(q)
        plan.kernel(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), *plan.args)
        TILE_PRODUCTS["forward"] += plan.tiles
        return out
    if plan.one_thread and torch.get_num_threads() != 1:
        return None
    if auto:
        got = _auto_choice(plan, q, k, v, causal, scale)
        if got.backend != "cpu":
            # sdpa: its short path's keywords kept with the choice (False: it does not serve the call)
            return _sdpa_planned(q, k, v, got.sdpa) if got.backend == "sdpa" and got.sdpa is not False else None
    # (empty_like: ~1 us less than torch.empty with a shape and dtype)
    out = torch.empty_like(q) if plan.like_q else torch.empty(plan.out_shape, dtype=dt)
    if plan.rows:  # cpu_fwd's kernel, as its launcher calls it (numpy views; a no-grad call may hold leaves)
        plan.kernel(_view(q), _view(k), _view(v), out.numpy(), *plan.args)
    elif plan.split and torch.get_num_threads() > 1:
        _rows_on_threads(plan.kernel, (q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), *plan.args[:-2]), *plan.args[:3])
    else:
        plan.kernel(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), *plan.args)
    TILE_PRODUCTS["forward"] += plan.tiles
    if plan.rows:
        _fwd.CALLS["calls"] += 1
        _fwd.CALLS["tiles"] += plan.tiles
    return out


# -- plain calls with gradients: the general path's _EagerFlash with the request validated, chosen and
# lowered once per (shapes, dtype, causal, scale, backend); the launchers and the autograd formula are the
# general path's own, so the outputs and gradients are its bits


class _GradPlan(NamedTuple):
    call: Optional[_Call]  # what CPUBackend.forward hands _EagerFlash; None: not served here (the general path)
    auto: Optional[dict]  # auto's decision by torch threads (_AutoChoice), None: backend "cpu"


_GRAD_PLANS: dict = {}


def fast_grad(q, k, v, causal: bool, scale, auto: bool = False):
    """The output of ``attention(q, k, v, causal=causal, scale=scale, backend="cpu")`` (or "auto" when
    ``auto``) for a plain call that needs gradients, through the general path's autograd function with
    the request kept from the first call of its kind; or None: the general path must run (a call without
    gradients, anything this does not serve, every error, auto choosing another backend)."""
    if type(q) is not torch.Tensor or type(k) is not torch.Tensor or type(v) is not torch.Tensor or _k is None:
        return None
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return None
    if not (q.is_cpu and k.is_cpu and v.is_cpu):
        return None
    key = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, causal, scale, auto)
    plan = _GRAD_PLANS.get(key)
    if plan is not None and plan.auto is not None:
        got = plan.auto.get(torch.get_num_threads())
        if got is None or not _auto_current(got):
            plan = None
    if plan is None:
        plan = _grad_plan(q, k, v, causal, scale, auto, key)
    if plan.call is None:
        return None
    return _EagerFlashOut.apply(q, k, v, None, plan.call)


def _grad_plan(q, k, v, causal, scale, auto, key):
    call = choice = None
    if q.dim() == 4 and k.dim() == 4 and q.shape[2] and k.shape[2]:  # (empty calls: the general path's answers)
        try:
            req = build_request(q, k, v, causal=causal, scale=scale)
        except (TypeError, ValueError):
            req = None  # the general path raises it, as always
        if req is not None and req.requires_grad:
            served, choice = _served(q, k, v, req, auto)
            if served:
                call = _Call(lowering.lower(req, _k.BLOCK_M, _k.BLOCK_N), req.scale, 0.0, False, "lse")
    if len(_GRAD_PLANS) >= 256:
        _GRAD_PLANS.clear()
    plan = _GRAD_PLANS[key] = _GradPlan(call, {torch.get_num_threads(): choice} if auto else None)
    return plan


def _rows_serve(req: Request) -> bool:
    # whether _masked_rows serves the request: a float32 decoding step (fewer than 4 query rows) without
    # gradients or statistics whose only extras are boolean masks and positions
    return not (_short is None or not USE_ROW_KERNEL or req.q_len >= 4 or req.dtype != torch.float32 or req.requires_grad
                or req.return_stats or req.softcap is not None or req.alibi_slopes is not None or req.sinks is not None
                or req.dropout_p > 0 or "dense_float" in req.mask_kinds)


def _masked_rows(q, k, v, req: Request):
    """The output of a float32 decoding step (fewer than 4 query rows) without gradients or statistics
    whose only extras are boolean masks and positions (a transformers model's step over its cache with
    padding), from cpu_short's row kernel given the mask's bits; or None (the launchers serve it)."""
    if not _rows_serve(req):
        return None
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    # (B|1, Hq|1, Lq|1, Lk), computed once for the layers of a model that share the mask
    allow = lowering.allowed(req) if req.mask is not None else torch.ones(1, 1, 1, Lk, dtype=torch.bool)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _run_masked(q, k, v, _masked_args(q, k, v, req.scale, allow), (B, Hq, Hkv, Lk, D, Dv))


def _masked_args(q, k, v, scale, allow) -> tuple:
    # fwd_small_masked's arguments between the four addresses and the unit size (allow: the mask's bits)
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    Ba, Ha, La = allow.shape[:3]
    return (B, Hq, Hkv, Lq, Lk, D, Dv, float(scale), allow.data_ptr(), Ba, Ha, La)


def _run_masked(q, k, v, args, sizes) -> torch.Tensor:
    # the row kernel under a mask's bits on contiguous float32 q, k, v (args: _masked_args; sizes: (B, Hq,
    # Hkv, Lk, D, Dv)), its units on torch's threads where _row_split says so
    B, Hq, Hkv = sizes[0], sizes[1], sizes[2]
    out = torch.empty(B, Hq, q.shape[2], sizes[5], dtype=torch.float32)
    ptrs = (q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr())
    if torch.get_num_threads() > 1 and _row_split(*sizes):
        _rows_on_threads(_short.fwd_small_masked, ptrs + args, B, Hq, Hkv)
    else:
        _short.fwd_small_masked(*ptrs, *args, Hq // Hkv, _fwd.NO_COUNTER)
    return out


# -- masked decoding steps (a transformers model's step over its cache): attention(q, k, v, mask=m, causal=...)
# with a Mask object and nothing else, fewer than 4 query rows, no gradients. The layers of one step share
# the mask object, so the first call of each (mask, shapes, causal, scale) runs the general path (full
# validation, the backend's choice, the mask's bits) and keeps what the row kernel needs; the other layers'
# calls check what can differ (types, dtype, device, gradients, contiguity, the mask's tensors and their
# versions, auto's inputs) and run the kernel on the kept bits: ~25 us less a call ((4, 8, 2, 1, 66, 64)).


class _MaskedPlan(NamedTuple):
    """What a masked decoding step of one (mask, shapes, causal, scale, backend) needs, validated once."""

    mask: object  # the caller's Mask (the key holds its id; the plan keeps it alive, so the id is not reused)
    rule: object  # mask.cache_key() when planned (a window's sizes, the parts of an And ...): compared on every call
    tensors: tuple  # the mask's tensors when planned (identity and version are compared on every call)
    versions: tuple  # their _version then
    allow: Optional[torch.Tensor]  # (B|1, Hq|1, Lq|1, Lk) bool bits; None: not served here (the general path)
    args: tuple  # _masked_args (the bits' address among them)
    sizes: tuple  # (B, Hq, Hkv, Lk, D, Dv) for _run_masked
    auto: Optional[dict]  # auto's decision by torch threads (_AutoChoice; backend "cpu" when served), None: backend "cpu"


_MASKED: dict = {}


def _mask_tensors(mask) -> tuple:
    # the tensors a mask's bits are made of (key padding and padding read directly: ~1 us less than lowering's walk)
    t = type(mask)
    if t is _masks.KeyPadding:
        return (mask.keep,)
    if t is _masks.Padding:
        return (mask.kv_lengths, mask.q_lengths)
    return tuple(lowering._mask_tensors(mask))


def fast_masked(q, k, v, mask, causal: bool, scale, auto: bool = False):
    """The output of ``attention(q, k, v, mask=mask, causal=causal, scale=scale, backend="cpu")`` (or
    "auto" when ``auto``) for a no-grad float32 decoding step that _masked_rows serves, from the row
    kernel on the bits kept from the first call with this mask, or None: the general path must run
    (anything else, every error, auto choosing another backend)."""
    if (type(q) is not torch.Tensor or type(k) is not torch.Tensor or type(v) is not torch.Tensor or _short is None
            or not isinstance(mask, _masks.Mask)):
        return None
    f32 = torch.float32
    if q.dtype is not f32 or k.dtype is not f32 or v.dtype is not f32 or not (q.is_cpu and k.is_cpu and v.is_cpu):
        return None
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return None
    if not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()):
        return None
    key = (id(mask), q.shape, k.shape, v.shape, causal, scale, auto)
    plan = _MASKED.get(key)
    if plan is not None and plan.mask is mask:
        tensors = _mask_tensors(mask)
        fresh = len(tensors) == len(plan.tensors) and mask.cache_key() == plan.rule  # (an attribute changed in place)
        if fresh:
            for t, was, ver in zip(tensors, plan.tensors, plan.versions):
                if t is not was or (t is not None and lowering.tensor_version(t) != ver):
                    fresh = False
                    break
        if fresh and plan.auto is not None:
            got = plan.auto.get(torch.get_num_threads())
            fresh = got is not None and _auto_current(got)
        if not fresh:
            plan = None
    else:
        plan = None
    if plan is None:
        return _masked_first(q, k, v, mask, causal, scale, auto, key)
    if plan.allow is None or not USE_ROW_KERNEL:
        return None
    return _run_masked(q, k, v, plan.args, plan.sizes)


def _masked_first(q, k, v, mask, causal, scale, auto, key):
    # the general path's answer for a call fast_masked has no plan for, and the plan for the next ones
    try:
        req = build_request(q, k, v, mask=mask, causal=causal, scale=scale, requires_grad=False)
    except (TypeError, ValueError):
        return None  # the general path raises it, as always
    tensors = _mask_tensors(mask)
    versions = tuple(None if t is None else lowering.tensor_version(t) for t in tensors)
    rule = mask.cache_key()
    served, choice = _served(q, k, v, req, auto)
    allow = out = None
    if served and _rows_serve(req):
        out = _masked_rows(q, k, v, req)
        if out is not None and req.mask is not None:
            allow = lowering.allowed(req)  # (cached by the call above)
    args = () if allow is None else _masked_args(q, k, v, req.scale, allow)
    if len(_MASKED) >= 64:
        _MASKED.clear()
    _MASKED[key] = _MaskedPlan(mask, rule, tensors, versions, allow, args,
                               (q.shape[0], q.shape[1], k.shape[1], k.shape[2], q.shape[3], v.shape[3]),
                               {torch.get_num_threads(): choice} if auto else None)
    return out


def _served(q, k, v, req, auto: bool) -> tuple:
    # (whether this backend serves req, auto's _AutoChoice or None): under auto when it takes cpu
    # without a data check (_cpu_first), else when cpu is registered and takes the request
    if auto:
        choice = _cpu_first(q, k, v, req)
        return choice.backend == "cpu", choice
    cpu = _PACKAGE._REGISTRY.get("cpu")
    return cpu is not None and _PACKAGE._missing(cpu, q, k, v, req) is None, None


def _cpu_first(q, k, v, req) -> "_AutoChoice":
    """auto's choice for a request where it cannot depend on the tensors' values: backend "cpu"
    when cpu is capable and ranks strictly ahead of every other capable backend (choose() then takes it
    without a data check), else None (the general path chooses)."""
    registry = _PACKAGE._REGISTRY
    ranks = {}
    for name, b in registry.items():
        if _PACKAGE._missing(b, q, k, v, req, data=False) is None:
            ranks[name] = b.rank(req)  # cpu's may measure the calibration now
    cpu = ranks.get("cpu")
    first = cpu is not None and all(r > cpu for name, r in ranks.items() if name != "cpu")
    key = _calibration_key(req.dtype, req.requires_grad)
    return _AutoChoice(_CHOICE_GENERATION[0], registry, key, _CALIBRATIONS.get(key), _calibration_off(),
                       "cpu" if first else None)


def _auto_current(got: "_AutoChoice") -> bool:
    # whether an auto decision still stands: nothing registered or calibrated since, the same calibration
    if got.generation != _CHOICE_GENERATION[0] or got.registry is not _PACKAGE._REGISTRY:
        return False
    cal = _CALIBRATIONS.get(got.key)
    return cal is got.cal and (cal is not None or got.env_off == _calibration_off())


def _plan(q, k, v, causal, scale, key):
    if len(_PLANS) >= 256:
        _PLANS.clear()
    _PLANS[key] = plan = _make_plan(q, k, v, causal, scale)
    return plan


def _make_plan(q, k, v, causal, scale):
    if _short is None or q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return _NO_PLAN
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    if not (B and Hq and Lq and Lk):  # empty calls: the general path's own answers
        return _NO_PLAN
    try:
        req = build_request(q, k, v, causal=causal, scale=scale, requires_grad=False)
    except (TypeError, ValueError):
        return _NO_PLAN  # the general path raises it, as always
    if CPUBackend().unsupported(q, k, v, req) is not None:
        return _NO_PLAN
    low = lowering.lower(req, _k.BLOCK_M, _k.BLOCK_N)
    km = _kernel_mask(low, torch.float32)
    opts = _opts(torch.float32, _Call(low, req.scale, 0.0, False, False))
    rows = not _small(B, Hq, Lq, Lk, D, Dv)
    if not rows:
        kernel = _short.fwd_small if q.dtype == torch.float32 else _short.fwd_small_bf16
        args = (B, Hq, Hkv, Lq, Lk, D, Dv, causal, float(req.scale), Hq // Hkv, _fwd.NO_COUNTER)  # (float64: cpu_short scores in float64)
    elif q.dtype != torch.float32:
        return _NO_PLAN  # bfloat16 beyond the small calls: the general launchers (AMX where there is one)
    elif not _fwd.serves(q):
        return _NO_PLAN  # the general launcher would take another kernel (a test's patched serves)
    tasks = B * Hq * (-(-Lq // _k.BLOCK_M))
    scratch = torch.empty(B, Hq, Lq, Dv, dtype=q.dtype)
    if rows:
        # the general launcher's own compiled kernel (a wrapper would compile the task function into
        # itself again: ~20 s more on a process's first call) over all its work units in this thread, the
        # rows and counts as scratch (calls from several threads at once write them in any order: nothing
        # reads them)
        kernel = _fwd.flash_fwd_t
        if _k.lean_call(_view(q), km, opts):  # (k_norm 0 here: no block takes float64 scores)
            kernel = _k.lean_variant(kernel)
        r = np.empty((3, B, Hq, Lq), np.float32)
        args = (r[0], r[1], r[2], np.zeros(tasks, np.int64), km, opts, 0, B * Hq * _fwd._units(Lq, _fwd.PAIR)[2], _fwd.PAIR,
                _fwd.NO_COUNTER)
        full = (_view(q), _view(k), _view(v), scratch.numpy(), *args)
    else:
        full = (q.data_ptr(), k.data_ptr(), v.data_ptr(), scratch.data_ptr(), *args)
    one_thread = rows and 4.0 * B * Hq * Lq * Lk * D >= THREADS_MIN_FLOPS and min(numba.config.NUMBA_NUM_THREADS, tasks) > 1  # as _threads
    # the row kernel's float32 calls of serving size (decoding over a long cache) on every torch thread
    split = not rows and q.dtype == torch.float32 and _row_split(B, Hq, Hkv, Lk, D, Dv)
    # the first run compiles (or loads) the kernel; then its entry point, as _run takes them
    kernel(*full)
    compiled = kernel.overloads.get(tuple(kernel.typeof_pyval(a) for a in full))
    entry = compiled.entry_point if compiled is not None else kernel
    t = km.tiles  # (B|1, Hq|1, nQ, nK): a broadcast dim counts for every batch entry / head
    tiles = int((t != _k.EMPTY).sum()) * (B if t.shape[0] == 1 else 1) * (Hq if t.shape[1] == 1 else 1)
    return _Plan(entry, args, (B, Hq, Lq, Dv), Dv == D, tiles, rows, one_thread, split, low, {},
                 Dv == D and not (rows or one_thread or split))


def _view(t):
    return (t.detach() if t.requires_grad else t).numpy()


def _small(B, Hq, Lq, Lk, D, Dv) -> bool:
    # cpu_short.fwd_small (row by row, no tiles) serves decoding steps (fewer than 4 query rows) and
    # heads of little work, where the tile kernels' ~4 us of set-up per task dominate: measured (1
    # thread) (1,1,8,8,16) 13 us against 20, (1,4,16,16,64) 21 against 35, (1,1,32,32,64) 17 against
    # 21 (Lq*Lk*(D+Dv) = 2**17), behind from (64 x 64 x 64) on (66 against 37)
    return USE_ROW_KERNEL and (Lq < 4 or Lq * Lk * (D + Dv) <= 1 << 17)


USE_ROW_KERNEL = True  # cpu_short.fwd_small for short plain calls (False: the tile kernels / general path)

#: row-kernel calls (decoding steps) that read at least this many bytes of keys and values run on every
#: torch thread. Measured quiet on the 2-vCPU Xeon (2026-12-02 j), 2 threads against 1, alone: 1.55x the time
#: at 2 MB, 1.00x at 4 MB, 0.83x at 8 MB, 0.59-0.71x at 16-32 MB; but between torch's own parallel ops (a
#: model's decoding step, torch's OpenMP threads still spinning on the other core when the pool thread
#: wakes) no gain at 4 and 16 MB (518 vs 438 us, 873 vs 849) and 0.78x at 33 MB
SHORT_THREADS_MIN_BYTES = 1 << 25


def _row_units(B, Hq, Hkv) -> tuple:
    # (threads, query heads per unit) for the row kernel on torch's threads: whole groups of query heads
    # (each kv head read once) where there are enough of them, else each group split in as many runs as
    # make a unit per thread
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS, B * Hq)
    group = Hq // Hkv
    runs = min(group, -(-threads // (B * Hkv)))
    return threads, -(-group // runs)


def _row_split(B, Hq, Hkv, Lk, D, Dv) -> bool:
    # whether a float32 row-kernel call shares its units among torch's threads (SHORT_THREADS_MIN_BYTES of keys
    # and values read, more than one query head)
    return B * Hq > 1 and 4 * B * Hkv * Lk * (D + Dv) >= SHORT_THREADS_MIN_BYTES


def _rows_on_threads(kernel, args, B, Hq, Hkv) -> None:
    # cpu_short's row kernel (fwd_small or fwd_small_masked, `args` those before `per` and the counter) on
    # torch's threads, each taking its next unit from one counter
    threads, per = _row_units(B, Hq, Hkv)
    _on_threads([(kernel, (*args, per, np.zeros(1, np.int64)))] * threads)


def _auto_choice(plan: _Plan, q, k, v, causal, scale) -> "_AutoChoice":
    """What auto picks for the plan's call on this thread count, where that cannot depend on the
    data: backend "cpu" or "sdpa" when it ranks strictly ahead of every other backend, else None."""
    threads = torch.get_num_threads()
    got = plan.auto.get(threads)
    if got is not None and _auto_current(got):
        return got
    registry = _PACKAGE._REGISTRY
    req = build_request(q, k, v, causal=causal, scale=scale, requires_grad=False)
    ranks = {name: b.rank(req) for name, b in registry.items()}  # cpu's may measure the calibration now
    first = min(ranks, key=ranks.get)  # the first registered of the lowest, as choose() takes it
    strict = all(r > ranks[first] for name, r in ranks.items() if name != first)
    key = _calibration_key(q.dtype, False)
    backend = first if strict and first in ("cpu", "sdpa") else None
    got = plan.auto[threads] = _AutoChoice(_CHOICE_GENERATION[0], registry, key, _CALIBRATIONS.get(key),
                                           _calibration_off(), backend,
                                           _sdpa_plan(q, k, v, causal, scale) if backend == "sdpa" else None)
    return got


def _calibration_off() -> bool:
    return os.environ.get(CALIBRATE_ENV, "1").strip() == "0"


# -- auto's rank: cpu against sdpa, from this host ------------------------------------------------
# Where sdpa serves a call natively (no mask, or causal alone with default positions) in float32,
# bfloat16 or float16, which of the two is faster depends on the host (vector width, AMX, clock,
# torch's build) and on the kernels of the day: an AMD Zen machine had the float32 kernel ahead of
# sdpa, an Intel Xeon with AMX behind it in float32 and ahead in bfloat16. So it is measured, once
# per process and (dtype, gradients, threads), the first time auto meets such a call: both backends
# run two causal probes -- a short call (the fixed cost) and a longer one (the throughput) -- each
# backend's time is fitted as fixed + per_work * work, and a call goes to the one predicted faster
# (within TIE_MARGIN of each other, the recorded table keeps the choice the same across processes).
# Elsewhere the reasons are structural and the recorded table stands (_table_rank).

CALIBRATE_ENV = "SELFATTN_AUTO_CALIBRATE"  # "0": measure nothing, the recorded table decides
# (B, H, Lq, Lk, D), causal where Lq == Lk, growing in work: the fixed cost, a decoding step, a short
# call, the throughput end (a call's time is predicted along the lines joining them: a straight line
# through the last two alone missed the tiny calls' time by 8x, their kernels differ)
PROBES = ((1, 1, 8, 8, 16), (1, 4, 1, 128, 64), (1, 4, 32, 32, 64), (1, 4, 256, 256, 64))
_CALIBRATED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TIE_MARGIN = 1.3  # predicted times closer than this factor: a tie, the recorded table decides
MEASURE_TRIES = 3  # measurements taken before giving up on one that cannot be right
EXTRAPOLATE = 4.0  # calls of more work than this times the largest probe's: the recorded table decides


class Fit(NamedTuple):
    """One backend's time for one kind of call: ``fixed + per_work * work`` seconds."""

    fixed: float  # seconds per call at no work
    per_work: float  # seconds per unit of work (_work)

    def time(self, work: float) -> float:
        return self.fixed + self.per_work * work


class Calibration(NamedTuple):
    """cpu against sdpa on this host for one (dtype, gradients, threads), measured or given."""

    key: tuple  # (dtype, gradients, torch threads)
    cpu: Fit
    sdpa: Fit
    probes: tuple  # ((work, cpu seconds, sdpa seconds), ...) one per probe, growing in work
    source: str  # "measured in N ms", or who set it

    def predict(self, work: float) -> tuple:
        """(cpu seconds, sdpa seconds) for a call of ``work``: along the straight lines joining the
        probes, the smallest probe's times below it, the last line beyond the largest (``_rank`` trusts
        that only up to EXTRAPOLATE times its work); the two fits where there are no probes."""
        pts = self.probes
        if len(pts) < 2:
            return self.cpu.time(work), self.sdpa.time(work)
        if work <= pts[0][0]:
            return pts[0][1], pts[0][2]
        i = 1
        while i < len(pts) - 1 and work > pts[i][0]:
            i += 1
        (w0, c0, s0), (w1, c1, s1) = pts[i - 1], pts[i]
        f = (work - w0) / (w1 - w0)
        return c0 + f * (c1 - c0), s0 + f * (s1 - s0)


#: calibrations by key; None where none applies (sdpa or cpu refuses the probes: bfloat16 gradients)
_CALIBRATIONS: dict = {}


def _work(req) -> float:
    # B * Hq * Lq * Lk * (D + Dv) / 2, halved under a causal mask (both backends skip the masked half)
    work = req.batch * req.q_heads * req.q_len * req.kv_len * (req.head_dim + req.v_dim) / 2
    return work / 2 if "causal" in req.mask_kinds else work


def _calibration_key(dtype, grad) -> tuple:
    return (dtype, bool(grad), torch.get_num_threads())


def set_calibration(cal: Optional[Calibration], dtype=torch.float32, grad: bool = False) -> None:
    """Record ``cal`` as this process's calibration for (dtype, grad) at the current thread count;
    None forgets it (the next auto call of that kind measures again)."""
    key = _calibration_key(dtype, grad)
    if cal is None:
        _CALIBRATIONS.pop(key, None)
    else:
        _CALIBRATIONS[key] = cal._replace(key=key)
    _CHOICE_GENERATION[0] += 1


def calibration(dtype=torch.float32, grad: bool = False, measure: bool = True) -> Optional[Calibration]:
    """This process's cpu-vs-sdpa calibration for (dtype, grad) at the current thread count: measured
    on first use (when ``measure``), the same record ever after. None where there is none: a dtype
    not calibrated (float64), SELFATTN_AUTO_CALIBRATE=0, under torch.compile, numba missing, or a
    kind of call one of the two refuses (bfloat16/float16 gradients: sdpa)."""
    if torch.compiler.is_compiling():
        return None  # (the key reads the thread count, which torch.compile cannot trace)
    key = _calibration_key(dtype, grad)
    if key in _CALIBRATIONS or not measure:
        return _CALIBRATIONS.get(key)
    if (_k is None or dtype not in _CALIBRATED_DTYPES or os.environ.get(CALIBRATE_ENV, "1").strip() == "0"
            or torch.compiler.is_compiling()):
        return None
    _CALIBRATIONS[key] = cal = _measure(dtype, grad, key)
    _CHOICE_GENERATION[0] += 1
    return cal


def _counters() -> list:
    # the kernels' call and tile counters (TILE_PRODUCTS, cpu_fwd.CALLS, cpu_amx.AMX_CALLS, ...):
    # a calibration's probes must not show in them
    found = [TILE_PRODUCTS]
    for name, mod in list(sys.modules.items()):
        if name.startswith("selfattn.kernels.") and mod is not None:
            found += [d for n, d in vars(mod).items() if n.endswith("CALLS") and isinstance(d, dict)]
    return found


def _measure(dtype, grad: bool, key: tuple) -> Optional[Calibration]:
    """Time cpu and sdpa on PROBES (interleaved, best of 7 rounds of ~2 ms each) and fit both; a
    measurement that cannot be right (a small probe timed slower than the largest: the machine was
    busy during it) is taken again, up to MEASURE_TRIES times, then none is recorded (the table decides)."""
    from . import get

    cpu, sdpa = get("cpu"), get("sdpa")
    counters = _counters()
    saved = [dict(c) for c in counters]
    gen = torch.Generator().manual_seed(0)  # the caller's random stream is not touched
    # one thread: CPU time of this thread (steadier on a busy machine); more: wall time
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    start = time.perf_counter()
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
            probes = []
            for B, H, Lq, Lk, D in PROBES:
                q, k, v, do = (torch.randn(B, H, n, D, generator=gen).to(dtype) for n in (Lq, Lk, Lk, Lq))
                leafs = [t.requires_grad_(grad) for t in (q, k, v)]
                req = build_request(q, k, v, causal=Lq == Lk, requires_grad=grad)
                if cpu.unsupported(q, k, v, req) or sdpa.unsupported(q, k, v, req):
                    return None
                probes.append((q, k, v, do, leafs, req))
            for _ in range(MEASURE_TRIES):
                points = tuple(_probe(cpu, sdpa, clock, grad, *probe) for probe in probes)
                if _plausible(points):
                    break
            else:
                return None
    finally:
        for c, old in zip(counters, saved):
            c.clear()
            c.update(old)
    fits = []
    (w1, *t1), (w2, *t2) = points[0], points[-1]
    for a, b in zip(t1, t2):
        per_work = (b - a) / (w2 - w1)
        fits.append(Fit(max(0.0, a - per_work * w1), per_work))
    return Calibration(key, fits[0], fits[1], points, f"measured in {(time.perf_counter() - start) * 1e3:.0f} ms")


def _plausible(points) -> bool:
    # each backend takes longest on the largest probe (16000x the smallest's work; the smaller ones
    # need not be in order: a decoding step with gradients costs about what a 32 x 32 call does)
    return all(points[-1][i] > max(p[i] for p in points[:-1]) for i in (1, 2))


def _probe(cpu, sdpa, clock, grad, q, k, v, do, leafs, req) -> tuple:
    # (work, cpu seconds, sdpa seconds) of one probe: each backend the way attention() runs it (a
    # short no-grad call through its short-call path where that serves it; a call with gradients
    # through attention() itself, as a training step makes it: cpu's keeps its request (fast_grad),
    # sdpa's builds and checks one every call, ~50 us of a tiny step that timing sdpa's forward alone
    # left out). No observer sees the probes.
    from selfattn import functional

    short = {cpu: fast_forward, sdpa: _sdpa_fast}
    causal = req.mask is not None

    def run(b, n):
        token = functional._OBSERVERS.set(())
        try:
            t0 = clock()
            for _ in range(n):
                if grad:
                    torch.autograd.grad(functional.attention(*leafs, causal=causal, backend=b.name), leafs, do)
                else:
                    with torch.no_grad():
                        if short[b](q, k, v, req.mask is not None, None) is None:
                            b.forward(q, k, v, req)
            return (clock() - t0) / n
        finally:
            functional._OBSERVERS.reset(token)

    n = max(1, min(200, int(2e-3 / max(run(cpu, 1), run(sdpa, 1), 1e-6))))  # warm-up, and sizing
    best = [float("inf"), float("inf")]
    for _ in range(7):  # interleaved: both see the machine of the same moment
        best = [min(t, run(b, n)) for t, b in zip(best, (cpu, sdpa))]
    return (_work(req), *best)


_STRUCTURAL = frozenset({"window", "padding", "key_padding", "documents", "function"})


def _rank(req: Request, explain: bool = True) -> tuple:
    """(rank, reason) of the cpu backend for ``req``; the calibrated reason is written only when
    ``explain`` (auto asks for the rank on every call). math ranks 50; sdpa 10, or 20 when it needs
    a dense Lq x Lk mask tensor, and it cannot serve stats, softcap or sinks at all."""
    kinds = req.mask_kinds
    positions = req.q_positions is not None or req.kv_positions is not None
    if (kinds & _STRUCTURAL or req.alibi_slopes is not None
            or ("causal" in kinds and (req.q_len != req.kv_len or positions))):
        return 15.0, ("sdpa would take this mask as a dense Lq x Lk tensor and do all the work; cpu skips the "
                      "tiles it rules out (window 44-61x, packed documents 13.6-17.5x; BENCHMARKS.md)")
    if kinds & {"dense_bool", "dense_float"}:
        if req.requires_grad and req.dtype == torch.float32:
            return 15.0, "a dense mask with float32 gradients: sdpa's backward runs torch's math kernel (3.9x slower, BENCHMARKS.md)"
        return 30.0, "a dense mask: sdpa reads it once, cpu classifies its tiles first (0.78-0.83x, BENCHMARKS.md)"
    if req.return_stats or req.softcap is not None or req.sinks is not None:
        return 30.0, "sdpa cannot serve stats, softcap or sinks: cpu, before math"
    cal = calibration(req.dtype, req.requires_grad) if req.dtype in _CALIBRATED_DTYPES else None
    if cal is None:
        return _table_rank(req)
    work = _work(req)
    reach = EXTRAPOLATE * max(p[0] for p in cal.probes) if cal.probes else float("inf")
    if work > reach:
        # far beyond what was measured a straight line says little (caches, threads): the table
        rank, _ = _table_rank(req)
        return rank, (f"this call's work ({work:.3g}) is more than {EXTRAPOLATE:g}x the largest calibration probe's "
                      f"({reach / EXTRAPOLATE:.3g}; {cal.source}): the recorded table decides (rank {rank:g})")
    t_cpu, t_sdpa = cal.predict(work)
    tie = 1.0 / TIE_MARGIN < t_cpu / t_sdpa < TIE_MARGIN
    if not explain:
        return (_table_rank(req)[0] if tie else min(45.0, 10.0 * t_cpu / t_sdpa)), ""
    threads = cal.key[2]
    why = (f"cpu against sdpa calibrated on this host ({str(req.dtype).replace('torch.', '')}, "
           f"{'forward + backward' if req.requires_grad else 'forward'}, {threads} thread{'s' if threads > 1 else ''}; "
           f"{cal.source}): {_measured(cal)}; "
           f"this call (work {work:.3g}): cpu {t_cpu * 1e6:.0f} us, sdpa {t_sdpa * 1e6:.0f} us")
    if tie:
        # a near tie: either is fine for speed, and the recorded table keeps the choice the same in
        # every process (a measurement this close can fall either way)
        rank, _ = _table_rank(req)
        return rank, f"{why}: within {TIE_MARGIN - 1:.0%} of each other, so the recorded table decides (rank {rank:g})"
    # sdpa ranks 10 here: cpu goes first exactly when predicted faster
    return min(45.0, 10.0 * t_cpu / t_sdpa), f"{why} -> rank 10 x {t_cpu / t_sdpa:.2f}"


def _measured(cal: Calibration) -> str:
    # the probes' times (what predictions join), or the fits of a calibration given without them
    if len(cal.probes) >= 2:
        return "probes (work: cpu / sdpa us) " + ", ".join(f"{w:.3g}: {c * 1e6:.0f} / {t * 1e6:.0f}" for w, c, t in cal.probes)
    return (f"cpu {cal.cpu.fixed * 1e6:.0f} us + {cal.cpu.per_work * 1e9:.3g} ns/work, sdpa {cal.sdpa.fixed * 1e6:.0f} us + "
            f"{cal.sdpa.per_work * 1e9:.3g} ns/work")


def _table_rank(req: Request) -> tuple:
    # the recorded table (BENCHMARKS.md, "CPU backend (issue 5)" and "Short sequences (issue 7)": the
    # AMD Zen machine), for calls the calibration does not cover (float64; SELFATTN_AUTO_CALIBRATE=0;
    # torch.compile before any measurement): float32, no mask or causal: 8, before sdpa, where cpu was
    # faster there -- with gradients from 32 keys on, without from B*H*Lq*Lk*D = 4e6 on -- else 30.
    # Other dtypes: 30, sdpa first.
    why = "the recorded table (BENCHMARKS.md, measured on an AMD Zen 3 machine; no calibration for this call)"
    if req.dtype == torch.float32:
        work = req.batch * req.q_heads * req.q_len * req.kv_len * req.head_dim
        return (8.0 if (req.requires_grad and req.kv_len >= 32) or work >= 4e6 else 30.0), why
    return 30.0, why


# -- the backend --------------------------------------------------------------------------------

_LOWERED = (_masks.Causal, _masks.Window, _masks.Padding, _masks.KeyPadding, _masks.Documents, _masks.Dense, _masks.Function)


class CPUBackend(Backend):
    name = "cpu"
    summary = "fused flash-style numba kernel (forward + backward), O(L) memory, skips masked tiles, stats for free"
    _FEATURES = {
        "masks": "all: causal, window, padding, key_padding, documents and mask functions with tile skipping; dense bool/float element-wise",
        "positions": "yes; ALiBi in the kernel, sinks (with gradients) around it",
        "dtypes": "float32, float64; float16/bfloat16 accumulate in float32",
        "bfloat16": None,  # read when asked (features): the engine follows the environment
        "stats": "yes, from the online softmax (no gradient through them)",
        "softcap": "yes",
        "dropout": "no (refused)",
        "backward": "fused, deterministic; no double backward, no gradient for a float mask",
        "device": "cpu only",
        "memory": "O(L)",
    }

    @property
    def features(self) -> dict:
        bf16 = _amx.describe() if _amx is not None else "products: float32 fallback (inputs converted)"
        return {k: (bf16 if k == "bfloat16" else v) for k, v in self._FEATURES.items()}

    capabilities = Backend.capabilities.replace(
        devices=frozenset({"cpu"}), dropout=False, generator=False, float_mask_grad=False, requires=("numba",))

    def unsupported(self, q, k, v, req: Request):
        if _k is None:
            return "numba (not installed)"
        if req.device.type != "cpu":
            return f"device {req.device.type!r} (CPU tensors only)"
        if req.dropout_p > 0:
            return "dropout (dropout_p > 0; backend 'math' or 'sdpa' supports it)"
        for part in _masks.parts(req.mask):
            if not isinstance(part, _LOWERED):
                return f"mask {type(part).__name__}"
            if isinstance(part, _masks.Dense) and part.tensor.requires_grad:
                return "gradient with respect to a float mask"
            if isinstance(part, _masks.Function) and torch.compiler.is_compiling():
                return "mask function under torch.compile (its Python function runs eagerly only; use backend 'math')"
        return None

    def rank(self, req: Request) -> float:
        return _rank(req, explain=False)[0]

    def rank_reason(self, req: Request) -> str:
        """Why :meth:`rank` says what it says for ``req`` (``selfattn backends --which`` prints it)."""
        return _rank(req, explain=True)[1]

    def forward(self, q, k, v, req: Request):
        softcap = 0.0 if req.softcap is None else req.softcap
        if torch.compiler.is_compiling():
            layout, tensors = _op_args(req)
            out, row_max, row_log, max_logit, ent = torch.ops.selfattn.cpu_flash_attention(
                q, k, v, req.sinks, layout, tensors, req.scale, softcap, req.return_stats)
            out = _as(out, q.dtype)  # (with sinks the op's output is float32 for bfloat16/float16 inputs)
        else:
            out = _masked_rows(q, k, v, req)  # (decoding steps under a boolean mask: the row kernel)
            if out is not None:
                return out, None
            low = lowering.lower(req, _k.BLOCK_M, _k.BLOCK_N)
            if req.requires_grad and not req.return_stats:
                return _EagerFlashOut.apply(q, k, v, req.sinks, _Call(low, req.scale, softcap, False, "lse")), None
            if req.requires_grad:
                call = _Call(low, req.scale, softcap, req.return_stats)
                out, row_max, row_log, max_logit, ent = _EagerFlash.apply(q, k, v, req.sinks, call)
            else:  # nothing to differentiate: the launcher alone, and the rows only for stats
                call = _Call(low, req.scale, softcap, req.return_stats, req.return_stats)
                out, row_max, row_log, max_logit, ent = _launch_forward(q, k, v, req.sinks, call)
        if not req.return_stats:
            return out, None
        lse = _lse(row_max, row_log)
        if req.mask is not None and max_logit.dtype == torch.float32 and not torch.compiler.is_compiling():
            lse, max_logit = _floor_rows(req, lse, max_logit)
        return out, AttentionStats(lse, max_logit, ent)


#: max_logit (nats) at or below this: the row's every allowed score was at most -FLT_MAX in the float32
#: kernels' base-2 score units, i.e. a float mask's entries below -FLT_MAX ln 2 (finfo.min: transformers'
#: masks), which ``_flat`` clamps to -FLT_MAX (a finite mask entry stays finite); no score reaches there
#: otherwise
_FLOOR_NATS = -float(np.finfo(np.float32).max) * 0.6931471805599453 * (1.0 - 2.0 ** -20) if _k is not None else 0.0


def _floor_rows(req: Request, lse, max_logit):
    """(lse, max_logit) with the rows at the score-unit floor (``_FLOOR_NATS``) taken from their mask.

    The kernels see such a row's scores all at -FLT_MAX: the output is right (the mean of the values the
    float32 definition weighs equally: fl32(s + b) = b there, q.k being far below b's ulp of 2**104), but
    max_logit and lse came out as -FLT_MAX ln 2 = -2.36e38. Their float32 values are the row's largest
    allowed mask entry (q.k, the ALiBi term and log(number of keys) are below its ulp); with sinks the lse
    is the sink's already. A few rows: a tensor pass over the flagged rows' mask entries, not the kernels.
    (Not handled: a row whose entries below -FLT_MAX ln 2 differ, as -3.0e38 and finfo.min: the clamp makes
    them equal, so the kernels weigh all alike where the definition weighs only the largest.)"""
    flag = max_logit <= _FLOOR_NATS  # (B, Hq, Lq)
    if not bool(flag.any()):
        return lse, max_logit
    B, Hq = max_logit.shape[:2]
    rows = flag.any(dim=1).any(dim=0).nonzero().reshape(-1)  # (r,) query rows flagged in some batch and head
    g = req.geometry
    bias = req.mask.bias_in(g, rows)  # (B|1, H|1, r, Lk) or None
    if bias is None:  # (not reached: only a float mask's entries get there)
        return lse, max_logit
    allowed = req.mask.allowed_in(g, rows)
    top = bias.to(torch.float32).masked_fill(~allowed, float("-inf")).amax(-1).expand(B, Hq, -1)  # (B, Hq, r)
    f = flag[:, :, rows]
    max_logit = max_logit.clone()
    max_logit[:, :, rows] = torch.where(f, top, max_logit[:, :, rows])
    if req.sinks is None:
        lse = lse.clone()
        lse[:, :, rows] = torch.where(f, top, lse[:, :, rows])
    return lse, max_logit


def _register():
    from . import register

    register(CPUBackend())


_register()
