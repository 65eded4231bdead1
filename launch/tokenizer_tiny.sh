#!/usr/bin/env bash
# The latent-diffusion autoencoder recipe on this machine: random 32x32 crops of
# scikit-image's real photographs (written once to data/photo-crops by `vae-train prepare`),
# trained with configs/tokenizer_tiny.yaml on 2 processes (ZeRO-2), at most ~10 minutes.
# Extra arguments are config overrides (key=value), as for launch/quickstart.sh.
# LPIPS: torchvision's ImageNet VGG16 from $TORCH_HOME/hub/checkpoints/vgg16-397923af.pth when
# present; otherwise a RANDOM VGG16 (data/vgg16-random-not-imagenet.pth), and every LPIPS value
# printed is then NOT comparable with published LPIPS (PSNR/SSIM are unaffected).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || bash launch/setup.sh

DATA_DIR=data/photo-crops
if [ ! -f "$DATA_DIR/index.json" ]; then
    echo "tokenizer_tiny: writing random 32x32 crops of scikit-image's photos to $DATA_DIR"
    "$PY" -m vae_train prepare skimage-photos --crop-size 32 --crops-per-photo 256 --samples-per-shard 128 \
        --out "$DATA_DIR" --no-progress
fi

BACKBONE=()
IMAGENET=$("$PY" -c "from vae_train.model.perceptual import default_backbone_path as p; print(p() if p().is_file() else '')")
if [ -z "$IMAGENET" ]; then
    RANDOM_VGG=data/vgg16-random-not-imagenet.pth
    [ -f "$RANDOM_VGG" ] || "$PY" -c "from vae_train.model.perceptual import save_random_vgg16; save_random_vgg16('$RANDOM_VGG')"
    echo "tokenizer_tiny: no ImageNet VGG16 here: LPIPS uses a RANDOM backbone ($RANDOM_VGG); its values are NOT"
    echo "                comparable with published LPIPS (judge the run by PSNR/SSIM)"
    BACKBONE=("loss.lpips_backbone_path=$RANDOM_VGG")
fi

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
"$PY" -m torch.distributed.run --standalone --nproc_per_node 2 train.py --config configs/tokenizer_tiny.yaml \
    "data.train=$DATA_DIR" "data.val=$DATA_DIR" "${BACKBONE[@]}" "$@"

RUN_DIR=$("$PY" -m vae_train config show configs/tokenizer_tiny.yaml "$@" | sed -n 's/^run_dir: //p')
"$PY" - "$RUN_DIR/metrics.jsonl" "${#BACKBONE[@]}" <<'PYEOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
val = [r for r in rows if r["split"] == "val"]
first, last = val[0], val[-1]
note = " (RANDOM VGG backbone: not comparable with published LPIPS)" if sys.argv[2] != "0" else ""
print(f"tokenizer_tiny: held-out crops, first validation (step {first['step']}) -> last (step {last['step']}):")
print(f"  PSNR  {first['psnr_db']:.2f} -> {last['psnr_db']:.2f} dB")
print(f"  SSIM  {first['ssim']:.3f} -> {last['ssim']:.3f}")
print(f"  LPIPS {first['lpips']:.4f} -> {last['lpips']:.4f}{note}")
ema = [r for r in rows if r["split"] == "val_ema"]
if ema:
    print(f"  EMA weights at step {ema[-1]['step']}: PSNR {ema[-1]['psnr_db']:.2f} dB, LPIPS {ema[-1]['lpips']:.4f}")
PYEOF
echo "tokenizer_tiny: grids in $RUN_DIR/input_recon_diff.png, TensorBoard: $PY -m tensorboard.main --logdir $RUN_DIR/tb"
