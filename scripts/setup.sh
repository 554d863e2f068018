#!/usr/bin/env bash
# Creates .venv (once) and installs attention-planner with its test extras into it. Sourced by demo.sh and test.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import torch, sys; sys.exit(0 if tuple(map(int, torch.__version__.split('+')[0].split('.')[:2])) >= (2, 11) else 1)" 2>/dev/null; then
  # 2.13.0 is the pinned build this project is tested with; on a machine with a local wheel cache it installs offline.
  python -m pip install -q "torch==2.13.0"
fi
if ! python -c "import planner, pytest, transformers, matplotlib" 2>/dev/null; then
  python -m pip install -q -e ".[test]"
fi
