"""``python -m auto_round``: the ``auto-round`` command (also what ``torchrun -m auto_round`` starts for a
data-parallel run, :mod:`auto_round.tuning.parallel`)."""

import sys

from auto_round._entry import main

if __name__ == "__main__":
    sys.exit(main())
