# The llm-gateway systemd units as data, and their text as unit files.
#
# Pure: it needs no nixpkgs. The NixOS module (nix/module.nix) builds its
# systemd.services / systemd.sockets entries from it, and nix/dist.nix renders the
# plain unit files in dist/systemd/ for other systemd distributions, so both ship the
# same ordering, restart policy, hardening, resource limits, notify and socket setup.
{
  # The service's command line.
  execStart,
  # kill(1), for ExecReload.
  kill ? "/bin/kill",
  # Fixed user name: PostgreSQL peer authentication maps it to the role of that name.
  user ? "llm-gateway",
  group ? "llm-gateway",
  # A transient user allocated by systemd (no account to manage).
  dynamicUser ? true,
  # Resource limits (systemd.resource-control(5)); null leaves one out.
  memoryMax ? "4G",
  cpuQuota ? "200%",
  tasksMax ? 4096,
  limitNofile ? 65536,
  # Restart policy.
  restart ? "always",
  restartSec ? "5s",
  # The service sends WATCHDOG=1 at half this interval; a wedged runtime is restarted.
  watchdogSec ? "30s",
  # Extra ordering and dependencies (e.g. the local PostgreSQL).
  after ? [ ],
  requires ? [ ],
  wants ? [ ],
  # Sockets systemd opens and passes (LISTEN_FDS); null: the service binds itself.
  # { api = [ "127.0.0.1:8080" ]; metrics = [ "127.0.0.1:9464" ]; } (metrics optional).
  sockets ? null,
  # LoadCredential= entries: credential name -> path on the host.
  credentials ? { },
  # EnvironmentFile= (e.g. a file with LLM_GATEWAY__... overrides), or null.
  environmentFile ? null,
  # Per-service journald limits (systemd.exec(5)).
  logRateLimitIntervalSec ? "30s",
  logRateLimitBurst ? 10000,
  logLevelMax ? null,
  # A journal namespace of its own (LogNamespace=), or null for the system journal.
  logNamespace ? null,
  # Networks (CIDR) the service may exchange packets with, besides localhost, or null for
  # any: IPAddressDeny=any plus IPAddressAllow=. The filter works both ways, so the
  # backends and a remote database must be in it too.
  allowedClients ? null,
}:
let
  inherit (builtins)
    attrNames
    concatStringsSep
    filter
    isBool
    isList
    length
    map
    ;

  # Drops keys whose value is null or an empty list.
  clean =
    attrs: removeAttrs attrs (filter (k: attrs.${k} == null || attrs.${k} == [ ]) (attrNames attrs));

  socketNames = if sockets == null then [ ] else attrNames sockets;
  socketUnit = name: if name == "api" then "llm-gateway.socket" else "llm-gateway-${name}.socket";

  # Each directive here is a default the NixOS module sets with mkDefault, so that one can
  # be overridden without restating the others. systemd-analyze security scores this set
  # (with the rest of the unit) at or under 1.5.
  hardening = {
    DynamicUser = dynamicUser;
    NoNewPrivileges = true;
    ProtectSystem = "strict";
    ProtectHome = true;
    PrivateTmp = true;
    PrivateDevices = true;
    PrivateMounts = true;
    PrivateUsers = true;
    DevicePolicy = "closed";
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    ProtectClock = true;
    ProtectHostname = true;
    ProtectProc = "invisible";
    ProcSubset = "pid";
    RestrictAddressFamilies = [
      "AF_UNIX"
      "AF_INET"
      "AF_INET6"
    ];
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    RemoveIPC = true;
    LockPersonality = true;
    # No JIT: the program never maps writable memory executable.
    MemoryDenyWriteExecute = true;
    SystemCallArchitectures = "native";
    SystemCallFilter = [
      "@system-service"
      "~@privileged"
      "~@resources"
    ];
    SystemCallErrorNumber = "EPERM";
    CapabilityBoundingSet = "";
    AmbientCapabilities = "";
    UMask = "0077";
  }
  // (
    if allowedClients == null then
      { }
    else
      {
        IPAddressDeny = "any";
        IPAddressAllow = [ "localhost" ] ++ allowedClients;
      }
  );

  unit = clean {
    Description = "llm-gateway: OpenAI-compatible gateway to self-hosted LLM servers";
    After = [ "network-online.target" ] ++ map socketUnit socketNames ++ after;
    Wants = [ "network-online.target" ] ++ wants;
    Requires = map socketUnit socketNames ++ requires;
    # Restart=always forever: no start-rate limit that would leave it down for good.
    StartLimitIntervalSec = 0;
  };

  service = clean (
    hardening
    // {
      Type = "notify";
      # The reload is framed by RELOADING=1 / READY=1 from the program.
      NotifyAccess = "main";
      ExecStart = execStart;
      ExecReload = "${kill} -HUP $MAINPID";
      Restart = restart;
      RestartSec = restartSec;
      WatchdogSec = watchdogSec;
      User = user;
      Group = group;
      StateDirectory = "llm-gateway";
      StateDirectoryMode = "0700";
      MemoryMax = memoryMax;
      CPUQuota = cpuQuota;
      TasksMax = tasksMax;
      LimitNOFILE = limitNofile;
      LoadCredential = map (name: "${name}:${credentials.${name}}") (attrNames credentials);
      EnvironmentFile = environmentFile;
      LogRateLimitIntervalSec = logRateLimitIntervalSec;
      LogRateLimitBurst = logRateLimitBurst;
      LogLevelMax = logLevelMax;
      LogNamespace = logNamespace;
      SyslogIdentifier = "llm-gateway";
    }
  );

  install = {
    WantedBy = [ "multi-user.target" ];
  };

  socket = name: {
    unit = {
      Description = "llm-gateway ${name} socket";
    };
    socket = clean {
      ListenStream = sockets.${name};
      FileDescriptorName = name;
      Service = "llm-gateway.service";
      Backlog = 4096;
      # The listening socket is systemd's: its own filter decides who may connect.
      IPAddressDeny = if allowedClients == null then null else "any";
      IPAddressAllow = if allowedClients == null then [ ] else [ "localhost" ] ++ allowedClients;
    };
    install = {
      WantedBy = [ "sockets.target" ];
    };
  };

  # systemd's INI: a list is one line per element, a bool is yes/no.
  value = v: if isBool v then (if v then "yes" else "no") else toString v;
  lines =
    attrs:
    concatStringsSep "" (
      map (
        k:
        let
          v = attrs.${k};
        in
        if isList v then concatStringsSep "" (map (e: "${k}=${value e}\n") v) else "${k}=${value v}\n"
      ) (attrNames attrs)
    );
  section = name: attrs: if length (attrNames attrs) == 0 then "" else "[${name}]\n${lines attrs}";
  render =
    sections: concatStringsSep "\n" (filter (s: s != "") (map (s: section s.name s.attrs) sections));
in
{
  inherit
    hardening
    unit
    service
    install
    ;
  sockets = builtins.listToAttrs (
    map (name: {
      name = socketUnit name;
      value = socket name;
    }) socketNames
  );

  # The unit files as text: file name -> content.
  files = {
    "llm-gateway.service" = render [
      {
        name = "Unit";
        attrs = unit;
      }
      {
        name = "Service";
        attrs = service;
      }
      {
        name = "Install";
        attrs = install;
      }
    ];
  }
  // builtins.listToAttrs (
    map (
      name:
      let
        s = socket name;
      in
      {
        name = socketUnit name;
        value = render [
          {
            name = "Unit";
            attrs = s.unit;
          }
          {
            name = "Socket";
            attrs = s.socket;
          }
          {
            name = "Install";
            attrs = s.install;
          }
        ];
      }
    ) socketNames
  );
}
