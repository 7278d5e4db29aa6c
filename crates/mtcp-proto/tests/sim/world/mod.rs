//! The simulated world: a client, the agent's core, three servers and a link.

mod eager;
mod moves;

use crate::app::App;
use bytes::Bytes;
use mtcp_proto::agent::stream::{RelayStream, StreamStep};
use mtcp_proto::agent::Placement;
use mtcp_proto::custody::Custody;
use mtcp_proto::record::StateRecord;
use mtcp_proto::stream::ServerStream;
use mtcp_proto::wire::{Mode, Msg, ServerInfo, Welcome};
use mtcp_proto::{Cid, Token};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::VecDeque;

const SERVERS: [&str; 3] = ["s1", "s2", "s3"];
const NO_LIMIT: u64 = u64::MAX;
/// Steps of simulated time after which a run that has not finished fails (no run needs more
/// than a few thousand).
pub(crate) const MAX_STEPS: usize = 200_000;

/// Agent → server.
#[derive(Debug)]
enum Up {
    Data(Bytes),
    Ack { down_recv: u64, sum_from: u64 },
    Fin(u64),
}

/// Server → agent.
#[derive(Debug)]
enum Down {
    Data(Bytes),
    Msg(Msg),
}

/// What a destination got for a MIGRATE.
struct Fetched {
    rec: StateRecord,
    /// From a backup's replica.
    claimed: bool,
    /// Who keeps the state it gave out until the destination confirms (eager mode).
    keeper: Option<usize>,
}

/// The connection at one server.
struct Held {
    stream: ServerStream,
    app: App,
    /// The application read the end of input and wrote its trailer.
    finished: bool,
    /// The session is attached (an agent talks to it); a detached connection waits for a FETCH.
    attached: bool,
    /// The epoch it serves at.
    epoch: u64,
    /// Eager mode: the restart point its backup holds (`(out_off, in_off)`).
    committed: Option<(u64, u64)>,
}

impl Held {
    fn new(stream: ServerStream, app: App, epoch: u64) -> Held {
        Held {
            stream,
            app,
            finished: false,
            attached: true,
            epoch,
            committed: None,
        }
    }
}

struct Server {
    id: &'static str,
    conn: Option<Held>,
    /// Eager mode: the replica this server holds as another server's backup.
    replica: Option<StateRecord>,
    /// Crashed: down (and empty) until this step.
    down_until: Option<usize>,
    /// Eager mode: as a keeper, what it knows of a connection it handed over (or whose replica
    /// was claimed from it) that the holder has not confirmed yet, and the record it keeps.
    custody: Option<(Custody, StateRecord)>,
    /// Eager mode: the epoch a fence claimed here; pushes at or below it are refused.
    fenced: Option<u64>,
}

/// A session: both directions in order, each item delivered `delay` steps after it was sent.
struct Link {
    up: VecDeque<(usize, Up)>,
    down: VecDeque<(usize, Down)>,
    delay: usize,
}

pub(crate) struct World {
    pub(crate) rng: StdRng,
    pub(crate) now: usize,
    pub(crate) input: Vec<u8>,
    pub(crate) sent: usize,
    pub(crate) received: Vec<u8>,
    pub(crate) at: Placement,
    pub(crate) stream: RelayStream,
    servers: Vec<Server>,
    pub(crate) serving: usize,
    link: Link,
    pub(crate) moves: usize,
    pub(crate) breaks: usize,
    pub(crate) crashes: usize,
    pub(crate) fallbacks: usize,
    pub(crate) eager: bool,
    pub(crate) done: bool,
}

fn server_index(id: &str) -> usize {
    SERVERS
        .iter()
        .position(|s| *s == id)
        .expect("a known server")
}

impl World {
    pub(crate) fn new(seed: u64, eager: bool) -> World {
        let mut rng = StdRng::seed_from_u64(seed);
        let len = rng.gen_range(1..6000);
        let input: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        let first = rng.gen_range(0..SERVERS.len());
        let alternates = SERVERS
            .iter()
            .map(|s| ServerInfo {
                id: s.to_string(),
                data: format!("addr-{s}"),
            })
            .collect();
        let at = Placement::welcomed(
            Welcome {
                server: SERVERS[first].into(),
                cid: Cid([9; 16]),
                epoch: 0,
                token: Token([0; 32]),
                alternates,
                mode: if eager { Mode::Eager } else { Mode::Lazy },
                heartbeat_ms: 100,
            },
            &format!("addr-{}", SERVERS[first]),
        );
        let mut servers: Vec<Server> = SERVERS
            .iter()
            .map(|id| Server {
                id,
                conn: None,
                replica: None,
                down_until: None,
                custody: None,
                fenced: None,
            })
            .collect();
        servers[first].conn = Some(Held::new(ServerStream::new(), App::default(), 0));
        let delay = rng.gen_range(0..4);
        World {
            rng,
            now: 0,
            input,
            sent: 0,
            received: Vec::new(),
            at,
            stream: RelayStream::new(eager),
            eager,
            crashes: 0,
            fallbacks: 0,
            servers,
            serving: first,
            link: Link {
                up: VecDeque::new(),
                down: VecDeque::new(),
                delay,
            },
            moves: 0,
            breaks: 0,
            done: false,
        }
    }

    fn send_up(&mut self, m: Up) {
        self.link.up.push_back((self.now + self.link.delay, m));
    }

    /// One step of simulated time: each party acts with some probability.
    pub(crate) fn step(&mut self) -> Result<(), String> {
        self.now += 1;
        for s in &mut self.servers {
            if s.down_until.is_some_and(|t| t <= self.now) {
                s.down_until = None;
            }
        }
        let roll: f64 = self.rng.gen();
        if self.eager && roll > 0.99 && self.recoverable() {
            // The serving server crashes, with whatever it held; it comes back empty later.
            let s = &mut self.servers[self.serving];
            s.conn = None;
            s.replica = None;
            s.custody = None;
            s.fenced = None;
            s.down_until = Some(self.now + 300);
            self.link.up.clear();
            self.link.down.clear();
            self.crashes += 1;
            self.trace(format!("crash of {}", SERVERS[self.serving]));
            return self.move_connection(true);
        }
        if roll < 0.03 {
            return self.move_connection(false);
        }
        if roll < 0.045 {
            // The session breaks: what was in flight either way is lost, and the agent moves.
            self.link.up.clear();
            self.link.down.clear();
            if let Some(h) = self.servers[self.serving].conn.as_mut() {
                h.attached = false;
            }
            self.breaks += 1;
            return self.move_connection(true);
        }
        self.client_sends();
        self.deliver_up()?;
        self.server_runs()?;
        if self.eager && self.rng.gen_bool(0.3) {
            self.replicate();
        }
        self.deliver_down()
    }
    /// With `MTCP_SIM_TRACE` set, prints what happens (for a replayed seed).
    pub(super) fn trace(&self, what: String) {
        if std::env::var_os("MTCP_SIM_TRACE").is_some() {
            eprintln!("[{}] {what}", self.now);
        }
    }

    /// The client program writes a chunk (or ends its input); the agent retains and relays it.
    fn client_sends(&mut self) {
        if self.stream.client_eof() || !self.rng.gen_bool(0.3) {
            return;
        }
        if self.sent == self.input.len() {
            let fin = self.stream.on_client_eof();
            let Msg::UpFin { up_total } = fin else {
                unreachable!()
            };
            self.send_up(Up::Fin(up_total));
            return;
        }
        let n = self
            .rng
            .gen_range(1..=(self.input.len() - self.sent).min(700));
        let chunk = Bytes::copy_from_slice(&self.input[self.sent..self.sent + n]);
        self.sent += n;
        self.stream.on_upstream(chunk.clone());
        self.send_up(Up::Data(chunk));
    }

    fn deliver_up(&mut self) -> Result<(), String> {
        while self.link.up.front().is_some_and(|(t, _)| *t <= self.now) {
            let (_, m) = self.link.up.pop_front().unwrap();
            let h = self.servers[self.serving]
                .conn
                .as_mut()
                .ok_or("the serving server does not hold the connection")?;
            match m {
                Up::Data(b) => h.stream.receive(b).map_err(|e| e.to_string())?,
                Up::Ack {
                    down_recv,
                    sum_from,
                } => h.stream.on_ack(down_recv, sum_from),
                Up::Fin(total) => h.stream.finish_input(total)?,
            }
        }
        Ok(())
    }

    /// The serving server's application reads what it can, writes, and sometimes snapshots.
    fn server_runs(&mut self) -> Result<(), String> {
        let now = self.now + self.link.delay;
        let snap_now = self.rng.gen_bool(0.2);
        let want = self.rng.gen_range(1..900);
        let h = match self.servers[self.serving].conn.as_mut() {
            Some(h) if h.attached => h,
            _ => return Ok(()),
        };
        let mut out = Vec::new();
        let mut buf = vec![0u8; want];
        match h.stream.read(&mut buf) {
            None => return Ok(()),
            Some(0) if h.finished => return Ok(()),
            Some(0) => {
                h.app.finish(&mut out);
                h.finished = true;
            }
            Some(n) => h.app.feed(&buf[..n], &mut out),
        }
        let (to_send, _) = h
            .stream
            .write(Bytes::from(out), NO_LIMIT)
            .map_err(|e| format!("replay check: {e}"))?;
        if !to_send.is_empty() {
            self.link.down.push_back((now, Down::Data(to_send)));
        }
        if h.finished {
            let down_total = h.stream.out_off();
            self.link
                .down
                .push_back((now, Down::Msg(Msg::Closed { down_total })));
        } else if snap_now {
            if let Some((in_off, out_off)) = h.stream.snapshot(h.app.snapshot()) {
                self.link
                    .down
                    .push_back((now, Down::Msg(Msg::Snap { in_off, out_off })));
            }
        }
        Ok(())
    }

    /// The agent reads what arrived, delivers it to the client and acknowledges.
    fn deliver_down(&mut self) -> Result<(), String> {
        while self.link.down.front().is_some_and(|(t, _)| *t <= self.now) {
            let (_, m) = self.link.down.pop_front().unwrap();
            match m {
                Down::Data(b) => {
                    let arrived = self.stream.down.received() + b.len() as u64;
                    self.stream.on_arrival(arrived)?;
                    self.received.extend_from_slice(&b);
                    if let Some(Msg::Ack {
                        down_recv,
                        sum_from,
                    }) = self.stream.on_delivered(&b)
                    {
                        self.send_up(Up::Ack {
                            down_recv,
                            sum_from,
                        });
                    }
                    if self.stream.complete() {
                        self.done = true;
                    }
                }
                Down::Msg(m) => match self.stream.on_msg(m, &self.at.server) {
                    StreamStep::Continue => {}
                    StreamStep::Send(Msg::Ack {
                        down_recv,
                        sum_from,
                    }) if self.eager => self.send_up(Up::Ack {
                        down_recv,
                        sum_from,
                    }),
                    StreamStep::Send(m) => return Err(format!("unexpected {m:?} to send")),
                    StreamStep::Finish(_) => self.done = true,
                    StreamStep::Abort(why) => return Err(why),
                },
            }
        }
        if self.rng.gen_bool(0.05) {
            if let Some(Msg::Ack {
                down_recv,
                sum_from,
            }) = self.stream.on_tick()
            {
                self.send_up(Up::Ack {
                    down_recv,
                    sum_from,
                });
            }
        }
        Ok(())
    }
    pub(crate) fn check_one_owner(&self) -> Result<(), String> {
        let live = self
            .servers
            .iter()
            .filter(|s| s.conn.as_ref().is_some_and(|h| h.attached))
            .map(|s| s.id)
            .collect::<Vec<_>>();
        match live.len() {
            0 | 1 => Ok(()),
            _ => Err(format!("the connection is live on {live:?}")),
        }
    }
}
