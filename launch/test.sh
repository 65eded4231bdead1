#!/usr/bin/env bash
# Run the whole test suite (sets up .venv first when needed). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup.sh
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
# Without arguments: every test under tests/. Arguments replace that selection (e.g. tests/unit -x).
exec .venv/bin/python -m pytest "${@:-tests}"
