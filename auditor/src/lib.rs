//! The auditor's pipeline as a library, so the daemon, the tests and the benchmarks share it.
//!
//! Data flow: kernel (`auditor-ebpf`) → ring buffer ([`capture`]) → per-connection streams and
//! request/reply correlation ([`session`]) → RESP parsing ([`resp`]) → classification ([`commands`]) →
//! filter ([`session`], by [`settings`]) → [`record`] → bounded queue ([`delivery`]) → [`format`] →
//! [`sink`] (file, syslog, TCP; chosen by [`sinkset`]).
//! The core (`resp`, `commands`, `format`, `session`, `settings`) is pure; I/O lives in `capture`,
//! `procscan`, `serverquery`, `control`, `delivery` and `sink`.

pub mod argv;
pub mod btf;
pub mod capture;
pub mod clock;
pub mod commands;
pub mod control;
pub mod delivery;
pub mod filter;
pub mod format;
pub mod metrics;
pub mod privileges;
pub mod procscan;
pub mod prometheus;
pub mod record;
pub mod resp;
pub mod ring;
pub mod scheduling;
pub mod serverquery;
pub mod session;
pub mod settings;
pub mod sink;
pub mod sinkset;
pub mod targets;
#[cfg(test)]
mod test_support;
