"""`python -m wan_core ...`: see `wan_core.cli`."""

import sys

from .cli import main

sys.exit(main())
