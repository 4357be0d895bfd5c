"""Shared helpers for the core test suite: backend list, request capture, inputs, comparisons."""

from __future__ import annotations

import math
import os
import sys
from unittest import mock

import pytest
import torch

# Triton chooses interpreter or compiler when it is first imported. Import it here, in interpreter
# mode on machines without CUDA, before any test module can import it compiled; the variable is then
# put back, so the `triton` backend keeps refusing CPU tensors except inside
# tests/test_triton_interpret.py, which sets it again while its tests run.
if "triton" not in sys.modules and not torch.cuda.is_available():
    _previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    finally:
        if _previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = _previous

import selfattn  # noqa: E402
from selfattn import reference  # noqa: E402
from selfattn.backends import BackendUnavailable  # noqa: E402
from selfattn.stats import AttentionStats  # noqa: E402

from tolerance import assert_close  # noqa: E402

SEED = 1234

# every registered backend; fused backends register on import, so they join this list by themselves
BACKENDS = [n for n in selfattn.backends.names() if n != "auto"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(SEED)
    yield


class _Captured(Exception):
    pass


def request_for(q, k, v, **kw):
    """The Request that ``selfattn.attention(q, k, v, **kw)`` builds, captured before any backend runs."""
    box = {}

    def spy(name, q_, k_, v_, req):
        box["req"] = req
        raise _Captured

    kw = {key: val for key, val in kw.items() if key != "backend"}
    with mock.patch.object(selfattn.backends, "choose", spy):
        try:
            selfattn.attention(q, k, v, backend="reference", **kw)
        except _Captured:
            pass
    return box["req"]


def supports(backend: str, q, k, v, **kw) -> str | None:
    """None if ``backend`` serves this request, else the feature it says it lacks."""
    return selfattn.backends.get(backend).unsupported(q, k, v, request_for(q, k, v, **kw))


def _requested_words(q, k, v, kw) -> set:
    # words a refusal may use to name something this request asks for
    words = {"dtype", str(q.dtype).replace("torch.", ""), "head_dim", "v_dim", "device", q.device.type,
             "backward", "grad", "length", "shape", "layout", "contiguous", "stride"}
    if q.requires_grad:
        words |= {"autograd", "gradient"}
    if kw.get("return_stats"):
        words |= {"return_stats", "stats"}
    if kw.get("softcap") is not None:
        words.add("softcap")
    if kw.get("dropout_p", 0.0) > 0:
        words |= {"dropout", "generator"}
    if kw.get("scale") is not None:
        words.add("scale")
    if kw.get("causal"):
        words.add("causal")
    if kw.get("window") is not None:
        words.add("window")
    m = kw.get("mask")
    if m is not None or kw.get("causal") or kw.get("window") is not None:
        words.add("mask")
    if not all(bool(torch.isfinite(t).all()) for t in (q, k, v)):
        words |= {"nan", "non-finite", "inf"}
    if m is not None:
        words.add("dense")
        words |= set(m.kinds) if isinstance(m, selfattn.masks.Mask) else {"dense_bool", "dense_float"}
    words |= {"grouped", "gqa", "heads"}
    return words


def run_backend(backend: str, q, k, v, **kw):
    """``selfattn.attention(..., backend=backend)``; if the backend refuses, check that it RAISES.

    A refusing backend must raise BackendUnavailable whose message names the backend and the
    missing feature, and the feature must be something the request asked for. Returns None then.
    """
    missing = supports(backend, q, k, v, **kw)
    if missing is None:
        return selfattn.attention(q, k, v, backend=backend, **kw)
    with pytest.raises(BackendUnavailable) as err:
        selfattn.attention(q, k, v, backend=backend, **kw)
    msg = str(err.value)
    assert backend in msg and missing in msg, f"refusal message does not name the backend/feature: {msg}"
    words = _requested_words(q, k, v, kw)
    assert any(w.lower() in missing.lower() for w in words), f"{backend} refused {missing!r}, which this request did not ask for"
    print(f"{backend} refuses: {missing}")
    return None


def low_dtype_reference(q, k, v, **kw):
    """(ref64 out, ref64 stats, ref_low out, ref_low stats) for a request given as attention() kwargs."""
    mask = selfattn.functional._resolve_mask(kw.get("mask"), kw.get("causal", False), kw.get("window"))
    args = dict(mask=mask, scale=kw.get("scale"), softcap=kw.get("softcap"),
                dropout_p=kw.get("dropout_p", 0.0))
    out64, st64 = reference.attention(q, k, v, **args)
    if q.dtype == torch.float64 and args["dropout_p"] == 0.0:
        # two reduction orders; each one's difference from ref64 measures float64 rounding once and
        # can come out luckily small, so every quantity takes the order that differs more
        low, st_low = permuted_reference(q, k, v, **args)
        low2, st_low2 = permuted_reference(q, k, v, order="rolled", **args)
        low = farther(out64, low, low2)
        st_low = AttentionStats(*(farther(getattr(st64, f), getattr(st_low, f), getattr(st_low2, f))
                                  for f in ("lse", "max_logit", "entropy")))
    else:
        low, st_low = reference.attention(q, k, v, upcast=False, **args)
    return out64, st64, low, st_low


def farther(ref, a, b):
    # whichever of a and b differs more from ref (largest difference over the finite entries)
    def gap(x):
        fin = torch.isfinite(ref) & torch.isfinite(x)
        return float((x - ref)[fin].abs().max()) if fin.any() else 0.0
    return a if gap(a) >= gap(b) else b


def permuted_reference(q, k, v, *, mask, order="reversed", **args):
    """The float64 reference's own rounding error, for float64 inputs.

    For float64 inputs "the reference in the input dtype" is the reference itself, so its error
    cannot be measured that way. Instead compute the same attention with every reduction in a
    different order: queries, keys and head dims reversed (``order="reversed"``) or rotated by
    half their length (``"rolled"``); queries too, because the gradients of k and v sum over
    them. Mathematically identical, rounded differently: |that - ref64| is the float64 error
    scale STYLE.md rule 6 asks for. Outputs and stats come back in the original order; a trace
    passed in ``args`` holds (B, H, Lq, Lk) steps with queries and keys in the permuted order.
    """
    lq, lk, d, dv = q.shape[2], k.shape[2], q.shape[3], v.shape[3]
    allowed = torch.ones(1, 1, lq, lk, dtype=torch.bool) if mask is None else mask.allowed(lq, lk)
    bias = None if mask is None else mask.bias(lq, lk)
    dense = torch.zeros(allowed.shape, dtype=torch.float64) if bias is None else bias.to(torch.float64)
    dense = torch.where(allowed, dense, torch.tensor(float("-inf"), dtype=torch.float64))  # (B|1, H|1, Lq, Lk)
    if order == "reversed":
        pq, pk, pd, pv = (torch.arange(n - 1, -1, -1) for n in (lq, lk, d, dv))
    else:
        pq, pk, pd, pv = (torch.roll(torch.arange(n), n // 2) for n in (lq, lk, d, dv))
    out, st = reference.attention(
        q[:, :, pq][..., pd], k[:, :, pk][..., pd], v[:, :, pk][..., pv],
        mask=selfattn.masks.dense(dense[..., pq, :][..., pk]), **args,
    )
    back = torch.argsort(pq)
    st = AttentionStats(st.lse[..., back], st.max_logit[..., back], st.entropy[..., back])
    return out[:, :, back][..., torch.argsort(pv)], st


def compare_with_reference(name, got, q, k, v, *, stats=None, refs=None, **kw):
    """assert_close of an output (and stats) against the float64 reference and its low-precision twin.

    ``refs``: a low_dtype_reference(q, k, v, **kw) result to reuse.
    """
    out64, st64, low, st_low = refs if refs is not None else low_dtype_reference(q, k, v, **kw)
    assert got.dtype == q.dtype, f"{name}: output dtype {got.dtype} != input dtype {q.dtype}"
    assert_close(f"{name} out", got, out64, low)
    if stats is not None:
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        for field in ("lse", "max_logit", "entropy"):
            s = getattr(stats, field)
            assert s.dtype == acc, f"{name} {field}: dtype {s.dtype}, expected {acc}"
            assert_close(f"{name} {field}", s, getattr(st64, field), getattr(st_low, field))
    return out64, st64


def qkv(b=1, hq=2, hkv=None, lq=8, lk=None, d=8, dv=None, *, dtype=torch.float32, magnitude=1.0, requires_grad=False):
    hkv = hq if hkv is None else hkv
    lk = lq if lk is None else lk
    dv = d if dv is None else dv
    q = torch.randn(b, hq, lq, d, dtype=torch.float64) * magnitude
    k = torch.randn(b, hkv, lk, d, dtype=torch.float64) * magnitude
    v = torch.randn(b, hkv, lk, dv, dtype=torch.float64)
    out = [t.to(dtype) for t in (q, k, v)]
    if requires_grad:
        out = [t.requires_grad_() for t in out]
    return out


def large_score_magnitude(d: int, target: float = 1e4) -> float:
    # q.k ~ magnitude^2 * sqrt(d): pick magnitude so raw scores reach about +-target
    return math.sqrt(target / math.sqrt(d))


def fully_masked_rows(mask_allowed: torch.Tensor) -> torch.Tensor:
    """(B|1, H|1, Lq) True where a row has no allowed key."""
    return ~mask_allowed.any(dim=-1)


def exact_fully_masked(name, got, stats, st64):
    """Rows the reference finds fully masked (lse = -inf): output exactly 0, stats exactly (-inf, -inf, 0)."""
    dead = st64.lse == float("-inf")  # (B, Hq, Lq)
    if not dead.any():
        return
    rows = got.detach()[dead]
    assert torch.equal(rows, torch.zeros_like(rows)), f"{name}: fully-masked rows are not exactly 0 (max {rows.abs().max()})"
    if stats is not None:
        assert bool((stats.lse[dead] == float("-inf")).all()), f"{name}: lse of fully-masked rows is not -inf"
        assert bool((stats.max_logit[dead] == float("-inf")).all()), f"{name}: max_logit of fully-masked rows is not -inf"
        assert bool((stats.entropy[dead] == 0).all()), f"{name}: entropy of fully-masked rows is not 0"


def check_backend(name, backend, q, k, v, **kw):
    """Run ``backend`` on the request (and with return_stats=True) and hold it to the reference.

    Refusals are checked to raise (see run_backend). Returns the number of requests served.
    """
    served = 0
    refs = low_dtype_reference(q, k, v, **kw)
    out = run_backend(backend, q, k, v, **kw)
    if out is not None:
        _, st64 = compare_with_reference(f"{name}[{backend}]", out, q, k, v, refs=refs, **kw)
        exact_fully_masked(f"{name}[{backend}]", out, None, st64)
        served += 1
    res = run_backend(backend, q, k, v, return_stats=True, **kw)
    if res is not None:
        out, stats = res
        _, st64 = compare_with_reference(f"{name}[{backend}] +stats", out, q, k, v, stats=stats, refs=refs, **kw)
        exact_fully_masked(f"{name}[{backend}] +stats", out, stats, st64)
        served += 1
    return served
