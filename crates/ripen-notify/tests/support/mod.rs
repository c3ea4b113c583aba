//! What the email tests run for real: a private SMTP server
//! (`smtp_sink.py` on aiosmtpd) that records every message it accepts, and
//! the certificates its TLS modes present.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How the sink protects its connections.
pub enum SinkTls<'a> {
    Plain,
    /// STARTTLS offered and required before MAIL.
    Starttls(&'a Certs),
    /// TLS from the first byte.
    Smtps(&'a Certs),
}

#[derive(Default)]
pub struct SinkOptions {
    /// A user and password that AUTH must give (over TLS only).
    pub auth: Option<(String, String)>,
    /// The reply to every RCPT TO, e.g. "550 5.1.1 no such user".
    pub rcpt_reply: Option<String>,
    /// The reply to every DATA, e.g. "451 4.3.0 try later".
    pub data_reply: Option<String>,
}

/// A running sink; stopped when dropped (and, through its standard input,
/// when the test process dies).
pub struct SmtpSink {
    child: Child,
    stdin: Option<ChildStdin>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl SmtpSink {
    pub fn start(tls: SinkTls, opts: SinkOptions) -> SmtpSink {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let out = dir.path().join("out");
        std::fs::create_dir(&out).expect("the sink's output directory");
        let log = std::fs::File::create(dir.path().join("sink.log")).expect("the sink's log");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/smtp_sink.py");
        let mut cmd = Command::new(python());
        cmd.arg(&script).arg("--out").arg(&out);
        match tls {
            SinkTls::Plain => {}
            SinkTls::Starttls(certs) => {
                cmd.arg("--starttls").arg(&certs.cert).arg(&certs.key);
            }
            SinkTls::Smtps(certs) => {
                cmd.arg("--smtps").arg(&certs.cert).arg(&certs.key);
            }
        }
        if let Some((user, password)) = &opts.auth {
            cmd.arg("--auth").arg(format!("{user}:{password}"));
        }
        if let Some(reply) = &opts.rcpt_reply {
            cmd.arg("--rcpt-reply").arg(reply);
        }
        if let Some(reply) = &opts.data_reply {
            cmd.arg("--data-reply").arg(reply);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("python3 starts");
        let stdout = child.stdout.take().expect("the sink's stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_default();
        let Some(port) = line
            .trim()
            .strip_prefix("ready ")
            .and_then(|p| p.parse().ok())
        else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the SMTP sink did not start (it printed {line:?}); its log:\n{}",
                std::fs::read_to_string(dir.path().join("sink.log")).unwrap_or_default()
            );
        };
        let stdin = child.stdin.take();
        SmtpSink {
            child,
            stdin,
            port,
            dir,
        }
    }

    /// Every message accepted so far, in order, as the sink recorded it.
    pub fn received(&self) -> Vec<serde_json::Value> {
        let out = self.dir.path().join("out");
        let mut names: Vec<PathBuf> = std::fs::read_dir(&out)
            .expect("the sink's output directory")
            .map(|e| e.expect("a directory entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        names.sort();
        names
            .iter()
            .map(|p| {
                serde_json::from_slice(&std::fs::read(p).expect("a recorded message"))
                    .expect("the sink writes JSON")
            })
            .collect()
    }

    /// The sink's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sink.log")).unwrap_or_default()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Python 3 that has aiosmtpd: the one on `PATH`, or Debian's.
fn python() -> PathBuf {
    let candidates = ["python3", "/usr/bin/python3"];
    for candidate in candidates {
        let found = Command::new(candidate)
            .args(["-c", "import aiosmtpd"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if found {
            return PathBuf::from(candidate);
        }
    }
    panic!(
        "no Python 3 with aiosmtpd (tried {candidates:?}): the email tests send to a private \
         SMTP server on it; run scripts/test, which installs python3-aiosmtpd"
    );
}

/// A CA and a server certificate it signed for `localhost` and 127.0.0.1,
/// as PEM files.
pub struct Certs {
    _dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Certs {
    pub fn new() -> Certs {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let dir = tempfile::tempdir().expect("a temporary directory");
        let ca_key = KeyPair::generate().expect("a CA key");
        let mut ca_params = CertificateParams::new(Vec::new()).expect("CA parameters");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Ripen test CA");
        let ca = ca_params.self_signed(&ca_key).expect("a CA certificate");
        let key = KeyPair::generate().expect("a server key");
        let params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .expect("server parameters");
        let cert = params
            .signed_by(&key, &ca, &ca_key)
            .expect("a server certificate");
        let write = |name: &str, text: String| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("a certificate file");
            path
        };
        Certs {
            ca: write("ca.pem", ca.pem()),
            cert: write("cert.pem", cert.pem()),
            key: write("key.pem", key.serialize_pem()),
            _dir: dir,
        }
    }
}
