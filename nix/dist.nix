# The plain unit files for systemd distributions without Nix, committed in dist/systemd/:
# the same description (nix/unit.nix) the NixOS module uses, with Debian/Ubuntu paths.
# `bash nix/render-dist.sh` writes them; `--check` fails when they are not current.
(import ./unit.nix {
  execStart = "/usr/local/bin/llm-gateway serve --config /etc/llm-gateway/llm-gateway.toml";
  kill = "/bin/kill";
  # systemd keeps the socket open across restarts: no connection attempt is refused.
  sockets = {
    api = [ "127.0.0.1:8080" ];
  };
}).files
