#!/usr/bin/env bash
# ./setup.sh — create .venv and install dpo-ray with its test extras; a second run only checks a stamp.
# torch is pinned through constraints.txt (torch==2.13.0) so a CPU machine never pulls CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.dpo-ray-install-stamp
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]"
  echo "$want" > "$stamp"
fi
