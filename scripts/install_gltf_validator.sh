#!/usr/bin/env bash
# Makes sure the Khronos glTF validator (npm package gltf-validator, pinned) is installed for tests/test_gltf.py.
# It goes into .cache/gltf-validator/node_modules (git-ignored); node and npm come from the machine (Debian's
# `nodejs` and `npm` packages are installed with apt-get when missing). Idempotent and quiet when present.
#   bash scripts/install_gltf_validator.sh   # run by scripts/test.sh before pytest
# ATT3D_NO_NODE=1 skips it (and the validator test skips itself too); without it a missing validator fails the test.
set -euo pipefail

VERSION="2.0.0-dev.3.10"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="$ROOT/.cache/gltf-validator"

[ "${ATT3D_NO_NODE:-0}" = "1" ] && exit 0
die() { echo "install_gltf_validator: $*" >&2; exit 1; }
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  command -v apt-get >/dev/null 2>&1 || die "no node/npm on PATH and no apt-get: install Node.js (or set ATT3D_NO_NODE=1)"
  [ "$(id -u)" = "0" ] || die "installing nodejs needs root (apt-get install nodejs npm), or set ATT3D_NO_NODE=1"
  echo "install_gltf_validator: installing Debian's nodejs and npm (apt-get, once)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq nodejs npm >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null; }
fi
if [ -f "$PREFIX/node_modules/gltf-validator/package.json" ] \
   && grep -q "\"version\": \"$VERSION\"" "$PREFIX/node_modules/gltf-validator/package.json"; then
  exit 0
fi
echo "install_gltf_validator: npm install gltf-validator@$VERSION (once)"
mkdir -p "$PREFIX"
npm install --silent --no-audit --no-fund --prefix "$PREFIX" "gltf-validator@$VERSION" >/dev/null \
  || die "npm install gltf-validator@$VERSION failed"
