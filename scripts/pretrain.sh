#!/usr/bin/env bash
# Sets up .venv if needed, then pretrains the default small UNITER on the bundled synthetic
# world (generated into data/synthetic on first use). Extra arguments go to main.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python main.py --config=configs/pretrain.py --workdir=workdir/pretrain "$@"
