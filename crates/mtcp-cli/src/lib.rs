//! The `mtcp` command's building blocks: `mtcp server` with its applications and metrics
//! endpoint, the demos, the lab command, certificates, and the process set-up. The clusters of
//! processes they start are `mtcp-harness`'s; the benchmarks and the chaos runner are
//! `mtcp-bench`.

pub mod apps;
pub mod cert;
pub mod demo;
pub mod lab;
pub mod metrics;
pub mod pgdemo;
pub mod process;
pub mod server;
