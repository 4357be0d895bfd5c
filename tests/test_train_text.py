"""selfattn train --text: a character-level model of a text file; sample and explain read its checkpoint."""

from __future__ import annotations

import math

import selfattn
from selfattn import checkpoint
from selfattn.training import make_config, sample_text, train

LINES = [
    "the notes say that queries ask, keys answer and values carry what is said.\n",
    "a scaled dot product compares each query with every key; softmax turns scores into weights.\n",
    "the weighted sum of the values is the contextual embedding of the token.\n",
]


def test_char_model_learns_a_text_file(tmp_path):
    text = "".join(LINES[i % 3] for i in range(40))
    path = tmp_path / "notes.txt"
    path.write_text(text, encoding="utf-8")
    cfg = make_config(dict(text=str(path), seq_len=32, dim=32, layers=2, heads=2, batch=16, steps=120, lr=3e-3,
                           warmup=10, eval_every=40, stats_every=20, out=str(tmp_path / "run")))
    assert cfg.target_acc is None  # --text runs every step
    res = train(cfg)
    chance = math.log(len(set(text)))
    print(f"loss {res.losses[0][1]:.3f} -> {res.losses[-1][1]:.3f} (chance {chance:.3f}); held-out loss {res.heldout_loss:.3f}")
    assert res.stopped == "steps" and res.steps == 120
    assert res.losses[-1][1] < 0.5 * chance and res.heldout_loss < 0.5 * chance
    ckpt = checkpoint.load(res.out)
    assert ckpt.tokenizer == "chars" and "".join(ckpt.vocab) == "".join(sorted(set(text)))
    prompt, cont = sample_text(res.out, "the weighted ", max_new_tokens=30, temperature=0)
    assert prompt == "the weighted " and len(cont) == 30 and set(cont) <= set(text)
    tr = selfattn.explain("the query", checkpoint=str(res.out))
    assert len(tr.tokens) == len("the query") and len(tr.layers) == 2
