"""Old home of the baselines' commands and settings, kept as re-exports for the recipes' comments
(``python -m dyjr_verl.baselines.rlep_collect`` / ``rlep_import``) and ``dyjr_verl.baselines.config``.
The methods live in :mod:`dyjr_verl.methods` (``rlep/``, ``exgrpo/``)."""
