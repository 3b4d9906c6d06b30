# The flake runs this with pkgs.testers.runNixOSTest and passes itself to the
# nodes as aegisFlake (checks.<system>.vm).
{ lib, ... }:

let
  sockdir = "/srv/within/run";
  # In sockdir: served under its file name, with no configuration.
  localSocket = "${sockdir}/local.sock";
  # Started only by the test script, to show a socket that appears later.
  lateSocket = "${sockdir}/late.sock";
  # Outside sockdir, on a path of its own: served as an explicit target.
  elsewhereSocket = "/run/elsewhere/app.sock";
  elsewherePath = "/internal/metrics";
  # A unix: listen address, in the one directory Aegis may write to.
  listenSocket = "/run/aegis/aegis.sock";

  port = 31337;

  # A real exporter from nixpkgs: HAProxy's built-in Prometheus exporter on a
  # Unix socket in sockdir, served as /haproxy like any other socket there.
  haproxySocket = "${sockdir}/haproxy.sock";

  # A real service from nixpkgs that keeps its socket to itself: Grafana with
  # protocol "socket" listens on nixpkgs' default /run/grafana/grafana.sock,
  # in the unit's RuntimeDirectory, the socket 0660 grafana:grafana (the
  # module's socket_mode, and the group of its user). Aegis reaches it by
  # joining group grafana (targets.grafana.group), and serves its /metrics.
  grafanaSocket = "/run/grafana/grafana.sock";

  # TLS and basic auth, as in the nspawn test (tests/test_systemd.py). The
  # certificate is its own CA, for host "server" (Prometheus) and "localhost"
  # (the unix: listener); its key is a throwaway in the world-readable store.
  certsFor =
    pkgs:
    pkgs.runCommand "aegis-test-certs" { nativeBuildInputs = [ pkgs.openssl ]; } ''
      mkdir $out
      openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
        -subj /CN=server -addext subjectAltName=DNS:server,DNS:localhost \
        -keyout $out/server.key -out $out/server.crt
    '';
  caFile = "/etc/aegis/ca.crt";
  scrapeUser = "prometheus";
  scrapePassword = "scrape-secret";
  # bcrypt of scrapePassword (cost 10).
  scrapeHash = "$2b$10$l9VbctOmhte2OeRM2GWA4.F8/kbUEpiyzSTmfv1FtfkGJ6.udUSDK";
in
{
  name = "aegis";

  nodes = {
    server =
      { aegisFlake, pkgs, ... }:
      let
        certs = certsFor pkgs;
        webConfig = pkgs.writeText "aegis-web.yml" ''
          tls_server_config:
            cert_file: ${certs}/server.crt
            key_file: ${certs}/server.key
          basic_auth_users:
            ${scrapeUser}: '${scrapeHash}'
        '';
        fakeExporter =
          {
            socket,
            name,
            path ? "/metrics",
          }:
          {
            description = "Fake ${name} metrics on ${socket}";
            serviceConfig = {
              ExecStart = "${pkgs.python3.interpreter} ${./fake_exporter.py} ${socket} ${name} ${path}";
              User = "fake-exporter";
              Group = "within";
              # Group within must be able to connect.
              UMask = "0007";
            };
          };
      in
      {
        imports = [ aegisFlake.nixosModules.default ];

        environment.etc."aegis/ca.crt".source = "${certs}/server.crt";

        within.services.aegis = {
          enable = true;
          hostport = "0.0.0.0:${toString port}";
          openFirewall = true;
          targets.elsewhere = {
            socket = elsewhereSocket;
            path = elsewherePath;
          };
          targets.grafana = {
            socket = grafanaSocket;
            group = "grafana";
          };
          webConfigFile = "${webConfig}";
          extraFlags = [
            "--web.listen-address"
            "unix:${listenSocket}"
          ];
        };

        users.users.fake-exporter = {
          isSystemUser = true;
          group = "within";
        };

        # --- a service's own socket: Grafana ---
        services.grafana = {
          enable = true;
          settings = {
            server.protocol = "socket";
            # 26.05 has no default; a throwaway for a test VM.
            security.secret_key = "aegis-vm-test-not-a-secret";
            analytics.reporting_enabled = false;
          };
        };
        virtualisation.memorySize = 2048;
        # --- end of Grafana ---

        # --- a real exporter: HAProxy (the test script starts it) ---
        # nixpkgs' module runs HAProxy as haproxy:haproxy with ProtectSystem =
        # "strict". It joins the socket directory as the README says a service
        # does: in group within, allowed to write in sockdir, its socket 0660 (it
        # takes group within from the directory's setgid bit).
        services.haproxy = {
          enable = true;
          config = ''
            defaults
              mode http
              timeout connect 5s
              timeout client 30s
              timeout server 30s

            frontend metrics
              bind unix@${haproxySocket} mode 660
              http-request use-service prometheus-exporter if { path /metrics }
              http-request return status 404
          '';
        };
        users.users.haproxy.extraGroups = [ "within" ];
        systemd.services.haproxy = {
          serviceConfig.ReadWritePaths = [ sockdir ];
          # Not at boot: the subtests before it count the sockets without it.
          wantedBy = lib.mkForce [ ];
        };
        # --- end of HAProxy ---

        systemd.services = {
          fake-local = fakeExporter {
            socket = localSocket;
            name = "local";
          }
          // {
            wantedBy = [ "multi-user.target" ];
          };
          # Not started at boot: the test script starts and stops it.
          fake-late = fakeExporter {
            socket = lateSocket;
            name = "late";
          };
          fake-elsewhere = lib.mkMerge [
            (fakeExporter {
              socket = elsewhereSocket;
              name = "elsewhere";
              path = elsewherePath;
            })
            {
              wantedBy = [ "multi-user.target" ];
              # Group within may enter, as it must to reach the socket.
              serviceConfig.RuntimeDirectory = "elsewhere";
              serviceConfig.RuntimeDirectoryMode = "0750";
            }
          ];
        };
      };

    prometheus =
      { pkgs, ... }:
      let
        certs = certsFor pkgs;
        tlsAndAuth = {
          tls_config.ca_file = "${certs}/server.crt";
          basic_auth = {
            username = scrapeUser;
            password = scrapePassword;
          };
        };
      in
      {
        environment.systemPackages = [ pkgs.jq ];
        environment.etc."aegis/ca.crt".source = "${certs}/server.crt";

        services.prometheus = {
          enable = true;
          globalConfig.scrape_interval = "2s";
          scrapeConfigs = [
            (tlsAndAuth
            // {
              job_name = "aegis-static";
              scheme = "https";
              static_configs = [
                # Prometheus drops __metrics_path__ after relabelling, so
                # without a label of their own both groups would write the
                # same up{instance="server:31337"} series.
                {
                  targets = [ "server:${toString port}" ];
                  labels = {
                    __metrics_path__ = "/local";
                    socket = "local";
                  };
                }
                {
                  targets = [ "server:${toString port}" ];
                  labels = {
                    __metrics_path__ = "/elsewhere";
                    socket = "elsewhere";
                  };
                }
              ];
            })
            (tlsAndAuth
            // {
              job_name = "aegis-sd";
              scheme = "https";
              http_sd_configs = [
                (tlsAndAuth
                // {
                  url = "https://server:${toString port}/-/sd";
                  refresh_interval = "2s";
                })
              ];
              # The user that owns each socket, from /-/sd's metadata.
              relabel_configs = [
                {
                  source_labels = [ "__meta_aegis_socket_owner" ];
                  target_label = "owner";
                }
              ];
            })
          ];
        };
      };
  };

  testScript = ''
    import json

    url = "https://server:${toString port}"
    # Every listener serves TLS with basic auth: curl trusts the test's CA and logs in.
    curl = "curl --cacert ${caFile} -u ${scrapeUser}:${scrapePassword}"

    def status(path, login=True):
        client = curl if login else "curl --cacert ${caFile}"
        return prometheus.succeed(f"{client} -s -o /dev/null -w '%{{http_code}}' {url}{path}").strip()

    def prometheus_value(query):
        """The value of a one-sample PromQL query, or None."""
        out = prometheus.succeed(
            "curl -sSf --get http://127.0.0.1:9090/api/v1/query "
            + f"--data-urlencode 'query={query}'"
        )
        result = json.loads(out)["data"]["result"]
        return result[0]["value"][1] if result else None

    start_all()

    server.wait_for_unit("fake-local.service")
    server.wait_for_unit("fake-elsewhere.service")
    server.wait_for_unit("grafana.service")
    server.wait_for_open_unix_socket("${localSocket}")
    server.wait_for_open_unix_socket("${elsewhereSocket}")
    server.wait_for_open_unix_socket("${grafanaSocket}")
    server.wait_for_unit("aegis.service")
    server.wait_for_open_port(${toString port})
    prometheus.wait_for_unit("prometheus.service")
    prometheus.wait_for_open_port(9090)

    with subtest("aegis logs where it listens and what it serves"):
        # One line: "<every listen address> -> <sockdir>".
        server.succeed(
            "journalctl -o cat -u aegis.service | grep -F -- ' -> ${sockdir}' | grep -F '0.0.0.0:${toString port}'"
        )

    with subtest("a socket in the socket directory is served under its name"):
        prometheus.succeed(f"{curl} -sSf {url}/local | grep -F 'aegis_fake_up{{source=\"local\"}} 1'")

    with subtest("an explicit target outside the socket directory is served under its name"):
        prometheus.succeed(f"{curl} -sSf {url}/elsewhere | grep -F 'aegis_fake_up{{source=\"elsewhere\"}} 1'")

    with subtest("an unknown name is a 404"):
        assert status("/nope") == "404", "an unknown name must be a 404"

    with subtest("a scrape without credentials is a 401"):
        assert status("/local", login=False) == "401", "a scrape without credentials must be a 401"

    with subtest("a socket that appears later is served, and is a 404 again once it is gone"):
        assert status("/late") == "404"
        server.systemctl("start fake-late.service")
        server.wait_for_open_unix_socket("${lateSocket}")
        prometheus.wait_until_succeeds(f"{curl} -sSf {url}/late | grep -F 'source=\"late\"'")
        server.systemctl("stop fake-late.service")
        server.wait_until_fails("test -e ${lateSocket}")
        prometheus.wait_until_succeeds(f"test \"$({curl} -s -o /dev/null -w '%{{http_code}}' {url}/late)\" = 404")
        server.systemctl("start fake-late.service")
        server.wait_for_open_unix_socket("${lateSocket}")

    with subtest("aegis answers its own health, readiness and metrics endpoints"):
        prometheus.succeed(f"{curl} -sSf {url}/-/healthy")
        prometheus.succeed(f"{curl} -sSf {url}/-/ready")
        prometheus.succeed(f"{curl} -sSf {url}/-/metrics | grep '^aegis_'")

    with subtest("aegis also listens on its unix: listen address"):
        server.succeed(f"{curl} -sSf --unix-socket ${listenSocket} https://localhost/-/healthy")
        server.succeed(f"{curl} -sSf --unix-socket ${listenSocket} https://localhost/local | grep -F 'source=\"local\"'")

    with subtest("service discovery lists every socket with its metrics path"):
        paths = prometheus.succeed(
            f"{curl} -sSf {url}/-/sd | jq -r '.[].labels.__metrics_path__' | sort"
        ).split()
        assert paths == ["/elsewhere", "/grafana", "/late", "/local"], f"unexpected /-/sd paths: {paths}"
        owners = json.loads(
            prometheus.succeed(
                f"{curl} -sSf {url}/-/sd | jq -c 'map({{(.labels.target): .labels.__meta_aegis_socket_owner}}) | add'"
            )
        )
        assert owners == {"elsewhere": "fake-exporter", "grafana": "grafana", "late": "fake-exporter", "local": "fake-exporter"}, owners

    with subtest("prometheus sees every socket up, configured statically and through /-/sd"):
        prometheus.wait_until_succeeds(
            "curl -sSf --get http://127.0.0.1:9090/api/v1/query "
            + "--data-urlencode 'query=count(up{job=\"aegis-static\"} == 1)' "
            + "| jq -e '.data.result[0].value[1] == \"2\"'"
        )
        prometheus.wait_until_succeeds(
            "curl -sSf --get http://127.0.0.1:9090/api/v1/query "
            + "--data-urlencode 'query=count(up{job=\"aegis-sd\"} == 1)' "
            + "| jq -e '.data.result[0].value[1] == \"4\"'"
        )
        for source in ["local", "elsewhere", "late"]:
            value = prometheus_value(f'max(aegis_fake_up{{source="{source}"}})')
            assert value == "1", f"prometheus has no samples from {source}: {value}"

    with subtest("grafana's own socket is reached through its group, which only aegis's unit joins"):
        modes = server.succeed("stat -c '%U:%G %a' /run/grafana ${grafanaSocket}").split()
        assert modes == ["grafana:grafana", "755", "grafana:grafana", "660"], f"unexpected modes: {modes}"
        server.fail("runuser -u aegis -- curl -sSf --unix-socket ${grafanaSocket} http://localhost/metrics")
        main = server.succeed("systemctl show -P MainPID aegis.service").strip()
        gid = server.succeed("getent group grafana").split(":")[2]
        groups = [line for line in server.succeed(f"cat /proc/{main}/status").splitlines() if line.startswith("Groups:")]
        assert gid in groups[0].split()[1:], groups
        prometheus.succeed(f"{curl} -sSf {url}/grafana | grep -q '^grafana_build_info'")
        prometheus.wait_until_succeeds(
            "curl -sSf --get http://127.0.0.1:9090/api/v1/query "
            + "--data-urlencode 'query=up{job=\"aegis-sd\",target=\"grafana\",owner=\"grafana\"} == 1' "
            + "| jq -e '.data.result | length == 1'"
        )

    with subtest("aegis check, run as aegis's unit runs, finds every target fine"):
        # The unit's own command line, as systemd runs it, and its user and groups.
        shown = server.succeed("systemctl show -P ExecStart aegis.service")
        argv = shown.split("argv[]=", 1)[1].split(" ;", 1)[0].split()
        check = " ".join([argv[0], "check", *argv[1:], "--output", "json"])
        report = json.loads(server.succeed(f"runuser -u aegis -g within -G grafana -- {check}"))
        results = {target["name"]: target["result"] for target in report["targets"]}
        assert report["ok"] and results == {"elsewhere": "ok", "grafana": "ok", "late": "ok", "local": "ok"}, report
        # With aegis's own groups only (what sudo -u aegis gives), grafana is out of reach.
        status, out = server.execute(f"runuser -u aegis -- {check}")
        results = {target["name"]: target["result"] for target in json.loads(out)["targets"]}
        assert status == 1 and results["grafana"] == "permission", out

    with subtest("users outside group within cannot reach the sockets"):
        server.fail("runuser -u nobody -- ls ${sockdir}")
        server.fail("runuser -u nobody -- curl -sSf --unix-socket ${localSocket} http://localhost/metrics")
        server.fail(f"runuser -u nobody -- {curl} -sSf --unix-socket ${listenSocket} https://localhost/-/healthy")

    with subtest("the unix: listener is 0660 aegis:within in a 0750 directory, open to group within"):
        modes = server.succeed("stat -c '%U:%G %a' /run/aegis ${listenSocket}").split()
        assert modes == ["aegis:within", "750", "aegis:within", "660"], f"unexpected modes: {modes}"
        server.succeed(f"runuser -u fake-exporter -- {curl} -sSf --unix-socket ${listenSocket} https://localhost/-/healthy")

    with subtest("aegis runs as aegis, one process on uvloop"):
        main = server.succeed("systemctl show -P MainPID aegis.service").strip()
        assert server.succeed(f"stat -c %U:%G /proc/{main}").strip() == "aegis:within"
        server.fail(f"ps -o pid= --ppid {main}")
        server.succeed(f"grep -qF /uvloop/loop. /proc/{main}/maps")

    with subtest("a killed aegis is restarted after RestartSec"):
        main = server.succeed("systemctl show -P MainPID aegis.service").strip()
        server.succeed(f"kill -9 {main}")
        # Waiting out RestartSec (30 s) before it starts again. Seconds as ints: 26.05's driver
        # types timeout as int (mypy checks this script); timedelta came later, ints still taken.
        server.wait_until_succeeds("test \"$(systemctl show -P SubState aegis.service)\" = auto-restart", timeout=20)
        server.wait_until_succeeds("test \"$(systemctl show -P NRestarts aegis.service)\" = 1", timeout=90)
        server.wait_for_unit("aegis.service")
        assert server.succeed("systemctl show -P MainPID aegis.service").strip() != main
        prometheus.wait_until_succeeds(f"{curl} -sSf {url}/local | grep -F 'source=\"local\"'")

    with subtest("stopping aegis leaves it inactive, not failed"):
        server.systemctl("stop aegis.service")
        server.succeed("test \"$(systemctl show -P ActiveState aegis.service)\" = inactive")
        server.succeed("test \"$(systemctl show -P Result aegis.service)\" = success")
        prometheus.fail(f"{curl} -sS {url}/-/healthy")
        server.systemctl("start aegis.service")
        server.wait_for_open_port(${toString port})

    server.log(server.succeed("systemd-analyze security aegis.service | grep -v '✓'"))

    # --- a real exporter: HAProxy ---
    with subtest("HAProxy's own exporter on a socket in sockdir is discovered and scraped"):
        server.systemctl("start haproxy.service")
        server.wait_for_unit("haproxy.service")
        server.wait_for_open_unix_socket("${haproxySocket}")
        modes = server.succeed("stat -c '%U:%G %a' ${haproxySocket}").split()
        assert modes == ["haproxy:within", "660"], f"unexpected owner and mode: {modes}"
        page = server.succeed("curl -sSf --unix-socket ${haproxySocket} http://localhost/metrics")
        samples = [line for line in page.splitlines() if line and not line.startswith("#")]
        names = {line.split("{")[0].split(" ")[0] for line in samples}
        assert "haproxy_process_nbthread" in names, page[:500]
        prometheus.wait_until_succeeds(
            "curl -sSf --get http://127.0.0.1:9090/api/v1/query "
            + "--data-urlencode 'query=up{job=\"aegis-sd\",target=\"haproxy\"} == 1' "
            + "| jq -e '.data.result | length == 1'"
        )
        # Every series of HAProxy's page, through Aegis, and nothing else but Prometheus' own.
        stored = json.loads(
            prometheus.succeed(
                "curl -sSf --get http://127.0.0.1:9090/api/v1/query "
                + "--data-urlencode 'query=count by (__name__) ({job=\"aegis-sd\",target=\"haproxy\"})'"
            )
        )["data"]["result"]
        own = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_samples_post_metric_relabeling", "scrape_series_added"}
        got = {r["metric"]["__name__"] for r in stored} - own
        assert got == names, f"only on the page: {names - got}; only in prometheus: {got - names}"
        scraped = prometheus_value('max(scrape_samples_scraped{job="aegis-sd",target="haproxy"})')
        assert scraped == str(len(samples)), f"{scraped} samples scraped, {len(samples)} on the page"
    # --- end of HAProxy ---
  '';
}
