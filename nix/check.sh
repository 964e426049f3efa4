#!/usr/bin/env bash
# The Nix and unit-file checks that run without nixpkgs (CI runs this; see README):
# every .nix file parses, deadnix and nixfmt are clean, the pure unit description renders
# to the committed dist/systemd/ files, and systemd-analyze verifies them and scores their
# exposure at or under 1.5.
set -euo pipefail
cd "$(dirname "$0")/.."

mapfile -t files < <(git ls-files --cached --others --exclude-standard '*.nix')
echo "${#files[@]} Nix files"
for f in "${files[@]}"; do
  nix-instantiate --parse "$f" >/dev/null
done
deadnix --fail "${files[@]}"
nixfmt --check "${files[@]}"
bash nix/render-dist.sh --check
# The VM scenario (tests/vm/scenario.py) at least compiles.
python3 -c "import ast, sys; ast.parse(open(sys.argv[1]).read(), sys.argv[1])" tests/vm/scenario.py

# systemd-analyze verify resolves every unit and command the files name, so it runs
# against a scratch root holding the host's units, kill(1) and a stand-in binary.
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/usr/lib/systemd" "$root/etc/systemd/system" "$root/usr/local/bin" "$root/bin"
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
cp /bin/kill "$root/bin/kill"
printf '#!/bin/sh\n' >"$root/usr/local/bin/llm-gateway"
chmod +x "$root/usr/local/bin/llm-gateway"
cp dist/systemd/*.service dist/systemd/*.socket "$root/etc/systemd/system/"
units=()
for u in dist/systemd/*.service dist/systemd/*.socket; do
  units+=("/etc/systemd/system/$(basename "$u")")
done
# Unknown or misplaced directives are only warnings: any output fails the check.
report=$(systemd-analyze verify --root="$root" "${units[@]}" 2>&1) || true
if [[ -n $report ]]; then
  echo "$report" >&2
  echo "systemd-analyze verify found problems in dist/systemd/" >&2
  exit 1
fi
echo "systemd-analyze verify: clean"
# --threshold is on a 0-100 scale: 15 = exposure 1.5.
systemd-analyze security --offline=true --threshold=15 dist/systemd/llm-gateway.service | tail -1
# With an IP allow list (the module's allowedClients), at or under 1.0.
allowed=$(mktemp -d)
nix-instantiate --eval --strict --json -E '(import ./nix/unit.nix {
  execStart = "/usr/local/bin/llm-gateway serve";
  allowedClients = [ "192.168.132.0/24" ];
}).files."llm-gateway.service"' | python3 -c 'import json, sys; print(json.load(sys.stdin), end="")' \
  >"$allowed/llm-gateway.service"
grep -qx 'IPAddressDeny=any' "$allowed/llm-gateway.service"
systemd-analyze security --offline=true --threshold=10 "$allowed/llm-gateway.service" | tail -1
rm -rf "$allowed"
