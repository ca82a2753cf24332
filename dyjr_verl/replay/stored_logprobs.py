"""Which recorded log-prob a replay method stores for each token, and the verl settings that make a
choice impossible (refused) or biased (warned). Shared by every method with such a setting
(``dyjr.buffer.logprobs``, ``exgrpo.pool.logprobs``); the method passes its setting's name and what
the bias does to its own loss.

* ``rollout``: vLLM's log-prob of the token as sampled (``rollout_log_probs``): verl records it
  only with ``rollout.calculate_log_probs=true``, and with a ``*_logits`` ``logprobs_mode`` it
  would be a logit. With top-p < 1 or top-k > 0 vLLM renormalises over the kept tokens, so every
  stored log-prob exceeds the untruncated one the trainer compares it with (u < 1 throughout).
* ``old``: verl's recomputed log-prob of the rollout policy (``old_log_probs``), which verl does
  not compute in rollout-correction bypass mode.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LOGPROBS_FIELDS", "stored_logprobs_problems", "stored_logprobs_warnings"]

#: a ``logprobs`` choice -> the step's field whose values are stored as each token's log-prob
LOGPROBS_FIELDS = {"rollout": "rollout_log_probs", "old": "old_log_probs"}

_ROLLOUT = "actor_rollout_ref.rollout"


def stored_logprobs_problems(setting: str, choice: str, config: Any) -> list[str]:
    """``setting=choice`` when this verl config does not produce those log-probs (one line each)."""
    from omegaconf import OmegaConf

    from dyjr_verl.diagnostics.config import bypass_mode

    if choice == "old":
        if bypass_mode(config):
            return [f"{setting}=old stores verl's recomputed old log-probs, but with "
                    "algorithm.rollout_correction.bypass_mode=true verl recomputes none (old_log_probs := vLLM's "
                    f"rollout log-probs): use {setting}=rollout, or bypass_mode=false"]
        return []
    if not OmegaConf.select(config, f"{_ROLLOUT}.calculate_log_probs", default=True):
        return [f"{setting}=rollout stores vLLM's log-probs, which verl records only with "
                f"{_ROLLOUT}.calculate_log_probs=true: set it, or {setting}=old"]
    mode = str(OmegaConf.select(config, f"{_ROLLOUT}.logprobs_mode", default="processed_logprobs"))
    if mode.endswith("_logits"):
        return [f"{setting}=rollout with {_ROLLOUT}.logprobs_mode={mode} would store logits, not "
                f"log-probs: use logprobs_mode=processed_logprobs, or {setting}=old"]
    return []


def stored_logprobs_warnings(setting: str, choice: str, config: Any, consequence: str) -> list[str]:
    """``setting=rollout`` with truncated sampling: every replayed token has u < 1 even for an
    unchanged policy; ``consequence`` says what that does to the method's loss."""
    from omegaconf import OmegaConf

    if choice != "rollout":
        return []
    mode = str(OmegaConf.select(config, f"{_ROLLOUT}.logprobs_mode", default="processed_logprobs"))
    if mode != "processed_logprobs":
        return []  # raw log-probs are taken before top-k / top-p (logits modes are refused)
    top_p = float(OmegaConf.select(config, f"{_ROLLOUT}.top_p", default=None) or 1.0)
    top_k = int(OmegaConf.select(config, f"{_ROLLOUT}.top_k", default=None) or -1)  # 0 and -1: off
    truncated = [text for text, on in ((f"top_p={top_p:g}", top_p < 1), (f"top_k={top_k}", top_k > 0)) if on]
    if not truncated:
        return []
    return [f"{setting}=rollout with {_ROLLOUT}.{' and '.join(truncated)}: vLLM's stored log-probs are "
            f"renormalised over the kept tokens, so EVERY replayed token has u = pi_theta / pi_stored < 1 and "
            f"{consequence}: set {setting}=old (verl's recomputed log-probs), or top_p=1 and top_k=-1"]
