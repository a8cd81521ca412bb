#!/usr/bin/env bash
# Reproduces the shipped second reference model fmnist_vit_reg4: a 15-epoch cosine cycle from
# scratch, then a 4-epoch cycle from its weights; about 75 minutes on 2 CPU cores. Writes
# clamp_export/models/reference/fmnist_vit_reg4.{safetensors,json}; the JSON chains both runs'
# records (init_record), with per-epoch test accuracy.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
tmp=$(mktemp -d)
$py scripts/train_fmnist_vit.py --model fmnist_vit_reg4 --epochs 15 --batch 256 --lr 1.5e-3 \
    --warmup-epochs 1 --seed 0 --out "$tmp/c1"
$py scripts/train_fmnist_vit.py --model fmnist_vit_reg4 --init "$tmp/c1/fmnist_vit_reg4.safetensors" \
    --epochs 4 --batch 256 --lr 4e-4 --warmup-epochs 0.1 --seed 1
rm -rf "$tmp"
