#!/usr/bin/env bash
# The README's test command: does all the set-up (.venv with the pinned environment, mmcv built once per machine and
# cached, mmdet/mmseg/mmpretrain), lints with ruff and runs the whole test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/setup_env.sh" --mm
cd "$ROOT"
export PYTHONUNBUFFERED=1
echo "[tests] ruff check and ruff format --check"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest tests -q --durations=15 "$@"
