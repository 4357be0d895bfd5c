"""`selfattn scaling`: the notes' numbers recomputed, the d_k sweep, its verdict, table and plot."""

import json
import math
import struct

import pytest
import torch
from _cli import run_cli

from selfattn.explain import scaling
from selfattn.explain.labels import fmt


def test_notes_numbers_are_computed():
    n = scaling.notes_numbers()
    q = torch.tensor([2.0, 3.0, 4.0, 1.0], dtype=torch.float64)
    k = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.float64)
    raw = k @ q  # the notes' dot products
    assert n["raw_scores"] == raw.tolist() and n["unscaled"]["scores"] == raw.tolist()
    assert torch.allclose(torch.tensor(n["unscaled"]["weights"], dtype=torch.float64), torch.softmax(raw, 0), rtol=0, atol=1e-15)
    assert n["scaled"]["scale"] == 0.5 and n["scaled"]["scores"] == (raw / 2).tolist()
    assert torch.allclose(torch.tensor(n["scaled"]["weights"], dtype=torch.float64), torch.softmax(raw / 2, 0), rtol=0, atol=1e-15)
    # the notes round the unscaled softmax to [0.88, 0.12]; ours agrees to their two decimals
    assert [round(x, 2) for x in n["unscaled"]["weights"]] == [0.88, 0.12]
    # scaling balances the weights and enlarges the softmax's gradient
    assert n["scaled"]["weights"][0] < n["unscaled"]["weights"][0]
    assert n["scaled"]["jacobian_norm"] > n["unscaled"]["jacobian_norm"]


def test_jacobian_norm_is_the_autograd_jacobian():
    torch.manual_seed(0)
    s = torch.randn(6, 9, dtype=torch.float64) * torch.tensor([0.1, 1, 3, 10, 30, 100], dtype=torch.float64)[:, None]
    p = torch.softmax(s, -1)
    eps = torch.finfo(torch.float64).eps
    for i in range(6):
        jac = torch.autograd.functional.jacobian(lambda x: torch.softmax(x, -1), s[i])  # (9, 9)
        ref, got = float(jac.norm()), float(scaling.jacobian_norm(p[i]))
        # autograd forms p_i - p_i^2 on the diagonal: its own rounding is up to a few eps (absolute)
        assert abs(got - ref) <= 1e-12 * ref + 4 * eps, (i, got, ref)


def test_jacobian_norm_keeps_relative_accuracy_when_saturated():
    # two keys, score gap g: p = (1 - e, e) with e = sigmoid(-g); the Jacobian is p0 p1 [[1, -1], [-1, 1]], norm 2 p0 p1
    for g in (1.0, 10.0, 40.0, 300.0):
        e = math.exp(-g) / (1 + math.exp(-g))
        p = torch.softmax(torch.tensor([g, 0.0], dtype=torch.float64), -1)
        exact = 2 * (1 - e) * e
        assert abs(float(scaling.jacobian_norm(p)) - exact) <= 1e-13 * exact, g


def test_sweep_shows_saturation_and_vanishing_gradient():
    rows = scaling.sweep((4, 64, 1024), n_queries=256, seed=1)
    u = [r["unscaled"] for r in rows]
    s = [r["scaled"] for r in rows]
    for r in rows:
        assert abs(r["unscaled"]["std"] / math.sqrt(r["d_k"]) - 1) < 0.1  # unscaled scores spread as sqrt(d_k)
        assert abs(r["scaled"]["std"] - 1) < 0.1
    assert u[0]["max_weight"] < u[1]["max_weight"] < u[2]["max_weight"]
    assert u[0]["entropy"] > u[1]["entropy"] > u[2]["entropy"]
    assert u[0]["jacobian_norm_median"] > u[1]["jacobian_norm_median"] > u[2]["jacobian_norm_median"]
    assert max(x["max_weight"] for x in s) - min(x["max_weight"] for x in s) < 0.05  # scaled: no drift with d_k
    v = scaling.verdict(rows)
    assert v["saturation"] and v["vanishing_gradient"] and v["scaled_std_steady"]
    assert v["text"][0].startswith("Saturation: YES") and v["text"][1].startswith("Vanishing gradient: YES")


def test_verdict_says_no_when_the_numbers_do_not_show_it():
    rows = scaling.sweep((4, 8), n_queries=128, seed=0)  # too small a d_k to saturate
    v = scaling.verdict(rows)
    assert not v["saturation"] and "do not show" in v["text"][0]


def test_cli_scaling_table_json_and_plot(tmp_path):
    png, js = tmp_path / "s.png", tmp_path / "s.json"
    r = run_cli("scaling", "--max-dk", "256", "--queries", "128", "--png", png, "--json", js,
                env={"COLUMNS": "160", "PATH": ""})  # a process of its own (tests/_cli.py)
    assert r.returncode == 0, r.stderr
    d = json.loads(js.read_text())
    assert [row["d_k"] for row in d["sweep"]] == [4, 8, 16, 32, 64, 128, 256]
    assert d["sweep"] == scaling.sweep([4, 8, 16, 32, 64, 128, 256], n_queries=128, seed=0)  # same seed, same numbers
    for row in d["sweep"]:
        for name in ("unscaled", "scaled"):
            assert fmt(row[name]["max_weight"], sig=4) in r.stdout
    for x in d["notes"]["unscaled"]["weights"] + d["notes"]["scaled"]["weights"]:
        assert fmt(x) in r.stdout
    for line in d["verdict"]["text"]:
        assert line.split(".")[0] in " ".join(r.stdout.split())
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == (1000, 750)


@pytest.mark.slow
def test_full_sweep_to_4096():
    v = scaling.verdict(scaling.sweep())
    assert v["saturation"] and v["vanishing_gradient"]
