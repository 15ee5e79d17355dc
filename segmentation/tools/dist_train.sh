#!/usr/bin/env bash
# bash tools/dist_train.sh CONFIG GPUS [tools/train.py options]
# Several machines: set NNODES, NODE_RANK, MASTER_ADDR and PORT on each. PYTHON picks the interpreter.
HERE="$(cd "$(dirname "$0")" && pwd)"
exec bash "$HERE/../../tools/dist_launch.sh" "$HERE/train.py" "$2" "$1" "${@:3}"
