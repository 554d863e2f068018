#!/usr/bin/env bash
# The product in one command: installs what it needs, then runs `attention-planner demo` on the CPU.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
attention-planner demo "$@"
