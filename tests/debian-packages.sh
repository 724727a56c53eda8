#!/usr/bin/env bash
# The Debian packages the tests drive, installed when missing (as root, or with sudo): the
# one list, used by .ci/run and by the test run itself (tests/conftest.py), so the README's
# second command passes on a fresh Debian or Ubuntu machine.
#   bsd-mailx       a real client through the sendmail shim
#   systemd         systemd-analyze verify / security on the unit
#   postfix         smtp-sink / smtp-source, and a private Postfix for bench/compare.py
#                   ("No configuration": no system instance is set up or started)
#   redis-server    the fleet's quota ledger (tests start their own on a free port)
#   prometheus      promtool for the alert rules, a real Prometheus for the dashboard
#   man-db, groff-base  the man pages rendered as `man` shows them
#   python3-venv    the Debian package's virtualenv (packaging/deb/build.py)
set -euo pipefail
need=()
command -v bsd-mailx >/dev/null || need+=(bsd-mailx)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v smtp-sink >/dev/null || [ -x /usr/sbin/smtp-sink ] || need+=(postfix)
command -v redis-server >/dev/null || need+=(redis-server)
{ command -v prometheus >/dev/null && command -v promtool >/dev/null; } || need+=(prometheus)
command -v man >/dev/null || need+=(man-db)
command -v groff >/dev/null || need+=(groff-base)
python3 -c 'import ensurepip' 2>/dev/null || need+=(python3-venv)
((${#need[@]})) || exit 0
if [ "${1:-}" = "--list" ]; then
    echo "${need[*]}"
    exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing the Debian packages the tests use: ${need[*]}" >&2
echo "postfix postfix/main_mailer_type select No configuration" | $sudo debconf-set-selections
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    "${need[@]}" >/dev/null
