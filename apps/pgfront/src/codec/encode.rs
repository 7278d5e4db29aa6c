//! Encoders of the messages a front-end writes itself. Each returns one complete message.
//!
//! Strings are C strings on the wire and cannot hold a NUL byte. Encoders of text for the
//! client cut such a string at its first NUL (the text is informational). Encoders to the
//! backend never shorten a statement or a password: they write a message the backend refuses
//! as malformed instead. Strings the parsers in [`super`] return never hold a NUL.

use super::{HEADER_LEN, PROTOCOL_3_0};
use bytes::{BufMut, Bytes, BytesMut};

/// One tagged message: `body` writes the body, the length is filled in after.
fn message(tag: u8, body: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut b = BytesMut::with_capacity(32);
    b.put_u8(tag);
    b.put_i32(0);
    body(&mut b);
    // Messages over 2 GiB cannot be expressed; nothing here builds one.
    let len = i32::try_from(b.len() - 1).unwrap_or(i32::MAX);
    b[1..HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    b.freeze()
}

/// Writes `s` as a C string, cut at its first NUL.
fn put_text(b: &mut BytesMut, s: &[u8]) {
    let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
    b.put_slice(&s[..end]);
    b.put_u8(0);
}

/// Writes `s` whole and a NUL (text for the backend: one holding a NUL makes the message
/// malformed, never shorter).
fn put_whole(b: &mut BytesMut, s: &[u8]) {
    b.put_slice(s);
    b.put_u8(0);
}

/// AuthenticationOk (`R`, code 0).
pub fn auth_ok() -> Bytes {
    message(b'R', |b| b.put_i32(0))
}

/// ParameterStatus (`S`).
pub fn parameter_status(name: &str, value: &str) -> Bytes {
    message(b'S', |b| {
        put_text(b, name.as_bytes());
        put_text(b, value.as_bytes());
    })
}

/// BackendKeyData (`K`), the key a client cancels its queries with.
pub fn backend_key_data(pid: i32, secret: i32) -> Bytes {
    message(b'K', |b| {
        b.put_i32(pid);
        b.put_i32(secret);
    })
}

/// ReadyForQuery (`Z`) with transaction status `b'I'`, `b'T'` or `b'E'`.
pub fn ready_for_query(status: u8) -> Bytes {
    message(b'Z', |b| b.put_u8(status))
}

/// CommandComplete (`C`), e.g. `"SET"` or `"SELECT 1"`.
pub fn command_complete(tag: &str) -> Bytes {
    message(b'C', |b| put_text(b, tag.as_bytes()))
}

/// ParseComplete (`1`).
pub fn parse_complete() -> Bytes {
    message(b'1', |_| {})
}

/// BindComplete (`2`).
pub fn bind_complete() -> Bytes {
    message(b'2', |_| {})
}

/// CloseComplete (`3`).
pub fn close_complete() -> Bytes {
    message(b'3', |_| {})
}

/// NoData (`n`).
pub fn no_data() -> Bytes {
    message(b'n', |_| {})
}

/// ParameterDescription (`t`). The count is 16 bits: types past 65535 are left out.
pub fn parameter_description(types: &[u32]) -> Bytes {
    let types = &types[..types.len().min(u16::MAX.into())];
    message(b't', |b| {
        b.put_u16(types.len() as u16);
        types.iter().for_each(|&t| b.put_u32(t));
    })
}

/// ErrorResponse (`E`) with fields S (severity, e.g. `"ERROR"` or `"FATAL"`), V (the same,
/// never localized), C (`sqlstate`) and M (`message`).
pub fn error_response(severity: &str, sqlstate: &str, message_text: &str) -> Bytes {
    message(b'E', |b| {
        for (code, text) in [
            (b'S', severity),
            (b'V', severity),
            (b'C', sqlstate),
            (b'M', message_text),
        ] {
            b.put_u8(code);
            put_text(b, text.as_bytes());
        }
        b.put_u8(0);
    })
}

/// A protocol 3.0 StartupMessage (untagged). If a name or value holds a NUL, which would
/// shift the pairs, the packet is written without parameters and the backend refuses it (no
/// user name).
pub fn startup_message(params: &[(String, String)]) -> Bytes {
    let nul = |s: &String| s.as_bytes().contains(&0);
    let params = match params.iter().any(|(n, v)| nul(n) || nul(v)) {
        true => &[],
        false => params,
    };
    let mut b = BytesMut::with_capacity(64);
    b.put_i32(0);
    b.put_i32(PROTOCOL_3_0);
    for (name, value) in params {
        put_whole(&mut b, name.as_bytes());
        put_whole(&mut b, value.as_bytes());
    }
    b.put_u8(0);
    let len = i32::try_from(b.len()).unwrap_or(i32::MAX);
    b[..4].copy_from_slice(&len.to_be_bytes());
    b.freeze()
}

/// Query (`Q`).
pub fn query(sql: &str) -> Bytes {
    message(b'Q', |b| put_whole(b, sql.as_bytes()))
}

/// Parse (`P`). If `name` or `sql` holds a NUL, both are cut at it and the parameter count
/// is written as 65535 with no types after it, which the backend refuses.
pub fn parse(name: &[u8], sql: &[u8], types: &[u32]) -> Bytes {
    let bad = name.contains(&0) || sql.contains(&0) || types.len() > u16::MAX.into();
    message(b'P', |b| {
        put_text(b, name);
        put_text(b, sql);
        if bad {
            b.put_u16(u16::MAX);
        } else {
            b.put_u16(types.len() as u16);
            types.iter().for_each(|&t| b.put_u32(t));
        }
    })
}

/// Bind (`B`) of the unnamed statement to the unnamed portal: no parameters, text results.
pub fn bind_unnamed() -> Bytes {
    message(b'B', |b| {
        b.put_u8(0);
        b.put_u8(0);
        b.put_u16(0);
        b.put_u16(0);
        b.put_u16(0);
    })
}

/// Execute (`E`) of the unnamed portal, every row.
pub fn execute_unnamed() -> Bytes {
    message(b'E', |b| {
        b.put_u8(0);
        b.put_i32(0);
    })
}

/// Sync (`S`).
pub fn sync() -> Bytes {
    message(b'S', |_| {})
}

/// Terminate (`X`).
pub fn terminate() -> Bytes {
    message(b'X', |_| {})
}

/// PasswordMessage (`p`): a cleartext password or an MD5 hash, NUL-terminated.
pub fn password(pw: &[u8]) -> Bytes {
    message(b'p', |b| put_whole(b, pw))
}

/// SASLInitialResponse (`p`): the chosen mechanism, then the client-first message. A
/// mechanism holding a NUL is written as an empty name, which the backend refuses.
pub fn sasl_initial_response(mechanism: &str, data: &[u8]) -> Bytes {
    let mechanism = mechanism.as_bytes();
    let mechanism = if mechanism.contains(&0) {
        &[]
    } else {
        mechanism
    };
    message(b'p', |b| {
        put_whole(b, mechanism);
        b.put_i32(i32::try_from(data.len()).unwrap_or(i32::MAX));
        b.put_slice(data);
    })
}

/// SASLResponse (`p`): the next SASL message, unframed.
pub fn sasl_response(data: &[u8]) -> Bytes {
    message(b'p', |b| b.put_slice(data))
}
