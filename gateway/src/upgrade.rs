//! Zero-downtime binary upgrade: listening sockets handed to a new process.
//!
//! On `SIGUSR2` the running gateway starts the binary at the path it was started from (so
//! replace the file first) with the same arguments, passing its listening sockets as
//! inherited file descriptors 3, 4, … with systemd's socket-activation variables
//! (`LISTEN_FDS`, `LISTEN_FDNAMES`; no `LISTEN_PID`) and its own pid in
//! `CELLGATE_UPGRADE_FROM`. The new process serves on those sockets instead of binding,
//! and once its workers run it sends `SIGTERM` to the old one, which stops accepting and
//! drains (in-flight requests finish within `shutdown.grace`). Both processes accept on the
//! same kernel socket in between, so no connection is refused or lost. If the new process
//! fails to start, it exits without signalling and the old one keeps serving (and logs it).
//!
//! The same variables make cellgate work under systemd socket activation.
//!
//! This module never binds a socket itself and never signals any process but the one
//! named in `CELLGATE_UPGRADE_FROM`.

use std::collections::HashMap;
use std::net::TcpListener;
use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::{Mutex, OnceLock};

use command_fds::{CommandFdExt, FdMapping};

/// Environment variable naming the process a new one takes over from.
pub const ENV_UPGRADE_FROM: &str = "CELLGATE_UPGRADE_FROM";

/// Listening sockets passed in by a previous process (or systemd), by name.
#[derive(Debug, Default)]
pub struct Inherited {
    by_name: HashMap<String, TcpListener>,
}

impl Inherited {
    /// Take the sockets described by `LISTEN_FDS` / `LISTEN_FDNAMES` (names default to
    /// `proxy`, then `tls`). Call once, before other threads start.
    pub fn from_env() -> Self {
        let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
            .map(|n| n.split(':').map(str::to_owned).collect())
            .unwrap_or_default();
        let mut fds = listenfd::ListenFd::from_env();
        let mut by_name = HashMap::new();
        for i in 0..fds.len() {
            let name = names
                .get(i)
                .cloned()
                .unwrap_or_else(|| ["proxy", "tls"].get(i).unwrap_or(&"extra").to_string());
            match fds.take_tcp_listener(i) {
                Ok(Some(l)) => match l.set_nonblocking(true) {
                    Ok(()) => {
                        by_name.insert(name, l);
                    }
                    Err(e) => {
                        tracing::error!(fd = i + 3, error = %e, "inherited socket unusable")
                    }
                },
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(fd = i + 3, error = %e, "inherited fd is not a TCP listener")
                }
            }
        }
        Self { by_name }
    }

    /// The inherited socket called `name`, if any.
    pub fn take(&mut self, name: &str) -> Option<TcpListener> {
        self.by_name.remove(name)
    }
}

/// The process's inherited sockets, read from the environment once.
static INHERITED: OnceLock<Mutex<Inherited>> = OnceLock::new();

/// Take the inherited listening socket called `name` (`proxy`, `tls`, `admin`), if this
/// process was handed one. Start-up only.
pub fn take_inherited(name: &str) -> Option<TcpListener> {
    INHERITED
        .get_or_init(|| Mutex::new(Inherited::from_env()))
        .lock()
        .ok()?
        .take(name)
}

/// Start `exe` with this process's arguments and `listeners` (name, socket) inherited.
pub fn spawn_successor(exe: &Path, listeners: &[(&str, &TcpListener)]) -> std::io::Result<Child> {
    let mut mappings = Vec::with_capacity(listeners.len());
    for (i, (_, l)) in listeners.iter().enumerate() {
        mappings.push(FdMapping {
            parent_fd: l.as_fd().try_clone_to_owned()?,
            child_fd: 3 + i as i32,
        });
    }
    let names: Vec<&str> = listeners.iter().map(|(n, _)| *n).collect();
    let mut cmd = Command::new(exe);
    cmd.args(std::env::args_os().skip(1))
        .env("LISTEN_FDS", listeners.len().to_string())
        .env("LISTEN_FDNAMES", names.join(":"))
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDS_FIRST_FD")
        .env(ENV_UPGRADE_FROM, std::process::id().to_string());
    cmd.fd_mappings(mappings)
        .map_err(|_| std::io::Error::other("listener fd mapping collision"))?;
    cmd.spawn()
}

/// If this process was started by [`spawn_successor`], tell the old process to drain.
/// Call once this process serves.
pub fn signal_predecessor() {
    let Ok(pid) = std::env::var(ENV_UPGRADE_FROM) else {
        return;
    };
    let Ok(pid) = pid.parse::<i32>() else {
        tracing::warn!(value = %pid, "{ENV_UPGRADE_FROM} is not a pid; no process told to drain");
        return;
    };
    if pid <= 1 || pid == std::process::id() as i32 {
        return;
    }
    match nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    ) {
        Ok(()) => tracing::info!(
            old_pid = pid,
            "upgrade: serving; told the old process to drain"
        ),
        Err(e) => {
            tracing::warn!(old_pid = pid, error = %e, "upgrade: cannot signal the old process")
        }
    }
}
