# NixOS VM test: the module with a local PostgreSQL and a mock upstream, scraped by
# Prometheus on a second node that loads the module's alert rules. The scenario itself is tests/vm/scenario.py, shared with
# the Debian QEMU harness.
{ pkgs, module }:
let
  gatewayNode =
    {
      config,
      lib,
      pkgs,
      ...
    }:
    {
      imports = [ module ];
      virtualisation.memorySize = 2048;
      services.llm-gateway = {
        enable = true;
        host = "0.0.0.0";
        openFirewall = true;
        watchdogSec = "5s";
        socketActivation.enable = true;
        database.type = "postgresql";
        settings = {
          backends = [
            {
              name = "mock";
              base_url = "http://127.0.0.1:9000/v1";
            }
          ];
          models = lib.mkDefault [
            {
              name = "m";
              routes = [ { backend = "mock"; } ];
            }
          ];
        };
      };
      systemd.services.mock-upstream = {
        wantedBy = [ "multi-user.target" ];
        before = [ "llm-gateway.service" ];
        serviceConfig = {
          DynamicUser = true;
          ExecStart = "${lib.getExe config.services.llm-gateway.package} mock-upstream --listen 127.0.0.1:9000 --chunks 40 --chunk-interval 100ms";
        };
      };
      environment.systemPackages = [
        pkgs.curl
        pkgs.jq
      ];
      # `nixos-rebuild switch` to a configuration with one more model: a reload.
      specialisation.reloaded.configuration = {
        services.llm-gateway.settings.models = [
          {
            name = "m";
            routes = [ { backend = "mock"; } ];
          }
          {
            name = "m2";
            routes = [ { backend = "mock"; } ];
          }
        ];
      };
    };
in
pkgs.testers.runNixOSTest {
  name = "llm-gateway";
  nodes = {
    gateway = gatewayNode;
    monitor = {
      # The module on a Prometheus host without a gateway: only its rules.
      imports = [ module ];
      services.llm-gateway.prometheus.rules.enable = true;
      services.prometheus = {
        enable = true;
        scrapeConfigs = [
          {
            job_name = "llm-gateway";
            scrape_interval = "2s";
            static_configs = [ { targets = [ "gateway:8080" ]; } ];
          }
        ];
      };
      environment.systemPackages = [
        pkgs.curl
        pkgs.jq
        # promtool is in the package's `cli` output.
        pkgs.prometheus.cli
      ];
    };
  };
  testScript = ''
    import importlib.util
    spec = importlib.util.spec_from_file_location("scenario", "${../../tests/vm/scenario.py}")
    assert spec is not None and spec.loader is not None
    scenario = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scenario)

    def switch_setting():
        gateway.succeed(
            "/run/current-system/specialisation/reloaded/bin/switch-to-configuration test"
        )

    start_all()
    scenario.run(gateway, subtest, switch_setting, prometheus=monitor)
  '';
}
