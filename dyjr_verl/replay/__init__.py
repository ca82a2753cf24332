"""The replay core, shared by every method and knowing none of them by name.

* :mod:`.config`: typed config nodes (``ConfigNode``, ``Checker``, ``ConfigError``) and the shared
  ``replay`` node;
* :mod:`.rows`: the row contract (fields the replay-aware loss reads, the normalisers) and the
  compact stored row (``Trajectory``); :mod:`.codec`: the one TensorDict <-> rows codec and
  temporary TransferQueue rows; :mod:`.questions`: question identity of question-keyed stores;
* :mod:`.layout`: where replayed rows go in verl's mini-batches;
* :mod:`.terms` + :mod:`.loss`: the replay-aware loss and the registry of replay terms;
* :mod:`.base`: the abstract replay trainer; :mod:`.update_strategy` (rows at the actor update) and
  :mod:`.group_strategy` + :mod:`.group_rows` (rows inside their GRPO group); :mod:`.checkpoint`:
  the store beside verl's checkpoint.
"""
