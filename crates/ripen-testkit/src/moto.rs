//! A private, throwaway S3-compatible server: moto's `moto_server` (PyPI
//! `moto[server]`), from the virtual environment `scripts/test` makes
//! (beside `RIPEN_TEST_PYTHON`), or else from `PATH`.
//!
//! [`MotoServer::start`] runs it on a free loopback port and makes one
//! bucket. moto keeps everything in memory: [`MotoServer::stop`] and
//! [`MotoServer::start_again`] make an outage that loses every object; put
//! a [`crate::TcpGate`] in front of it for an outage that keeps them.
//! `Drop` stops it, and a detached watchdog stops it once the test process
//! is gone.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::redis::{free_port, spawn_watchdog};

/// Credentials moto accepts (it accepts any).
pub const MOTO_KEY_ID: &str = "test";
pub const MOTO_SECRET: &str = "test";
/// How long a start may take until the bucket is made.
const START_PATIENCE: Duration = Duration::from_secs(60);

pub struct MotoServer {
    program: PathBuf,
    port: u16,
    bucket: String,
    child: Option<Child>,
    watchdog: Option<Child>,
}

impl std::fmt::Debug for MotoServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MotoServer")
            .field("port", &self.port)
            .field("bucket", &self.bucket)
            .finish_non_exhaustive()
    }
}

/// Where `moto_server` is: beside `RIPEN_TEST_PYTHON`, or on `PATH`. A test
/// that needs it and finds none fails, saying how to get it.
pub fn moto_program() -> PathBuf {
    let how = "run scripts/test, which installs moto[server] in target/test-venv and sets RIPEN_TEST_PYTHON, or put moto_server on PATH";
    if let Some(python) = std::env::var_os("RIPEN_TEST_PYTHON") {
        let python = PathBuf::from(python);
        let program = python.with_file_name("moto_server");
        assert!(
            program.is_file(),
            "RIPEN_TEST_PYTHON is {}, but there is no {}: {how}",
            python.display(),
            program.display()
        );
        return program;
    }
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("moto_server"))
                .find(|program| program.is_file())
        })
        .unwrap_or_else(|| panic!("the S3 tests need moto_server, and none was found: {how}"))
}

impl MotoServer {
    /// A server of this test's own with `bucket` made.
    pub fn start(bucket: &str) -> MotoServer {
        let mut moto = MotoServer {
            program: moto_program(),
            port: free_port(),
            bucket: bucket.to_owned(),
            child: None,
            watchdog: None,
        };
        moto.start_again();
        moto
    }

    /// `http://127.0.0.1:{port}`: the `endpoint` of a client.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Starts the server (again) on its port and makes the bucket: a
    /// restarted moto is empty.
    pub fn start_again(&mut self) {
        self.stop();
        let child = Command::new(&self.program)
            .args(["-p", &self.port.to_string(), "-H", "127.0.0.1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.program.display()));
        self.watchdog = Some(spawn_watchdog(child.id()));
        self.child = Some(child);
        let deadline = Instant::now() + START_PATIENCE;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("moto_server on port {} ended: {status}", self.port);
            }
            // Making the bucket is the readiness check too.
            match self.http("PUT", &format!("/{}", self.bucket)) {
                Some(200) => return,
                _ if Instant::now() > deadline => panic!(
                    "moto_server on port {} did not answer in {START_PATIENCE:?}",
                    self.port
                ),
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Kills the server: every object is gone with it.
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

    /// The status of a bodiless request, if the server answered.
    pub fn http(&self, method: &str, path: &str) -> Option<u16> {
        self.request(method, path).map(|(status, _)| status)
    }

    /// The keys of the bucket's objects under `prefix`, read with an
    /// unsigned listing (moto serves it).
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let path = format!("/{}?list-type=2&prefix={prefix}", self.bucket);
        let Some((200, body)) = self.request("GET", &path) else {
            panic!("list the bucket {} of moto", self.bucket);
        };
        body.split("<Key>")
            .skip(1)
            .filter_map(|rest| rest.split("</Key>").next())
            .map(str::to_owned)
            .collect()
    }

    /// Status and body of a bodiless request, if the server answered.
    fn request(&self, method: &str, path: &str) -> Option<(u16, String)> {
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .ok()?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).ok()?;
        let status = answer.split(' ').nth(1)?.parse().ok()?;
        let body = answer
            .split_once("\r\n\r\n")
            .map_or(String::new(), |(_, b)| b.to_owned());
        Some((status, body))
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        self.stop();
    }
}
