//! Clusters of real M-TCP processes, started from the `mtcp` binary, for the end-to-end tests,
//! the benchmarks and the demo: on loopback (`local`), in the network lab (`labcluster`), with
//! a throwaway PostgreSQL (`pglocal`); and a small HTTP client that hashes what it downloads
//! (`client`).

pub mod client;
pub mod labcluster;
pub mod local;
pub mod pglocal;
