#!/usr/bin/env bash
# Installs Masquerade into .venv and starts the gRPC server (extra flags go to `masquerade serve`).
# Without real weights it serves the classical methods and says why REVERSE_PERSONALIZATION is off;
# `scripts/serve.sh --models tiny` serves the whole diffusion path on tiny random weights.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/masquerade serve "$@"
