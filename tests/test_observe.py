"""functional.observe: callbacks see every attention() call in their context, with statistics."""

import torch

import selfattn
from selfattn import reference
from selfattn.functional import observe

from tolerance import assert_close


def test_observer_sees_calls_with_stats_and_callers_get_what_they_asked_for():
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    seen = []
    with observe(lambda *call: seen.append(call)):
        out = selfattn.attention(q, k, v, causal=True)
    assert isinstance(out, torch.Tensor)  # no stats forced on the caller
    assert len(seen) == 1
    query, key, value, opts, observed_out, stats = seen[0]
    assert query is q and key is k and value is v and opts["causal"] is True
    assert torch.equal(observed_out, out)
    ref64, st64 = reference.attention(q, k, v, mask=selfattn.masks.causal())
    _, st32 = reference.attention(q, k, v, mask=selfattn.masks.causal(), upcast=False)
    assert_close("observed lse", stats.lse, st64.lse, st32.lse)
    selfattn.attention(q, k, v)
    assert len(seen) == 1  # outside the context nothing is recorded
