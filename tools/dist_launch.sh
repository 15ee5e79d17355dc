#!/usr/bin/env bash
# Shared launcher behind detection/ and segmentation/ tools/dist_{train,test}.sh:
#   bash tools/dist_launch.sh SCRIPT GPUS [SCRIPT arguments]
# runs SCRIPT on GPUS processes per node with torch.distributed.run and `--launcher pytorch`.
# Several machines: set NNODES, NODE_RANK, MASTER_ADDR and PORT on each. PYTHON picks the interpreter.
set -e
SCRIPT=$1
GPUS=$2
"${PYTHON:-python}" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --master_port="${PORT:-29500}" --nproc_per_node="$GPUS" \
    "$SCRIPT" "${@:3}" --launcher pytorch
