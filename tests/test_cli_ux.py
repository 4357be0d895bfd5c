"""The command line as a person meets it (issue 16): one-line errors with exit status 2, checked
before any work or output folder; help, version, backends; trimmed matrices; streaming; a bar
that fits 80 columns; the compile notice; internal errors as bugs.

Each user-facing case runs the CLI in a process of its own, as a user does, with a time bound: a child
of tests/_cli.py's helper, which imported selfattn.cli once (the --version case starts a whole interpreter).
"""

from __future__ import annotations

import io
import re
import subprocess
import sys

import pytest
import torch
from _cli import run_cli

import selfattn
from selfattn import checkpoint, cli
from selfattn.model import Transformer, TransformerConfig

TIME_BOUND = 90.0  # seconds for one refused command: the checks come before any work


def _run(*args, timeout=TIME_BOUND, cwd=None, columns=100):
    return run_cli(*args, env={"COLUMNS": str(columns), "PATH": "", "PYTHONIOENCODING": "utf-8", "SELFATTN_AUTO_CALIBRATE": "0"},
                   timeout=timeout, cwd=cwd)


def _refused(r, want: str):
    """Exit status 2, one line naming the problem, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert want in lines[0], lines[0]
    assert r.seconds < TIME_BOUND


@pytest.fixture(scope="module")
def lm_checkpoint(tmp_path_factory):
    """A tiny untrained transformer checkpoint, as `selfattn train` writes one (words tokenizer)."""
    d = tmp_path_factory.mktemp("lm")
    torch.manual_seed(0)
    vocab = list("abcdefgh") + list("ABCDEFGH")
    model = Transformer(TransformerConfig(vocab_size=len(vocab), dim=16, n_layers=1, n_heads=2, context=32))
    checkpoint.save(d, model, model.checkpoint_config(), vocab=vocab, tokenizer="words",
                    extra={"training": {"example": "a B c D a"}})
    return d


# -- refused before any work: one line, exit status 2 ---------------------------------------------


def test_explain_huge_dim_is_refused_by_memory(tmp_path):
    _refused(_run("explain", "hello world", "--dim", "100000000"), "of memory")


def test_train_huge_dim_is_refused_before_the_output_folder(tmp_path):
    out = tmp_path / "run"
    _refused(_run("train", "--dim", "100000000", "--heads", "2", "--steps", "5", "--out", out), "of memory")
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="triton may run here")
def test_train_and_sample_with_a_backend_that_cannot_run_here(tmp_path, lm_checkpoint):
    out = tmp_path / "run"
    r = _run("train", "--backend", "triton", "--steps", "5", "--out", out)
    _refused(r, "--backend triton cannot train here")
    assert "it does not support" not in r.stderr
    assert not out.exists()  # no empty logs left behind
    _refused(_run("sample", "--checkpoint", lm_checkpoint, "--backend", "triton"), "--backend triton cannot run here")


@pytest.mark.parametrize("opt,name,want", [
    ("--png", "out.jpg", "must end in .png"),
    ("--html", "report.txt", "must end in .html or .htm"),
    ("--json", "trace.png", "must end in .json"),
    ("--png", "no/such/folder/w.png", "does not exist"),
])
def test_explain_output_paths_are_checked_before_the_work(tmp_path, opt, name, want):
    _refused(_run("explain", "the cat sat", opt, tmp_path / name), want)
    assert not any(tmp_path.iterdir())


def test_scaling_output_extension(tmp_path):
    _refused(_run("scaling", "--png", tmp_path / "s.svg"), "must end in .png")


def test_train_out_refuses_to_overwrite_another_run(tmp_path, lm_checkpoint):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_bytes((lm_checkpoint / "config.json").read_bytes())
    before = (out / "config.json").read_bytes()
    _refused(_run("train", "--steps", "1", "--out", out), "already holds another run")
    assert (out / "config.json").read_bytes() == before


def test_explain_that_would_take_minutes_is_refused():
    from selfattn.explain import MAX_TOKENS

    text = " ".join(["w"] * MAX_TOKENS)
    r = run_cli("explain", "--file", "-", "--qk-dim", "3072", "--v-dim", "3072", input=text, env={"PATH": ""}, timeout=TIME_BOUND)
    _refused(r, "GFLOP")


def test_explain_full_of_a_huge_matrix_is_refused():
    _refused(_run("explain", "a b c", "--dim", "2048", "--full"), "--full")


# -- help, version, backends ------------------------------------------------------------------------


def test_version_everywhere():
    want = f"selfattn {selfattn.__version__}"
    for args in ([], ["explain"], ["scaling"], ["backends"], ["train"], ["sample"]):
        out = io.StringIO()
        with pytest.raises(SystemExit) as e:
            sys_stdout, sys.stdout = sys.stdout, out
            try:
                cli.main([*args, "--version"])
            finally:
                sys.stdout = sys_stdout
        assert e.value.code == 0 and out.getvalue().strip() == want, (args, out.getvalue())
    r = subprocess.run([sys.executable, "-m", "selfattn.cli", "--version"], capture_output=True, text=True,
                       env={"PATH": ""}, timeout=TIME_BOUND)  # a whole interpreter, as the shell starts it
    assert r.returncode == 0 and r.stdout.strip() == want


def _subparser(command: str):
    p = cli.build_parser()
    sub = next(a for a in p._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    return sub.choices[command]


def _help_text(command: str) -> str:
    return " ".join(_subparser(command).format_help().split())


def test_every_command_has_a_description():
    for command in ("explain", "scaling", "backends", "compile", "train", "sample"):
        assert len(_subparser(command).description or "") > 60, command
    assert "KV cache" in _help_text("sample") and "auto" in _help_text("backends")


def test_train_help_states_the_defaults_text_runs_use():
    from selfattn.training.loop import TEXT_DEFAULTS, TrainConfig

    text = _help_text("train")
    d = TrainConfig()
    for flag, field in (("--heads", "heads"), ("--warmup", "warmup"), ("--eval-every", "eval_every"),
                        ("--eval-size", "eval_size"), ("--stats-every", "stats_every"), ("--dim", "dim")):
        m = re.search(re.escape(flag) + r" N .*?\(default (\S+?)(?:; (\S+) with --text)?\)", text)
        assert m, (flag, text)
        assert m.group(1) == str(getattr(d, field))
        assert m.group(2) == str(TEXT_DEFAULTS[field]), (flag, m.group(0))


def test_backends_says_what_runs_here_and_what_auto_picks():
    r = _run("backends")
    assert r.returncode == 0, r.stderr
    for name in selfattn.backends.names()[1:]:
        assert re.search(rf"^{name}: (available on|NOT available here)", r.stdout, re.M), r.stdout
    if not torch.cuda.is_available():
        assert re.search(r"^triton: NOT available here", r.stdout, re.M) and "not on cpu:" in r.stdout
    r = _run("backends", "--which", "B=1 H=8 L=1024 D=64 causal grad")
    assert r.returncode == 0, r.stderr
    picked = re.search(r"^auto picks: (\w+)", r.stdout, re.M).group(1)
    # the same choice as a real call of that shape makes
    from selfattn._backends_cli import build, parse_call

    q, k, v, req = build(parse_call("B=1 H=8 L=1024 D=64 causal grad"))
    assert picked == selfattn.backends.choose("auto", q, k, v, req).name
    _refused(_run("backends", "--which", "B=1 H=8 L=abc"), "L must be an integer")


# -- output that stays readable ---------------------------------------------------------------------


def test_wide_matrices_are_trimmed_not_flooded():
    r = _run("explain", "a b c", "--dim", "4096", timeout=600)  # real work: a hang guard
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) < 300, len(lines)
    assert "\u2026" in r.stdout and "d4095" in r.stdout and "--full prints every one" in r.stdout
    assert max(len(line) for line in lines) <= 100


def test_masked_pairs_are_marked_in_the_terminal():
    from rich.console import Console

    from selfattn.explain import explain
    from selfattn.explain.terminal import MASKED, render

    buf = io.StringIO()
    render(explain("the cat sat on the mat", causal=True), Console(file=buf, width=160, color_system=None))
    weights = buf.getvalue().split("Softmax: attention weights")[1]
    assert MASKED in weights and "marks a pair the mask rules out" in buf.getvalue()
    buf = io.StringIO()
    render(explain("the cat sat on the mat"), Console(file=buf, width=160, color_system=None))
    assert MASKED not in buf.getvalue().split("Softmax: attention weights")[1]  # nothing masked: no marks


def test_progress_bar_fits_80_columns():
    from rich.console import Console

    from selfattn.training.loop import Reporter

    for width in (80, 100, 140):
        buf = io.StringIO()
        rep = Reporter(Console(file=buf, width=width, force_terminal=True, color_system=None), 3000, 0, True)
        rep.step(2999, 1.23456, 0.999, 123456.0, heldout=1.0)
        rep.bar.refresh()
        rep.stop()
        line = [x for x in buf.getvalue().replace("\r", "\n").split("\n") if "train" in x][-1]
        line = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", line)
        assert len(line) <= width and "\u2026" not in line, (width, line)
        assert "2999/3000" in line and "loss 1.235" in line and re.search(r"\d:\d\d:\d\d", line), line


# -- sample streams ---------------------------------------------------------------------------------


def test_sample_streams_each_token_as_it_is_drawn(lm_checkpoint):
    from selfattn.training.sample import prepare

    job = prepare(lm_checkpoint, "a B c")
    seen = []
    text = job.run(7, temperature=0, on_text=seen.append)
    assert len(seen) == 7 and "".join(seen) == text.lstrip()
    # real work, not a refusal: 600 s is a hang guard (its kernels may need compiling on a loaded machine)
    r = _run("sample", "--checkpoint", lm_checkpoint, "--prompt", "a B c", "--tokens", "5", "--temperature", "0", timeout=600)
    assert r.returncode == 0, r.stderr
    prompt, arrow, cont = r.stdout.strip().partition(" \u2192 ")
    assert prompt == "a B c" and arrow and len(cont.split()) == 5, r.stdout


# -- bugs are reported as bugs ----------------------------------------------------------------------


def test_internal_errors_show_a_traceback_and_ask_for_a_report(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("an internal invariant failed")

    monkeypatch.setattr(cli, "_cmd_backends", broken)
    code = cli.main(["backends"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" in err and "an internal invariant failed" in err and "please report" in err


def test_bad_input_is_one_line(capsys):
    code = cli.main(["explain", "the cat", "--rows", "9"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "out of range" in err


# -- the compile notice -----------------------------------------------------------------------------


def test_compile_notice_is_printed_once_when_numba_compiles():
    numba = pytest.importorskip("numba")
    from selfattn._progress import compile_notice

    @numba.njit
    def f(x):
        return x + 1

    @numba.njit
    def g(x):
        return x * 2

    buf = io.StringIO()
    with compile_notice("compiling!", module=__name__, stream=buf, enabled=True):
        f(1)
        g(1)
        f(2.5)
    assert buf.getvalue() == "compiling!\n"
    buf = io.StringIO()
    with compile_notice("compiling!", module=__name__, stream=buf, enabled=True):
        f(3)  # already compiled: nothing to say
    assert buf.getvalue() == ""
    buf = io.StringIO()
    with compile_notice("compiling!", module="some.other.module", stream=buf, enabled=True):
        g(2.5)
    assert buf.getvalue() == ""


# -- pictures and reports that show something -------------------------------------------------------


def test_step_numbers_have_no_gaps():
    from selfattn.explain import explain
    from selfattn.explain.labels import step_title

    for kw in ({}, {"causal": True}):
        tr = explain("the cat sat", **kw)
        numbers = sorted({int(step_title(tr, name).split(".")[0]) for name in tr.steps})
        assert numbers == list(range(1, len(numbers) + 1)), numbers
        assert ("masked" in tr.steps) == bool(kw)


def test_long_html_report_folds_the_text_and_labels_its_charts():
    from selfattn.explain import explain
    from selfattn.explain.html import FOLD_TOKENS

    text = " ".join(f"w{(i * 7) % 23}" for i in range(300))
    tr = explain(text, causal=True, rows="0,150,-1")
    doc = tr.to_html()
    head = doc.split("<details", 1)[0]
    assert text not in head and f"tokens (300)" in doc and "show all 300" in doc  # the whole text only on request
    assert len(tr.tokens) > FOLD_TOKENS
    # the entropy chart runs from 0 to log L, and its x axis names tokens
    chart = doc[doc.index("entropy per query row"):]
    chart = chart[:chart.index("</svg>")]
    ticks = [float(t) for t in re.findall(r'text-anchor="end">([0-9.]+)<', chart)]
    assert min(ticks) == 0.0 and max(ticks) >= 4.0 and "5.70 = log L" in chart, ticks  # 0 .. log 300: not a zoom on the data
    assert re.search(r'class="tok"[^>]*>w\d+@\d+<', chart)
    # strips over 300 keys are coloured relative to their row, masked keys grey
    assert "coloured relative to its row's largest weight" in doc and 'fill="#d9d9d9"' in doc


def test_compile_refuses_an_unknown_dtype():
    _refused(_run("compile", "--dtypes", "float32,int8"), "--dtypes")
    r = _run("compile", "--jobs", "0")  # argparse's own check: its usage line, then the error
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--jobs must be a positive integer, got 0" in r.stderr, r.stderr


@pytest.mark.slow
def test_compile_fills_the_cache_and_says_where():
    # the real thing: subprocesses compile (or, with a warm cache, load) the float64 kernels; cold that
    # is minutes of CPU, so CI runs the in-process test below instead
    r = _run("compile", "--dtypes", "float64", "--jobs", "1", "--verbose", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert re.search(r"cpu kernels for float64 ready in \d+ s \(4 calls compiled them or loaded them from the cache: .+\)", r.stdout), r.stdout
    assert r.stderr.count("done float64") == 4, r.stderr


def test_compile_reports_each_step_and_failures(monkeypatch, capsys):
    from selfattn.kernels import warm

    seen = {}

    def fake(names, jobs, on_line=None, env=None):  # what the subprocesses would report
        seen.update(names=list(names), jobs=jobs)
        on_line("done", "float64 forward", "1.5")
        on_line("failed", "float64 forward + backward", "RuntimeError: boom")
        return {"seconds": 2.0, "done": ["float64 forward"], "failed": ["float64 forward + backward: RuntimeError: boom"]}

    monkeypatch.setattr(warm, "compile_kernels", fake)
    assert cli.main(["compile", "--dtypes", "float64", "--jobs", "3", "--verbose"]) == 1
    out, err = capsys.readouterr()
    assert seen == {"names": ["float64"], "jobs": 3}
    assert "cpu kernels for float64 ready in 2 s (1 calls compiled them or loaded them from the cache:" in out
    assert "done float64 forward (1.5 s)" in err and "failed float64 forward + backward: RuntimeError: boom" in err
    assert "selfattn compile: failed: float64 forward + backward: RuntimeError: boom" in err


def test_compile_plan_balances_the_groups():
    from selfattn.kernels import warm

    everything = list(warm.GROUPS)
    for jobs in (1, 2, 3, 8):
        parts = warm.plan(everything, jobs)
        assert sorted(n for p in parts for n in p) == sorted(everything)  # each group exactly once
        assert len(parts) == min(jobs, len(everything))
        loads = [sum(warm.GROUPS[n] for n in p) for p in parts]
        # greedy onto the least loaded: no process carries more than the heaviest group beyond another's load
        assert max(loads) - min(loads) <= max(warm.GROUPS.values())
    assert warm.steps(["float32"]) == len(list(warm._calls("float32")))
    with pytest.raises(ValueError, match="unknown dtype group"):
        warm.compile_kernels(["int8"])
