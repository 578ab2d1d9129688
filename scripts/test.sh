#!/usr/bin/env bash
# The test command: set-up from nothing, then the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# The chat page's browser test drives Debian's Chromium; a CJK font so that Chinese renders in it.
browser_packages="chromium fonts-wqy-microhei"
if ! dpkg -s $browser_packages >/dev/null 2>&1; then
  apt_get="apt-get"
  [ "$(id -u)" -eq 0 ] || apt_get="sudo apt-get"
  $apt_get update -qq
  DEBIAN_FRONTEND=noninteractive $apt_get install -y -qq $browser_packages >/dev/null
fi
exec "${PYTHON:-python3}" -m pytest -q "$@"
