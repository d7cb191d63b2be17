#!/usr/bin/env bash
# Set up polyak in ./.venv on a fresh machine (idempotent).
#   bash scripts/setup.sh          # the library, torch and the study's dependencies
#   bash scripts/setup.sh --test   # ... plus test, lint and peer libraries (torch_ema, ema-pytorch,
#                                  #     diffusers, timm) for the differential tests, JAX
#                                  #     (jax, optax, flax, equinox: polyak.jax and its peers) and
#                                  #     the frameworks the callbacks integrate with (lightning,
#                                  #     transformers, accelerate, deepspeed; none needs
#                                  #     torchvision; DeepSpeed builds from its sdist, ~45 s, no
#                                  #     C++: its ops compile only when used, and the tests use
#                                  #     none) and the docs site's tools (mkdocs, scripts/docs.sh)
# torch is pinned to 2.13.0 through constraints.txt: on a CPU-only machine an unpinned torch
# would pull the newest CUDA build (gigabytes). The package itself declares a range.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="torch,study"
if [ "${1:-}" = "--test" ]; then extras="torch,study,test,dev,docs,jax"; fi

if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt)
"${pip[@]}" torch==2.13.0              # first, so nothing below can pull another torch
"${pip[@]}" -e ".[${extras}]"
if [ "${1:-}" = "--test" ]; then
  # timm depends on torchvision, which has no build for this CPU torch; install timm alone
  # (the tests load its model_ema.py by path, see tests/peers.py).
  "${pip[@]}" pyyaml huggingface_hub safetensors
  "${pip[@]}" --no-deps timm
fi

# Fashion-MNIST for `polyak study` (Debian package); optional: the study falls back to digits.
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] \
   && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  { apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }; } \
    || echo "note: could not install dataset-fashion-mnist; 'polyak study' will use digits"
fi
echo "polyak is set up in .venv ($(.venv/bin/python -c 'import torch, polyak; print("torch", torch.__version__, "polyak", polyak.__version__)'))"
