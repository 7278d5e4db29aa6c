//! The agent's admin endpoint: one JSON request per line, one JSON answer per line
//! (`mtcp status`, `mtcp migrate`); requests are parsed, never trusted.
//!
//! Whoever reaches it sees every connection and can move them, so by default it is a Unix
//! socket only its owner can open: the file is made with mode 0600 and every connection's peer
//! credentials are checked as well (the agent's own uid, or root). It listens on TCP only when
//! given a token, which a client sends first (`{"cmd":"auth","token":…}`) and the agent
//! compares in constant time. Moves asked for through it are rate-limited with a token bucket
//! (decision 39).

use crate::{Agent, ConnStatus};
use mtcp_proto::bounds::{LogBudget, TokenBucket};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// Longest request line accepted.
const MAX_LINE: u64 = 4096;
/// Shortest admin token accepted (a token is a password for moving every connection).
pub const MIN_TOKEN_LEN: usize = 16;
/// Moves a second the endpoint accepts by default; the bucket holds twice as many.
pub const DEFAULT_MOVES_PER_SEC: u32 = 100;

/// A request to the agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Move connection `conn` (a cid), or every connection when `conn` is absent.
    Migrate {
        conn: Option<String>,
        to: Option<String>,
    },
    /// The admin token (first on a TCP endpoint; no answer when it matches).
    Auth {
        token: String,
    },
}

/// The agent's answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Status { connections: Vec<ConnStatus> },
    Migrated { results: Vec<MoveResult> },
    Error { message: String },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MoveResult {
    pub cid: String,
    pub ok: bool,
    /// New server id, or why it failed.
    pub detail: String,
    /// Not moved because the connection ended meanwhile (not a failed move).
    #[serde(default)]
    pub ended: bool,
}

/// Parses one request line.
pub fn parse_request(line: &str) -> Result<Request, String> {
    serde_json::from_str(line.trim()).map_err(|e| format!("bad request: {e}"))
}

/// Where an admin endpoint is: a path (anything with a `/`) is a Unix socket, anything else a
/// TCP address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminAddr {
    Unix(PathBuf),
    Tcp(String),
}

impl AdminAddr {
    pub fn parse(s: &str) -> Self {
        if s.contains('/') {
            AdminAddr::Unix(PathBuf::from(s))
        } else {
            AdminAddr::Tcp(s.to_string())
        }
    }
}

/// How the endpoint admits clients and moves.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// The token a client must send first; required for TCP, checked on a Unix socket too when
    /// set.
    pub token: Option<String>,
    /// Moves a second accepted (the bucket holds twice as many).
    pub moves_per_sec: u32,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            token: None,
            moves_per_sec: DEFAULT_MOVES_PER_SEC,
        }
    }
}

/// Reads an admin token from `path`: its first line, at least [`MIN_TOKEN_LEN`] bytes, from a
/// file no one but its owner may read.
pub fn read_token_file(path: &Path) -> Result<String, String> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(path).map_err(|e| format!("token file {}: {e}", path.display()))?;
    if md.mode() & 0o077 != 0 {
        return Err(format!(
            "token file {} is open to other users (mode {:o}): chmod 600 it",
            path.display(),
            md.mode() & 0o777
        ));
    }
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("token file {}: {e}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    check_token(&token).map_err(|e| format!("token file {}: {e}", path.display()))?;
    Ok(token)
}

/// Whether `token` is acceptable as an admin token.
pub fn check_token(token: &str) -> Result<(), String> {
    if token.len() < MIN_TOKEN_LEN {
        return Err(format!(
            "an admin token needs at least {MIN_TOKEN_LEN} characters"
        ));
    }
    if token.chars().any(char::is_control) {
        return Err("an admin token must not hold control characters".into());
    }
    Ok(())
}

/// A bound admin endpoint, ready for [`serve`].
pub enum Endpoint {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Endpoint {
    /// Binds `addr`: a Unix socket with mode 0600 (a stale socket file nobody listens on is
    /// replaced), or a TCP address, which needs a token.
    pub async fn bind(addr: &str, cfg: &AdminConfig) -> Result<Self, String> {
        match AdminAddr::parse(addr) {
            AdminAddr::Tcp(a) => {
                if cfg.token.is_none() {
                    return Err(format!(
                        "admin address {a} is TCP, which anyone on the host (or network) can reach: \
                         give a token (--admin-token-file FILE) or a Unix socket path (e.g. ./agent.sock)"
                    ));
                }
                let l = TcpListener::bind(&a)
                    .await
                    .map_err(|e| format!("cannot listen on admin address {a}: {e}"))?;
                Ok(Endpoint::Tcp(l))
            }
            AdminAddr::Unix(p) => {
                if std::fs::symlink_metadata(&p).is_ok() {
                    use std::os::unix::fs::FileTypeExt;
                    let is_sock = std::fs::symlink_metadata(&p)
                        .map(|m| m.file_type().is_socket())
                        .unwrap_or(false);
                    if !is_sock {
                        return Err(format!(
                            "admin socket {}: the path exists and is not a socket",
                            p.display()
                        ));
                    }
                    if UnixStream::connect(&p).await.is_ok() {
                        return Err(format!(
                            "admin socket {}: another process listens there",
                            p.display()
                        ));
                    }
                    let _ = std::fs::remove_file(&p);
                }
                let l = bind_private(&p)
                    .map_err(|e| format!("cannot listen on admin socket {}: {e}", p.display()))?;
                Ok(Endpoint::Unix(l, p))
            }
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        if let Endpoint::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Binds a Unix socket at `p` whose file only its owner may open: created under umask 0177 (no
/// moment at which others could connect), then set to 0600 in case the umask was not honoured.
fn bind_private(p: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    static UMASK: Mutex<()> = Mutex::new(());
    let l = {
        let _g = UMASK.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: umask(2) has no preconditions; the old mask is restored right after bind.
        let old = unsafe { libc::umask(0o177) };
        let r = UnixListener::bind(p);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        r?
    };
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// What every admin session shares.
struct Shared {
    agent: Agent,
    token: Option<String>,
    moves: Mutex<TokenBucket>,
    log: Mutex<LogBudget>,
}

impl Shared {
    /// Logs a refused client, at most 20 lines a second.
    fn refused(&self, why: &str) {
        let now = Instant::now();
        if let Some(n) = self
            .log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(now)
        {
            tracing::warn!(suppressed = n, "admin client refused: {why}");
        }
    }
}

/// Serves the admin endpoint.
pub async fn serve(agent: Agent, ep: Endpoint, cfg: AdminConfig) {
    let rate = cfg.moves_per_sec.max(1);
    let shared = Arc::new(Shared {
        agent,
        token: cfg.token,
        moves: Mutex::new(TokenBucket::new(rate, rate.saturating_mul(2))),
        log: Mutex::new(LogBudget::new(Duration::from_secs(1), 20)),
    });
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    loop {
        match &ep {
            Endpoint::Tcp(l) => {
                let Ok((s, _)) = l.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let (r, w) = s.into_split();
                tokio::spawn(session(shared.clone(), r, w, true));
            }
            Endpoint::Unix(l, _) => {
                let Ok((s, _)) = l.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                // The file's mode keeps others out; the peer's credentials are checked too
                // (a socket file whose mode someone loosened, a descriptor passed on).
                let uid = s.peer_cred().map(|c| c.uid()).ok();
                let (r, mut w) = s.into_split();
                if uid != Some(me) && uid != Some(0) {
                    let why = format!(
                        "uid {} is not the agent's owner (uid {me})",
                        uid.map_or("unknown".to_string(), |u| u.to_string())
                    );
                    shared.refused(&why);
                    tokio::spawn(async move {
                        // Its first line is read (and ignored) so that the refusal reaches it
                        // instead of a reset.
                        let _ = tokio::time::timeout(Duration::from_secs(1), async {
                            let mut line = String::new();
                            let _ = BufReader::new(r.take(MAX_LINE)).read_line(&mut line).await;
                            answer(&mut w, &Response::Error { message: why }).await
                        })
                        .await;
                    });
                    continue;
                }
                tokio::spawn(session(shared.clone(), r, w, false));
            }
        }
    }
}

async fn answer<W: AsyncWrite + Unpin>(w: &mut W, r: &Response) -> std::io::Result<()> {
    let mut out = serde_json::to_string(r).unwrap_or_default();
    out.push('\n');
    w.write_all(out.as_bytes()).await
}

/// One client: requests until it closes, sends bad input, or is refused.
async fn session<R, W>(sh: Arc<Shared>, r: R, mut w: W, needs_token: bool)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut authed = !needs_token;
    let mut r = BufReader::new(r);
    let mut line = String::new();
    loop {
        line.clear();
        let n = match tokio::time::timeout(
            Duration::from_secs(60),
            (&mut r).take(MAX_LINE).read_line(&mut line),
        )
        .await
        {
            Ok(Ok(n)) => n,
            _ => return,
        };
        if n == 0 {
            return;
        }
        let req = match parse_request(&line) {
            Ok(req) => req,
            Err(message) => {
                // Bad input: a clear error, then the session ends.
                let message = if !line.ends_with('\n') && n as u64 >= MAX_LINE {
                    format!("request longer than {MAX_LINE} bytes")
                } else {
                    message
                };
                let _ = answer(&mut w, &Response::Error { message }).await;
                return;
            }
        };
        let resp = match req {
            Request::Auth { token } => {
                let ok = match &sh.token {
                    Some(t) => mtcp_proto::auth::secrets_equal(t.as_bytes(), token.as_bytes()),
                    // A Unix socket without a token: the credentials already admitted it.
                    None => !needs_token,
                };
                if ok {
                    authed = true;
                    continue;
                }
                sh.refused("wrong admin token");
                let _ = answer(
                    &mut w,
                    &Response::Error {
                        message: "admin token refused".into(),
                    },
                )
                .await;
                return;
            }
            _ if !authed => {
                sh.refused("no admin token");
                let _ = answer(
                    &mut w,
                    &Response::Error {
                        message:
                            "this admin endpoint needs a token first (mtcp --admin-token-file FILE)"
                                .into(),
                    },
                )
                .await;
                return;
            }
            Request::Status => Response::Status {
                connections: sh.agent.status(),
            },
            Request::Migrate { conn, to } => {
                let cost = if conn.is_some() {
                    1
                } else {
                    u32::try_from(sh.agent.live_count()).unwrap_or(u32::MAX)
                };
                let taken = sh
                    .moves
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take(Instant::now(), cost);
                match taken {
                    Err(wait) => {
                        let b = sh.moves.lock().unwrap_or_else(|p| p.into_inner()).clone();
                        Response::Error {
                            message: format!(
                                "rate limited: this agent accepts {} moves a second (bursts of {}); retry in {} ms",
                                b.per_sec(),
                                b.burst(),
                                wait.as_millis().max(1)
                            ),
                        }
                    }
                    Ok(()) => {
                        let results = sh
                            .agent
                            .migrate(conn.as_deref(), to)
                            .await
                            .into_iter()
                            .map(|(cid, r)| match r {
                                Ok(s) => MoveResult {
                                    cid,
                                    ok: true,
                                    detail: s,
                                    ended: false,
                                },
                                Err(e) => MoveResult {
                                    cid,
                                    ok: false,
                                    ended: e == crate::NotMoved::Ended,
                                    detail: e.to_string(),
                                },
                            })
                            .collect();
                        Response::Migrated { results }
                    }
                }
            }
        };
        if answer(&mut w, &resp).await.is_err() {
            return;
        }
    }
}

/// Client side: sends `req` to the agent at `addr` (no token).
pub async fn request(addr: &str, req: &Request) -> Result<Response, String> {
    request_with(addr, None, req).await
}

/// Client side: sends `req` to the agent at `addr` (a Unix socket path or a TCP address),
/// after `token` when given.
pub async fn request_with(
    addr: &str,
    token: Option<&str>,
    req: &Request,
) -> Result<Response, String> {
    let mut text = String::new();
    if let Some(t) = token {
        text += &serde_json::to_string(&Request::Auth {
            token: t.to_string(),
        })
        .map_err(|e| e.to_string())?;
        text.push('\n');
    }
    text += &serde_json::to_string(req).map_err(|e| e.to_string())?;
    text.push('\n');
    match AdminAddr::parse(addr) {
        AdminAddr::Tcp(a) => {
            let s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&a))
                .await
                .map_err(|_| format!("agent admin {addr}: connect timed out"))?
                .map_err(|e| format!("agent admin {addr}: {e}"))?;
            let (r, w) = s.into_split();
            exchange(addr, r, w, &text).await
        }
        AdminAddr::Unix(p) => {
            let s = tokio::time::timeout(Duration::from_secs(5), UnixStream::connect(&p))
                .await
                .map_err(|_| format!("agent admin {addr}: connect timed out"))?
                .map_err(|e| format!("agent admin {addr}: {e}"))?;
            let (r, w) = s.into_split();
            exchange(addr, r, w, &text).await
        }
    }
}

async fn exchange<R, W>(addr: &str, r: R, mut w: W, text: &str) -> Result<Response, String>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // A refusal may come before the agent reads everything: read it even if the write failed.
    let wrote = w.write_all(text.as_bytes()).await;
    let mut r = BufReader::new(r);
    let mut ans = String::new();
    tokio::time::timeout(Duration::from_secs(60), r.read_line(&mut ans))
        .await
        .map_err(|_| format!("agent admin {addr}: no answer"))?
        .map_err(|e| match &wrote {
            Err(w) => format!("agent admin {addr}: {w}"),
            Ok(()) => format!("agent admin {addr}: {e}"),
        })?;
    if ans.is_empty() {
        return Err(match wrote {
            Err(e) => format!("agent admin {addr}: {e}"),
            Ok(()) => format!("agent admin {addr}: closed without an answer"),
        });
    }
    serde_json::from_str(&ans).map_err(|e| format!("agent admin {addr}: bad answer: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_move_result_without_ended_reads_as_not_ended() {
        // An older agent's answer has no `ended`.
        let r: MoveResult = serde_json::from_str(r#"{"cid":"c","ok":false,"detail":"x"}"#).unwrap();
        assert!(!r.ended);
        let ended = MoveResult {
            cid: "c".into(),
            ok: false,
            detail: crate::NotMoved::Ended.to_string(),
            ended: true,
        };
        let back: MoveResult =
            serde_json::from_str(&serde_json::to_string(&ended).unwrap()).unwrap();
        assert_eq!(back, ended);
    }

    #[test]
    fn requests_parse() {
        assert_eq!(parse_request(r#"{"cmd":"status"}"#), Ok(Request::Status));
        assert_eq!(
            parse_request(r#"{"cmd":"migrate","conn":null,"to":"s2"}"#),
            Ok(Request::Migrate {
                conn: None,
                to: Some("s2".into())
            })
        );
        assert!(parse_request("garbage")
            .unwrap_err()
            .contains("bad request"));
        assert!(parse_request(r#"{"cmd":"rm -rf"}"#).is_err());
        assert_eq!(
            parse_request(r#"{"cmd":"auth","token":"t"}"#),
            Ok(Request::Auth { token: "t".into() })
        );
    }

    #[test]
    fn addresses_with_a_slash_are_unix_sockets() {
        assert_eq!(
            AdminAddr::parse("./a.sock"),
            AdminAddr::Unix(PathBuf::from("./a.sock"))
        );
        assert_eq!(
            AdminAddr::parse("127.0.0.1:6433"),
            AdminAddr::Tcp("127.0.0.1:6433".into())
        );
        assert!(check_token("short").is_err());
        assert!(check_token("0123456789abcdef").is_ok());
    }
}
