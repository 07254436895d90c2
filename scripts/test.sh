#!/usr/bin/env bash
# Installs everything the tests need on a fresh machine, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
# Triton kernels run on the CPU through the interpreter (tests/kernels/conftest.py sets TRITON_INTERPRET=1).
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
