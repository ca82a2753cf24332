"""Experiments built on the recipes: the miniature reproduction of issue 7 (``mini``)."""
