//! A private, throwaway Redis server.
//!
//! [`RedisServer::start`] runs `redis-server` on a free loopback port in a
//! fresh temp directory, with persistence off (`--save '' --appendonly no`).
//! [`RedisServer::stop`] and [`RedisServer::start_again`] make an outage on
//! the same port. `Drop` stops it, and a detached watchdog shell stops it
//! once the test process is gone, even after a panic or `SIGKILL`.
//! [`RedisServer::cli`] runs `redis-cli` against it, so that a test reads
//! what was written with a client other than Ripen's.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::TempDir;

/// Where Debian's `redis-server` package puts its binaries.
const BIN_DIR: &str = "/usr/bin";
/// How long a start may take until the server accepts connections.
const START_PATIENCE: Duration = Duration::from_secs(20);
/// Tries to start on a free port; another process may take the port first.
const START_TRIES: u32 = 3;

pub struct RedisServer {
    dir: TempDir,
    port: u16,
    child: Option<Child>,
    watchdog: Option<Child>,
}

impl std::fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisServer")
            .field("dir", &self.dir.path())
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl RedisServer {
    /// Starts a fresh server. Panics when `redis-server` is not installed or
    /// does not start: a test that needs it must not pass without it.
    pub fn start() -> RedisServer {
        if !binary("redis-server").is_file() {
            panic!(
                "redis-server is not installed: run scripts/test, which installs it with apt-get"
            );
        }
        let dir = TempDir::new("ripen-redis-").expect("create a temp dir for Redis");
        let mut server = RedisServer {
            dir,
            port: 0,
            child: None,
            watchdog: None,
        };
        let mut last_failure = String::new();
        for _ in 0..START_TRIES {
            server.port = free_port();
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => last_failure = e,
            }
        }
        panic!("start redis-server: {last_failure}");
    }

    /// Stops the server (SIGKILL): every connection breaks at once, and
    /// everything it held is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
    }

    /// Starts the server again after [`RedisServer::stop`], on the same port.
    pub fn start_again(&mut self) {
        self.stop();
        let deadline = Instant::now() + START_PATIENCE;
        loop {
            // The port may linger a moment after the kill.
            match self.spawn() {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => panic!("restart redis-server: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's log file.
    pub fn log_file(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// Runs `redis-cli -p PORT ARGS…` and returns its standard output, one
    /// reply element a line (raw, as `redis-cli` prints when piped).
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(binary("redis-cli"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run redis-cli: {e}"));
        assert!(
            out.status.success(),
            "redis-cli {args:?}: {}; stderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn spawn(&mut self) -> Result<(), String> {
        let child = Command::new(binary("redis-server"))
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.log_file())
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn redis-server: {e}"))?;
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + START_PATIENCE;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!(
                        "redis-server exited with {status}; log:\n{}",
                        std::fs::read_to_string(self.log_file()).unwrap_or_default()
                    ));
                }
            }
            if self.ping() {
                break;
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(format!(
                    "no answer on port {} within {START_PATIENCE:?}",
                    self.port
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.watchdog = Some(spawn_watchdog(pid));
        Ok(())
    }

    /// Whether the server answers `PING` with `+PONG`.
    fn ping(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        if stream.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut reply = [0u8; 7];
        stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn binary(name: &str) -> PathBuf {
    Path::new(BIN_DIR).join(name)
}

/// A detached shell that kills `pid` once this process is gone, and ends by
/// itself when `pid` is.
pub(crate) fn spawn_watchdog(pid: u32) -> Child {
    use std::os::unix::process::CommandExt;
    let script = format!(
        "while kill -0 {me} 2>/dev/null; do kill -0 {pid} 2>/dev/null || exit 0; sleep 1; done; kill -9 {pid} 2>/dev/null",
        me = std::process::id(),
    );
    Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn the watchdog of process {pid}: {e}"))
}

/// A port that was free a moment ago on 127.0.0.1.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("find a free port on 127.0.0.1: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_starts_stops_and_starts_again() {
        let mut redis = RedisServer::start();
        assert_eq!(redis.cli(&["SET", "k", "v"]).trim(), "OK");
        assert_eq!(redis.cli(&["GET", "k"]).trim(), "v");
        redis.stop();
        assert!(!redis.ping(), "a stopped server does not answer");
        redis.start_again();
        assert_eq!(redis.cli(&["GET", "k"]).trim(), "", "nothing is kept");
        let dir = redis.dir.path().to_owned();
        drop(redis);
        assert!(!dir.exists(), "dropping the server removes its directory");
    }
}
