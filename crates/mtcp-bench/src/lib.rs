//! `mtcp bench` and `mtcp chaos`: every benchmark measures its baseline in the same run and
//! reports ratios to it (`bench`, with the lab's in `labbench`, many idle connections in
//! `scalebench`, PostgreSQL in `pgbench`, the user-space relays compared in `relays`, SVG
//! plots in `plot`); `chaos` runs seeded faults against a cluster and checks every byte.

pub mod args;
pub mod bench;
pub mod breakdown;
pub mod chaos;
pub mod labbench;
pub mod pgbench;
pub mod plot;
pub mod relays;
pub mod scalebench;
pub mod stats;
