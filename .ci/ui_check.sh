#!/usr/bin/env bash
# CI, browser tier: the MLflow UI in a real headless browser, Debian's chromium (scripts/ui_check.py:
# a tiny study's runs page shows its final runs and a test metric column; screenshot in
# results/ui_check/runs.png; docs/ui.md).
#
# The browser is installed when missing, if its packages download within 60 s; otherwise the check is
# skipped with the command to run it by hand, rather than holding CI up on a slow mirror. Only the
# download is under the time limit: it is what can hang (about 110 MB; seconds here), while installing
# the downloaded packages is local work (about a minute on 2 busy cores) that must not be cut off
# halfway, since a dpkg killed mid-install leaves the package database broken for every later apt-get
# (.ci/postgres.sh's among them).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
CHROMIUM=/usr/bin/chromium
[ -x "$PY" ] || { echo "ui check: run scripts/setup.sh first (no .venv)" >&2; exit 1; }
by_hand="apt-get install chromium && $PY scripts/ui_check.py"
if [ ! -x "$CHROMIUM" ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "ui check: SKIPPED: no $CHROMIUM and not root to install it; by hand: $by_hand"
    exit 0
  fi
  export DEBIAN_FRONTEND=noninteractive
  started=$(date +%s)
  if ! timeout 60 bash -c 'apt-get update -qq && apt-get install -y -qq --download-only chromium' >/dev/null 2>&1; then
    echo "ui check: SKIPPED: chromium's packages did not download within 60 s; by hand: $by_hand"
    exit 0
  fi
  apt-get install -y -qq -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold chromium >/dev/null
  echo "ui check: chromium installed in $(( $(date +%s) - started )) s"
fi
exec "$PY" scripts/ui_check.py --out results/ui_check/runs.png
