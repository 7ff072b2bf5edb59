#!/usr/bin/env bash
# Wan2.1-T2V-1.3B sparse distillation on 64 GPUs (8 nodes x 8), FastVideo's published recipe:
# lr 2e-6, 4000 steps, flow shift 8, steps 1000,757,522, VSA sparsity 0.8, checkpoint every 500
# and validation every 200 steps. Edit the model and data paths in the config first.
set -euo pipefail
cd "$(dirname "$0")/.."
exec bash launch/multinode.sh "${HOSTFILE:-launch/hostfile}" launch/configs/fastwan2.1-t2v-1.3b-vsa.yaml "$@"
