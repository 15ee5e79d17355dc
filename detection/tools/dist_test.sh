#!/usr/bin/env bash
# bash tools/dist_test.sh CONFIG CHECKPOINT GPUS [tools/test.py options]
# Several machines: set NNODES, NODE_RANK, MASTER_ADDR and PORT on each. PYTHON picks the interpreter.
HERE="$(cd "$(dirname "$0")" && pwd)"
exec bash "$HERE/../../tools/dist_launch.sh" "$HERE/test.py" "$3" "$1" "$2" "${@:4}"
