//! Migratory TCP runtime (tokio): the server side of M-TCP and the state API applications use.
//!
//! A [`Server`] accepts connections that are either new or migrated here ([`Start`]); each
//! [`Connection`] is `AsyncRead + AsyncWrite`, and exports restart points with
//! [`Connection::set_state`]. Another server of the cluster fetches the connection's state over
//! the authenticated peer channel when the client's agent moves it.

mod accept;
mod admission;
pub mod app;
pub mod config;
pub mod conn;
mod conn_state;
mod custody;
pub(crate) mod direct;
mod direct_state;
mod eager;
pub mod framed;
mod gate;
mod handed;
pub mod handoff;
pub mod hedged;
pub mod memory;
pub mod metrics;
pub mod movetrace;
mod origin;
pub mod peer;
mod peer_pool;
mod peer_serve;
mod probe;
mod registry;
mod replica;
pub mod server;
mod session;
mod session_io;
mod slots;
mod sockowner;
pub mod sockread;
pub mod stream;
mod takeover;
pub mod tcpopt;
pub mod tls;
mod watch;

pub use app::App;
pub use config::{Cluster, Limits, ServerEntry};
pub use conn::{is_migrated, Connection, SoftGuard, Start, StateError, StateGuard};
pub use mtcp_proto as proto;
pub use server::{BindError, Server};
