"""RLEP (arXiv 2507.07451): the ``rlep:`` node (:mod:`.config`), the static experience pool
(:mod:`.pool`), its offline collection (:mod:`.collect`) and import of the released pool
(:mod:`.importer`), and trainer mode ``rlep`` (:mod:`.trainer`)."""
