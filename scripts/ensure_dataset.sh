#!/usr/bin/env bash
# Installs Debian's Fashion-MNIST (the real data every accuracy claim is measured on) if missing.
set -euo pipefail
dir=/usr/share/datasets/fashion-mnist
[ -f "$dir/t10k-images-idx3-ubyte.gz" ] && exit 0
cmd="apt-get update && apt-get install -y dataset-fashion-mnist"
if [ "$(id -u)" = 0 ]; then
  echo "installing Fashion-MNIST: $cmd" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
else
  echo "Fashion-MNIST is missing; as root run: $cmd" >&2
  exit 1
fi
