"""RLEP: question identity, the static experience pool (file format, admission, uniform draws
without fillers), the collection helpers, the ``rlep:`` node and its checks against verl's config,
and the trainer's per-group plan (M stored answers per group, none for questions not in the pool)."""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from dyjr_verl.methods.rlep.config import RLEPConfig
from dyjr_verl.methods.rlep.collect import build_parser, select_correct
from dyjr_verl.replay.config import ConfigError
from dyjr_verl.methods.rlep.pool import RLEPPool
from dyjr_verl.replay.questions import normalise_messages, question_key

MSGS = [{"role": "user", "content": "What is 2 + 3? Put it in \\boxed{}."}]


# -- question identity ----------------------------------------------------------------------------


def test_question_key_matches_between_parquet_and_transferqueue_forms():
    # pandas reads the prompt column as a numpy array of dicts; TransferQueue gives a list of dicts
    as_parquet = np.array([dict(MSGS[0])], dtype=object)
    assert question_key(as_parquet, "src") == question_key(list(MSGS), "src")
    assert question_key(MSGS, "src") == question_key(MSGS, "src")  # stable
    assert len(question_key(MSGS)) == 16


def test_question_key_separates_questions_and_sources():
    other = [{"role": "user", "content": "What is 2 + 4?"}]
    assert question_key(MSGS, "a") != question_key(other, "a")
    assert question_key(MSGS, "a") != question_key(MSGS, "b")
    # a bare string is one user message
    assert question_key("hi") == question_key([{"role": "user", "content": "hi"}])
    assert normalise_messages(MSGS) == [["user", MSGS[0]["content"]]]


# -- the pool ---------------------------------------------------------------------------------------


def test_min_correct_admission_is_applied():
    pool = RLEPPool({"a": ["x", "y"], "b": ["z"], "c": []}, min_correct=2)
    assert len(pool) == 1 and "a" in pool and "b" not in pool
    assert pool.dropped == 2 and pool.num_candidates == 2
    with pytest.raises(ValueError):
        RLEPPool({}, min_correct=0)


def test_draw_gives_at_most_m_distinct_candidates_and_no_fillers():
    rng = np.random.default_rng(0)
    pool = RLEPPool({"a": ["x", "y", "z"], "b": ["only"], "c": ["p", "q"]}, min_correct=1)
    for _ in range(50):
        got = pool.draw("a", 2, rng)
        assert len(got) == 2 and len(set(got)) == 2 and set(got) <= {"x", "y", "z"}
    assert pool.draw("b", 2, rng) == ["only"]  # fewer stored than M: no empty filler answers
    assert pool.draw("missing", 2, rng) == []
    assert pool.draw("a", 0, rng) == []
    assert sorted(pool.draw("c", 5, rng)) == ["p", "q"]


def test_draw_is_uniform_over_candidates():
    rng = np.random.default_rng(1)
    cands = [f"ans{i}" for i in range(6)]
    pool = RLEPPool({"a": cands}, min_correct=2)
    counts = Counter(a for _ in range(6000) for a in pool.draw("a", 2, rng))
    # each candidate is in a 2-of-6 draw with probability 1/3: 2000 expected, sd ~ 37
    assert all(1800 < counts[c] < 2200 for c in cands), counts


def test_duplicates_weight_the_draw_like_the_model_produced_them():
    rng = np.random.default_rng(2)
    pool = RLEPPool({"a": ["same", "same", "same", "other"]}, min_correct=2)
    counts = Counter(pool.draw("a", 1, rng)[0] for _ in range(4000))
    assert 2800 < counts["same"] < 3200


def test_pool_file_round_trip_and_stricter_loading(tmp_path):
    entries = {"k1": ["a", "b", "c"], "k2": ["d", "e"], "k3": ["f", "g"]}
    rows = [{"question_key": "k1", "data_source": "src", "index": 7, "num_samples": 8, "num_correct": 3}]
    path = RLEPPool(entries, min_correct=2, meta={"n": 8}).save(tmp_path / "pool.parquet", rows=rows)
    loaded = RLEPPool.load(path)
    assert {k: loaded.candidates(k) for k in entries} == entries
    assert loaded.meta["n"] == 8 and loaded.meta["min_correct"] == 2 and loaded.meta["path"] == str(path)
    assert loaded.fingerprint() == RLEPPool(dict(reversed(list(entries.items())))).fingerprint()
    strict = RLEPPool.load(path, min_correct=3)
    assert len(strict) == 1 and "k1" in strict

    import pyarrow.parquet as pq

    table = pq.read_table(path).to_pylist()
    k1 = next(r for r in table if r["question_key"] == "k1")
    assert (k1["data_source"], k1["index"], k1["num_samples"], k1["num_correct"]) == ("src", 7, 8, 3)


def test_missing_pool_file_names_the_collection_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"rlep\.collect"):
        RLEPPool.load(tmp_path / "nope.parquet")


def test_checkpoint_state_records_the_pool_and_warns_on_another():
    pool = RLEPPool({"a": ["x", "y"]})
    state = pool.state_dict()
    assert state["fingerprint"] == pool.fingerprint() and state["questions"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pool.load_state_dict(state)  # same pool: silent
    with pytest.warns(UserWarning, match="differs"):
        RLEPPool({"a": ["x", "z"]}).load_state_dict(state)


# -- collection helpers -----------------------------------------------------------------------------


def test_select_correct_keeps_every_correct_sample_unless_dedup():
    answers = ["a", "b", "a", "c", "a"]
    scores = [1.0, 0.0, 1.0, 1.0, -1.0]
    assert select_correct(answers, scores, threshold=0.5) == ["a", "a", "c"]
    assert select_correct(answers, scores, threshold=0.5, dedup=True) == ["a", "c"]
    with pytest.raises(ValueError):
        select_correct(["a"], [1.0, 0.0], threshold=0.5)


def test_collection_defaults_are_rleps():
    args = build_parser().parse_args(["--model", "m", "--data", "d", "--out", "o"])
    assert (args.n, args.temperature, args.top_p, args.min_correct) == (64, 0.7, 0.95, 2)
    assert args.reward == "pkg://dyjr_verl.rewards.math" and not args.dedup


class FakeTokenizer:
    eos_token_id = 99

    def encode(self, text, add_special_tokens=False):
        assert not add_special_tokens
        return [ord(c) % 50 for c in text]


def test_tokenize_answer_appends_eos_and_truncates():
    from dyjr_verl.methods.rlep.trainer import tokenize_answer

    tok = FakeTokenizer()
    ids = tokenize_answer(tok, "abc", max_tokens=10)
    assert ids.tolist() == [ord("a") % 50, ord("b") % 50, ord("c") % 50, 99] and ids.dtype == torch.int64
    assert tokenize_answer(tok, "abc", max_tokens=2).tolist() == [ord("a") % 50, ord("b") % 50]  # loses EOS
    assert tokenize_answer(tok, "abc", max_tokens=10, append_eos=False).numel() == 3
    assert tokenize_answer(tok, "", max_tokens=10).tolist() == [99]


# -- config ----------------------------------------------------------------------------------------


def test_rlep_defaults_are_the_papers():
    cfg = RLEPConfig.from_dict({"pool_path": "/p"})
    assert (cfg.replay_per_group, cfg.min_correct, cfg.rescore, cfg.append_eos) == (2, 2, True, True)


def errors_of(d: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        RLEPConfig.from_dict(d)
    return info.value.errors


def test_rlep_errors_are_one_line_each_with_the_key():
    assert errors_of({}) == [
        "rlep.pool_path must be set (build the pool with `python -m dyjr_verl.methods.rlep.collect`)"
    ]
    assert errors_of({"pool_path": "???"})[0].startswith("rlep.pool_path must be set")
    errs = errors_of({"pool_path": "/p", "replay_per_group": 0, "min_correct": "two", "seeed": 1})
    assert errs == [
        "rlep.seeed: unknown key (did you mean 'seed'?)",
        "rlep.min_correct must be an integer, got 'two'",
        "rlep.replay_per_group must be >= 1, got 0",
    ]
    assert RLEPConfig.from_dict({"enable": False}).pool_path is None  # off: no pool needed


def test_rlep_checks_against_verl_config(tmp_path):
    pool = tmp_path / "pool.parquet"
    RLEPPool({"a": ["x", "y"]}).save(pool)
    good = OmegaConf.create({"algorithm": {"adv_estimator": "grpo"}, "critic": {"enable": False}})
    assert RLEPConfig(pool_path=str(pool)).verl_problems(good) == []
    missing = RLEPConfig(pool_path=str(tmp_path / "no.parquet")).verl_problems(good)
    assert len(missing) == 1 and "rlep.pool_path does not exist" in missing[0]
    gae = OmegaConf.create({"algorithm": {"adv_estimator": "gae"}})
    assert "critic-free group estimator" in RLEPConfig(pool_path=str(pool)).verl_problems(gae)[0]
    bypass = OmegaConf.create({"algorithm": {"adv_estimator": "grpo", "rollout_correction": {"bypass_mode": True}}})
    assert "bypass_mode" in RLEPConfig(pool_path=str(pool)).verl_problems(bypass)[0]


# -- the trainer's plan ----------------------------------------------------------------------------


def _plan(pool: RLEPPool, groups, metrics: dict, **cfg):
    """The trainer's plan (a pure function: no Ray, TransferQueue or workers)."""
    from dyjr_verl.methods.rlep.trainer import plan_rows

    specs, plan_metrics = plan_rows(groups, pool, RLEPConfig(pool_path="/p", **cfg), FakeTokenizer(), max_tokens=8,
                                    rng=np.random.default_rng(0))
    metrics.update(plan_metrics)
    return specs


def test_plan_appends_m_answers_per_group_in_the_pool():
    from dyjr_verl.replay.group_rows import PromptGroup

    q_in, q_short, q_out = ([{"role": "user", "content": c}] for c in ("in", "short", "out"))
    pool = RLEPPool({question_key(q_in, "s"): ["aa", "bb", "cc"], question_key(q_short, "s"): ["dd"]}, min_correct=1)
    groups = [
        PromptGroup("u1", ["u1_0_0", "u1_1_0"], question_key(q_in, "s"), q_in, "s"),
        PromptGroup("u2", ["u2_0_0"], question_key(q_short, "s"), q_short, "s"),
        PromptGroup("u3", ["u3_0_0"], question_key(q_out, "s"), q_out, "s"),
    ]
    metrics: dict = {}
    specs = _plan(pool, groups, metrics, min_correct=1)
    assert [s.uid for s in specs] == ["u1", "u1", "u2"]
    assert all(s.score is None and s.stored_log_probs is None for s in specs)  # re-scored, on-policy rows
    assert all(int(s.response_ids[-1]) == FakeTokenizer.eos_token_id for s in specs)
    assert metrics["rlep/replay/questions_not_in_pool"] == 1.0 and metrics["rlep/replay/questions_short"] == 1.0
    trusted = _plan(pool, groups, {}, min_correct=1, rescore=False)
    assert all(s.score == 1.0 for s in trusted)


# -- collection: de-duplication, chunks and resume (vLLM replaced by a deterministic generate) --------


def _collect_frame(repeats: int = 3):
    import pandas as pd

    qs = [(f"What is {i} + {i}?", str(2 * i)) for i in range(7)]
    return pd.DataFrame([
        {"data_source": "math_dapo", "prompt": [{"role": "user", "content": q}], "ability": "math",
         "reward_model": {"ground_truth": a, "style": "rule"}, "extra_info": {"index": f"uuid-{i}"}}  # as DAPO's
        for _ in range(repeats) for i, (q, a) in enumerate(qs)
    ])


def _fake_generate(seen: list):
    """What vLLM would return for a chunk: n answers per question, how many right depends only on the question."""
    def generate(chunk):
        seen.extend(q["question_key"] for q in chunk)
        out = []
        for q in chunk:
            right = int(q["question_key"], 16) % 4  # 0..3 of 4 right
            out.append([f"so\nAnswer: {q['ground_truth']}" if j < right else f"so\nAnswer: {int(q['ground_truth']) + 1}"
                        for j in range(4)])
        return out
    return generate


def _collect_args(tmp_path, out, *extra):
    return build_parser().parse_args(["--model", str(tmp_path), "--data", "d.parquet", "--out", str(out), "--n", "4",
                                      "--batch-questions", "3", *extra])


def test_collection_samples_each_question_once():
    from dyjr_verl.methods.rlep.collect import load_questions

    questions, duplicates = load_questions(_collect_frame(repeats=3))
    assert len(questions) == 7 and duplicates == 14
    assert [q["ground_truth"] for q in questions] == [str(2 * i) for i in range(7)]
    assert len({q["question_key"] for q in questions}) == 7
    assert [q["index"] for q in questions] == list(range(7))  # row numbers where extra_info.index is no number
    limited, _ = load_questions(_collect_frame(repeats=3), limit=2)  # --limit counts distinct questions
    assert [q["ground_truth"] for q in limited] == ["0", "2"]
    with pytest.raises(ValueError, match="no 'problem' column"):
        load_questions(_collect_frame(), prompt_key="problem")


def test_killed_collection_resumes_and_gives_the_same_pool(tmp_path):
    import pyarrow.parquet as pq

    from dyjr_verl.methods.rlep.collect import chunk_seconds, load_questions, load_reward_fn, parts_dir, run_collection

    reward = load_reward_fn("pkg://dyjr_verl.rewards.math")
    questions, _ = load_questions(_collect_frame())
    whole = tmp_path / "whole" / "pool.parquet"
    calls: list = []
    summary = run_collection(questions, _collect_args(tmp_path, whole), _fake_generate(calls), reward)
    assert calls == [q["question_key"] for q in questions]  # every question once, in 3 chunks (3 + 3 + 1)
    assert sorted(p.name for p in parts_dir(whole).glob("part-*.parquet")) == [f"part-00000{i}.parquet" for i in range(3)]
    assert summary["samples"] == 28 and summary["resumed_questions"] == 0

    # killed while the second chunk was being generated
    resumed = tmp_path / "resumed" / "pool.parquet"
    first: list = []
    good = _fake_generate(first)

    def dies_on_second_chunk(chunk):
        if first:
            raise KeyboardInterrupt
        return good(chunk)

    with pytest.raises(KeyboardInterrupt):
        run_collection(questions, _collect_args(tmp_path, resumed), dies_on_second_chunk, reward)
    assert not resumed.exists() and len(list(parts_dir(resumed).glob("part-*.parquet"))) == 1
    rest: list = []
    again = run_collection(questions, _collect_args(tmp_path, resumed), _fake_generate(rest), reward)
    assert rest == [q["question_key"] for q in questions[3:]]  # only the unfinished chunks
    assert again["resumed_questions"] == 3 and again["samples"] == summary["samples"]
    # each part records what its chunk took, so the resumed launch still reports the whole pool's cost
    first_part = parts_dir(resumed) / "part-000000.parquet"
    assert again["resumed_chunk_s"] == round(chunk_seconds(first_part), 1) >= 0.0
    assert summary["resumed_chunk_s"] == 0.0
    untimed = pq.read_table(first_part).replace_schema_metadata(None)  # a part from before the record
    pq.write_table(untimed, first_part)
    assert chunk_seconds(first_part) is None
    assert run_collection(questions, _collect_args(tmp_path, resumed), _fake_generate([]), reward)["resumed_chunk_s"] is None
    a, b = RLEPPool.load(whole, min_correct=1), RLEPPool.load(resumed, min_correct=1)
    assert a.fingerprint() == b.fingerprint() and len(a) == summary["pool_questions"] > 0
    assert pq.read_table(whole).to_pylist() == pq.read_table(resumed).to_pylist()
    gold = {q["question_key"]: q["ground_truth"] for q in questions}
    for k in a.questions():  # verified by the real reward: only right answers, >= --min-correct of them
        assert len(a.candidates(k)) >= 2 and all(c.endswith(f"Answer: {gold[k]}") for c in a.candidates(k))
    # a rerun of a finished collection samples nothing; another --min-correct rebuilds from the parts
    none: list = []
    loose = run_collection(questions, _collect_args(tmp_path, resumed, "--min-correct", "1"), _fake_generate(none), reward)
    assert none == [] and loose["pool_questions"] >= summary["pool_questions"]


def test_resume_with_other_settings_is_refused_in_one_line(tmp_path, capsys):
    import pandas as pd

    from dyjr_verl.methods.rlep.collect import _open_parts, load_questions, main, parts_dir

    data = tmp_path / "train.parquet"
    _collect_frame().to_parquet(data)
    out = tmp_path / "pool.parquet"
    base = ["--model", str(tmp_path), "--data", str(data), "--out", str(out), "--n", "4"]
    questions, _ = load_questions(pd.read_parquet(data))
    _open_parts(build_parser().parse_args(base), questions)  # what a started collection leaves behind
    assert (parts_dir(out) / "settings.json").exists()
    for extra, shown in ((["--temperature", "1.0"], "temperature: 0.7 -> 1.0"), (["--n", "8"], "n: 4 -> 8"),
                         (["--limit", "3"], "questions: 7 -> 3")):
        assert main(base + extra) == 2  # refused before any model is loaded
        err = capsys.readouterr().err.strip().splitlines()
        assert err[0].startswith("rlep_collect: ") and "duplicate rows dropped" in err[0]
        assert len(err) == 2 and err[1].startswith(f"rlep_collect: error: {parts_dir(out)} holds a collection with "
                                                   "other settings")
        assert shown in err[1] and "delete" in err[1]
