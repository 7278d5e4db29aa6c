//! Tests of the protocol codec: every parser on good and bad bodies, the encoders read back
//! by the parsers, and properties over arbitrary bytes and arbitrary read boundaries.

use super::*;
use proptest::prelude::*;

/// The one frame `msg` holds (the whole of it).
fn frame(msg: &[u8]) -> Frame {
    let mut buf = BytesMut::from(msg);
    let f = split_frame(&mut buf, MAX_MESSAGE)
        .unwrap()
        .expect("a complete message");
    assert!(buf.is_empty(), "bytes left after one message");
    f
}

/// A tagged message with this body.
fn raw(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// An untagged startup packet with this code and body.
fn packet(code: i32, body: &[u8]) -> Vec<u8> {
    let mut v = (body.len() as i32 + 8).to_be_bytes().to_vec();
    v.extend_from_slice(&code.to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn startup(bytes: &[u8]) -> Result<Option<Startup>, CodecError> {
    decode_startup(&mut BytesMut::from(bytes), MAX_STARTUP)
}

// The parsers borrow from the frame; leaking it keeps these one-liners (tests only).
fn front(tag: u8, body: &[u8]) -> Result<FrontMsg<'static>, CodecError> {
    pf(&raw(tag, body))
}

fn back(tag: u8, body: &[u8]) -> Result<BackMsg<'static>, CodecError> {
    pb(&raw(tag, body))
}

/// `msg` (one whole message) through `parse_front`.
fn pf(msg: &[u8]) -> Result<FrontMsg<'static>, CodecError> {
    parse_front(Box::leak(Box::new(frame(msg))))
}

/// `msg` (one whole message) through `parse_back`.
fn pb(msg: &[u8]) -> Result<BackMsg<'static>, CodecError> {
    parse_back(Box::leak(Box::new(frame(msg))))
}

fn bad(what: &'static str, why: &'static str) -> CodecError {
    CodecError::Malformed { what, why }
}

#[test]
fn startup_packets() {
    assert_eq!(
        startup(&packet(SSL_CODE, b"")),
        Ok(Some(Startup::SslRequest))
    );
    assert_eq!(
        startup(&packet(GSSENC_CODE, b"")),
        Ok(Some(Startup::GssEncRequest))
    );
    let cancel = packet(CANCEL_CODE, &[0, 0, 0, 7, 0xff, 0xff, 0xff, 0xfe]);
    let want = Startup::Cancel { pid: 7, secret: -2 };
    assert_eq!(startup(&cancel), Ok(Some(want)));
    let s = startup(&packet(PROTOCOL_3_0 | 2, b"user\0bob\0database\0db\0\0"));
    let s = s.unwrap().unwrap();
    let params = vec![
        ("user".into(), "bob".into()),
        ("database".into(), "db".into()),
    ];
    assert_eq!(s, Startup::Startup { minor: 2, params });
    assert_eq!(
        (s.param("database"), s.param("options")),
        (Some("db"), None)
    );

    // Two packets back to back: one at a time, nothing more consumed.
    let mut buf = BytesMut::from(&packet(SSL_CODE, b"")[..]);
    buf.extend_from_slice(&packet(PROTOCOL_3_0, b"user\0u\0\0"));
    assert_eq!(
        decode_startup(&mut buf, MAX_STARTUP),
        Ok(Some(Startup::SslRequest))
    );
    assert_eq!(buf.len(), 16);
    assert!(matches!(
        decode_startup(&mut buf, MAX_STARTUP),
        Ok(Some(Startup::Startup { .. }))
    ));
    assert!(buf.is_empty());
}

#[test]
fn startup_errors() {
    // Incomplete: nothing consumed.
    let full = packet(PROTOCOL_3_0, b"user\0bob\0\0");
    for n in 0..full.len() {
        let mut buf = BytesMut::from(&full[..n]);
        assert_eq!(decode_startup(&mut buf, MAX_STARTUP), Ok(None));
        assert_eq!(buf.len(), n);
    }
    let bad_len = |len: i32| CodecError::BadLength {
        tag: 0,
        len: len.into(),
    };
    assert_eq!(startup(&7i32.to_be_bytes()), Err(bad_len(7)));
    assert_eq!(startup(&(-1i32).to_be_bytes()), Err(bad_len(-1)));
    // Too large as soon as the length is there.
    let big = (MAX_STARTUP as i32 + 1).to_be_bytes();
    let too_large = CodecError::TooLarge {
        tag: 0,
        len: MAX_STARTUP + 1,
        max: MAX_STARTUP,
    };
    assert_eq!(startup(&big), Err(too_large));
    let v = |major, minor| CodecError::UnsupportedProtocol { major, minor };
    assert_eq!(startup(&packet(2 << 16, b"user\0u\0\0")), Err(v(2, 0)));
    assert_eq!(startup(&packet(1234 << 16 | 5681, b"")), Err(v(1234, 5681)));
    assert_eq!(startup(&packet(-1, b"")), Err(v(0xffff, 0xffff)));
    let s = |body: &[u8]| startup(&packet(PROTOCOL_3_0, body));
    assert_eq!(s(b"database\0d\0\0"), Err(bad("startup", "no user name")));
    let nul = bad("startup", "string without a NUL terminator");
    for body in [&b""[..], b"user\0bob\0", b"user\0bob"] {
        assert_eq!(s(body), Err(nul.clone()));
    }
    assert_eq!(s(b"user\0bob\0\0x"), Err(bad("startup", "trailing bytes")));
    assert_eq!(
        s(b"user\0\xff\0\0"),
        Err(bad("startup", "string is not UTF-8"))
    );
    let cancel = packet(CANCEL_CODE, &[0; 12]);
    assert_eq!(
        startup(&cancel),
        Err(bad("CancelRequest", "trailing bytes"))
    );
    let cancel = packet(CANCEL_CODE, &[0; 4]);
    assert_eq!(startup(&cancel), Err(bad("CancelRequest", "truncated")));
    assert_eq!(
        startup(&packet(SSL_CODE, b"x")),
        Err(bad("startup", "trailing bytes"))
    );
}

#[test]
fn framing() {
    let q = raw(b'Q', b"SELECT 1\0");
    let mut buf = BytesMut::from(&[q.clone(), raw(b'S', b"")].concat()[..]);
    let start = buf.as_ptr();
    let f = split_frame(&mut buf, MAX_MESSAGE).unwrap().unwrap();
    assert_eq!(
        (&f.raw[..], f.tag(), f.body()),
        (&q[..], b'Q', &b"SELECT 1\0"[..])
    );
    assert_eq!(
        f.raw.as_ptr(),
        start,
        "the frame shares the buffer's memory"
    );
    assert_eq!(
        split_frame(&mut buf, 5).unwrap().unwrap().raw,
        raw(b'S', b"")
    );
    assert!(buf.is_empty());
    // Incomplete header, incomplete body.
    for n in 0..q.len() {
        let mut buf = BytesMut::from(&q[..n]);
        assert_eq!(split_frame(&mut buf, MAX_MESSAGE), Ok(None));
        assert_eq!(buf.len(), n);
    }
    let split = |b: &[u8], max| split_frame(&mut BytesMut::from(b), max);
    let bad_len = |len: i64| Err(CodecError::BadLength { tag: b'Q', len });
    assert_eq!(split(&[b'Q', 0, 0, 0, 3], 100), bad_len(3));
    assert_eq!(split(&[b'Q', 0x80, 0, 0, 0], 100), bad_len(i32::MIN.into()));
    let too_large = Err(CodecError::TooLarge {
        tag: b'Q',
        len: 14,
        max: 13,
    });
    assert_eq!(split(&q, q.len() - 1), too_large);
    assert!(split(&q, q.len()).unwrap().is_some());
    // A hand-made empty frame does not panic.
    let empty = Frame { raw: Bytes::new() };
    assert_eq!((empty.tag(), empty.body()), (0, &[][..]));
    assert_eq!(parse_front(&empty), Ok(FrontMsg::Other { tag: 0 }));
}

#[test]
fn error_display() {
    let e = CodecError::TooLarge {
        tag: b'Q',
        len: 20,
        max: 10,
    };
    assert_eq!(
        e.to_string(),
        "message of type 'Q' is 20 bytes, over the limit of 10"
    );
    let e = CodecError::BadLength { tag: 0, len: 3 };
    assert_eq!(
        e.to_string(),
        "invalid message length 3 for message type startup"
    );
    let e = CodecError::BadLength { tag: 1, len: -3 };
    assert_eq!(
        e.to_string(),
        "invalid message length -3 for message type 0x01"
    );
}

#[test]
fn front_messages() {
    assert_eq!(
        front(b'Q', b"SELECT 1\0"),
        Ok(FrontMsg::Query { sql: b"SELECT 1" })
    );
    let parse = FrontMsg::Parse {
        name: b"s1",
        sql: b"SELECT $1",
        types: vec![23, 1 << 31],
    };
    let body = b"s1\0SELECT $1\0\0\x02\0\0\0\x17\x80\0\0\0";
    assert_eq!(front(b'P', body), Ok(parse));
    let bind = FrontMsg::Bind {
        portal: b"",
        statement: b"s1",
    };
    assert_eq!(front(b'B', b"\0s1\0\0\0\0\0\0\0"), Ok(bind));
    let describe = FrontMsg::Describe {
        kind: b'S',
        name: b"s1",
    };
    assert_eq!(front(b'D', b"Ss1\0"), Ok(describe));
    let execute = FrontMsg::Execute {
        portal: b"p",
        max_rows: 10,
    };
    assert_eq!(front(b'E', b"p\0\0\0\0\x0a"), Ok(execute));
    assert_eq!(
        front(b'C', b"P\0"),
        Ok(FrontMsg::Close {
            kind: b'P',
            name: b""
        })
    );
    assert_eq!(front(b'S', b""), Ok(FrontMsg::Sync));
    assert_eq!(front(b'H', b""), Ok(FrontMsg::Flush));
    assert_eq!(front(b'X', b"ignored"), Ok(FrontMsg::Terminate));
    assert_eq!(front(b'd', b"1\t2\n"), Ok(FrontMsg::CopyData));
    assert_eq!(front(b'c', b""), Ok(FrontMsg::CopyDone));
    assert_eq!(
        front(b'f', b"oops\0"),
        Ok(FrontMsg::CopyFail { message: b"oops" })
    );
    assert_eq!(front(b'p', b"secret\0"), Ok(FrontMsg::Other { tag: b'p' }));
    assert_eq!(front(b'F', b"junk"), Ok(FrontMsg::Other { tag: b'F' }));
}

#[test]
fn front_errors() {
    let nul = "string without a NUL terminator";
    assert_eq!(front(b'Q', b"SELECT 1"), Err(bad("Query", nul)));
    assert_eq!(
        front(b'Q', b"SELECT 1\0;\0"),
        Err(bad("Query", "trailing bytes"))
    );
    let count = "parameter type count does not match";
    assert_eq!(front(b'P', b"\0SELECT 1\0\0\x01"), Err(bad("Parse", count)));
    assert_eq!(front(b'P', b"\0SELECT 1\0\0\0\0"), Err(bad("Parse", count)));
    assert_eq!(
        front(b'P', b"\0SELECT 1\0\0"),
        Err(bad("Parse", "truncated"))
    );
    assert_eq!(front(b'B', b"portal\0"), Err(bad("Bind", nul)));
    let kind = "kind is neither 'S' nor 'P'";
    assert_eq!(front(b'D', b"Xs\0"), Err(bad("Describe", kind)));
    assert_eq!(front(b'C', b"s\0"), Err(bad("Close", kind)));
    assert_eq!(front(b'D', b""), Err(bad("Describe", "truncated")));
    assert_eq!(front(b'C', b"Ss\0\0"), Err(bad("Close", "trailing bytes")));
    assert_eq!(front(b'E', b"p\0\0\0"), Err(bad("Execute", "truncated")));
    assert_eq!(front(b'S', b"x"), Err(bad("Sync", "trailing bytes")));
    assert_eq!(front(b'H', b"x"), Err(bad("Flush", "trailing bytes")));
    assert_eq!(front(b'f', b"oops"), Err(bad("CopyFail", nul)));
}

#[test]
fn back_messages() {
    let md5 = BackMsg::Authentication {
        code: 5,
        data: b"salt",
    };
    assert_eq!(back(b'R', b"\0\0\0\x05salt"), Ok(md5));
    let status = BackMsg::ParameterStatus {
        name: "TimeZone",
        value: "UTC",
    };
    assert_eq!(back(b'S', b"TimeZone\0UTC\0"), Ok(status));
    let key = BackMsg::BackendKeyData { pid: 1, secret: -1 };
    assert_eq!(back(b'K', b"\0\0\0\x01\xff\xff\xff\xff"), Ok(key));
    for s in [b'I', b'T', b'E'] {
        assert_eq!(back(b'Z', &[s]), Ok(BackMsg::ReadyForQuery { status: s }));
    }
    let done = BackMsg::CommandComplete { tag: b"INSERT 0 1" };
    assert_eq!(back(b'C', b"INSERT 0 1\0"), Ok(done));
    let fields = vec![(b'S', &b"ERROR"[..]), (b'C', b"42P01"), (b'M', b"")];
    let body = b"SERROR\0C42P01\0M\0\0";
    assert_eq!(
        back(b'E', body),
        Ok(BackMsg::ErrorResponse {
            fields: fields.clone()
        })
    );
    assert_eq!(
        back(b'N', body),
        Ok(BackMsg::NoticeResponse {
            fields: fields.clone()
        })
    );
    assert_eq!(
        back(b'N', b"\0"),
        Ok(BackMsg::NoticeResponse { fields: vec![] })
    );
    assert_eq!(field(&fields, b'C'), Some(&b"42P01"[..]));
    assert_eq!(field(&fields, b'D'), None);
    let cases = [
        (b'G', BackMsg::CopyInResponse),
        (b'H', BackMsg::CopyOutResponse),
        (b'W', BackMsg::CopyBothResponse),
        (b'1', BackMsg::ParseComplete),
        (b'2', BackMsg::BindComplete),
        (b'3', BackMsg::CloseComplete),
        (b'n', BackMsg::NoData),
        (b'I', BackMsg::EmptyQueryResponse),
        (b's', BackMsg::PortalSuspended),
        (b'A', BackMsg::NotificationResponse),
        (b'T', BackMsg::Other { tag: b'T' }),
        (b'D', BackMsg::Other { tag: b'D' }),
    ];
    for (tag, msg) in cases {
        assert_eq!(back(tag, b""), Ok(msg));
    }
}

#[test]
fn back_errors() {
    assert_eq!(back(b'R', b"\0\0"), Err(bad("Authentication", "truncated")));
    let utf8 = "string is not UTF-8";
    assert_eq!(back(b'S', b"a\0\xc3\0"), Err(bad("ParameterStatus", utf8)));
    assert_eq!(
        back(b'S', b"a\0b"),
        Err(bad("ParameterStatus", "string without a NUL terminator"))
    );
    assert_eq!(
        back(b'K', b"\0\0\0\x01"),
        Err(bad("BackendKeyData", "truncated"))
    );
    assert_eq!(
        back(b'K', &[0; 9]),
        Err(bad("BackendKeyData", "trailing bytes"))
    );
    let status = "unknown transaction status";
    assert_eq!(back(b'Z', b"X"), Err(bad("ReadyForQuery", status)));
    assert_eq!(
        back(b'Z', b"II"),
        Err(bad("ReadyForQuery", "trailing bytes"))
    );
    assert_eq!(
        back(b'E', b"SERROR\0"),
        Err(bad("ErrorResponse", "truncated"))
    );
    assert_eq!(
        back(b'N', b"\0\0"),
        Err(bad("NoticeResponse", "trailing bytes"))
    );
    assert_eq!(
        back(b'1', b"x"),
        Err(bad("ParseComplete", "trailing bytes"))
    );
    assert_eq!(
        back(b'C', b"SELECT 1"),
        Err(bad("CommandComplete", "string without a NUL terminator"))
    );
}

#[test]
fn encoders() {
    assert_eq!(&auth_ok()[..], b"R\0\0\0\x08\0\0\0\0");
    assert_eq!(
        pb(&auth_ok()),
        Ok(BackMsg::Authentication { code: 0, data: b"" })
    );
    assert_eq!(&ready_for_query(b'I')[..], b"Z\0\0\0\x05I");
    assert_eq!(&sync()[..], b"S\0\0\0\x04");
    assert_eq!(&terminate()[..], b"X\0\0\0\x04");
    assert_eq!(pf(&sync()), Ok(FrontMsg::Sync));
    assert_eq!(pf(&terminate()), Ok(FrontMsg::Terminate));
    assert_eq!(pb(&parse_complete()), Ok(BackMsg::ParseComplete));
    assert_eq!(pb(&bind_complete()), Ok(BackMsg::BindComplete));
    assert_eq!(pb(&close_complete()), Ok(BackMsg::CloseComplete));
    assert_eq!(pb(&no_data()), Ok(BackMsg::NoData));
    assert_eq!(
        &parameter_description(&[23, 25])[..],
        b"t\0\0\0\x0e\0\x02\0\0\0\x17\0\0\0\x19"
    );
    assert_eq!(
        parameter_description(&vec![0; 70_000]).len(),
        5 + 2 + 4 * 65535
    );
    assert_eq!(&password(b"pw")[..], b"p\0\0\0\x07pw\0");
    assert_eq!(&sasl_response(b"c=biws")[..], b"p\0\0\0\x0ac=biws");
    let initial = sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=x");
    assert_eq!(
        &initial[..],
        &raw(b'p', b"SCRAM-SHA-256\0\0\0\0\x09n,,n=,r=x")[..]
    );
    assert_eq!(
        &sasl_initial_response("A\0B", b"")[..],
        &raw(b'p', b"\0\0\0\0\0")[..]
    );
    let params = [("user".to_string(), "bob".to_string())];
    assert_eq!(
        &startup_message(&params)[..],
        &packet(PROTOCOL_3_0, b"user\0bob\0\0")[..]
    );
}

#[test]
fn encoders_never_shorten_backend_text() {
    // Text for the client is cut at a NUL ...
    let e = frame(&error_response("ERROR", "XX000", "bad\0news"));
    let BackMsg::ErrorResponse { fields } = parse_back(&e).unwrap() else {
        panic!()
    };
    assert_eq!(field(&fields, b'M'), Some(&b"bad"[..]));
    assert_eq!(
        pb(&command_complete("A\0B")),
        Ok(BackMsg::CommandComplete { tag: b"A" })
    );
    // ... statements and passwords for the backend are refused instead.
    let q = frame(&query("DELETE FROM t\0 WHERE id = 1"));
    assert_eq!(parse_front(&q), Err(bad("Query", "trailing bytes")));
    let count = "parameter type count does not match";
    // A tail after the NUL that would read as a count and one type.
    let p = parse(b"", b"DELETE FROM t\0\0\x01A", &[]);
    assert_eq!(&p[5..], b"\0DELETE FROM t\0\xff\xff");
    assert_eq!(pf(&p), Err(bad("Parse", count)));
    // PostgreSQL wants the password's only NUL last.
    assert_eq!(&password(b"a\0b")[5..], b"a\0b\0");
    let params = [("user".to_string(), "bob\0database\0postgres".to_string())];
    let s = decode_startup(
        &mut BytesMut::from(&startup_message(&params)[..]),
        MAX_STARTUP,
    );
    assert_eq!(s, Err(bad("startup", "no user name")));
}

/// Any message this module can encode, in either direction.
fn any_message() -> impl Strategy<Value = Bytes> {
    let text = "[^\x00]{0,40}";
    let bytes = proptest::collection::vec(any::<u8>(), 0..64);
    prop_oneof![
        Just(auth_ok()),
        (text, text).prop_map(|(n, v)| parameter_status(&n, &v)),
        (any::<i32>(), any::<i32>()).prop_map(|(p, s)| backend_key_data(p, s)),
        prop::sample::select(vec![b'I', b'T', b'E']).prop_map(ready_for_query),
        text.prop_map(|t| command_complete(&t)),
        Just(parse_complete()),
        Just(no_data()),
        proptest::collection::vec(any::<u32>(), 0..8).prop_map(|t| parameter_description(&t)),
        (text, text, text).prop_map(|(s, c, m)| error_response(&s, &c, &m)),
        text.prop_map(|q| query(&q)),
        (text, text, proptest::collection::vec(any::<u32>(), 0..8)).prop_map(|(n, q, t)| parse(
            n.as_bytes(),
            q.as_bytes(),
            &t
        )),
        Just(sync()),
        bytes.clone().prop_map(|b| sasl_response(&b)),
        (text, bytes).prop_map(|(m, b)| sasl_initial_response(&m, &b)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// (a) Arbitrary bytes: no panic, nothing consumed on `Ok(None)` or an error, frames
    /// within the limit and self-consistent.
    #[test]
    fn arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..300),
                       max in prop::sample::select(vec![0usize, 5, 6, 16, 64, 4096])) {
        let mut buf = BytesMut::from(&data[..]);
        if decode_startup(&mut buf, max).is_err() {
            prop_assert_eq!(buf.len(), data.len());
        }
        prop_assert!(buf.len() <= data.len());
        let mut buf = BytesMut::from(&data[..]);
        let mut used = 0;
        loop {
            let before = buf.len();
            match split_frame(&mut buf, max) {
                Ok(Some(f)) => {
                    prop_assert!(f.raw.len() >= HEADER_LEN && f.raw.len() <= max);
                    prop_assert_eq!(&f.raw[..], &data[used..used + f.raw.len()]);
                    prop_assert_eq!(before - buf.len(), f.raw.len());
                    used += f.raw.len();
                    let _ = (parse_front(&f), parse_back(&f));
                }
                _ => {
                    prop_assert_eq!(buf.len(), before);
                    break;
                }
            }
        }
        // Every tag through both parsers, on a body made of the input.
        let body = &data[..data.len().min(64)];
        let f = frame(&raw(data.first().copied().unwrap_or(b'Q'), body));
        let _ = (parse_front(&f), parse_back(&f));
    }

    /// (b) A stream of valid messages read in arbitrary pieces yields the same messages.
    #[test]
    fn pieces_give_the_same_frames(msgs in proptest::collection::vec(any_message(), 0..12),
                                   cuts in proptest::collection::vec(1usize..40, 1..8)) {
        let params = [("user".to_string(), "u".to_string())];
        let wire: Vec<u8> = std::iter::once(startup_message(&params))
            .chain(msgs.iter().cloned()).flatten().collect();
        let (mut buf, mut pos, mut got, mut started) = (BytesMut::new(), 0, vec![], false);
        for cut in cuts.iter().cycle() {
            if pos == wire.len() {
                break;
            }
            let end = (pos + cut).min(wire.len());
            buf.extend_from_slice(&wire[pos..end]);
            pos = end;
            if !started {
                started = decode_startup(&mut buf, MAX_STARTUP).unwrap().is_some();
            }
            if started {
                while let Some(f) = split_frame(&mut buf, MAX_MESSAGE).unwrap() {
                    got.push(f.raw);
                }
            }
        }
        prop_assert!(started && buf.is_empty());
        prop_assert_eq!(got, msgs);
    }

    /// (c) Encoders read back by the parsers.
    #[test]
    fn round_trips(a in "[^\x00]{0,30}", b in "[^\x00]{0,30}", c in "[^\x00]{0,30}",
                   x in any::<i32>(), y in any::<i32>(),
                   types in proptest::collection::vec(any::<u32>(), 0..20)) {
        let e = frame(&error_response(&a, &b, &c));
        let BackMsg::ErrorResponse { fields } = parse_back(&e).unwrap() else { panic!() };
        let want = vec![(b'S', a.as_bytes()), (b'V', a.as_bytes()), (b'C', b.as_bytes()),
                        (b'M', c.as_bytes())];
        prop_assert_eq!(fields, want);
        let ps = BackMsg::ParameterStatus { name: &a, value: &b };
        prop_assert_eq!(pb(&parameter_status(&a, &b)), Ok(ps));
        let key = BackMsg::BackendKeyData { pid: x, secret: y };
        prop_assert_eq!(pb(&backend_key_data(x, y)), Ok(key));
        let done = BackMsg::CommandComplete { tag: a.as_bytes() };
        prop_assert_eq!(pb(&command_complete(&a)), Ok(done));
        let q = FrontMsg::Query { sql: c.as_bytes() };
        prop_assert_eq!(pf(&query(&c)), Ok(q));
        let p = FrontMsg::Parse { name: a.as_bytes(), sql: c.as_bytes(), types: types.clone() };
        prop_assert_eq!(pf(&parse(a.as_bytes(), c.as_bytes(), &types)), Ok(p));
        let params = vec![("user".to_string(), a.clone()), (b.clone(), c.clone())];
        let params = if b.is_empty() { params[..1].to_vec() } else { params };
        let mut buf = BytesMut::from(&startup_message(&params)[..]);
        let s = decode_startup(&mut buf, usize::MAX).unwrap();
        prop_assert_eq!(s, Some(Startup::Startup { minor: 0, params }));
        prop_assert!(buf.is_empty());
    }

    /// (d) An over-limit message is refused on its header alone, body or no body.
    #[test]
    fn too_large_from_the_header(tag in any::<u8>(), max in 8usize..100_000,
                                 extra in 1usize..1_000_000, body in 0usize..64) {
        let len = (max + extra).min(i32::MAX as usize);
        let mut msg = vec![tag];
        msg.extend_from_slice(&(len as i32 - 1).to_be_bytes());
        msg.resize(5 + body, 0);
        let e = split_frame(&mut BytesMut::from(&msg[..]), max);
        prop_assert_eq!(e, Err(CodecError::TooLarge { tag, len, max }));
        let mut pkt = (len as i32).to_be_bytes().to_vec();
        pkt.resize(4 + body, 0);
        let e = decode_startup(&mut BytesMut::from(&pkt[..]), max);
        prop_assert_eq!(e, Err(CodecError::TooLarge { tag: 0, len, max }));
    }
}
