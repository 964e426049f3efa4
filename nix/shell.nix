# Development shell: the toolchain, PostgreSQL for the tests, and the linters CI runs.
{ pkgs, craneLib }:
craneLib.devShell {
  packages = [
    pkgs.cargo-nextest
    pkgs.postgresql
    pkgs.deadnix
    pkgs.nixfmt
    pkgs.python3
  ];
  # tests/common/pg.rs starts throwaway clusters from these binaries.
  LLM_GATEWAY_TEST_PG_BINDIR = "${pkgs.postgresql}/bin";
}
