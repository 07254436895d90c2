"""`python -m masquerade.cli ...`, the same as the `masquerade` console script."""

from masquerade.cli import run

run()
