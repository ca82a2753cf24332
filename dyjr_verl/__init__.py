"""dyjr-verl: DyJR (Dynamic Jensen-Shannon Replay) and its replay baselines as drop-in verl components.

Importing this package is deliberately cheap (no torch, no verl): verl loads
:mod:`dyjr_verl.plugin` in every process, rollout servers included.
"""

__version__ = "0.1.0"

VERL_VERSION = "0.9.1"  # the verl release every shim and patch in this package is written against
