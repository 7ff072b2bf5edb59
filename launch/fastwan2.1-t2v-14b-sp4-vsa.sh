#!/usr/bin/env bash
# Wan2.1-T2V-14B sparse distillation on 64 GPUs with sequence parallelism 4 (each sp group inside
# one node) and VSA sparsity 0.9. Check the layout first:
#   megadmd plan --preset wan2.1-t2v-14b --nodes 8 --gpus-per-node 8 --sp 4 --vsa-sparsity 0.9
set -euo pipefail
cd "$(dirname "$0")/.."
exec bash launch/multinode.sh "${HOSTFILE:-launch/hostfile}" launch/configs/fastwan2.1-t2v-14b-sp4-vsa.yaml "$@"
