#!/usr/bin/env bash
# The test command: installs what it needs, then runs the whole suite (pure and
# integration tests). During development, `-m "not integration"` runs the pure ones.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
export VLLM_LOGGING_LEVEL=${VLLM_LOGGING_LEVEL:-WARNING}
python -m pytest -q --durations=15 tests "$@"  # the 15 slowest tests, to keep CI time in view
