"""``python -m finegrain``: the command line (``finegrain.cli``)."""

import sys

from finegrain.cli import main

sys.exit(main())
