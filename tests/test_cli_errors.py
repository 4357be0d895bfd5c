"""Bad input to `selfattn`: one clear message, a non-zero exit status, never a traceback."""

import json

import pytest
from _cli import run_cli

from selfattn import cli
from selfattn.explain import MAX_TOKENS


def _run(*args, stdin=None):
    return run_cli(*args, input=stdin, env={"COLUMNS": "120", "PATH": ""}, timeout=120)


def _bad_checkpoint(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    (d / "config.json").write_text('{"format": "selfattn-checkpoint", "version": 1, "model": ')  # cut short
    (d / "model.safetensors").write_bytes(b"\x00" * 16)
    return d


# each in a process of its own, as a user runs it (a child of tests/_cli.py's helper: the imports done once)
@pytest.mark.parametrize("case", ["empty", "too_long", "unknown_option", "corrupt_checkpoint"])
def test_bad_input_subprocess(case, tmp_path):
    if case == "empty":
        r, want = _run("explain", "  "), "has no tokens"
    elif case == "too_long":
        r, want = _run("explain", "--file", "-", stdin=" ".join(["w"] * (MAX_TOKENS + 1))), f"at most {MAX_TOKENS}"
    elif case == "unknown_option":
        r, want = _run("explain", "the cat", "--heads", "3"), "unrecognized arguments: --heads"
    else:
        r, want = _run("explain", "the cat", "--checkpoint", str(_bad_checkpoint(tmp_path))), "not valid JSON"
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    assert want in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") <= 2, r.stderr  # a message, not a dump


def _main(capsys, *args):
    try:
        code = cli.main(list(args))
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    out = capsys.readouterr()
    return code, out.err


@pytest.mark.parametrize("args,want", [
    (("explain", "--checkpoint", "/no/such/dir", "the cat"), "checkpoint not found"),
    (("explain", "the cat", "--rows", "7"), "out of range"),
    (("explain", "the cat", "--rows", "x"), "rows must be indices"),
    (("explain", "the cat", "--window", "-1"), "--window must be a non-negative integer"),
    (("explain", "the cat", "--dim", "0"), "--dim must be a positive integer"),
    (("explain", "the cat", "--init", "zeros"), "invalid choice: 'zeros'"),
    (("explain", "the cat", "--init", "identity", "--qk-dim", "3"), "identity"),
    (("explain", "--dim", "4"), "needs a text"),
    (("explain", "--file", "/no/such/file"), "cannot read --file"),
    (("explain", "the cat", "--file", "/no/such/file"), "not both"),
    (("scaling", "--max-dk", "2"), "--max-dk must be at least 4"),
    (("scaling", "--keys", "many"), "--keys must be a positive integer"),
])
def test_bad_input_in_process(capsys, args, want):
    code, err = _main(capsys, *args)
    assert code not in (0, None), err
    assert want in err, err


def test_unknown_options_are_one_line_naming_the_command(capsys):
    code, err = _main(capsys, "explain", "the cat", "--heads", "3")
    assert code == 2
    assert err.strip() == "selfattn explain: error: unrecognized arguments: --heads 3 (see selfattn explain --help)", err
    code, err = _main(capsys, "backends", "--json")
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("selfattn backends: error: unrecognized arguments: --json") and "selfattn backends --help" in err, err


@pytest.mark.parametrize("cmd", ["explain", "scaling", "train", "sample"])
def test_seed_out_of_range_names_the_option(capsys, cmd):
    # past 64 bits torch.manual_seed failed with 'Overflow when unpacking long long', naming no option
    code, err = _main(capsys, cmd, "--seed", "99999999999999999999", *(["the cat"] if cmd == "explain" else []))
    assert code == 2, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith(f"selfattn {cmd}: error: argument --seed:"), err
    assert "99999999999999999999" in lines[0] and "Overflow" not in err and "Traceback" not in err, err


def test_negative_seed_names_the_option(capsys):
    code, err = _main(capsys, "explain", "--seed", "-4", "a")
    assert code == 2, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("selfattn explain: error: argument --seed:") and "-4" in lines[0], err


def test_checkpoint_errors_reach_the_user(capsys, tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"format": "selfattn-checkpoint", "version": 1, "model": {"type": "attention-stack"}}))
    (d / "model.safetensors").write_bytes(b"not a safetensors file at all")
    code, err = _main(capsys, "explain", "the cat", "--checkpoint", str(d))
    assert code == 2 and "model.safetensors is not a readable safetensors file" in err
    (d / "model.safetensors").unlink()
    code, err = _main(capsys, "explain", "the cat", "--checkpoint", str(d))
    assert code == 2 and "has no model.safetensors" in err
