#!/usr/bin/env bash
# Builds the Debian bookworm disk the systemd scenario boots: debootstrap from the
# machine's own mirror, then the release binary, the unit files from dist/systemd/
# (rendered from nix/unit.nix, unchanged), a config, PostgreSQL with the service's role
# and database, a mock OpenAI upstream, and ssh access for the driver.
#
#   image.sh WORKDIR BINARY     -> WORKDIR/disk.img, vmlinuz, initrd.img, id_ed25519
set -euo pipefail
work=$1
binary=$2
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
root=$work/root
mirror=$(bash "$here/tools.sh" mirror)

rm -rf "$root" "$work/disk.img"
mkdir -p "$root/etc/initramfs-tools/conf.d"
# A small initrd (virtio disk and ext4 only): 6.5 MB instead of 36, boots twice as fast.
echo 'MODULES=list' >"$root/etc/initramfs-tools/conf.d/modules.conf"
printf 'virtio_pci\nvirtio_blk\next4\n' >"$root/etc/initramfs-tools/modules"

packages=systemd,systemd-sysv,dbus,linux-image-amd64,initramfs-tools,kmod,udev
packages+=,openssh-server,curl,ca-certificates,iproute2,procps,postgresql
# DynamicUser= names resolve through nss-systemd: PostgreSQL peer auth needs it.
packages+=,libnss-systemd
debootstrap --variant=minbase --include="$packages" bookworm "$root" "$mirror" \
  >"$work/debootstrap.log" 2>&1 || {
  tail -30 "$work/debootstrap.log" >&2
  exit 1
}

# Boot and network: root on the virtio disk, a static address on QEMU's user network.
echo '/dev/vda / ext4 rw,errors=remount-ro 0 1' >"$root/etc/fstab"
echo gateway >"$root/etc/hostname"
cat >"$root/etc/systemd/network/10-vm.network" <<'EOF'
[Match]
Name=en* eth*

[Network]
Address=10.0.2.15/24
Gateway=10.0.2.2
EOF
chroot "$root" systemctl enable systemd-networkd.service ssh.service >/dev/null 2>&1

# The driver's ssh key.
rm -f "$work/id_ed25519" "$work/id_ed25519.pub"
ssh-keygen -q -t ed25519 -N '' -f "$work/id_ed25519"
install -d -m 0700 "$root/root/.ssh"
install -m 0600 "$work/id_ed25519.pub" "$root/root/.ssh/authorized_keys"

# The service exactly as shipped: dist/systemd/ files, binary in /usr/local/bin.
install -m 0755 "$binary" "$root/usr/local/bin/llm-gateway"
install -m 0644 "$repo"/dist/systemd/llm-gateway.service "$repo"/dist/systemd/llm-gateway.socket \
  "$root/etc/systemd/system/"
install -d "$root/etc/llm-gateway"
cat >"$root/etc/llm-gateway/llm-gateway.toml" <<'EOF'
[storage]
database_url = "postgres:///llm-gateway?host=/run/postgresql&user=llm-gateway"

[[backends]]
name = "mock"
base_url = "http://127.0.0.1:9000/v1"

[[models]]
name = "m"
routes = [{ backend = "mock" }]
EOF
# What README's Debian section tells an operator to add: the database ordering.
install -d "$root/etc/systemd/system/llm-gateway.service.d"
cat >"$root/etc/systemd/system/llm-gateway.service.d/postgresql.conf" <<'EOF'
[Unit]
After=postgresql.service llm-gateway-db.service
Requires=llm-gateway-db.service
EOF

# Test fixtures, not part of what ships: the role and database, the mock upstream and
# the admin wrapper (what the NixOS module installs as llm-gateway-admin).
cat >"$root/etc/systemd/system/llm-gateway-db.service" <<'EOF'
[Unit]
Description=PostgreSQL role and database for llm-gateway (VM test)
After=postgresql.service
Requires=postgresql.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'runuser -u postgres -- psql -tAc "SELECT 1 FROM pg_roles WHERE rolname = \'llm-gateway\'" | grep -q 1 || runuser -u postgres -- createuser llm-gateway; runuser -u postgres -- psql -tAc "SELECT 1 FROM pg_database WHERE datname = \'llm-gateway\'" | grep -q 1 || runuser -u postgres -- createdb -O llm-gateway llm-gateway'

[Install]
WantedBy=multi-user.target
EOF
cat >"$root/etc/systemd/system/mock-upstream.service" <<'EOF'
[Unit]
Description=Mock OpenAI upstream (VM test)
Before=llm-gateway.service

[Service]
DynamicUser=yes
ExecStart=/usr/local/bin/llm-gateway mock-upstream --listen 127.0.0.1:9000 --chunks 40 --chunk-interval 100ms

[Install]
WantedBy=multi-user.target
EOF
cat >"$root/usr/local/bin/llm-gateway-admin" <<'EOF'
#!/bin/sh
exec systemd-run --quiet --wait --pipe --collect \
  --property=DynamicUser=yes --property=User=llm-gateway --property=Group=llm-gateway \
  --property=StateDirectory=llm-gateway \
  --setenv=LLM_GATEWAY_CONFIG=/etc/llm-gateway/llm-gateway.toml \
  /usr/local/bin/llm-gateway "$@"
EOF
chmod 0755 "$root/usr/local/bin/llm-gateway-admin"
chroot "$root" systemctl enable llm-gateway.socket llm-gateway.service \
  llm-gateway-db.service mock-upstream.service >/dev/null 2>&1

cp "$(readlink -f "$root"/boot/vmlinuz-*)" "$work/vmlinuz"
cp "$(readlink -f "$root"/boot/initrd.img-*)" "$work/initrd.img"
mkfs.ext4 -q -F -L root -d "$root" "$work/disk.img" 3G
rm -rf "$root"
ls -la "$work/disk.img" "$work/vmlinuz" "$work/initrd.img"
