# The llm-gateway package, built with crane: dependencies once (cargoArtifacts), then the
# crate. The source is filtered to what the build and the tests read.
{ pkgs, craneLib }:
let
  inherit (pkgs) lib;

  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../clippy.toml
      ../src
      # Embedded at compile time (sqlx::migrate!).
      ../migrations
      ../tests
      # Read by the CLI tests.
      ../examples
    ];
  };

  commonArgs = {
    inherit src;
    strictDeps = true;
    # aws-lc-sys (rustls) builds C code with cmake; crane drives cargo, not cmake.
    nativeBuildInputs = [
      pkgs.cmake
      pkgs.perl
    ];
    dontUseCmakeConfigure = true;
  };

  cargoArtifacts = craneLib.buildDepsOnly commonArgs;

  package = craneLib.buildPackage (
    commonArgs
    // {
      inherit cargoArtifacts;
      # The test suite runs as its own check (nix/checks.nix).
      doCheck = false;
      meta = {
        description = "OpenAI-compatible gateway for self-hosted LLM servers";
        license = with lib.licenses; [
          mit
          asl20
        ];
        mainProgram = "llm-gateway";
        platforms = lib.platforms.linux;
      };
    }
  );
in
{
  inherit
    craneLib
    src
    commonArgs
    cargoArtifacts
    package
    ;
}
