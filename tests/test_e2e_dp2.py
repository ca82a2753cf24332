"""dp = 2 end to end on CPU: DyJR and Ex-GRPO through ``python -m verl.trainer.main_ppo`` with two FSDP
ranks (gloo) and two vLLM-CPU rollout replicas (``trainer.n_gpus_per_node=2``), against the same run
at dp = 1.

Opt-in (``-m dp2``, ``make test-dp2``): four trainer runs, about 10 minutes on 2 cores when the
machine is otherwise idle (see ``benchmarks/dp2_e2e.md``). Each run takes the machine-wide lock
``/tmp/dyjr_e2e.lock`` itself (``e2e_utils.run_main_ppo``), so do not wrap this file in ``flock``.

Both shapes see the same data and the same rollouts, so their first updates can be compared:

* the same rollouts: each trajectory samples with its own seed (:mod:`dyjr_verl.seeded_rollout`)
  and vLLM computes in float32, so a token does not depend on which replica served it or what else
  was in its batch (the tests check that the rollout metrics agree exactly);
* one optimizer step per training step (``ppo_mini_batch_size`` = the prompts per step), so the
  update is the same sum over the same rows whatever rank holds them; ``trainer.balance_batch=false``
  and micro-batches of 4 rows for the update and the old-log-prob forward.

What still differs is the *row order*: verl's v1 trainer takes a step's rows in the order the
trajectories finished (``ReplayBuffer._materialize_batch`` iterates TransferQueue's metadata in
arrival order), which depends on timing and on the number of replicas. Rows therefore share
micro-batches with different neighbours and padding lengths, the bf16 forward/backward (verl's
FSDP ``param_dtype``) rounds them differently, and a GRPO gradient, a sum of +-A terms that largely
cancel, magnifies that rounding. Measured on the same seeds (``benchmarks/dp2_e2e.md``): two dp = 1
runs differ by 1.3e-4 in the first update's grad-norm, dp = 1 and dp = 2 by at most 6.4e-4; the
losses by 2e-5. :data:`REL_TOL` is 2e-3, 3x the largest measured difference; a dp error (a normaliser
counted per rank, a row counted on both ranks) moves these numbers by a factor of order 2. After one
update the noise compounds: the step-2 grad-norm differs by 3.5 % between two dp = 1 runs, so from
step 2 on only the losses are compared. The arrival order also decides the order of DyJR's buffer,
so which stored rows DyJR replays at step 2 may differ between runs (Ex-GRPO picks its replayed
trajectory by entropy, not by position, and replays the same rows on both shapes).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dyjr_verl.seeded_rollout import write_agent_loop_config
from e2e_utils import run_main_ppo

pytestmark = [pytest.mark.e2e, pytest.mark.dp2]

REL_TOL = 2e-3  # 3x the largest dp = 1 vs dp = 2 difference measured (module docstring)
ABS_TOL = 1e-6  # for values near 0: an on-policy GRPO loss is a token mean of +-A terms that nearly cancel

# metrics computed from the rollouts alone (tokens and rewards): equal only when the tokens are
ROLLOUT_KEYS = ("response_length/mean", "response_length/max", "response_length/min", "prompt_length/mean",
                "critic/score/mean", "critic/advantages/max", "critic/advantages/min")
# the update: verl's actor loss (dp-averaged), its PG part (summed over micro-batches, dp-averaged)
# and the gradient norm before clipping (over the whole, sharded, model)
UPDATE_KEYS = ("actor/loss", "actor/pg_loss", "actor/grad_norm")
# after the first update: the losses (the grad-norm's run-to-run noise grows, module docstring)
LOSS_KEYS = ("actor/loss", "actor/pg_loss")


@pytest.fixture(scope="module")
def same_inputs(tmp_path_factory):
    """Overrides that give dp = 1 and dp = 2 identical rollouts and micro-batches (module docstring)."""
    return [
        *write_agent_loop_config(tmp_path_factory.mktemp("agent_loops")),
        "actor_rollout_ref.rollout.dtype=float32",
        "actor_rollout_ref.actor.ppo_mini_batch_size=8",  # = data.train_batch_size: one optimizer step
        # old-log-prob forwards in the update's micro-batches of 4, which never straddle a rank's
        # 16 rows or a block of replayed rows
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
        "trainer.balance_batch=false",
    ]


class Runs:
    """Trainer runs of this module, started on first use and shared by its tests."""

    def __init__(self, assets: Path, root: Path, same_inputs: list[str]):
        self.assets, self.root, self.same_inputs = assets, root, same_inputs
        self._done: dict[tuple[str, int], object] = {}

    def get(self, recipe: str, dp: int, steps: int, *overrides: str):
        key = (recipe, dp)
        if key not in self._done:
            self._done[key] = run_main_ppo(  # takes the machine-wide lock itself
                recipe, self.assets, self.root / f"{recipe}_dp{dp}",
                f"trainer.n_gpus_per_node={dp}", f"trainer.total_training_steps={steps}",
                *self.same_inputs, *overrides,
            )
        return self._done[key]


@pytest.fixture(scope="module")
def runs(tiny_assets, tmp_path_factory, same_inputs):
    return Runs(tiny_assets, tmp_path_factory.mktemp("dp2"), same_inputs)


def _processes(run, actor: str) -> set[str]:
    """pids of one kind of Ray actor in the console log (Ray prefixes each line with it)."""
    return set(re.findall(rf"\({actor} pid=(\d+)\)", run.log))


def assert_ran(run, steps: int, dp: int) -> None:
    assert run.returncode == 0, run.tail()
    assert sorted(run.steps) == list(range(1, steps + 1)), run.tail()
    # dp FSDP ranks (verl's fused actor/rollout workers) and one vLLM replica each (TP 1)
    assert len(_processes(run, "WorkerDict")) == dp, (_processes(run, "WorkerDict"), run.tail())
    assert len(_processes(run, "vLLMHttpServer")) == dp, (_processes(run, "vLLMHttpServer"), run.tail())


def assert_same_update(dp1, dp2, step: int, keys=UPDATE_KEYS) -> None:
    a, b = dp1.steps[step], dp2.steps[step]
    for key in ROLLOUT_KEYS:
        assert a[key] == b[key], (step, key, a[key], b[key])  # the same rollouts, token for token
    for key in keys:
        assert b[key] == pytest.approx(a[key], rel=REL_TOL, abs=ABS_TOL), (step, key, a[key], b[key])
    assert a["actor/grad_norm"] > 0.0  # a real update, not 0 == 0


# every rollout enters the buffer (as in test_e2e_main_ppo): 32 rows to draw the 8 replayed rows
# of a step from, so the draw never runs short, on either shape
DYJR = ("dyjr.buffer.admit=all",)


def test_dyjr_dp2_replays_on_every_step_after_the_first(runs):
    run = runs.get("dyjr_tiny_cpu", 2, 3, *DYJR)
    assert_ran(run, 3, dp=2)
    rows = [run.steps[s]["dyjr/replay/rows"] for s in (1, 2, 3)]
    assert rows[0] == 0 and all(r > 0 for r in rows[1:]), rows
    for s in (2, 3):
        m = run.steps[s]
        # replay rows per mini-batch: a multiple of dp x micro-batch = 8
        assert m["dyjr/replay/rows"] % 8 == 0, m["dyjr/replay/rows"]
        # the loss saw them (across both ranks) through the JS term
        assert m["actor/replay/rows"] > 0 and m["actor/replay/tokens"] > 0 and abs(m["actor/replay/term"]) > 0, m
        assert 0.1 < m["actor/replay/u_mean"] < 10
    # the weights vLLM samples with are the weights FSDP trains, on both replicas
    assert max(run.steps[s]["training/rollout_probs_diff_mean"] for s in (1, 2, 3)) < 0.05


def test_dyjr_dp2_updates_equal_dp1_on_the_same_data(runs):
    dp2 = runs.get("dyjr_tiny_cpu", 2, 3, *DYJR)
    dp1 = runs.get("dyjr_tiny_cpu", 1, 2, *DYJR)
    assert_ran(dp1, 2, dp=1)
    assert_ran(dp2, 3, dp=2)
    assert_same_update(dp1, dp2, 1)  # the first update: fresh rows only
    # step 2: as many replayed rows on both shapes (8 = one per 4 fresh rows, a multiple of dp x micro),
    # the same fresh rollouts from the same updated weights, and the same PG loss on them
    assert dp1.steps[2]["dyjr/replay/rows"] == dp2.steps[2]["dyjr/replay/rows"] == 8
    assert_same_update(dp1, dp2, 2, keys=("actor/pg_loss",))  # the fresh rows' PG loss: replayed rows may differ


def test_exgrpo_dp2_updates_equal_dp1_on_the_same_data(runs):
    # 16 questions revisited every 2 steps and replay on from step 2 (as in test_e2e_baselines)
    overrides = ("exgrpo.start_accuracy=0.0", "data.train_max_samples=16")
    dp1 = runs.get("exgrpo_tiny_cpu", 1, 2, *overrides)
    dp2 = runs.get("exgrpo_tiny_cpu", 2, 2, *overrides)
    assert_ran(dp1, 2, dp=1)
    assert_ran(dp2, 2, dp=2)
    assert_same_update(dp1, dp2, 1)
    # the step with replayed trajectories in the update: K-1 fresh + 1 stored row per experience
    # question, the same rows on both shapes, the shaped term normalised across both ranks
    for key in ("exgrpo/replay/rows", "exgrpo/replay/tokens"):
        assert dp1.steps[2][key] == dp2.steps[2][key] > 0, key
    assert dp2.steps[2]["actor/replay/rows"] > 0  # the loss saw them
    assert_same_update(dp1, dp2, 2, keys=(*LOSS_KEYS, "actor/replay/term"))
