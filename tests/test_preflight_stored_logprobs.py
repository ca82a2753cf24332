"""Start-up check and ``plan`` for the setting that says what each stored token's log-prob is
(``dyjr.buffer.logprobs``, ``exgrpo.pool.logprobs``; :mod:`dyjr_verl.replay.stored_logprobs`): a
loud warning when vLLM's stored log-probs are truncated by top-p / top-k (every replayed token then
has u < 1), one error line for a choice the config cannot produce (never a silent fallback to the
other field)."""

from __future__ import annotations

import pytest

from dyjr_verl.plan import build_plan, compose
from dyjr_verl.plan import main as plan_main

ROLLOUT = "actor_rollout_ref.rollout"
# (recipe, the method's node, its setting, what the warning says the bias does to that method's loss)
METHODS = [
    pytest.param("dyjr_math", "dyjr", "dyjr.buffer.logprobs", "sharpening", id="dyjr"),
    pytest.param("exgrpo_math", "exgrpo", "exgrpo.pool.logprobs", "importance weight w is biased low", id="exgrpo"),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("data")
    for name in ("train.parquet", "test.parquet"):
        (root / name).write_bytes(b"")  # the check looks for the files, never reads them
    return [f"data.train_files={root / 'train.parquet'}", f"data.val_files={root / 'test.parquet'}"]


def _plan(recipe, data, *overrides):
    return build_plan(compose(recipe, [*data, *overrides]))


def _ours(lines, setting):
    return [w for w in lines if setting in w]


@pytest.mark.parametrize("recipe, node, setting, consequence", METHODS)
@pytest.mark.parametrize("overrides, shown", [
    ([f"{ROLLOUT}.top_p=0.95"], "top_p=0.95"),
    ([f"{ROLLOUT}.top_k=50"], "top_k=50"),
    ([f"{ROLLOUT}.top_p=0.9", f"{ROLLOUT}.top_k=20"], "top_p=0.9 and top_k=20"),
])
def test_truncated_sampling_with_the_rollout_log_probs_warns(recipe, node, setting, consequence, data, overrides,
                                                              shown, capsys):
    overrides = [f"{setting}=rollout", *overrides]
    plan = _plan(recipe, data, *overrides)
    assert plan.errors == []
    (line,) = _ours(plan.warnings, setting)
    assert line.startswith(f"{setting}=rollout with {ROLLOUT}.{shown}: ")
    assert "EVERY replayed token has u = pi_theta / pi_stored < 1" in line and consequence in line
    assert f"{setting}=old" in line  # the way out
    # `python -m dyjr_verl plan` prints it as a warning line (the start-up callback prints the same list)
    assert plan_main(["--config-name", recipe, *data, *overrides]) == 0
    assert f"dyjr-verl: warning: {line}" in capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("recipe, node, setting, consequence", METHODS)
@pytest.mark.parametrize("overrides", [
    [],  # the recipe: top_p=1, top_k=-1
    [f"{ROLLOUT}.top_k=0"],  # 0 is "off" as well (HF rollout's convention)
    [f"{ROLLOUT}.top_p=1.0", f"{ROLLOUT}.top_k=-1"],
    [f"{ROLLOUT}.top_p=0.9", "{setting}=old"],  # verl's recomputed log-probs are not truncated
    [f"{ROLLOUT}.top_p=0.9", f"{ROLLOUT}.logprobs_mode=raw_logprobs"],  # taken before top-p
    [f"{ROLLOUT}.top_p=0.9", "{node}.enable=false"],  # plain GRPO: nothing is stored
])
def test_no_warning_otherwise(recipe, node, setting, consequence, data, overrides):
    overrides = [f"{setting}=rollout", *(o.format(setting=setting, node=node) for o in overrides)]
    plan = _plan(recipe, data, *overrides)
    assert plan.errors == [] and _ours(plan.warnings, setting) == []


@pytest.mark.parametrize("recipe, node, setting, consequence", METHODS)
@pytest.mark.parametrize("overrides, start", [
    (["{setting}=old", "algorithm.rollout_correction.bypass_mode=true"],
     "{setting}=old stores verl's recomputed old log-probs, but with "
     "algorithm.rollout_correction.bypass_mode=true verl recomputes none"),
    (["{setting}=rollout", f"{ROLLOUT}.calculate_log_probs=false"],
     "{setting}=rollout stores vLLM's log-probs, which verl records only with "
     f"{ROLLOUT}.calculate_log_probs=true"),
    (["{setting}=rollout", f"{ROLLOUT}.logprobs_mode=processed_logits"],
     f"{{setting}}=rollout with {ROLLOUT}.logprobs_mode=processed_logits would store logits"),
])
def test_a_choice_the_config_cannot_produce_is_one_error_line(recipe, node, setting, consequence, data, overrides,
                                                               start, capsys):
    overrides = [o.format(setting=setting) for o in overrides]
    plan = _plan(recipe, data, *overrides)
    (line,) = _ours(plan.errors, setting)
    assert line.startswith(start.format(setting=setting))
    assert plan_main(["--config-name", recipe, *data, *overrides]) == 2
    assert f"dyjr-verl: error: {line}" in capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("recipe, node, setting, consequence", METHODS)
def test_the_recomputed_log_probs_need_no_rollout_log_probs(recipe, node, setting, consequence, data):
    plan = _plan(recipe, data, f"{setting}=old", f"{ROLLOUT}.calculate_log_probs=false")
    assert _ours(plan.errors, setting) == [] and _ours(plan.warnings, setting) == []
