//! A private, throwaway PostgreSQL cluster.
//!
//! [`PgCluster::start`] runs `initdb` into a fresh temp directory and starts a
//! postmaster on a free loopback port with durable settings (`fsync=on`,
//! `synchronous_commit=on`), so that tests exercise the same durability as
//! production. Each test binary usually shares one cluster
//! ([`PgCluster::shared`]) and gives every test its own database
//! ([`PgCluster::create_database`]). The server writes its log to one file
//! ([`PgCluster::log_file`]) with the logging collector off, so that a test
//! can read what the server reported, such as a detected deadlock.
//!
//! No postmaster outlives the test process: `Drop` stops the cluster, and a
//! detached watchdog shell stops it and removes its directory once the test
//! process is gone, even after a panic or `SIGKILL` (statics such as the
//! shared cluster are never dropped, so the watchdog is what cleans them up).
//!
//! [`PgCluster::start_tls`] starts one with `ssl = on` and a given server
//! certificate, for the tests of TLS to PostgreSQL.
//!
//! `initdb` refuses to run as root. As root, the PostgreSQL binaries run as
//! the `postgres` OS user (created by the Debian package), or as a system
//! user `ripen-pg` created on demand, through `runuser` (or `su`).

use std::ffi::CString;
use std::fs;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The PostgreSQL superuser of every test cluster.
pub const SUPERUSER: &str = "postgres";
/// Where Debian's `postgresql-15` package puts its binaries.
const PREFERRED_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";
/// Where Debian puts every installed PostgreSQL version.
const VERSIONS_DIR: &str = "/usr/lib/postgresql";
/// The OS user created to run PostgreSQL as root when `postgres` is missing.
const FALLBACK_OS_USER: &str = "ripen-pg";
/// Connections the test server accepts: many stores with small pools.
const MAX_CONNECTIONS: u32 = 300;
/// How long `pg_ctl` waits for the server to start or stop, in seconds.
const PG_CTL_WAIT_S: u32 = 60;
/// Tries to start on a free port; another process may take the port first.
const START_TRIES: u32 = 3;
/// Tries to create a database; concurrent creations may collide.
const CREATE_DB_TRIES: u32 = 5;

static SHARED: OnceLock<PgCluster> = OnceLock::new();
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// A PostgreSQL cluster owned by this test process. See the crate documentation.
pub struct PgCluster {
    bin_dir: PathBuf,
    /// The temp directory: the data directory, the socket and the log live here.
    dir: PathBuf,
    data_dir: PathBuf,
    log_file: PathBuf,
    port: u16,
    /// The OS user that runs the PostgreSQL binaries, when we are root.
    run_as: Option<String>,
    /// Stops the cluster once this process is gone; killed by `Drop`.
    watchdog: Mutex<Option<Child>>,
}

impl std::fmt::Debug for PgCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgCluster")
            .field("dir", &self.dir)
            .field("port", &self.port)
            .field("run_as", &self.run_as)
            .finish_non_exhaustive()
    }
}

impl PgCluster {
    /// Creates and starts a fresh cluster. Panics when PostgreSQL is not
    /// installed or does not start: a test that needs it must not pass
    /// without it.
    pub fn start() -> PgCluster {
        PgCluster::start_with(None)
    }

    /// Like [`PgCluster::start`], with `ssl = on` and the server presenting
    /// `cert_pem` (its certificate, then any intermediates) with `key_pem`.
    /// Clients may still connect without TLS.
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> PgCluster {
        PgCluster::start_with(Some((cert_pem, key_pem)))
    }

    fn start_with(tls: Option<(&str, &str)>) -> PgCluster {
        let bin_dir = find_bin_dir().unwrap_or_else(|| {
            panic!("PostgreSQL is not installed: run scripts/test, which installs it with apt-get")
        });
        let run_as = is_root().then(os_user_for_postgres);
        let dir = make_temp_dir();
        if let Some(user) = &run_as {
            chown_to(&dir, user);
        }
        let mut cluster = PgCluster {
            bin_dir,
            data_dir: dir.join("data"),
            log_file: dir.join("postgres.log"),
            dir,
            port: 0,
            run_as,
            watchdog: Mutex::new(None),
        };
        // Arm the watchdog first, so that even a failure below cleans up.
        cluster.spawn_watchdog();
        let data_dir = cluster.data_dir.to_string_lossy().into_owned();
        let initdb = cluster
            .pg_command(
                "initdb",
                &[
                    "-D",
                    &data_dir,
                    "-U",
                    SUPERUSER,
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    // Only initdb's own files skip fsync; the server runs with fsync=on.
                    "--no-sync",
                ],
            )
            .output();
        cluster.check("initdb", initdb);
        if let Some((cert, key)) = tls {
            cluster.enable_ssl(cert, key);
        }

        let mut last_failure = String::new();
        for _ in 0..START_TRIES {
            cluster.port = free_port();
            let started = cluster.pg_ctl_start("start", &[]).output();
            match started {
                Ok(out) if out.status.success() => return cluster,
                Ok(out) => last_failure = describe_output(&out),
                Err(e) => last_failure = format!("run pg_ctl: {e}"),
            }
        }
        panic!(
            "start PostgreSQL in {}: {last_failure}\n{}",
            cluster.dir.display(),
            cluster.log_tail()
        );
    }

    /// One cluster for the whole test binary, started on first use.
    pub fn shared() -> &'static PgCluster {
        SHARED.get_or_init(PgCluster::start)
    }

    /// Writes the server's certificate and key into the data directory (the
    /// key readable by the server's OS user only, as PostgreSQL demands) and
    /// turns `ssl` on.
    fn enable_ssl(&self, cert_pem: &str, key_pem: &str) {
        use std::os::unix::fs::PermissionsExt;
        let cert = self.data_dir.join("server.crt");
        let key = self.data_dir.join("server.key");
        let write = |path: &Path, text: &str, mode: u32| {
            fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
            fs::set_permissions(path, fs::Permissions::from_mode(mode))
                .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
            if let Some(user) = &self.run_as {
                chown_to(path, user);
            }
        };
        write(&cert, cert_pem, 0o644);
        write(&key, key_pem, 0o600);
        let conf = self.data_dir.join("postgresql.conf");
        let mut text =
            fs::read_to_string(&conf).unwrap_or_else(|e| panic!("read {}: {e}", conf.display()));
        text.push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        fs::write(&conf, text).unwrap_or_else(|e| panic!("write {}: {e}", conf.display()));
    }

    /// Creates a fresh, uniquely named database and returns its URL.
    pub fn create_database(&self) -> String {
        let name = format!(
            "ripen_{}_{}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        );
        let mut last_failure = String::new();
        for attempt in 0..CREATE_DB_TRIES {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(200 * u64::from(attempt)));
            }
            let created = self
                .client_command("createdb")
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args(["-U", SUPERUSER, &name])
                .output();
            match created {
                Ok(out) if out.status.success() => return self.url(&name),
                Ok(out) => last_failure = describe_output(&out),
                Err(e) => last_failure = format!("run createdb: {e}"),
            }
        }
        panic!(
            "create database {name}: {last_failure}\n{}",
            self.log_tail()
        );
    }

    /// Crashes the server (`pg_ctl restart -m immediate`) and waits until it
    /// accepts connections again: every open connection breaks, nothing
    /// committed is lost.
    pub fn restart_immediate(&self) {
        let out = self.pg_ctl_start("restart", &["-m", "immediate"]).output();
        self.check("pg_ctl restart", out);
    }

    /// Stops the server (fast shutdown: clients are disconnected at once).
    pub fn stop(&self) {
        let out = self.pg_ctl(&["stop", "-m", "fast", "-w"]).output();
        self.check("pg_ctl stop", out);
    }

    /// Starts the server again after [`PgCluster::stop`], on the same port.
    pub fn start_again(&self) {
        let out = self.pg_ctl_start("start", &[]).output();
        self.check("pg_ctl start", out);
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `db` on this cluster.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{db}", self.port)
    }

    /// The temp directory holding the data directory and the server log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The server's log (`pg_ctl -l`): every start appends to it.
    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    /// The whole server log so far; empty if it cannot be read.
    pub fn log(&self) -> String {
        fs::read(&self.log_file)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// `pg_ctl start` or `pg_ctl restart` with the server options.
    fn pg_ctl_start(&self, action: &str, extra: &[&str]) -> Command {
        let options = format!(
            "-p {port} -k {socket_dir} -c listen_addresses=127.0.0.1 \
             -c max_connections={MAX_CONNECTIONS} -c fsync=on -c synchronous_commit=on \
             -c logging_collector=off",
            port = self.port,
            socket_dir = shell_quote(&self.dir.to_string_lossy()),
        );
        let log_file = self.log_file.to_string_lossy().into_owned();
        let wait_s = PG_CTL_WAIT_S.to_string();
        let mut args = vec![action];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["-l", &log_file, "-w", "-t", &wait_s, "-o", &options]);
        self.pg_ctl(&args)
    }

    /// `pg_ctl -D <data dir> ARGS...`.
    fn pg_ctl(&self, args: &[&str]) -> Command {
        let data_dir = self.data_dir.to_string_lossy().into_owned();
        let mut all = vec!["-D", &data_dir];
        all.extend_from_slice(args);
        self.pg_command("pg_ctl", &all)
    }

    /// A server-side binary, run as the PostgreSQL OS user when we are root.
    fn pg_command(&self, program: &str, args: &[&str]) -> Command {
        let program = self.bin_dir.join(program);
        let mut cmd = match &self.run_as {
            None => {
                let mut cmd = Command::new(&program);
                cmd.args(args);
                cmd
            }
            Some(user) => as_user(user, &program, args),
        };
        // The OS user may not be able to enter the test's working directory.
        cmd.current_dir(&self.dir).stdin(Stdio::null());
        clear_pg_env(&mut cmd);
        cmd
    }

    /// A client binary, run as ourselves.
    fn client_command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin_dir.join(program));
        cmd.stdin(Stdio::null());
        clear_pg_env(&mut cmd);
        cmd
    }

    fn check(&self, what: &str, out: std::io::Result<Output>) {
        match out {
            Ok(out) if out.status.success() => {}
            Ok(out) => panic!(
                "{what} failed in {}: {}\n{}",
                self.dir.display(),
                describe_output(&out),
                self.log_tail()
            ),
            Err(e) => panic!("run {what}: {e}"),
        }
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(&self.log_file).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        format!("--- server log (last lines) ---\n{tail}")
    }

    /// A detached shell that waits for this process to end, then stops the
    /// server and removes its directory. It runs in its own process group,
    /// so that a Ctrl-C aimed at the test run does not kill it first.
    fn spawn_watchdog(&self) {
        let stop = self.stop_script();
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop} >/dev/null 2>&1; rm -rf {dir}",
            pid = std::process::id(),
            dir = shell_quote(&self.dir.to_string_lossy()),
        );
        let child = Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn the PostgreSQL watchdog: {e}"));
        *self.watchdog.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
    }

    /// `pg_ctl stop -m immediate` as a shell command line.
    fn stop_script(&self) -> String {
        let pg_ctl = shell_quote(&self.bin_dir.join("pg_ctl").to_string_lossy());
        let data = shell_quote(&self.data_dir.to_string_lossy());
        let stop = format!("{pg_ctl} stop -D {data} -m immediate");
        match &self.run_as {
            None => stop,
            Some(user) if has_runuser() => {
                format!("runuser -u {} -- {stop}", shell_quote(user))
            }
            Some(user) => format!(
                "su {} -s /bin/sh -c {}",
                shell_quote(user),
                shell_quote(&stop)
            ),
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self
            .pg_ctl(&["stop", "-m", "immediate", "-w"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = fs::remove_dir_all(&self.dir);
        let watchdog = self
            .watchdog
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(mut child) = watchdog {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn find_bin_dir() -> Option<PathBuf> {
    let has_initdb = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    let preferred = PathBuf::from(PREFERRED_BIN_DIR);
    if has_initdb(&preferred) {
        return Some(preferred);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        if out.status.success() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if has_initdb(&dir) {
                return Some(dir);
            }
        }
    }
    // The newest version installed.
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir(VERSIONS_DIR)
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            has_initdb(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The OS user that runs PostgreSQL when we are root: `postgres` if the
/// package created it, else a system user created now.
fn os_user_for_postgres() -> String {
    if lookup_user(SUPERUSER).is_some() {
        return SUPERUSER.to_owned();
    }
    if lookup_user(FALLBACK_OS_USER).is_none() {
        let out = Command::new("useradd")
            .args(["--system", "--no-create-home", FALLBACK_OS_USER])
            .output();
        match out {
            Ok(out) if out.status.success() => {}
            // Another test process may have created it meanwhile.
            _ if lookup_user(FALLBACK_OS_USER).is_some() => {}
            Ok(out) => panic!(
                "create the OS user {FALLBACK_OS_USER} to run PostgreSQL: {}",
                describe_output(&out)
            ),
            Err(e) => panic!("run useradd to create {FALLBACK_OS_USER}: {e}"),
        }
    }
    FALLBACK_OS_USER.to_owned()
}

/// The uid and gid of an OS user.
fn lookup_user(name: &str) -> Option<(libc::uid_t, libc::gid_t)> {
    let c_name = CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: `passwd` is plain old data; getpwnam_r fills it and points its
    // strings into `buf`, which outlives every use below.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the duration of the call and
    // `buf.len()` is the size of `buf`.
    let rc = unsafe {
        libc::getpwnam_r(
            c_name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    (rc == 0 && !found.is_null()).then_some((pwd.pw_uid, pwd.pw_gid))
}

fn chown_to(dir: &Path, user: &str) {
    let (uid, gid) =
        lookup_user(user).unwrap_or_else(|| panic!("the OS user {user} does not exist"));
    let path = CString::new(dir.to_string_lossy().as_bytes())
        .unwrap_or_else(|_| panic!("temp dir path {} contains NUL", dir.display()));
    // SAFETY: `path` is a valid NUL-terminated string.
    let rc = unsafe { libc::chown(path.as_ptr(), uid, gid) };
    if rc != 0 {
        panic!(
            "chown {} to {user}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        );
    }
}

fn make_temp_dir() -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    for n in 0..100u32 {
        let dir = std::env::temp_dir().join(format!(
            "ripen-pg-{}-{}-{nanos:x}-{n}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        ));
        match fs::create_dir(&dir) {
            Ok(()) => return dir,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => panic!("create a temp dir for PostgreSQL at {}: {e}", dir.display()),
        }
    }
    panic!("create a temp dir for PostgreSQL: every name is taken");
}

/// A port that was free a moment ago on 127.0.0.1.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("find a free port on 127.0.0.1: {e}"))
}

fn in_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join(program).is_file()))
        .unwrap_or(false)
}

/// `program ARGS...` run as `user`: `runuser -u USER -- program ARGS...`,
/// or `su` where `runuser` is missing.
fn as_user(user: &str, program: &Path, args: &[&str]) -> Command {
    as_user_with(user, program, args, has_runuser())
}

fn has_runuser() -> bool {
    Path::new("/usr/sbin/runuser").exists() || in_path("runuser")
}

fn as_user_with(user: &str, program: &Path, args: &[&str], runuser: bool) -> Command {
    if runuser {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", user, "--"]).arg(program).args(args);
        return cmd;
    }
    // su runs one shell command line, so the arguments are quoted into it.
    let mut line = format!("exec {}", shell_quote(&program.to_string_lossy()));
    for arg in args {
        line.push(' ');
        line.push_str(&shell_quote(arg));
    }
    let mut cmd = Command::new("su");
    cmd.args([user, "-s", "/bin/sh", "-c", &line]);
    cmd
}

/// Keeps the caller's PG* variables from steering the binaries elsewhere.
fn clear_pg_env(cmd: &mut Command) {
    for var in [
        "PGHOST",
        "PGHOSTADDR",
        "PGPORT",
        "PGDATA",
        "PGUSER",
        "PGDATABASE",
        "PGOPTIONS",
        "PGPASSWORD",
        "PGSERVICE",
    ] {
        cmd.env_remove(var);
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn describe_output(out: &Output) -> String {
    format!(
        "{}; stdout: {}; stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_starts_serves_and_cleans_up() {
        let cluster = PgCluster::start();
        let url = cluster.create_database();
        assert!(url.starts_with(&format!(
            "postgres://postgres@127.0.0.1:{}/ripen_",
            cluster.port()
        )));
        let dir = cluster.dir().to_owned();
        assert!(dir.join("data").join("PG_VERSION").is_file());
        assert!(
            cluster.log().contains("database system is ready"),
            "the server log is in {}",
            cluster.log_file().display()
        );
        cluster.restart_immediate();
        cluster.stop();
        cluster.start_again();
        cluster.create_database();
        drop(cluster);
        assert!(!dir.exists(), "dropping the cluster removes its directory");
    }

    #[test]
    fn both_ways_of_switching_user_pass_arguments_through() {
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        if !is_root() {
            // Switching users needs root; only the command shape can be checked.
            let cmd = as_user_with("nobody", Path::new("/bin/echo"), &["x"], false);
            assert_eq!(cmd.get_program(), "su");
            return;
        }
        let user = os_user_for_postgres();
        for runuser in [true, false] {
            if runuser && !has_runuser() {
                continue;
            }
            let script = r#"printf '%s|' "$@"; id -un"#;
            let args = ["-c", script, "sh", "a b", "it's"];
            let out = as_user_with(&user, Path::new("/bin/sh"), &args, runuser)
                .current_dir("/")
                .output()
                .expect("run as the PostgreSQL OS user");
            assert!(out.status.success(), "{}", describe_output(&out));
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                format!("a b|it's|{user}\n"),
                "runuser: {runuser}"
            );
        }
    }
}
