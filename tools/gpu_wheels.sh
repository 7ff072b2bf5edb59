#!/usr/bin/env bash
# Fetch, on a connected machine, the wheels an offline GPU machine needs for megadmd (deepspeed,
# diffusers and the dependencies it lacks); the logic is in tools/gpu_wheels.py.
#
#   bash tools/gpu_wheels.sh DIR [--list] [--python-version 3.12] [--platform manylinux_2_28_x86_64]
#                                [--present PKG ...] [--also REQ ...] [--deepspeed-version X]
#
# Copy DIR and this checkout to the GPU machine, then: bash tools/gpu_check.sh --wheels DIR --out OUT
# The Python used is $PYTHON, or python3 (it only needs pip; any version works).
set -euo pipefail
python=${PYTHON:-python3}
exec "$python" "$(dirname "${BASH_SOURCE[0]}")/gpu_wheels.py" "$@"
