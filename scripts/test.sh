#!/usr/bin/env bash
# Sets up .venv if needed, then runs the whole test suite on 8 fake CPU devices.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh --test
exec .venv/bin/python -m pytest tests "$@"
