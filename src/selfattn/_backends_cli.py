"""``selfattn backends``: which backends run on this machine (and why not), and which one ``auto`` takes.

Both answers come from the backends themselves: each backend's ``unsupported(...)`` on a
request built exactly as ``selfattn.attention`` builds it, and the registry's ``choose``. The
tensors are zero-stride views of a single element, so describing a call of any size allocates
nothing and runs no kernel.
"""

from __future__ import annotations

import shlex

import torch

from ._cliutil import UsageError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
_INTS = {"B": "batch", "H": "heads", "Hq": "heads", "Hkv": "kv_heads", "L": "length", "Lq": "q_len", "Lk": "kv_len",
         "D": "head_dim", "Dv": "v_dim", "window": "window"}
_FLAGS = {"causal", "grad", "stats"}
EXAMPLE = "B=1 H=8 L=1024 D=64 dtype=float32 causal grad"


def parse_call(text: str) -> dict:
    """'B=1 H=8 L=1024 D=64 dtype=float32 causal grad' -> the call's sizes and options."""
    call = {"batch": 1, "heads": 8, "kv_heads": None, "length": 1024, "q_len": None, "kv_len": None, "head_dim": 64,
            "v_dim": None, "dtype": "float32", "device": "cpu", "causal": False, "grad": False, "stats": False,
            "window": None, "softcap": None, "dropout": 0.0}
    for item in shlex.split(text.replace(",", " ")):
        key, eq, val = item.partition("=")
        if not eq:
            if item not in _FLAGS:
                raise UsageError(f"--which: unknown flag {item!r}; flags are {sorted(_FLAGS)} (example: '{EXAMPLE}')")
            call[item] = True
        elif key in _INTS:
            try:
                n = int(val)
            except ValueError:
                raise UsageError(f"--which: {key} must be an integer, got {val!r}") from None
            if n < (0 if key == "window" else 1):
                raise UsageError(f"--which: {key} must be {'non-negative' if key == 'window' else 'positive'}, got {n}")
            call[_INTS[key]] = n
        elif key == "dtype":
            if val not in _DTYPES:
                raise UsageError(f"--which: dtype must be one of {sorted(set(_DTYPES))}, got {val!r}")
            call["dtype"] = val
        elif key == "device":
            call["device"] = val
        elif key in ("softcap", "dropout"):
            try:
                call[key] = float(val)
            except ValueError:
                raise UsageError(f"--which: {key} must be a number, got {val!r}") from None
        else:
            raise UsageError(f"--which: unknown key {key!r}; keys are {sorted(_INTS) + ['dtype', 'device', 'softcap', 'dropout']} "
                             f"(example: '{EXAMPLE}')")
    return call


def _tensors(call: dict) -> tuple:
    try:
        device = torch.device(call["device"])
        one = torch.zeros(1, dtype=_DTYPES[call["dtype"]], device=device)  # (never NaN: sdpa refuses NaN queries)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--which: device {call['device']!r} cannot be used here: {' '.join(str(e).split())[:200]}") from None
    lq = call["q_len"] or call["length"]
    lk = call["kv_len"] or call["length"]
    hkv = call["kv_heads"] or call["heads"]
    if call["heads"] % hkv:
        raise UsageError(f"--which: H ({call['heads']}) must be a multiple of Hkv ({hkv})")
    d, dv = call["head_dim"], call["v_dim"] or call["head_dim"]
    b = call["batch"]
    # zero-stride views: a call of any size, no memory
    return (one.expand(b, call["heads"], lq, d), one.expand(b, hkv, lk, d), one.expand(b, hkv, lk, dv))


def build(call: dict):
    """(q, k, v, Request) for a described call, built the way attention() builds it."""
    q, k, v = _tensors(call)
    opts = dict(causal=call["causal"], window=call["window"], softcap=call["softcap"], dropout_p=call["dropout"],
                return_stats=call["stats"])
    try:
        from .request import build_request
    except ImportError:  # before the request builder of issue 11
        build_request = None
    if build_request is not None:
        req = build_request(q, k, v, requires_grad=call["grad"], **opts)
        return q, k, v, req
    from . import functional as F
    from .backends.base import Request

    m = F._resolve_mask(None, call["causal"], call["window"])
    B, Hq, Lq, D = q.shape
    req = Request(mask=m, scale=F._resolve_scale(None, D), softcap=call["softcap"], dropout_p=call["dropout"], generator=None,
                  return_stats=call["stats"], batch=B, q_heads=Hq, kv_heads=k.shape[1], q_len=Lq, kv_len=k.shape[2],
                  head_dim=D, v_dim=v.shape[3], dtype=q.dtype, device=q.device, requires_grad=call["grad"])
    return q, k, v, req


def _registry():
    from . import backends

    return [(n, backends.get(n)) for n in backends.names() if n != "auto"]


def describe(call: dict) -> str:
    parts = [f"B={call['batch']}", f"H={call['heads']}"]
    if call["kv_heads"]:
        parts.append(f"Hkv={call['kv_heads']}")
    if call["q_len"] or call["kv_len"]:
        parts += [f"Lq={call['q_len'] or call['length']}", f"Lk={call['kv_len'] or call['length']}"]
    else:
        parts.append(f"L={call['length']}")
    parts += [f"D={call['head_dim']}"] + ([f"Dv={call['v_dim']}"] if call["v_dim"] else [])
    parts += [f"dtype={call['dtype']}", f"device={call['device']}"]
    parts += [f for f in ("causal", "grad", "stats") if call[f]]
    parts += [f"{k}={call[k]}" for k in ("window", "softcap") if call[k] is not None]
    if call["dropout"]:
        parts.append(f"dropout={call['dropout']}")
    return " ".join(parts)


def which(text: str) -> str:
    """auto's choice for a described call, and why each backend is or is not used."""
    from . import backends

    call = parse_call(text)
    q, k, v, req = build(call)
    lines = [f"call: {describe(call)}"]
    try:
        chosen = backends.choose("auto", q, k, v, req)
    except Exception as e:  # nothing can serve it
        return "\n".join(lines + [f"auto: no backend can serve this call ({' '.join(str(e).split())})"])
    lines.append(f"auto picks: {chosen.name}")
    rows = []
    for name, b in _registry():
        missing = b.unsupported(q, k, v, req)
        if missing:
            rows.append((name, None, f"cannot: {missing}"))
        else:
            rows.append((name, b.rank(req), ""))
    ranked = sorted((r for r in rows if r[1] is not None), key=lambda r: r[1])
    for name, rank, _ in ranked:
        why = "the lowest rank among those that can serve it" if name == chosen.name else "can serve it, ranked after"
        lines.append(f"  {name:<10} rank {rank:<5g} {why}")
    for name, _, why in rows:
        if why:
            lines.append(f"  {name:<10} {why}")
    for name, b in _registry():  # a backend that explains its rank (cpu: this host's calibration or the table)
        if hasattr(b, "rank_reason") and any(r[0] == name and r[1] is not None for r in rows):
            lines.append(f"  {name} rank because: {b.rank_reason(req)}")
    lines.append("(rank: lower is faster for this call, from the measurements in BENCHMARKS.md or, cpu against "
                 "sdpa, this host's calibration; an explicit backend= must serve the call or it raises BackendUnavailable)")
    return "\n".join(lines)


def availability(verbose: bool = False) -> str:
    """Each backend: runs here or not (and why not), its summary; ``verbose`` adds its feature table."""
    from . import backends

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    lines = [f"devices here: {', '.join(devices)}   (selfattn backends --which '{EXAMPLE}' says what auto picks for a call)"]
    for name, b in _registry():
        ok, why = [], []
        for dev in devices:
            call = parse_call(f"B=1 H=2 L=64 D=32 dtype=float32 device={dev}")
            q, k, v, req = build(call)
            missing = b.unsupported(q, k, v, req)
            (why.append(f"{dev}: {missing}") if missing else ok.append(dev))
        status = f"available on {', '.join(ok)}" if ok else "NOT available here"
        lines.append(f"{name}: {status} -- {b.summary}")
        lines.extend(f"    not on {w}" for w in why)
        if verbose:
            lines.extend(f"    {key:<9} {val}" for key, val in getattr(b, "features", {}).items())
    del backends
    return "\n".join(lines)
