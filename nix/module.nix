# NixOS module: services.llm-gateway. The unit's directives come from nix/unit.nix (the
# same description that renders dist/systemd/); this file maps options onto it and adds
# what only NixOS has (local PostgreSQL, firewall, Prometheus, journald namespace).
{ packages }:
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.llm-gateway;
  inherit (lib)
    literalExpression
    mkDefault
    mkEnableOption
    mkIf
    mkOption
    types
    ;

  toml = pkgs.formats.toml { };

  # "host:port", with brackets for an IPv6 host.
  hostPort =
    host: port:
    if lib.hasInfix ":" host then "[${host}]:${toString port}" else "${host}:${toString port}";
  listen = hostPort cfg.host cfg.port;

  localPostgres = cfg.database.type == "postgresql" && cfg.database.createLocally;

  # Anything under the store, not only a store path itself (lib.isStorePath).
  inStore = p: lib.hasPrefix "${builtins.storeDir}/" (toString p);

  # TOML has no null: unset optional keys are left out.
  settingsFile = toml.generate "llm-gateway.toml" (
    lib.filterAttrsRecursive (_: v: v != null) cfg.settings
  );
  # The program validates the generated file at build time (no secrets are read).
  # Cross builds cannot run the host's binary: they skip the check, as nixpkgs' postgresql
  # module does for its own.
  configFile = pkgs.runCommand "llm-gateway.toml" { } ''
    ${lib.optionalString (pkgs.stdenv.buildPlatform.canExecute pkgs.stdenv.hostPlatform) "${lib.getExe cfg.package} check-config --config ${settingsFile}"}
    cp ${settingsFile} $out
  '';
  # The service reads this path, so a settings change can be a reload (same ExecStart).
  configPath = "/etc/llm-gateway/llm-gateway.toml";

  # Keys the program only applies at start (src/runtime/reload.rs): changing one restarts the
  # service; any other change reloads it.
  startOnly = {
    server = lib.filterAttrs (
      k: _:
      builtins.elem k [
        "listen"
        "metrics_listen"
        "worker_threads"
        "header_read_timeout"
        "write_stall_timeout"
        "tcp_nodelay"
        "max_connections"
        "max_header_bytes"
        "listen_backlog"
      ]
    ) cfg.settings.server;
    storage = cfg.settings.storage or { };
    ledger = cfg.settings.ledger or { };
    inherit (cfg.settings.logging) format;
    output = cfg.settings.logging.output or "auto";
  };

  # The options whose secret file is in the store, by name.
  secretsInStore =
    lib.mapAttrsToList (name: _: "credentials.${name}") (lib.filterAttrs (_: inStore) cfg.credentials)
    ++ lib.optional (
      cfg.database.passwordFile != null && inStore cfg.database.passwordFile
    ) "database.passwordFile"
    ++ lib.optional (cfg.environmentFile != null && inStore cfg.environmentFile) "environmentFile";

  credentials =
    cfg.credentials
    // lib.optionalAttrs (cfg.database.passwordFile != null) {
      database-password = cfg.database.passwordFile;
    };

  alertThresholds = import ./alerts.nix { };

  units = import ./unit.nix {
    execStart = "${lib.getExe cfg.package} serve --config ${configPath}";
    kill = "${pkgs.coreutils}/bin/kill";
    inherit (cfg) user group dynamicUser;
    inherit (cfg.resources)
      memoryMax
      cpuQuota
      tasksMax
      limitNofile
      ;
    inherit (cfg) watchdogSec restartSec;
    after = lib.optional localPostgres "postgresql.target";
    requires = lib.optional localPostgres "postgresql.target";
    sockets =
      if cfg.socketActivation.enable then
        {
          api = [ listen ];
        }
        // lib.optionalAttrs (cfg.settings.server.metrics_listen != null) {
          metrics = [ cfg.settings.server.metrics_listen ];
        }
      else
        null;
    inherit credentials;
    inherit (cfg) environmentFile allowedClients;
    logRateLimitIntervalSec = cfg.journal.rateLimitInterval;
    logRateLimitBurst = cfg.journal.rateLimitBurst;
    logLevelMax = cfg.journal.maxLevel;
    logNamespace = if cfg.journal.namespace.enable then cfg.journal.namespace.name else null;
  };

  # A wildcard listener is scraped over loopback.
  localHost = if cfg.host == "0.0.0.0" || cfg.host == "::" then "127.0.0.1" else cfg.host;
  metricsTarget =
    if cfg.settings.server.metrics_listen != null then
      cfg.settings.server.metrics_listen
    else
      hostPort localHost cfg.port;
in
{
  options.services.llm-gateway = {
    enable = mkEnableOption "llm-gateway, an OpenAI-compatible gateway to self-hosted LLM servers";

    package = mkOption {
      type = types.package;
      default = packages.${pkgs.stdenv.hostPlatform.system}.default;
      defaultText = literalExpression "llm-gateway.packages.\${system}.default";
      description = "The llm-gateway package (this flake's own build unless overridden).";
    };

    host = mkOption {
      type = types.str;
      default = "127.0.0.1";
      example = "0.0.0.0";
      description = "Address the API listens on (`settings.server.listen` is built from it).";
    };

    port = mkOption {
      type = types.port;
      default = 8080;
      description = "Port of the API (and of `/metrics`, unless `settings.server.metrics_listen` is set).";
    };

    workers = mkOption {
      type = types.ints.between 0 1024;
      default = 0;
      example = 2;
      description = "Request worker threads (`server.worker_threads`), each serving whole connections on one thread; 0 means one per CPU.";
    };

    settings = mkOption {
      description = ''
        Configuration file contents (TOML), see `examples/llm-gateway.toml` for every key.
        Ends up in the world-readable Nix store: secrets go in `credentials`.
        The file is checked at build time with `llm-gateway check-config`.
      '';
      default = { };
      example = literalExpression ''
        {
          backends = [ { name = "vllm"; base_url = "http://10.0.0.5:8000/v1"; api_key.credential = "vllm-key"; } ];
          models = [ { name = "llama"; routes = [ { backend = "vllm"; } ]; } ];
        }
      '';
      type = types.submodule {
        freeformType = toml.type;
        options = {
          server = mkOption {
            default = { };
            description = "`[server]`";
            type = types.submodule {
              freeformType = toml.type;
              options = {
                listen = mkOption {
                  type = types.str;
                  default = listen;
                  defaultText = literalExpression ''"''${host}:''${toString port}"'';
                  description = "API listener address.";
                };
                metrics_listen = mkOption {
                  type = types.nullOr types.str;
                  default = null;
                  example = "127.0.0.1:9464";
                  description = "Separate listener for `/metrics`; null serves it on the API listener.";
                };
                worker_threads = mkOption {
                  type = types.ints.between 0 1024;
                  default = cfg.workers;
                  defaultText = literalExpression "config.services.llm-gateway.workers";
                  description = "Request worker threads; 0 means one per CPU.";
                };
              };
            };
          };
          logging = mkOption {
            default = { };
            description = "`[logging]`";
            type = types.submodule {
              freeformType = toml.type;
              options = {
                level = mkOption {
                  type = types.str;
                  default = "info";
                  example = "info,llm_gateway=debug";
                  description = "tracing filter directive; changed by a reload.";
                };
                format = mkOption {
                  type = types.enum [
                    "text"
                    "json"
                  ];
                  default = "text";
                  description = "Log line format when not writing to journald.";
                };
              };
            };
          };
          auth = mkOption {
            default = { };
            description = "`[auth]`";
            type = types.submodule {
              freeformType = toml.type;
              options.mode = mkOption {
                type = types.enum [
                  "keys"
                  "open"
                ];
                default = "keys";
                description = "`keys`: clients need an API key; `open`: no authentication (trusted networks only).";
              };
            };
          };
        };
      };
    };

    credentials = mkOption {
      type = types.attrsOf types.str;
      default = { };
      example = {
        vllm-key = "/run/secrets/vllm-key";
      };
      description = ''
        Secrets passed with `LoadCredential=`: name -> path on the host (never a store path).
        Refer to one in `settings` as `{ credential = "name"; }`, e.g. a backend's `api_key`.
      '';
    };

    environmentFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/run/secrets/llm-gateway.env";
      description = "`EnvironmentFile=` with `LLM_GATEWAY__SECTION__KEY=value` overrides.";
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open `port` in the firewall.";
    };

    allowedClients = mkOption {
      type = types.nullOr (types.listOf types.str);
      default = null;
      example = [ "192.168.132.0/24" ];
      description = ''
        Networks (CIDR) the service may exchange packets with besides localhost
        (`IPAddressDeny=any` and `IPAddressAllow=` on the service and its sockets); null
        allows any. The filter works both ways: list the backends' and a remote database's
        networks too. With it set, `systemd-analyze security` scores the unit 1.0.
      '';
    };

    user = mkOption {
      type = types.str;
      default = "llm-gateway";
      description = "User the service runs as; also its PostgreSQL role with a local database.";
    };

    group = mkOption {
      type = types.str;
      default = "llm-gateway";
      description = "Group the service runs as.";
    };

    dynamicUser = mkOption {
      type = types.bool;
      default = true;
      description = "Run as a transient user allocated by systemd (`DynamicUser=`); false creates a system user.";
    };

    watchdogSec = mkOption {
      type = types.str;
      default = "30s";
      description = "`WatchdogSec=`: the service pings at half this; a wedged service is restarted.";
    };

    restartSec = mkOption {
      type = types.str;
      default = "5s";
      description = "`RestartSec=` (with `Restart=always`).";
    };

    database = {
      type = mkOption {
        type = types.enum [
          "sqlite"
          "postgresql"
        ];
        default = "sqlite";
        description = "`sqlite`: a file in the state directory; `postgresql`: keys and usage in PostgreSQL.";
      };
      createLocally = mkOption {
        type = types.bool;
        default = true;
        description = ''
          With `type = "postgresql"`: enable PostgreSQL on this host with a database and a
          role named after `user`, reached over `/run/postgresql` with peer authentication.
        '';
      };
      url = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "postgres://llm-gateway@db.internal/llm-gateway";
        description = "A remote PostgreSQL URL (without a password: see `passwordFile`).";
      };
      passwordFile = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/run/secrets/llm-gateway-db";
        description = "File with the remote database's password, passed as a credential.";
      };
    };

    resources = {
      memoryMax = mkOption {
        type = types.nullOr types.str;
        default = "4G";
        description = "`MemoryMax=`; null for none.";
      };
      cpuQuota = mkOption {
        type = types.nullOr types.str;
        default = "200%";
        description = "`CPUQuota=`; null for none.";
      };
      tasksMax = mkOption {
        type = types.nullOr types.ints.positive;
        default = 4096;
        description = "`TasksMax=`.";
      };
      limitNofile = mkOption {
        type = types.ints.positive;
        default = 65536;
        description = "`LimitNOFILE=`: one descriptor per client and per backend connection.";
      };
    };

    journal = {
      rateLimitInterval = mkOption {
        type = types.str;
        default = "30s";
        description = "`LogRateLimitIntervalSec=` for this service.";
      };
      rateLimitBurst = mkOption {
        type = types.ints.unsigned;
        default = 10000;
        description = "`LogRateLimitBurst=`: messages per interval before journald drops some.";
      };
      maxLevel = mkOption {
        type = types.nullOr (
          types.enum [
            "emerg"
            "alert"
            "crit"
            "err"
            "warning"
            "notice"
            "info"
            "debug"
          ]
        );
        default = null;
        example = "info";
        description = "`LogLevelMax=`: journald discards messages above this level.";
      };
      namespace = {
        enable = mkEnableOption "a journal namespace of its own (`LogNamespace=`) with its own retention";
        name = mkOption {
          type = types.str;
          default = "llm-gateway";
          description = "Namespace name; read it with `journalctl --namespace=<name>`.";
        };
        maxUse = mkOption {
          type = types.str;
          default = "2G";
          description = "`SystemMaxUse=` of the namespace.";
        };
        maxFileSize = mkOption {
          type = types.str;
          default = "100M";
          description = "`SystemMaxFileSize=` of the namespace.";
        };
        maxRetention = mkOption {
          type = types.str;
          default = "30day";
          description = "`MaxRetentionSec=` of the namespace.";
        };
      };
    };

    prometheus.scrape = {
      enable = mkEnableOption ''
        a `llm-gateway` job in `services.prometheus.scrapeConfigs` when Prometheus runs on this
        host (for a remote Prometheus, see README)'';
      interval = mkOption {
        type = types.str;
        default = "15s";
        description = "Scrape interval.";
      };
    };

    prometheus.rules = {
      enable = mkEnableOption ''
        the shipped alert and recording rules (nix/alerts.nix, the same as
        dist/prometheus/llm-gateway.rules.yml; README, "Observability") in
        `services.prometheus.ruleFiles` when Prometheus runs on this host. This does not need
        the gateway itself on this host (`services.llm-gateway.enable`)'';
      job = mkOption {
        type = types.str;
        default = "llm-gateway";
        description = "The `job` label the gateways are scraped under (`prometheus.scrape` uses `llm-gateway`).";
      };
      thresholds = mkOption {
        type = types.submodule {
          options = lib.mapAttrs (
            name: default:
            mkOption {
              type = if builtins.isString default then types.str else types.number;
              inherit default;
              description = alertThresholds.descriptions.${name};
            }
          ) alertThresholds.defaults;
        };
        default = { };
        example = literalExpression "{ errorRatio = 0.02; ttftP95Seconds = 5; }";
        description = "Alert thresholds; the defaults are those of dist/prometheus/llm-gateway.rules.yml.";
      };
    };

    grafana.dashboard.enable = mkEnableOption ''
      the shipped Grafana dashboard (dist/grafana/llm-gateway.json) through
      `services.grafana.provision.dashboards` when Grafana runs on this host (its Prometheus
      data source is picked by the dashboard's `datasource` variable). This does not need the
      gateway itself on this host'';

    socketActivation.enable = mkEnableOption ''
      socket activation: systemd holds the listening sockets (`llm-gateway.socket`) and passes
      them to the service, so connections during a restart wait instead of being refused'';
  };

  config = lib.mkMerge [
    # On a Prometheus host, with or without a gateway on it.
    (mkIf (cfg.prometheus.rules.enable && config.services.prometheus.enable) {
      services.prometheus.ruleFiles = [
        (pkgs.writeText "llm-gateway.rules.yml"
          (import ./alerts.nix { inherit (cfg.prometheus.rules) job thresholds; }).text
        )
      ];
    })
    (mkIf (cfg.grafana.dashboard.enable && config.services.grafana.enable) {
      services.grafana.provision = {
        enable = mkDefault true;
        dashboards.settings.providers = [
          {
            name = "llm-gateway";
            disableDeletion = true;
            options.path = pkgs.linkFarm "llm-gateway-dashboards" [
              {
                name = "llm-gateway.json";
                path = ../dist/grafana/llm-gateway.json;
              }
            ];
          }
        ];
      };
    })
    (mkIf cfg.enable {
      assertions = [
        {
          assertion = secretsInStore == [ ];
          message = "services.llm-gateway: ${lib.concatStringsSep ", " secretsInStore} must not be in the Nix store: a secret there is world-readable.";
        }
        {
          assertion =
            cfg.database.type == "postgresql" -> (cfg.database.createLocally || cfg.database.url != null);
          message = "services.llm-gateway.database: type = \"postgresql\" needs createLocally = true or a url.";
        }
        {
          assertion = !(localPostgres && cfg.database.url != null);
          message = "services.llm-gateway.database: set either createLocally or url, not both.";
        }
      ];

      services.llm-gateway.settings.storage = lib.mkMerge [
        (mkIf localPostgres {
          database_url = mkDefault "postgres:///${cfg.user}?host=/run/postgresql&user=${cfg.user}";
        })
        # Not with createLocally too: two mkDefault values would conflict before the
        # assertion above could say what is wrong.
        (mkIf (cfg.database.type == "postgresql" && cfg.database.url != null && !localPostgres) {
          database_url = mkDefault cfg.database.url;
        })
        (mkIf (cfg.database.passwordFile != null) {
          database_password.credential = "database-password";
        })
      ];

      environment.etc."llm-gateway/llm-gateway.toml".source = configFile;

      systemd.services.llm-gateway = {
        description = units.unit.Description;
        after = units.unit.After;
        wants = units.unit.Wants;
        requires = units.unit.Requires or [ ];
        wantedBy = units.install.WantedBy;
        startLimitIntervalSec = units.unit.StartLimitIntervalSec;
        # Settings changes reload (the program swaps its configuration); start-only keys and
        # a new package restart.
        reloadTriggers = [ configFile ];
        restartTriggers = [ (builtins.toJSON startOnly) ];
        # Hardening directives are defaults: one can be overridden without restating the rest.
        serviceConfig = lib.mapAttrs (
          k: v: if units.hardening ? ${k} then mkDefault v else v
        ) units.service;
      };

      systemd.sockets = lib.mapAttrs' (
        name: s:
        lib.nameValuePair (lib.removeSuffix ".socket" name) {
          description = s.unit.Description;
          wantedBy = s.install.WantedBy;
          socketConfig = s.socket;
        }
      ) units.sockets;

      users.users = mkIf (!cfg.dynamicUser) {
        ${cfg.user} = {
          isSystemUser = true;
          inherit (cfg) group;
        };
      };
      users.groups = mkIf (!cfg.dynamicUser) { ${cfg.group} = { }; };

      services.postgresql = mkIf localPostgres {
        enable = true;
        ensureDatabases = [ cfg.user ];
        ensureUsers = [
          {
            name = cfg.user;
            ensureDBOwnership = true;
          }
        ];
      };

      networking.firewall.allowedTCPPorts = mkIf cfg.openFirewall [ cfg.port ];

      services.prometheus.scrapeConfigs =
        mkIf (cfg.prometheus.scrape.enable && config.services.prometheus.enable)
          [
            {
              job_name = "llm-gateway";
              scrape_interval = cfg.prometheus.scrape.interval;
              metrics_path = "/metrics";
              static_configs = [ { targets = [ metricsTarget ]; } ];
            }
          ];

      environment.etc."systemd/journald@${cfg.journal.namespace.name}.conf" =
        mkIf cfg.journal.namespace.enable
          {
            text = ''
              [Journal]
              SystemMaxUse=${cfg.journal.namespace.maxUse}
              SystemMaxFileSize=${cfg.journal.namespace.maxFileSize}
              MaxRetentionSec=${cfg.journal.namespace.maxRetention}
            '';
          };

      # Operator commands (keys, usage, instances) as the service's user, with its state
      # directory and credentials: `sudo llm-gateway-admin keys create --name alice`.
      environment.systemPackages = [
        (pkgs.writeShellScriptBin "llm-gateway-admin" ''
          exec ${config.systemd.package}/bin/systemd-run --quiet --wait --pipe --collect \
            --property=DynamicUser=${if cfg.dynamicUser then "yes" else "no"} \
            --property=User=${cfg.user} --property=Group=${cfg.group} \
            --property=StateDirectory=llm-gateway \
            ${
              lib.concatMapStrings (n: "--property=LoadCredential=${n}:${credentials.${n}} ") (
                lib.attrNames credentials
              )
            }${
              lib.optionalString (
                cfg.environmentFile != null
              ) "--property=EnvironmentFile=${toString cfg.environmentFile} "
            }--setenv=LLM_GATEWAY_CONFIG=${configPath} \
            ${lib.getExe cfg.package} "$@"
        '')
      ];
    })
  ];
}
