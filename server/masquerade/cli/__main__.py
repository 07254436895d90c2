"""`python -m masquerade.cli ...`, the same as the `masquerade` console script."""

import sys

from masquerade.cli import main

sys.exit(main())
