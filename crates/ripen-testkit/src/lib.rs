//! Support for everything that drives a real Ripen server from outside: the
//! end-to-end tests, `ripen demo` and `ripen bench`.
//!
//! - [`ServerProcess`] runs `ripen serve` as a child process and signals,
//!   restarts and finally kills it;
//! - [`Downstream`] is a fake downstream service that scripts, records and
//!   checks the step calls;
//! - [`Config`] writes a `ripen.toml` with its schema files;
//! - [`TempDir`] is a temporary directory removed on drop;
//! - [`PgCluster`] is a private, throwaway PostgreSQL cluster for the tests
//!   that need one (with TLS on, if asked);
//! - [`tls`] builds the server side of TLS for the fake downstream
//!   ([`Downstream::start_tls`]) from PEM text;
//! - [`RedisServer`] is a private, throwaway Redis server that can be
//!   stopped and started again;
//! - [`MotoServer`] is a private, throwaway S3-compatible server;
//! - [`TcpGate`] forwards to a real server and makes outages of it without
//!   stopping it;
//! - [`WorkerProcess`] runs a remote worker (such as the Rust SDK's example)
//!   as a child process, and [`workspace_binary`] builds the binaries of
//!   other packages that a test runs.

mod config;
mod downstream;
mod gate;
mod moto;
mod pg;
mod redis;
mod server;
mod tempdir;
pub mod tls;
mod worker;

pub use config::{single, sqlite_url, step_path, toml_str, w5, Config, Step, TlsFiles, TypeDef};
pub use downstream::{Behavior, Call, Downstream, Profile, Reply, Stats};
pub use gate::TcpGate;
pub use moto::{moto_program, MotoServer, MOTO_KEY_ID, MOTO_SECRET};
pub use pg::{PgCluster, SUPERUSER};
pub use redis::RedisServer;
pub use server::{cpu_ticks, tail_of_file, ServerProcess};
pub use tempdir::TempDir;
pub use worker::{workspace_binary, Target, WorkerProcess};
