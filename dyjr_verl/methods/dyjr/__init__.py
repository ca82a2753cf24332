"""DyJR (Dynamic Jensen-Shannon Replay): the ``dyjr:`` node (:mod:`.config`), the time-sensitive
buffer (:mod:`.buffer`), the divergence terms (:mod:`.divergence`), the ``dyjr_js`` policy loss (:mod:`.policy_loss`),
the exact top-k JS estimator (:mod:`.topk`, :mod:`.topk_jsd`) and trainer mode ``dyjr``
(:mod:`.trainer`)."""
