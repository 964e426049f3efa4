# `nix flake check`: the package, clippy, rustfmt, the test suite (with throwaway
# PostgreSQL clusters in the sandbox), the Nix lints, dist/systemd/ being current, the
# example configuration, and the NixOS VM test.
{
  pkgs,
  built,
  module,
}:
let
  inherit (pkgs) lib;
  craneArgs = built.commonArgs // {
    inherit (built) cargoArtifacts;
  };
  craneLib = built.craneLib;
  nixFiles = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../flake.nix
      (lib.fileset.fileFilter (f: f.hasExt "nix") ../nix)
    ];
  };
  dist = import ./dist.nix;
in
{
  package = built.package;

  clippy = craneLib.cargoClippy (
    craneArgs // { cargoClippyExtraArgs = "--all-targets -- --deny warnings"; }
  );

  fmt = craneLib.cargoFmt { inherit (built) src; };

  # tests/common/pg.rs runs initdb/pg_ctl from this directory (as the build user). The
  # two journald tests mount over /run/systemd in a namespace, which the build sandbox
  # lacks: they run in CI (.ci/run) and the VM test checks the journal for real.
  tests = craneLib.cargoTest (
    craneArgs
    // {
      nativeCheckInputs = [ pkgs.postgresql ];
      LLM_GATEWAY_TEST_PG_BINDIR = "${pkgs.postgresql}/bin";
      cargoTestExtraArgs = "-- --skip with_stderr_on_the_journal --skip without_a_journald_socket";
    }
  );

  nix-lint =
    pkgs.runCommand "llm-gateway-nix-lint"
      {
        nativeBuildInputs = [
          pkgs.deadnix
          pkgs.nixfmt
        ];
      }
      ''
        cd ${nixFiles}
        deadnix --fail $(find . -name '*.nix')
        nixfmt --check $(find . -name '*.nix')
        touch $out
      '';

  dist-systemd-current = pkgs.runCommand "llm-gateway-dist-systemd-current" { } (
    lib.concatStrings (
      lib.mapAttrsToList (name: text: ''
        diff -u ${pkgs.writeText name text} ${../dist/systemd + "/${name}"}
      '') dist
    )
    + "touch $out\n"
  );

  example-config = pkgs.runCommand "llm-gateway-example-config" { } ''
    ${lib.getExe built.package} check-config --config ${../examples/llm-gateway.toml}
    touch $out
  '';

  vm = import ./tests/vm.nix { inherit pkgs module; };
}
