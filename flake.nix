{
  description = "Aegis: the Prometheus metrics of services on Unix sockets, served over one TCP port";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;

      # Linux only: besides the NixOS module, Aegis itself uses Linux-only
      # calls (TCP_INFO for the write deadline, /proc for long socket paths),
      # and its package declares no other platform.
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f system nixpkgs.legacyPackages.${system});

      aegisFor =
        pkgs:
        pkgs.python3Packages.toPythonApplication (pkgs.python3Packages.callPackage ./pkgs/aegis { });
    in
    {
      packages = forAllSystems (
        system: pkgs: {
          aegis = aegisFor pkgs;
          default = self.packages.${system}.aegis;
        }
      );

      apps = forAllSystems (
        system: pkgs: {
          default = {
            type = "app";
            program = lib.getExe self.packages.${system}.aegis;
            meta.description = self.packages.${system}.aegis.meta.description;
          };
        }
      );

      overlays.default = final: prev: {
        pythonPackagesExtensions = prev.pythonPackagesExtensions ++ [
          (pyFinal: pyPrev: { aegis = pyFinal.callPackage ./pkgs/aegis { }; })
        ];
        aegis = final.python3Packages.toPythonApplication final.python3Packages.aegis;
      };

      nixosModules = {
        aegis =
          { lib, pkgs, ... }:
          {
            _class = "nixos";
            imports = [ ./modules/aegis.nix ];
            # This flake's package, so that the module works without the
            # overlay; on a system the flake has no package for, the same
            # package built from the system's nixpkgs.
            within.services.aegis.package = lib.mkDefault (
              self.packages.${pkgs.stdenv.hostPlatform.system}.aegis or (aegisFor pkgs)
            );
          };
        default = self.nixosModules.aegis;
      };

      checks = forAllSystems (
        system: pkgs: {
          # Building the package runs its test suite.
          aegis = self.packages.${system}.aegis;
          vm = pkgs.testers.runNixOSTest {
            imports = [ ./nixos-tests/aegis.nix ];
            node.specialArgs.aegisFlake = self;
          };
        }
      );

      devShells = forAllSystems (
        system: pkgs: {
          default = pkgs.mkShell {
            packages = [
              (pkgs.python3.withPackages (
                ps:
                (ps.callPackage ./pkgs/aegis { }).dependencies
                ++ [
                  ps.hypothesis
                  ps.pytest
                  ps.pytest-aiohttp
                  ps.pytest-xdist
                  ps.trustme
                ]
              ))
              # prometheus and promtool (in prometheus' cli output), for the
              # end-to-end tests
              pkgs.prometheus
              pkgs.prometheus.cli
              pkgs.ruff
            ];
            # The tests import aegis from the checkout being edited; the
            # command-line tests, which start an installed `aegis`, skip
            # and say so (the README's venv, or `nix build`, has one).
            shellHook = ''
              export PYTHONPATH="$PWD/pkgs/aegis''${PYTHONPATH:+:$PYTHONPATH}"
            '';
          };
        }
      );

      formatter = forAllSystems (system: pkgs: pkgs.nixfmt-tree);
    };
}
