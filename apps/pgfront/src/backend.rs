//! The front-end's own connection to the real PostgreSQL server: startup and authentication
//! (trust, cleartext, MD5, SCRAM-SHA-256), raw message I/O, and the small control queries the
//! front-end runs on it (their output never reaches the client).

use crate::codec::{self, BackMsg, CodecError, Frame};
use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use std::io;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Where and as whom the front-end connects (from `--backend postgres://USER[:PASSWORD]@HOST:PORT/DB`).
#[derive(Debug, Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    /// Used when the server asks for a password (any client user is logged in with it).
    pub password: Option<Vec<u8>>,
    /// The URL's user and database: for the control connection, and the defaults of sessions.
    pub user: String,
    pub dbname: String,
    /// The URL itself, for the control connection.
    pub url: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Self, String> {
        let cfg: tokio_postgres::Config = url.parse().map_err(|e| format!("{url}: {e}"))?;
        let host = match cfg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            Some(_) => return Err(format!("{url}: only TCP hosts are supported")),
            None => "127.0.0.1".into(),
        };
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
        let user = cfg.get_user().unwrap_or("postgres").to_string();
        Ok(Target {
            host,
            port,
            password: cfg.get_password().map(|p| p.to_vec()),
            dbname: cfg.get_dbname().unwrap_or(&user).to_string(),
            user,
            url: url.to_string(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("database connection: {0}")]
    Io(#[from] io::Error),
    #[error("database sent an invalid message: {0}")]
    Codec(#[from] CodecError),
    /// The server refused the session with this ErrorResponse (forwarded to the client as is).
    #[error("database refused the session")]
    Refused(Frame),
    #[error("database authentication: {0}")]
    Auth(String),
    /// A control query failed: SQLSTATE and message.
    #[error("database error {0}: {1}")]
    Query(String, String),
    #[error("database connection closed")]
    Closed,
}

/// One backend connection.
pub struct Backend {
    sock: TcpStream,
    rbuf: BytesMut,
    /// The backend's process id (BackendKeyData).
    pub pid: i32,
    /// ParameterStatus messages of the startup, raw, in order.
    pub startup_params: Vec<Frame>,
    max: usize,
}

/// Rows of one control query's result sets (text format; `None` is NULL).
pub type Rows = Vec<Vec<Option<String>>>;

impl Backend {
    /// Connects and logs in with the client's startup parameters.
    pub async fn connect(
        t: &Target,
        params: &[(String, String)],
        max: usize,
    ) -> Result<Self, BackendError> {
        // A lost SYN or SYN-ACK would hold a takeover's new backend up for a second (or two):
        // hedged as M-TCP's own connects are, and lost segments retransmitted after the RTO
        // floor rather than Linux's 200 ms (decisions 71, 72, 76).
        let hedge = mtcp::proto::timing::hedge_after(&Default::default());
        let connect = || TcpStream::connect((t.host.as_str(), t.port));
        let (sock, _) = mtcp::hedged::race(connect, hedge).await?;
        mtcp::tcpopt::internal(&sock);
        let mut be = Backend {
            sock,
            rbuf: BytesMut::with_capacity(16 << 10),
            pid: 0,
            startup_params: Vec::new(),
            max,
        };
        be.send(&codec::startup_message(params)).await?;
        let user = params
            .iter()
            .find(|(k, _)| k == "user")
            .map_or(t.user.as_str(), |(_, v)| v.as_str());
        let mut scram: Option<ScramSha256> = None;
        loop {
            let f = be.frame().await?;
            match codec::parse_back(&f)? {
                BackMsg::Authentication { code, data } => {
                    let pw = || {
                        t.password.clone().ok_or_else(|| {
                            BackendError::Auth(
                                "the server asks for a password and --backend has none".into(),
                            )
                        })
                    };
                    match code {
                        0 => {}
                        3 => be.send(&codec::password(&pw()?)).await?,
                        5 => {
                            let salt: [u8; 4] = data
                                .try_into()
                                .map_err(|_| BackendError::Auth("malformed MD5 salt".into()))?;
                            let h = postgres_protocol::authentication::md5_hash(
                                user.as_bytes(),
                                &pw()?,
                                salt,
                            );
                            be.send(&codec::password(h.as_bytes())).await?;
                        }
                        10 => {
                            let offers_scram =
                                data.split(|&b| b == 0).any(|m| m == b"SCRAM-SHA-256");
                            if !offers_scram {
                                return Err(BackendError::Auth(
                                    "the server offers no SASL mechanism this front-end speaks"
                                        .into(),
                                ));
                            }
                            let s = ScramSha256::new(&pw()?, ChannelBinding::unsupported());
                            be.send(&codec::sasl_initial_response("SCRAM-SHA-256", s.message()))
                                .await?;
                            scram = Some(s);
                        }
                        11 | 12 => {
                            let s = scram.as_mut().ok_or_else(|| {
                                BackendError::Auth("SASL message out of order".into())
                            })?;
                            if code == 11 {
                                s.update(data)
                                    .map_err(|e| BackendError::Auth(e.to_string()))?;
                                be.send(&codec::sasl_response(s.message())).await?;
                            } else {
                                s.finish(data)
                                    .map_err(|e| BackendError::Auth(e.to_string()))?;
                            }
                        }
                        c => {
                            return Err(BackendError::Auth(format!(
                                "unsupported authentication request {c}"
                            )))
                        }
                    }
                }
                BackMsg::ParameterStatus { .. } => be.startup_params.push(f),
                BackMsg::BackendKeyData { pid, .. } => be.pid = pid,
                BackMsg::ErrorResponse { .. } => return Err(BackendError::Refused(f)),
                BackMsg::ReadyForQuery { .. } => return Ok(be),
                _ => {}
            }
        }
    }

    /// Whether the server has sent nothing more (no message, no end of stream): an idle
    /// connection that is still usable.
    pub fn quiet(&mut self) -> bool {
        if !self.rbuf.is_empty() {
            return false;
        }
        let mut b = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        // The socket is nonblocking (tokio's): a peek that would block means nothing came.
        matches!(socket2::SockRef::from(&self.sock).peek(&mut b),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    pub async fn send(&mut self, b: &[u8]) -> io::Result<()> {
        self.sock.write_all(b).await
    }

    /// A complete message already buffered, if any.
    pub fn buffered_frame(&mut self) -> Result<Option<Frame>, CodecError> {
        codec::split_frame(&mut self.rbuf, self.max)
    }

    /// Reads more from the server (cancel-safe); `Closed` at end of stream.
    pub async fn fill(&mut self) -> Result<(), BackendError> {
        self.rbuf.reserve(16 << 10);
        if self.sock.read_buf(&mut self.rbuf).await? == 0 {
            return Err(BackendError::Closed);
        }
        Ok(())
    }

    /// The next message from the server.
    pub async fn frame(&mut self) -> Result<Frame, BackendError> {
        loop {
            if let Some(f) = self.buffered_frame()? {
                return Ok(f);
            }
            self.fill().await?;
        }
    }

    /// Runs a control query (simple protocol, any number of statements) and returns the rows
    /// of each result set; everything it outputs is swallowed. Fails on the first error.
    pub async fn simple(&mut self, sql: &str) -> Result<Vec<Rows>, BackendError> {
        self.send(&codec::query(sql)).await?;
        self.collect(1).await
    }

    /// Reads the output of `syncs` queries/Syncs already sent, up to their last ReadyForQuery:
    /// rows of each result set, or the first error.
    pub async fn collect(&mut self, syncs: usize) -> Result<Vec<Rows>, BackendError> {
        let mut sets: Vec<Rows> = Vec::new();
        let mut err = None;
        let mut left = syncs;
        while left > 0 {
            let f = self.frame().await?;
            match f.tag() {
                b'T' => sets.push(Vec::new()),
                b'D' => {
                    let row = data_row(f.body())?;
                    match sets.last_mut() {
                        Some(s) => s.push(row),
                        None => sets.push(vec![row]),
                    }
                }
                b'E' if err.is_none() => {
                    if let BackMsg::ErrorResponse { fields } = codec::parse_back(&f)? {
                        let s = |c| {
                            String::from_utf8_lossy(codec::field(&fields, c).unwrap_or(b""))
                                .into_owned()
                        };
                        err = Some(BackendError::Query(s(b'C'), s(b'M')));
                    }
                }
                b'Z' => left -= 1,
                _ => {}
            }
        }
        match err {
            Some(e) => Err(e),
            None => Ok(sets),
        }
    }
}

/// Text values of a DataRow body.
fn data_row(b: &[u8]) -> Result<Vec<Option<String>>, CodecError> {
    let bad = CodecError::Malformed {
        what: "DataRow",
        why: "truncated",
    };
    let n = i16::from_be_bytes(b.get(..2).ok_or(bad.clone())?.try_into().unwrap_or([0; 2]));
    let mut at = 2usize;
    let mut row = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n.max(0) {
        let len = i32::from_be_bytes(
            b.get(at..at + 4)
                .ok_or(bad.clone())?
                .try_into()
                .unwrap_or([0; 4]),
        );
        at += 4;
        if len < 0 {
            row.push(None);
            continue;
        }
        let v = b.get(at..at + len as usize).ok_or(bad.clone())?;
        at += len as usize;
        row.push(Some(String::from_utf8_lossy(v).into_owned()));
    }
    Ok(row)
}

/// `s` as an SQL literal that standard_conforming_strings cannot change: dollar-quoted.
pub fn literal(s: &str) -> Option<String> {
    (!s.contains("$mtcp$")).then(|| format!("$mtcp${s}$mtcp$"))
}
