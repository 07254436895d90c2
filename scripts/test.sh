#!/usr/bin/env bash
# Installs everything the tests need on a fresh machine, lints, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
# A native crash prints every thread's stack instead of a bare exit code.
export PYTHONFAULTHANDLER=1
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# Triton kernels run on the CPU through the interpreter (tests/kernels/conftest.py sets TRITON_INTERPRET=1).
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
