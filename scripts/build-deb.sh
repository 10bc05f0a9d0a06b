#!/usr/bin/env bash
# Build dist/kvmctl_VERSION_ARCH.deb: kvmctl in its own venv under /opt/kvmctl (Debian's
# python3.11, dependencies from PyPI, libvirt-python compiled against libvirt-dev), the systemd
# units, /usr/bin/kvmctl, /usr/sbin/fence_kvmctl (where Pacemaker looks for fence agents), the
# docs, and bash completion. Run from the repository: `make deb`.
#
# The venv is made in a staging directory and relocated (what dh-virtualenv does): its scripts'
# `#!` lines are rewritten to /opt/kvmctl/bin/python3; nothing is compiled to .pyc at build
# time (the postinst does it in place, so tracebacks name the installed files).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian's default python3, by its versioned name: the venv links to /usr/bin/python3.X, which
# the package python3.X provides (/usr/bin/python3 belongs to the package python3).
PYVER=$(/usr/bin/python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
PYTHON=/usr/bin/python$PYVER
PREFIX=/opt/kvmctl
VERSION=$($PYTHON -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
ARCH=$(dpkg --print-architecture)
BUILD=build/deb
STAGE=$BUILD/root
OUT=dist/kvmctl_${VERSION}_${ARCH}.deb

rm -rf "$BUILD"
mkdir -p "$STAGE$PREFIX" "$BUILD/wheels" dist
STAGE=$(realpath "$STAGE")

# The venv, with the wheel built from this checkout without build isolation (setuptools of
# Debian's ensurepip; `wheel` only because setuptools < 70.1 needs it to write wheels).
$PYTHON -m venv "$STAGE$PREFIX"
# -I: isolated from PYTHONPATH and the user's site (a checkout on PYTHONPATH, with its
# kvmctl.egg-info, would make pip skip kvmctl as "already installed").
VPIP=("$STAGE$PREFIX/bin/python3" -I -m pip --disable-pip-version-check -q)
"${VPIP[@]}" install wheel
"${VPIP[@]}" wheel --no-build-isolation --no-deps -w "$BUILD/wheels" .
"${VPIP[@]}" install --no-compile "$BUILD/wheels/kvmctl-$VERSION-"*.whl
"${VPIP[@]}" uninstall -y wheel
"$STAGE$PREFIX/bin/python3" -I -c 'import controller.cli, controller.cli.fence_kvmctl, libvirt'
test -x "$STAGE$PREFIX/bin/kvmctl" && test -x "$STAGE$PREFIX/bin/fence_kvmctl"
find "$STAGE$PREFIX" -name __pycache__ -type d -prune -exec rm -rf {} +
rm -f "$STAGE$PREFIX"/bin/activate* "$STAGE$PREFIX"/bin/Activate.ps1

# Relocate: every text reference to the staging path becomes the installed one.
grep -rlI --null -F "$STAGE$PREFIX" "$STAGE$PREFIX" | xargs -0 -r sed -i "s|$STAGE$PREFIX|$PREFIX|g"
if grep -rqI -F "$STAGE" "$STAGE$PREFIX"; then
    echo "error: the venv still names the staging directory $STAGE" >&2
    exit 1
fi

# Commands, units, docs.
install -d "$STAGE/usr/bin" "$STAGE/usr/sbin" "$STAGE/lib/systemd/system" \
    "$STAGE/usr/share/doc/kvmctl/examples" "$STAGE/DEBIAN"
ln -s "$PREFIX/bin/kvmctl" "$STAGE/usr/bin/kvmctl"
ln -s "$PREFIX/bin/fence_kvmctl" "$STAGE/usr/sbin/fence_kvmctl"
install -m 0644 deploy/systemd/*.service "$STAGE/lib/systemd/system/"
install -m 0644 README.md docs/*.md "$STAGE/usr/share/doc/kvmctl/"
install -m 0644 deploy/config.yaml.example deploy/etcd/etcd-member.env.example \
    "$STAGE/usr/share/doc/kvmctl/examples/"
install -m 0755 deploy/etcd/make-certs.sh "$STAGE/usr/share/doc/kvmctl/examples/"
cat >"$STAGE/usr/share/doc/kvmctl/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: kvmctl

Files: *
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.
EOF
# Bash completion, where bash-completion looks for it (printed by the staged venv's python: the
# relocated `kvmctl` script already names /opt/kvmctl/bin/python3, not installed here).
install -d "$STAGE/usr/share/bash-completion/completions"
"$STAGE$PREFIX/bin/python3" -I -m controller.cli completion bash \
    >"$STAGE/usr/share/bash-completion/completions/kvmctl"

SIZE=$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
cat >"$STAGE/DEBIAN/control" <<EOF
Package: kvmctl
Version: $VERSION
Architecture: $ARCH
Maintainer: kvmctl developers <kvmctl@localhost>
Installed-Size: $SIZE
Depends: python$PYVER, libvirt0, libc6
Recommends: libvirt-daemon-system, libvirt-daemon-driver-qemu, qemu-system-x86, lvm2, fence-agents
Suggests: tgt, open-iscsi, etcd-client
Section: admin
Priority: optional
Homepage: https://kvmctl.invalid/
Description: high availability for KVM virtual machines on etcd
 An agent on every KVM host and a leader-elected controller keep VMs running:
 heartbeat leases in etcd, power fencing, self-fencing with a watchdog, live
 migration. kvmctl and its Python dependencies live in a venv under /opt/kvmctl;
 /usr/sbin/fence_kvmctl fences kvmctl VMs from a guest Pacemaker cluster.
EOF
# The services are not enabled or started: a host joins once it has its certificates,
# /etc/kvmctl/config.yaml and a ClusterNode (docs/operations.md). Nor are they stopped on
# removal: stopping an agent whose watchdog is armed resets the host.
cat >"$STAGE/DEBIAN/postinst" <<EOF
#!/bin/sh
set -e
if [ "\$1" = configure ]; then
    $PREFIX/bin/python3 -m compileall -q $PREFIX/lib >/dev/null
    if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
fi
EOF
cat >"$STAGE/DEBIAN/postrm" <<EOF
#!/bin/sh
set -e
if [ "\$1" = remove ] || [ "\$1" = purge ]; then
    rm -rf $PREFIX
    if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
fi
EOF
cat >"$STAGE/DEBIAN/prerm" <<EOF
#!/bin/sh
set -e
# Byte-code written by the postinst is not in the package's file list: drop it first.
find $PREFIX -name __pycache__ -type d -prune -exec rm -rf {} + 2>/dev/null || true
EOF
chmod 0755 "$STAGE/DEBIAN/postinst" "$STAGE/DEBIAN/postrm" "$STAGE/DEBIAN/prerm"

dpkg-deb --root-owner-group -Zxz --build "$STAGE" "$OUT" >/dev/null
echo "$OUT"
