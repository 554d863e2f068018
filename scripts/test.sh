#!/usr/bin/env bash
# Installs what the tests need, then runs them (GPU tests skip without CUDA; Triton kernels run on its interpreter).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
python -m pytest -q "$@"
