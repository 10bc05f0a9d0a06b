#!/usr/bin/env bash
# Install the Debian packages given as arguments when any of them is missing (needs root).
set -euo pipefail
missing=()
for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
# The kernel lab fetches Debian's kernel with `apt-get download`, which needs package lists.
need_lists=0
if ! compgen -G "/var/lib/apt/lists/*_Packages" >/dev/null; then
    need_lists=1
fi
if [ ${#missing[@]} -eq 0 ] && [ $need_lists -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "error: need root to install Debian packages: ${missing[*]:-package lists}" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
