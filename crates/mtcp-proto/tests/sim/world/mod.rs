//! The simulated world: a client, the agent's core, three servers and a link.

mod claims;
mod eager;
mod faults;
mod moves;

use crate::app::App;
use bytes::Bytes;
use mtcp_proto::agent::stream::{RelayStream, StreamStep};
use mtcp_proto::agent::Placement;
use mtcp_proto::commit::{Commit, CommitStep};
use mtcp_proto::custody::Custody;
use mtcp_proto::custody::{Gate, GateEvent, Verdict};
use mtcp_proto::record::StateRecord;
use mtcp_proto::replica::Slot;
use mtcp_proto::stream::ServerStream;
use mtcp_proto::takeover::ResumedFor;
use mtcp_proto::wire::{Mode, Msg, RefuseCode, ServerInfo, Welcome};
use mtcp_proto::{Cid, Token};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

pub(crate) use faults::TwoFault;

const SERVERS: [&str; 3] = ["s1", "s2", "s3"];
const NO_LIMIT: u64 = u64::MAX;
/// Steps of simulated time after which a run that has not finished fails (no run needs more
/// than a few thousand).
pub(crate) const MAX_STEPS: usize = 200_000;

/// Agent → server.
#[derive(Debug)]
enum Up {
    Data(Bytes),
    Ack {
        down_recv: u64,
        sum_from: u64,
    },
    Fin(u64),
    /// The agent's first frame on a new session.
    Ping,
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
    /// Who keeps the state it gave out until the destination confirms (eager mode), and the
    /// label it was handed out as.
    keeper: Option<(usize, u64)>,
    /// The backups whose replicas the destination claimed (to release if it fails).
    claim_at: Vec<usize>,
    /// The destination's own copy, frozen here for a MIGRATE from the epoch it was taken over
    /// from (lazy mode, decision 73): exact, checked but not turned into a restart point.
    own: bool,
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
    /// Eager mode: the restart point its backup holds, and whether COMMITTED and the keepers'
    /// confirmation wait for the agent (`mtcp_proto::commit`, as the runtime's).
    commit: Commit,
    /// Its push was refused because a destination took the connection over from the replica:
    /// it serves no more, but keeps the stream as that destination's keeper (decision 48).
    taken: Option<Custody>,
    /// The MIGRATE it was taken over for (the runtime's `ConnState::resumed_for`).
    resumed_for: ResumedFor,
}

impl Held {
    fn new(stream: ServerStream, app: App, epoch: u64) -> Held {
        Held {
            stream,
            app,
            finished: false,
            attached: true,
            epoch,
            commit: Commit::default(),
            taken: None,
            resumed_for: ResumedFor::default(),
        }
    }
}

struct Server {
    id: &'static str,
    conn: Option<Held>,
    /// Eager mode: this server's replica-store entry as another server's backup (the claim
    /// rules' slot, and the record: `None` for a tombstone).
    entry: Option<(Slot, Option<StateRecord>)>,
    /// Crashed: down (and empty) until this step.
    down_until: Option<usize>,
    /// Hung: alive, but answers nobody and does nothing until this step.
    hung_until: Option<usize>,
    /// Eager mode: as an origin that handed the connection over alive, what it knows of it
    /// until the holder confirms, and the record it keeps.
    custody: Option<(Custody, StateRecord)>,
    /// The gates of the epochs it took over (lost in a crash).
    gates: BTreeMap<u64, Option<Gate>>,
    /// The agent's MIGRATE number each of those epochs was taken over for (decision 66).
    served: BTreeMap<u64, u64>,
    /// The epochs the agent spoke at here.
    heard: BTreeSet<u64>,
}

/// A session: both directions in order, each item delivered `delay` steps after it was sent.
struct Link {
    up: VecDeque<(usize, Up)>,
    down: VecDeque<(usize, Down)>,
    delay: usize,
}

/// How often the seeded faults happen.
#[derive(Clone, Copy)]
pub(crate) struct Knobs {
    /// A move has a racing destination (a candidate the agent gave up on goes on).
    pub race: f64,
    /// A destination's backup holds the new epoch before RESUMED.
    pub protect: f64,
    /// After a fence passed over the agent's holder, that holder hangs (so the agent's MIGRATE
    /// at its epoch goes to its backup: issue 15's open question).
    pub hang_after_pass: f64,
    /// A new holder crashes within a few steps of its RESUMED (before the agent spoke on its
    /// session, or just after), when that is survivable.
    pub crash_soon: f64,
    /// Backups per server (the cluster's `replicas`): the next one or two servers in order.
    pub replicas: usize,
    /// The agent's MIGRATEs carry its word (their number, the epochs it holds: decision 66);
    /// `false` plays an agent whose word says nothing, as before it.
    pub words: bool,
}

/// Passes over a claimer that answered RESUMED without fencing its epoch, as before issue 15's
/// open question was settled (`MTCP_SIM_UNFENCED_PASS=1`: shows the two takeovers of one epoch
/// the simulation found).
fn unfenced_pass() -> bool {
    std::env::var_os("MTCP_SIM_UNFENCED_PASS").is_some()
}

impl Knobs {
    pub(crate) const DEFAULT: Knobs = Knobs {
        race: 0.25,
        protect: 0.6,
        hang_after_pass: 0.0,
        crash_soon: 0.0,
        replicas: 1,
        words: true,
    };
}

pub(crate) struct World {
    pub(crate) knobs: Knobs,
    /// Two servers resumed at the same epoch (one of them to nobody).
    pub(crate) same_epoch: usize,
    /// A crash of the serving server due at this step (`Knobs::crash_soon`).
    crash_at: Option<usize>,
    unfenced_pass: bool,
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
    /// The last step the agent heard from its session (a heartbeat at least).
    heard_at: usize,
    /// The serving server dropped the agent's session (it let the connection go).
    cut: bool,
    /// All candidates failed while a server was hung: the agent retries at this step.
    retry_at: Option<usize>,
    /// Since when the agent's moves have been failing.
    stalled_since: Option<usize>,
    /// Who the agent spoke to at each epoch (one owner per epoch), and the first violation.
    owners: BTreeMap<u64, usize>,
    pub(crate) two_owners: Option<String>,
    /// (backup, epoch) a destination claimed (and may have taken over from).
    taken_at: BTreeSet<(usize, u64)>,
    /// MIGRATEs the agent sent in earlier moves (a late one may still be served: a racer).
    attempts: Vec<(mtcp_proto::wire::Migrate, usize)>,
    /// Holders that let go after RESUMED whose epoch the agent's word ruled out (no fence).
    pub(crate) disowned: usize,
    /// YIELDs refused because they served an older MIGRATE than the holder's (decision 66).
    pub(crate) stale_yields: usize,
    /// A racer's takeover due at a step: the MIGRATE and the server.
    racer: Option<(usize, mtcp_proto::wire::Migrate, usize)>,
    pub(crate) two_fault: Option<TwoFault>,
    /// A holder that let go after its RESUMED could not be fenced (see `TwoFault::UnfencedLetGo`).
    unfenced: bool,
    /// A racer's hand-out is being played, and one superseded the agent's holder.
    racing: bool,
    late_handout: bool,
    /// Keepers that handed out again a newer epoch they held themselves, unheard (decision 64).
    pub(crate) own_rehands: usize,
    /// The documented loss a two-fault run ended in: the fault, and the refusals.
    pub(crate) lost: Option<(TwoFault, Vec<RefuseCode>)>,
    pub(crate) hangs: usize,
    pub(crate) silences: usize,
    pub(crate) stalls: usize,
    pub(crate) races: usize,
    pub(crate) races_resumed: usize,
    /// Lazy destinations that served the agent's later MIGRATE with their own copy, taken over
    /// for one it had given up on (decision 73).
    pub(crate) own_reattaches: usize,
    /// The last failed move gave up on the server holding its own copy in every round.
    silent_every_round: bool,
    pub(crate) supersedes: usize,
    pub(crate) passes: usize,
    /// Passes over a claimer that had answered RESUMED, and of those, one the agent had read.
    pub(crate) passes_answered: usize,
    pub(crate) passes_of_agents: usize,
    pub(crate) let_gos: usize,
    pub(crate) stale_refused: usize,
}

fn server_index(id: &str) -> usize {
    SERVERS
        .iter()
        .position(|s| *s == id)
        .expect("a known server")
}

impl World {
    pub(crate) fn new(seed: u64, eager: bool, knobs: Knobs) -> World {
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
                idle_ms: 30_000,
            },
            &format!("addr-{}", SERVERS[first]),
        );
        let mut servers: Vec<Server> = SERVERS
            .iter()
            .map(|id| Server {
                id,
                conn: None,
                entry: None,
                down_until: None,
                hung_until: None,
                custody: None,
                gates: BTreeMap::new(),
                served: BTreeMap::new(),
                heard: BTreeSet::new(),
            })
            .collect();
        servers[first].conn = Some(Held::new(ServerStream::new(), App::default(), 0));
        let delay = rng.gen_range(0..4);
        World {
            knobs,
            same_epoch: 0,
            crash_at: None,
            unfenced_pass: unfenced_pass(),
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
            heard_at: 0,
            cut: false,
            retry_at: None,
            stalled_since: None,
            owners: BTreeMap::new(),
            two_owners: None,
            taken_at: BTreeSet::new(),
            attempts: Vec::new(),
            disowned: 0,
            stale_yields: 0,
            racer: None,
            two_fault: None,
            unfenced: false,
            racing: false,
            late_handout: false,
            own_rehands: 0,
            lost: None,
            hangs: 0,
            silences: 0,
            stalls: 0,
            races: 0,
            races_resumed: 0,
            own_reattaches: 0,
            silent_every_round: false,
            supersedes: 0,
            passes: 0,
            passes_answered: 0,
            passes_of_agents: 0,
            let_gos: 0,
            stale_refused: 0,
        }
    }

    fn send_up(&mut self, m: Up) {
        self.link.up.push_back((self.now + self.link.delay, m));
    }

    /// One step of simulated time: each party acts with some probability.
    pub(crate) fn step(&mut self) -> Result<(), String> {
        self.now += 1;
        for (i, id) in SERVERS.iter().enumerate() {
            let s = &mut self.servers[i];
            if s.down_until.is_some_and(|t| t <= self.now) {
                s.down_until = None;
            }
            if s.hung_until.is_some_and(|t| t <= self.now) {
                s.hung_until = None;
                let live = s.conn.as_ref().is_some_and(|h| h.attached);
                if live && i != self.serving {
                    return Err(format!(
                        "{id} woke up still serving a session the agent left"
                    ));
                }
                self.trace(format!("{id} wakes up"));
            }
        }
        if self.racer.as_ref().is_some_and(|(t, _, _)| *t <= self.now) {
            let (_, m, r) = self.racer.take().expect("due");
            self.race(&m, r)?;
        }
        if self.retry_at.is_some_and(|t| t <= self.now) {
            return self.move_connection(true);
        }
        if self.retry_at.is_some() {
            return Ok(());
        }
        if self.cut {
            // The serving server let the connection go and dropped the session.
            self.cut = false;
            self.breaks += 1;
            return self.move_connection(true);
        }
        if let Some(r) = self.inject()? {
            return r;
        }
        let mut roll: f64 = self.rng.gen();
        if !self.reachable(self.serving) && self.rng.gen_bool(0.95) {
            // The serving server hangs: the agent mostly has no other reason to move.
            roll = 1.0;
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
        if self.silent() {
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
        if !self.reachable(self.serving) {
            return Ok(());
        }
        while self.link.up.front().is_some_and(|(t, _)| *t <= self.now) {
            let (_, m) = self.link.up.pop_front().unwrap();
            let serving = self.serving;
            let h = self.servers[serving]
                .conn
                .as_ref()
                .ok_or("the serving server does not hold the connection")?;
            if h.commit.waits_for_agent() {
                // The agent's first frame on the new session settles the gate.
                let epoch = h.epoch;
                if self.settle(serving, epoch, GateEvent::Hear) != Verdict::Go {
                    return Err("a holder that let go still holds the connection".into());
                }
                self.heard(serving);
            }
            let h = self.servers[serving].conn.as_mut().expect("checked");
            match m {
                Up::Ping => {}
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
        if !self.reachable(self.serving) {
            return Ok(());
        }
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
            .filter(|s| s.hung_until.is_none() && s.conn.as_ref().is_some_and(|h| h.attached))
            .map(|s| s.id)
            .collect::<Vec<_>>();
        if let Some(e) = &self.two_owners {
            return Err(e.clone());
        }
        match live.len() {
            0 | 1 => Ok(()),
            _ => Err(format!("the connection is live on {live:?}")),
        }
    }
}
