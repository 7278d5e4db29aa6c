//! The `mtcp` command's building blocks: a local cluster of processes (used by the demo, the
//! benchmarks and the end-to-end tests), a small HTTP client, the demo and the benchmarks.

pub mod apps;
pub mod bench;
pub mod cert;
pub mod chaos;
pub mod client;
pub mod demo;
pub mod lab;
pub mod labbench;
pub mod labcluster;
pub mod local;
pub mod metrics;
pub mod pgbench;
pub mod pgdemo;
pub mod pglocal;
pub mod plot;
pub mod relays;
pub mod scalebench;
