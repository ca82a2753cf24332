"""Ex-GRPO: bucket weights and weighted bucket sampling, the online pool (admission bounds,
deduplication by tokens, latest-k buckets, retirement), its checkpoint state, the ``exgrpo:`` node,
and its experience logic: the prompt mix, trajectory choice and pool update (plain objects: no
Ray, no trainer)."""

from __future__ import annotations

import math
import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tensordict import TensorDict

from dyjr_verl.methods.exgrpo.config import ExGRPOConfig
from dyjr_verl.replay.config import ConfigError
from dyjr_verl.methods.exgrpo.pool import (
    ExperiencePool,
    PoolTrajectory,
    bucket_probabilities,
    bucket_weight,
    draw_bucket_counts,
    pool_state_digest,
)
from dyjr_verl.replay.questions import question_key

K = 8


def traj(*ids: int, score: float = 1.0, step: int = 1) -> PoolTrajectory:
    return PoolTrajectory(np.array(ids), -0.1 * np.arange(1, len(ids) + 1), score, step)


def row(q: str) -> dict:
    return {"raw_prompt": [{"role": "user", "content": q}], "data_source": "s", "dummy_tensor": torch.zeros(1), "index": 0}


# -- bucket weights and counts -----------------------------------------------------------------------


def test_normal_weight_is_the_gaussian_around_half_k():
    assert bucket_weight(4, 8) == pytest.approx(1 / math.sqrt(2 * math.pi))
    assert bucket_weight(3, 8) == pytest.approx(math.exp(-0.5) / math.sqrt(2 * math.pi))
    assert bucket_weight(2, 8, sigma=2.0) == pytest.approx(math.exp(-0.5) / math.sqrt(8 * math.pi))
    assert bucket_weight(2, 8, "linear") == 0.25 and bucket_weight(2, 8, "uniform") == 1.0
    with pytest.raises(ValueError):
        bucket_weight(1, 8, "cubic")


def test_probabilities_are_normalised_over_non_empty_buckets_only():
    p = bucket_probabilities({1: 3, 4: 2, 6: 0}, K)
    assert set(p) == {1, 4} and sum(p.values()) == pytest.approx(1.0)
    assert p[4] / p[1] == pytest.approx(math.exp(4.5))  # N(4;4,1) / N(1;4,1)
    assert bucket_probabilities({0: 2}, K, "linear") == {0: 1.0}  # all-zero weights: uniform
    assert bucket_probabilities({}, K) == {}


def test_counts_are_capped_and_the_excess_redistributed():
    rng = np.random.default_rng(0)
    sizes = {4: 1, 1: 10}
    probs = bucket_probabilities(sizes, K)  # bucket 4 gets ~99% of the draws but holds one question
    for _ in range(20):
        counts = draw_bucket_counts(sizes, probs, 5, rng)
        assert counts == {4: 1, 1: 4}
    assert sum(draw_bucket_counts({1: 2, 2: 1}, {1: 0.5, 2: 0.5}, 10, rng).values()) == 3  # capped by supply
    assert draw_bucket_counts({}, {}, 3, rng) == {}


def test_counts_follow_the_weights_when_buckets_are_large():
    rng = np.random.default_rng(1)
    sizes = {2: 1000, 4: 1000, 6: 1000}
    probs = bucket_probabilities(sizes, K)
    total = Counter()
    for _ in range(200):
        total.update(draw_bucket_counts(sizes, probs, 20, rng))
    share = {k: v / 4000 for k, v in total.items()}
    for k in sizes:
        assert share[k] == pytest.approx(probs[k], abs=0.03)


# -- the pool ------------------------------------------------------------------------------------------


def test_admission_bounds_store_correct_trajectories_of_partially_solved_questions():
    pool = ExperiencePool(K)
    assert (pool.lbound, pool.rbound) == (0, K - 1)
    assert pool.update_group("q", num_correct=0, group_size=K, correct=[], prompt_row=row("q")) == "ignored"
    assert len(pool) == 0
    assert pool.update_group("q", num_correct=2, group_size=K, correct=[traj(1, 2), traj(3)], prompt_row=row("q")) == "stored"
    assert len(pool) == 1 and pool.num_trajectories == 2 and pool.bucket_of("q") == 2
    assert pool.update_group("q", num_correct=K - 1, group_size=K, correct=[traj(4)]) == "stored"
    assert pool.bucket_sizes() == {K - 1: 1}  # the question moves to its latest k
    narrow = ExperiencePool(K, lbound=2, rbound=5)
    assert narrow.update_group("q", num_correct=2, group_size=K, correct=[traj(1)], prompt_row=row("q")) == "ignored"
    assert narrow.update_group("q", num_correct=6, group_size=K, correct=[traj(1)], prompt_row=row("q")) == "ignored"
    assert narrow.update_group("q", num_correct=5, group_size=K, correct=[traj(1)], prompt_row=row("q")) == "stored"


def test_out_of_bounds_k_leaves_a_pooled_question_where_it_was():
    pool = ExperiencePool(K)
    pool.update_group("q", num_correct=3, group_size=K, correct=[traj(1)], prompt_row=row("q"))
    assert pool.update_group("q", num_correct=0, group_size=K, correct=[]) == "ignored"
    assert pool.bucket_of("q") == 3 and pool.num_trajectories == 1


def test_retirement_removes_a_solved_question_for_good():
    pool = ExperiencePool(K)
    pool.update_group("q", num_correct=3, group_size=K, correct=[traj(1)], prompt_row=row("q"))
    assert pool.update_group("q", num_correct=K, group_size=K, correct=[traj(2)] * K) == "retired"
    assert "q" not in pool and pool.is_retired("q") and pool.bucket_sizes() == {}
    assert pool.update_group("q", num_correct=2, group_size=K, correct=[traj(3)], prompt_row=row("q")) == "ignored"
    assert len(pool) == 0 and pool.sample_questions(4, np.random.default_rng(0)) == []
    # a question solved at first sight is retired without ever entering the pool
    assert pool.update_group("r", num_correct=K, group_size=K, correct=[]) == "retired"
    assert pool.retired == {"q", "r"}


def test_deduplication_is_by_response_tokens():
    pool = ExperiencePool(K)
    pool.begin_step()
    pool.update_group("q", num_correct=3, group_size=K, correct=[traj(1, 2), traj(1, 2), traj(1, 2, 3)], prompt_row=row("q"))
    assert pool.num_trajectories == 2
    pool.update_group("q", num_correct=2, group_size=K, correct=[traj(1, 2, step=5), traj(7)])
    assert [t.response_ids.tolist() for t in pool.trajectories("q")] == [[1, 2], [1, 2, 3], [7]]
    m = pool.metrics()
    assert m["pool/duplicates"] == 2.0 and m["pool/stored"] == 3.0


def test_incomplete_groups_change_nothing_and_new_questions_need_their_prompt():
    pool = ExperiencePool(K)
    assert pool.update_group("q", num_correct=2, group_size=K - 1, correct=[traj(1)], prompt_row=row("q")) == "incomplete"
    assert len(pool) == 0
    with pytest.raises(ValueError, match="prompt row"):
        pool.update_group("q", num_correct=2, group_size=K, correct=[traj(1)])


def test_max_per_question_drops_the_oldest():
    pool = ExperiencePool(K, max_per_question=2)
    pool.update_group("q", num_correct=3, group_size=K, correct=[traj(1), traj(2), traj(3)], prompt_row=row("q"))
    assert [t.response_ids.tolist() for t in pool.trajectories("q")] == [[2], [3]]
    pool.update_group("q", num_correct=3, group_size=K, correct=[traj(1)])  # evicted tokens may return
    assert [t.response_ids.tolist() for t in pool.trajectories("q")] == [[3], [1]]


def test_sampling_prefers_medium_difficulty_and_never_repeats_a_question():
    pool = ExperiencePool(K)
    for i in range(20):
        k = 1 if i < 10 else 4
        pool.update_group(f"q{i}", num_correct=k, group_size=K, correct=[traj(i)], prompt_row=row(f"q{i}"))
    rng = np.random.default_rng(0)
    picked = Counter()
    for _ in range(300):
        got = pool.sample_questions(4, rng)
        assert len(got) == len(set(got)) == 4
        picked.update(pool.bucket_of(q) for q in got)
    assert picked[4] > 0.97 * sum(picked.values())  # N(4;4,1) / N(1;4,1) = e^4.5
    assert len(pool.sample_questions(50, rng)) == 20  # capped by the pool


def test_metrics_report_size_retirement_and_the_bucket_histogram():
    pool = ExperiencePool(4)
    pool.begin_step()
    pool.update_group("a", num_correct=1, group_size=4, correct=[traj(1)], prompt_row=row("a"))
    pool.update_group("b", num_correct=3, group_size=4, correct=[traj(1), traj(2), traj(3)], prompt_row=row("b"))
    pool.update_group("c", num_correct=4, group_size=4, correct=[])
    m = pool.metrics(prefix="exgrpo/pool/")
    assert m["exgrpo/pool/questions"] == 2 and m["exgrpo/pool/trajectories"] == 4
    assert m["exgrpo/pool/retired"] == 1 and m["exgrpo/pool/retired_total"] == 1 and m["exgrpo/pool/new_questions"] == 2
    assert {k: v for k, v in m.items() if "/bucket/" in k} == {
        "exgrpo/pool/bucket/1": 1.0, "exgrpo/pool/bucket/2": 0.0, "exgrpo/pool/bucket/3": 1.0}


def test_state_round_trip_is_exact():
    pool = ExperiencePool(K)
    pool.update_group("a", num_correct=2, group_size=K, correct=[traj(1, 2), traj(3)], prompt_row=row("a"))
    pool.update_group("b", num_correct=5, group_size=K, correct=[traj(4)], prompt_row=row("b"))
    pool.update_group("c", num_correct=K, group_size=K, correct=[])
    state = pickle.loads(pickle.dumps(pool.state_dict()))
    again = ExperiencePool(K)
    again.load_state_dict(state)
    assert pool_state_digest(again.state_dict()) == pool_state_digest(pool.state_dict())
    assert again.bucket_sizes() == pool.bucket_sizes() and again.retired == pool.retired
    again.update_group("a", num_correct=3, group_size=K, correct=[traj(1, 2)])  # dedup state restored too
    assert again.num_trajectories == 3
    assert pool_state_digest(again.state_dict()) != pool_state_digest(pool.state_dict())
    with pytest.raises(ValueError, match="K=8"):
        ExperiencePool(4).load_state_dict(state)


def test_pool_constructor_validates():
    with pytest.raises(ValueError):
        ExperiencePool(1)
    with pytest.raises(ValueError):
        ExperiencePool(K, lbound=3, rbound=3)
    with pytest.raises(ValueError):
        ExperiencePool(K, rbound=K)
    with pytest.raises(ValueError):
        PoolTrajectory(np.arange(3), np.zeros(2), 1.0, 0)


# -- config -------------------------------------------------------------------------------------------


def test_exgrpo_defaults_are_the_papers():
    cfg = ExGRPOConfig.from_dict({})
    assert cfg.replay.size == 0.5 and cfg.start_accuracy == 0.35
    assert (cfg.pool.lbound, cfg.pool.rbound, cfg.pool.logprobs) == (0, None, "old")
    assert (cfg.select.weighting, cfg.select.sigma, cfg.select.trajectory) == ("normal", 1.0, "min_entropy")
    assert (cfg.loss.beta, cfg.loss.coef, cfg.loss.normalizer) == (0.1, 1.0, "joint")
    assert cfg.num_experience_questions(128) == 64 and cfg.num_experience_questions(7) == 3
    assert ExGRPOConfig.from_dict({"replay": {"size": 3}}).num_experience_questions(8) == 3


def test_exgrpo_errors_are_one_line_each_with_the_key():
    with pytest.raises(ConfigError) as info:
        ExGRPOConfig.from_dict({
            "start_accuracy": 1.5, "pool": {"lbound": 4, "rbound": 2}, "select": {"weighting": "gaussian", "sigma": 0},
            "loss": {"beta": -1}, "replay": {"size": 2.0},
        })
    assert info.value.errors == [
        "exgrpo.replay.size as a fraction must be in (0, 1], got 2.0",
        "exgrpo.pool.lbound must be < exgrpo.pool.rbound (2), got 4",
        "exgrpo.select.weighting must be one of 'normal', 'linear', 'sqrt', 'uniform', got 'gaussian'",
        "exgrpo.select.sigma must be > 0, got 0.0",
        "exgrpo.loss.beta must be > 0, got -1.0",
        "exgrpo.start_accuracy must be <= 1, got 1.5",
    ]


def test_exgrpo_checks_against_verl_config():
    def cfg(n, **algo):
        return OmegaConf.create({"actor_rollout_ref": {"rollout": {"n": n}}, "algorithm": {"adv_estimator": "grpo", **algo}})

    assert ExGRPOConfig().verl_problems(cfg(8)) == []
    assert "rollout.n >= 2" in ExGRPOConfig().verl_problems(cfg(1))[0]
    node = ExGRPOConfig.from_dict({"pool": {"rbound": 7}})
    assert "exgrpo.pool.rbound must be <= rollout.n - 1 (3)" in node.verl_problems(cfg(4))[0]
    assert "critic-free" in ExGRPOConfig().verl_problems(cfg(8, adv_estimator="gae"))[0]


def test_loss_spec_is_the_shaped_pg_term():
    from dyjr_verl.methods.exgrpo.loss import exgrpo_loss_spec

    spec = exgrpo_loss_spec(ExGRPOConfig.from_dict({"loss": {"beta": 0.2}}))
    assert (spec.kind, spec.beta, spec.resolved_coef, spec.resolved_normalizer) == ("shaped_pg", 0.2, 1.0, "joint")


# -- the trainer, without Ray ------------------------------------------------------------------------


def gen_batch(questions: list[str]) -> TensorDict:
    from verl.utils import tensordict_utils as tu
    from verl.utils.dataset.rl_dataset import collate_fn

    rows = [{**row(q), "uid": f"uid-{q}"} for q in questions]
    return tu.get_tensordict(collate_fn(rows))


def test_gen_batch_rows_round_trip_with_per_prompt_rollout_counts():
    from dyjr_verl.methods.exgrpo.experience import ROLLOUT_N_KEY, gen_batch_rows, rows_to_gen_batch

    rows = gen_batch_rows(gen_batch(["a", "b"]))
    assert [r["uid"] for r in rows] == ["uid-a", "uid-b"] and rows[0]["raw_prompt"][0]["content"] == "a"
    rows[0][ROLLOUT_N_KEY], rows[1][ROLLOUT_N_KEY] = 8, 7
    td = rows_to_gen_batch(rows, global_steps=3)
    assert td.get(ROLLOUT_N_KEY)[1].data == 7  # what verl's agent loop pops per prompt
    assert td.get("global_steps").data == 3 and len(td) == 2


class Stub:
    """Ex-GRPO's experience logic with a pool and a scripted dataloader (no Ray, no trainer)."""

    @staticmethod
    def make(stream: list[str], *, batch: int = 4, n: int = 4, **exgrpo):
        from dyjr_verl.methods.exgrpo.experience import Experience

        cfg = ExGRPOConfig.from_dict(exgrpo)
        pool = ExperiencePool(n, lbound=cfg.pool.lbound, rbound=cfg.pool.rbound,
                              max_per_question=cfg.pool.max_per_question, weighting=cfg.select.weighting,
                              sigma=cfg.select.sigma)
        t = Experience(cfg, n, pool, np.random.default_rng(0))
        chunks = [stream[i : i + batch] for i in range(0, len(stream), batch)]
        it = iter(chunks)

        def next_prompts(num_prompts=None):
            return t.next_prompts(num_prompts or batch, refill=num_prompts is not None,
                                  fetch=lambda: gen_batch(next(it)), max_fetches=len(chunks), global_steps=1)

        t.next_batch = next_prompts
        return t


def q_key(q: str) -> str:
    return question_key(row(q)["raw_prompt"], "s")


def test_prompt_mix_before_and_after_activation():
    from dyjr_verl.methods.exgrpo.experience import ROLLOUT_N_KEY, gen_batch_rows

    t = Stub.make([f"f{i}" for i in range(12)], batch=4, n=4)
    for q in ("e1", "e2", "e3"):
        t.pool.update_group(q_key(q), num_correct=2, group_size=4, correct=[traj(1)], prompt_row=row(q))
    first = gen_batch_rows(t.next_batch())
    assert [r["raw_prompt"][0]["content"] for r in first] == ["f0", "f1", "f2", "f3"]  # not active yet
    assert ROLLOUT_N_KEY not in first[0]
    t.active = True
    mixed = gen_batch_rows(t.next_batch())
    contents = [r["raw_prompt"][0]["content"] for r in mixed]
    assert contents[:2] == ["f4", "f5"] and set(contents[2:]) <= {"e1", "e2", "e3"}  # rho = 0.5 of 4 prompts
    assert [r[ROLLOUT_N_KEY] for r in mixed] == [4, 4, 3, 3]  # K-1 fresh + the replayed one
    assert len({r["uid"] for r in mixed}) == 4 and all(r["uid"] in t.issued for r in mixed)
    assert {t.experience[r["uid"]] for r in mixed[2:]} <= {q_key("e1"), q_key("e2"), q_key("e3")}
    # only the fresh part is read from the dataloader: f6, f7 wait for the next batch
    assert [r["raw_prompt"][0]["content"] for r in t.carry] == ["f6", "f7"]
    refill = gen_batch_rows(t.next_batch(2))  # verl's refill of failed groups stays fresh
    assert [r["raw_prompt"][0]["content"] for r in refill] == ["f6", "f7"]


def test_retired_questions_are_skipped_in_the_prompt_stream():
    from dyjr_verl.methods.exgrpo.experience import gen_batch_rows

    t = Stub.make(["a", "b", "c", "d", "e", "f", "g", "h"], batch=4, n=4)
    t.pool.update_group(q_key("b"), num_correct=4, group_size=4, correct=[])
    t.pool.update_group(q_key("c"), num_correct=4, group_size=4, correct=[])
    got = [r["raw_prompt"][0]["content"] for r in gen_batch_rows(t.next_batch())]
    assert got == ["a", "d", "e", "f"] and t.skipped_retired == 2


def _install_step(t, groups: dict[str, list[str]]):
    from dyjr_verl.replay.group_rows import GroupStep, PromptGroup

    return GroupStep(
        partition_id="train",
        groups={u: PromptGroup(u, keys, q_key(u), row(u)["raw_prompt"], "s") for u, keys in groups.items()},
        tags={}, fresh_rows=sum(len(k) for k in groups.values()),
    )


def test_trajectory_choice_lowest_entropy_with_one_forward_for_multi_candidate_questions():
    t = Stub.make([], n=4)
    t.pool.update_group(q_key("x"), num_correct=3, group_size=4, correct=[traj(1), traj(2, 2), traj(3, 3, 3)], prompt_row=row("x"))
    t.pool.update_group(q_key("y"), num_correct=1, group_size=4, correct=[traj(9)], prompt_row=row("y"))
    step = _install_step(t, {"ux": ["ux_0_0"], "uy": ["uy_0_0"], "uz": ["uz_0_0"]})
    t.experience = {"ux": q_key("x"), "uy": q_key("y")}  # uz is a fresh question
    calls = []

    def fake_entropy(items):
        calls.append([(u, ids.tolist()) for u, ids in items])
        return [0.9, 0.2, 0.5]  # per candidate of x, in pool order

    metrics: dict = {}
    specs = t.choose_rows(list(step.groups.values()), fake_entropy, max_len=16, step=1, metrics=metrics)
    assert calls == [[("ux", [1]), ("ux", [2, 2]), ("ux", [3, 3, 3])]]  # y has one candidate: no forward
    by_uid = {s.uid: s for s in specs}
    assert set(by_uid) == {"ux", "uy"}
    assert by_uid["ux"].response_ids.tolist() == [2, 2] and by_uid["uy"].response_ids.tolist() == [9]
    assert by_uid["ux"].score == 1.0 and by_uid["ux"].stored_log_probs.tolist() == pytest.approx([-0.1, -0.2])
    assert metrics["exgrpo/select/entropy_chosen"] == pytest.approx(0.2)
    assert metrics["exgrpo/replay/experience_questions"] == 2.0


def test_latest_and_random_choices_need_no_forward():
    for mode in ("latest", "random"):
        t = Stub.make([], n=4, select={"trajectory": mode})
        t.pool.update_group(q_key("x"), num_correct=2, group_size=4, correct=[traj(1), traj(2)], prompt_row=row("x"))
        step = _install_step(t, {"ux": ["ux_0_0"]})
        t.experience = {"ux": q_key("x")}
        no_forward = lambda items: pytest.fail("no forward expected")  # noqa: E731
        (spec,) = t.choose_rows(list(step.groups.values()), no_forward, max_len=16, step=1, metrics={})
        assert spec.response_ids.tolist() in (([2],) if mode == "latest" else ([1], [2]))


def _finished(rows: list[tuple[str, float, list[int]]], keys: list[str], replay: set[str]) -> list:
    """The finished rows as the trainer hands them to ``update_pool`` (key, replayed?, uid, score, ids, log-probs)."""
    return [(k, k in replay, u, s, torch.tensor(ids), torch.full((len(ids),), -0.5)) for k, (u, s, ids) in zip(keys, rows)]


def test_pool_update_counts_the_whole_group_stores_fresh_successes_and_activates():
    t = Stub.make([], n=4, start_accuracy=0.3)
    t.pool.update_group(q_key("e"), num_correct=1, group_size=4, correct=[traj(5, 5)], prompt_row=row("e"))
    rows = [  # fresh question "f": 2 of 4 correct; experience question "e": 2 fresh of 3 + its replayed row
        ("f", 1.0, [1, 2]), ("f", 0.0, [3]), ("f", 1.0, [1, 2]), ("f", 0.0, [4]),
        ("e", 1.0, [6]), ("e", 0.0, [7]), ("e", 1.0, [8]), ("e", 1.0, [5, 5]),
        ("s", 1.0, [1]), ("s", 1.0, [2]), ("s", 1.0, [3]), ("s", 1.0, [4]),  # all correct: retired
    ]
    keys = [f"{u}_{i}_0" for i, (u, _, _) in enumerate(rows)]
    keys[7] = "exgrpoabc_0_0"  # the replayed row of "e"
    step = _install_step(t, {"f": keys[0:4], "e": keys[4:7], "s": keys[8:12]})
    step.replay_keys = ["exgrpoabc_0_0"]
    t.issued = {"f": (q_key("f"), row("f")), "e": (q_key("e"), row("e")), "s": (q_key("s"), row("s"))}
    t.experience = {"e": q_key("e")}
    metrics: dict = {}
    t.update_pool(step.groups, _finished(rows, keys, set(step.replay_keys)), step=1, metrics=metrics)

    assert t.pool.bucket_of(q_key("f")) == 2 and len(t.pool.trajectories(q_key("f"))) == 1  # dedup of [1, 2]
    assert t.pool.bucket_of(q_key("e")) == 3  # k over the group of K: 2 fresh + the replayed one
    assert sorted(tr.response_ids.tolist() for tr in t.pool.trajectories(q_key("e"))) == [[5, 5], [6], [8]]
    assert t.pool.is_retired(q_key("s"))
    assert metrics["exgrpo/batch_accuracy"] == pytest.approx(8 / 11)  # fresh rows only
    assert t.active and metrics["exgrpo/active"] == 1.0
    assert metrics["exgrpo/pool/outcome_stored"] == 2.0 and metrics["exgrpo/pool/outcome_retired"] == 1.0
    assert t.issued == {} and t.experience == {}


def test_nothing_is_collected_before_activation():
    """Official Ex-GRPO is purely on-policy until fresh accuracy first exceeds start_accuracy."""
    t = Stub.make([], n=4, start_accuracy=0.9)
    rows = [("f", 1.0, [1, 2]), ("f", 0.0, [3]), ("f", 1.0, [4]), ("f", 0.0, [5]),
            ("s", 1.0, [1]), ("s", 1.0, [2]), ("s", 1.0, [3]), ("s", 1.0, [4])]
    keys = [f"{u}_{i}_0" for i, (u, _, _) in enumerate(rows)]
    step = _install_step(t, {"f": keys[0:4], "s": keys[4:8]})
    t.issued = {"f": (q_key("f"), row("f")), "s": (q_key("s"), row("s"))}
    metrics: dict = {}
    t.update_pool(step.groups, _finished(rows, keys, set()), step=1, metrics=metrics)
    assert not t.active and metrics["exgrpo/active"] == 0.0
    assert q_key("f") not in t.pool and not t.pool.is_retired(q_key("s"))  # neither stored nor retired
    assert metrics["exgrpo/pool/outcome_before_activation"] == 2.0
    assert metrics["exgrpo/batch_accuracy"] == pytest.approx(6 / 8)
