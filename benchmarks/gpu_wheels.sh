#!/usr/bin/env bash
# Prepare the folder of wheels that benchmarks/gpu_check.sh installs on the GPU test machine.
#
# That machine (one H200, Python 3.12, torch 2.11 + CUDA 13) has no network and lacks
# deepspeed, webdataset, pydantic and lpips; everything else the check imports is already there
# (torch, numpy, pyyaml, tqdm, safetensors, pillow, tensorboard, accelerate, ninja, psutil,
# py-cpuinfo, msgpack, einops, pytest). What it lacks travels as wheels, at most 64 MiB
# together with the working tree, so this script fails when the folder passes a budget.
#
#   bash benchmarks/gpu_wheels.sh                  # -> .whl/ for CPython 3.12, x86-64
#   bash benchmarks/gpu_wheels.sh /tmp/w311 3.11   # the same set for a local CPU dry run on 3.11
#
# Never torch: the check runs against the machine's own torch. boto3/botocore (14 MiB) are
# left out: only s3:// data and checkpoints import them, and the check uses neither.
# deepspeed publishes only an sdist: its wheel is built here (DS_BUILD_OPS=0, so every op is
# JIT-compiled where it runs, for that machine's torch and CUDA); it is pure Python.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/.whl}"
PY_VERSION="${2:-3.12}"
BUDGET_MIB="${GPU_WHEELS_BUDGET_MIB:-50}"
PYTHON="${PYTHON:-python3}"

# The versions the project's own venv runs (pyproject pins deepspeed and webdataset).
DEEPSPEED="deepspeed==0.19.8"
DOWNLOADS=(
  "webdataset==1.0.2" "braceexpand==0.1.7" "hjson==3.1.0"
  "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5"
  # pydantic 2.14 needs typing-extensions >= 4.16, newer than some images carry.
  "typing-extensions==4.16.0"
  # LPIPS's linear heads (the tokenizer configs' perceptual term), read from the wheel's files without
  # importing it (its torchvision dependency is not needed): pure Python, a few hundred KiB.
  "lpips==0.1.4"
)

mkdir -p "$OUT"
rm -f "$OUT"/*.whl

# The deepspeed sdist's setup.py imports torch: build without isolation, with the local torch.
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "gpu_wheels.sh: $PYTHON cannot import torch, which building the deepspeed wheel needs" >&2
  echo "  (use the project venv: PYTHON=/work/main/.venv/bin/python bash benchmarks/gpu_wheels.sh)" >&2
  exit 1
fi
build_dir="$(mktemp -d)"
trap 'rm -rf "$build_dir"' EXIT
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-cache-dir --no-deps --no-build-isolation --no-binary deepspeed \
  -w "$build_dir" "$DEEPSPEED"
cp "$build_dir"/deepspeed-*.whl "$OUT"/

# Binary wheels for the target interpreter; pip matches each manylinux level exactly.
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
           manylinux1_x86_64 manylinux_2_24_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64; do
  platforms+=(--platform "$tag")
done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
  --implementation cp "${platforms[@]}" -d "$OUT" "${DOWNLOADS[@]}"

# One wheel per distribution: two versions of one would stop the whole install there.
names=()
for wheel in "$OUT"/*.whl; do
  name="$(basename "$wheel" | cut -d- -f1 | tr 'A-Z-' 'a-z_')"
  if [ "$name" = torch ]; then
    echo "gpu_wheels.sh: a torch wheel got into $OUT; the check must use the machine's torch" >&2
    exit 1
  fi
  names+=("$name")
done
dupes="$(printf '%s\n' "${names[@]}" | sort | uniq -d)"
if [ -n "$dupes" ]; then
  echo "gpu_wheels.sh: more than one wheel of: $dupes (in $OUT)" >&2
  exit 1
fi

total_kib="$(du -sk "$OUT" | cut -f1)"
budget_kib=$((BUDGET_MIB * 1024))
ls -l "$OUT"
echo "gpu_wheels.sh: ${#names[@]} wheels, $((total_kib / 1024)) MiB in $OUT (budget ${BUDGET_MIB} MiB)"
if [ "$total_kib" -gt "$budget_kib" ]; then
  echo "gpu_wheels.sh: FAILED: $OUT holds ${total_kib} KiB, over the ${BUDGET_MIB} MiB budget" \
       "(the GPU machine takes 64 MiB with the working tree)" >&2
  exit 1
fi
