"""``python -m casestudies.detection.grid``: the ablation grid's command line (see the package docstring)."""

import sys

from casestudies.detection.grid.cli import main

sys.exit(main())
