//! The agent's end of a channel to a server: opening one (preamble and the first message:
//! HELLO, MIGRATE or WATCH), the HELLO/WELCOME exchange, and the MIGRATE exchange both agents
//! (relay and fast path) move through.

use crate::dialer::Dialer;
use crate::AgentInner;
use mtcp::framed::{self, ChannelError, FrameReader};
use mtcp::movetrace::{self, Trace};
use mtcp::stream::{ReadHalf, Stream, WriteHalf};
use mtcp_proto::agent::{self, CandidateWait, MoveError, ReadFault, Waited};
use mtcp_proto::timing;
use mtcp_proto::trigger::Rtt;
use mtcp_proto::wire::{Migrate, Msg, ServerInfo};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SETUP_FRAME: usize = 64 << 10;

/// Connects to a server and sends `first` (HELLO, MIGRATE or WATCH) with the preamble.
pub(crate) async fn connect(
    addr: &str,
    limit: Duration,
    first: &Msg,
    dialer: &Dialer,
) -> Result<(FrameReader<ReadHalf>, WriteHalf), ChannelError> {
    let s = tokio::time::timeout(limit, dialer.dial(addr))
        .await
        .map_err(|_| ChannelError::Timeout)??;
    open_on(s, limit, first).await
}

/// Sends the preamble and `first` on an established connection.
async fn open_on(
    mut s: Stream,
    limit: Duration,
    first: &Msg,
) -> Result<(FrameReader<ReadHalf>, WriteHalf), ChannelError> {
    tokio::time::timeout(limit, framed::send_preamble_with(&mut s, first))
        .await
        .map_err(|_| ChannelError::Timeout)??;
    let (r, w) = s.into_split();
    // The server's preamble, read with what follows it: one read, not two.
    let mut reader = FrameReader::new(r, SETUP_FRAME);
    reader.preamble(limit).await?;
    Ok((reader, w))
}

/// HELLO to the configured servers in order.
/// A session opened with HELLO: the server's address, the channel and its WELCOME.
pub(crate) type Welcomed = (
    String,
    FrameReader<ReadHalf>,
    WriteHalf,
    mtcp_proto::wire::Welcome,
);

/// Sends `hello` to the configured servers in order until one answers WELCOME; the error names
/// why each refused or failed.
pub(crate) async fn welcome(inner: &AgentInner, hello: &Msg) -> Result<Welcomed, String> {
    let mut errs = Vec::new();
    for addr in &inner.cfg.connect {
        let r = async {
            let (mut reader, w) =
                connect(addr, inner.cfg.connect_timeout, hello, &inner.dialer).await?;
            let m = reader.next_msg(inner.cfg.connect_timeout).await?;
            match mtcp_proto::agent::welcome_answer(m) {
                Ok(wl) => Ok((reader, w, wl)),
                Err(e) => {
                    if let Some(code) = e.refuse_code() {
                        mtcp::metrics::refused(code);
                    }
                    Err(ChannelError::Unexpected(e.to_string()))
                }
            }
        }
        .await;
        match r {
            Ok((reader, w, wl)) => return Ok((addr.clone(), reader, w, wl)),
            Err(e) => {
                tracing::warn!(target: "mtcp_agent::relay", server = %addr, "cannot open a session: {e}");
                errs.push(format!("{addr}: {e}"));
            }
        }
    }
    Err(errs.join("; "))
}

/// Reads a candidate's answer to MIGRATE, waiting as `wait` says ([`CandidateWait`]: WORKING,
/// sent every heartbeat while the takeover runs, only shows the candidate is alive).
pub(crate) async fn answer_to_migrate(
    reader: &mut FrameReader<ReadHalf>,
    wait: &CandidateWait,
) -> Result<Msg, ChannelError> {
    loop {
        let gap = wait
            .next_read(Instant::now())
            .ok_or(ChannelError::Timeout)?;
        match wait.on_msg(reader.next_msg(gap).await?) {
            Waited::Skip => continue,
            Waited::Answer(m) => return Ok(m),
        }
    }
}

/// A failed read, as the core's rules tell failures apart: a timeout, or anything else.
pub(crate) fn fault(e: ChannelError) -> ReadFault {
    match e {
        ChannelError::Timeout => ReadFault::TimedOut,
        e => ReadFault::Failed(e.to_string()),
    }
}

/// How a failed wait for a candidate's answer is reported: a timeout is its silence.
pub(crate) fn silent(e: ChannelError, wait: &CandidateWait) -> MoveError {
    match e {
        ChannelError::Timeout => wait.timeout(),
        e => MoveError::Channel(e.to_string()),
    }
}

/// A destination's answer to MIGRATE, read by the core; refusals are counted.
pub(crate) fn resumed(msg: Msg) -> Result<mtcp_proto::wire::Resumed, MoveError> {
    agent::answer(msg).inspect_err(|e| {
        if let Some(code) = e.refuse_code() {
            mtcp::metrics::refused(code);
        }
    })
}

/// Sends MIGRATE to `cand` and reads its answer: on a spare connection if a fresh one is kept
/// (it saves the TCP handshake: MIGRATE leaves at once), else on a new connection. A spare the
/// server closed meanwhile fails before the server saw MIGRATE, so a fresh connection is safe
/// then. Both agents (relay and fast path) move through this. The candidate counts as silent
/// after `timing::candidate_silence` of its path ([`toward`]); `session` is the current
/// session's round trip, used while no handshake to the candidate was timed.
pub(crate) async fn exchange_migrate(
    inner: &Arc<AgentInner>,
    cand: &ServerInfo,
    m: &Migrate,
    session: &Rtt,
    heartbeat: Duration,
    trace: &mut Option<Trace>,
) -> Result<(FrameReader<ReadHalf>, WriteHalf, Msg), MoveError> {
    let first = Msg::Migrate(m.clone());
    if let Some(s) = inner.spares.take(&cand.data) {
        if let Ok((mut reader, w)) = open_on(s, inner.cfg.connect_timeout, &first).await {
            movetrace::mark(trace, "migrate_tx_spare");
            let wait = waiting(inner, cand, session, heartbeat);
            match answer_to_migrate(&mut reader, &wait).await {
                Ok(m) => return Ok((reader, w, m)),
                Err(ChannelError::Closed | ChannelError::Io(_)) => {}
                Err(e) => return Err(silent(e, &wait)),
            }
        }
    }
    let (mut reader, w) = connect(&cand.data, inner.cfg.connect_timeout, &first, &inner.dialer)
        .await
        .map_err(|e| MoveError::Channel(e.to_string()))?;
    movetrace::mark(trace, "migrate_tx_connect");
    let wait = waiting(inner, cand, session, heartbeat);
    let m = answer_to_migrate(&mut reader, &wait)
        .await
        .map_err(|e| silent(e, &wait))?;
    Ok((reader, w, m))
}

/// How long `cand` may stay silent: one beat plus an answer bound of its path, timed by the
/// handshakes to it (`Dialer::paths`), not of the current session, whose PONGs may wait behind
/// seconds of data a slow reader left queued (decision 62).
fn toward(inner: &AgentInner, cand: &ServerInfo, session: &Rtt, heartbeat: Duration) -> Duration {
    let path = timing::toward_candidate(inner.dialer.paths.get(&cand.data), session);
    timing::candidate_silence(&path, heartbeat)
}

/// The wait for `cand`'s answer, starting now: gaps of [`toward`], an answer within the
/// agent's `migrate_timeout`.
fn waiting(
    inner: &AgentInner,
    cand: &ServerInfo,
    session: &Rtt,
    heartbeat: Duration,
) -> CandidateWait {
    let silence = toward(inner, cand, session, heartbeat);
    CandidateWait::new(Instant::now(), silence, inner.cfg.migrate_timeout)
}
