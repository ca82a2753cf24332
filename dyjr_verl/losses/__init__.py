"""Losses: the sampled-token JS generator (+ the ``dyjr_js`` registry loss) and the replay-aware
engine loss. Importing this package imports torch and registers ``dyjr_js`` with verl."""

from dyjr_verl.losses.js import (
    DEFAULT_LOG_U_CLAMP,
    compute_policy_loss_dyjr_js,
    f_js,
    f_js_from_log,
    js_grad_weight,
    js_grad_weight_from_log,
    js_term,
    register_policy_losses,
)
from dyjr_verl.losses.replay_loss import (
    REPLAY_TERMS,
    ReplayLossSpec,
    make_replay_loss_fn,
    minibatch_normalizer_fields,
    register_replay_term,
    replay_aware_loss,
)

__all__ = [
    "DEFAULT_LOG_U_CLAMP",
    "compute_policy_loss_dyjr_js",
    "f_js",
    "f_js_from_log",
    "js_grad_weight",
    "js_grad_weight_from_log",
    "js_term",
    "register_policy_losses",
    "REPLAY_TERMS",
    "ReplayLossSpec",
    "make_replay_loss_fn",
    "minibatch_normalizer_fields",
    "register_replay_term",
    "replay_aware_loss",
]
