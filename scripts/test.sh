#!/usr/bin/env bash
# Installs everything the tests need on a fresh machine, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export TRITON_INTERPRET=1  # Triton kernels run on the CPU through the interpreter
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
