//! The agent's admin endpoint: one JSON request per line, one JSON answer per line. Local use
//! only (`mtcp status`, `mtcp migrate`); requests are parsed, never trusted.

use crate::{Agent, ConnStatus};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Longest request line accepted.
const MAX_LINE: u64 = 4096;

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
}

/// Parses one request line.
pub fn parse_request(line: &str) -> Result<Request, String> {
    serde_json::from_str(line.trim()).map_err(|e| format!("bad request: {e}"))
}

/// Serves the admin endpoint.
pub async fn serve(agent: Agent, l: TcpListener) {
    loop {
        let Ok((s, _)) = l.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let (r, mut w) = s.into_split();
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
                let resp = match parse_request(&line) {
                    Err(message) => {
                        // Bad input: a clear error, then the session ends.
                        let message = if !line.ends_with('\n') && n as u64 >= MAX_LINE {
                            format!("request longer than {MAX_LINE} bytes")
                        } else {
                            message
                        };
                        let r = Response::Error { message };
                        let _ = w
                            .write_all(
                                format!("{}\n", serde_json::to_string(&r).unwrap_or_default())
                                    .as_bytes(),
                            )
                            .await;
                        return;
                    }
                    Ok(Request::Status) => Response::Status {
                        connections: agent.status(),
                    },
                    Ok(Request::Migrate { conn, to }) => {
                        let results = agent
                            .migrate(conn.as_deref(), to)
                            .await
                            .into_iter()
                            .map(|(cid, r)| match r {
                                Ok(s) => MoveResult {
                                    cid,
                                    ok: true,
                                    detail: s,
                                },
                                Err(e) => MoveResult {
                                    cid,
                                    ok: false,
                                    detail: e,
                                },
                            })
                            .collect();
                        Response::Migrated { results }
                    }
                };
                let mut out = serde_json::to_string(&resp).unwrap_or_default();
                out.push('\n');
                if w.write_all(out.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Client side: sends `req` to the agent at `addr`.
pub async fn request(addr: &str, req: &Request) -> Result<Response, String> {
    let s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .map_err(|_| format!("agent admin {addr}: connect timed out"))?
        .map_err(|e| format!("agent admin {addr}: {e}"))?;
    let (r, mut w) = s.into_split();
    let mut line = serde_json::to_string(req).map_err(|e| e.to_string())?;
    line.push('\n');
    w.write_all(line.as_bytes())
        .await
        .map_err(|e| format!("agent admin {addr}: {e}"))?;
    let mut r = BufReader::new(r);
    let mut ans = String::new();
    tokio::time::timeout(Duration::from_secs(60), r.read_line(&mut ans))
        .await
        .map_err(|_| format!("agent admin {addr}: no answer"))?
        .map_err(|e| format!("agent admin {addr}: {e}"))?;
    serde_json::from_str(&ans).map_err(|e| format!("agent admin {addr}: bad answer: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
