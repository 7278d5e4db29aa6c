//! Sans-IO core of Migratory TCP (M-TCP).
//!
//! No sockets, no async runtime, no clock: time comes in as an argument. This crate holds
//! everything that can be decided without I/O — the wire messages and their codecs, tokens and
//! the peer-channel handshake and per-frame MACs, the state record that moves between servers, the byte-offset
//! bookkeeping of both ends (upstream retention at the agent, the output log and replay
//! verification at the server), the agent's liveness trigger and the trigger policies
//! (throughput floor, RTT, server overload).

pub mod admin;
pub mod adopt;
pub mod agent;
pub mod answers;
pub mod auth;
pub mod bounds;
pub mod channel;
pub mod commit;
pub mod custody;
pub mod drain;
pub mod freeze;
pub mod handshake;
pub mod hello;
pub mod offsets;
pub mod peering;
pub mod phase;
pub mod policy;
pub mod probe;
pub mod push;
pub mod record;
pub mod refusal;
pub mod replica;
pub mod session;
pub mod stream;
pub mod sum;
pub mod takeover;
pub mod timing;
pub mod trigger;
pub mod watch;
pub mod wire;

pub use auth::{ChannelContext, Cid, ClusterKey, PortKind, Role, Token};
pub use channel::ChannelMac;
pub use record::StateRecord;
pub use wire::{Frame, FrameDecoder, Msg};

/// Version of the wire protocol and of the state record. Bumped on any incompatible change.
pub const PROTOCOL_VERSION: u16 = 9;
