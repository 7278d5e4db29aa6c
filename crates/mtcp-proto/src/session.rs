//! A server session's input: what each frame from the agent does to its connection. The session
//! reader (`crates/mtcp/src/session_io.rs`, `reader_loop`) is the I/O driver: it reads a frame,
//! calls [`on_frame`] under the connection's lock, and carries out the [`Reaction`] (wakers,
//! timers, the phase change, the end of the session).

use crate::phase::{Phase, PhaseEvent};
use crate::stream::ServerStream;
use crate::wire::{Frame, Msg};

/// Why a session stops reading while its connection stays here: it detaches, and the agent may
/// come back with another session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Detach {
    /// Upstream data the connection cannot take.
    #[error("{0}")]
    Input(&'static str),
    /// An end of input that does not match what arrived.
    #[error("{0}")]
    Fin(String),
    /// The agent said LEAVING: it moves the connection elsewhere.
    #[error("the agent moves the connection elsewhere")]
    Leaving,
    /// A message that has no place in a session.
    #[error("unexpected {0} in a session")]
    Unexpected(&'static str),
}

/// What the session does after a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Then {
    /// Go on reading.
    Read,
    /// Apply `event` to the connection's phase. When it changes the phase — or in any case
    /// when `ends` — the session ends in order (the connection closed).
    Apply { event: PhaseEvent, ends: bool },
    /// Stop reading; the connection stays, detached.
    Detach(Detach),
}

/// What one frame asks of the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reaction {
    /// Upstream payload bytes the frame carried (for the metrics).
    pub up_bytes: usize,
    /// The agent sent input: a parked heartbeat timer runs again.
    pub heard: bool,
    /// The application's pending read may go on.
    pub wake_reader: bool,
    /// The acknowledged offset moved: the wait for an ACK is over.
    pub acked: bool,
    /// The application's pending write may go on (the ACK made room under the bound).
    pub wake_writer: bool,
    /// Send this to the agent.
    pub reply: Option<Msg>,
    /// Fast path: look at the client's socket again.
    pub kick: bool,
    /// Eager mode: a snapshot may be due for the backups (after an ACK that closed nothing).
    pub replicate: bool,
    pub then: Then,
}

impl Reaction {
    fn read() -> Self {
        Reaction {
            up_bytes: 0,
            heard: false,
            wake_reader: false,
            acked: false,
            wake_writer: false,
            reply: None,
            kick: false,
            replicate: false,
            then: Then::Read,
        }
    }

    fn detach(d: Detach) -> Self {
        Reaction {
            then: Then::Detach(d),
            ..Self::read()
        }
    }
}

/// Whether a frame still has a session to go to: `Some(in_order)` when the connection no
/// longer serves here, and its session ends — in order, unless the connection moved.
pub fn ended(phase: &Phase) -> Option<bool> {
    (!phase.serves()).then(|| *phase != Phase::Migrated)
}

/// What frame `f` from the agent does to a serving connection with stream `s`, `live` while
/// its application still runs ([`Phase::Live`]; otherwise it is closing, [`Phase::AppClosed`]):
/// `s` takes the input and acknowledgements, the rest is for the driver. `max_unacked` is the
/// bound on output not yet acknowledged, above which the application's writes wait.
pub fn on_frame(live: bool, s: &mut ServerStream, f: Frame, max_unacked: u64) -> Reaction {
    match f {
        Frame::Data(b) => {
            let mut r = Reaction::read();
            r.up_bytes = b.len();
            // Once the application is done, late input is dropped.
            if !live {
                return r;
            }
            if let Err(why) = s.receive(b) {
                return Reaction::detach(Detach::Input(why));
            }
            r.heard = true;
            r.wake_reader = true;
            r
        }
        Frame::Msg(Msg::Ack {
            down_recv,
            sum_from,
        }) => {
            let before = s.acked();
            s.on_ack(down_recv, sum_from);
            let mut r = Reaction::read();
            r.acked = s.acked() > before;
            r.wake_writer = r.acked && s.unacked() < max_unacked;
            r.replicate = true;
            r.then = Then::Apply {
                event: PhaseEvent::Acked {
                    acked: s.acked(),
                    out: s.out_off(),
                },
                ends: false,
            };
            r
        }
        Frame::Msg(Msg::Ping { t }) => Reaction {
            reply: Some(Msg::Pong { t }),
            ..Reaction::read()
        },
        Frame::Msg(Msg::Kick) => Reaction {
            kick: true,
            ..Reaction::read()
        },
        Frame::Msg(Msg::UpFin { up_total }) => match s.finish_input(up_total) {
            Ok(()) => Reaction {
                heard: true,
                wake_reader: true,
                ..Reaction::read()
            },
            Err(why) => Reaction {
                heard: true,
                ..Reaction::detach(Detach::Fin(why))
            },
        },
        Frame::Msg(Msg::Leaving) => Reaction::detach(Detach::Leaving),
        Frame::Msg(Msg::Close) => Reaction {
            then: Then::Apply {
                event: PhaseEvent::AgentClose,
                ends: true,
            },
            ..Reaction::read()
        },
        Frame::Msg(other) => Reaction::detach(Detach::Unexpected(other.name())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    /// A connection whose application runs, and one whose application is done.
    const LIVE: bool = true;
    const CLOSING: bool = false;

    fn data(n: usize) -> Frame {
        Frame::Data(Bytes::from(vec![1u8; n]))
    }

    /// A stream with `n` bytes of output written and none acknowledged.
    fn written(n: usize) -> ServerStream {
        let mut s = ServerStream::new();
        s.write(Bytes::from(vec![2u8; n]), u64::MAX).unwrap();
        s
    }

    #[test]
    fn input_reaches_a_live_connection_and_wakes_its_reader() {
        let mut s = ServerStream::new();
        let r = on_frame(LIVE, &mut s, data(5), 100);
        assert_eq!((r.up_bytes, r.heard, r.wake_reader), (5, true, true));
        assert_eq!(r.then, Then::Read);
        assert_eq!(s.unread(), 5);
    }

    #[test]
    fn input_after_the_application_closed_is_counted_and_dropped() {
        let mut s = ServerStream::new();
        let r = on_frame(CLOSING, &mut s, data(5), 100);
        assert_eq!((r.up_bytes, r.heard, r.wake_reader), (5, false, false));
        assert_eq!(r.then, Then::Read);
        assert_eq!(s.up_recv(), 0);
    }

    #[test]
    fn input_after_the_end_of_input_detaches_the_session() {
        let mut s = ServerStream::new();
        let r = on_frame(LIVE, &mut s, Frame::Msg(Msg::UpFin { up_total: 0 }), 9);
        assert_eq!((r.heard, r.wake_reader, r.then), (true, true, Then::Read));
        let r = on_frame(LIVE, &mut s, data(1), 9);
        assert_eq!(
            r.then,
            Then::Detach(Detach::Input("data after end of input"))
        );
        assert!(!r.wake_reader);
    }

    #[test]
    fn an_end_of_input_that_does_not_match_detaches_the_session() {
        let mut s = ServerStream::new();
        on_frame(LIVE, &mut s, data(3), 9);
        let r = on_frame(LIVE, &mut s, Frame::Msg(Msg::UpFin { up_total: 4 }), 9);
        let Then::Detach(d) = &r.then else {
            panic!("{r:?}")
        };
        assert_eq!(d.to_string(), "end of input at 4 but 3 bytes arrived");
        assert!(r.heard && !r.wake_reader);
    }

    #[test]
    fn an_ack_that_makes_room_wakes_the_writer_and_one_that_moves_nothing_does_not() {
        let mut s = written(100);
        let ack = |down_recv| {
            Frame::Msg(Msg::Ack {
                down_recv,
                sum_from: 0,
            })
        };
        // 60 still unacknowledged, bound 50: the writer keeps waiting.
        let r = on_frame(LIVE, &mut s, ack(40), 50);
        assert!(r.acked && !r.wake_writer && r.replicate);
        let ev = PhaseEvent::Acked {
            acked: 40,
            out: 100,
        };
        assert_eq!(
            r.then,
            Then::Apply {
                event: ev,
                ends: false
            }
        );
        let r = on_frame(LIVE, &mut s, ack(60), 50);
        assert!(r.acked && r.wake_writer);
        // The same ACK again, or an older one: nothing moves, nobody wakes.
        for old in [60, 10] {
            let r = on_frame(LIVE, &mut s, ack(old), 50);
            assert!(!r.acked && !r.wake_writer);
        }
        // An ACK beyond what was written counts only up to the output.
        on_frame(LIVE, &mut s, ack(1_000), 50);
        assert_eq!(s.acked(), 100);
    }

    #[test]
    fn the_last_ack_of_a_closing_connection_ends_its_session_in_order() {
        let mut s = written(10);
        let r = on_frame(
            CLOSING,
            &mut s,
            Frame::Msg(Msg::Ack {
                down_recv: 10,
                sum_from: 0,
            }),
            50,
        );
        let Then::Apply { event, ends } = r.then else {
            panic!("{r:?}")
        };
        // The phase table closes it: the driver then ends the session in order.
        assert!(!ends);
        assert_eq!(Phase::AppClosed.on(event), Some(Phase::Closed));
    }

    #[test]
    fn ping_is_answered_with_its_own_time_and_kick_looks_at_the_socket() {
        let mut s = ServerStream::new();
        let r = on_frame(LIVE, &mut s, Frame::Msg(Msg::Ping { t: 77 }), 9);
        assert_eq!(r.reply, Some(Msg::Pong { t: 77 }));
        assert_eq!((r.heard, r.then), (false, Then::Read));
        let r = on_frame(LIVE, &mut s, Frame::Msg(Msg::Kick), 9);
        assert!(r.kick && r.reply.is_none());
        assert_eq!(r.then, Then::Read);
    }

    #[test]
    fn leaving_detaches_and_close_ends_the_session_whatever_the_phase_does() {
        let mut s = ServerStream::new();
        let r = on_frame(LIVE, &mut s, Frame::Msg(Msg::Leaving), 9);
        assert_eq!(r.then, Then::Detach(Detach::Leaving));
        let r = on_frame(CLOSING, &mut s, Frame::Msg(Msg::Close), 9);
        assert_eq!(
            r.then,
            Then::Apply {
                event: PhaseEvent::AgentClose,
                ends: true
            }
        );
    }

    #[test]
    fn a_message_that_belongs_to_no_session_detaches_it_by_name() {
        let mut s = ServerStream::new();
        let r = on_frame(LIVE, &mut s, Frame::Msg(Msg::Pong { t: 1 }), 9);
        let Then::Detach(d) = r.then else {
            panic!("{r:?}")
        };
        assert_eq!(d, Detach::Unexpected("Pong"));
        assert_eq!(d.to_string(), "unexpected Pong in a session");
    }

    #[test]
    fn a_connection_that_no_longer_serves_ends_its_session_in_order_unless_it_moved() {
        assert_eq!(ended(&Phase::Live), None);
        assert_eq!(ended(&Phase::AppClosed), None);
        assert_eq!(ended(&Phase::Closed), Some(true));
        assert_eq!(ended(&Phase::Aborted("x".into())), Some(true));
        assert_eq!(ended(&Phase::Migrated), Some(false));
    }
}
