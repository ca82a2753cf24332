"""Time-Sensitive Dynamic Buffer: FIFO by age, capacity, admission, adaptive window, sampling,
state round trip, bounded cost."""

from __future__ import annotations

import pickle
import time

import numpy as np
import pytest
import torch

from dyjr_verl.methods.dyjr.config import BufferConfig
from dyjr_verl.replay.config import ConfigError
from dyjr_verl.methods.dyjr.buffer import TimeSensitiveBuffer, Trajectory


def traj(step: int, i: int, reward: float = 1.0, n: int = 3, **tags) -> Trajectory:
    return Trajectory(
        prompt_ids=np.arange(2),
        response_ids=np.arange(n) + i,
        response_mask=np.ones(n, dtype=np.int64),
        logprobs=-np.linspace(0.1, 1.0, n, dtype=np.float32),
        reward=reward,
        uid=f"s{step}_{i}",
        step=step,
        tags=dict(tags),
    )


def uids(items) -> list[str]:
    return [t.uid for t in items]


def buf(**kw) -> TimeSensitiveBuffer:
    kw.setdefault("admit", "all")
    return TimeSensitiveBuffer(BufferConfig(**kw))


# -- trajectories ----------------------------------------------------------------------------


def test_trajectory_accepts_torch_and_converts_to_numpy():
    t = Trajectory(
        prompt_ids=torch.tensor([1, 2]),
        response_ids=torch.tensor([3, 4, 5]),
        response_mask=torch.tensor([1, 1, 0]),
        logprobs=torch.tensor([-0.5, -1.0, -2.0], dtype=torch.bfloat16),
        reward=1,
        uid="a",
        step=0,
    )
    assert isinstance(t.logprobs, np.ndarray) and t.logprobs.dtype == np.float32
    assert t.response_ids.tolist() == [3, 4, 5] and t.num_tokens == 2 and isinstance(t.reward, float)
    with pytest.raises(ValueError, match="same length"):
        Trajectory([1], [1, 2], [1, 1], [-0.1], 1.0, "b", 0)
    with pytest.raises(ValueError, match="1-D"):
        Trajectory([1], [[1, 2]], [[1, 1]], [[-0.1, -0.2]], 1.0, "c", 0)


# -- FIFO by age -----------------------------------------------------------------------------


def test_age_window_semantics_alive_iff_age_le_window():
    b = buf(max_age=2)
    b.push(0, [traj(0, i) for i in range(2)])
    b.push(1, [traj(1, i) for i in range(2)])
    b.advance(2)  # ages 2 and 1: both alive
    assert uids(b) == ["s0_0", "s0_1", "s1_0", "s1_1"]
    b.advance(3)  # step-0 entries have age 3 > W = 2
    assert uids(b) == ["s1_0", "s1_1"]
    assert b.metrics()["buffer/evicted_age"] == 2
    b.advance(10)
    assert len(b) == 0 and b.metrics()["buffer/size"] == 0


def test_max_age_one_replays_only_the_previous_step():
    b = buf(max_age=1)
    for step in range(5):
        b.advance(step)
        if step > 0:
            assert {t.step for t in b.sample(100, 0)} == {step - 1}
        b.push(step, [traj(step, i) for i in range(3)])


def test_fifo_order_and_steps_must_not_go_backwards():
    b = buf(max_age=5)
    b.push(0, [traj(0, 0)])
    b.push(0, [traj(0, 1)])  # same step appends to the same block
    b.push(2, [traj(2, 0)])
    assert uids(b) == ["s0_0", "s0_1", "s2_0"]
    with pytest.raises(ValueError, match="backwards"):
        b.push(1, [traj(1, 0)])
    with pytest.raises(ValueError, match="backwards"):
        b.advance(1)


# -- capacity --------------------------------------------------------------------------------


def test_capacity_evicts_from_the_oldest_step_first():
    b = buf(max_age=10, capacity=5)
    b.push(0, [traj(0, i) for i in range(3)])
    b.push(1, [traj(1, i) for i in range(3)], rng=np.random.default_rng(1))
    kept = uids(b)
    assert len(kept) == 5 and kept[2:] == ["s1_0", "s1_1", "s1_2"] and set(kept[:2]) < {"s0_0", "s0_1", "s0_2"}
    m = b.metrics()
    assert m["buffer/evicted_capacity"] == 1 and m["buffer/size"] == 5 and m["buffer/capacity"] == 5
    b.push(2, [traj(2, i) for i in range(7)], rng=np.random.default_rng(1))  # larger than the capacity
    kept = uids(b)
    assert len(kept) == 5 and set(kept) < {f"s2_{i}" for i in range(7)} and kept == sorted(kept)  # push order


def test_overflow_drops_a_seeded_random_subset_not_the_first_pushed():
    """Issue 14: a step's rows arrive in verl's _balance_batch order (by rank), so keeping the
    last-pushed rows keeps a non-random subset; overflow draws what it drops from the caller's rng."""
    pushed = [traj(1, i) for i in range(40)]

    def kept(seed: int) -> list[str]:
        b = buf(max_age=4, capacity=10)
        b.push(1, pushed, rng=np.random.default_rng(seed))
        return uids(b)

    first = kept(7)
    assert first == kept(7) and first != kept(8)  # reproducible, and the seed matters
    assert first != uids(pushed[-10:]) and first != uids(pushed[:10])
    assert first == sorted(first, key=lambda u: int(u.split("_")[1]))  # kept rows stay in push order
    counts = np.zeros(40)
    for seed in range(400):  # every position is kept equally often: 100 expected, sd ~ 8.7
        for u in kept(seed):
            counts[int(u.split("_")[1])] += 1
    assert counts.min() > 60 and counts.max() < 140


def test_capacity_null_is_max_age_steps_of_rollouts_so_the_window_binds():
    """Issue 14: the default capacity is derived from the rollouts per step (plan), so every age up
    to max_age is stored; a capacity of one step's rollouts would keep age 1 only."""
    assert BufferConfig().capacity is None
    assert TimeSensitiveBuffer(BufferConfig(max_age=3), rows_per_step=4).capacity == 12
    assert TimeSensitiveBuffer(BufferConfig(max_age=3, frozen=True), rows_per_step=4).capacity == 4
    assert TimeSensitiveBuffer(BufferConfig(max_age=3, capacity=5), rows_per_step=4).capacity == 5
    assert TimeSensitiveBuffer(BufferConfig(max_age=3)).capacity is None  # unknown: ages alone bound it
    assert "buffer/capacity" not in TimeSensitiveBuffer(BufferConfig(max_age=3)).metrics()

    def ages_at_sampling(b: TimeSensitiveBuffer) -> list[int]:
        for step in range(6):
            b.advance(step)
            ages = sorted(set(b.ages().tolist()))
            b.push(step, [traj(step, i) for i in range(4)])
        return ages

    auto = TimeSensitiveBuffer(BufferConfig(max_age=3, admit="all"), rows_per_step=4)
    assert ages_at_sampling(auto) == [1, 2, 3] and len(auto) == 12
    one_step = TimeSensitiveBuffer(BufferConfig(max_age=3, capacity=4, admit="all"))
    assert ages_at_sampling(one_step) == [1]  # max_age has no effect


# -- admission -------------------------------------------------------------------------------


def test_admission_modes():
    items = [traj(0, 0, reward=1.0), traj(0, 1, reward=0.0), traj(0, 2, reward=0.5), traj(0, 3, reward=-1.0)]
    b = TimeSensitiveBuffer(BufferConfig(admit="correct"))  # reward > 0.5
    assert b.push(0, items) == {"admitted": 1, "rejected": 3}
    b = TimeSensitiveBuffer(BufferConfig(admit="correct", correct_threshold=-0.5))
    assert uids(b.sample(10, 0)) == [] and b.push(0, items)["admitted"] == 3
    b = TimeSensitiveBuffer(BufferConfig(admit="all"))
    assert b.push(0, items) == {"admitted": 4, "rejected": 0}
    b = TimeSensitiveBuffer(BufferConfig(admit="threshold", admit_threshold=0.5))  # reward >= 0.5
    assert b.push(0, items) == {"admitted": 2, "rejected": 2}
    assert sorted(uids(b)) == ["s0_0", "s0_2"]
    b = TimeSensitiveBuffer(BufferConfig(admit="correct"))
    assert b.push(0, [traj(0, 9, reward=float("nan"))]) == {"admitted": 0, "rejected": 1}
    m = b.metrics()
    assert m["buffer/rejected"] == 1 and m["buffer/admitted"] == 0


# -- adaptive window -------------------------------------------------------------------------


def test_adaptive_window_shrinks_on_drift_and_grows_back():
    b = buf(max_age=4, min_age=2, window="adaptive", drift_high=0.3, drift_low=0.1, grow_patience=2)
    for s in range(5):
        b.push(s, [traj(s, 0)])
    assert b.window == 4 and len(b) == 5  # ages 0..4
    assert b.report_drift(0.5) == 3  # shrink and evict the age-4 entry at once
    assert [t.step for t in b] == [1, 2, 3, 4]
    assert b.report_drift(0.9) == 2
    assert b.report_drift(0.9) == 2  # floor at min_age
    assert [t.step for t in b] == [2, 3, 4]
    assert b.report_drift(0.2) == 2  # in the dead band: unchanged, resets the calm streak
    assert b.report_drift(0.05) == 2  # first calm report
    assert b.report_drift(0.2) == 2  # streak broken
    assert b.report_drift(0.05) == 2
    assert b.report_drift(0.05) == 3  # two calm reports in a row: grow
    assert b.report_drift(None) == 3 and b.report_drift(float("nan")) == 3
    for _ in range(10):
        b.report_drift(0.0)
    assert b.window == 4  # capped at max_age
    assert [t.step for t in b] == [2, 3, 4]  # growing never resurrects evicted entries
    assert b.metrics()["buffer/window"] == 4


def test_fixed_window_ignores_drift():
    b = buf(max_age=3, window="fixed")
    assert b.report_drift(10.0) == 3 and b.window == 3
    assert b.metrics()["buffer/drift"] == 10.0


# -- sampling --------------------------------------------------------------------------------


def test_sample_without_replacement_and_deterministic():
    b = buf(max_age=3, capacity=100)
    for s in range(3):
        b.push(s, [traj(s, i) for i in range(10)])
    got = b.sample(15, np.random.default_rng(7))
    assert len(got) == 15 and len(set(uids(got))) == 15
    assert uids(got) == uids(b.sample(15, np.random.default_rng(7)))
    assert uids(b.sample(15, 7)) == uids(got)  # int seed = default_rng(seed)
    everything = b.sample(1000, 1)
    assert sorted(uids(everything)) == sorted(uids(b)) and len(everything) == 30
    assert b.sample(0, 1) == [] and buf().sample(5, 1) == []


def test_sample_is_uniform_over_alive_entries():
    b = buf(max_age=2, capacity=100)
    b.push(0, [traj(0, i) for i in range(2)])  # unequal block sizes
    b.push(1, [traj(1, i) for i in range(6)])
    rng = np.random.default_rng(0)
    counts: dict[str, int] = {}
    for _ in range(4000):
        for t in b.sample(2, rng):
            counts[t.uid] = counts.get(t.uid, 0) + 1
    freq = np.array(list(counts.values())) / 4000
    assert len(counts) == 8 and np.all(np.abs(freq - 2 / 8) < 0.03)


# -- metrics ---------------------------------------------------------------------------------


def test_metrics_ages_and_per_step_counters():
    b = buf(max_age=4, capacity=10)
    b.push(0, [traj(0, i) for i in range(2)])
    b.push(2, [traj(2, i) for i in range(2)])
    b.advance(3)
    m = b.metrics()
    assert m["buffer/size"] == 4 and m["buffer/age_mean"] == 2.0 and m["buffer/age_max"] == 3.0
    assert m["buffer/admitted"] == 0  # counters reset at the new step
    assert m["buffer/admitted_total"] == 4 and m["buffer/window"] == 4


# -- state -----------------------------------------------------------------------------------


def test_state_dict_round_trip_is_exact():
    cfg = BufferConfig(max_age=3, capacity=7, window="adaptive", min_age=1, admit="all")
    b = TimeSensitiveBuffer(cfg)
    for s in range(5):
        b.push(s, [traj(s, i, reward=float(i), extra=np.arange(i), tag=f"x{i}") for i in range(3)])
    b.report_drift(1.0)
    b.report_drift(0.01)
    state = pickle.loads(pickle.dumps(b.state_dict()))
    snapshot = uids(b)
    c = TimeSensitiveBuffer(cfg)
    c.load_state_dict(state)
    assert list(c) == list(b)
    assert c.window == b.window and c.step == b.step and c.metrics() == b.metrics()
    assert uids(c.sample(5, np.random.default_rng(3))) == uids(b.sample(5, np.random.default_rng(3)))
    # continuing after the round trip behaves identically
    for x in (b, c):
        x.report_drift(0.01)
        x.push(5, [traj(5, 0)])
    assert list(c) == list(b) and c.metrics() == b.metrics() and c.state_dict()["calm"] == b.state_dict()["calm"]
    # a smaller capacity on resume just evicts from the oldest steps (a seeded subset of the last one)
    d = TimeSensitiveBuffer(BufferConfig(max_age=3, capacity=2, admit="all"))
    d.load_state_dict(state)
    assert len(d) == 2 and set(uids(d)) < set(snapshot[-3:])


def test_invalid_config_rejected():
    with pytest.raises(ConfigError, match="dyjr.buffer.max_age must be >= 1"):
        TimeSensitiveBuffer(BufferConfig(max_age=0))


# -- cost ------------------------------------------------------------------------------------


def test_many_steps_stay_bounded_and_fast():
    b = buf(max_age=3, capacity=50)
    one = [traj(0, i) for i in range(20)]
    t0 = time.perf_counter()
    for s in range(5000):
        b.push(s, [Trajectory(**{**t.to_dict(), "step": s}) for t in one[:20]])
        assert len(b) <= 50
    elapsed = time.perf_counter() - t0
    assert len(b._blocks) <= 4  # noqa: SLF001 - at most W + 1 step blocks
    assert elapsed < 20.0
    # per-push cost does not grow with the number of steps seen
    t0 = time.perf_counter()
    for s in range(5000, 5500):
        b.push(s, one)
    late = (time.perf_counter() - t0) / 500
    t0 = time.perf_counter()
    c = buf(max_age=3, capacity=50)
    for s in range(500):
        c.push(s, one)
    early = (time.perf_counter() - t0) / 500
    assert late < 5 * early + 1e-3
    m = b.metrics()
    assert m["buffer/size"] == 50 and m["buffer/evicted_total"] == m["buffer/admitted_total"] - 50
