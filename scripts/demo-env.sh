# Sourced by demo.sh and protocol.sh (from the repository root): fetches the demo's assets if
# missing, builds the binaries (dev profile, dependencies optimised) and sets $train and $bench
# to them, wherever CARGO_TARGET_DIR puts the build.
[ -f assets-cache/dinov2-s14/model.safetensors ] && [ -f assets-cache/fashion-mnist/t10k-images-idx3-ubyte.gz ] || bash scripts/fetch-assets.sh
cargo build -q --locked --workspace --bins
target="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
train="$target/debug/vqt-train"
bench="$target/debug/vqt-bench"
cfg=configs/experiments/fmnist-dinov2s-vqt.toml
