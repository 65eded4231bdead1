#!/usr/bin/env bash
# The main job, from a fresh machine: set up .venv, shard Fashion-MNIST, and train
# the default config with 2 processes under DeepSpeed ZeRO-2 (CPU/gloo here, or
# the GPUs present). Leaves TensorBoard logs and sample/reconstruction grids in
# runs/fashion_mnist/. Extra arguments are config overrides (key=value).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup.sh

DATA_DIR=data/fashion-mnist
if [ ! -f "$DATA_DIR/index.json" ]; then
    echo "quickstart: writing Fashion-MNIST shards to $DATA_DIR"
    .venv/bin/vae-train prepare fashion-mnist --out "$DATA_DIR"
fi

if .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    LAUNCH_CONFIG=launch/accelerate_zero2.yaml
    NPROC=$(.venv/bin/python -c "import torch; print(torch.cuda.device_count())")
else
    LAUNCH_CONFIG=launch/accelerate_cpu.yaml
    NPROC=2
fi
echo "quickstart: training configs/fashion_mnist.yaml on $NPROC processes ($LAUNCH_CONFIG)"
export DS_ACCELERATOR="${DS_ACCELERATOR:-$( [ "$LAUNCH_CONFIG" = launch/accelerate_cpu.yaml ] && echo cpu || echo cuda)}"
.venv/bin/accelerate launch --config_file "$LAUNCH_CONFIG" --num_processes "$NPROC" \
    train.py --config configs/fashion_mnist.yaml "data.train=$DATA_DIR" "data.val=$DATA_DIR" "$@"

RUN_DIR=$(.venv/bin/vae-train config show configs/fashion_mnist.yaml "$@" | sed -n 's/^run_dir: //p')
echo
echo "quickstart: done. Look at:"
echo "  $RUN_DIR/samples.png and $RUN_DIR/reconstructions.png"
echo "  TensorBoard: .venv/bin/tensorboard --logdir $RUN_DIR/tb"
