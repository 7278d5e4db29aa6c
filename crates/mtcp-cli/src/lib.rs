//! The `mtcp` command's building blocks: the demos, the lab command, certificates, the server's
//! applications and its metrics endpoint. The clusters of processes they start are
//! `mtcp-harness`'s; the benchmarks and the chaos runner are `mtcp-bench`.

pub mod apps;
pub mod cert;
pub mod demo;
pub mod lab;
pub mod metrics;
pub mod pgdemo;
