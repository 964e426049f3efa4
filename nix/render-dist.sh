#!/usr/bin/env bash
# Renders dist/ (systemd units, Prometheus rules) from nix/dist.nix (pure Nix: needs only
# nix-instantiate). Hand-written files there (README.md, *.test.yml) are left alone.
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
    path = os.path.join(sys.argv[1], name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
' "$out"
dirs=$(cd "$out" && ls)
if [[ $mode == --check ]]; then
  for d in $dirs; do
    diff -ru "$out/$d" "dist/$d" --exclude=README.md --exclude='*.test.yml' || {
      echo "dist/$d/ is not what nix/dist.nix renders: run bash nix/render-dist.sh" >&2
      exit 1
    }
  done
  echo "dist/ is current"
else
  for d in $dirs; do
    mkdir -p "dist/$d"
    cp "$out/$d"/* "dist/$d/"
    ls "dist/$d/"
  done
fi
