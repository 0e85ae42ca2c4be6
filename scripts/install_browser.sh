#!/usr/bin/env bash
# Debian's chromium and chromium-driver, for tests/test_browser.py (selenium drives them).
# Idempotent and quiet: does nothing when both are there. Needs root and apt-get (CI's
# .ci/run has both); elsewhere it says so and the browser tests skip.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "install_browser: chromium/chromium-driver missing and apt-get as root is not available;" \
        "tests/test_browser.py will be skipped" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium chromium-driver >/dev/null
