#!/usr/bin/env bash
# Set up vae-train on a fresh Debian/Ubuntu machine: system packages, .venv/ at the
# repository root with the package installed editable (plus test tools), and the
# fused reparameterization/KL op built ahead of time. Safe to run again: every
# step is skipped or quick when already done.
#
# GPU clusters: install the CUDA build of the pinned torch into .venv first, e.g.
#   python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
# then run this script; pip keeps the CUDA build because the version matches.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# System packages: the default job's data, python venv support, and shellcheck
# (the test suite lints the shell scripts). Installed only when missing.
missing=()
[ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
python3 -c "import venv, ensurepip" >/dev/null 2>&1 || missing+=(python3-venv)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing system packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    python3 -m venv .venv
fi
# pip install with one noisy warning filtered from its output, failing loudly with pip's
# own status (pipefail). grep -v exits 1 when it prints nothing -- a quiet, successful
# install -- hence its `|| true`, which covers grep only, never pip.
pip_install() {
    if ! .venv/bin/python -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; then
        echo "setup: 'pip install $*' failed (its output is above); fix that and run launch/setup.sh again" >&2
        exit 1
    fi
}
echo "setup: installing vae-train and its pinned dependencies into .venv (first time: ~2 minutes)"
pip_install --upgrade pip
pip_install -e '.[test]'
# LPIPS's linear heads ship in the lpips wheel, whose torchvision dependency breaks beside the
# CPU torch pin (vae_train/model/perceptual.py has the VGG stack itself): install it without deps.
pip_install --no-deps 'lpips==0.1.4'
.venv/bin/python -c "import vae_train, torch, deepspeed" >/dev/null 2>&1 \
    || { echo "setup: the install failed; run: .venv/bin/pip install -e '.[test]'" >&2; exit 1; }

if .venv/bin/vae-train build-ops --help >/dev/null 2>&1; then
    echo "setup: building the fused reparameterization/KL op (first time: ~1 minute)"
    .venv/bin/vae-train build-ops
fi
echo "setup: done (.venv ready)"
