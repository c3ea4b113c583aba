//! A guard around a `ripen serve` child process: start it on a config file,
//! learn its address from its "listening on" line, keep its log in a file,
//! signal it (SIGTERM, SIGKILL, SIGSTOP, SIGCONT), start it again on the
//! same config, and kill it when the guard is dropped, so that no server
//! outlives the test, demo or bench that started it, whatever way that ends.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use ripen_client::Client;

/// How long a server may take to print its "listening on" line: opening a
/// large store or migrating a shared database can take a while on a busy
/// machine.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How often [`ServerProcess::wait_ready`] and [`ServerProcess::terminate`]
/// look again.
const POLL_INTERVAL: Duration = Duration::from_millis(5);
/// The bytes of the log shown by [`ServerProcess::log_tail`] when a start
/// fails.
const FAILURE_TAIL_LINES: usize = 60;

/// A running (or stopped, between [`ServerProcess::kill`] and
/// [`ServerProcess::spawn`]) `ripen serve`.
pub struct ServerProcess {
    exe: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
    client: Client,
    starts: u32,
    /// Environment variables set for the server at every later start.
    env: Vec<(String, String)>,
}

impl std::fmt::Debug for ServerProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerProcess")
            .field("config_path", &self.config_path)
            .field("pid", &self.pid())
            .field("url", &self.url())
            .finish_non_exhaustive()
    }
}

impl ServerProcess {
    /// Runs `EXE serve --config CONFIG` in the config's directory, appends
    /// its standard error and output to `log_path`, and waits for its
    /// "listening on" line.
    pub async fn start(
        exe: &Path,
        config_path: &Path,
        log_path: &Path,
    ) -> std::io::Result<ServerProcess> {
        let mut server = ServerProcess {
            exe: exe.to_owned(),
            config_path: config_path.to_owned(),
            log_path: log_path.to_owned(),
            child: None,
            client: Client::new("http://127.0.0.1:1"),
            starts: 0,
            env: Vec::new(),
        };
        server.spawn().await?;
        Ok(server)
    }

    /// A client of this server; it follows restarts to their new port.
    /// Sends `key` as a bearer token with every request of [`Self::client`]
    /// from now on.
    pub fn use_api_key(&mut self, key: &str) -> std::io::Result<()> {
        self.client = self
            .client
            .clone()
            .with_api_key(key)
            .map_err(|e| std::io::Error::other(format!("the API key: {e}")))?;
        Ok(())
    }

    /// Sets `name` to `value` in the server's environment from its next
    /// start on.
    pub fn set_env(&mut self, name: &str, value: &str) {
        self.env.retain(|(n, _)| n != name);
        self.env.push((name.to_owned(), value.to_owned()));
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The root URL, such as `http://127.0.0.1:43117`.
    pub fn url(&self) -> String {
        self.client.base()
    }

    /// The address the server listens on.
    pub fn addr(&self) -> std::io::Result<SocketAddr> {
        let authority = self.client.authority();
        authority
            .parse()
            .map_err(|e| std::io::Error::other(format!("{authority:?} is not an address: {e}")))
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Starts the server (again) on the same config, after it was killed or
    /// terminated; a server still running is killed first.
    pub async fn spawn(&mut self) -> std::io::Result<()> {
        self.kill();
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| annotate(e, &format!("open the log {}", self.log_path.display())))?;
        writeln!(log, "===== ripen serve, start #{} =====", self.starts)?;
        let mut stdout_log = log.try_clone()?;
        let dir = self
            .config_path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let mut child = Command::new(&self.exe)
            .arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .current_dir(dir)
            .env_remove("RIPEN_SERVER")
            .envs(self.env.iter().map(|(n, v)| (n, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| annotate(e, &format!("spawn {} serve", self.exe.display())))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = tokio::sync::oneshot::channel::<String>();
        // The pipe is read on a plain thread for the life of the child, so
        // that it never blocks on a full pipe; the thread ends with it.
        std::thread::Builder::new()
            .name("ripen-serve-stdout".to_owned())
            .spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let _ = writeln!(stdout_log, "{line}");
                    if let Some(pos) = line.find("listening on ") {
                        let url = line[pos + "listening on ".len()..]
                            .split_whitespace()
                            .next()
                            .unwrap_or("")
                            .to_owned();
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(url);
                        }
                    }
                }
            })?;
        self.child = Some(child);
        let failure = match tokio::time::timeout(STARTUP_TIMEOUT, rx).await {
            Ok(Ok(url)) if url.starts_with("http://") || url.starts_with("https://") => {
                self.client.set_base(&url);
                return Ok(());
            }
            Ok(Ok(url)) => format!("the \"listening on\" line has no http(s):// URL: {url:?}"),
            Ok(Err(_)) => {
                let status = self.child.as_mut().and_then(|c| c.wait().ok());
                format!("ripen serve closed its stdout without \"listening on\" (exit: {status:?})")
            }
            Err(_) => {
                format!("ripen serve printed no \"listening on\" line within {STARTUP_TIMEOUT:?}")
            }
        };
        self.kill();
        Err(std::io::Error::other(format!(
            "{failure}; the end of its log {}:\n{}",
            self.log_path.display(),
            self.log_tail(FAILURE_TAIL_LINES)
        )))
    }

    /// Kills the server with SIGKILL, then [`ServerProcess::spawn`]s it.
    pub async fn restart(&mut self) -> std::io::Result<()> {
        self.spawn().await
    }

    /// Kills the server and drops the guard: what dropping it does, said
    /// where a reader looks for it.
    pub fn stop(mut self) {
        self.kill();
    }

    /// Kills the server with SIGKILL (no shutdown at all) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits up to `timeout` for a graceful exit; a server
    /// still running then is killed. Returns the exit status of a graceful
    /// exit.
    pub async fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                self.kill();
                return None;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Asks the server to stop (SIGTERM) and returns at once; see
    /// [`ServerProcess::exited`] for when it has.
    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Freezes the server (SIGSTOP): it keeps its sockets and its leases but
    /// does nothing until [`ServerProcess::sigcont`].
    pub fn sigstop(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Lets a server frozen by [`ServerProcess::sigstop`] run again.
    pub fn sigcont(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: libc::c_int) {
        let Some(pid) = self.pid() else {
            panic!("signal {signal}: the server is not running");
        };
        let pid = libc::pid_t::try_from(pid).expect("a pid fits pid_t");
        // SAFETY: kill(2) has no memory-safety preconditions. `pid` is our
        // own child, not yet reaped (reaping takes it out of `self.child`),
        // so the id cannot have been reused by another process.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(
            rc,
            0,
            "kill({pid}, {signal}): {}",
            std::io::Error::last_os_error()
        );
    }

    /// `Some(status)` once the process has exited by itself.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// An error, with the end of the log, if the server is not running.
    pub fn check_alive(&mut self) -> std::io::Result<()> {
        let status = match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => return Ok(()),
            Some(Ok(Some(status))) => status.to_string(),
            Some(Err(e)) => return Err(annotate(e, "check on the ripen serve process")),
            None => "it was stopped".to_owned(),
        };
        Err(std::io::Error::other(format!(
            "ripen serve is not running ({status}); the end of its log {}:\n{}",
            self.log_path.display(),
            self.log_tail(FAILURE_TAIL_LINES)
        )))
    }

    /// Waits until `/readyz` answers 200 and returns how long that took.
    pub async fn wait_ready(&self, timeout: Duration) -> std::io::Result<Duration> {
        let started = Instant::now();
        loop {
            if let Ok(true) = self.client.readyz().await {
                return Ok(started.elapsed());
            }
            if started.elapsed() >= timeout {
                return Err(std::io::Error::other(format!(
                    "/readyz did not answer 200 within {timeout:?}"
                )));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// The whole log: standard error and output of every start.
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `lines` lines of the log (read from its last 256 KiB).
    pub fn log_tail(&self, lines: usize) -> String {
        tail_of_file(&self.log_path, lines)
    }

    /// The CPU time (user and system, all threads) the running server has
    /// used, in clock ticks, where /proc has it.
    pub fn cpu_ticks(&self) -> Option<u64> {
        cpu_ticks(&self.pid()?.to_string())
    }

    /// The server's peak resident set size (VmHWM), where /proc has it.
    pub fn peak_rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kib: u64 = line
            .trim_start_matches("VmHWM:")
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "----- ripen serve log tail ({}) -----\n{}\n----- end of log -----",
                self.log_path.display(),
                self.log_tail(FAILURE_TAIL_LINES)
            );
        }
    }
}

/// The CPU time (user and system, all threads) a process has used so far, in
/// clock ticks (`USER_HZ`), where /proc has it; `pid` may be "self".
pub fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces; the fields after it
    // start with the third, the state, so utime and stime (the 14th and 15th)
    // are at 11 and 12.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The last `lines` lines of a file, read from its last 256 KiB.
pub fn tail_of_file(path: &Path, lines: usize) -> String {
    const TAIL_BYTES_MAX: u64 = 256 * 1024;
    let mut text = String::new();
    if let Ok(mut f) = File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES_MAX)));
        let mut bytes = Vec::new();
        let _ = f.read_to_end(&mut bytes);
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    all[start..].join("\n")
}

fn annotate(error: std::io::Error, what: &str) -> std::io::Error {
    std::io::Error::new(error.kind(), format!("{what}: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_reads_this_process() {
        if Path::new("/proc/self/stat").exists() {
            assert!(cpu_ticks("self").is_some());
        }
    }

    #[test]
    fn a_tail_is_the_last_lines() {
        let dir = crate::TempDir::new("ripen-testkit-tail-").unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, "a\nb\nc\n").unwrap();
        assert_eq!(tail_of_file(&path, 2), "b\nc");
        assert_eq!(tail_of_file(&dir.path().join("none"), 2), "");
    }
}
