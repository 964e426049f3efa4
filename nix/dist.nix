# The files for systems without Nix, committed in dist/: the plain unit files (the same
# description, nix/unit.nix, the NixOS module uses, with Debian/Ubuntu paths) in
# dist/systemd/, and the Prometheus rules with their default thresholds (nix/alerts.nix)
# in dist/prometheus/. `bash nix/render-dist.sh` writes them; `--check` fails when they
# are not current.
let
  units =
    (import ./unit.nix {
      execStart = "/usr/local/bin/llm-gateway serve --config /etc/llm-gateway/llm-gateway.toml";
      kill = "/bin/kill";
      # systemd keeps the socket open across restarts: no connection attempt is refused.
      sockets = {
        api = [ "127.0.0.1:8080" ];
      };
    }).files;
in
builtins.listToAttrs (
  map (name: {
    name = "systemd/${name}";
    value = units.${name};
  }) (builtins.attrNames units)
)
// {
  "prometheus/llm-gateway.rules.yml" = (import ./alerts.nix { }).text;
}
