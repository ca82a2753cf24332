"""Start-up check and ``plan`` for ``dyjr.buffer.logprobs`` (what each stored token's log-prob is):
a loud warning when vLLM's stored log-probs are truncated by top-p / top-k (every replayed token
then has u < 1 and is pulled up), one error line for a choice the config cannot produce."""

from __future__ import annotations

import pytest

from dyjr_verl.plan import build_plan, compose
from dyjr_verl.plan import main as plan_main

ROLLOUT = "actor_rollout_ref.rollout"
WARNING = "dyjr.buffer.logprobs=rollout with actor_rollout_ref.rollout."


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("data")
    for name in ("train.parquet", "test.parquet"):
        (root / name).write_bytes(b"")  # the check looks for the files, never reads them
    return [f"data.train_files={root / 'train.parquet'}", f"data.val_files={root / 'test.parquet'}"]


def _plan(data, *overrides):
    return build_plan(compose("dyjr_math", [*data, *overrides]))


def _ours(lines):
    return [w for w in lines if "dyjr.buffer.logprobs" in w]


@pytest.mark.parametrize("overrides, shown", [
    ([f"{ROLLOUT}.top_p=0.95"], "top_p=0.95"),
    ([f"{ROLLOUT}.top_k=50"], "top_k=50"),
    ([f"{ROLLOUT}.top_p=0.9", f"{ROLLOUT}.top_k=20"], "top_p=0.9 and top_k=20"),
])
def test_truncated_sampling_with_the_rollout_log_probs_warns(data, overrides, shown, capsys):
    plan = _plan(data, *overrides)
    assert plan.errors == []
    (line,) = _ours(plan.warnings)
    assert line.startswith(f"{WARNING}{shown}: ")
    assert "EVERY replayed token has u = pi_theta / pi_stored < 1" in line and "sharpening" in line
    assert "dyjr.buffer.logprobs=old" in line  # the way out
    # `python -m dyjr_verl plan` prints it as a warning line (the start-up callback prints the same list)
    assert plan_main(["--config-name", "dyjr_math", *data, *overrides]) == 0
    assert f"dyjr-verl: warning: {line}" in capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("overrides", [
    [],  # the recipe: top_p=1, top_k=-1
    [f"{ROLLOUT}.top_k=0"],  # 0 is "off" as well (HF rollout's convention)
    [f"{ROLLOUT}.top_p=1.0", f"{ROLLOUT}.top_k=-1"],
    [f"{ROLLOUT}.top_p=0.9", "dyjr.buffer.logprobs=old"],  # verl's recomputed log-probs are not truncated
    [f"{ROLLOUT}.top_p=0.9", f"{ROLLOUT}.logprobs_mode=raw_logprobs"],  # taken before top-p
    [f"{ROLLOUT}.top_p=0.9", "dyjr.enable=false"],  # plain GRPO: nothing is stored
])
def test_no_warning_otherwise(data, overrides):
    plan = _plan(data, *overrides)
    assert plan.errors == [] and _ours(plan.warnings) == []


@pytest.mark.parametrize("overrides, start", [
    (["dyjr.buffer.logprobs=old", "algorithm.rollout_correction.bypass_mode=true"],
     "dyjr.buffer.logprobs=old stores verl's recomputed old log-probs, but with "
     "algorithm.rollout_correction.bypass_mode=true verl recomputes none"),
    ([f"{ROLLOUT}.calculate_log_probs=false"],
     "dyjr.buffer.logprobs=rollout stores vLLM's log-probs, which verl records only with "
     f"{ROLLOUT}.calculate_log_probs=true"),
    ([f"{ROLLOUT}.logprobs_mode=processed_logits"],
     f"dyjr.buffer.logprobs=rollout with {ROLLOUT}.logprobs_mode=processed_logits would store logits"),
])
def test_a_choice_the_config_cannot_produce_is_one_error_line(data, overrides, start, capsys):
    plan = _plan(data, *overrides)
    (line,) = _ours(plan.errors)
    assert line.startswith(start)
    assert plan_main(["--config-name", "dyjr_math", *data, *overrides]) == 2
    assert f"dyjr-verl: error: {line}" in capsys.readouterr().out.splitlines()


def test_the_recomputed_log_probs_need_no_rollout_log_probs(data):
    plan = _plan(data, "dyjr.buffer.logprobs=old", f"{ROLLOUT}.calculate_log_probs=false")
    assert _ours(plan.errors) == [] and _ours(plan.warnings) == []
