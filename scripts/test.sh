#!/usr/bin/env bash
# The test command: set-up from nothing, then the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# The chat page's browser test drives Debian's Chromium; a CJK font so that Chinese renders in it. The
# gateway's policy tests start their own redis-server processes.
browser_packages="chromium fonts-wqy-microhei redis-server"
# dpkg-query, not dpkg -s: a removed package keeps a status entry ("deinstall ok config-files").
installed=$(dpkg-query -W -f='${Status}\n' $browser_packages 2>/dev/null | grep -c '^install ok installed$' || true)
if [ "$installed" -ne "$(echo $browser_packages | wc -w)" ]; then
  apt_get="apt-get"
  [ "$(id -u)" -eq 0 ] || apt_get="sudo apt-get"
  $apt_get update -qq
  DEBIAN_FRONTEND=noninteractive $apt_get install -y -qq $browser_packages >/dev/null
fi
exec "${PYTHON:-python3}" -m pytest -q "$@"
