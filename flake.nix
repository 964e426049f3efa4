{
  description = "llm-gateway: an authenticated, metered OpenAI-compatible gateway to self-hosted LLM servers";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";
    crane.url = "github:ipetkov/crane";
  };

  # Wiring only: the build is nix/package.nix, the module nix/module.nix, the checks
  # nix/checks.nix (VM test: nix/tests/vm.nix), the dev shell nix/shell.nix.
  outputs =
    {
      self,
      nixpkgs,
      crane,
    }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      build =
        pkgs:
        import ./nix/package.nix {
          inherit pkgs;
          craneLib = crane.mkLib pkgs;
        };
    in
    {
      packages = forSystems (pkgs: rec {
        llm-gateway = (build pkgs).package;
        default = llm-gateway;
      });

      overlays.default = final: _prev: { llm-gateway = (build final).package; };

      nixosModules.default = lib.modules.importApply ./nix/module.nix { inherit (self) packages; };

      checks = forSystems (
        pkgs:
        import ./nix/checks.nix {
          inherit pkgs;
          built = build pkgs;
          module = self.nixosModules.default;
        }
      );

      devShells = forSystems (pkgs: {
        default = import ./nix/shell.nix {
          inherit pkgs;
          craneLib = crane.mkLib pkgs;
        };
      });
    };
}
