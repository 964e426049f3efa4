//! Throwaway PostgreSQL servers for tests: an owned [`PgCluster`] (for tests that stop and
//! start the server) and [`fresh_database`] (an empty database in a cluster shared by the
//! whole test binary, or on the server named by `LLM_GATEWAY_TEST_DATABASE_URL`).
//!
//! A cluster is `initdb` in a fresh temporary directory, listening on a unix socket in that
//! directory only (no TCP port), with `fsync=off`. Under root, `initdb`/`pg_ctl` run as the
//! `postgres` user (they refuse to run as root).
//!
//! Cleanup does not rely on `Drop` alone (the shared cluster lives in a static, which is never
//! dropped): every cluster has a supervising `sh` whose stdin is a pipe whose write end only
//! this process holds. When the process exits or dies (panic, abort, SIGKILL) the kernel closes
//! that pipe, the shell's `read` sees end-of-file, and the shell stops the server
//! (`pg_ctl stop -m immediate`) and removes the directory. `PgCluster::drop` closes the pipe
//! and waits for the shell to finish.
//!
//! URLs have the form `postgres:///DBNAME?host=/socket/dir&user=postgres`: sqlx 0.8 parses
//! URLs with the `url` crate, which rejects `postgres://postgres@/DBNAME?host=...` ("empty
//! host").

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::Connection as _;
use sqlx::postgres::PgConnection;

/// Overrides the directory holding `initdb`, `pg_ctl` and `postgres`.
pub const BINDIR_ENV: &str = "LLM_GATEWAY_TEST_PG_BINDIR";
/// A postgres URL to a server where tests may `CREATE DATABASE`; when set,
/// [`fresh_database`] uses it and starts no cluster.
pub const DATABASE_URL_ENV: &str = "LLM_GATEWAY_TEST_DATABASE_URL";

/// Port in the socket file name (`.s.PGSQL.5432`); nothing listens on TCP.
const PORT: u16 = 5432;
/// Longest socket directory that keeps `<dir>/.s.PGSQL.5432.lock` within `sun_path` (108).
const MAX_SOCKET_DIR_LEN: usize = 80;

/// Stops the server and removes the cluster directory once stdin reaches end-of-file.
/// Arguments: data dir, cluster dir, pg_ctl, "1" to run pg_ctl as the postgres user.
const SUPERVISOR: &str = r#"
trap '' HUP INT QUIT TERM PIPE
while read -r _line; do :; done
if [ "$4" = 1 ]; then
  runuser -u postgres -- "$3" -D "$1" -m immediate -w -t 30 stop >/dev/null 2>&1
else
  "$3" -D "$1" -m immediate -w -t 30 stop >/dev/null 2>&1
fi
if [ -f "$1/postmaster.pid" ]; then
  pid=$(head -n 1 "$1/postmaster.pid")
  if [ -n "$pid" ] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$1"; then
    kill -KILL "$pid" 2>/dev/null
  fi
fi
rm -rf -- "$2"
"#;

/// An owned cluster: initdb in a fresh temp dir, started; stopped and deleted on Drop.
/// For fault tests that stop/start the server.
#[derive(Debug)]
pub struct PgCluster {
    /// Holds the socket, `data/` and `postgres.log`; removed on cleanup.
    dir: PathBuf,
    data: PathBuf,
    log: PathBuf,
    bindir: PathBuf,
    as_postgres_user: bool,
    /// Cleans up when its stdin closes (see the module docs).
    supervisor: Child,
}

impl PgCluster {
    /// Runs initdb in a fresh temp dir and starts the server; panics with the failing
    /// command's output on error.
    pub fn start() -> PgCluster {
        Self::try_start().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`PgCluster::start`], returning the error text instead of panicking.
    pub fn try_start() -> Result<PgCluster, String> {
        let bindir = bindir()?;
        let as_postgres_user = running_as_root()?;
        let owner = if as_postgres_user {
            Some(postgres_user()?)
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("llmgw-pg-")
            .tempdir_in(temp_base())
            .map_err(|e| format!("creating the cluster directory: {e}"))?
            .keep();
        // From here on the supervisor owns the directory's removal, also if we fail below.
        let supervisor = spawn_supervisor(&dir, &bindir, as_postgres_user);
        let supervisor = match supervisor {
            Ok(s) => s,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let cluster = PgCluster {
            data: dir.join("data"),
            log: dir.join("postgres.log"),
            dir,
            bindir,
            as_postgres_user,
            supervisor,
        };
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&cluster.dir, Some(uid), Some(gid))
                .map_err(|e| format!("chown {} to postgres: {e}", cluster.dir.display()))?;
        }
        cluster.initdb()?;
        cluster.try_pg_ctl_start()?;
        Ok(cluster)
    }

    /// Connection URL for database `db`.
    pub fn url(&self, db: &str) -> String {
        socket_url(&self.dir, db)
    }

    /// `CREATE DATABASE db`; returns `url(db)`.
    pub fn create_database(&self, db: &str) -> String {
        let mut sql = format!("CREATE DATABASE {}", quote_ident(db));
        if self.major_version() >= 15 {
            // Copying the template's files is ~100 ms against ~160 ms for the WAL_LOG default.
            sql.push_str(" STRATEGY = FILE_COPY");
        }
        execute(&self.url("postgres"), &sql)
            .unwrap_or_else(|e| panic!("creating database {db}: {e}\n{}", self.log_tail()));
        self.url(db)
    }

    /// `pg_ctl stop -m fast -w`: the server is down, its data kept.
    pub fn stop(&self) {
        let mut cmd = self.pg_command("pg_ctl");
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-m", "fast", "-w", "-t", "60", "stop"]);
        run(cmd).unwrap_or_else(|e| panic!("{e}\n{}", self.log_tail()));
    }

    /// Starts the server again after [`PgCluster::stop`] (same socket dir and data); returns
    /// once it accepts connections (`pg_ctl -w` waits for the postmaster to report ready).
    pub fn restart(&self) {
        self.try_pg_ctl_start().unwrap_or_else(|e| panic!("{e}"));
    }

    /// The directory holding the socket, the data directory and the server log.
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// The data directory (`PGDATA`).
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The running postmaster's pid (from `postmaster.pid`), if the server is up.
    pub fn postmaster_pid(&self) -> Option<u32> {
        let text = fs::read_to_string(self.data.join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// The postmaster and every process it started (its connections' backends too).
    fn server_processes(&self) -> Vec<u32> {
        let Some(postmaster) = self.postmaster_pid() else {
            return Vec::new();
        };
        let mut pids = vec![postmaster];
        for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            // `pid (comm) state ppid ...`; comm may hold spaces, so split after its ')'.
            let parent = fs::read_to_string(entry.path().join("stat"))
                .ok()
                .and_then(|stat| {
                    let rest = stat.rsplit_once(')')?.1.to_owned();
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                });
            if parent == Some(postmaster) {
                pids.push(pid);
            }
        }
        pids
    }

    /// Stops every server process with SIGSTOP: connections stay open, nothing answers.
    pub fn freeze(&self) {
        self.signal_all("STOP");
    }

    /// Lets a frozen server go on (SIGCONT).
    pub fn thaw(&self) {
        self.signal_all("CONT");
    }

    fn signal_all(&self, signal: &str) {
        let pids = self.server_processes();
        assert!(!pids.is_empty(), "no server running");
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .args(pids.iter().map(u32::to_string))
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {pids:?}");
    }

    /// The server's major version, from `PG_VERSION` (0 if unreadable).
    fn major_version(&self) -> u32 {
        fs::read_to_string(self.data.join("PG_VERSION"))
            .ok()
            .and_then(|v| v.trim().split('.').next()?.parse().ok())
            .unwrap_or(0)
    }

    fn initdb(&self) -> Result<(), String> {
        let mut cmd = self.pg_command("initdb");
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
            .arg("--locale=C");
        run(cmd).map_err(|e| {
            if self.as_postgres_user {
                format!(
                    "{e}\n(running as root: initdb runs as the `postgres` user, which must be \
                     able to reach {}; set TMPDIR=/tmp if it cannot)",
                    self.dir.display()
                )
            } else {
                e
            }
        })?;
        let conf = format!(
            "\n# llm-gateway test cluster\n\
             listen_addresses = ''\n\
             unix_socket_directories = '{}'\n\
             port = {PORT}\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             max_connections = 200\n",
            self.dir.display().to_string().replace('\'', "''")
        );
        fs::OpenOptions::new()
            .append(true)
            .open(self.data.join("postgresql.conf"))
            .and_then(|mut f| f.write_all(conf.as_bytes()))
            .map_err(|e| format!("writing postgresql.conf: {e}"))
    }

    fn try_pg_ctl_start(&self) -> Result<(), String> {
        let mut cmd = self.pg_command("pg_ctl");
        cmd.arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-t", "60", "start"]);
        run(cmd)
            .map(drop)
            .map_err(|e| format!("{e}\n{}", self.log_tail()))
    }

    /// A command for one of the server binaries, as the postgres user when we are root.
    fn pg_command(&self, tool: &str) -> Command {
        let program = self.bindir.join(tool);
        let mut cmd = if self.as_postgres_user {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        // The postgres user may not be able to read the test's working directory.
        cmd.current_dir(&self.dir).env_remove("PGDATA");
        cmd
    }

    fn log_tail(&self) -> String {
        match fs::read_to_string(&self.log) {
            Ok(text) => {
                let lines: Vec<&str> = text.lines().collect();
                let start = lines.len().saturating_sub(30);
                format!(
                    "server log ({}):\n{}",
                    self.log.display(),
                    lines[start..].join("\n")
                )
            }
            Err(e) => format!("(no server log at {}: {e})", self.log.display()),
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // Closing the pipe tells the supervisor to stop the server and remove the directory.
        drop(self.supervisor.stdin.take());
        let cleaned = self.supervisor.wait().is_ok_and(|s| s.success());
        if !cleaned || self.dir.exists() {
            // The supervisor is gone or failed: clean up from here.
            let mut cmd = self.pg_command("pg_ctl");
            cmd.arg("-D")
                .arg(&self.data)
                .args(["-m", "immediate", "-w", "stop"]);
            let _ = run(cmd);
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// A fresh, empty database for one test, in a cluster shared by the whole test binary (one
/// initdb per test process). If `LLM_GATEWAY_TEST_DATABASE_URL` is set, the database is
/// created on that server instead and no cluster is started. Returns the database's URL.
pub fn fresh_database() -> String {
    let db = unique_database_name();
    match std::env::var(DATABASE_URL_ENV) {
        Ok(base) if !base.is_empty() => {
            let sql = format!("CREATE DATABASE {}", quote_ident(&db));
            execute(&base, &sql)
                .unwrap_or_else(|e| panic!("creating database {db} via {DATABASE_URL_ENV}: {e}"));
            url_with_database(&base, &db)
        }
        _ => shared_cluster().create_database(&db),
    }
}

/// The cluster shared by this test binary, started on first use and removed when the
/// process exits.
pub fn shared_cluster() -> &'static PgCluster {
    static SHARED: OnceLock<Result<PgCluster, String>> = OnceLock::new();
    match SHARED.get_or_init(PgCluster::try_start) {
        Ok(cluster) => cluster,
        Err(e) => panic!("the shared test PostgreSQL cluster did not start: {e}"),
    }
}

/// Opens one connection (async; for use inside tests).
pub async fn connect(url: &str) -> PgConnection {
    PgConnection::connect(url)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"))
}

/// Database names unique across processes and runs: `t_<pid>_<start secs>_<n>`.
pub fn unique_database_name() -> String {
    static STAMP: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let stamp = *STAMP.get_or_init(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("t_{}_{stamp}_{n}", std::process::id())
}

/// `postgres:///DB?host=DIR&user=postgres` (the `postgres://postgres@/DB?host=DIR` form is
/// rejected by the `url` crate, and so by sqlx).
pub fn socket_url(dir: &Path, db: &str) -> String {
    format!(
        "postgres:///{}?host={}&user=postgres",
        percent_encode(db),
        percent_encode(&dir.display().to_string())
    )
}

/// `base` with its database replaced by `db`.
fn url_with_database(base: &str, db: &str) -> String {
    let mut url = url::Url::parse(base)
        .unwrap_or_else(|e| panic!("{DATABASE_URL_ENV} is not a URL sqlx can parse ({e}): {base}"));
    url.set_path(&format!("/{}", percent_encode(db)));
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| k != "dbname")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if pairs.is_empty() {
        url.set_query(None);
    } else {
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    url.into()
}

/// Percent-encodes everything except unreserved characters and `/`.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Runs one statement (simple protocol) on its own thread and runtime, so it can be called
/// from sync code and from inside async tests alike.
fn execute(url: &str, sql: &str) -> Result<(), String> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("building a runtime: {e}"))?;
            rt.block_on(async {
                let mut conn = PgConnection::connect(url)
                    .await
                    .map_err(|e| format!("connecting to {url}: {e}"))?;
                sqlx::raw_sql(sql)
                    .execute(&mut conn)
                    .await
                    .map_err(|e| format!("{sql}: {e}"))?;
                conn.close().await.map_err(|e| format!("closing: {e}"))
            })
        })
        .join()
        .unwrap_or_else(|_| Err(format!("{sql}: the worker thread panicked")))
    })
}

/// The server binaries: `LLM_GATEWAY_TEST_PG_BINDIR`, else the highest
/// `/usr/lib/postgresql/<version>/bin` holding `initdb`.
fn bindir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os(BINDIR_ENV).filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        return if dir.join("initdb").is_file() {
            Ok(dir)
        } else {
            Err(format!("{BINDIR_ENV}={} has no initdb", dir.display()))
        };
    }
    let root = Path::new("/usr/lib/postgresql");
    let mut found: Vec<(Vec<u32>, PathBuf)> = fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version: Vec<u32> = name
                .split('.')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).ok_or_else(|| {
        format!(
            "no PostgreSQL server binaries: no /usr/lib/postgresql/*/bin/initdb. Install \
             Debian's `postgresql` package (apt-get install postgresql), or set {BINDIR_ENV} \
             to a directory holding initdb, pg_ctl and postgres"
        )
    })
}

fn running_as_root() -> Result<bool, String> {
    static ROOT: OnceLock<Result<bool, String>> = OnceLock::new();
    ROOT.get_or_init(|| {
        let mut cmd = Command::new("id");
        cmd.arg("-u");
        let out = run(cmd)?;
        Ok(String::from_utf8_lossy(&out.stdout).trim() == "0")
    })
    .clone()
}

/// The postgres user's uid and gid.
fn postgres_user() -> Result<(u32, u32), String> {
    let mut cmd = Command::new("getent");
    cmd.args(["passwd", "postgres"]);
    let out = run(cmd).map_err(|e| {
        format!(
            "running as root, so initdb must run as the `postgres` user, which was not found \
             (install Debian's `postgresql` package, or run the tests as a non-root user): {e}"
        )
    })?;
    let line = String::from_utf8_lossy(&out.stdout);
    let fields: Vec<&str> = line.trim().split(':').collect();
    match (
        fields.get(2).and_then(|f| f.parse().ok()),
        fields.get(3).and_then(|f| f.parse().ok()),
    ) {
        (Some(uid), Some(gid)) => Ok((uid, gid)),
        _ => Err(format!(
            "unexpected `getent passwd postgres` output: {line}"
        )),
    }
}

/// Where cluster directories go: the temp dir, or /tmp when its path is too long for a socket.
fn temp_base() -> PathBuf {
    let base = std::env::temp_dir();
    // tempfile adds "/llmgw-pg-" and 6 random characters.
    if base.as_os_str().len() + 17 <= MAX_SOCKET_DIR_LEN {
        base
    } else {
        PathBuf::from("/tmp")
    }
}

fn spawn_supervisor(dir: &Path, bindir: &Path, as_postgres_user: bool) -> Result<Child, String> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(SUPERVISOR)
        .arg("llmgw-pg-supervisor")
        .arg(dir.join("data"))
        .arg(dir)
        .arg(bindir.join("pg_ctl"))
        .arg(if as_postgres_user { "1" } else { "0" })
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Its own process group: a Ctrl-C aimed at the test run must not kill it first.
        .process_group(0)
        .spawn()
        .map_err(|e| format!("starting the cleanup supervisor (sh): {e}"))?;
    match child.try_wait() {
        Ok(None) => Ok(child),
        other => Err(format!("the cleanup supervisor exited at once: {other:?}")),
    }
}

/// Runs `cmd` to completion; an error carries the command and its stdout and stderr.
fn run(mut cmd: Command) -> Result<Output, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim_end(),
            String::from_utf8_lossy(&out.stderr).trim_end()
        ))
    }
}
