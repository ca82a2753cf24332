"""Reproducible rollouts across cluster shapes: verl's single-turn agent loop with one vLLM sampling
seed per trajectory.

Without per-request seeds vLLM samples from one generator per engine, so which tokens a prompt gets
depends on which replica served it and what else was in its batch: a dp = 1 and a dp = 2 run (one
vs two vLLM replicas) see different rollouts and their updates cannot be compared. verl's own
``rollout.full_determinism`` gives every request of a replica the *same* seed, so the n samples of
a GRPO group come out identical (zero advantage). Here each trajectory's seed is a hash of
(``rollout.seed``, the question's chat messages, how many times this worker has sampled that
question before): distinct within a group, identical for the same data order whatever the number
of replicas. Sampled tokens then depend only on the policy's probabilities (a flip needs a
near-tie between two tokens' values of ``p / Exp(1)`` noise, at the level of the replicas' numeric
differences).

The draw count lives in the agent-loop worker process, so the guarantee needs one agent-loop worker
(``actor_rollout_ref.rollout.agent.num_workers=1``, the CPU recipes' setting). Selected through
verl's agent-loop config file (:func:`write_agent_loop_config` writes it)::

    actor_rollout_ref.rollout.agent.agent_loop_config_path=<dir>/agent_loops.yaml
    actor_rollout_ref.rollout.agent.default_agent_loop=dyjr_seeded_single_turn
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop

AGENT_LOOP_NAME = "dyjr_seeded_single_turn"


def trajectory_seed(base_seed: int, raw_prompt: Any, draw: int) -> int:
    """A 31-bit sampling seed for the ``draw``-th sample of a question (stable across processes)."""
    payload = json.dumps([int(base_seed), raw_prompt, int(draw)], sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(payload.encode("utf-8")).digest()[:4], "little") & 0x7FFFFFFF


def write_agent_loop_config(directory: str | Path) -> list[str]:
    """Write verl's agent-loop config file naming this loop; returns the overrides that select it."""
    path = Path(directory) / "agent_loops.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"- name: {AGENT_LOOP_NAME}\n  _target_: {__name__}.SeededSingleTurnAgentLoop\n")
    return [
        f"actor_rollout_ref.rollout.agent.agent_loop_config_path={path}",
        f"actor_rollout_ref.rollout.agent.default_agent_loop={AGENT_LOOP_NAME}",
    ]


class SeededSingleTurnAgentLoop(SingleTurnAgentLoop):
    """verl's single-turn agent loop; each trajectory samples with :func:`trajectory_seed`."""

    # per worker process: verl builds one agent-loop object per trajectory
    draws: ClassVar[Counter] = Counter()

    async def run(self, sampling_params: dict[str, Any], **kwargs):
        # counted before the first await, so in the batch's order (asyncio starts tasks FIFO)
        question = json.dumps(list(kwargs["raw_prompt"]), sort_keys=True, default=str)
        draw = self.draws[question]
        self.draws[question] += 1
        seed = trajectory_seed(self.rollout_config.seed, question, draw)
        return await super().run({**sampling_params, "seed": seed}, **kwargs)
