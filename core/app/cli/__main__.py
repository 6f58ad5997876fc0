"""``python -m age_explorer.core.app.cli``: the ``age-explorer`` command without the console script."""

import sys

from .main import main

sys.exit(main())
