//! The Prometheus endpoint of `mtcp server --metrics ADDR` and `mtcp agent --metrics ADDR`: the
//! recorder of `metrics-exporter-prometheus`, rendered on request and served by a listener of
//! its own that answers `GET /metrics` and nothing else (what is counted: `mtcp::metrics`).
//!
//! Whoever reaches ADDR may ask, so each request is bounded: one request head of at most
//! [`MAX_HEAD`] bytes, read within [`READ_TIMEOUT`]; at most [`MAX_SCRAPES`] at once (more are
//! closed unanswered); one answer, then the connection closes (after at most 1 s of reading and
//! dropping what else the client sends, so that it gets the answer). Anything else is answered
//! with a 4xx status, never a panic.

use anyhow::{Context, Result};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Largest request head read; a longer one is answered 431.
pub const MAX_HEAD: usize = 4096;
/// How long a client has to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client has to take the answer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// After answering, how long and how much more input is read and dropped before closing.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 256 << 10;
/// Requests served at once.
pub const MAX_SCRAPES: usize = 16;
/// How often histogram samples are folded into their buckets between scrapes (the recorder
/// keeps raw samples until then).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The process's recorder, installed; serve it with [`Exporter::serve`].
pub struct Exporter {
    handle: PrometheusHandle,
}

impl Exporter {
    /// Installs the recorder for this process (before anything is counted, so that events
    /// from the start are), with the histograms' buckets and every metric's help text.
    pub fn install() -> Result<Self> {
        use mtcp::metrics::{MOVE_SECONDS, SECONDS_BUCKETS, TAKEOVER_SECONDS};
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(MOVE_SECONDS.into()), SECONDS_BUCKETS)?
            .set_buckets_for_metric(Matcher::Full(TAKEOVER_SECONDS.into()), SECONDS_BUCKETS)?
            .install_recorder()
            .context("installing the metrics recorder")?;
        mtcp::metrics::describe();
        Ok(Exporter { handle })
    }

    /// Listens on `addr` and serves the metrics there, running `sample` (which sets the
    /// gauges) before each rendering. Returns the address it listens on.
    pub async fn serve(
        self,
        addr: &str,
        sample: impl Fn() + Send + Sync + 'static,
    ) -> Result<SocketAddr> {
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on metrics address {addr}"))?;
        let local = l.local_addr()?;
        let handle = self.handle;
        let upkeep = handle.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(UPKEEP_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                upkeep.run_upkeep();
            }
        });
        let render: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(move || {
            sample();
            handle.render()
        });
        tokio::spawn(accept_loop(l, render));
        tracing::info!(%local, "metrics endpoint listening (GET /metrics)");
        Ok(local)
    }
}

async fn accept_loop(l: TcpListener, render: Arc<dyn Fn() -> String + Send + Sync>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES));
    loop {
        match l.accept().await {
            Ok((s, _)) => {
                // Over the limit: closed unanswered, costing nothing kept.
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    continue;
                };
                let render = render.clone();
                tokio::spawn(async move {
                    answer(s, &*render).await;
                    drop(slot);
                });
            }
            Err(e) => {
                tracing::warn!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    NotFound,
    MethodNotAllowed,
    BadRequest,
    TooLarge,
}

/// Reads one request head and answers it; closes the connection either way.
async fn answer(mut s: TcpStream, render: &(dyn Fn() -> String + Send + Sync)) {
    let route = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut s)).await {
        Ok(Ok(head)) => route(&head),
        Ok(Err(HeadError::TooLarge)) => Route::TooLarge,
        // Closed, failed or silent: nothing to answer.
        Ok(Err(HeadError::Closed)) | Err(_) => return,
    };
    let (status, body) = match route {
        Route::Metrics => ("200 OK", render()),
        Route::NotFound => ("404 Not Found", "only /metrics is served\n".to_string()),
        Route::MethodNotAllowed => ("405 Method Not Allowed", "only GET\n".to_string()),
        Route::BadRequest => ("400 Bad Request", "bad request\n".to_string()),
        Route::TooLarge => (
            "431 Request Header Fields Too Large",
            "request head too large\n".to_string(),
        ),
    };
    let content_type = if route == Route::Metrics {
        "text/plain; version=0.0.4; charset=utf-8"
    } else {
        "text/plain; charset=utf-8"
    };
    let allow = if route == Route::MethodNotAllowed {
        "Allow: GET\r\n"
    } else {
        ""
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
        body.len()
    );
    let sent = tokio::time::timeout(WRITE_TIMEOUT, async {
        s.write_all(head.as_bytes()).await?;
        s.write_all(body.as_bytes()).await?;
        s.shutdown().await
    })
    .await;
    if matches!(sent, Ok(Ok(()))) {
        // Closing with unread input (an oversized head, a body) would reset the connection,
        // and the client could lose the answer: read what else comes, bounded, first.
        let _ = tokio::time::timeout(LINGER, async {
            let mut sink = [0u8; 4096];
            let mut left = LINGER_BYTES;
            while left > 0 {
                match s.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => left = left.saturating_sub(k),
                }
            }
        })
        .await;
    }
}

enum HeadError {
    TooLarge,
    Closed,
}

/// Reads up to the end of the request head (`\r\n\r\n`), at most [`MAX_HEAD`] bytes.
async fn read_head(s: &mut TcpStream) -> Result<Vec<u8>, HeadError> {
    let mut buf = vec![0u8; MAX_HEAD];
    let mut n = 0;
    loop {
        if n == buf.len() {
            return Err(HeadError::TooLarge);
        }
        match s.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => return Err(HeadError::Closed),
            Ok(k) => {
                // The end may straddle two reads: look from 3 bytes before the new ones.
                let from = n.saturating_sub(3);
                n += k;
                if buf[from..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    buf.truncate(n);
                    return Ok(buf);
                }
            }
        }
    }
}

/// The route of a complete request head.
fn route(head: &[u8]) -> Route {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        // A head with more than 32 headers is as good as garbage here.
        Ok(httparse::Status::Partial) | Err(_) => return Route::BadRequest,
    }
    let path = req.path.unwrap_or("");
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    match (req.method, path) {
        (Some("GET"), "/metrics") => Route::Metrics,
        (Some("GET"), _) => Route::NotFound,
        _ => Route::MethodNotAllowed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_metrics_is_served() {
        let r = |h: &str| route(h.as_bytes());
        assert_eq!(
            r("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics
        );
        assert_eq!(r("GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Route::Metrics);
        assert_eq!(r("GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(r("GET /metrics/../etc HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(r("POST /metrics HTTP/1.1\r\n\r\n"), Route::MethodNotAllowed);
        assert_eq!(r("\x16\x03\x01\x02\x00\r\n\r\n"), Route::BadRequest);
        assert_eq!(r("GET /metrics\r\n\r\n"), Route::BadRequest);
    }

    /// `pieces` sent one by one with pauses, then the end of input, to a connection [`answer`]
    /// serves; what came back.
    async fn exchange(pieces: &[&[u8]]) -> String {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            answer(s, &|| "mtcp_x 1\n".to_string()).await;
        });
        let mut c = TcpStream::connect(addr).await.unwrap();
        for p in pieces {
            c.write_all(p).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Done sending (the endpoint then sees the end of its input).
        c.shutdown().await.unwrap();
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out).await;
        server.await.unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn a_head_split_anywhere_is_answered_once_and_closed() {
        let r = exchange(&[b"GET /metr", b"ics HTTP/1.1\r\nHost: x\r\n\r", b"\n"]).await;
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("Content-Length: 9\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\nmtcp_x 1\n"), "{r}");
        let r = exchange(&[b"GET / HTTP/1.1\r\n\r\n"]).await;
        assert!(r.starts_with("HTTP/1.1 404 "), "{r}");
        let r = exchange(&[&[b'a'; MAX_HEAD + 1]]).await;
        assert!(r.starts_with("HTTP/1.1 431 "), "{r}");
        // Closed before a whole head: nothing is answered.
        assert_eq!(exchange(&[b"GET /metrics HTTP/1.1\r\n"]).await, "");
    }
}
