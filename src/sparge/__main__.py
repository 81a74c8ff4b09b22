"""``python -m sparge``: the ``sparge`` command line."""

import sys

from .cli import main

sys.exit(main())
