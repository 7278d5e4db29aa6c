//! Reads that clear the readiness after a short read.

use super::{recv_uninit, try_read_buf};
use std::time::Duration;
use tokio::io::{AsyncWriteExt, Interest, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// A short read clears the read readiness (the next read is not tried until the socket
/// signals again), and data that arrives afterwards signals again: no wasted `recv`, no
/// lost wake-up.
#[tokio::test]
async fn a_short_read_clears_readiness_and_later_data_wakes_the_reader() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut peer = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (sock, _) = l.accept().await.unwrap();
    let mut mem = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
    let mut got = Vec::new();
    for piece in [&b"first"[..], b"second piece"] {
        peer.write_all(piece).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), sock.readable())
            .await
            .expect("the reader is woken by data that arrived after a short read")
            .unwrap();
        let mut buf = ReadBuf::uninit(&mut mem);
        let n = recv_uninit(&sock, &mut buf).unwrap();
        assert_eq!(buf.filled(), piece);
        assert_eq!(n, piece.len());
        got.extend_from_slice(buf.filled());
        // Readiness is cleared: `try_io` answers WouldBlock without trying a read.
        let tried = sock.try_io(Interest::READABLE, || -> std::io::Result<()> {
            panic!("a read was tried on a socket drained by a short read")
        });
        assert_eq!(tried.unwrap_err().kind(), std::io::ErrorKind::WouldBlock);
    }
    assert_eq!(got, b"firstsecond piece");
}

/// The same through a `BytesMut`, as the relay agent reads its client: what arrived is
/// appended, a short read clears the readiness, and the peer's end reads as 0.
#[tokio::test]
async fn a_short_read_into_bytes_appends_and_clears_readiness() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut peer = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (sock, _) = l.accept().await.unwrap();
    let mut buf = bytes::BytesMut::from(&b"kept:"[..]);
    peer.write_all(b"request").await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), sock.readable())
        .await
        .expect("data wakes the reader")
        .unwrap();
    assert_eq!(try_read_buf(&sock, &mut buf).unwrap(), 7);
    assert_eq!(&buf[..], b"kept:request");
    let tried = sock.try_io(Interest::READABLE, || -> std::io::Result<()> {
        panic!("a read was tried on a socket drained by a short read")
    });
    assert_eq!(tried.unwrap_err().kind(), std::io::ErrorKind::WouldBlock);
    let mut empty = bytes::BytesMut::new();
    drop(peer);
    tokio::time::timeout(Duration::from_secs(5), sock.readable())
        .await
        .expect("the peer's end wakes the reader")
        .unwrap();
    assert_eq!(try_read_buf(&sock, &mut empty).unwrap(), 0, "end of stream");
}
