//! The per-connection driver: reads requests, writes responses, takes snapshots.

use std::fs::File;
use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::files;
use crate::http::{self, Connection, ContentRange, Method, Parse, Request, Resolved, Status};
use crate::snapshot::{self, Body, State};
use crate::{Config, Snapshots, READ_SIZE};

/// Request bodies up to this size are read and discarded so the connection can go on; a
/// larger body gets its response with `Connection: close`.
const MAX_DISCARD: u64 = 1 << 20;
/// After the server decides to close, how long and how much it keeps reading (and discarding)
/// so that unread input does not turn the close into a reset that could destroy the response.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

/// What [`Server::next_request`] found.
enum Next {
    Request(Request),
    /// The client ended its input at a request boundary (or in the middle of a head).
    Eof,
    /// Unframeable input: answer with this status and close.
    Fatal(Status),
}

pub(crate) struct Server<'a, C> {
    conn: C,
    cfg: &'a Config,
    /// Bytes read from the connection and not yet consumed. Always part of the snapshot.
    input: Vec<u8>,
}

impl<'a, C> Server<'a, C>
where
    C: AsyncRead + AsyncWrite + Unpin + Snapshots,
{
    pub(crate) fn new(conn: C, cfg: &'a Config) -> Self {
        Self {
            conn,
            cfg,
            input: Vec::new(),
        }
    }

    pub(crate) async fn run(mut self, restart: Option<bytes::Bytes>) -> io::Result<()> {
        if let Some(snapshot) = restart {
            match snapshot::decode(&snapshot)? {
                State::Idle { leftover } => self.input = leftover,
                State::Body { body, leftover } => {
                    self.input = leftover;
                    tracing::debug!(path = %body.path, sent = body.sent, "resuming a body");
                    let file = files::reopen(&self.cfg.root, &body)?;
                    let connection = body.connection;
                    Box::pin(self.send_body(body, file)).await?;
                    if !self.end_response(connection).await? {
                        return self.close().await;
                    }
                }
            }
        }
        loop {
            let request = match self.next_request().await? {
                Next::Request(request) => request,
                Next::Eof => return self.close().await,
                Next::Fatal(status) => {
                    tracing::debug!(status = status.code(), "unframeable request");
                    let response = http::simple_response(status, None, Connection::Close, false);
                    self.conn.write_all(&response).await?;
                    return self.close().await;
                }
            };
            // Boxed: the response's state (file reads, two chunk buffers) lives on the heap
            // while it is sent, and an idle keep-alive connection's task stays small.
            let connection = Box::pin(self.respond(request)).await?;
            if !self.end_response(connection).await? {
                return self.close().await;
            }
        }
    }

    /// After a complete response: flush, and if the connection goes on take the Idle snapshot.
    /// Returns whether the connection goes on.
    async fn end_response(&mut self, connection: Connection) -> io::Result<bool> {
        self.conn.flush().await?;
        if !connection.keep_alive() {
            return Ok(false);
        }
        if self.input.is_empty() {
            // An idle keep-alive connection holds no read buffer.
            self.input = Vec::new();
        }
        self.snapshot(&State::Idle {
            leftover: self.input.clone(),
        })?;
        Ok(true)
    }

    fn snapshot(&self, state: &State) -> io::Result<()> {
        self.conn.set_state(snapshot::encode(state)?)
    }

    /// Reads at most [`READ_SIZE`] bytes onto the end of `input`; returns how many (0 at EOF).
    async fn read_input(&mut self) -> io::Result<usize> {
        let old = self.input.len();
        self.input.resize(old + READ_SIZE, 0);
        let result = self.conn.read(&mut self.input[old..]).await;
        self.input.truncate(old + *result.as_ref().unwrap_or(&0));
        result
    }

    /// Parses the next request out of `input`, reading as needed, and consumes its head and its
    /// (discarded) body.
    ///
    /// Reads are only made while `input` holds no complete head, and each is at most
    /// [`READ_SIZE`], so what is left in `input` after a head is always less than one read: the
    /// leftover a snapshot carries stays small.
    async fn next_request(&mut self) -> io::Result<Next> {
        loop {
            match http::parse(&self.input) {
                Parse::Complete {
                    head_len,
                    mut request,
                } => {
                    self.input.drain(..head_len);
                    if request.body_len > MAX_DISCARD {
                        request.connection = Connection::Close;
                    } else if !self.discard(request.body_len).await? {
                        return Ok(Next::Eof);
                    }
                    return Ok(Next::Request(request));
                }
                Parse::Fatal(status) => return Ok(Next::Fatal(status)),
                Parse::Partial => {}
            }
            // Re-parse only once a new line has arrived: a head sent byte by byte would
            // otherwise cost quadratic time. A head once begun has `head_timeout` to arrive.
            let mut began = (!self.input.is_empty()).then(tokio::time::Instant::now);
            loop {
                let old = self.input.len();
                let read = match began {
                    // Between requests: a quiet keep-alive connection is waited for.
                    None => self.read_input().await?,
                    Some(t) => {
                        let limit = self.cfg.head_timeout;
                        match tokio::time::timeout_at(t + limit, self.read_input()).await {
                            Ok(r) => r?,
                            Err(_) => {
                                tracing::debug!(
                                    buffered = self.input.len(),
                                    "request head not complete in {limit:?}"
                                );
                                return Ok(Next::Fatal(Status::RequestTimeout));
                            }
                        }
                    }
                };
                began.get_or_insert_with(tokio::time::Instant::now);
                if read == 0 {
                    // Judge what is buffered once more, so that the answer to input ending in
                    // garbage does not depend on how that input was split into reads.
                    return Ok(match http::parse(&self.input) {
                        Parse::Fatal(status) => Next::Fatal(status),
                        _ => Next::Eof,
                    });
                }
                if self.input[old..].contains(&b'\n') || self.input.len() >= http::MAX_HEAD {
                    break;
                }
            }
        }
    }

    /// Consumes `len` bytes of request body. Reads no further than the body's end, so `input`
    /// holds no more than before. Returns false on EOF inside the body.
    async fn discard(&mut self, len: u64) -> io::Result<bool> {
        let buffered = self
            .input
            .len()
            .min(usize::try_from(len).unwrap_or(usize::MAX));
        self.input.drain(..buffered);
        let mut left = len - buffered as u64;
        let mut scratch = vec![0u8; left.min(64 * 1024) as usize];
        while left > 0 {
            let want = left.min(scratch.len() as u64) as usize;
            let n = self.conn.read(&mut scratch[..want]).await?;
            if n == 0 {
                return Ok(false);
            }
            left -= n as u64;
        }
        Ok(true)
    }

    /// Writes the whole response to `request`; returns its `Connection`.
    async fn respond(&mut self, request: Request) -> io::Result<Connection> {
        let Request {
            method,
            path,
            range,
            connection,
            ..
        } = request;
        let head_only = method == Some(Method::Head);
        let simple = |status, range| http::simple_response(status, range, connection, head_only);
        let Some(_) = method else {
            self.conn
                .write_all(&simple(Status::MethodNotAllowed, None))
                .await?;
            return Ok(connection);
        };
        let path = match path {
            Ok(path) if !path.is_empty() => path,
            Ok(_) => {
                self.conn.write_all(&simple(Status::NotFound, None)).await?;
                return Ok(connection);
            }
            Err(status) => {
                self.conn.write_all(&simple(status, None)).await?;
                return Ok(connection);
            }
        };
        let Some((file, file_len)) = files::open(&self.cfg.root, &path) else {
            tracing::debug!(%path, "404");
            self.conn.write_all(&simple(Status::NotFound, None)).await?;
            return Ok(connection);
        };
        let (start, end, partial) = match http::resolve_range(range, file_len) {
            Resolved::Full => (0, file_len, false),
            Resolved::Partial { start, end } => (start, end, true),
            Resolved::Unsatisfiable => {
                let range = Some(ContentRange::Unsatisfied { total: file_len });
                self.conn
                    .write_all(&simple(Status::RangeNotSatisfiable, range))
                    .await?;
                return Ok(connection);
            }
        };
        let body = Body {
            path,
            file_len,
            start,
            end,
            partial,
            connection,
            sent: 0,
        };
        tracing::debug!(path = %body.path, start, end, head_only, "serving");
        if head_only || body.len() == 0 {
            let mut head = Vec::with_capacity(256);
            body.head().render(&mut head);
            self.conn.write_all(&head).await?;
            return Ok(connection);
        }
        self.snapshot(&State::Body {
            body: body.clone(),
            leftover: self.input.clone(),
        })?;
        self.send_body(body, file).await?;
        Ok(connection)
    }

    /// Sends the rest of `body` (and its head first when `body.sent == 0`), taking a Body
    /// snapshot each time `sent` reaches a multiple of `snapshot_every`.
    ///
    /// The next chunk is read from the file while the current one is being written; the first
    /// is read at once when cached ([`files::read_cached_first`]).
    async fn send_body(&mut self, mut body: Body, file: File) -> io::Result<()> {
        let total = body.len();
        let chunk = self.cfg.chunk_size.max(1) as u64;
        let every = self.cfg.snapshot_every;
        // Chunks end on snapshot points, so snapshots fall on exact multiples of `every`.
        let chunk_at = |sent: u64| -> usize {
            let mut n = (total - sent).min(chunk);
            if every > 0 {
                n = n.min(every - sent % every);
            }
            n as usize
        };

        // Two buffers alternate (one being filled while the other is written); they are dropped
        // with the body so that idle keep-alive connections hold no chunk memory.
        let mut spare: Vec<Vec<u8>> = Vec::with_capacity(2);
        let mut first = Vec::new();
        if body.sent == 0 {
            body.head().render(&mut first);
        }
        let prefix = first.len();
        let mut head_len = prefix;
        let mut len = chunk_at(body.sent);
        let mut task = files::read_cached_first(file, first, prefix, body.start + body.sent, len);
        loop {
            let (file, buf, result) = task.done().await?;
            result?;
            let sent = body.sent + len as u64;
            let next = (sent < total).then(|| {
                let next_len = chunk_at(sent);
                let next_buf = spare.pop().unwrap_or_default();
                (
                    files::spawn_read(file, next_buf, 0, body.start + sent, next_len),
                    next_len,
                )
            });
            let mut buf = buf;
            if let Some(k) = self.cfg.scramble {
                buf[head_len..].iter_mut().for_each(|b| *b ^= k);
            }
            head_len = 0;
            self.conn.write_all(&buf).await?;
            spare.push(buf);
            body.sent = sent;
            let Some((next_task, next_len)) = next else {
                return Ok(());
            };
            if every > 0 && sent.is_multiple_of(every) {
                self.snapshot(&State::Body {
                    body: body.clone(),
                    leftover: self.input.clone(),
                })?;
            }
            task = next_task;
            len = next_len;
        }
    }

    /// Ends the connection from this side: flush, half-close, then read and discard what the
    /// client still sends (bounded) so that the close does not become a reset.
    async fn close(mut self) -> io::Result<()> {
        self.conn.flush().await?;
        self.conn.shutdown().await?;
        // On the heap: an array here would be part of every connection's task, idle or not.
        let mut scratch = vec![0u8; 8192];
        let mut drained = 0usize;
        let linger = async {
            while drained < LINGER_BYTES {
                match self.conn.read(&mut scratch).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => drained += n,
                }
            }
        };
        // Whatever happens now, the responses are complete: the outcome is success.
        let _ = tokio::time::timeout(LINGER_TIME, linger).await;
        Ok(())
    }
}
