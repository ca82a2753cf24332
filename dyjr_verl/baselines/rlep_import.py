"""``python -m dyjr_verl.baselines.rlep_import`` = ``python -m dyjr_verl.methods.rlep.importer`` (kept for old command lines)."""

import sys

from dyjr_verl.methods.rlep.importer import main

if __name__ == "__main__":
    sys.exit(main())
