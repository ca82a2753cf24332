"""Re-exports of the losses (kept for ``from dyjr_verl.losses import ...``): DyJR's divergence terms
are :mod:`dyjr_verl.methods.dyjr.divergence`, the ``dyjr_js`` policy loss :mod:`dyjr_verl.methods.dyjr.policy_loss`, the replay-aware
engine loss :mod:`dyjr_verl.replay.loss` with its term registry :mod:`dyjr_verl.replay.terms`.
Importing this package imports torch and registers ``dyjr_js`` with verl."""

from dyjr_verl.methods.dyjr.divergence import (
    DEFAULT_LOG_U_CLAMP,
    dyjr_loss_spec,
    f_js,
    f_js_from_log,
    js_grad_weight,
    js_grad_weight_from_log,
    js_term,
)
from dyjr_verl.methods.dyjr.policy_loss import compute_policy_loss_dyjr_js, register_policy_losses
from dyjr_verl.replay.loss import replay_aware_loss
from dyjr_verl.replay.rows import minibatch_normalizer_fields
from dyjr_verl.replay.terms import REPLAY_TERMS, ReplayLossSpec, make_replay_loss_fn, register_replay_term

__all__ = [
    "DEFAULT_LOG_U_CLAMP",
    "compute_policy_loss_dyjr_js",
    "dyjr_loss_spec",
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
