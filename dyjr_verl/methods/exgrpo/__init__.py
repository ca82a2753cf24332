"""Ex-GRPO (arXiv 2510.02245): the ``exgrpo:`` node (:mod:`.config`), the online experience pool
with its buckets (:mod:`.pool`), the shaped policy-gradient replay term (:mod:`.loss`) and trainer
mode ``exgrpo`` (:mod:`.trainer`)."""
