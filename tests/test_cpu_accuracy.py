"""Issue 14's accuracy clause for the `cpu` backend's float32 kernels at head dims past 128.

Two rules, both from the reference's own error: STYLE.md rule 6 through tests/_oracle.py (the float32
twin the farthest of four orders of the reference) and FlashAttention's as tests/test_semantics_review.py
writes it (its own row-by-row oracle, the float32 twin the farthest of three orders, a floor of 2 ulp).

One chain of float32 FMAs over a head dim of 193-256 rounds at partial sums that grow as it goes; torch's
float32 matmul (MKL on the hosts measured) splits such a sum in two, and the reference's float32 twins are
torch matmuls. The kernels' Q K^T scores were ~1.4x as far from float64 (rms) as the twin's, and requests
whose rows see a few keys (ALiBi, a float bias, logits x2) missed the rules on the output by up to 1.29x
where `math` passed them with room (<= 0.61x). The micro-kernels now sum a reduction of more than
cpu_flash.K_SEGMENT steps as two halves (cpu_flash._fma_k_loop); the requests below were found missing
one rule or both on the old kernels (noted per case) and pass now.

Also here: +inf logits (lse and max_logit +inf, as the reference), the launcher's sinks rest (backends/cpu.py),
the statistics of rows at a float mask's finfo.min, and the store factor of a score with a float bias or ALiBi
in tiles of >= 4 rows (once strict xfails, each fixed).
"""

from __future__ import annotations

import random

import pytest
import torch

import selfattn

from _oracle import compare, reference_pair
from test_semantics_review import close, default_pos, oracle, rule_causal

NEG = float("-inf")


def _request(seed):
    """A float32 request at a head dim of 129-256 whose rows see few keys: ALiBi (causal or not) or a float
    bias, q and k x1 or x2. Returns q, k, v, the library's keyword arguments and test_semantics_review's
    oracle arguments for the same request."""
    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    hkv, group = rnd.choice([1, 2]), rnd.choice([1, 2])
    hq = hkv * group
    lq, lk = rnd.randint(4, 160), rnd.randint(4, 260)
    d = rnd.randint(129, 256)
    dv = d if rnd.random() < 0.7 else rnd.randint(4, 256)
    kind = rnd.choice(["alibi", "alibi_causal", "bias", "bias_causal"])
    mag = rnd.choice([1.0, 2.0, 2.0])
    q, k = ((torch.randn(1, h, n, d, generator=g, dtype=torch.float64) * mag).float() for h, n in ((hq, lq), (hkv, lk)))
    v = torch.randn(1, hkv, lk, dv, generator=g, dtype=torch.float64).float()
    kw = {}
    qpos, kvpos = default_pos(1, lq, lk)
    okw = dict(allowed=torch.ones(1, hq, lq, lk, dtype=torch.bool), qpos=qpos, kvpos=kvpos)
    if kind.endswith("causal"):
        kw["causal"] = True
        okw["allowed"] = okw["allowed"] & rule_causal(qpos, kvpos)
    if kind.startswith("alibi"):
        slopes = torch.rand(hq, generator=g) * 0.9 + 0.05
        kw["alibi_slopes"] = slopes
        okw["slopes"] = slopes[None].double()
    else:
        bias = torch.randn(1, 1, lq, lk, generator=g, dtype=torch.float64) * rnd.choice([1.0, 4.0])
        bias = bias.masked_fill(torch.rand(bias.shape, generator=g) < 0.1, NEG).float()
        kw["mask"] = bias
        okw["bias"] = bias.expand(1, hq, lq, lk).double()
    label = f"seed {seed} H{hq}/{hkv} L{lq}x{lk} D{d} Dv{dv} {kind} x{mag:g}"
    return q, k, v, kw, okw, label


def _fa_twin(q, k, v, okw):
    """test_semantics_review's float64 oracle and its float32 twin (the farthest of its three orders)."""
    ref = oracle(q.double(), k.double(), v.double(), **okw)[:4]
    flipped = dict(okw, allowed=okw["allowed"].flip(-1), kvpos=okw["kvpos"].flip(-1))
    if okw.get("bias") is not None:
        flipped["bias"] = okw["bias"].flip(-1)
    kf, vf = k.double().flip(2), v.double().flip(2)
    runs = [oracle(q.double(), k.double(), v.double(), dtype=torch.float32, **okw)[:4],
            oracle(q.double(), kf, vf, dtype=torch.float32, **flipped)[:4],
            oracle(q.double(), kf, vf, dtype=torch.float32, prescale=True, **flipped)[:4]]

    def farther(x, y, r):
        x, y = x.double(), y.double()
        return torch.where((x - r).abs() >= (y - r).abs(), x, y)

    twin = [farther(farther(a, b, r), c, r) for a, b, c, r in zip(*runs, ref)]
    return ref, twin


def check_request(seed, backend="cpu"):
    q, k, v, kw, okw, label = _request(seed)
    out, st = selfattn.attention(q, k, v, backend=backend, return_stats=True, **kw)
    compare(f"{backend} {label} (STYLE)", reference_pair(q, k, v, **kw), out, stats=st, dtype=torch.float32)
    ref, twin = _fa_twin(q, k, v, okw)
    for name, got, r, t in zip(("out", "lse", "max_logit", "entropy"), (out, st.lse, st.max_logit, st.entropy), ref, twin):
        close(f"{backend} {name} {label} (FlashAttention's rule)", got, r, t, torch.float32)


# seeds of _request the old kernels (one FMA chain over the head dim) missed: 15 of 400 drawn (rule, quantity, x the tolerance)
MISSED_BEFORE = [
    62,  # D208 ALiBi causal: STYLE out
    84,  # D210 bias causal: STYLE max_logit
    103,  # D226 bias: STYLE out 1.25x
    108,  # D225 ALiBi: STYLE out
    150,  # D206 ALiBi causal GQA: STYLE entropy
    153,  # D235 bias: STYLE entropy 1.21x
    14,  # D203 bias causal: FlashAttention's entropy 1.11x
    331,  # D250 bias: FlashAttention's out
]


@pytest.mark.parametrize("seed", MISSED_BEFORE)
def test_head_dims_past_128_missed_before(seed):
    check_request(seed)


@pytest.mark.parametrize("seed", MISSED_BEFORE[:4])
def test_math_passes_the_same_requests(seed):
    # the target is "as math is": the unfused backend passes both rules on these requests
    check_request(seed, backend="math")


@pytest.mark.slow
def test_head_dims_past_128_sweep():
    for seed in range(400):
        check_request(seed)


@pytest.mark.parametrize("lq", [2, 8, 67])  # decoding (dot products), one 64-row tile, a ragged last block of 3 rows
@pytest.mark.parametrize("how", ["bias", "query", "bias_alibi"])
def test_plus_inf_logit(how, lq):
    """A +inf logit (a float mask's +inf, an infinite query element) makes its row's lse and max_logit +inf and
    its output and entropy NaN, as the reference's exp(inf - inf) does; the other rows stay as they were. The
    decoding kernel took such a row for a fully-masked one (output 0, lse and max_logit -inf: its 'max not
    raised' marker was +inf), the tile kernels gave lse and max_logit NaN."""
    g = torch.Generator().manual_seed(lq)
    B, H, Lk, D = 1, 2, 70, 16
    q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (lq, Lk, Lk))
    rows = [0, lq - 1] if lq > 2 else [1]
    kw = {}
    if how.startswith("bias"):
        m = torch.randn(1, 1, lq, Lk, generator=g)
        for r in rows:
            m[..., r, 5 + r % 50] = float("inf")
        m[..., rows[0], 7] = float("-inf")
        kw["mask"] = m
        if how == "bias_alibi":
            kw["alibi_slopes"] = torch.tensor([0.25, 0.5])
    else:
        for r in rows:
            q[0, 1, r, 3] = float("inf")  # q.k = +-inf by the sign of k's element 3
    out, st = selfattn.attention(q, k, v, backend="cpu", return_stats=True, **kw)
    compare(f"cpu +inf {how} Lq {lq}", reference_pair(q, k, v, **kw), out, stats=st, dtype=torch.float32)
    assert bool(torch.isinf(st.lse).any()) and bool(torch.isnan(out).any())  # (the request has such rows)


def test_sinks_fully_masked_rows_lse_is_the_sink():
    """With sinks, a row with no allowed key has lse = its sink exactly (the reference: log exp(sink)), and
    every row's lse keeps the rest of the max that the float32 halves round away. The launcher took the rest
    against the unrounded max: 10 of 64 such rows came out 1 ulp off (float32 reference and math: exact)."""
    g = torch.Generator().manual_seed(0)
    B, H, Lq, Lk, D = 1, 64, 8, 5, 8
    q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (Lq, Lk, Lk))
    sinks = torch.randn(H, generator=g) * 3
    m = torch.zeros(1, 1, Lq, Lk)
    m[..., 1, :] = NEG  # row 1 sees no key
    out, st = selfattn.attention(q, k, v, mask=m, sinks=sinks, return_stats=True, backend="cpu")
    assert torch.equal(st.lse[0, :, 1], sinks), f"lse of fully-masked rows {st.lse[0, :, 1]} != sinks {sinks}"
    compare("cpu sinks", reference_pair(q, k, v, mask=m, sinks=sinks), out, stats=st, dtype=torch.float32)


@pytest.mark.parametrize("lq", [2, 70])  # decoding (cpu_flash's dot products); a 64-row tile and a ragged block
@pytest.mark.parametrize("sinks", [False, True])
def test_statistics_of_rows_at_the_float_minimum(lq, sinks):
    """Rows whose every allowed logit is a float mask's entry below -FLT_MAX ln 2 (finfo.min: transformers' padded
    query rows) have lse = max_logit = that entry, about -3.4e38, as the reference (float32: q.k is far below its
    ulp of 2**104; with sinks the lse is the sink's). The kernels clamp such entries to -FLT_MAX in their base-2
    score units, and these statistics came out -FLT_MAX ln 2 = -2.36e38 (backends.cpu._floor_rows)."""
    g = torch.Generator().manual_seed(lq)
    B, Hq, Hkv, Lk, D = 2, 4, 2, 90, 32
    q = torch.randn(B, Hq, lq, D, generator=g)
    k, v = (torch.randn(B, Hkv, Lk, D, generator=g) for _ in range(2))
    low = torch.finfo(torch.float32).min
    m = torch.randn(B, 1, lq, Lk, generator=g)
    m[0, :, 1] = low  # a whole row, batch 0
    m[1, :, lq - 1] = -3.0e38  # below -FLT_MAX ln 2 too (clamped alike), batch 1
    m[1, :, 0, : Lk // 2] = low  # half a row: its statistics are the other keys'
    kw = dict(mask=m, causal=True)
    if sinks:
        kw["sinks"] = torch.randn(Hq, generator=g)
    out, st = selfattn.attention(q, k, v, backend="cpu", return_stats=True, **kw)
    compare(f"cpu finfo.min rows Lq {lq} sinks {sinks}", reference_pair(q, k, v, **kw), out, stats=st, dtype=torch.float32)
    assert bool((st.max_logit[0, :, 1] == low).all()) and bool((st.max_logit[1, :, lq - 1] == -3.0e38).all())


def test_float_bias_tile_at_a_power_of_two_scale():
    """test_semantics_review's drawn request (D 4: the float32 reference scales q.k by 1/2, exactly; x3 logits, a
    float mask, sinks, 97 x 130): the kernel's output was 1.20x FlashAttention's rule (STYLE rule 6: within; math
    passes). Its tiles of >= 4 rows with a float bias or ALiBi scaled q.k at the store by one rounded factor,
    fl32(scale log2 e), shared by every score of the tile (a numpy emulation: 1.16x; the factor applied in float64:
    0.38x, the same as the whole score in float64). The Q K^T STORE epilogues of cpu_fwd and cpu_bwd now apply the
    float64 factor as c_hi + c_lo (cpu_fwd._split_factor, mode STORE_SPLIT; the backward's scores stay the
    forward's bit for bit). 1 of ~1400 drawn 'tiles' requests."""
    import test_semantics_review as sr

    case = sr.Case(200267, torch.float32, {"dense_bool", "dense_float", "function", "large", "sinks", "strided", "tiles"})
    sr.check_backend(case, "cpu")
    sr.check_backend(case, "math")
