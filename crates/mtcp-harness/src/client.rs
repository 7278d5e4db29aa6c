//! A small HTTP/1.1 client for the demo, the benchmarks and the tests: GET with keep-alive,
//! an optional rate limit and a progress counter, hashing the body as it arrives.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How the body is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hash {
    Sha256,
    /// Cheap (for throughput benchmarks).
    Xxh3,
}

/// One response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body_len: u64,
    /// Hex SHA-256 or XXH3-64 of the body.
    pub digest: String,
    pub elapsed: Duration,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A keep-alive HTTP connection.
pub struct Client {
    s: TcpStream,
    buf: Vec<u8>,
    pub hash: Hash,
    /// Bytes per second the body is read at, if limited.
    pub rate: Option<u64>,
    /// Body bytes received so far (across requests).
    pub progress: Arc<AtomicU64>,
    /// Optional file the body is written to.
    pub sink: Option<std::fs::File>,
}

impl Client {
    pub async fn connect(addr: &str) -> Result<Self> {
        let s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        s.set_nodelay(true)?;
        Ok(Self {
            s,
            buf: Vec::new(),
            hash: Hash::Sha256,
            rate: None,
            progress: Arc::new(AtomicU64::new(0)),
            sink: None,
        })
    }

    /// Sends raw request bytes (may be a partial request).
    pub async fn send_raw(&mut self, b: &[u8]) -> Result<()> {
        self.s.write_all(b).await?;
        Ok(())
    }

    /// GET (or HEAD) `path` with optional extra header lines.
    pub async fn request(&mut self, method: &str, path: &str, extra: &[&str]) -> Result<Response> {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: mtcp\r\n");
        for h in extra {
            req += h;
            req += "\r\n";
        }
        req += "\r\n";
        self.s.write_all(req.as_bytes()).await?;
        self.read_response(method == "HEAD").await
    }

    /// Reads one response (after its request was sent by any means).
    pub async fn read_response(&mut self, head: bool) -> Result<Response> {
        let t0 = Instant::now();
        let (status, headers, hlen) = loop {
            let mut hs = [httparse::EMPTY_HEADER; 32];
            let mut r = httparse::Response::new(&mut hs);
            match r.parse(&self.buf)? {
                httparse::Status::Complete(n) => {
                    let headers: Vec<(String, String)> = r
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_string(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect();
                    break (r.code.unwrap_or(0), headers, n);
                }
                httparse::Status::Partial => {
                    if self.buf.len() > 64 << 10 {
                        bail!("response headers too long");
                    }
                    let mut tmp = [0u8; 16 << 10];
                    let n = self.s.read(&mut tmp).await?;
                    if n == 0 {
                        bail!(
                            "connection closed before a complete response ({} bytes of headers)",
                            self.buf.len()
                        );
                    }
                    self.buf.extend_from_slice(&tmp[..n]);
                }
            }
        };
        self.buf.drain(..hlen);
        let clen: u64 = if head {
            0
        } else {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse().ok())
                .unwrap_or(0)
        };
        let mut sha = Sha256::new();
        let mut xx = twox_hash::XxHash3_64::with_seed(0);
        let mut got = 0u64;
        // As large as the body up to 256 KiB: a small response zeroes no large buffer (in
        // `bench scale` the client shares the machine with what it measures).
        let mut chunk = vec![0u8; clen.min(256 << 10) as usize];
        let body_t0 = Instant::now();
        while got < clen {
            let n = if !self.buf.is_empty() {
                let n = self.buf.len().min((clen - got) as usize);
                chunk[..n].copy_from_slice(&self.buf[..n]);
                self.buf.drain(..n);
                n
            } else {
                let want = (clen - got).min(chunk.len() as u64) as usize;
                let want = match self.rate {
                    Some(r) => want.min((r / 50).max(4096) as usize),
                    None => want,
                };
                let n = self.s.read(&mut chunk[..want]).await?;
                if n == 0 {
                    bail!("connection closed after {got} of {clen} body bytes");
                }
                n
            };
            match self.hash {
                Hash::Sha256 => sha.update(&chunk[..n]),
                Hash::Xxh3 => std::hash::Hasher::write(&mut xx, &chunk[..n]),
            }
            if let Some(f) = &mut self.sink {
                use std::io::Write;
                f.write_all(&chunk[..n])?;
            }
            got += n as u64;
            self.progress.fetch_add(n as u64, Ordering::Relaxed);
            if let Some(r) = self.rate {
                let due = Duration::from_secs_f64(got as f64 / r as f64);
                let el = body_t0.elapsed();
                if due > el {
                    tokio::time::sleep(due - el).await;
                }
            }
        }
        let digest = match self.hash {
            Hash::Sha256 => hex::encode(sha.finalize()),
            Hash::Xxh3 => format!("{:016x}", std::hash::Hasher::finish(&xx)),
        };
        Ok(Response {
            status,
            headers,
            body_len: got,
            digest,
            elapsed: t0.elapsed(),
        })
    }
}
