#!/usr/bin/env bash
# Installs what the VM harness needs on a Debian 12 host (`tools.sh mirror` only prints
# the mirror): debootstrap, e2fsprogs,
# an ssh client, and QEMU from bookworm-backports (bookworm's own qemu-system-x86
# conflicts with the newer qemu-utils these machines have). The backports entry reuses
# the mirror of the machine's own apt sources: no mirror name is written here.
set -euo pipefail

# The Debian mirror the machine already uses (printed for the image builder too).
mirror() {
  # First "URIs:" of a deb822 source, or the URL of a one-line "deb" entry, that
  # carries the main archive (not -security).
  {
    cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ {print $2}'
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk '/^deb / {print $2}'
  } | grep -v security | head -1 || true
}

if [[ ${1:-} == mirror ]]; then
  mirror
  exit 0
fi

need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v ssh >/dev/null || need+=(openssh-client)
command -v ssh-keygen >/dev/null || need+=(openssh-client)
if ((${#need[@]})); then
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}"
fi
if ! command -v qemu-system-x86_64 >/dev/null; then
  url=$(mirror)
  [[ -n $url ]] || { echo "no apt mirror found in /etc/apt/sources*" >&2; exit 1; }
  echo "deb $url bookworm-backports main" >/etc/apt/sources.list.d/llm-gateway-vm-backports.list
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    -t bookworm-backports qemu-system-x86
fi
qemu-system-x86_64 --version | head -1
