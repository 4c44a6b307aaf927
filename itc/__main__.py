"""``python -m itc``: the same as the ``itc`` command."""

import sys

from . import main

sys.exit(main())
