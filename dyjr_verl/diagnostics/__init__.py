"""Diagnostics for every method, GRPO included: the Rank-k probe of verl's old-log-prob forward
(:mod:`.probe`), its ``diagnostics:`` node (:mod:`.config`), the top-k record it can compute
(:mod:`.topk_record`) and trainer mode ``sync_rank_k`` (:mod:`.trainer`)."""
