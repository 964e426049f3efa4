//! Socket activation: listeners passed by the service manager (`LISTEN_FDS`, `LISTEN_PID`,
//! `LISTEN_FDNAMES`), so that a restart refuses no connection.

use std::net::TcpListener;

/// `FileDescriptorName=` of the API socket.
pub const API_NAME: &str = "api";
/// `FileDescriptorName=` of the separate `/metrics` socket.
pub const METRICS_NAME: &str = "metrics";

/// Listeners the service manager passed, still in blocking std form (no runtime yet).
#[derive(Debug)]
pub struct Passed {
    /// The API socket.
    pub api: TcpListener,
    /// The `/metrics` socket, when one named `metrics` was passed.
    pub metrics: Option<TcpListener>,
}

/// Why the passed sockets cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// The names do not say which socket is which.
    #[error(
        "LISTEN_FDNAMES={names:?}: {reason}; name the sockets with FileDescriptorName=api \
         (and FileDescriptorName=metrics for a separate /metrics socket)"
    )]
    Names {
        /// The names as passed.
        names: String,
        /// What is wrong with them.
        reason: String,
    },
    /// A passed descriptor is not a TCP stream socket.
    #[error("socket activation: descriptor {fd} ({name}) is not a TCP stream socket: {source}")]
    NotTcp {
        /// The descriptor number.
        fd: usize,
        /// Its name.
        name: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Which passed descriptor (by index) serves the API and which `/metrics`.
/// A single socket is the API whatever its name (systemd names it after the unit unless
/// `FileDescriptorName=` is set); with more, `api` and `metrics` must be named.
fn assign(names: &[String]) -> Result<(usize, Option<usize>), String> {
    let find = |wanted: &str| -> Result<Option<usize>, String> {
        let mut found = names.iter().enumerate().filter(|(_, n)| *n == wanted);
        let first = found.next().map(|(i, _)| i);
        if found.next().is_some() {
            return Err(format!("more than one socket is named {wanted:?}"));
        }
        Ok(first)
    };
    let api = find(API_NAME)?;
    let metrics = find(METRICS_NAME)?;
    match (names.len(), api) {
        (0, _) => Err("no sockets".to_owned()),
        (1, _) if metrics.is_some() => Err("the only socket is for /metrics".to_owned()),
        (1, _) => Ok((0, None)),
        (n, Some(api)) if n == 1 + usize::from(metrics.is_some()) => Ok((api, metrics)),
        (n, Some(_)) => Err(format!(
            "{n} sockets, but only \"api\" and \"metrics\" are used"
        )),
        (_, None) => Err("none of several sockets is named \"api\"".to_owned()),
    }
}

/// Takes the listeners systemd passed to this process, if any (`LISTEN_PID` must be this
/// process). Call it once, before any other thread starts: it removes `LISTEN_FDS` and
/// `LISTEN_PID` from the environment.
pub fn take() -> Result<Option<Passed>, ActivationError> {
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    let mut fds = listenfd::ListenFd::from_env();
    if !ours || fds.len() == 0 {
        return Ok(None);
    }
    let raw_names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    let mut names: Vec<String> = raw_names.split(':').map(str::to_owned).collect();
    if names.len() != fds.len() {
        // Absent or malformed: every socket is unnamed.
        names = vec!["unknown".to_owned(); fds.len()];
    }
    let (api, metrics) = assign(&names).map_err(|reason| ActivationError::Names {
        names: raw_names.clone(),
        reason,
    })?;
    let mut tcp = |i: usize| -> Result<TcpListener, ActivationError> {
        let not_tcp = |source| ActivationError::NotTcp {
            fd: 3 + i,
            name: names[i].clone(),
            source,
        };
        fds.take_tcp_listener(i)
            .map_err(not_tcp)?
            .ok_or_else(|| not_tcp(std::io::Error::other("already taken")))
    };
    let api = tcp(api)?;
    let metrics = metrics.map(&mut tcp).transpose()?;
    Ok(Some(Passed { api, metrics }))
}

#[cfg(test)]
mod tests {
    use super::assign;

    fn names(s: &[&str]) -> Vec<String> {
        s.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn one_socket_is_the_api_whatever_its_name() {
        assert_eq!(assign(&names(&["llm-gateway.socket"])), Ok((0, None)));
        assert_eq!(assign(&names(&["api"])), Ok((0, None)));
    }

    #[test]
    fn named_api_and_metrics_in_any_order() {
        assert_eq!(assign(&names(&["api", "metrics"])), Ok((0, Some(1))));
        assert_eq!(assign(&names(&["metrics", "api"])), Ok((1, Some(0))));
    }

    #[test]
    fn unclear_names_are_refused() {
        for bad in [
            &["metrics"][..],
            &["llm-gateway.socket", "llm-gateway.socket"],
            &["api", "api"],
            &["api", "metrics", "other"],
            &["api", "other"],
        ] {
            assert!(assign(&names(bad)).is_err(), "{bad:?}");
        }
    }
}
