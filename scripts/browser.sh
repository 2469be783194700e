#!/usr/bin/env bash
# Install the headless Chromium and its driver that the dashboard's browser test drives
# (Debian's packages chromium and chromium-driver).
#
# Idempotent: when both are on the machine it only checks. Where they cannot be
# installed (no apt-get, no root and no password-less sudo, no network) it says so
# and exits 0: the browser test then skips with the same advice.
#
# Environment:
#   BROWSER_INSTALL_TIMEOUT  seconds apt-get may take (default: 900)
set -euo pipefail

TIMEOUT="${BROWSER_INSTALL_TIMEOUT:-900}"

say() { printf 'browser: %s\n' "$*"; }
cannot() {
    say "WARNING: $*; the dashboard's browser test will be skipped"
    say "install them by hand: apt-get install chromium chromium-driver"
    exit 0
}

have_browser() { command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; }
have_driver() { command -v chromedriver >/dev/null 2>&1 || [[ -x /usr/bin/chromedriver ]]; }

if have_browser && have_driver; then
    say "chromium and chromedriver are installed"
    exit 0
fi

command -v apt-get >/dev/null 2>&1 || cannot "no apt-get on this machine"
SUDO=()
if [[ $EUID -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        cannot "not root and no password-less sudo"
    fi
fi

export DEBIAN_FRONTEND=noninteractive
install() { timeout "$TIMEOUT" "${SUDO[@]}" apt-get install -y --no-install-recommends chromium chromium-driver; }
say "installing chromium and chromium-driver"
if ! install; then
    # The package lists may be missing or stale on a fresh machine.
    timeout "$TIMEOUT" "${SUDO[@]}" apt-get update || cannot "apt-get update failed"
    install || cannot "apt-get install chromium chromium-driver failed"
fi
have_browser && have_driver || cannot "the packages installed, yet chromium or chromedriver is missing"
say "chromium and chromedriver are installed"
