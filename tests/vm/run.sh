#!/usr/bin/env bash
# The service under a real systemd: builds a Debian bookworm VM with the release binary
# and the shipped unit files, boots it under QEMU and runs tests/vm/scenario.py (the same
# scenario as the NixOS VM test). Prints each phase's duration; ends with
# "N passed, M failed" and fails on any failure.
#
#   bash tests/vm/run.sh [WORKDIR]     (default: target/vm)
set -euo pipefail
cd "$(dirname "$0")/../.."
work=$(realpath -m "${1:-target/vm}")
mkdir -p "$work"

phase() {
  local name=$1 start=$SECONDS
  shift
  echo "--> vm: ${name}"
  "$@"
  echo "<-- vm: ${name}: $((SECONDS - start)) s"
}

phase "tools (debootstrap, QEMU)" bash tests/vm/tools.sh
phase "release build" cargo build --release --locked
phase "image" bash tests/vm/image.sh "$work" target/release/llm-gateway
phase "scenario" python3 tests/vm/run.py "$work"
