#!/usr/bin/env bash
# The one-command GPU check. Run it inside the folder scripts/gpu-bundle.sh lays out, on the GPU
# machine (no Rust toolchain or network needed):
#
#   ./gpu-check.sh                              every backend with a GPU adapter (CUDA if built in, Vulkan, wgpu)
#   ./gpu-check.sh --backends vulkan,wgpu       only these
#   ./gpu-check.sh --limit-s 120                per-step time limit (default 240 s)
#
# It lists the adapters each graphics API sees, runs every parity fixture on every backend,
# `vqt-bench memory` for linear, VQT (uncached and cached), SynQT, LoRA, AdaptFormer and full
# fine-tuning at ViT-B/16 224 px batch 32 (device memory pool peak), and, if the DINOv2 demo
# assets are in ./assets-cache (scripts/fetch-assets.sh), a 2-epoch training on the demo task.
# Every step runs in its own process within the limit. The report: gpu-report/gpu-check.{md,json}
# (OUT=DIR to change). Exit code 1 if a step failed or timed out.
#
# Without a GPU (to try it): ./gpu-check.sh --backends vulkan-cpu,wgpu-cpu --preset vit-ti16 --img-size 32 --batch 2
# From a checkout, it uses the binaries of target/release (or target/debug).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# The bundle ships its binaries xz-compressed: unpack them once.
for b in vqt-bench vqt-train; do
  if [ -f "$here/bin/$b.xz" ] && [ ! -x "$here/bin/$b" ]; then
    if command -v xz >/dev/null; then
      xz -dkc "$here/bin/$b.xz" > "$here/bin/$b.partial"
    else
      python3 -c 'import lzma,sys; sys.stdout.buffer.write(lzma.open(sys.argv[1]).read())' "$here/bin/$b.xz" > "$here/bin/$b.partial"
    fi
    chmod +x "$here/bin/$b.partial" && mv "$here/bin/$b.partial" "$here/bin/$b"
  fi
done
if [ -x "$here/bin/vqt-bench" ]; then
  cd "$here"
  bench="$here/bin/vqt-bench"
else
  cd "$here/.."
  target="${CARGO_TARGET_DIR:-target}"
  bench=""
  for p in release debug; do
    if [ -x "$target/$p/vqt-bench" ] && [ -x "$target/$p/vqt-train" ]; then bench="$target/$p/vqt-bench"; break; fi
  done
  if [ -z "$bench" ]; then
    echo "gpu-check.sh: no vqt-bench binary beside this script (bin/) or in $target/{release,debug}: run scripts/gpu-bundle.sh or cargo build --workspace --bins" >&2
    exit 2
  fi
fi
train_config="configs/gpu-check-demo.toml"
[ -f "$train_config" ] || train_config="configs/experiments/fmnist-dinov2s-vqt.toml"
"$bench" devices
exec "$bench" gpu-check --fixtures fixtures --train-config "$train_config" --out "${OUT:-gpu-report}" "$@"
