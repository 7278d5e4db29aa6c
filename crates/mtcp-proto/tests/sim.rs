//! A deterministic simulation of the sans-IO cores together (issue 11): the agent's core
//! (`mtcp_proto::agent`: `Placement`, `MovePlan`, `RelayStream`) and three servers' stream cores
//! (`ServerStream`, state records, the replay check) with a deterministic application, on
//! ordered links with a delay. Seeded faults: random chunking of every read and write, snapshots
//! and acknowledgements at random times, moves at any moment (to a named or any server),
//! candidates that refuse, and sessions that break (whatever was in flight either way is lost).
//!
//! Every run checks, byte for byte, that the client receives exactly the application's output
//! for its input, that no server ever hands out a record the agent's checksum contradicts, that
//! a restarted application's regenerated output matches what the client has, and that at most
//! one server holds the connection live at any time. A failure names its seed; replay one with
//! `MTCP_SIM_SEED=<seed> cargo test --release -p mtcp-proto --test sim`.
//!
//! Not simulated yet: eager mode (replicas, COMMITTED, takeover after a crash), hung servers and
//! the agent's silence timer, the runtime's own takeover code (it is still tokio code, issue 11).

use bytes::Bytes;
use mtcp_proto::agent::stream::{RelayStream, StreamStep};
use mtcp_proto::agent::{self, MoveError, MovePlan, Placement};
use mtcp_proto::custody::Lineage;
use mtcp_proto::stream::ServerStream;
use mtcp_proto::wire::{Mode, Msg, RefuseCode, Resumed, ServerInfo, Welcome};
use mtcp_proto::{Cid, Token};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::VecDeque;

const SERVERS: [&str; 3] = ["s1", "s2", "s3"];
const NO_LIMIT: u64 = u64::MAX;
/// Steps of simulated time after which a run that has not finished fails (no run needs more
/// than a few thousand).
const MAX_STEPS: usize = 200_000;

/// The application: a running state folded over every input byte; each byte yields one output
/// byte, every seventh value also the state's low bytes, and the end of input a trailer. Its
/// snapshot is the state.
#[derive(Clone, Default)]
struct App {
    state: u64,
}

impl App {
    fn restore(snapshot: Option<&Bytes>) -> App {
        let state = snapshot.map_or(0, |b| u64::from_le_bytes(b[..8].try_into().unwrap()));
        App { state }
    }

    fn snapshot(&self) -> Bytes {
        Bytes::copy_from_slice(&self.state.to_le_bytes())
    }

    fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        for &b in input {
            self.state = self.state.wrapping_mul(31).wrapping_add(b as u64 + 1);
            out.push(b ^ self.state as u8);
            if b % 7 == 0 {
                out.extend_from_slice(&self.state.to_le_bytes()[..3]);
            }
        }
    }

    fn finish(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"END");
        out.extend_from_slice(&self.state.to_le_bytes());
    }

    /// What the client must receive for `input`.
    fn expected(input: &[u8]) -> Vec<u8> {
        let mut app = App::default();
        let mut out = Vec::new();
        app.feed(input, &mut out);
        app.finish(&mut out);
        out
    }
}

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

/// The connection at one server.
struct Held {
    stream: ServerStream,
    app: App,
    /// The application read the end of input and wrote its trailer.
    finished: bool,
    /// The session is attached (an agent talks to it); a detached connection waits for a FETCH.
    attached: bool,
}

struct Server {
    id: &'static str,
    conn: Option<Held>,
}

/// A session: both directions in order, each item delivered `delay` steps after it was sent.
struct Link {
    up: VecDeque<(usize, Up)>,
    down: VecDeque<(usize, Down)>,
    delay: usize,
}

struct World {
    rng: StdRng,
    now: usize,
    input: Vec<u8>,
    sent: usize,
    received: Vec<u8>,
    at: Placement,
    stream: RelayStream,
    servers: Vec<Server>,
    serving: usize,
    link: Link,
    moves: usize,
    breaks: usize,
    done: bool,
}

fn server_index(id: &str) -> usize {
    SERVERS
        .iter()
        .position(|s| *s == id)
        .expect("a known server")
}

impl World {
    fn new(seed: u64) -> World {
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
                mode: Mode::Lazy,
                heartbeat_ms: 100,
            },
            &format!("addr-{}", SERVERS[first]),
        );
        let mut servers: Vec<Server> = SERVERS.iter().map(|id| Server { id, conn: None }).collect();
        servers[first].conn = Some(Held {
            stream: ServerStream::new(),
            app: App::default(),
            finished: false,
            attached: true,
        });
        let delay = rng.gen_range(0..4);
        World {
            rng,
            now: 0,
            input,
            sent: 0,
            received: Vec::new(),
            at,
            stream: RelayStream::new(false),
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
    fn step(&mut self) -> Result<(), String> {
        self.now += 1;
        let roll: f64 = self.rng.gen();
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
        self.deliver_down()
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
                    StreamStep::Send(_) => return Err("a lazy stream acknowledged a SNAP".into()),
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

    /// A move: MIGRATE to candidates in order until one resumes the connection.
    fn move_connection(&mut self, broken: bool) -> Result<(), String> {
        if self.done {
            return Ok(());
        }
        if !broken {
            // The agent closes the session it leaves: what was in flight is lost with it.
            self.link.up.clear();
            self.link.down.clear();
            if let Some(h) = self.servers[self.serving].conn.as_mut() {
                h.attached = false;
            }
        }
        let to = self
            .rng
            .gen_bool(0.5)
            .then(|| SERVERS[self.rng.gen_range(0..SERVERS.len())]);
        let mut plan =
            MovePlan::new(&self.at, self.stream.position(), to).map_err(|e| e.to_string())?;
        let last = plan_len(&self.at, to);
        let mut tried = 0;
        while let Some(a) = plan.next(&Lineage::default()) {
            tried += 1;
            // Any candidate but the last may be busy.
            if tried < last && self.rng.gen_bool(0.2) {
                plan.refused(
                    &a.cand,
                    &MoveError::Refused {
                        code: RefuseCode::Busy,
                        reason: "busy".into(),
                    },
                );
                continue;
            }
            let dest = server_index(&a.cand.id);
            let origin = server_index(&a.migrate.origin);
            // The destination fetches the state: the origin checks the agent's position against
            // what it sent and hands out the record; the connection leaves the origin.
            let held = self.servers[origin]
                .conn
                .take()
                .ok_or("the origin does not hold the connection")?;
            let m = &a.migrate;
            let rec = held
                .stream
                .record(m.cid, m.epoch, m.down_recv, m.sum_from, m.down_sum)
                .map_err(|(code, why)| format!("origin refused the record ({code:?}): {why}"))?;
            let (stream, tail) = ServerStream::restart(&rec);
            let resumed = Resumed {
                server: SERVERS[dest].into(),
                epoch: m.epoch + 1,
                token: Token([(m.epoch + 1) as u8; 32]),
                up_from: rec.up_recv(),
                alternates: self.at.alternates.clone(),
                heartbeat_ms: 100,
                state_bytes: 0,
                restart_out: rec.snap_out,
                from_replica: false,
            };
            let r = agent::answer(Msg::Resumed(resumed)).map_err(|e| e.to_string())?;
            self.stream.check_resume(&r).map_err(|e| e.to_string())?;
            self.at.resumed(&r, &a.cand.data);
            let resend = self.stream.resume(&r).map_err(|e| e.to_string())?;
            self.servers[dest].conn = Some(Held {
                stream,
                app: App::restore(rec.snapshot.as_ref()),
                finished: false,
                attached: true,
            });
            self.serving = dest;
            let now = self.now + self.link.delay;
            if !tail.is_empty() {
                self.link.down.push_back((now, Down::Data(tail)));
            }
            for c in resend.chunks {
                self.send_up(Up::Data(c));
            }
            if let Some(total) = resend.up_fin {
                self.send_up(Up::Fin(total));
            }
            self.moves += 1;
            return Ok(());
        }
        Err(format!(
            "no candidate took the connection: {}",
            plan.failure()
        ))
    }

    fn check_one_owner(&self) -> Result<(), String> {
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

/// How many candidates a move toward `to` has.
fn plan_len(at: &Placement, to: Option<&str>) -> usize {
    at.candidates(to).map_or(0, |c| c.len())
}

/// One seeded run: `Ok((moves, session breaks))`, or what went wrong.
fn run(seed: u64) -> Result<(usize, usize), String> {
    let mut w = World::new(seed);
    while !w.done {
        if w.now > MAX_STEPS {
            return Err(format!(
                "not finished after {MAX_STEPS} steps ({} of {} input bytes sent, {} output bytes received)",
                w.sent,
                w.input.len(),
                w.received.len()
            ));
        }
        w.step()?;
        w.check_one_owner()?;
    }
    let want = App::expected(&w.input);
    if w.received != want {
        let at = w
            .received
            .iter()
            .zip(&want)
            .position(|(a, b)| a != b)
            .unwrap_or(w.received.len().min(want.len()));
        return Err(format!(
            "the client received {} bytes, the application's output is {}; first difference at {at}",
            w.received.len(),
            want.len()
        ));
    }
    Ok((w.moves, w.breaks))
}

#[test]
fn ten_thousand_seeded_runs_deliver_exactly_the_applications_output() {
    let (first, count) = match std::env::var("MTCP_SIM_SEED") {
        Ok(s) => (s.parse::<u64>().expect("MTCP_SIM_SEED is a number"), 1),
        Err(_) => (0x5eed_0000, 10_000),
    };
    let (mut moves, mut breaks) = (0u64, 0u64);
    let t0 = std::time::Instant::now();
    for seed in first..first + count {
        match run(seed) {
            Ok((m, b)) => {
                moves += m as u64;
                breaks += b as u64;
            }
            Err(e) => panic!(
                "seed {seed}: {e}\nreplay: MTCP_SIM_SEED={seed} cargo test --release -p mtcp-proto --test sim"
            ),
        }
    }
    eprintln!(
        "{count} runs, {moves} moves ({breaks} after a broken session), {:.2?}",
        t0.elapsed()
    );
    // The faults must really happen: a simulation whose moves never fire checks nothing.
    if count > 1 {
        assert!(moves > count, "only {moves} moves in {count} runs");
        assert!(breaks > count / 10, "only {breaks} broken sessions");
    }
}
