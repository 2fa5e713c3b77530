#!/usr/bin/env bash
# Debian's Chromium and its WebDriver for tests/test_ui_browser.py. Idempotent: nothing to do when both are
# there. As root with apt-get (developers' machines and CI here) a failed install fails; elsewhere it only
# warns, and the browser test skips itself naming this script.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "note: /usr/bin/chromium or /usr/bin/chromedriver missing and no root apt-get here;" \
       "install Debian's chromium + chromium-driver to run the browser test (it is skipped)" >&2
  exit 0
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
