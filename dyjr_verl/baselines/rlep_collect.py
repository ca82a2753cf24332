"""``python -m dyjr_verl.baselines.rlep_collect`` = ``python -m dyjr_verl.methods.rlep.collect`` (kept for old command lines)."""

import sys

from dyjr_verl.methods.rlep.collect import main

if __name__ == "__main__":
    sys.exit(main())
