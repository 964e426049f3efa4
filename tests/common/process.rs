//! The gateway binary as a child process, started the way a service manager starts it:
//! the test binds the listening socket (`127.0.0.1:0`) and passes it as socket activation
//! does (`LISTEN_FDS`), so no port is bound, released and bound again (which another
//! process could take in between). Killed when dropped.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use command_fds::{CommandFdExt, FdMapping};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The gateway binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_llm-gateway");

/// How `llm-gateway serve` is to be started.
pub struct Launch {
    wrapper: Vec<OsString>,
    args: Vec<OsString>,
    env: Vec<(String, Option<String>)>,
    stdout: Option<Stdio>,
    stderr: Option<Stdio>,
    sockets: Vec<(std::net::TcpListener, String)>,
    binds_itself: bool,
}

impl Launch {
    /// `llm-gateway serve --config <config>`, with `RUST_LOG=warn`.
    pub fn serve(config: &Path) -> Self {
        Self {
            wrapper: Vec::new(),
            args: vec!["serve".into(), "--config".into(), config.into()],
            env: vec![("RUST_LOG".to_owned(), Some("warn".to_owned()))],
            stdout: None,
            stderr: None,
            sockets: Vec::new(),
            binds_itself: false,
        }
    }

    /// Sets `key=value` in the gateway's environment; an empty value removes `key`.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.retain(|(k, _)| k != key);
        let value = (!value.is_empty()).then(|| value.to_owned());
        self.env.push((key.to_owned(), value));
        self
    }

    /// [`Launch::env`] for each pair.
    pub fn envs(self, pairs: &[(&str, &str)]) -> Self {
        pairs.iter().fold(self, |l, (k, v)| l.env(k, v))
    }

    /// Where the gateway's stderr goes (default: the test's stderr).
    pub fn stderr(mut self, to: impl Into<Stdio>) -> Self {
        self.stderr = Some(to.into());
        self
    }

    /// Where the gateway's stdout goes (default: nowhere).
    pub fn stdout(mut self, to: impl Into<Stdio>) -> Self {
        self.stdout = Some(to.into());
        self
    }

    /// Runs `program args...` first, which must end by `exec`ing its remaining arguments
    /// (the gateway's command line), as `unshare ... sh -c '...; exec "$@"'` does.
    pub fn wrapped_in(mut self, program_and_args: &[&str]) -> Self {
        self.wrapper = program_and_args.iter().map(OsString::from).collect();
        self
    }

    /// Passes `listener` (a copy of it) under `name`; the first one passed is the API's.
    /// Without any, a fresh `127.0.0.1:0` listener is passed as `api`.
    pub fn socket(mut self, listener: &std::net::TcpListener, name: &str) -> Self {
        let copy = listener.try_clone().expect("duplicate the listener");
        self.sockets.push((copy, name.to_owned()));
        self
    }

    /// The gateway binds `server.listen` itself (set to `127.0.0.1:0`): no socket passed.
    /// The port is read from `/proc` once it listens (see [`GatewayProcess::listening`]).
    pub fn binding_itself(mut self) -> Self {
        self.binds_itself = true;
        self.env("LLM_GATEWAY__SERVER__LISTEN", "127.0.0.1:0")
    }

    /// Starts the process (it may not be serving yet).
    pub fn spawn(mut self) -> GatewayProcess {
        if !self.binds_itself && self.sockets.is_empty() {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
            self.sockets.push((listener, "api".to_owned()));
        }
        let port = self
            .sockets
            .first()
            .map(|(l, _)| l.local_addr().expect("listener address").port());
        let mut cmd = if self.sockets.is_empty() {
            let mut cmd = command(&self.wrapper, BIN);
            cmd.args(&self.args);
            cmd
        } else {
            // `LISTEN_PID` must be the gateway's own pid: `sh` sets it to its `$$`, then
            // `exec`s the gateway, which keeps the pid (as do the wrapper's `exec`s).
            let mut cmd = command(&self.wrapper, "sh");
            cmd.args(["-c", "export LISTEN_PID=$$; exec \"$0\" \"$@\"", BIN])
                .args(&self.args)
                .env("LISTEN_FDS", self.sockets.len().to_string())
                .env(
                    "LISTEN_FDNAMES",
                    self.sockets
                        .iter()
                        .map(|(_, n)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(":"),
                );
            let mappings = self
                .sockets
                .drain(..)
                .enumerate()
                .map(|(i, (listener, _))| FdMapping {
                    parent_fd: OwnedFd::from(listener),
                    child_fd: 3 + i as i32,
                })
                .collect();
            cmd.fd_mappings(mappings).expect("pass the sockets");
            cmd
        };
        for (key, value) in &self.env {
            match value {
                Some(v) => cmd.env(key, v),
                None => cmd.env_remove(key),
            };
        }
        cmd.stdout(self.stdout.take().unwrap_or_else(Stdio::null));
        cmd.stderr(self.stderr.take().unwrap_or_else(Stdio::inherit));
        let child = cmd.spawn().expect("start the gateway");
        // `cmd` (and with it this process's copies of the passed sockets) is dropped here:
        // once the gateway closes its listener, connections are refused, as they should be.
        GatewayProcess {
            child,
            url: port.map_or_else(String::new, |p| format!("http://127.0.0.1:{p}")),
            port: port.unwrap_or(0),
        }
    }

    /// Starts the process and waits until `/health` answers 200 (panics if it exits).
    pub async fn start(self) -> GatewayProcess {
        let mut gw = self.spawn();
        gw.until_healthy(Duration::from_secs(30)).await;
        gw
    }
}

fn command(wrapper: &[OsString], program: &str) -> Command {
    match wrapper.split_first() {
        None => Command::new(program),
        Some((first, rest)) => {
            let mut cmd = Command::new(first);
            cmd.args(rest).arg(program);
            cmd
        }
    }
}

/// One gateway process; killed (and reaped) when dropped, so that an orphan never holds
/// the test harness's output pipe open.
pub struct GatewayProcess {
    pub child: Child,
    /// `http://127.0.0.1:<port>` (empty until known for a gateway binding itself).
    pub url: String,
    /// The API port.
    pub port: u16,
}

impl GatewayProcess {
    /// The URL of `path` on the gateway.
    pub fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// Sends `signal`.
    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).expect("signal the gateway");
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        self.child.wait().expect("wait for the gateway")
    }

    /// `kill -9`, and waits until the process is gone.
    pub fn sigkill(&mut self) {
        self.signal(Signal::SIGKILL);
        self.child.wait().expect("wait for the gateway");
    }

    /// Waits until `/health` answers 200 (for a gateway binding itself: once it listens,
    /// on the port it listens on); panics if the process exits first (with its stderr, when
    /// piped) or `limit` passes.
    pub async fn until_healthy(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if self.url.is_empty() && self.listening().len() == 1 {
                self.learn_port();
            }
            if !self.url.is_empty()
                && let Ok(r) = super::client().get(self.at("/health")).send().await
            {
                assert_eq!(r.status(), 200, "/health");
                return;
            }
            if let Some(status) = self.child.try_wait().expect("poll the gateway") {
                let mut err = String::new();
                if let Some(pipe) = self.child.stderr.as_mut() {
                    let _ = std::io::Read::read_to_string(pipe, &mut err);
                }
                panic!("gateway exited with {status}: {err}");
            }
            assert!(Instant::now() < deadline, "gateway never became healthy");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The TCP ports the process listens on now, from `/proc`: its socket descriptors
    /// matched against the kernel's table of listening sockets.
    pub fn listening(&self) -> Vec<u16> {
        let pid = self.child.id();
        let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|dir| {
                dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                    .filter_map(|target| {
                        let t = target.to_str()?;
                        Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut ports = Vec::new();
        for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
            let Ok(text) = std::fs::read_to_string(table) else {
                continue;
            };
            for line in text.lines().skip(1) {
                let f: Vec<&str> = line.split_whitespace().collect();
                // local_address is f[1] ("ADDR:PORT" in hex), st f[3] (0A = LISTEN), inode f[9].
                if f.len() > 9
                    && f[3] == "0A"
                    && inodes.iter().any(|i| i == f[9])
                    && let Some(port) = f[1]
                        .rsplit(':')
                        .next()
                        .and_then(|p| u16::from_str_radix(p, 16).ok())
                {
                    ports.push(port);
                }
            }
        }
        ports
    }

    /// For a gateway [binding itself](Launch::binding_itself): its API port, once it
    /// listens on exactly one (the URL is set from it).
    pub fn learn_port(&mut self) -> u16 {
        let ports = self.listening();
        assert_eq!(ports.len(), 1, "listening ports: {ports:?}");
        self.port = ports[0];
        self.url = format!("http://127.0.0.1:{}", self.port);
        self.port
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
