#!/bin/sh
# Install cgpolicy on a login node, from this source tree.
#
#   packaging/install.sh                 install (needs PyPI for dbus-fast and python-pam)
#   packaging/install.sh --wheels DIR    install offline from wheels built elsewhere
#   packaging/install.sh --uninstall     remove the PAM line first, then the daemon and program
#
# It installs into a virtual environment (PREFIX, default /opt/cgpolicy), links
# the commands into /usr/sbin, installs the default policy in /etc/cgpolicy
# unless one is there, and wires the PAM hook with pam-auth-update when the
# system has it (Debian, Ubuntu). Elsewhere it prints the line to add. Then it
# installs cgpolicyd's unit and D-Bus files, and enables and (re)starts it.
# Running it again upgrades in place.
set -eu

SRC=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${PREFIX:-/opt/cgpolicy}
WHEELS=
ACTION=install

while [ $# -gt 0 ]; do
    case $1 in
        --wheels) WHEELS=$2; shift 2 ;;
        --uninstall) ACTION=uninstall; shift ;;
        *) echo "usage: $0 [--wheels DIR] [--uninstall]" >&2; exit 2 ;;
    esac
done

if [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root" >&2
    exit 1
fi

# The hook's PAM line, from its one source: the pam-auth-update profile.
PAM_LINE="session $(sed -n 's/^[[:space:]]\{1,\}//p' "$SRC/packaging/pam-configs/cgpolicy" | tr -s '\t' ' ')"
UNIT=/etc/systemd/system/cgpolicyd.service
BUS_POLICY=/usr/share/dbus-1/system.d/org.cgpolicy1.conf
BUS_ACTIVATION=/usr/share/dbus-1/system-services/org.cgpolicy1.service
BUS_INTERFACE=/usr/share/dbus-1/interfaces/org.cgpolicy1.Manager.xml
# cgpolicyd's drop-in for TCP ([notify], [sync]): installed inactive, where the
# packages put it; an admin copies it into place (see the README).
NETWORK_DROPIN=/usr/share/cgpolicy/network.conf

# systemctl can only reload and start things when systemd runs (not in a chroot
# or an image being built); the files are installed either way.
systemd_running() {
    [ -d /run/systemd/system ]
}

if [ "$ACTION" = uninstall ]; then
    # The PAM line goes first, so no login ever calls a hook that is gone.
    if command -v pam-auth-update >/dev/null; then
        DEBIAN_FRONTEND=noninteractive pam-auth-update --package --remove cgpolicy
        rm -f /usr/share/pam-configs/cgpolicy
    fi
    if systemd_running && [ -e "$UNIT" ]; then
        systemctl disable --now cgpolicyd.service || true
    fi
    rm -f "$UNIT" "$BUS_POLICY" "$BUS_ACTIVATION" "$BUS_INTERFACE" "$NETWORK_DROPIN"
    rmdir "$(dirname "$NETWORK_DROPIN")" 2>/dev/null || true
    if systemd_running; then
        systemctl daemon-reload
        systemctl reload dbus.service || true
    fi
    rm -f /usr/sbin/cgpolicyd /usr/sbin/cgpolicyctl /usr/sbin/cgpolicy-pam-hook \
        /etc/pam.d/cgpolicy-selftest
    rm -rf "$PREFIX"
    echo "cgpolicy removed; /etc/cgpolicy and /var/lib/cgpolicy are kept"
    exit 0
fi

python3 -m venv "$PREFIX"
# With the plots of reports and mails, and the driver of [sync].
EXTRAS="[plot,sync]"
if [ -n "$WHEELS" ]; then
    "$PREFIX/bin/pip" install --quiet --force-reinstall --no-index --find-links "$WHEELS" \
        "cgpolicy$EXTRAS"
else
    "$PREFIX/bin/pip" install --quiet --force-reinstall "$SRC$EXTRAS"
fi
ln -sf "$PREFIX/bin/cgpolicyctl" /usr/sbin/cgpolicyctl
ln -sf "$PREFIX/bin/cgpolicyd" /usr/sbin/cgpolicyd
# The hook starts its interpreter with -I -S, so it names the venv's site itself.
SITE=$("$PREFIX/bin/python3" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
sed -e "s|@PYTHON@|$PREFIX/bin/python3|" -e "s|@SITE@|$SITE|" -e "s|@MODULE@|hook|" \
    "$SRC/packaging/launcher.in" >/usr/sbin/cgpolicy-pam-hook.new
chmod 0755 /usr/sbin/cgpolicy-pam-hook.new
mv -f /usr/sbin/cgpolicy-pam-hook.new /usr/sbin/cgpolicy-pam-hook

if [ ! -e /etc/cgpolicy/cgpolicy.toml ]; then
    install -d -o root -g root -m 0755 /etc/cgpolicy /etc/cgpolicy/groups.d
    install -o root -g root -m 0644 "$SRC/etc/cgpolicy/cgpolicy.toml" /etc/cgpolicy/
    install -o root -g root -m 0644 "$SRC"/etc/cgpolicy/groups.d/*.toml /etc/cgpolicy/groups.d/
fi
# Root's alone (also on an upgrade): the hook and cgpolicyd refuse a state
# directory others may write, and no user may read another's tier from it.
install -d -o root -g root -m 0700 /var/lib/cgpolicy

if command -v pam-auth-update >/dev/null; then
    install -o root -g root -m 0644 "$SRC/packaging/pam-configs/cgpolicy" /usr/share/pam-configs/
    DEBIAN_FRONTEND=noninteractive pam-auth-update --package --enable cgpolicy
    echo "PAM: enabled the cgpolicy profile (after pam_systemd in common-session)"
else
    echo "PAM: add this line to the session stack of sshd, after pam_systemd.so:"
    echo "    $PAM_LINE"
fi

# The PAM service of `cgpolicyctl selftest`: only root passes its auth stack,
# and its sessions go through the same session stack as logins.
for stack in common-session password-auth; do
    if [ -e "/etc/pam.d/$stack" ]; then
        sed "s/@SESSION_STACK@/$stack/" "$SRC/packaging/pam.d/cgpolicy-selftest" \
            >/etc/pam.d/cgpolicy-selftest
        chmod 0644 /etc/pam.d/cgpolicy-selftest
        break
    fi
done

/usr/sbin/cgpolicyctl check

# cgpolicyd: who may own and call org.cgpolicy1 on the system bus, bus
# activation, the interface for introspection tools, and the unit.
install -D -o root -g root -m 0644 "$SRC/dbus/org.cgpolicy1.conf" "$BUS_POLICY"
install -D -o root -g root -m 0644 "$SRC/dbus/org.cgpolicy1.service" "$BUS_ACTIVATION"
install -D -o root -g root -m 0644 "$SRC/pam_cgpolicy/org.cgpolicy1.Manager.xml" "$BUS_INTERFACE"
install -D -o root -g root -m 0644 "$SRC/packaging/systemd/cgpolicyd.service" "$UNIT"
install -D -o root -g root -m 0644 "$SRC/packaging/systemd/cgpolicyd.service.d/network.conf" \
    "$NETWORK_DROPIN"
if ! systemd_running; then
    echo "cgpolicyd: systemd is not running here; enable it later: systemctl enable --now cgpolicyd"
elif ! "$PREFIX/bin/python3" -I -c 'import pam_cgpolicy.daemon' 2>/dev/null; then
    # -I: the installed package, never a pam_cgpolicy in the current directory.
    systemctl daemon-reload
    systemctl reload dbus.service
    echo "cgpolicyd: NOT started: this cgpolicy has no working daemon (pam_cgpolicy.daemon" \
        "does not import); logins still get their group's limits" >&2
else
    systemctl daemon-reload
    # Before cgpolicyd starts: the bus must know it may own org.cgpolicy1.
    systemctl reload dbus.service
    systemctl enable cgpolicyd.service
    # restart, not start: a re-run (an upgrade) must run the new code.
    if ! systemctl restart cgpolicyd.service; then
        echo "cgpolicyd: failed to start; see: journalctl -u cgpolicyd" >&2
        exit 1
    fi
    echo "cgpolicyd: enabled and running"
fi

echo "cgpolicy installed in $PREFIX; run 'cgpolicyctl doctor' to check this node"
