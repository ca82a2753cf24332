"""The update order of rows at the actor update (pure)."""

from __future__ import annotations

import pytest

from dyjr_verl.replay.layout import update_order


@pytest.mark.parametrize("dp,mb", [(1, 1), (1, 3), (2, 2), (4, 1)])
def test_each_rank_and_minibatch_gets_its_fresh_then_its_replayed_rows(dp, mb):
    fresh, replay = 8 * dp * mb, 2 * dp * mb
    order = update_order(fresh, replay, dp=dp, num_minibatches=mb)
    assert sorted(i for r, i in order if not r) == list(range(fresh))  # every row exactly once
    assert sorted(i for r, i in order if r) == list(range(replay))
    per = (fresh + replay) // (dp * mb)
    for c in range(dp * mb):  # verl's contiguous split: rank chunks, then mini-batches inside them
        part = order[c * per : (c + 1) * per]
        assert [r for r, _ in part] == [False] * 8 + [True] * 2
        rank = c // mb
        assert all(fresh // dp * rank <= i < fresh // dp * (rank + 1) for r, i in part if not r)


def test_rows_that_do_not_split_evenly_are_refused():
    with pytest.raises(ValueError, match="equal mini-batches"):
        update_order(8, 3, dp=2, num_minibatches=2)
