#!/usr/bin/env bash
# Builds a folder that runs the GPU check (scripts/gpu-check.sh) on a machine with a GPU but no
# Rust toolchain and no network: stripped release binaries of vqt-bench and vqt-train with every
# GPU backend this machine can build (wgpu and Vulkan; CUDA only with --cuda, whose build needs
# the LLVM bundle, see README), the parity fixtures, the check script and its training config.
# The folder must stay within 64 MiB (checked); the binaries travel xz-compressed.
#
#   scripts/gpu-bundle.sh                       -> dist/vqt-gpu-bundle/
#   scripts/gpu-bundle.sh --out DIR --cuda
#   scripts/gpu-bundle.sh --profile dev         faster build (our crates at opt-level 1), for trying it
#
# On the GPU machine: copy the folder, optionally put the demo assets in ./assets-cache
# (scripts/fetch-assets.sh output: DINOv2 ViT-S/14 + Fashion-MNIST, ~90 MB, too big for the
# bundle), then run ./gpu-check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
out="dist/vqt-gpu-bundle"
profile="release"
features=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift ;;
    --profile) profile="$2"; shift ;;
    --cuda) features=(--features vqt-bench/cuda,vqt-train/cuda) ;;
    *) echo "usage: scripts/gpu-bundle.sh [--out DIR] [--profile release|dev] [--cuda]" >&2; exit 2 ;;
  esac
  shift
done
limit=$((64 * 1024 * 1024))
start=$(date +%s)
cargo build --locked --profile "$profile" --workspace --bins "${features[@]}"
target="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
dir="$target/$([ "$profile" = dev ] && echo debug || echo "$profile")"
rm -rf "$out.partial"
mkdir -p "$out.partial/bin" "$out.partial/configs" "$out.partial/fixtures"
for b in vqt-bench vqt-train; do
  cp "$dir/$b" "$out.partial/bin/$b"
  strip "$out.partial/bin/$b"
done
backends="$("$out.partial/bin/vqt-bench" devices | sed -n 's/^compiled backends: //p')"
# Stripped, the two binaries are ~110 MiB each (cubecl's kernels are generic code); xz brings
# them to ~18 MiB each. gpu-check.sh unpacks them on first run (xz-utils, or Python's lzma).
for b in vqt-bench vqt-train; do
  xz -T0 -6 "$out.partial/bin/$b"
done
for f in fixtures/*/; do
  [ -f "$f/manifest.json" ] && cp -r "$f" "$out.partial/fixtures/"
done
cp scripts/gpu-check.sh "$out.partial/gpu-check.sh"
# The short training of the check: the DINOv2 demo task (configs/experiments/fmnist-dinov2s-vqt.toml),
# whose relative asset paths resolve inside the bundle once ./assets-cache is copied in.
cp configs/experiments/fmnist-dinov2s-vqt.toml "$out.partial/configs/gpu-check-demo.toml"
{
  echo "vqt-rs GPU bundle"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
  echo "built: $(date -u +%FT%TZ) on $(uname -m), $(rustc --version), profile $profile, features: ${features[*]:-default (wgpu, vulkan)}"
  echo "backends: $backends"
  echo "run: ./gpu-check.sh (see its header); needs glibc >= $(ldd --version | head -1 | grep -o '[0-9.]*$'), a Vulkan loader (libvulkan.so.1) for vulkan/wgpu"
  (cd "$out.partial" && sha256sum bin/*.xz)
} > "$out.partial/BUNDLE.txt"
size=$(du -sb "$out.partial" | cut -f1)
if [ "$size" -gt "$limit" ]; then
  echo "gpu-bundle.sh: $out.partial is $((size / 1048576)) MiB, over the 64 MiB limit" >&2
  exit 1
fi
rm -rf "$out"
mv "$out.partial" "$out"
echo "$out: $((size / 1048576)) MiB in $(( $(date +%s) - start )) s"
du -sh "$out"/bin/* "$out"/fixtures
