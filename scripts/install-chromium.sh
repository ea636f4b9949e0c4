#!/usr/bin/env bash
# Makes sure Debian's headless-capable Chromium is at /usr/bin/chromium, for the dashboard's
# browser test (node/tests/dashboard.rs) and other screenshot tests. As root it installs the
# `chromium` package with apt when it is missing; otherwise it says what to run. Exit 0 when
# Chromium is there (or was installed), 1 when it is still missing.
set -euo pipefail

CHROMIUM=/usr/bin/chromium

if [ -x "$CHROMIUM" ]; then
  exit 0
fi

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "install-chromium: installing Debian's chromium package (and a font for screenshots)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core
  if [ -x "$CHROMIUM" ]; then
    exit 0
  fi
  echo "install-chromium: apt-get installed chromium, but $CHROMIUM is still missing" >&2
  exit 1
fi

cat >&2 <<MSG
install-chromium: $CHROMIUM is missing; the dashboard's browser test needs it.
On Debian or Ubuntu, as root:  apt-get update && apt-get install chromium
MSG
exit 1
