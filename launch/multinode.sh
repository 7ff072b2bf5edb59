#!/usr/bin/env bash
# Multi-node megadmd training with the deepspeed launcher (passwordless ssh between the nodes).
#
#   bash launch/multinode.sh launch/hostfile launch/configs/fastwan2.1-t2v-1.3b-vsa.yaml [--set k=v ...]
#
# The deepspeed launcher ssh-es into every host of the hostfile (pdsh) and starts one process per
# slot. Environment variables reach the other nodes only if they start with PYTHON, NCCL, UCX, MV2
# or MLFLOW, or are listed in ./.deepspeed_env (see launch/deepspeed_env.example).
set -euo pipefail
HOSTFILE=${1:?usage: multinode.sh HOSTFILE CONFIG [extra megadmd args]}
CONFIG=${2:?usage: multinode.sh HOSTFILE CONFIG [extra megadmd args]}
shift 2
MASTER_ADDR=${MASTER_ADDR:-$(grep -v '^\s*#' "$HOSTFILE" | awk 'NF {print $1; exit}')}
MASTER_PORT=${MASTER_PORT:-29500}
exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  --module megadmd train --config "$CONFIG" "$@"
