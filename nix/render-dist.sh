#!/usr/bin/env bash
# Renders dist/systemd/ from nix/dist.nix (pure Nix: needs only nix-instantiate).
#   bash nix/render-dist.sh          write the files
#   bash nix/render-dist.sh --check  fail when a committed file differs or is missing
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-write}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
nix-instantiate --eval --strict --json nix/dist.nix | python3 -c '
import json, os, sys
for name, text in json.load(sys.stdin).items():
    with open(os.path.join(sys.argv[1], name), "w") as f:
        f.write(text)
' "$out"
if [[ $mode == --check ]]; then
  diff -ru "$out" dist/systemd --exclude=README.md || {
    echo "dist/systemd/ is not what nix/dist.nix renders: run bash nix/render-dist.sh" >&2
    exit 1
  }
  echo "dist/systemd/ is current"
else
  cp "$out"/* dist/systemd/
  ls dist/systemd/
fi
