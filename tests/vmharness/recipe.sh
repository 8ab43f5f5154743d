#!/bin/sh
# Builds the root filesystem of the Debian 12 test VM into ROOTFS_DIR.
# Run as root on the host. The image is built from this tree by image.py,
# which hashes this file: any change here triggers a rebuild.
set -eu

ROOTFS=${1:?usage: recipe.sh ROOTFS_DIR}
SUITE=bookworm
# Debian's own python3-dbus-fast, python3-pampy and the optional libraries are what the
# .deb runs on. The mail server, node_exporter, PostgreSQL, CRIU and nspawn are the real
# components the suite starts itself (disabled at boot below).
PACKAGES=systemd,systemd-sysv,dbus,libpam-systemd,openssh-server,linux-image-amd64,\
initramfs-tools,python3,python3-venv,sudo,procps,iproute2,kmod,udev,ca-certificates,\
psmisc,zstd,less,acl,rsync,python3-dbus-fast,python3-pampy,python3-six,\
python3-prometheus-client,python3-matplotlib,python3-psycopg2,\
exim4-daemon-light,bsd-mailx,prometheus-node-exporter,postgresql,criu,systemd-container,\
openssh-client
SERVICES_OFF="exim4.service exim4-base.timer prometheus-node-exporter.service postgresql.service"

# The mirror the host itself uses for Debian (a site may have a local one), unless
# CGPOLICY_VM_MIRROR names another. Reads one-line and deb822 apt sources.
host_mirror() {
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -r "$f" ] || continue
        awk -v suite="$SUITE" '$1 == "deb" && $0 ~ " " suite " " {
            for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' "$f"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -r "$f" ] || continue
        awk -v suite="$SUITE" 'BEGIN { RS = ""; FS = "\n" } {
            uri = ""; ok = 0; deb = 0
            for (i = 1; i <= NF; i++) {
                if ($i ~ /^URIs:/) { split($i, w, " "); uri = w[2] }
                if ($i ~ /^Suites:/ && (" " $i " ") ~ (" " suite " ")) ok = 1
                if ($i ~ /^Types:/ && $i ~ / deb( |$)/) deb = 1
            }
            if (uri != "" && ok && deb) { print uri; exit }
        }' "$f"
    done
}
MIRROR=${CGPOLICY_VM_MIRROR:-$(host_mirror | head -n 1)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

step() { echo "recipe: $*" >&2; }
in_root() { chroot "$ROOTFS" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }

step "debootstrap $SUITE from $MIRROR"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR"

step "base configuration"
echo cgnode >"$ROOTFS/etc/hostname"
cat >"$ROOTFS/etc/hosts" <<'HOSTS'
127.0.0.1 localhost
127.0.1.1 cgnode
::1 localhost ip6-localhost ip6-loopback
HOSTS
echo '/dev/vda / ext4 rw 0 1' >"$ROOTFS/etc/fstab"
# slirp's built-in resolver; networkd does not write resolv.conf by itself.
echo 'nameserver 10.0.2.3' >"$ROOTFS/etc/resolv.conf"
# Present in the image so machine-id is generated fresh (and stays) on first boot.
: >"$ROOTFS/etc/machine-id"

step "network"
cat >"$ROOTFS/etc/systemd/network/20-wired.network" <<'NET'
[Match]
Name=en* eth*

[Network]
DHCP=yes
NET
in_root systemctl enable systemd-networkd.service
# Nothing in the tests needs network-online; waiting for it only slows boot.
in_root systemctl disable systemd-networkd-wait-online.service || true
in_root systemctl enable serial-getty@ttyS0.service

step "sshd"
cat >"$ROOTFS/etc/ssh/sshd_config.d/10-testvm.conf" <<'SSHD'
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
SSHD
rm -f "$ROOTFS"/etc/ssh/ssh_host_*
in_root ssh-keygen -A
install -d -m 700 "$ROOTFS/root/.ssh"

step "CA certificates from the host"
if [ -d /usr/local/share/ca-certificates ]; then
    cp -r /usr/local/share/ca-certificates/. "$ROOTFS/usr/local/share/ca-certificates/"
fi
in_root update-ca-certificates >/dev/null
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
fi

step "initrd modules"
missing=
for mod in virtio_blk virtio_net virtio_pci ext4; do
    for initrd in "$ROOTFS"/boot/initrd.img-*; do
        kver=${initrd##*/initrd.img-}
        grep -q "/$mod\.ko" "$ROOTFS/lib/modules/$kver/modules.builtin" && continue
        in_root lsinitramfs "/boot/initrd.img-$kver" | grep -q "/$mod\.ko" || missing="$missing $mod"
    done
done
if [ -n "$missing" ]; then
    step "adding to initrd:$missing"
    for mod in $missing; do echo "$mod" >>"$ROOTFS/etc/initramfs-tools/modules"; done
    in_root update-initramfs -u -k all
fi

step "services the suite starts itself"
for unit in $SERVICES_OFF; do
    in_root systemctl disable "$unit" 2>/dev/null || true
done

step "cleanup"
in_root apt-get clean
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/log/*.log
step "done"
