{
  config,
  lib,
  pkgs,
  utils,
  ...
}:

let
  cfg = config.within.services.aegis;

  # The port of a hostport of the form "host:port" or "[ipv6]:port", with a
  # host and a decimal port; null for anything else, which an assertion
  # below refuses.
  hostportPort =
    let
      parts = builtins.match ''([A-Za-z0-9._-]+|\[[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*(%[A-Za-z0-9._-]+)?]):([1-9][0-9]{0,4})'' cfg.hostport;
      port = lib.toInt (lib.last parts);
    in
    if parts != null && port <= 65535 then port else null;

  bindsPrivilegedPort = hostportPort != null && hostportPort < 1024;

  targetSockets = lib.mapAttrsToList (_: target: target.socket) cfg.targets;

  # The groups Aegis joins to reach the targets' sockets, each once.
  targetGroups = lib.unique (
    lib.filter (group: group != null) (lib.mapAttrsToList (_: target: target.group) cfg.targets)
  );

  # Aegis reaches every socket it serves; the sandbox below must not hide any
  # of them.
  socketPaths = [ "${cfg.sockdir}/" ] ++ targetSockets;
  under = dirs: path: lib.any (dir: lib.hasPrefix dir path) dirs;
  anyUnder = dirs: lib.any (under dirs) socketPaths;

  # The directories the sandbox below hides or replaces.
  tmpDirs = [
    "/tmp/"
    "/var/tmp/"
  ];
  homeDirs = [
    "/home/"
    "/root/"
    "/run/user/"
  ];

  # What the unit's final settings hide, as systemd reads them: the module's
  # own, which a socket under /tmp or /home relaxes, or a user's override.
  # A path literal is copied into the Nix store, which the sandbox leaves
  # visible; only a string names a file where it is.
  unitConfig = config.systemd.services.aegis.serviceConfig;
  hidesTmp = lib.elem (unitConfig.PrivateTmp or false) [
    true
    "yes"
    "disconnected"
  ];
  hidesHome = lib.elem (unitConfig.ProtectHome or false) [
    true
    "yes"
    "tmpfs"
  ];
  webConfigHidden =
    builtins.isString cfg.webConfigFile
    && (hidesTmp && under tmpDirs cfg.webConfigFile || hidesHome && under homeDirs cfg.webConfigFile);

  targetFlag =
    name: target:
    "${name}=${target.socket}" + lib.optionalString (target.path != "/metrics") ",path=${target.path}";
in
{
  options.within.services.aegis = {
    enable = lib.mkEnableOption "Aegis, which serves the Prometheus metrics of services listening on Unix sockets over one TCP port";

    package = lib.mkPackageOption pkgs "aegis" { };

    hostport = lib.mkOption {
      type = lib.types.str;
      default = "[::1]:31337";
      example = "[::]:31337";
      description = ''
        TCP address to listen on, as `host:port` or `[ipv6]:port`.
        `GET /<name>` on it is answered from `<sockdir>/<name>.sock`.
      '';
    };

    sockdir = lib.mkOption {
      type = lib.types.pathWith {
        absolute = true;
        inStore = false;
      };
      default = "/srv/within/run";
      description = ''
        Directory of the Unix sockets to serve: a service that listens on
        `<sockdir>/<name>.sock` is scraped as `/<name>`.

        It is created with mode `3770`, owned by root and group `within`:
        a service joins that group to place its socket here, and must make
        the socket group-writable (a `UMask` of `0007`) so that Aegis can
        connect to it. The sticky bit keeps services in the group from
        removing each other's sockets.
      '';
    };

    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = ''
        Whether to open the port of {option}`within.services.aegis.hostport`
        in the firewall.
      '';
    };

    targets = lib.mkOption {
      type = lib.types.attrsOf (
        lib.types.submodule {
          options = {
            socket = lib.mkOption {
              type = lib.types.pathWith {
                absolute = true;
                inStore = false;
              };
              example = "/run/postgresql-exporter/metrics.sock";
              description = ''
                Unix socket of the service. User `aegis` or group `within`
                needs write access to it, and search access to the
                directories above it.
              '';
            };
            path = lib.mkOption {
              type = lib.types.strMatching "/.*";
              default = "/metrics";
              description = "HTTP path of the metrics on that socket.";
            };
            group = lib.mkOption {
              type = lib.types.nullOr (lib.types.strMatching "[A-Za-z0-9_][A-Za-z0-9_.-]*[$]?");
              default = null;
              example = "grafana";
              description = ''
                A group that gives access to the socket, for a service that
                keeps its socket in a directory of its own with a group of its
                own: Aegis's unit joins it (`SupplementaryGroups`), and
                nothing else does. The group must exist, as the group of
                the service's own module does.
              '';
            };
          };
        }
      );
      default = { };
      example = lib.literalExpression ''
        {
          postgres.socket = "/run/postgresql-exporter/metrics.sock";
          app = {
            socket = "/run/app/app.sock";
            path = "/debug/metrics";
          };
          grafana = {
            socket = "/run/grafana/grafana.sock";
            group = "grafana";
          };
        }
      '';
      description = ''
        Services to serve that listen outside
        {option}`within.services.aegis.sockdir`, by name: `GET /<name>` is
        answered from `path` on `socket`.
      '';
    };

    webConfigFile = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = null;
      example = "/run/secrets/aegis-web-config.yml";
      description = ''
        Path to a Prometheus exporter-toolkit web configuration file, for TLS
        and basic authentication. It is read by user `aegis` at start. A
        path literal is copied into the world-readable Nix store; give a
        string for a file that holds private keys.

        The service has a private {file}`/tmp` and {file}`/var/tmp` and no
        {file}`/home`, {file}`/root` or {file}`/run/user`, unless a socket it
        serves is there (then it sees them, read-only), so a string the unit
        hides is refused; the certificate and key files the configuration
        names must be visible too, such as under {file}`/run/secrets` or
        {file}`/etc`.
      '';
    };

    extraFlags = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [
        "--scrape.timeout"
        "5s"
        "--log.level"
        "debug"
      ];
      description = ''
        Extra command-line arguments for `aegis`, one list element each.
        A `unix:` listen address can be placed in {file}`/run/aegis`, the one
        directory the service may write to, as in
        `[ "--web.listen-address" "unix:/run/aegis/aegis.sock" ]`. Aegis
        creates that socket with mode `0660`, owned by `aegis:within`, and the
        directory is `0750 aegis:within`: root and members of group `within`
        can connect to it, nobody else can.
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = hostportPort != null;
        message = ''
          within.services.aegis.hostport is "${cfg.hostport}", which Aegis cannot listen on.
          It must be host:port or [ipv6]:port with a port from 1 to 65535,
          such as "127.0.0.1:31337", "[::1]:31337" or "[::]:31337".
        '';
      }
      {
        assertion = !webConfigHidden;
        message = ''
          within.services.aegis.webConfigFile is "${toString cfg.webConfigFile}",
          which the service cannot read: its unit has ${
            if hidesTmp && under tmpDirs cfg.webConfigFile then
              "PrivateTmp (a /tmp and /var/tmp of its own)"
            else
              "ProtectHome (no /home, /root and /run/user)"
          }.
          Put the file, and the certificate and key files it names, elsewhere, such as under /run/secrets or /etc.
        '';
      }
    ];

    users.users.aegis = {
      description = "Aegis metrics bridge";
      isSystemUser = true;
      group = "within";
      home = "/srv/within/aegis";
      createHome = true;
    };
    users.groups.within = { };

    systemd.tmpfiles.settings."10-aegis".${cfg.sockdir}.d = {
      user = "root";
      group = "within";
      mode = "3770";
    };

    networking.firewall.allowedTCPPorts = lib.mkIf (cfg.openFirewall && hostportPort != null) [
      hostportPort
    ];

    systemd.services.aegis = {
      description = "Aegis metrics bridge";
      wantedBy = [ "multi-user.target" ];
      after = [ "network.target" ];

      serviceConfig = {
        ExecStart = utils.escapeSystemdExecArgs (
          [
            (lib.getExe cfg.package)
            "-hostport"
            cfg.hostport
            "-sockdir"
            cfg.sockdir
          ]
          ++ lib.optionals (cfg.webConfigFile != null) [
            "--web.config.file"
            cfg.webConfigFile
          ]
          ++ lib.concatLists (
            lib.mapAttrsToList (name: target: [
              "--target"
              (targetFlag name target)
            ]) cfg.targets
          )
          ++ cfg.extraFlags
        );
        User = "aegis";
        Group = "within";
        # The groups of targets' sockets, for this unit only.
        SupplementaryGroups = lib.mkIf (targetGroups != [ ]) targetGroups;
        Restart = "on-failure";
        RestartSec = "30s";
        WorkingDirectory = "/srv/within/aegis";
        # The one writable place, for a unix: listen address. Aegis makes
        # such a socket 0660 aegis:within, so group within may enter too.
        RuntimeDirectory = "aegis";
        RuntimeDirectoryMode = "0750";
        # Each scrape holds a client and an upstream connection; systemd's
        # default soft limit of 1024 descriptors would cap Aegis near 500
        # scrapes in flight.
        LimitNOFILE = 65536;

        # Hardening
        AmbientCapabilities = lib.mkIf bindsPrivilegedPort [ "CAP_NET_BIND_SERVICE" ];
        CapabilityBoundingSet = if bindsPrivilegedPort then [ "CAP_NET_BIND_SERVICE" ] else [ "" ];
        DeviceAllow = [ "" ];
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        NoNewPrivileges = true;
        PrivateDevices = true;
        # A socket under /tmp or /var/tmp would be hidden by a private /tmp.
        PrivateTmp = !(anyUnder tmpDirs);
        ProtectClock = true;
        ProtectControlGroups = true;
        # Connecting to a socket works on a read-only mount, but not on a
        # hidden one.
        ProtectHome = if anyUnder homeDirs then "read-only" else true;
        ProtectHostname = true;
        ProtectKernelLogs = true;
        ProtectKernelModules = true;
        ProtectKernelTunables = true;
        ProtectProc = "invisible";
        ProtectSystem = "strict";
        RemoveIPC = true;
        RestrictAddressFamilies = [
          # AF_UNIX to connect to the services' sockets, which is all Aegis
          # is for, and for a unix: listen address.
          "AF_UNIX"
          "AF_INET"
          "AF_INET6"
        ];
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        SystemCallArchitectures = "native";
        SystemCallFilter = [
          "@system-service"
          "~@privileged"
        ];
        UMask = "0077";
      };
    };
  };
}
