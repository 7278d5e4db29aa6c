//! The exchange with the backend and the client: sending a unit, passing the answers through
//! (COPY input fed on the way), one answer read whole, the output flushed.

use super::*;

impl Session {
    /// Sends a unit's messages in one write: an extended-protocol batch is several small
    /// messages, and one write each would wake PostgreSQL for each.
    pub(super) async fn send_all(&mut self, frames: &[Frame]) -> Result<()> {
        match frames {
            [] => {}
            [f] => self.be.send(&f.raw).await?,
            _ => {
                let mut b = BytesMut::with_capacity(frames.iter().map(|f| f.raw.len()).sum());
                frames.iter().for_each(|f| b.extend_from_slice(&f.raw));
                self.be.send(&b).await?;
            }
        }
        Ok(())
    }

    /// Passes the backend's answers to the client up to the next ReadyForQuery, feeding COPY
    /// input from the client when the backend asks for it. Returns the transaction status;
    /// with `hold`, that ReadyForQuery is not passed on.
    pub(super) async fn pump(&mut self, hold: bool) -> Result<u8> {
        loop {
            let f = self.be.frame().await?;
            match codec::parse_back(&f)? {
                BackMsg::ReadyForQuery { status } => {
                    if !hold {
                        self.out.extend_from_slice(&f.raw);
                    }
                    return Ok(status);
                }
                BackMsg::CopyInResponse => {
                    self.out.extend_from_slice(&f.raw);
                    self.flush().await?;
                    self.copy_in().await?;
                }
                _ => {
                    self.out.extend_from_slice(&f.raw);
                    // With `hold`, a CommandComplete may be one `run_unit` withholds until its
                    // commit: it stays in `out` until another message follows it.
                    let withheld = hold && f.tag() == b'C';
                    if self.out.len() >= OUT_FLUSH && !withheld {
                        self.flush().await?;
                    }
                }
            }
        }
    }

    /// Feeds the client's COPY data to the backend until CopyDone or CopyFail.
    async fn copy_in(&mut self) -> Result<()> {
        loop {
            while let Some(f) = codec::split_frame(&mut self.inbuf, self.front.max_message)? {
                let done = matches!(
                    codec::parse_front(&f)?,
                    FrontMsg::CopyDone | FrontMsg::CopyFail { .. }
                );
                self.be.send(&f.raw).await?;
                if done {
                    return Ok(());
                }
            }
            self.inbuf.reserve(64 << 10);
            if self.conn.read_buf(&mut self.inbuf).await? == 0 {
                return Err(SessionError::Fatal(
                    "08P01",
                    "client went away during COPY".into(),
                ));
            }
        }
    }

    /// The answer to one query/Sync already sent, up to its ReadyForQuery included, less
    /// "there is no transaction in progress" warnings: `Ok(bytes)`, or `Err(bytes)` holding the
    /// ErrorResponse when it failed.
    pub(super) async fn answer(&mut self) -> Result<Result<Bytes, Bytes>> {
        let mut b = BytesMut::new();
        let mut err = None;
        loop {
            let f = self.be.frame().await?;
            match codec::parse_back(&f)? {
                BackMsg::NoticeResponse { fields }
                    if codec::field(&fields, b'C') == Some(b"25P01") => {}
                BackMsg::ErrorResponse { .. } => {
                    err.get_or_insert(f.raw.clone());
                    b.extend_from_slice(&f.raw);
                }
                BackMsg::ReadyForQuery { .. } => {
                    b.extend_from_slice(&f.raw);
                    return Ok(match err {
                        None => Ok(b.freeze()),
                        Some(e) => Err(e),
                    });
                }
                _ => b.extend_from_slice(&f.raw),
            }
        }
    }

    /// Takes the last message out of `out` if it is a CommandComplete (`out` holds whole
    /// backend messages); empty otherwise.
    pub(super) fn take_last_complete(&mut self) -> Vec<u8> {
        let (mut at, mut last) = (0, None);
        while let Some(len) = self.out.get(at + 1..at + 5) {
            last = Some(at);
            at += 1 + u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        }
        match last {
            Some(l) if self.out[l] == b'C' && at == self.out.len() => {
                self.out.split_off(l).to_vec()
            }
            _ => Vec::new(),
        }
    }

    pub(super) async fn flush(&mut self) -> Result<()> {
        if !self.out.is_empty() {
            // The connection copies what it is given (into its output log), so `out` keeps its
            // buffer for the next answer.
            self.conn.write_all(&self.out).await?;
            self.out.clear();
            if self.out.capacity() > 2 * OUT_FLUSH {
                // A large answer (one big row) does not stay allocated.
                self.out = BytesMut::new();
            }
        }
        Ok(())
    }
}
