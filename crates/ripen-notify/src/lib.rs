//! Ripen's outgoing notifications.
//!
//! Everything here talks to the world outside the pipeline: webhook
//! receivers and mail servers. The dispatcher in `ripen-engine` reads the
//! outbox and decides what to send and when; this crate knows how to send
//! it safely.

pub mod client;
pub mod email;
pub mod seal;
pub mod ssrf;
pub mod webhook;
