# Sourced by demo.sh and protocol.sh (from the repository root): fetches the demo's assets if
# missing, builds the binaries (dev profile, dependencies optimised) and sets $train and $bench
# to them, wherever CARGO_TARGET_DIR puts the build.
[ -f assets-cache/dinov2-s14/model.safetensors ] && [ -f assets-cache/fashion-mnist/t10k-images-idx3-ubyte.gz ] || bash scripts/fetch-assets.sh
# VQT_BIN_DIR=DIR runs the binaries in DIR (a copy of target/debug/vqt-train and vqt-bench)
# instead, without building: a long protocol then keeps one binary, and one recorded revision,
# while the tree is rebuilt for other work.
if [ -n "${VQT_BIN_DIR:-}" ]; then
  train="$VQT_BIN_DIR/vqt-train"
  bench="$VQT_BIN_DIR/vqt-bench"
  [ -x "$train" ] && [ -x "$bench" ] || { echo "VQT_BIN_DIR=$VQT_BIN_DIR: no executable vqt-train and vqt-bench there" >&2; exit 2; }
else
  cargo build -q --locked --workspace --bins
  target="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
  train="$target/debug/vqt-train"
  bench="$target/debug/vqt-bench"
fi
cfg=configs/experiments/fmnist-dinov2s-vqt.toml
