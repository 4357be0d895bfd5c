"""The mask builder remembers what a mask function was (issue 13: recognition was L x L every forward).

transformers makes a new mask function object every forward (``and_masks``, the sliding-window
closure). Recognising one evaluates it on every (query, key) pair; a later function with the same
code and the same captured values, at the same batch size and positions, is remembered instead.
Each test checks the route and the mask against transformers' own dense mask, so a wrong
remembered answer fails, and checks through ``recognition_counts`` which calls were evaluated.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import selfattn.integrations.transformers as sa_hf  # noqa: E402
from test_hf import _allowed, _builder_kwargs, _dense_reference  # noqa: E402

L = 300  # 90,000 pairs: above the size below which nothing is remembered


@pytest.fixture(autouse=True)
def _fresh():
    sa_hf.reset_mask_counts()
    yield
    sa_hf.reset_mask_counts()


def _build(fn, am=None, **kw):
    kw = _builder_kwargs(fn, am, q_length=kw.pop("q_length", L), kv_length=kw.pop("kv_length", L), **kw)
    built = sa_hf.build_mask(**kw)
    want = _dense_reference(**kw)  # (B, 1, Lq, Lk) transformers' own mask
    got = _allowed(built, 2)
    # rows with no allowed key: selfattn gives probability 0 everywhere (nothing to compare)
    assert torch.equal(got, want.expand_as(got) & want.any(-1, keepdim=True)), built
    return built


def test_a_new_sliding_window_closure_is_remembered():
    import transformers.masking_utils as tm

    a = _build(tm.sliding_window_causal_mask_function(16), local_size=16)
    b = _build(tm.sliding_window_causal_mask_function(16), local_size=16)  # a new object, as every forward
    assert a.kind == b.kind == "sliding_window" and a.window == b.window == (15, 0)
    assert sa_hf.recognition_counts() == {"evaluated": 1, "remembered": 1}
    assert sa_hf.mask_counts() == {"sliding_window": 2}  # every mask is still counted


def test_a_different_captured_window_is_not_confused():
    import transformers.masking_utils as tm

    a = _build(tm.sliding_window_causal_mask_function(16), local_size=16)
    # the same code capturing another window, with a local_size that does not describe it
    b = _build(tm.sliding_window_causal_mask_function(9), local_size=16)
    assert a.kind == "sliding_window" and b.kind == "function"  # a window local_size does not describe
    assert sa_hf.recognition_counts() == {"evaluated": 2}


def test_captured_tensors_count_by_value():
    import transformers.masking_utils as tm

    a = _build(tm.chunked_causal_mask_function(32, torch.tensor([3, 0])))
    b = _build(tm.chunked_causal_mask_function(32, torch.tensor([3, 0])))  # equal values, another tensor
    c = _build(tm.chunked_causal_mask_function(32, torch.tensor([5, 0])))  # other values
    assert a.kind == b.kind == c.kind == "packed"
    assert sa_hf.recognition_counts() == {"evaluated": 2, "remembered": 1}


def test_positions_are_part_of_what_is_remembered():
    import transformers.masking_utils as tm

    _build(tm.sliding_window_causal_mask_function(16), local_size=16)
    # the same function at other positions (a chunk of queries after 40 cached tokens)
    d = _build(tm.sliding_window_causal_mask_function(16), local_size=16, q_length=L - 40, kv_length=L, q_offset=40)
    assert d.kind == "sliding_window"
    assert sa_hf.recognition_counts() == {"evaluated": 2}


def test_the_same_sizes_at_other_positions_are_recognised_again():
    def from_30(b, h, q, kv):  # causal, and keys before position 30 hidden
        return (kv <= q) & (kv >= 30)

    # queries and keys from position 30 on: every key is at 30 or later, so this is plain causal
    assert _build(from_30, q_offset=30, kv_offset=30).kind == "causal"
    # the same sizes from position 0: keys 0..29 hidden, not causal (a remembered "causal" would be wrong)
    assert _build(from_30).kind == "function"
    assert sa_hf.recognition_counts() == {"evaluated": 2}


def test_padding_comes_from_the_attention_mask_not_the_memory():
    import transformers.masking_utils as tm

    am = torch.ones(2, L, dtype=torch.bool)
    am[0, :7] = False  # left padding
    a = _build(tm.and_masks(tm.causal_mask_function), am)
    am2 = torch.ones(2, L, dtype=torch.bool)
    am2[1, L - 5:] = False  # right padding, other row
    b = _build(tm.and_masks(tm.causal_mask_function), am2)
    assert a.kind == b.kind == "causal"
    assert sa_hf.recognition_counts() == {"evaluated": 1, "remembered": 1}


def test_function_and_dense_routes_are_remembered_and_still_counted():
    def fn(b, h, q, kv):  # any index-based predicate: the tile-wise function mask
        return (kv % 3 == 0) | (kv == q)

    assert _build(fn).kind == "function" and _build(fn).kind == "function"
    assert sa_hf.mask_counts() == {"function": 2}
    assert sa_hf.recognition_counts() == {"evaluated": 1, "remembered": 1}

    def scalar(b, h, q, kv):  # works only under transformers' vmap: transformers' dense mask, counted each time
        return (kv - q).reshape(()) <= 0

    sa_hf.reset_mask_counts()
    kw = _builder_kwargs(scalar, use_vmap=True, q_length=L, kv_length=L)
    for _ in range(2):
        built = sa_hf.build_mask(**kw)
        assert built.kind == "dense"
    assert sa_hf.mask_counts() == {"dense": 2}
    assert torch.equal(_allowed(built, 2)[0, 0], torch.ones(L, L, dtype=torch.bool).tril())


def test_a_function_capturing_something_unknown_is_evaluated_every_time():
    state = {"shift": 0}  # a dict can change between calls: nothing about it can be remembered

    def fn(b, h, q, kv):
        return kv <= q + state["shift"]

    a = _build(fn)
    state["shift"] = 2
    b = _build(fn)
    assert a.kind == "causal" and b.kind == "function"
    assert sa_hf.recognition_counts() == {"evaluated": 2}


def test_small_masks_are_not_remembered():
    import transformers.masking_utils as tm

    for _ in range(2):
        assert _build(tm.sliding_window_causal_mask_function(4), local_size=4, q_length=9, kv_length=9).kind == "sliding_window"
    assert sa_hf.recognition_counts() == {"evaluated": 2}
