#!/usr/bin/env bash
# Makes sure a Chromium is installed for the browser test of `att3d demo` (tests/test_demo_browser.py, Playwright
# driving headless Chromium). When no `chromium` is on PATH it installs Debian's `chromium` package with apt-get
# (Playwright's own browser download is not used). Idempotent and quiet: nothing happens when chromium is there.
#   bash scripts/install_browser.sh     # run by scripts/test.sh before pytest; needs root or password-less sudo
# ATT3D_NO_BROWSER=1 skips it (and the browser test skips itself too); without it a missing browser fails the test.
set -euo pipefail

[ "${ATT3D_NO_BROWSER:-0}" = "1" ] && exit 0
command -v chromium >/dev/null 2>&1 && exit 0

die() { echo "install_browser: $*" >&2; exit 1; }
command -v apt-get >/dev/null 2>&1 \
  || die "no chromium on PATH and no apt-get to install it: install Chromium (or set ATT3D_NO_BROWSER=1 to skip the browser test)"
SUDO=()
if [ "$(id -u)" != "0" ]; then
  command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null \
    || die "installing chromium needs root or password-less sudo (apt-get install chromium), or set ATT3D_NO_BROWSER=1"
  SUDO=(sudo -n)
fi

echo "install_browser: installing Debian's chromium for the browser test (apt-get, once)"
export DEBIAN_FRONTEND=noninteractive
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
_install() { "${SUDO[@]}" apt-get install -y -qq chromium >>"$log" 2>&1; }
if ! _install; then  # package lists missing or stale on a fresh machine: update them once and retry
  "${SUDO[@]}" apt-get update -qq >>"$log" 2>&1 || { tail -n 5 "$log" >&2; die "apt-get update failed"; }
  _install || { tail -n 5 "$log" >&2; die "apt-get install chromium failed"; }
fi
command -v chromium >/dev/null 2>&1 || die "apt-get installed chromium, but there is no chromium on PATH"
echo "install_browser: $(chromium --version 2>/dev/null | head -n 1)"
