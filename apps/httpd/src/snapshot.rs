//! The per-connection snapshot: what the app exports with `set_state` and resumes from.
//!
//! Encoded as `[version: u16 BE][postcard body]`; a snapshot of another version is rejected
//! with a clear error rather than misread.

use std::io;

use serde::{Deserialize, Serialize};

use crate::http::{content_type, normalize_path, ContentRange, Head, Status};
use crate::http::{Connection, MAX_TARGET};

/// Version of the snapshot encoding. Bumped on any incompatible change.
pub const SNAPSHOT_VERSION: u16 = 1;

/// Upper bound of an encoded snapshot: a path of at most [`MAX_TARGET`] bytes plus unread input
/// of less than one request read ([`crate::READ_SIZE`]) plus a few dozen bytes of fields.
pub const MAX_SNAPSHOT_LEN: usize = MAX_TARGET + crate::READ_SIZE + 64;
const _: () = assert!(
    MAX_SNAPSHOT_LEN < 4096,
    "snapshots must stay well under 4 KiB"
);

/// Where the connection is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum State {
    /// At a request boundary: no response in progress.
    Idle {
        /// Input already read from the connection but not yet consumed (pipelined requests).
        leftover: Vec<u8>,
    },
    /// Sending the body of a 200/206 response to a GET.
    Body {
        body: Body,
        /// Input already read from the connection past the current request.
        leftover: Vec<u8>,
    },
}

/// A body being sent: enough to regenerate the rest of the response from the file alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Body {
    /// Normalized path relative to the root.
    pub path: String,
    /// File length when the response was planned; a restart requires the same length.
    pub file_len: u64,
    /// Body = file bytes `[start, end)`.
    pub start: u64,
    pub end: u64,
    /// 206 (with `Content-Range`) rather than 200.
    pub partial: bool,
    pub connection: Connection,
    /// Body bytes already written. The head goes out in the same write as the first body bytes,
    /// so `sent == 0` means nothing of this response has been written yet (the head is
    /// regenerated from these fields), and `sent > 0` means the head was written.
    pub sent: u64,
}

impl Body {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// The response head, a pure function of the fields.
    pub fn head(&self) -> Head {
        Head {
            status: if self.partial {
                Status::PartialContent
            } else {
                Status::Ok
            },
            content_type: content_type(&self.path),
            content_length: self.len(),
            content_range: self.partial.then_some(ContentRange::Bytes {
                start: self.start,
                end: self.end,
                total: self.file_len,
            }),
            connection: self.connection,
        }
    }

    fn validate(&self) -> Result<(), &'static str> {
        if normalize_path(&self.path).as_deref() != Some(self.path.as_str()) || self.path.is_empty()
        {
            return Err("path is not a normalized relative path");
        }
        if !(self.start < self.end && self.end <= self.file_len && self.sent < self.len()) {
            return Err("inconsistent body range");
        }
        if !self.partial && (self.start != 0 || self.end != self.file_len) {
            return Err("a 200 body must be the whole file");
        }
        Ok(())
    }
}

pub(crate) fn encode(state: &State) -> io::Result<bytes::Bytes> {
    let out = SNAPSHOT_VERSION.to_be_bytes().to_vec();
    postcard::to_extend(state, out)
        .map(bytes::Bytes::from)
        .map_err(|e| io::Error::other(format!("cannot encode httpd snapshot: {e}")))
}

pub(crate) fn decode(snapshot: &[u8]) -> io::Result<State> {
    let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidData, msg);
    let Some((version, body)) = snapshot.split_first_chunk::<2>() else {
        return Err(invalid("httpd snapshot is truncated".into()));
    };
    let version = u16::from_be_bytes(*version);
    if version != SNAPSHOT_VERSION {
        return Err(invalid(format!(
            "httpd snapshot version {version} is not supported (this server reads version \
             {SNAPSHOT_VERSION})"
        )));
    }
    let state: State =
        postcard::from_bytes(body).map_err(|e| invalid(format!("bad httpd snapshot: {e}")))?;
    if let State::Body { body, .. } = &state {
        body.validate()
            .map_err(|e| invalid(format!("bad httpd snapshot: {e}")))?;
    }
    Ok(state)
}

/// A readable summary of a snapshot, for logs and status displays.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SnapshotInfo {
    /// Between requests.
    Idle {
        /// Bytes of read-but-unconsumed input carried in the snapshot.
        leftover: usize,
    },
    /// In the middle of a response body.
    Body {
        /// File path relative to the root.
        path: String,
        /// Body bytes already sent.
        sent: u64,
        /// Body length.
        len: u64,
        /// Bytes of read-but-unconsumed input carried in the snapshot.
        leftover: usize,
    },
}

/// Decodes a snapshot taken by this crate into a summary.
pub fn inspect_snapshot(snapshot: &[u8]) -> io::Result<SnapshotInfo> {
    Ok(match decode(snapshot)? {
        State::Idle { leftover } => SnapshotInfo::Idle {
            leftover: leftover.len(),
        },
        State::Body { body, leftover } => SnapshotInfo::Body {
            sent: body.sent,
            len: body.len(),
            path: body.path,
            leftover: leftover.len(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> Body {
        Body {
            path: "dir/file.bin".into(),
            file_len: 100,
            start: 10,
            end: 60,
            partial: true,
            connection: Connection::Persistent,
            sent: 20,
        }
    }

    #[test]
    fn round_trip() {
        let states = [
            State::Idle { leftover: vec![] },
            State::Idle {
                leftover: b"GET / HTTP/1.1\r\n".to_vec(),
            },
            State::Body {
                body: body(),
                leftover: b"HEAD".to_vec(),
            },
        ];
        for s in states {
            let enc = encode(&s).unwrap();
            assert_eq!(&enc[..2], &SNAPSHOT_VERSION.to_be_bytes());
            assert_eq!(decode(&enc).unwrap(), s);
        }
    }

    #[test]
    fn rejects_bad_snapshots() {
        let enc = encode(&State::Body {
            body: body(),
            leftover: vec![],
        })
        .unwrap();
        for cut in 0..enc.len() {
            assert!(decode(&enc[..cut]).is_err(), "truncated at {cut}");
        }
        let mut other = enc.to_vec();
        other[1] ^= 0x7f;
        let err = decode(&other).unwrap_err();
        assert!(err.to_string().contains("version"), "{err}");
        for bad in [
            Body {
                path: "../x".into(),
                ..body()
            },
            Body {
                path: "/abs".into(),
                ..body()
            },
            Body {
                path: String::new(),
                ..body()
            },
            Body { sent: 50, ..body() },
            Body { end: 101, ..body() },
            Body {
                partial: false,
                ..body()
            },
        ] {
            let enc = encode(&State::Body {
                body: bad.clone(),
                leftover: vec![],
            })
            .unwrap();
            assert!(decode(&enc).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn largest_snapshot_fits_the_bound() {
        let body = Body {
            path: "a".repeat(MAX_TARGET),
            ..body()
        };
        let enc = encode(&State::Body {
            body,
            leftover: vec![0xff; crate::READ_SIZE - 1],
        })
        .unwrap();
        assert!(
            enc.len() <= MAX_SNAPSHOT_LEN,
            "{} > {MAX_SNAPSHOT_LEN}",
            enc.len()
        );
    }
}
