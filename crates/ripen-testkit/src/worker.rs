//! A guard around a worker process (such as the Rust SDK's `billing`
//! example): start it, wait for its `worker ready` line, keep its output in
//! a log file, signal it (SIGTERM, SIGKILL) and kill it when the guard is
//! dropped. And [`workspace_binary`], which builds a binary or an example
//! of this workspace for a test of another package that runs it.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::server::tail_of_file;

/// How long a worker may take to print `worker ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How often [`WorkerProcess::wait_exit`] looks again.
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// The lines of the log shown when a start fails or a test panics.
const FAILURE_TAIL_LINES: usize = 40;

/// A running worker process.
pub struct WorkerProcess {
    log_path: PathBuf,
    child: Option<Child>,
    ready_line: String,
}

impl std::fmt::Debug for WorkerProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerProcess")
            .field("pid", &self.pid())
            .field("log_path", &self.log_path)
            .finish_non_exhaustive()
    }
}

impl WorkerProcess {
    /// Runs `exe ARGS` with the extra environment `env`, appends its
    /// standard output and error to `log_path`, and waits for a line that
    /// starts with `worker ready`.
    pub async fn start(
        exe: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        log_path: &Path,
    ) -> std::io::Result<WorkerProcess> {
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)?;
        writeln!(log, "===== {} {} =====", exe.display(), args.join(" "))?;
        let mut stdout_log = log.try_clone()?;
        let mut child = Command::new(exe)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| std::io::Error::new(e.kind(), format!("spawn {}: {e}", exe.display())))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = tokio::sync::oneshot::channel::<String>();
        std::thread::Builder::new()
            .name("worker-stdout".to_owned())
            .spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let _ = writeln!(stdout_log, "{line}");
                    if line.starts_with("worker ready") {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(line);
                        }
                    }
                }
            })?;
        let mut worker = WorkerProcess {
            log_path: log_path.to_owned(),
            child: Some(child),
            ready_line: String::new(),
        };
        let failure = match tokio::time::timeout(READY_TIMEOUT, rx).await {
            Ok(Ok(line)) => {
                worker.ready_line = line;
                return Ok(worker);
            }
            Ok(Err(_)) => {
                let status = worker.child.as_mut().and_then(|c| c.wait().ok());
                format!("the worker closed its stdout without \"worker ready\" (exit: {status:?})")
            }
            Err(_) => format!("the worker printed no \"worker ready\" within {READY_TIMEOUT:?}"),
        };
        worker.kill();
        Err(std::io::Error::other(format!(
            "{failure}; the end of its log {}:\n{}",
            log_path.display(),
            tail_of_file(log_path, FAILURE_TAIL_LINES)
        )))
    }

    /// The `worker ready …` line it printed.
    pub fn ready_line(&self) -> &str {
        &self.ready_line
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Kills the worker with SIGKILL (no shutdown at all) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Asks the worker to stop (SIGTERM) and returns at once.
    pub fn sigterm(&self) {
        let Some(pid) = self.pid() else {
            panic!("SIGTERM: the worker is not running");
        };
        let pid = libc::pid_t::try_from(pid).expect("a pid fits pid_t");
        // SAFETY: kill(2) has no memory-safety preconditions; `pid` is our
        // own child, not yet reaped, so the id cannot have been reused.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(
            rc,
            0,
            "kill({pid}, SIGTERM): {}",
            std::io::Error::last_os_error()
        );
    }

    /// Waits up to `timeout` for the worker to exit by itself; `None` if it
    /// still runs then (it is left running).
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// The whole log: standard output and error.
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "----- worker log tail ({}) -----\n{}\n----- end of log -----",
                self.log_path.display(),
                tail_of_file(&self.log_path, FAILURE_TAIL_LINES)
            );
        }
    }
}

/// A target of this workspace that a test runs as a process.
#[derive(Clone, Copy, Debug)]
pub enum Target<'a> {
    /// `--bin NAME` of a package.
    Bin(&'a str),
    /// `--example NAME` of a package.
    Example(&'a str),
}

/// Builds `target` of workspace package `package` with the profile and
/// target directory of the running test, and returns its path. Cargo gives
/// a test the path of its own package's binaries only; this is how a test
/// of one package runs another's (the `ripen` server, an example worker).
/// The build is incremental, so on a warm target directory it takes a
/// moment.
pub fn workspace_binary(package: &str, target: Target<'_>) -> std::io::Result<PathBuf> {
    // A test runs as TARGET_DIR/PROFILE/deps/NAME-HASH.
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| std::io::Error::other(format!("{} has no profile dir", exe.display())))?;
    let target_dir = profile_dir
        .parent()
        .ok_or_else(|| std::io::Error::other("the profile dir has no parent"))?;
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("debug");
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--quiet")
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(target_dir)
        .arg("-p")
        .arg(package);
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.arg("--profile").arg(other);
        }
    }
    let path = match target {
        Target::Bin(name) => {
            cmd.arg("--bin").arg(name);
            profile_dir.join(name)
        }
        Target::Example(name) => {
            cmd.arg("--example").arg(name);
            profile_dir.join("examples").join(name)
        }
    };
    let out = cmd.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "cargo build -p {package} {target:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    if !path.is_file() {
        return Err(std::io::Error::other(format!(
            "cargo built {target:?} of {package}, but {} is not there",
            path.display()
        )));
    }
    Ok(path)
}
