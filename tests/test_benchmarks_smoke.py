"""Every benchmark script runs: each one in its smallest mode (--smoke, tiny shapes, one round), as a program of
its own, exits 0 and writes what it should -- JSON that parses with the keys the results tables are made from,
the lines a person reads. Speed is never asserted: the numbers of a smoke run mean nothing.

Why: a kernel signature change once broke ``bench_cpu.py --profile`` and nobody noticed until the next quiet
run. These runs catch that kind of break: a script that no longer imports, calls a function with old arguments,
or reads a key that moved.

Each script runs as ``python benchmarks/SCRIPT ARGS`` would, from the repository root, in a child forked from one
helper process per test process that imported torch, numba, selfattn and transformers once (tests/_cli.py's
ForkServer, which runs the CLI the same way; the imports are most of a smoke run's time). The helper runs no torch
operation before it forks, so the children start no thread pool the helper had. JSON outputs go to pytest's tmp
dirs, never to benchmarks/results/ (a test checks that the smoke runs left that folder as it was).

Not run by default (marked slow): ``bench_cpu.py --compile-time`` (it compiles every kernel from an empty cache:
minutes), ``bench_gpu.py --compile --quick`` (triton builds sm_90 kernels offline: ~30 s), and the memory passes of
``bench_cpu.py`` and ``bench_batches.py`` (each a fresh interpreter, ~7 s; CI runs both scripts with --no-memory).
On machines without CUDA the GPU runs (``bench_gpu.py`` on the GPU, ``ring_nccl_check.py``) are skipped with the
reason; ``bench_gpu.py --dry-run`` runs anywhere.

The whole file runs on one xdist worker (conftest's SAME_WORKER), which starts the helper once; the helper stops
when the file's tests are done.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from _cli import ForkServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
RESULTS = os.path.join(BENCH, "results")
TIMEOUT = 600.0  # seconds for one smoke run: a kernel source edited since the last run recompiles (minutes when loaded)

_SERVER = ForkServer("benchmark", r"""
import numpy, numba, torch, selfattn  # what every script imports first
import selfattn.kernels.cpu_amx  # noqa: F401
# what torch imports lazily, seconds each: sympy and symbolic shapes at the first backward, dynamo with torch.optim's
# first optimizer; matplotlib for the training plots
import torch._dynamo, torch.fx.experimental.symbolic_shapes, torch.optim  # noqa: F401
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
except ImportError:
    pass
try:
    import transformers, selfattn.integrations.transformers  # noqa: F401  (bench_hf, bench_decode)
except ImportError:
    pass
""")


def run_script(script: str, *args, env: dict | None = None, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """``python benchmarks/<script> ARGS`` from the repository root, in a child of the helper (see the module
    docstring); the CompletedProcess has ``seconds`` (wall) and ``cpu_seconds`` added."""
    r = _SERVER.run(path=os.path.join(BENCH, script), args=args, env=env, cwd=ROOT, timeout=timeout)
    print(f"{' '.join(r.args)}: exit {r.returncode}, {r.seconds:.1f} s wall, {r.cpu_seconds:.1f} s CPU")
    return r


def _tail(r: subprocess.CompletedProcess) -> str:
    return f"exit {r.returncode}\n--- stdout ---\n{r.stdout[-3000:]}\n--- stderr ---\n{r.stderr[-3000:]}"


def _ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, _tail(r)


def _json(path) -> dict:
    assert os.path.exists(path), f"{path} was not written"
    with open(path) as f:
        return json.load(f)


def _has(d: dict, *keys) -> None:
    missing = [k for k in keys if k not in d]
    assert not missing, f"missing keys {missing} in {sorted(d)}"


def _bf16_engine() -> str:
    """The engine the cpu backend uses here, as the benchmarks name it (SELFATTN_CPU_BF16_ENGINE as set)."""
    from selfattn.kernels import cpu_amx

    eng = cpu_amx.engine()
    return "float32 fallback" if eng is None else "amx" if eng is cpu_amx.ENGINE_AMX else "dot"


@pytest.fixture(scope="module", autouse=True)
def _results_untouched():
    """No smoke run writes into benchmarks/results/."""
    def snapshot():
        return {e.name: (e.stat().st_mtime_ns, e.stat().st_size) for e in os.scandir(RESULTS)} if os.path.isdir(RESULTS) else {}

    before = snapshot()
    yield
    assert snapshot() == before, "a smoke run wrote into benchmarks/results/"


@pytest.fixture(scope="module", autouse=True)
def _helper_stopped():
    """The helper (torch, transformers and matplotlib imported: ~0.5 GB resident) goes when the file's tests are done."""
    yield
    _SERVER.stop()


# -- the kernels' benchmarks ----------------------------------------------------------------------------------


def test_peak():
    r = run_script("peak.py", "--smoke")
    _ok(r)
    assert "CPU: " in r.stdout and "FMA peak" in r.stdout and "torch.mm" in r.stdout, _tail(r)


# The memory passes start a fresh interpreter (torch and selfattn imported again, ~7 s of CPU each): CI runs
# bench_cpu and bench_batches without them, -m slow with them.
MEMORY = [pytest.param(False, id="no-memory"), pytest.param(True, id="memory", marks=pytest.mark.slow)]


@pytest.mark.parametrize("memory", MEMORY)
def test_bench_cpu(tmp_path, memory):
    path = tmp_path / "cpu.json"
    r = run_script("bench_cpu.py", "--smoke", "--paired", "1", "--json", path, *([] if memory else ["--no-memory"]))
    _ok(r)
    res = _json(path)
    _has(res, "meta", "rows", "bf16_targets")
    assert ("peak_memory" in res) == memory, sorted(res)
    _has(res["meta"], "fma_peak_GFLOPs", "fp32_matmul_GFLOPs", "bfloat16_engine")
    assert res["meta"]["bfloat16_engine"].startswith(_bf16_engine() + " -- "), res["meta"]["bfloat16_engine"]
    rows = {row["case"]: row for row in res["rows"]}
    for name in ("dense fwd", "causal fwd+bwd", "decode 1/16384", "window 256 causal fwd+bwd", "dense fwd bfloat16",
                 "causal fwd+bwd bfloat16", "softcap 30 fwd"):
        assert name in rows, sorted(rows)
    for row in res["rows"]:
        assert row["times"].get("cpu", 0) > 0, row
    for name in ("dense fwd bfloat16", "causal fwd+bwd bfloat16"):
        row = rows[name]
        assert row["dtype"] == "bfloat16" and row["engine"].startswith(_bf16_engine() + ":"), row
        assert row["times"].get("cpu-float32", 0) > 0 and row["paired"]["rounds"], row
    assert rows["dense fwd"]["paired"]["rounds"], rows["dense fwd"]
    targets = {t["case"]: t for t in res["bf16_targets"]}
    assert set(targets) == {"dense fwd bfloat16", "causal fwd+bwd bfloat16"}, targets
    assert targets["dense fwd bfloat16"]["target"] == 1.6 and targets["causal fwd+bwd bfloat16"]["target"] == 1.3
    for t in targets.values():
        _has(t, "ratio", "ratio_vs_float32_row", "paired_median_ratio", "met", "engine")
        assert t["ratio"] > 0 and not t["issue_shape_and_threads"], t  # smoke shapes are not the issue's
    if memory:
        assert "error" not in res["peak_memory"], res["peak_memory"]
        assert res["peak_memory"]["peak_extra_bytes"] > 0
    assert "issue 14, bfloat16 against float32" in r.stdout, _tail(r)


def test_bench_cpu_profile(tmp_path):
    path = tmp_path / "profile.json"
    r = run_script("bench_cpu.py", "--profile", "--smoke", "--json", path)
    _ok(r)
    (prof,) = _json(path)["profile"]
    assert prof["full_ms"] > 0 and len(prof["parts_ms"]) == 4, prof
    assert prof["transposed"]["full_ms"] > 0 and len(prof["transposed"]["parts_ms"]) == 4, prof
    assert "forward profile" in r.stdout, _tail(r)


@pytest.mark.slow
def test_bench_cpu_compile_time(tmp_path):
    path = tmp_path / "compile.json"
    r = run_script("bench_cpu.py", "--compile-time", "--json", path, timeout=3600)
    _ok(r)
    ct = _json(path)["compile_time"]
    _has(ct, "first_process", "second_process", "cache_files")
    assert ct["cache_files"] > 0 and ct["second_process"]["float32_fwd_bwd_s"] > 0, ct


def _amx_checks(res: dict, r: subprocess.CompletedProcess, engine: str) -> None:
    _has(res, "cpu", "engine", "engine_requested", "threads", "rows", "targets", "engine_calls", "cpu_features_bfloat16")
    assert res["engine"] == engine, (res["engine"], engine)
    assert f"bfloat16 engine: {engine}" in r.stdout and f"CPU: {res['cpu']}" in r.stdout, _tail(r)
    variants = {(row["case"], row["variant"]) for row in res["rows"]}
    for want in (("dense fwd", "cpu bfloat16 fwd"), ("dense fwd", "cpu float32 fwd"), ("dense fwd", "sdpa bfloat16 fwd"),
                 ("causal fwd+bwd", "cpu bfloat16 fwd+bwd"), ("causal fwd+bwd", "cpu float32 fwd+bwd"),
                 ("causal fwd+bwd", "sdpa float32 fwd+bwd"), ("causal fwd+bwd", "cpu bfloat16 bwd (fwd+bwd - fwd)")):
        assert want in variants, sorted(variants)
    for row in res["rows"]:
        assert row["pass"] == "bwd" or row["ms"] > 0, row  # (the backward alone is a difference of two times: any sign)
    assert {t["case"] for t in res["targets"]} == {"dense fwd", "causal fwd+bwd"}, res["targets"]
    assert all(t["engine"] == engine and t["ratio"] > 0 for t in res["targets"]), res["targets"]
    if engine != "float32 fallback":  # the bfloat16 calls reached the engine named, forward and backward
        assert res["engine_calls"][engine] > 0 and res["engine_calls"][f"{engine}_backward"] > 0, res["engine_calls"]
        other = "dot" if engine == "amx" else "amx"
        assert res["engine_calls"][other] == 0 and res["engine_calls"][f"{other}_backward"] == 0, res["engine_calls"]
    else:
        assert res["engine_calls"]["calls"] == 0, res["engine_calls"]


def test_bench_amx(tmp_path):
    path = tmp_path / "amx.json"
    r = run_script("bench_amx.py", "--smoke", "--json", path)
    _ok(r)
    _amx_checks(_json(path), r, _bf16_engine())


@pytest.mark.parametrize("engine", ["amx", "dot"])
def test_bench_amx_engine(tmp_path, engine):
    """--engine amx|dot measures that engine where the CPU has it, and refuses (exit 2, one line) where not."""
    from selfattn.kernels import cpu_bf16

    env = {k: v for k, v in os.environ.items() if k not in ("SELFATTN_CPU_BF16_ENGINE",)}
    has = cpu_bf16.has_bf16_dot() and (engine == "dot" or cpu_bf16.has_amx_bf16())
    path = tmp_path / "amx.json"
    r = run_script("bench_amx.py", "--smoke", "--engine", engine, "--json", path, env=env)
    if has:
        _ok(r)
        _amx_checks(_json(path), r, engine)
    else:
        assert r.returncode == 2 and not path.exists(), _tail(r)
        assert f"--engine {engine}: not on this CPU" in r.stderr and "Traceback" not in r.stderr, _tail(r)


def test_bench_amx_float32_fallback(tmp_path):
    """SELFATTN_CPU_BF16=0: the bfloat16 rows are the float32 fallback, and the run says so."""
    path = tmp_path / "amx.json"
    r = run_script("bench_amx.py", "--smoke", "--no-sdpa", "--dense", "1,1,128,64", "--causal", "1,1,128,64",
                   "--json", path, env=dict(os.environ, SELFATTN_CPU_BF16="0"))
    _ok(r)
    res = _json(path)
    assert res["engine"] == "float32 fallback" and res["engine_calls"]["calls"] == 0, res
    assert "float32 fallback" in res["cpu_features_bfloat16"], res["cpu_features_bfloat16"]


def test_bench_bf16_mk(tmp_path):
    from selfattn.kernels import cpu_bf16

    path = tmp_path / "mk.json"
    r = run_script("bench_bf16_mk.py", "--seconds", "0.001", "--length", "128", "--json", path)
    _ok(r)
    if not cpu_bf16.host_has_bf16_dot():
        assert "nothing to measure" in r.stdout and not path.exists(), _tail(r)
        return
    res = _json(path)
    _has(res, "fma_gflops", "vdpbf16ps_gflops", "tiles", "per_tile_us", "forward_estimate")
    assert len(res["tiles"]) == 3 and res["forward_estimate"]["L"] == 128, res


def test_bench_dense_mask(tmp_path):
    path = tmp_path / "dense_mask.json"
    r = run_script("bench_dense_mask.py", "--smoke", "--json", path)
    _ok(r)
    rows = _json(path)["rows"]
    assert {(row["mask"], row["backward"]) for row in rows} == {("bool", False), ("bool", True), ("float", False), ("float", True)}
    assert all(row["cpu_s"] > 0 and row["sdpa_s"] > 0 for row in rows), rows


def test_bench_short(tmp_path):
    path = tmp_path / "short.json"
    r = run_script("bench_short.py", "--smoke", "--threads", "1", "--json", path)
    _ok(r)
    rows = _json(path)["rows"]
    assert {row["pass"] for row in rows} == {"fwd", "fwd+bwd", "fwd (decoding)"}, rows
    assert any("torch_sdpa_aa_s" in row for row in rows if row["pass"] != "fwd (decoding)"), rows  # --fixed's table ran
    assert "auto's calibration" in r.stdout, _tail(r)


@pytest.mark.parametrize("memory", MEMORY)
def test_bench_batches(tmp_path, memory):
    path = tmp_path / "batches.json"
    r = run_script("bench_batches.py", "--smoke", "--json", path, *([] if memory else ["--no-memory"]))
    _ok(r)
    res = _json(path)
    _has(res, "meta", "mask_function", "overhead")
    _has(res["mask_function"], "cpu_function_s", "cpu_window_s", "sdpa_dense_s", "speedup_vs_sdpa")
    assert ("memory" in res) == memory, sorted(res)
    if memory:
        assert all(isinstance(v, int) and v > 0 for v in res["memory"].values()), res["memory"]  # not {"error": ...}
    _has(res["overhead"], "plain_s", "alibi_overhead", "sinks_overhead")


def test_bench_train(tmp_path):
    path = tmp_path / "train.json"
    r = run_script("bench_train.py", "--smoke", "--json", path)
    _ok(r)
    rows = _json(path)["rows"]
    assert {(row["backend"], row["mode"]) for row in rows} == {(b, m) for b in ("sdpa", "cpu") for m in ("stats", "plain")}
    assert all(len(row["tokens_per_s"]) == 1 and row["tokens_per_s"][0] > 0 for row in rows), rows


# -- the integration's benchmarks (transformers) -----------------------------------------------------------------


def test_bench_hf(tmp_path):
    pytest.importorskip("transformers")
    path = tmp_path / "hf.json"
    r = run_script("bench_hf.py", "--smoke", "--json", path)
    _ok(r)
    res = _json(path)["result"]
    _has(res, "eager", "sdpa", "selfattn", "selfattn+stats", "attention_alone_s", "stats_cost_forward")
    assert res["selfattn"]["forward+backward"]["median_s"] > 0, res["selfattn"]


def test_bench_decode(tmp_path):
    pytest.importorskip("transformers")
    path = tmp_path / "decode.json"
    r = run_script("bench_decode.py", "--smoke", "--json", path)
    _ok(r)
    res = _json(path)
    _has(res, "generate", "attention_step", "same_tokens")
    _has(res["generate"], "eager", "sdpa", "selfattn")
    assert res["generate"]["selfattn"]["prefill_s"] > 0, res["generate"]


# -- distributed: ring attention over gloo on the CPU; nccl on GPUs -------------------------------------------------


def test_bench_ring(tmp_path):
    path = tmp_path / "ring.json"
    r = run_script("bench_ring.py", "--smoke", "--out", path)
    _ok(r)
    res = _json(path)
    assert [x["run"] for x in res["results"]] == ["single", "balanced"], res["results"]
    assert all(x["seconds"] > 0 for x in res["results"]), res["results"]
    assert "balanced throughput vs single" in res["summary"], res["summary"]


# -- the GPU benchmarks ---------------------------------------------------------------------------------------------


def test_bench_gpu_dry_run():
    r = run_script("bench_gpu.py", "--dry-run")
    _ok(r)
    assert "dense fwd" in r.stdout and "FLOPs" in r.stdout, _tail(r)


@pytest.mark.slow
def test_bench_gpu_compile():
    """--compile --quick builds kernel variants for sm_90 offline (triton's ptxas): no GPU needed, ~30 s."""
    pytest.importorskip("triton")
    r = run_script("bench_gpu.py", "--compile", "--quick", env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    _ok(r)
    assert "compiled " in r.stdout and " kernels;" in r.stdout, _tail(r)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bench_gpu.py times the triton backend on a CUDA GPU: none here")
def test_bench_gpu(tmp_path):
    path = tmp_path / "gpu.json"
    r = run_script("bench_gpu.py", "--cases", "dense fwd", "--scale", "0.0625", "--rep", "5", "--json", path)
    _ok(r)
    rows = _json(path)
    assert rows, _tail(r)


@pytest.mark.skipif(not torch.cuda.is_available() or not torch.distributed.is_nccl_available(),
                    reason="ring_nccl_check.py runs ring attention over nccl on CUDA GPUs: none here")
def test_ring_nccl_check():
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                        os.path.join(BENCH, "ring_nccl_check.py")], capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "ring " in r.stdout, r.stdout[-3000:]


def test_bench_cpu_cases_refuses_unknown_names():
    r = run_script("bench_cpu.py", "--smoke", "--cases", "dense fwd,dense fwd bf16")
    assert r.returncode == 2 and "no case named ['dense fwd bf16']" in r.stderr, _tail(r)
