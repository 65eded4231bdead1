# syntax=docker/dockerfile:1
# vae-train on GPUs anywhere: CUDA PyTorch, the package with its pinned dependencies,
# and the fused reparameterization/KL op compiled at build time.
#
#   docker build -t vae-train .
#   docker run --gpus all --ipc=host -v "$PWD/data:/workspace/vae-train/data" \
#       -v "$PWD/runs:/workspace/vae-train/runs" vae-train
#
# The default command trains configs/fashion_mnist.yaml on every GPU of the machine
# (`accelerate launch train.py` with launch/accelerate_zero2.yaml; the config's own
# distributed.zero_stage: 0 wins, with a warning); pass your own command to
# change it (README: "Docker and Apptainer").
#
# The base image's torch must equal pyproject's `torch==` pin (tests/unit/test_docker.py
# checks it): pip then keeps the CUDA build instead of replacing it with another.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-devel
FROM ${BASE_IMAGE}

# VAE_TRAIN_OPS_*: where the prebuilt fused op lives, and a portable CPU target for
# its C++ part (AVX2: runs on any x86-64 cluster node of the last decade).
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VAE_TRAIN_OPS_DIR=/opt/vae-train/ops \
    VAE_TRAIN_OPS_ARCH=avx2 \
    VAE_TRAIN_CUDA_ARCHS="80;86;89;90"

# A compiler for the fused op and DeepSpeed's JIT ops (devel images ship nvcc).
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace/vae-train

# Dependencies first, read from pyproject.toml itself (so they are exactly its pins),
# in their own layer: editing the code does not reinstall them.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && python -m pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY vae_train ./vae_train
COPY train.py ./
COPY configs ./configs
COPY launch ./launch
COPY slurm ./slurm
RUN python -m pip install --no-deps . \
    && python -c "import vae_train, torch, deepspeed; print('vae-train', vae_train.__version__, 'torch', torch.__version__)"

# Run as an ordinary user; the op cache belongs to it.
RUN useradd --create-home --uid 1000 --shell /bin/bash vae \
    && mkdir -p "$VAE_TRAIN_OPS_DIR" /workspace/vae-train/runs /workspace/vae-train/data \
    && chown -R vae:vae "$VAE_TRAIN_OPS_DIR" /workspace/vae-train/runs /workspace/vae-train/data
USER vae

# The fused op ahead of time: the CPU build and the CUDA build (no GPU is needed to
# compile), so no rank compiles at start-up.
RUN vae-train build-ops && vae-train build-ops --cuda

# The documented entry: `accelerate launch train.py`, one process per visible GPU.
CMD ["bash", "-c", "exec accelerate launch --config_file launch/accelerate_zero2.yaml --num_processes \"$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')\" train.py --config configs/fashion_mnist.yaml"]
