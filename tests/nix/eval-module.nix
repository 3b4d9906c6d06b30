# Evaluates modules/aegis.nix with nixpkgs' real lib, outside NixOS: the
# NixOS options the module sets are declared here as stubs with the same names
# and similar types, so that a misspelt or mistyped setting fails here too.
# Used by tests/test_nix.py; nothing here is part of Aegis.
{
  # Directory holding nixpkgs' lib/default.nix.
  nixpkgsLib,
  # JSON object of within.services.aegis settings besides enable.
  settings ? "{}",
  # Prefix whose bin/aegis the stub package's lib.getExe points at.
  aegisPrefix ? "/aegis-stub",
  # The module under test: the file, or the flake's wrapper around it.
  aegisModule ? ../../modules/aegis.nix,
  # Whether pkgs has aegis, as with the flake's overlay.
  withOverlay ? true,
}:

let
  lib = import nixpkgsLib;
  inherit (lib) mkOption types;

  # The quoting of nixpkgs' utils.escapeSystemdExecArgs: each argument
  # becomes a JSON string, which systemd reads as a double-quoted word, with
  # % and $ doubled so that systemd expands neither specifiers nor variables.
  escapeSystemdExecArg =
    arg:
    let
      word =
        if builtins.isString arg || builtins.isPath arg || lib.isDerivation arg then
          "${arg}"
        else if builtins.isInt arg || builtins.isFloat arg then
          toString arg
        else
          throw "escapeSystemdExecArg: cannot quote a ${builtins.typeOf arg}";
    in
    builtins.replaceStrings [ "%" "$" ] [ "%%" "$$" ] (builtins.toJSON word);

  stubPackage = {
    type = "derivation";
    name = "aegis-stub";
    outPath = aegisPrefix;
    meta.mainProgram = "aegis";
  };

  unitValue = types.oneOf [
    types.bool
    types.int
    types.str
  ];

  nixosStubs = {
    options = {
      assertions = mkOption {
        type = types.listOf (
          types.submodule {
            options.assertion = mkOption { type = types.bool; };
            options.message = mkOption { type = types.str; };
          }
        );
        default = [ ];
      };

      users.users = mkOption {
        type = types.attrsOf (
          types.submodule {
            options = {
              description = mkOption { type = types.str; };
              isSystemUser = mkOption { type = types.bool; };
              group = mkOption { type = types.str; };
              home = mkOption { type = types.str; };
              createHome = mkOption { type = types.bool; };
            };
          }
        );
        default = { };
      };

      users.groups = mkOption {
        type = types.attrsOf (types.submodule { });
        default = { };
      };

      systemd.tmpfiles.settings = mkOption {
        type = types.attrsOf (
          types.attrsOf (
            types.attrsOf (
              types.submodule {
                options = {
                  user = mkOption { type = types.str; };
                  group = mkOption { type = types.str; };
                  mode = mkOption { type = types.str; };
                };
              }
            )
          )
        );
        default = { };
      };

      networking.firewall.allowedTCPPorts = mkOption {
        type = types.listOf types.port;
        default = [ ];
      };

      systemd.services = mkOption {
        type = types.attrsOf (
          types.submodule {
            options = {
              description = mkOption { type = types.str; };
              wantedBy = mkOption { type = types.listOf types.str; };
              after = mkOption { type = types.listOf types.str; };
              serviceConfig = mkOption {
                type = types.attrsOf (types.either unitValue (types.listOf unitValue));
              };
            };
          }
        );
        default = { };
      };
    };
  };

  evaluated = lib.evalModules {
    modules = [
      nixosStubs
      aegisModule
      {
        _module.args = {
          pkgs = {
            stdenv.hostPlatform.system = "x86_64-linux";
          }
          // lib.optionalAttrs withOverlay { aegis = stubPackage; };
          utils.escapeSystemdExecArgs = args: lib.concatMapStringsSep " " escapeSystemdExecArg args;
        };
        within.services.aegis = {
          enable = true;
        }
        // builtins.fromJSON settings;
      }
    ];
  };
  inherit (evaluated) config;
in
{
  service = config.systemd.services.aegis;
  inherit (config.users) users;
  groups = builtins.attrNames config.users.groups;
  tmpfiles = config.systemd.tmpfiles.settings;
  inherit (config.networking.firewall) allowedTCPPorts;
  failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
}
