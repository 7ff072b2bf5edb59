#!/usr/bin/env bash
# One-command GPU acceptance run of megadmd; the logic is in tools/gpu_check.py.
#
#   bash tools/gpu_check.sh --out DIR [--wheels WHEELS_DIR] [--dry-run] [--budget-s SECONDS]
#
# --out DIR       where gpu_check.json, gpu_check.md and logs/ go (created; scratch in DIR/work)
# --wheels DIR    first install the wheels tools/gpu_wheels.sh downloaded (an offline machine):
#                 pip install --no-index from DIR alone, then megadmd itself with --no-deps
# --dry-run       on the CPU at toy sizes, with Triton's interpreter (TRITON_INTERPRET=1)
# --budget-s N    stop parts still running after N seconds (default 480)
#
# The Python used is $PYTHON, or python3.
set -euo pipefail

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_check.sh: error: $*" >&2; exit 2; }

out="" wheels="" extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || die "--out needs a folder"; out=$2; shift 2 ;;
    --wheels) [ $# -ge 2 ] || die "--wheels needs a folder"; wheels=$2; shift 2 ;;
    --dry-run) extra+=(--dry-run); export TRITON_INTERPRET=1; shift ;;
    --budget-s) [ $# -ge 2 ] || die "--budget-s needs seconds"; extra+=(--budget-s "$2"); shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[ -n "$out" ] || die "give --out DIR, the folder for gpu_check.json and gpu_check.md"

python=${PYTHON:-python3}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=$(mkdir -p "$out" && cd "$out" && pwd)

if [ -n "$wheels" ]; then
  [ -f "$wheels/requirements.txt" ] || die "$wheels has no requirements.txt; make the folder with tools/gpu_wheels.sh"
  # Only the folder: an offline machine has no index, and a connected one must not mix sources.
  "$python" -m pip install --no-index --find-links "$wheels" -r "$wheels/requirements.txt"
  "$python" -m pip install --no-index --find-links "$wheels" --no-deps -e "$repo"
fi

cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, whatever else is installed
exec "$python" tools/gpu_check.py --out "$out" ${extra[@]+"${extra[@]}"}
