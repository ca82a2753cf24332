"""Embedded default assets (tiny model, local tokenizer, generated tasks): see :mod:`.build`."""
