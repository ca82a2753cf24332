"""Data preparation: local files / Spider / BIRD / hub datasets -> verl's RL parquet schema.

``python -m dyjr_verl.data.math ...`` and ``python -m dyjr_verl.data.sql ...``; see :mod:`.schema` for the
row layout shared by both.
"""
