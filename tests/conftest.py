"""Shared helpers for the core test suite: backend list, request capture, inputs, comparisons."""

from __future__ import annotations

import hashlib
import math
import os
import sys
from unittest import mock

# torch's OpenMP threads (libgomp) spin after every parallel region by default, waiting for the next one; with
# two xdist workers of two threads each on two cores, and in the processes tests start, that spinning takes
# the cores from the other worker's work: test_grad + test_stats_probs in one process (the machine busy
# besides) took 32-47 s of CPU with spinning, 15-18 s with the waiting threads asleep. libgomp reads the
# variable once, when torch loads it, so it is set here, before the first import of torch, and
# subprocesses inherit it. Thread counts (and so the kernels each test runs) are unchanged.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

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

# auto ranks cpu against sdpa from a per-process timing of this host; tests that pin auto's choice
# need the same answer in every process (and in the CLI subprocesses they start), so they use the
# recorded table. tests/test_cpu_features.py switches the calibration on where it is the subject.
os.environ.setdefault("SELFATTN_AUTO_CALIBRATE", "0")

import selfattn  # noqa: E402
from selfattn.backends import BackendUnavailable  # noqa: E402

from _oracle import compare, expectation, reference_pair  # noqa: E402

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
    """None if ``backend``'s own ``unsupported()`` accepts this request, else the feature it names."""
    return selfattn.backends.get(backend).unsupported(q, k, v, request_for(q, k, v, **kw))


def table_serves(backend: str, q, k, v, **kw) -> bool:
    """True if ``backend``'s feature table (``capabilities``) says it serves this request."""
    return expectation(backend, q, k, v, **kw).serves is not False


#: backend -> {"served": n, "refused": n} over every request run_backend saw in this process
LEDGER: dict = {}


def run_backend(backend: str, q, k, v, **kw):
    """``selfattn.attention(..., backend=backend)``, held to the backend's feature table.

    The table (``Backend.capabilities``, read by ``_oracle.expectation`` with the environment)
    predicts serve or refuse. A predicted request that raises BackendUnavailable fails the test,
    and so does a served request the table rules out (the table would lie). A predicted refusal
    must raise BackendUnavailable naming the backend and the missing feature. Returns None then.
    """
    exp = expectation(backend, q, k, v, **kw)
    counts = LEDGER.setdefault(backend, {"served": 0, "refused": 0})
    try:
        res = selfattn.attention(q, k, v, backend=backend, **kw)
    except BackendUnavailable as err:
        msg = str(err)
        assert exp.serves is not True, f"{backend} refused a request its feature table says it serves: {msg}"
        assert backend in msg, f"refusal message does not name the backend: {msg}"
        reasons = exp.missing or exp.maybe
        assert exp.names(msg, reasons), f"{backend} refused, but not for {[r for r, _ in reasons]}: {msg}"
        print(f"{backend} refuses, as its table says: {msg}")
        counts["refused"] += 1
        return None
    assert exp.serves is not False, f"{backend} served a request its feature table rules out ({[r for r, _ in exp.missing]})"
    counts["served"] += 1
    return res


def compare_with_reference(name, got, q, k, v, *, stats=None, refs=None, **kw):
    """An output (and stats) against the float64 reference and its low-precision twin.

    ``refs``: a reference_pair(q, k, v, **kw) to reuse. Returns (ref64 out, ref64 stats).
    """
    pair = refs if refs is not None else reference_pair(q, k, v, **kw)
    compare(name, pair, got, stats=stats, dtype=q.dtype)
    return pair[0].out, pair[0].stats


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


# -- one reference pair per case of a backend grid -----------------------------------------------------
# A grid test runs each case once per backend on the same inputs (the seed fixture above), so the float64
# reference and its four float32 twin orders, most of such a test's time, would be computed once per
# backend. Grid tests pass ``case=backend_case`` to check_backend to compute them once per case instead;
# under xdist, pytest_xdist_make_scheduler below sends a case's tests to one worker together.
_PAIRS: dict = {}


def _fingerprint(value):
    # tensors by dtype, shape and the SHA-1 of their bytes; anything else by its repr
    if isinstance(value, torch.Tensor):
        t = value.detach().contiguous().reshape(-1)
        return str(t.dtype), tuple(value.shape), hashlib.sha1(t.view(torch.uint8).numpy().tobytes()).hexdigest()
    if isinstance(value, (list, tuple)):
        return tuple(_fingerprint(x) for x in value)
    return repr(value)


def shared_reference_pair(case, q, k, v, **kw):
    """``reference_pair(q, k, v, **kw)``, computed once for a grid case that several tests (one per
    backend) run on the same inputs. ``case`` names the case apart from its backend (the backend_case
    fixture); the inputs and every keyword argument are fingerprinted into the key as well, so a test
    whose inputs differ from its neighbours' gets a reference of its own."""
    key = (case, _fingerprint(q), _fingerprint(k), _fingerprint(v), tuple(sorted((n, _fingerprint(x)) for n, x in kw.items())))
    if key not in _PAIRS:
        while len(_PAIRS) >= 8:
            _PAIRS.pop(next(iter(_PAIRS)))
        _PAIRS[key] = reference_pair(q, k, v, **kw)
    return _PAIRS[key]


@pytest.fixture
def backend_case(request):
    """The test function and its parameters other than ``backend``: what a case of a backend grid is."""
    return _case_of(request.node)


def _case_of(item):
    spec = getattr(item, "callspec", None)
    params = {} if spec is None else spec.params
    return item.originalname, tuple(sorted((n, repr(x)) for n, x in params.items() if n != "backend"))


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook; runs with -p no:xdist need no spec
def pytest_xdist_make_scheduler(config, log):
    # `pytest -n N` (--dist load): xdist's load balancing, except that a backend-grid case's tests on
    # every backend (node ids differing only in their last id, the backend) go to one worker together,
    # so shared_reference_pair computes the case's reference once, and so do the SAME_WORKER groups below.
    # (xdist's own --dist loadgroup marks do not work with this pytest: it renames items through an
    # attribute pytest no longer reads.)
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    # deal the tests in collection order, where pytest_collection_modifyitems put the longest first (by
    # default this scheduler would put the scopes with the most tests first)
    config.option.loadscopereorder = False

    class GridCases(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return _scope(nodeid)

    return GridCases(config, log)


def _scope(nodeid):
    # what the scheduler deals to one worker as a whole: a grid case on every backend, a SAME_WORKER group,
    # else the test alone
    base, _, last = nodeid.rpartition("-")
    if "::" in nodeid and nodeid.split("::")[0].endswith(_GRID_FILES) and last[:-1] in BACKENDS:
        return base
    group = SAME_WORKER.get(nodeid.split("[")[0]) or SAME_WORKER.get(nodeid.split("::")[0])
    return f"same worker: {group}" if group else nodeid


#: test files whose cases end their ids in ``-<backend>`` and share a reference (check_backend's ``case``)
_GRID_FILES = ("test_backends_grid.py",)


# -- the longest tests first under xdist ---------------------------------------------------------------
# Dealt out in file order, a test of a minute that comes late keeps one worker busy after the other has run
# out of tests; longest first, the last tests dealt are short ones and both workers finish together.
# Estimates: CPU seconds of each test and the processes it starts, from a one-process run of the whole suite
# on precompiled kernels (HEAD 0a91830 + OMP_WAIT_POLICY=PASSIVE). A test renamed or gone only loses its
# early start; a test missing here counts as short.
LONGEST_FIRST = {
    "tests/test_avx2_layout.py::test_forward_and_backward_in_the_avx2_layout": 55,
    "tests/test_ring.py::test_ring_matches_one_process[4-auto]": 46,
    "tests/test_ring.py::test_ring_matches_one_process[2-auto-math]": 25,
    "tests/test_ring.py::test_ring_bad_input_errors_on_every_rank[2]": 8,
    "tests/test_cpu_kernel.py::test_long_sequences[causal]": 25,
    "tests/test_cpu_kernel.py::test_long_sequences[none]": 22,
    "tests/test_cpu_kernel.py::test_keeps_torch_thread_count[2]": 6,
    "tests/test_cpu_kernel.py::test_keeps_torch_thread_count[1]": 5,
    "tests/test_train_context.py::test_context_parallel_step_matches_one_process[4-2]": 24,
    "tests/test_train_context.py::test_cli_starts_its_processes_and_matches_one_process": 16,
    "tests/test_train_context.py::test_context_parallel_not_dividing_the_world_fails_on_every_rank": 11,
    "tests/test_train_context.py::test_context_parallel_step_matches_one_process[2-2]": 11,
    # torch.compile's inductor: 54 s for the three with an empty inductor cache (a CI machine's), 32 s warm
    "tests/test_layers.py::test_torch_compile_forward[math]": 30,
    "tests/test_layers.py::test_torch_compile_forward[sdpa]": 14,
    "tests/test_layers.py::test_torch_compile_forward[auto]": 8,
    # the torch.compile group's first test in collection order (so it pays dynamo's first compile): 19.6 s, and
    # test_layers' [math] 10.8 s after it (the group alone, -n 2, shared machine)
    "tests/test_bf16_review.py::test_torch_compile": 10,
    "tests/test_distributed.py::test_two_processes_match_one": 18,
    "tests/test_cpu_fwd.py::test_scores_bit_identical_to_old_kernel[{}]": 17,
    "tests/test_cpu_fwd.py::test_long_causal": 6.5,
    "tests/test_cpu_fwd.py::test_exp2_without_avx512dq": 3.5,
    "tests/test_training_task.py::test_attention_learns_the_task_and_current_token_only_cannot[induction]": 13,
    "tests/test_readme_examples.py::test_readme_python_block_runs[block3]": 11,
    "tests/test_readme_examples.py::test_readme_python_block_runs[block2]": 10,
    "tests/test_readme_examples.py::test_readme_python_block_runs[block4]": 6,
    "tests/test_readme_examples.py::test_readme_python_block_runs[block1]": 5,
    "tests/test_readme_examples.py::test_readme_python_block_runs[block0]": 5,
    "tests/test_triton_interpret.py::test_deterministic_backward[causal]": 10,
    # triton's compiler with an empty cache (a CI machine's): 42 s in the window run, 7 s warm
    "tests/test_triton_interpret.py::test_kernels_compile_for_sm90": 40,
    "tests/test_train.py::test_ctrl_c_saves_a_checkpoint_and_exits_cleanly": 9,
    "tests/test_train.py::test_short_run_learns_far_below_chance": 7,
    "tests/test_train.py::test_resume_gives_the_same_next_losses": 5,
    "tests/test_cpu_bf16.py::test_mm_bf16_add_and_transposed_a[64-64-64]": 6,
    "tests/test_cpu_bf16.py::test_mm_bf16_every_shape[1]": 4,
    "tests/test_cpu_bf16.py::test_cached_where_the_kernels_are": 4,
    "tests/test_cpu_amx.py::test_first_two_thread_backward_of_a_process[amx]": 5,
    "tests/test_cpu_amx.py::test_first_two_thread_backward_of_a_process[dot]": 5,
    "tests/test_cpu_amx.py::test_fallback_forced[SELFATTN_CPU_AMX]": 5,
    "tests/test_cpu_amx.py::test_fallback_forced[SELFATTN_CPU_BF16]": 4,
    "tests/test_cpu_bwd.py::test_first_two_thread_call_of_a_process": 5,
    "tests/test_explain_outputs.py::test_long_model_html_is_proportionate": 5.5,
    "tests/test_explain_outputs.py::test_png_heatmap[model]": 4.5,
    "tests/test_explain_outputs.py::test_png_heatmap[many_heads]": 4.5,
    "tests/test_explain_hf.py::test_gpt_oss_sinks_every_head_and_its_sink_share_equal_eager": 4.5,
    "tests/test_explain_hf.py::test_every_head_equals_eager_output_attentions": 4,
    "tests/test_packaging.py::test_wheel_metadata": 5,
    "tests/test_packaging.py::test_numba_cache_place[read-only]": 4.5,
    "tests/test_packaging.py::test_numba_cache_place[read-only+NUMBA_CACHE_DIR]": 4.5,
    "tests/test_packaging.py::test_core_import_without_extras": 4,
    "tests/test_packaging.py::test_numba_cache_place[writable]": 4,
    "tests/test_train_text.py::test_char_model_learns_a_text_file": 4,
    "tests/test_train_parity.py::test_same_seed_same_loss_curve_on_math_sdpa_cpu": 4,
    # the benchmark smoke runs (one SAME_WORKER group; one process, -s --durations, CPU of the child and what it
    # started): the first test starts the helper (~17-20 s of imports)
    "tests/test_benchmarks_smoke.py::test_peak": 20,
    "tests/test_benchmarks_smoke.py::test_bench_ring": 21,
    "tests/test_benchmarks_smoke.py::test_bench_bf16_mk": 8,
    "tests/test_benchmarks_smoke.py::test_bench_train": 6,
    "tests/test_benchmarks_smoke.py::test_bench_cpu_profile": 4,
    "tests/test_benchmarks_smoke.py::test_bench_hf": 3,
    "tests/test_benchmarks_smoke.py::test_bench_decode": 3,
}

# Tests whose first run in a process compiles or warms up something the precompile does not cover: each group
# goes to one worker, which pays it once (dealt out one by one, the group's tests reach both workers at about
# the same moment and both pay). Keys are test functions (every parametrization) or files.
SAME_WORKER = {
    # cpu_flash's float32 kernel variant the old-kernel comparison runs (17 s of compiling)
    "tests/test_cpu_fwd.py::test_scores_bit_identical_to_old_kernel": "cpu_flash float32",
    # torch.compile: dynamo's (and inductor's) first compile in a process
    "tests/test_layers.py::test_torch_compile_forward": "torch.compile",
    "tests/test_layers.py::test_torch_compile_auto_follows_use_backend": "torch.compile",
    "tests/test_cpu_features.py::test_torch_compile_new_arguments": "torch.compile",
    "tests/test_cpu_kernel.py::test_torch_compile_fullgraph": "torch.compile",
    "tests/test_triton_interpret.py::test_torch_compile": "torch.compile",
    "tests/test_bf16_review.py::test_torch_compile": "torch.compile",
    # the whole file: cpu_bf16's product, packing and AMX kernels that only its tests call (1-6 s each to compile)
    "tests/test_cpu_bf16.py": "cpu_bf16 products",
    # module fixtures, computed once per worker that runs one of the file's tests: a training run (7 s), Chromium
    "tests/test_train.py": "test_train's trained run",
    "tests/test_html_browser.py": "one Chromium",
    # the benchmark scripts' helper process (tests/_cli.py's ForkServer): its imports (~17-20 s) once, not on each worker
    "tests/test_benchmarks_smoke.py": "the benchmark helper",
}


def pytest_collection_modifyitems(config, items):
    # only in xdist's workers: the order they report is the order the scheduler deals (every worker sorts
    # the same way; a group's tests count together); a run without -n keeps the files' order
    if not hasattr(config, "workerinput"):
        return
    total = {}
    for item in items:
        scope = _scope(item.nodeid)
        total[scope] = total.get(scope, 0.0) + LONGEST_FIRST.get(item.nodeid, 0.0)
    items.sort(key=lambda item: -total[_scope(item.nodeid)])  # stable: the rest keep their order


def check_backend(name, backend, q, k, v, *, case=None, **kw):
    """Run ``backend`` on the request (and with return_stats=True) and hold it to the reference.

    Refusals are held to the backend's feature table (see run_backend). Returns the number of
    the two requests served, after checking it is the number the table predicts. The reference
    runs only when something was served (a backend refusing a device here costs nothing).
    ``case``: the backend_case fixture of a grid test, to share the reference with the case's
    tests on other backends (shared_reference_pair).
    """
    plain = run_backend(backend, q, k, v, **kw)
    with_stats = run_backend(backend, q, k, v, return_stats=True, **kw)
    served = (plain is not None) + (with_stats is not None)
    predicted = [expectation(backend, q, k, v, **kw).serves, expectation(backend, q, k, v, return_stats=True, **kw).serves]
    if None not in predicted:
        assert served == sum(predicted), f"{name}[{backend}]: served {served} of 2 requests, its table predicts {sum(predicted)}"
    if served:
        pair = reference_pair(q, k, v, **kw) if case is None else shared_reference_pair(case, q, k, v, **kw)
        if plain is not None:
            _, st64 = compare_with_reference(f"{name}[{backend}]", plain, q, k, v, refs=pair, **kw)
            exact_fully_masked(f"{name}[{backend}]", plain, None, st64)
        if with_stats is not None:
            out, stats = with_stats
            _, st64 = compare_with_reference(f"{name}[{backend}] +stats", out, q, k, v, stats=stats, refs=pair, **kw)
            exact_fully_masked(f"{name}[{backend}] +stats", out, stats, st64)
    return served


def pytest_terminal_summary(terminalreporter):
    # what each backend served and refused: on a machine without a GPU, triton refuses CPU tensors
    if LEDGER:
        terminalreporter.write_line("requests per backend (served / refused, each as its feature table predicts): " +
                                    ", ".join(f"{b} {c['served']}/{c['refused']}" for b, c in sorted(LEDGER.items())))


# -- where CI's time goes: numba's first-call compiles, per test (only with SELFATTN_COMPILE_LOG=dir) --
# Each process (xdist worker) appends "cpu seconds<TAB>pid<TAB>function<TAB>test" lines, one per top-level
# compile (the compiling thread's CPU time: a loaded machine does not inflate it; cache loads are not
# compiles), to dir/compile-<pid>.tsv; scripts/compile_report.py sums them.
_COMPILE_LOG = os.environ.get("SELFATTN_COMPILE_LOG")
_CURRENT_TEST = ["(collection)"]

if _COMPILE_LOG:
    import time as _time

    from numba.core import event as _event

    class _CompileLog(_event.Listener):
        def __init__(self):
            self.depth, self.start, self.name = 0, 0.0, ""

        def on_start(self, event):
            if self.depth == 0:
                self.start = _time.thread_time()
                dispatcher = (event.data or {}).get("dispatcher")
                self.name = getattr(getattr(dispatcher, "py_func", None), "__qualname__", str(dispatcher))
            self.depth += 1

        def on_end(self, event):
            self.depth -= 1
            if self.depth == 0:
                os.makedirs(_COMPILE_LOG, exist_ok=True)
                with open(os.path.join(_COMPILE_LOG, f"compile-{os.getpid()}.tsv"), "a") as f:
                    f.write(f"{_time.thread_time() - self.start:.3f}\t{os.getpid()}\t{self.name}\t{_CURRENT_TEST[0]}\n")

    _event.register("numba:compile", _CompileLog())


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _CURRENT_TEST[0] = item.nodeid


# -- numba's compiles once, before the xdist workers start -------------------------------------------
# Each worker compiles every kernel variant it meets, both at once at the start (the compile log of a
# cold run showed the float32 forward kernels (then cpu_fwd.flash_fwd_t_serial) compiled by both workers). For the whole
# suite under xdist (CI's `pytest -n 2`) the controller first compiles them all once into the on-disk
# cache (`selfattn compile`, two processes: ~2 minutes cold, ~15 s warm) and the workers and the
# processes some tests start load them. Two cold fresh-clone runs on the 2-core Xeon: pytest's time
# 856 s without, 725 s with (the 173 s of compiling included). SELFATTN_TEST_PRECOMPILE=0 turns it
# off, =1 on for any selection of tests too (by default a run of chosen files skips it).


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session):
    config = session.config
    workers = getattr(config.option, "numprocesses", None)
    choice = os.environ.get("SELFATTN_TEST_PRECOMPILE")
    whole_suite = getattr(config, "args_source", None) == pytest.Config.ArgsSource.TESTPATHS
    if hasattr(config, "workerinput") or not workers or choice == "0" or (choice != "1" and not whole_suite):
        return
    if "cpu" not in selfattn.backends.names():
        return
    from selfattn.kernels import warm

    result = warm.compile_kernels(jobs=2)
    say = config.pluginmanager.get_plugin("terminalreporter")
    line = (f"selfattn: cpu kernels compiled (or loaded) once for all workers in {result['seconds']:.0f} s"
            + (f"; {len(result['failed'])} step(s) failed, the tests will meet them: {result['failed']}" if result["failed"] else ""))
    if say is not None:
        say.write_line(line)
    else:
        print(line, file=sys.stderr)
