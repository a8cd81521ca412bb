#!/usr/bin/env bash
# Installs Debian's Chromium and ChromeDriver (the real browser the report.html test opens) if missing.
set -euo pipefail
command -v chromium >/dev/null && command -v chromedriver >/dev/null && exit 0
cmd="apt-get update && apt-get install -y chromium chromium-driver"
if [ "$(id -u)" = 0 ]; then
  echo "installing Chromium for the report test: $cmd" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
else
  echo "Chromium is missing (the report.html test will skip); as root run: $cmd" >&2
fi
