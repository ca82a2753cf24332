"""Math reward: extraction, Math-Verify equivalence on real golds, hard deadlines, thread/async safety.

The golden tests run over every MATH-500, AIME 2024/2025 and AMC 2023 answer in ../shared/data/math.
"""

from __future__ import annotations

import asyncio
import json
import operator
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dyjr_verl.rewards import math as mr
from dyjr_verl.rewards.deadline import DeadlineExceeded, DeadlinePool, PoolStartError, WorkerCrashed

TIMEOUT_S = 2.0  # short deadline for the pathological cases; the default is 5 s
BOUND_S = TIMEOUT_S + 2.0
RESULT_KEYS = {"score", "acc", "pred", "timeout", "format_ok", "status"}


def _answers(shared_data: Path, name: str) -> list[str]:
    with (shared_data / "math" / name).open(encoding="utf-8") as fh:
        return [json.loads(line)["answer"] for line in fh if line.strip()]


def _response(answer: str) -> str:
    return f"Let me think step by step.\nAfter some algebra we get the result.\nThe final answer is $\\boxed{{{answer}}}$."


def _different_answer(answers: list[str], i: int) -> str:
    """The next answer (cyclically) that differs from answers[i] as a string and is not the same value
    written as an assignment (MATH-500 has golds "5" and "x=5", which Math-Verify rightly equates)."""
    a = answers[i]
    for step in range(1, len(answers)):
        b = answers[(i + step) % len(answers)]
        if b != a and not re.fullmatch(r"[a-z]\s*=\s*" + re.escape(a), b) and not re.fullmatch(
            r"[a-z]\s*=\s*" + re.escape(b), a
        ):
            return b
    raise AssertionError("no different answer")


@pytest.fixture(scope="module", autouse=True)
def math_pool():
    """Two Math-Verify workers (the machine has 2 cores), warmed once for the module."""
    mr.configure_pool(max_workers=2)
    assert mr.get_pool().warm() == 2
    yield mr.get_pool()
    mr.configure_pool()  # shut down; the next user gets a fresh default pool


# --------------------------------------------------------------------------------------------------
# extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so the answer is \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\fbox{7}", "7"),
        ("$\\boxed 5$", "5"),
        ("\\boxed{3} and a broken \\boxed{4", "3"),
        ("\\boxed{}", None),
        ("\\boxed{1", None),
        ("no answer here", None),
        ("Answer: 12", "12"),
        ("**Final Answer:** $\\frac{3}{4}$.", "\\frac{3}{4}"),
        ("work\n#### 1,234", "1,234"),
        ("Final Answer: The final answer is $9$. I hope it is correct.", "9"),
        ("Answer: 1\nmore thoughts\nAnswer: 2", "2"),
        ("Answer: 1 but \\boxed{5}", "5"),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert mr.extract_answer(text) == expected


def test_extract_modes_are_configurable() -> None:
    text = "\\boxed{1}\nAnswer: 2"
    assert mr.extract_answer(text, ("answer_line",)) == "2"
    assert mr.extract_answer(text, ("boxed",)) == "1"
    assert mr.compute_score("x", "Answer: 7", "7", extract=("boxed",))["status"] == "no_answer"
    assert mr.compute_score("x", "Answer: 7", "7", extract="answer_line")["score"] == 1.0


@pytest.mark.parametrize(
    ("a", "b"),
    [("\\dfrac{1}{2}", "\\frac{1}{2}"), ("$ x + 1 $", "x+1"), ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
     ("\\text{Evelyn}", "Evelyn"), ("5.", "5")],
)
def test_normalize_answer_equates(a: str, b: str) -> None:
    assert mr.normalize_answer(a) == mr.normalize_answer(b)


def test_normalize_keeps_command_boundaries() -> None:
    assert mr.normalize_answer("\\pi r") != mr.normalize_answer("\\pir")


# --------------------------------------------------------------------------------------------------
# integer task and basic contract


@pytest.mark.parametrize("gold", ["42", "42.0", "\\boxed{42}", 42, "$42$"])
@pytest.mark.parametrize("response", ["\\boxed{42}", "so \\boxed{42.0}", "Answer: 42", "#### 42", "\\boxed{042}"])
def test_integer_answers(gold, response: str) -> None:
    out = mr.compute_score(data_source="arith", solution_str=response, ground_truth=gold)
    assert out["score"] == 1.0 and out["acc"] is True and out["status"] == "correct"


@pytest.mark.parametrize("response", ["\\boxed{41}", "\\boxed{43.0}", "Answer: -42", "\\boxed{4.2}"])
def test_integer_answers_wrong(response: str) -> None:
    out = mr.compute_score(data_source="arith", solution_str=response, ground_truth="42")
    assert out["score"] == 0.0 and out["acc"] is False and out["status"] == "wrong"


@pytest.mark.parametrize(
    ("response", "gold"),
    [("\\boxed{0.5}", "\\frac{1}{2}"), ("\\boxed{\\frac12}", "\\frac{1}{2}"), ("\\boxed{x=5}", "5"),
     ("\\boxed{\\dfrac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}"), ("\\boxed{C}", "\\text{(C)}"), ("\\boxed{90^\\circ}", "90"),
     ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)"), ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}")],
)
def test_math_verify_equivalences(response: str, gold: str) -> None:
    assert mr.compute_score("math500", response, gold)["score"] == 1.0


def test_result_dict_shape_is_constant() -> None:
    cases = [("\\boxed{1}", "1"), ("\\boxed{2}", "1"), ("nothing", "1"), ("\\boxed{10^{10^{10}}}", "1")]
    for response, gold in cases:
        out = mr.compute_score("x", response, gold, timeout_s=TIMEOUT_S)
        assert set(out) == RESULT_KEYS
        assert isinstance(out["score"], float) and isinstance(out["pred"], str)
        assert out["status"] in mr.STATUSES
    assert mr.compute_score("x", "nothing", "1") == {
        "score": 0.0, "acc": False, "pred": "", "timeout": False, "format_ok": False, "status": "no_answer",
    }


def test_multiple_golds_and_none_response() -> None:
    assert mr.compute_score("x", "\\boxed{3}", ["2", "3"])["score"] == 1.0
    assert mr.compute_score("x", None, "3")["status"] == "no_answer"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"timeout_s": 0}, "timeout_s"), ({"timeout_s": "soon"}, "timeout_s"), ({"extract": ("latex",)}, "extract")],
)
def test_bad_options_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mr.compute_score("x", "\\boxed{1}", "1", **kwargs)


def test_string_fallback_when_math_verify_finds_nothing() -> None:
    assert mr._finish(("\\text{abc}",), "abc", True, "unparsed")["status"] == "correct"
    assert mr._finish(("abc",), "abd", True, "unparsed")["status"] == "wrong"


@pytest.mark.parametrize("value", ["false", "False", 0, "true", True])
def test_fast_path_accepts_override_strings(value) -> None:
    # a verbatim match is decided in-process; with the fast path off it goes through Math-Verify (same verdict)
    assert mr.compute_score("x", "\\boxed{7}", "7", fast_path=value)["score"] == 1.0
    with pytest.raises(ValueError, match="fast_path"):
        mr.compute_score("x", "\\boxed{7}", "7", fast_path="maybe")


def test_unknown_reward_kwargs_are_refused() -> None:
    """A misspelt reward_kwargs key (here timout_s) used to be swallowed by **kwargs and silently ignored."""
    with pytest.raises(ValueError, match=r"unknown reward_kwargs key\(s\) timout_s; accepted: extract, fast_path, timeout_s"):
        mr.compute_score("x", "\\boxed{1}", "1", timout_s=3)
    with pytest.raises(ValueError, match="db_root"):  # an SQL option is not a math option
        mr.compute_score_batch(None, ["\\boxed{1}"], ["1"], db_root="/data")
    with pytest.raises(ValueError, match="timout_s"):
        asyncio.run(mr.compute_score_async("x", "\\boxed{1}", "1", timout_s=3))
    # the keywords verl's reward managers add themselves are not options, and stay accepted
    out = mr.compute_score("x", "\\boxed{1}", "1", reward_router_address=None, reward_model_tokenizer=None)
    assert out["score"] == 1.0


def test_unknown_reward_kwargs_fail_through_verls_loader() -> None:
    from omegaconf import OmegaConf
    from verl.trainer.ppo.reward import get_custom_reward_fn

    cfg = OmegaConf.create({"reward": {"custom_reward_function": {
        "path": "pkg://dyjr_verl.rewards.math", "name": "compute_score", "reward_kwargs": {"time_out": 3.0}}}})
    fn = get_custom_reward_fn(cfg)
    with pytest.raises(ValueError, match="unknown reward_kwargs key.*time_out"):
        fn(data_source="math500", solution_str="\\boxed{1}", ground_truth="1", extra_info={})


@pytest.mark.parametrize("gold", [None, "", "  "])
def test_bad_ground_truth_raises(gold) -> None:
    with pytest.raises(ValueError, match="ground_truth"):
        mr.compute_score("x", "\\boxed{1}", gold)


# --------------------------------------------------------------------------------------------------
# golden: every real gold answer


def test_math500_golds_score_one_against_themselves(shared_data: Path) -> None:
    answers = _answers(shared_data, "math500.jsonl")
    assert len(answers) == 500
    responses = [_response(a) for a in answers]
    fast = mr.compute_score_batch(None, responses, answers)
    assert [o["score"] for o in fast] == [1.0] * 500
    # The same through Math-Verify itself (no in-process string shortcut): all 500 parse and verify.
    slow = mr.compute_score_batch(None, responses, answers, fast_path=False)
    failures = [(a, o) for a, o in zip(answers, slow) if o["score"] != 1.0]
    assert failures == []


def test_math500_golds_score_zero_against_other_answers(shared_data: Path) -> None:
    answers = _answers(shared_data, "math500.jsonl")
    responses = [_response(_different_answer(answers, i)) for i in range(len(answers))]
    out = mr.compute_score_batch(None, responses, answers)
    failures = [(answers[i], o["pred"], o["status"]) for i, o in enumerate(out) if o["score"] != 0.0]
    assert failures == []
    assert all(o["status"] == "wrong" for o in out)


@pytest.mark.parametrize("name", ["aime24.jsonl", "aime25.jsonl", "amc23.jsonl"])
def test_competition_golds(shared_data: Path, name: str) -> None:
    answers = _answers(shared_data, name)
    assert answers and all(re.fullmatch(r"-?\d+", a) for a in answers)  # AMC 2023 has one "-1"
    right = [_response(a) for a in answers]
    assert all(o["score"] == 1.0 for o in mr.compute_score_batch(None, right, answers))
    assert all(o["score"] == 1.0 for o in mr.compute_score_batch(None, right, answers, fast_path=False))
    assert all(o["score"] == 1.0 for o in mr.compute_score_batch(None, [_response(a + ".0") for a in answers], answers))
    wrong = [_response(str(int(a) + 1)) for a in answers]
    assert all(o["score"] == 0.0 for o in mr.compute_score_batch(None, wrong, answers))
    assert all(o["score"] == 0.0 for o in mr.compute_score_batch(None, wrong, answers, fast_path=False))


# --------------------------------------------------------------------------------------------------
# pathological outputs: bounded time, score 0, pool healthy afterwards

MB = 1 << 20
PATHOLOGICAL = {
    "1MB_no_answer": "a" * MB,
    "1MB_then_wrong_box": "x " * (MB // 2) + "\\boxed{6}",
    "1MB_of_unclosed_boxes": "\\boxed{1" * (MB // 8),
    "1MB_of_braces": "{" * MB,
    "1MB_answer_in_box": "\\boxed{" + "1+" * (MB // 2) + "1}",
    "tower_10^10^10": "\\boxed{10^{10^{10}}}",
    "tower_9^9^9^9": "\\boxed{9^{9^{9^{9}}}}",
    "tower_2^7": "\\boxed{2^{2^{2^{2^{2^{2^{2}}}}}}}",
    "factorial_10^10": "\\boxed{(10^{10})!}",
    "factorial_1e9": "\\boxed{1000000000!}",
    "nested_braces_5000": "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}",
    "nested_frac_300": "\\boxed{" + "\\frac{1}{" * 300 + "2" + "}" * 300 + "}",
    "nested_sqrt_300": "\\boxed{" + "\\sqrt{" * 300 + "2" + "}" * 300 + "}",
    "nested_parens_3000": "\\boxed{" + "(" * 3000 + "1" + ")" * 3000 + "}",
    # below MAX_ANSWER_CHARS, so these reach Math-Verify's recursive parser
    "nested_braces_450": "\\boxed{" + "{" * 450 + "1" + "}" * 450 + "}",
    "nested_frac_80": "\\boxed{" + "\\frac{1}{" * 80 + "2" + "}" * 80 + "}",
    "nested_sqrt_130": "\\boxed{" + "\\sqrt{" * 130 + "2" + "}" * 130 + "}",
    "nested_parens_450": "\\boxed{" + "(" * 450 + "1" + ")" * 450 + "}",
    "nested_power_150": "\\boxed{" + "2^{" * 150 + "2" + "}" * 150 + "}",
    "huge_sum": "\\boxed{\\sum_{n=1}^{10^{100}} n}",
    "symbolic_tower": "\\boxed{x^{x^{x^{x^{x^{x}}}}}}",
    "integral": "\\boxed{\\int_0^\\infty e^{-x^{1000}} dx}",
    "exp_tower": "\\boxed{e^{e^{e^{e^{e^{100}}}}}}",
    "tiny_power": "\\boxed{10^{-10^{10}}}",
    "division_by_zero": "\\boxed{\\frac{1}{0}}",
    "900_digit_integer": "\\boxed{" + "9" * 900 + "}",
    "long_text_answer": "\\boxed{\\text{" + "a" * 900 + "}}",
    "backslashes": "\\boxed{" + "\\\\" * 2000 + "}",
    "control_chars": "\\boxed{\x00\x01\x02}",
    "unclosed_env": "\\boxed{" + "\\begin{pmatrix}" * 200 + "}",
    "answer_line_parens": "Answer: " + "(" * 10000,
    "many_answer_lines": "Answer: 1+\n" * 50000,
    "empty_box": "\\boxed{}",
    "lim_tower": "\\boxed{\\lim_{x\\to\\infty} x^{x^{x}}}",
    "matrix_power": "\\boxed{\\begin{pmatrix}1&1\\\\1&0\\end{pmatrix}^{10^{12}}}",
}
GOLD = "5"


@pytest.mark.parametrize("name", sorted(PATHOLOGICAL))
def test_pathological_output_is_bounded(name: str) -> None:
    start = time.monotonic()
    out = mr.compute_score("math500", PATHOLOGICAL[name], GOLD, timeout_s=TIMEOUT_S)
    elapsed = time.monotonic() - start
    assert elapsed < BOUND_S, f"{name} took {elapsed:.2f} s"
    assert out["score"] == 0.0 and out["acc"] is False
    assert set(out) == RESULT_KEYS and len(out["pred"]) <= mr.MAX_PRED_CHARS
    assert out["timeout"] == (out["status"] == "timeout")
    # The pool survived: a normal sample still goes through Math-Verify and scores 1.
    healthy = mr.compute_score("math500", "\\boxed{\\frac{10}{2}}", GOLD, fast_path=False, timeout_s=30)
    assert healthy["score"] == 1.0


def test_pathological_timeouts_are_flagged() -> None:
    out = mr.compute_score("x", PATHOLOGICAL["tower_10^10^10"], GOLD, timeout_s=1.0)
    assert out["status"] == "timeout" and out["timeout"] is True and out["score"] == 0.0


def test_pathological_batch_is_bounded() -> None:
    names = ["tower_10^10^10", "factorial_10^10", "symbolic_tower", "huge_sum"]
    responses = [PATHOLOGICAL[n] for n in names] + [_response("5")] * 4 + [_response("\\frac{10}{2}")] * 2
    start = time.monotonic()
    out = mr.compute_score_batch(None, responses, [GOLD] * len(responses), timeout_s=TIMEOUT_S)
    # 2 workers, at most 4 deadlines in a row (+ worker replacement): well under 4 x BOUND_S.
    assert time.monotonic() - start < 2 * BOUND_S + 2 * TIMEOUT_S
    assert [o["score"] for o in out] == [0.0] * 4 + [1.0] * 6


# --------------------------------------------------------------------------------------------------
# concurrency: verl calls from executor threads, or awaits the async variant


def test_threads_share_the_pool_safely() -> None:
    cases = [(_response("\\frac{10}{2}"), 1.0), (_response("4"), 0.0), (PATHOLOGICAL["tower_10^10^10"], 0.0),
             (_response("0.5"), 0.0), (_response("5.0"), 1.0), (_response("\\sqrt{25}"), 1.0)] * 4
    start = time.monotonic()
    with ThreadPoolExecutor(8) as ex:
        outs = list(ex.map(lambda c: mr.compute_score("x", c[0], GOLD, timeout_s=TIMEOUT_S), cases))
    assert [o["score"] for o in outs] == [c[1] for c in cases]
    assert time.monotonic() - start < 4 * BOUND_S


def test_async_entry_point() -> None:
    assert asyncio.iscoroutinefunction(mr.compute_score_async)

    async def run() -> list[dict]:
        return await asyncio.gather(
            mr.compute_score_async(data_source="x", solution_str="\\boxed{\\frac{10}{2}}", ground_truth=GOLD),
            mr.compute_score_async(data_source="x", solution_str="\\boxed{5}", ground_truth=GOLD),
            mr.compute_score_async(data_source="x", solution_str="\\boxed{6}", ground_truth=GOLD),
            mr.compute_score_async(data_source="x", solution_str=PATHOLOGICAL["tower_10^10^10"], ground_truth=GOLD,
                                   timeout_s=1.0),
        )

    outs = asyncio.run(run())
    assert [o["score"] for o in outs] == [1.0, 1.0, 0.0, 0.0]
    assert outs[3]["timeout"] is True


def test_compute_score_in_a_non_main_thread_uses_no_signals() -> None:
    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault("out", mr.compute_score("x", "\\boxed{\\frac12}", "0.5")))
    t.start()
    t.join(30)
    assert box["out"]["score"] == 1.0


# --------------------------------------------------------------------------------------------------
# called from a plain script: spawn/forkserver re-run the script in every new process

SCRIPT_LIMIT_S = 120  # the outside timeout; before the fix a script without a guard hung until it
SCRIPT_BOUND_S = 60  # a script that cannot work must fail well before it


def run_script(tmp_path: Path, repo_root: Path, body: str, name: str = "score.py") -> tuple[subprocess.CompletedProcess, float]:
    script = tmp_path / name
    script.write_text(textwrap.dedent(body))
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=SCRIPT_LIMIT_S)
    return proc, time.monotonic() - start


def assert_guard_error(proc: subprocess.CompletedProcess, elapsed: float) -> str:
    assert proc.returncode != 0, proc.stdout
    assert elapsed < SCRIPT_BOUND_S
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("dyjr_verl.rewards.deadline.PoolStartError: "), proc.stderr[-2000:]
    assert 'if __name__ == "__main__":' in last
    return last


def test_script_without_main_guard_fails_fast_with_one_line(tmp_path: Path, repo_root: Path) -> None:
    proc, elapsed = run_script(tmp_path, repo_root, """
        from dyjr_verl.rewards.math import compute_score
        print(compute_score("x", "so \\\\boxed{\\\\frac{1}{2}}", "0.5"))  # needs Math-Verify, so a worker
    """)
    last = assert_guard_error(proc, elapsed)
    assert f"top level of {tmp_path / 'score.py'} (line 3)" in last
    assert elapsed < 20  # refused in the calling process, before any worker is started


def test_script_calling_from_threads_without_main_guard_fails_fast(tmp_path: Path, repo_root: Path) -> None:
    """The calling thread does not see the script's top level: the re-run in the worker is caught instead."""
    proc, elapsed = run_script(tmp_path, repo_root, """
        from concurrent.futures import ThreadPoolExecutor
        from dyjr_verl.rewards.math import compute_score
        with ThreadPoolExecutor(2) as ex:
            print(list(ex.map(lambda r: compute_score("x", r, "0.5")["score"], ["\\\\boxed{\\\\frac{1}{2}}"])))
    """)
    last = assert_guard_error(proc, elapsed)
    assert "fail to start" in last and "score.py" in last


def test_script_with_main_guard_scores(tmp_path: Path, repo_root: Path) -> None:
    proc, elapsed = run_script(tmp_path, repo_root, """
        from dyjr_verl.rewards.math import compute_score

        def main():
            return compute_score("x", "so \\\\boxed{\\\\frac{1}{2}}", "0.5")["score"]

        if __name__ == "__main__":
            print(main(), compute_score("x", "\\\\boxed{\\\\sqrt{4}}", "2")["score"])
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["1.0", "1.0"]


def test_fork_server_that_never_answers_is_bounded(tmp_path: Path, repo_root: Path) -> None:
    """A fork server stuck importing its preload modules used to block Process.start(), and every caller, forever."""
    (tmp_path / "stuck_module.py").write_text("import time\ntime.sleep(600)\n")
    proc, elapsed = run_script(tmp_path, repo_root, """
        import sys
        from dyjr_verl.rewards import deadline

        deadline.BOOT_TIMEOUT_S = 2.0
        if __name__ == "__main__":
            pool = deadline.DeadlinePool("stuck", 1, preload=["stuck_module"])
            try:
                pool.run(abs, -1, timeout_s=5)
            except deadline.PoolStartError as exc:
                print(exc)
                sys.exit(3)
    """)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "did not answer within 2 s" in proc.stdout
    assert elapsed < 30


def test_manager_thread_failure_fails_the_waiting_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = DeadlinePool("broken-manager", 1)

    def boom() -> float:
        raise RuntimeError("bug in the scheduler")

    monkeypatch.setattr(pool, "_schedule", boom)
    try:
        fut = pool.submit(operator.add, 1, 1, timeout_s=5)
        exc = fut.exception(timeout=10)  # before: the manager thread died and the call waited forever
        assert isinstance(exc, PoolStartError)
        assert "manager thread failed: RuntimeError: bug in the scheduler" in str(exc)
    finally:
        pool.shutdown()


# --------------------------------------------------------------------------------------------------
# the deadline pool itself (stdlib callables: workers import them by reference)


def test_deadline_pool_kills_and_replaces_workers() -> None:
    pool = DeadlinePool("test", 1, memory_limit_mb=512)
    try:
        assert pool.alive_workers() == 0  # lazy: nothing started yet
        assert pool.run(operator.add, 2, 3, timeout_s=30) == 5
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            pool.run(time.sleep, 30, timeout_s=0.5)
        assert time.monotonic() - start < 3.0
        with pytest.raises(WorkerCrashed):
            pool.run(os._exit, 3, timeout_s=30)
        with pytest.raises(ZeroDivisionError):
            pool.run(operator.truediv, 1, 0, timeout_s=30)
        assert pool.run(operator.mul, 6, 7, timeout_s=30) == 42
        assert pool.stats.timed_out == 1 and pool.stats.crashed == 1
        results = pool.map(operator.add, [(i, i) for i in range(50)], timeout_s=30)
        assert results == [(True, 2 * i) for i in range(50)]
    finally:
        pool.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(operator.add, 1, 1, timeout_s=1)


def test_deadline_pool_memory_limit() -> None:
    pool = DeadlinePool("test-mem", 1, memory_limit_mb=512)
    try:
        with pytest.raises((MemoryError, DeadlineExceeded)):
            pool.run(bytearray, 2 << 30, timeout_s=20)
        assert pool.run(operator.add, 1, 1, timeout_s=30) == 2
    finally:
        pool.shutdown()


def test_deadline_pool_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="max_workers"):
        DeadlinePool("bad", 0)
    with pytest.raises(ValueError, match="start_method"):
        DeadlinePool("bad", 1, start_method="fork")
    pool = DeadlinePool("lazy", 1)
    with pytest.raises(ValueError, match="timeout_s"):
        pool.submit(operator.add, 1, 1, timeout_s=0)
    pool.shutdown()


def test_pool_that_cannot_start_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken environment must raise, not silently score every sample 0 (verl PR #5635's failure mode)."""
    import sys

    broken = DeadlinePool("broken", 1, initializer=sys.exit)  # every worker dies while booting
    try:
        with pytest.raises(PoolStartError, match="fail to start"):
            broken.run(operator.add, 1, 1, timeout_s=5)
        monkeypatch.setattr(mr, "get_pool", lambda: broken)
        with pytest.raises(PoolStartError):
            mr.compute_score("x", "\\boxed{\\frac12}", "0.5")
        with pytest.raises(PoolStartError):
            mr.compute_score_batch(None, ["\\boxed{\\frac12}"], ["0.5"])
        assert mr.compute_score("x", "\\boxed{5}", "5")["score"] == 1.0  # the in-process path still works
    finally:
        broken.shutdown()


def test_pool_reports_process_start_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    """E.g. called inside a daemonic multiprocessing worker, where Process.start() raises."""
    import multiprocessing

    class _NoStart:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def start(self) -> None:
            raise AssertionError("daemonic processes are not allowed to have children")

    class _Ctx:
        Pipe = staticmethod(multiprocessing.Pipe)
        Process = _NoStart

    pool = DeadlinePool("nostart", 2)
    monkeypatch.setattr(pool, "_context", lambda: _Ctx())
    try:
        start = time.monotonic()
        with pytest.raises(PoolStartError, match="daemonic"):
            pool.run(operator.add, 1, 1, timeout_s=5)
        assert time.monotonic() - start < 5.0
        assert pool.warm(wait_s=10) == 0
        assert time.monotonic() - start < 8.0
    finally:
        pool.shutdown()


@pytest.mark.parametrize("name", ["compute_score", "compute_score_async"])
def test_loads_through_verls_custom_reward_loader(name: str) -> None:
    """verl 0.9.1's own loader (pkg:// path, reward_kwargs merged, async detected) accepts both entry points."""
    import inspect

    from omegaconf import OmegaConf
    from verl.trainer.ppo.reward import get_custom_reward_fn

    cfg = OmegaConf.create({"reward": {"custom_reward_function": {
        "path": "pkg://dyjr_verl.rewards.math", "name": name, "reward_kwargs": {"timeout_s": 3.0}}}})
    fn = get_custom_reward_fn(cfg)
    assert inspect.iscoroutinefunction(fn) == (name == "compute_score_async")
    out = fn(data_source="math500", solution_str="\\boxed{\\frac12}", ground_truth="0.5",
             extra_info={"num_turns": 1, "rollout_reward_scores": {}})
    if inspect.isawaitable(out):
        out = asyncio.run(out)
    assert out["score"] == 1.0 and set(out) == RESULT_KEYS


def test_works_when_verl_loads_the_file_by_path(repo_root: Path) -> None:
    """verl imports a file path under a private module name that workers cannot import by name."""
    from verl.utils.import_utils import load_extern_object

    fn = load_extern_object(module_path=str(repo_root / "dyjr_verl" / "rewards" / "math.py"), object_name="compute_score")
    assert fn.__module__.startswith("custom_module")
    assert fn("x", "\\boxed{\\frac12}", "0.5")["status"] == "correct"  # needs the pool
    batch = load_extern_object(module_path=str(repo_root / "dyjr_verl" / "rewards" / "math.py"), object_name="compute_score_batch")
    assert [o["score"] for o in batch(None, ["\\boxed{\\frac12}", "\\boxed{0.4}"], ["0.5", "0.5"])] == [1.0, 0.0]
