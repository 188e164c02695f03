#!/bin/sh
# Install Debian's headless-capable chromium, which tests/test_report.py uses to render the
# HTML run report. A no-op when it is already installed. Never fails the build: when it cannot
# install (not root, no apt-get, no network) it says so and exits 0; the browser test then skips
# locally, or fails in CI (where CI is set) so the missing browser is noticed.
set -u

if command -v chromium >/dev/null 2>&1; then
    echo "install_chromium: chromium already installed at $(command -v chromium)"
    exit 0
fi

if [ "$(id -u)" != "0" ]; then
    echo "install_chromium: not root; install it yourself with: sudo apt-get install -y chromium"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_chromium: apt-get not found; install a chromium binary named 'chromium' on PATH"
    exit 0
fi

echo "install_chromium: installing chromium with apt-get (takes a minute)"
if DEBIAN_FRONTEND=noninteractive apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; then
    echo "install_chromium: installed $(command -v chromium)"
else
    echo "install_chromium: apt-get could not install chromium; the browser test will skip (or fail under CI)"
fi
exit 0
