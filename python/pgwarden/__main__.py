"""``python -m pgwarden``: the same as the ``pgwarden`` command."""

import sys

from pgwarden.cli import main

sys.exit(main())
