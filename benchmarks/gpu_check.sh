#!/usr/bin/env bash
# The GPU readiness check (issue 18) on a machine with one GPU and no network:
# installs the carried wheels beside the machine's own torch, then runs
# benchmarks/gpu_check.py (build the fused op for this GPU, its tests on CUDA, its
# timing against eager and torch.compile, a few hundred training steps per config with
# images/s, peak memory and MFU), within 8 minutes. Writes gpu_check.json, .log and .txt.
#
#   bash benchmarks/gpu_wheels.sh            # here, once: the wheels into .whl/
#   bash benchmarks/gpu_check.sh [OUT_DIR]   # there (default OUT_DIR: $OUT, else ./gpu_check_out)
#   bash benchmarks/gpu_check.sh OUT_DIR --dry-run   # the same, small, on a CPU
#
# Environment: PYTHON (default python3), GPU_CHECK_WHEELS (default .whl), GPU_CHECK_BUDGET_S
# (the driver's budget, default 455 s; a hard stop at 480 s backs it up).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WHEELS="${GPU_CHECK_WHEELS:-$ROOT/.whl}"
OUT_DIR="${1:-${OUT:-$ROOT/gpu_check_out}}"
shift || true
BUDGET_S="${GPU_CHECK_BUDGET_S:-455}"

if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  echo "gpu_check.sh: no wheels in $WHEELS; run benchmarks/gpu_wheels.sh where pip works and carry the folder" >&2
  exit 2
fi
torch_before="$("$PYTHON" -c 'import torch; print(torch.__version__, torch.__file__)')"

# --target keeps the machine's site-packages untouched; --no-deps so nothing asks for torch.
SITE="$(mktemp -d)/site"
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"

torch_after="$("$PYTHON" -c 'import torch; print(torch.__version__, torch.__file__)')"
if [ "$torch_before" != "$torch_after" ]; then
  echo "gpu_check.sh: the wheels changed which torch imports ($torch_before -> $torch_after)" >&2
  exit 2
fi
echo "gpu_check.sh: torch $torch_after; wheels from $WHEELS in $SITE"

mkdir -p "$OUT_DIR"
exec timeout -s KILL 480 "$PYTHON" "$ROOT/benchmarks/gpu_check.py" --out "$OUT_DIR" --budget-s "$BUDGET_S" "$@"
