"""What every test compares against: the float64 reference, its low-precision twin, and what each
backend's own feature table (``Backend.capabilities``) says it serves.

Two halves, one module, so that no test file writes either again:

* **The oracle.** :func:`reference_pair` runs ``selfattn.reference`` in float64 and again as its
  low-precision twin (the input dtype without upcasting, in four orders of evaluation, the
  farthest from float64 kept per quantity; for float64 inputs three reordered float64 runs), with statistics,
  gradients for an upstream gradient ``do`` and the masked logits if asked. :func:`compare`
  holds a backend's results to the pair with STYLE.md rule 6's tolerance (tests/tolerance.py:
  factor 2 forward and statistics, 3 gradients). :func:`probs_reference` derives the twin of
  ``attention_probs`` from the same runs.
* **The feature table.** :func:`expectation` reads a backend's ``capabilities`` and the
  environment (installed modules, the device, Triton's interpreter) and says whether the backend
  must serve a request, must refuse it (and with which words its refusal must name the missing
  feature), or may refuse it for its data (NaN/Inf inputs where the table says so). It never asks
  the backend's own ``unsupported()``: that is the code under test.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass, field

import torch

from selfattn import masks, reference
from selfattn.backends import get as get_backend
from selfattn.request import resolve_mask, resolve_scale
from selfattn.stats import AttentionStats

from tolerance import assert_close

STAT_FIELDS = ("lse", "max_logit", "entropy")


# -- the feature table ------------------------------------------------------------------------------


@dataclass
class Expectation:
    """What a backend's feature table predicts for one request."""

    missing: list = field(default_factory=list)  # (feature, words): the table rules the request out
    maybe: list = field(default_factory=list)  # (feature, words): the data may make it refuse

    @property
    def serves(self) -> bool | None:
        """True: must serve; False: must refuse; None: either (only data-dependent reasons)."""
        if self.missing:
            return False
        return None if self.maybe else True

    def names(self, message: str, reasons=None) -> bool:
        """True if the refusal ``message`` names one of the expected missing features (in its
        "does not support ..." part, not in the list of backend names that follows)."""
        msg = message.lower().split("does not support", 1)[-1].split("use backend=", 1)[0]
        return any(any(w.lower() in msg for w in words) for _, words in (reasons or self.missing))


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "on", "yes")


def interpreter_ready() -> bool:
    """TRITON_INTERPRET is set now, and was when triton was first imported (tests/conftest.py imports
    it under the interpreter on machines without CUDA; with CUDA it is imported compiled)."""
    return _truthy("TRITON_INTERPRET") and not torch.cuda.is_available()


def _dense_parts(mask):
    return [p for p in masks.parts(mask) if isinstance(p, masks.Dense)]


def expectation(backend: str, q, k, v, **kw) -> Expectation:
    """What ``backend``'s capabilities say about ``selfattn.attention(q, k, v, **kw)``."""
    caps = get_backend(backend).capabilities
    e = Expectation()
    for module in caps.requires:
        if importlib.util.find_spec(module) is None:
            e.missing.append((f"module {module}", (module,)))
    dev = q.device.type
    if dev not in caps.devices and not (dev in caps.interpreted_devices and interpreter_ready()):
        e.missing.append((f"device {dev}", ("device",)))
    if q.dtype not in caps.dtypes:
        e.missing.append((f"dtype {q.dtype}", ("dtype", str(q.dtype).replace("torch.", ""))))
    if caps.max_head_dim is not None and max(q.shape[-1], v.shape[-1]) > caps.max_head_dim:
        e.missing.append(("head dim", ("head_dim", "v_dim")))
    if kw.get("dropout_p", 0.0) > 0:
        if not caps.dropout:
            e.missing.append(("dropout", ("dropout",)))
        elif kw.get("generator") is not None and not caps.generator:
            e.missing.append(("generator", ("generator",)))
    if kw.get("return_stats") and not caps.stats:
        e.missing.append(("return_stats", ("return_stats",)))
    if kw.get("softcap") is not None and not caps.softcap:
        e.missing.append(("softcap", ("softcap",)))
    if (kw.get("q_positions") is not None or kw.get("kv_positions") is not None) and not caps.positions:
        e.missing.append(("positions", ("position",)))
    if kw.get("alibi_slopes") is not None and not caps.alibi:
        e.missing.append(("alibi", ("alibi",)))
    if kw.get("sinks") is not None and not caps.sinks:
        e.missing.append(("sinks", ("sink",)))
    mask = resolve_mask(kw.get("mask"), kw.get("causal", False), kw.get("window"))
    kinds = frozenset() if mask is None else mask.kinds
    if kinds - caps.mask_kinds:
        e.missing.append(("mask kinds", ("mask", *sorted(kinds - caps.mask_kinds))))
    scale = kw.get("scale")
    if scale is not None and scale <= 0 and not caps.masked_nonpositive_scale and (mask is not None or kw.get("alibi_slopes") is not None):
        e.missing.append(("scale <= 0 with a mask", ("scale",)))
    sinks = kw.get("sinks")
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *([sinks] if sinks is not None else [])))
    if grad and (not caps.backward or (dev, q.dtype) in caps.no_backward):
        e.missing.append(("backward", ("backward", "grad")))
    if not caps.float_mask_grad and torch.is_grad_enabled() and any(p.tensor.requires_grad for p in _dense_parts(mask)):
        # a float mask that requires grad: refused when a gradient is asked for; without one the
        # table does not say (a backend may still refuse a mask it could not differentiate)
        (e.missing if grad else e.maybe).append(("float mask gradient", ("float mask",)))
    if not caps.nonfinite_inputs and not all(bool(torch.isfinite(t).all()) for t in (q, k)):
        e.maybe.append(("non-finite inputs", ("non-finite", "nan")))
    return e


# -- the oracle ---------------------------------------------------------------------------------------


@dataclass
class RefRun:
    """One run of the reference: output, statistics, gradients (if asked) and masked logits (if asked)."""

    out: torch.Tensor  # (B, Hq, Lq, Dv)
    stats: AttentionStats  # each (B, Hq, Lq)
    grads: tuple | None = None  # (dq, dk, dv[, dmask][, dsinks]) for the upstream gradient
    masked: torch.Tensor | None = None  # (B, Hq, Lq, Lk) logits after masking, -inf where ruled out


_PASSED = ("q_positions", "kv_positions", "alibi_slopes", "sinks")  # taken by reference.attention as they are


def _reference_args(kw):
    """reference.attention keyword arguments for selfattn.attention keyword arguments (bar the mask)."""
    args = dict(scale=kw.get("scale"), softcap=kw.get("softcap"), dropout_p=kw.get("dropout_p", 0.0))
    args.update({name: kw[name] for name in _PASSED if kw.get(name) is not None})
    return args


def _fresh(generator):
    # a copy of the caller's generator in its current state: every run draws the same dropout
    # pattern, and the caller's generator is left for the backend
    if generator is None:
        return None
    return torch.Generator(device=generator.device).set_state(generator.get_state())


def reference_run(q, k, v, kw, *, dtype, upcast=True, order=None, do=None, masked=False) -> RefRun:
    """The reference on (q, k, v) taken to ``dtype``; ``upcast=False`` computes in that dtype.

    ``order`` "reversed" or "rolled" reorders every reduction (see :func:`_permuted`); "split_scale"
    multiplies q and k by sqrt(scale) each instead of the logits by the scale. ``do``: an
    upstream gradient, for dq, dk, dv, then d mask when ``kw["mask"]`` is a float tensor that requires
    grad and d sinks when ``kw["sinks"]`` requires grad. ``masked``: also return the masked logits.
    """
    leafs = [t.detach().to(dtype).requires_grad_(do is not None) for t in (q, k, v)]
    m, sinks = kw.get("mask"), kw.get("sinks")
    extra = []  # further leaves to differentiate: a float mask, the sinks
    if do is not None and isinstance(m, torch.Tensor) and m.requires_grad:
        m = m.detach().to(dtype).requires_grad_()
        extra.append(m)
    mask = resolve_mask(m, kw.get("causal", False), kw.get("window"))
    args = dict(mask=mask, generator=_fresh(kw.get("generator")), upcast=upcast, **_reference_args(kw))
    if do is not None and sinks is not None and sinks.requires_grad:
        args["sinks"] = sinks.detach().to(torch.float64 if upcast else dtype).requires_grad_()
        extra.append(args["sinks"])
    trace = reference.Trace() if masked else None
    if order == "split_scale":
        # the scale split over both operands, (sqrt(s) q)(sqrt(s) k)^T, as torch's SDPA math formulation
        # computes it: the same logits, rounded differently (the sign goes with q for s < 0)
        s = resolve_scale(args["scale"], q.shape[-1])
        r = math.sqrt(abs(s))
        out, st = reference.attention(leafs[0] * (r if s >= 0 else -r), leafs[1] * r, leafs[2], trace=trace,
                                      **dict(args, scale=1.0))
        logits = trace["masked"] if masked else None
    elif order is None:
        out, st = reference.attention(*leafs, trace=trace, **args)
        logits = trace["masked"] if masked else None
    else:
        out, st, logits = _permuted(*leafs, order=order, trace=trace, **args)
    grads = None
    if do is not None:
        grads = torch.autograd.grad(out, leafs + extra, do.to(out.dtype))
    return RefRun(out.detach(), AttentionStats(*(getattr(st, f).detach() for f in STAT_FIELDS)), grads, logits)


def _permuted(q, k, v, *, mask, order, trace, **args):
    """The reference with queries, keys and head dims reversed (``order="reversed"``) or rotated by
    half their length (``"rolled"``): mathematically the same attention, rounded differently. For
    float64 inputs |that - ref64| is the float64 error scale STYLE.md rule 6 asks for (queries are
    permuted too, since dK and dV sum over them). Everything comes back in the original order.
    The mask goes in as the dense equivalent, positions (which ALiBi reads) permuted with their rows."""
    b, hq, lq, d = q.shape
    lk, dv = k.shape[2], v.shape[3]
    where = {}
    if any(args.get(n) is not None for n in _PASSED[:3]) or (mask is not None and "function" in mask.kinds):
        qp, kp = args.get("q_positions"), args.get("kv_positions")
        where = dict(batch=b, heads=hq,
                     q_positions=(torch.arange(lq) + lk - lq) if qp is None else qp,
                     kv_positions=torch.arange(lk) if kp is None else kp)
    allowed = torch.ones(1, 1, lq, lk, dtype=torch.bool) if mask is None else mask.allowed(lq, lk, **where)
    bias = None if mask is None else mask.bias(lq, lk, **where)
    dense = torch.zeros(allowed.shape, dtype=q.dtype) if bias is None else bias.to(q.dtype)
    dense = torch.where(allowed, dense, torch.tensor(float("-inf"), dtype=q.dtype))  # (B|1, H|1, Lq, Lk)
    if order == "reversed":
        pq, pk, pd, pv = (torch.arange(n - 1, -1, -1) for n in (lq, lk, d, dv))
    else:
        pq, pk, pd, pv = (torch.roll(torch.arange(n), n // 2) for n in (lq, lk, d, dv))
    if where:
        args = dict(args, q_positions=where["q_positions"][..., pq], kv_positions=where["kv_positions"][..., pk])
    out, st = reference.attention(q[:, :, pq][..., pd], k[:, :, pk][..., pd], v[:, :, pk][..., pv],
                                  mask=masks.dense(dense[..., pq, :][..., pk]), trace=trace, **args)
    bq, bk = torch.argsort(pq), torch.argsort(pk)
    st = AttentionStats(*(getattr(st, f)[..., bq] for f in STAT_FIELDS))
    logits = trace["masked"][..., bq, :][..., bk] if trace is not None else None
    return out[:, :, bq][..., torch.argsort(pv)], st, logits


def farther(ref, a, b):
    """Whichever of a and b differs more from ref (largest difference over the finite entries)."""
    def gap(x):
        fin = torch.isfinite(ref) & torch.isfinite(x)
        return float((x - ref)[fin].abs().max()) if fin.any() else 0.0
    return a if gap(a) >= gap(b) else b


def _farther_run(ref: RefRun, a: RefRun, b: RefRun, *more: RefRun) -> RefRun:
    if more:
        return _farther_run(ref, _farther_run(ref, a, b), *more)
    stats = AttentionStats(*(farther(getattr(ref.stats, f), getattr(a.stats, f), getattr(b.stats, f)) for f in STAT_FIELDS))
    grads = None if ref.grads is None else tuple(farther(r, x, y) for r, x, y in zip(ref.grads, a.grads, b.grads))
    masked = None if ref.masked is None else farther(ref.masked, a.masked, b.masked)
    return RefRun(farther(ref.out, a.out, b.out), stats, grads, masked)


def reference_pair(q, k, v, *, do=None, masked=False, **kw) -> tuple[RefRun, RefRun]:
    """(float64 reference, low-precision twin) for ``selfattn.attention(q, k, v, **kw)``.

    The twin is the reference computed in the input dtype (``upcast=False``), evaluated in its own
    order and in three others (reductions reversed, rolled, and the scale split over q and k as
    torch's SDPA applies it), each quantity taking the order that differs most from float64: a single
    order can round luckily well, and then a backend of the same precision fails rule 6 by chance (a
    float32 sweep of 1500 random requests: math 2 misses, torch's SDPA 15, against the plain order
    alone; none against the farthest of the four). For float64 inputs, where the input dtype's own
    order would be the reference itself, the three other orders. With dropout the twin is the plain
    order alone (reordering would redraw the dropout).
    """
    run = dict(do=do, masked=masked)
    ref64 = reference_run(q, k, v, kw, dtype=torch.float64, **run)
    low = dict(dtype=q.dtype, upcast=q.dtype == torch.float64, **run)
    plain = ref64 if q.dtype == torch.float64 else reference_run(q, k, v, kw, **low)
    if kw.get("dropout_p", 0.0) > 0:
        return ref64, plain
    others = [reference_run(q, k, v, kw, order=order, **low) for order in ("reversed", "rolled", "split_scale")]
    if q.dtype == torch.float64:
        return ref64, _farther_run(ref64, *others)
    return ref64, _farther_run(ref64, plain, *others)


def compare(name, pair, out=None, *, stats=None, grads=None, dtype=None):
    """Hold a backend's ``out``, ``stats`` and ``grads`` to a :func:`reference_pair` (factor 2, 3 for
    gradients). ``dtype``: the input dtype (checked against out's and each gradient's; stats are
    float64 for float64 inputs, else float32)."""
    ref64, low = pair
    if out is not None:
        if dtype is not None:
            assert out.dtype == dtype, f"{name}: output dtype {out.dtype} != input dtype {dtype}"
        assert_close(f"{name} out", out, ref64.out, low.out)
    if stats is not None:
        acc = None if dtype is None else (torch.float64 if dtype == torch.float64 else torch.float32)
        for f in STAT_FIELDS:
            s = getattr(stats, f)
            assert acc is None or s.dtype == acc, f"{name} {f}: dtype {s.dtype}, expected {acc}"
            assert_close(f"{name} {f}", s, getattr(ref64.stats, f), getattr(low.stats, f))
    if grads is not None:
        assert len(grads) == len(ref64.grads), f"{name}: {len(grads)} gradients, the reference has {len(ref64.grads)}"
        names = ("dq", "dk", "dv", *(f"d{i}" for i in range(3, len(grads))))  # then d mask / d sinks, as given
        for gname, g, r, lo in zip(names, grads, ref64.grads, low.grads):
            assert dtype is None or gname not in ("dq", "dk", "dv") or g.dtype == dtype, f"{name} {gname}: dtype {g.dtype}"
            assert not torch.isnan(g).any() or torch.isnan(r).any(), f"{name} {gname}: NaN"
            assert_close(f"{name} {gname}", g, r, lo, factor=3.0)


def probs_reference(q, k, v, **kw):
    """(float64 weights, their low-precision twin) for probabilities recomputed from a saved lse.

    attention_probs computes p = exp(logit - lse) from logits it recomputes and an lse saved by
    the backend, so its error is p * (logit error + lse error). The twin is p64 plus exactly that,
    with both errors measured on the reference's low-precision runs (STYLE.md rule 6): the input
    dtype as is and reordered (for float64 only the reordered one), the larger counting; and at
    least the rounding no backend avoids (below).
    """
    t64 = reference.Trace()
    mask = resolve_mask(kw.get("mask"), kw.get("causal", False), kw.get("window"))
    scale, softcap = kw.get("scale"), kw.get("softcap")
    extra = {n: kw[n] for n in _PASSED if kw.get(n) is not None}
    _, st64 = reference.attention(q, k, v, mask=mask, scale=scale, softcap=softcap, trace=t64, **extra)
    s64 = t64["masked"]  # (B, H, Lq, Lk)
    fin = torch.isfinite(s64)
    lows = [reference_run(q, k, v, kw, dtype=q.dtype, upcast=False, order="reversed", masked=True)]
    if q.dtype != torch.float64:
        lows.append(reference_run(q, k, v, kw, dtype=q.dtype, upcast=False, masked=True))
    rel = torch.zeros_like(s64)
    for low in lows:
        ds = torch.where(fin, (low.masked.double() - s64).abs(), torch.zeros_like(s64))  # (B, H, Lq, Lk)
        dl = torch.where(torch.isfinite(st64.lse), (low.stats.lse.double() - st64.lse).abs(), torch.zeros_like(st64.lse))  # (B, H, Lq)
        rel = torch.maximum(rel, ds + dl[..., None])  # relative error of p in the input dtype
    # The twin can round luckily well (one allowed key, a head dim of 1...), but no backend can
    # avoid the last steps: the lse stored in the stats dtype (float32, or float64 for float64
    # inputs), logit - lse and the exp, one rounding each at the stats dtype's eps. Take at least that.
    eps = torch.finfo(torch.float64 if q.dtype == torch.float64 else torch.float32).eps
    lse = torch.where(torch.isfinite(st64.lse), st64.lse.abs(), torch.zeros_like(st64.lse))  # (B, H, Lq)
    floor = torch.where(fin, eps * (1.0 + s64.abs() + lse[..., None]), torch.zeros_like(s64))
    if q.dtype == torch.float64:
        # In float64 the twin is the reference with its reductions reordered, which never shows the
        # rounding of steps it shares with the backend: add the classical bound for each logit (a
        # D-term dot product, D * eps * |scale| * sum_d |q_d k_d|, and the bias added), and the row's
        # largest logit bound for the lse.
        d = q.shape[-1]
        kk = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, Hq, Lk, D)
        sc = abs(scale) if scale is not None else d ** -0.5
        bound = d * eps * sc * torch.einsum("bhqd,bhkd->bhqk", q.abs(), kk.abs())  # (B, H, Lq, Lk)
        bound = torch.where(fin, bound + eps * s64.abs(), torch.zeros_like(s64))
        floor = floor + bound + bound.amax(-1, keepdim=True)
    rel = torch.maximum(rel, floor)
    w64 = t64["weights"]  # (B, H, Lq, Lk)
    return w64, w64 + w64 * rel
