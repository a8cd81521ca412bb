#!/usr/bin/env bash
# Reproduces the shipped reference model: three cosine cycles, each from the previous weights.
# About 80 minutes on 2 CPU cores. Writes clamp_export/models/reference/fmnist_vit.{safetensors,json};
# the JSON chains the three runs' records (init_record), with per-epoch test accuracy.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
tmp=$(mktemp -d)
$py scripts/train_fmnist_vit.py --epochs 12 --lr 1e-3 --seed 0 --out "$tmp/c1"
$py scripts/train_fmnist_vit.py --init "$tmp/c1/fmnist_vit.safetensors" --epochs 10 --lr 5e-4 \
    --warmup-epochs 0.25 --seed 1 --out "$tmp/c2"
$py scripts/train_fmnist_vit.py --init "$tmp/c2/fmnist_vit.safetensors" --epochs 4 --lr 2e-4 \
    --warmup-epochs 0.1 --seed 2
rm -rf "$tmp"
