"""The nccl path of ring attention (issue 15) on the GPUs of one machine; part of benchmarks/gpu_check.sh.

    torchrun --nproc_per_node=N benchmarks/ring_nccl_check.py      # N = the GPU count (1 is allowed)

Each rank takes GPU ``rank``, builds the same float32 inputs, keeps its shard and runs
``selfattn.distributed.ring_attention`` (causal and a window with GQA, both layouts) forward and
backward over nccl; rank 0 compares the gathered output, statistics and gradients with a float64
reference of the whole sequence on its GPU, with the STYLE tolerance rule (the float32 math path's
own error against that reference, times 2, plus 1e-6). With one GPU the ring has one rank (no
transfers: it checks the nccl group set-up and the single-rank path only). Prints one line per
case and exits non-zero on any failure.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import selfattn  # noqa: E402
from selfattn.distributed import ring_attention, shard, unshard  # noqa: E402

CASES = [  # (name, B, Hq, Hkv, L, D, kwargs)
    ("causal", 1, 4, 4, 2048, 64, {"causal": True}),
    ("window 128, GQA 4:1", 2, 8, 2, 1024, 64, {"causal": True, "window": 128}),
]


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def main() -> int:
    gpu = torch.cuda.is_available()  # without a GPU: gloo on the CPU (a dry run of this script)
    dist.init_process_group("nccl" if gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", rank % torch.cuda.device_count()) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(dev)
    bad = 0
    for layout in ("contiguous", "balanced"):
        for name, b, hq, hkv, n, d, kw in CASES:
            g = torch.Generator(device="cpu").manual_seed(0)
            q, k, v, go = (torch.randn(b, h, n, d, generator=g).to(dev) for h in (hq, hkv, hkv, hq))
            parts = [shard(x, 2, layout).detach().requires_grad_(x is not go) for x in (q, k, v, go)]
            out, st = ring_attention(*parts[:3], return_stats=True, layout=layout, **kw)
            out.backward(parts[3])
            got = [unshard(t, 2, layout) for t in (out, st.lse, parts[0].grad, parts[1].grad, parts[2].grad)]
            # float64 and float32 references of the whole sequence, each with its gradients
            refs = []
            for dt in (torch.float64, torch.float32):
                x = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
                o, s = selfattn.attention(*x, backend="math", return_stats=True, **kw)
                o.backward(go.to(dt))
                refs.append([o, s.lse] + [t.grad for t in x])
            if rank == 0:
                names = ("out", "lse", "dq", "dk", "dv")
                fails = []
                for nm, mine, r64, r32 in zip(names, got, *refs):
                    finite = torch.isfinite(r64)
                    e, allowed = _err(mine[finite], r64[finite]), 2 * _err(r32[finite], r64[finite]) + 1e-6
                    if not e <= allowed:
                        fails.append(f"{nm} {e:.2e} > {allowed:.2e}")
                bad += bool(fails)
                print(f"ring {dist.get_backend()} world={world} {layout:10s} {name:20s} " + ("ok" if not fails else "FAIL " + "; ".join(fails)),
                      flush=True)
    dist.destroy_process_group()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
