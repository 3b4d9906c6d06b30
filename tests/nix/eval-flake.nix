# Evaluates flake.nix's outputs against a stub nixpkgs whose packages are
# inert attribute sets, to check how the outputs are wired: which systems get
# what, the app, the overlay, and that nixosModules.default works without the
# overlay. Used by tests/test_nix.py; nothing here is part of Aegis.
{
  # Directory holding nixpkgs' lib/default.nix.
  nixpkgsLib,
}:

let
  lib = import nixpkgsLib;

  stub = name: attrs: {
    type = "derivation";
    inherit name;
    outPath = "/stub/${name}";
  }
  // attrs;

  pythonPackagesFor = system: {
    callPackage =
      path: args:
      stub "aegis-${system}" {
        source = toString path;
        meta = {
          mainProgram = "aegis";
          description = "stub description";
        };
        dependencies = [ ];
      };
    toPythonApplication = drv: drv // { application = true; };
  };

  stubPkgs = system: {
    stdenv.hostPlatform.system = system;
    python3Packages = pythonPackagesFor system;
    # Each Python package as its attribute name, so the shell's list can be read back.
    python3.withPackages =
      f:
      stub "python-env" {
        pythonPackages = f (
          lib.genAttrs [ "hypothesis" "pytest" "pytest-aiohttp" "pytest-xdist" "trustme" ] lib.id
          // {
            # The real package expression, each of its arguments its own name.
            callPackage =
              path: args:
              let
                package = import path;
              in
              package (
                lib.mapAttrs (name: _: name) (lib.functionArgs package)
                // {
                  inherit lib;
                  buildPythonPackage = lib.id;
                }
              );
          }
        );
      };
    testers.runNixOSTest = test: stub "vm-${system}" { testImports = map toString test.imports; };
    mkShell =
      attrs:
      stub "shell-${system}" {
        pythonPackages = lib.concatMap (p: p.pythonPackages or [ ]) attrs.packages;
        shellHook = attrs.shellHook or "";
      };
    nixfmt-tree = stub "nixfmt-tree" { };
    prometheus = stub "prometheus" { cli = stub "prometheus-cli" { }; };
    ruff = stub "ruff" { };
  };

  nixpkgs = {
    inherit lib;
    legacyPackages = lib.genAttrs [
      "x86_64-linux"
      "aarch64-linux"
      "x86_64-darwin"
      "aarch64-darwin"
    ] stubPkgs;
  };

  flake = import ../../flake.nix;
  self = flake.outputs { inherit self nixpkgs; };

  overlay =
    let
      prev.pythonPackagesExtensions = [ (pyFinal: pyPrev: { other = true; }) ];
      applied = self.overlays.default final prev;
      pythonPackages = lib.fix (
        lib.foldl' (base: extension: lib.extends extension base) (
          _: pythonPackagesFor "overlay"
        ) applied.pythonPackagesExtensions
      );
      final.python3Packages = pythonPackages;
    in
    {
      keepsOtherExtensions = pythonPackages.other or false;
      pythonAegis = pythonPackages.aegis.source;
      aegisIsApplication = applied.aegis.application or false;
    };

  moduleWithoutOverlay = import ./eval-module.nix {
    inherit nixpkgsLib;
    aegisModule = self.nixosModules.default;
    withOverlay = false;
  };
in
{
  inherit (flake) description;
  inputs = flake.inputs.nixpkgs.url;
  systems = lib.mapAttrs (_: lib.attrNames) {
    inherit (self)
      packages
      apps
      checks
      devShells
      formatter
      ;
  };
  packages = lib.mapAttrs (_: lib.mapAttrs (_: drv: drv.name)) self.packages;
  aegisIsApplication = lib.mapAttrs (_: packages: packages.aegis.application or false) self.packages;
  aegisSource = self.packages.x86_64-linux.aegis.source;
  apps = lib.mapAttrs (_: apps: apps.default) self.apps;
  checks = lib.mapAttrs (_: lib.mapAttrs (_: drv: drv.name)) self.checks;
  vmImports = self.checks.x86_64-linux.vm.testImports;
  formatter = lib.mapAttrs (_: drv: drv.name) self.formatter;
  nixosModules = lib.attrNames self.nixosModules;
  devShell = {
    inherit (self.devShells.x86_64-linux.default) pythonPackages shellHook;
  };
  inherit overlay;
  moduleExecStart = moduleWithoutOverlay.service.serviceConfig.ExecStart;
}
